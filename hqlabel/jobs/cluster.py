"""Joining a Ray cluster from a job's driver or a submitting machine: its token, and which nodes did the work.

Ray's token authentication: a cluster started with ``RAY_AUTH_MODE=token`` refuses clients without its token
(Ray 2.60 turns it on by default for a local ``ray.init()``, and for ``ray start`` where ``~/.ray/auth_token``
exists).
Ray's clients look for the token in ``RAY_AUTH_TOKEN``, then in the file ``RAY_AUTH_TOKEN_PATH``, then in
``~/.ray/auth_token``, but send it only when this process is in token mode, which Ray 2.60 turns on by itself
only when it finds a local cluster (``address="auto"``), never for an explicit address or ``RAY_ADDRESS``.
``use_cluster_token`` turns it on for those too whenever a token is found (a cluster without authentication
ignores it), and ``auth_error`` says in one line what to set when the cluster still refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it (Ray's default "
    "file: ~/.ray/auth_token; `ray get-auth-token` on the head prints it)"
)
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource marking the head node


def token_source() -> str | None:
    """Where Ray's clients take the token from, in Ray's order (for messages), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def use_cluster_token() -> None:
    """Make this process's Ray clients send the token Ray finds (if any) to an explicitly addressed cluster.

    An explicit ``RAY_AUTH_MODE`` is respected as Ray does (``disabled`` never sends a token). Does nothing
    with a Ray that has no token authentication, or in a process already connected to Ray (its mode is set).

    Raises:
        PermissionError: ``RAY_AUTH_TOKEN_PATH`` names a file that is missing or empty.
    """
    try:
        import ray
        from ray._private.authentication import authentication_token_setup as setup
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray before 2.52: no token authentication
        return
    if ray.is_initialized():
        return
    # Its warning "Token authentication is enabled for this Ray cluster" is meant for a cluster it starts.
    try:
        with _quiet(setup.__name__):
            setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except AuthenticationError as e:
        raise PermissionError(
            f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')!r} is missing or empty: {TOKEN_HELP}"
        ) from e


def is_auth_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a cluster refusing this client's token or its lack of one.

    ``ray.init`` retries a refused connection for a while and then raises a plain ``ConnectionError`` whose
    cause holds the last attempt's traceback as text, so the text is checked too.
    """
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        return False
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def auth_error(address: str) -> PermissionError:
    """The one-line error for a cluster at ``address`` that wants a token this process lacks or got wrong."""
    source = token_source()
    if source is None:
        return PermissionError(
            f"the Ray cluster at {address} requires a token (token authentication) and none was found: "
            f"{TOKEN_HELP}"
        )
    return PermissionError(f"the Ray cluster at {address} refused the token from {source}: {TOKEN_HELP}")


ADDRESS_HELP = (
    "Ray cluster to join: HOST:PORT (its GCS, e.g. 10.0.0.5:6379), ray://HOST:10001, or auto (Ray's own "
    "discovery: the cluster of the last `ray start` on this machine). Default: RAY_ADDRESS when set (Ray "
    "Jobs sets it), else a new local Ray, never a cluster left running here"
)
LOCAL = "local"  # Ray's address for "start a new local Ray, whatever else runs here"


def ray_address(address: str | None) -> str:
    """Where a job's ``ray.init`` goes: ``address`` when given (``host:port``, ``ray://...``, or ``auto`` for
    Ray's own discovery), else ``RAY_ADDRESS`` when set (Ray Jobs sets it for a submitted driver), else
    ``"local"``: a new local Ray.

    Never ``None``: Ray's ``ray.init(address=None)`` joins the cluster that ``RAY_TMPDIR/ray/
    ray_current_cluster`` (default ``/tmp/ray/``) names, the last ``ray start`` on this machine, even one that
    is long dead (it then hangs retrying); ``"local"`` skips that file.
    """
    return address or os.environ.get("RAY_ADDRESS") or LOCAL


def is_local(address: str | None) -> bool:
    """Whether ``ray_init(address=address)`` starts a new local Ray (whose CPUs are this machine's)."""
    return ray_address(address) == LOCAL


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from the logger ``logger_name`` while the block runs."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def ray_init(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` at ``ray_address(kwargs.get("address"))``: a new local Ray unless an address is
    given (or ``RAY_ADDRESS`` set); joining a cluster sends its token if found.

    Raises:
        PermissionError: the cluster requires a token and none was found, or it refused the one found.
    """
    import ray

    address = kwargs["address"] = ray_address(kwargs.get("address"))
    if address == LOCAL:  # a new local Ray: Ray sets up its own token
        # Its warning "Token authentication is enabled for this Ray cluster" would print on every run; the
        # token it makes stays on this machine (~/.ray/auth_token) and the local Ray binds to it alone.
        with _quiet("ray._private.authentication.authentication_token_setup"):
            ray.init(**kwargs)
        return
    use_cluster_token()
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
        if is_auth_failure(e):
            raise auth_error(address) from e
        raise


def describe_nodes(images: Mapping[str | None, int]) -> dict[str, dict]:
    """``job.json``'s ``nodes``: per Ray node id that labeled images, how many (a retried batch counts again),
    the node's address and whether it is the head. Images labeled outside Ray (node id None) are left out."""
    import ray

    known = {node["NodeID"]: node for node in ray.nodes()}
    described = {}
    for node, count in sorted((n, c) for n, c in images.items() if n is not None):
        info = known.get(node, {})
        described[node] = {
            "images": count,
            "address": info.get("NodeManagerAddress"),
            "head": HEAD_RESOURCE in info.get("Resources", {}),
        }
    return described
