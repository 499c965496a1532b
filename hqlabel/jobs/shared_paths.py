"""Local paths on a Ray cluster of several nodes: every node must see them, at the same path.

A job's tasks, actors and training workers run on any node, so a local ``--out`` or ``--data`` works on a
cluster only where it lies on storage every node mounts at the same path (NFS, EFS, a Kubernetes shared
volume); otherwise each node writes its own partial copy, or finds no data. S3 needs no check. The check is
real proof, not a flag the user sets: the driver writes a marker file with a random name into each local
output folder, and one tiny task per node (no CPU asked, pinned to the node) looks for the markers and for
what the driver sees at each local input (a file's size, a folder's entries). A node that sees something
else refuses the job in one line, before anything starts. It checks the nodes alive when the job starts; it
is skipped where the driver's own node is the only one (a local Ray).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from hqlabel.platform import storage

MARKER_PREFIX = ".hqlabel-shared-check-"
CHECK_TIMEOUT_S = 120.0

Fingerprint = tuple | None


def fingerprint(path: str) -> Fingerprint:
    """What this machine sees at the local ``path``: None when nothing is there, ``("file", size)`` or
    ``("dir", number of entries, SHA-1 of their sorted names)`` (small, however large the folder)."""
    local = Path(path)
    if local.is_file():
        return ("file", local.stat().st_size)
    if local.is_dir():
        names = sorted(os.listdir(local))
        return ("dir", len(names), hashlib.sha1("\0".join(names).encode()).hexdigest())
    return None


def unseen(expected: Mapping[str, Fingerprint]) -> list[str]:
    """The paths of ``expected`` (path -> the driver's fingerprint) that this node sees differently."""
    return [path for path, seen in expected.items() if fingerprint(path) != seen]


def _local(uri: str | None) -> str | None:
    """The absolute path of a local path or ``file://`` URI; None for S3, None, or a hub id (no such path)."""
    if uri is None or storage.is_s3(uri) or "://" in uri.removeprefix("file://"):
        return None
    return storage.resolve(uri)[1]


def check_shared_paths(
    reads: Mapping[str, str | None], writes: Mapping[str, str | None], *, timeout_s: float = CHECK_TIMEOUT_S
) -> None:
    """Refuse local paths that some node of the Ray cluster this process has joined does not see.

    Args:
        reads: option -> path the job reads on the nodes (``{"--data": ...}``); paths the driver does not see
            itself (hub ids, missing files: other checks report those) and S3 URIs are left out.
        writes: option -> output folder the nodes write into (created here if missing).

    Raises:
        ValueError: a node sees a local path differently from the driver (one line: the option, the path, the
            node and the fix).
        TimeoutError: a node did not answer within ``timeout_s``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here}
    local_reads = {option: _local(uri) for option, uri in reads.items()}
    local_writes = {option: _local(uri) for option, uri in writes.items()}
    expected: dict[str, Fingerprint] = {}
    options: dict[str, tuple[str, str]] = {}  # checked path -> (option, the path the user means)
    for option, path in local_reads.items():
        if path is not None and fingerprint(path) is not None:
            expected[path] = fingerprint(path)
            options[path] = (option, path)
    markers = []
    if nodes:
        for option, path in local_writes.items():
            if path is None:
                continue
            Path(path).mkdir(parents=True, exist_ok=True)
            marker = os.path.join(path, f"{MARKER_PREFIX}{uuid.uuid4().hex}")
            Path(marker).write_bytes(b"hqlabel: every node of the cluster must see this file\n")
            markers.append(marker)
            expected[marker] = fingerprint(marker)
            options[marker] = (option, path)
    if not nodes or not expected:
        return
    look = ray.remote(num_cpus=0, max_retries=0)(unseen)
    try:
        refs = {
            node_id: look.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(expected)
            for node_id in nodes
        }
        _, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        if late:
            node_id = next(n for n, ref in refs.items() if ref in late)
            raise TimeoutError(
                f"Ray node {_name(nodes[node_id])} did not answer the shared-storage check of the local "
                f"paths within {timeout_s:g} s; check the node, or use s3:// paths"
            )
        missing = {node_id: ray.get(ref) for node_id, ref in refs.items()}
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
    problems = [(node_id, path) for node_id, paths in missing.items() for path in paths]
    if problems:
        node_id, path = problems[0]
        option, shown = options[path]
        blind = sorted({n for n, p in problems if options[p] == (option, shown)})
        raise ValueError(
            f"{option} {shown} is a local path that {len(blind)} of the {len(nodes) + 1} Ray nodes do not "
            f"see as this machine does (node {_name(nodes[node_id])}): on a cluster of several nodes put it "
            "on storage every node mounts at the same path (NFS, EFS, a shared volume), or use s3://"
        )


def _name(node: dict) -> str:
    """A node for messages: its address and the start of its id."""
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]})"
