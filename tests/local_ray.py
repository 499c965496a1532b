"""Real local Ray clusters for tests: a head and worker nodes started with ``ray start --block`` on loopback,
each node in a process session of its own, with a temporary folder of their own; ``stop`` kills each session
by its id. Never ``ray stop``: it would kill every Ray on the machine, the test session's and other users'.

The nodes run without token authentication unless the caller's ``env`` turns it on (Ray 2.60 turns it on by
itself once ``~/.ray/auth_token`` exists), and never see the caller's ``RAY_ADDRESS`` or token settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

NODE_START_S = 90
START_ATTEMPTS = 2
RAY_CLIENT_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (an error status counts: e.g. 401 from a token cluster)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def session_pids(sid: int) -> list[int]:
    """Process ids of session ``sid`` (zombies included)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without its Ray client settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_CLIENT_ENV}
    return env | overrides


class LocalRayCluster:
    """A Ray cluster of ``ray start`` processes on this machine.

    Args:
        env: the nodes' environment (default ``clean_env(RAY_AUTH_MODE="disabled")``).
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env if env is not None else clean_env(RAY_AUTH_MODE="disabled")
        self.temp_dir = tempfile.mkdtemp(prefix="hqray")  # short: Ray's unix socket paths live under it
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        self.address: str | None = None  # the head's GCS, host:port
        self.dashboard: str | None = None  # the Jobs API, http://host:port

    def start_head(self, num_cpus: int, *, dashboard: bool = False) -> str:
        """Start the head with ``num_cpus`` CPUs (0: it runs no tasks); returns its GCS address."""
        port = free_port()
        args = ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
        if dashboard:
            dash_port = free_port()
            args += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
            ]
            self.dashboard = f"http://127.0.0.1:{dash_port}"
        else:
            args += ["--include-dashboard=false"]
        self._start("head", num_cpus, args)
        self.address = f"127.0.0.1:{port}"
        if dashboard:
            self._wait(lambda: answers(f"{self.dashboard}/api/version"), "the head's Jobs API")
        return self.address

    def add_node(
        self, num_cpus: int, resources: dict[str, float] | None = None, *, wrap: list[str] | None = None
    ) -> subprocess.Popen:
        """Start a worker node that joins the head, with ``num_cpus`` CPUs and custom ``resources``; returns
        its process (for ``stop_node``). ``wrap``: a command prefix that runs ``ray start`` (e.g. the
        ``private_mounts`` of a node that sees another filesystem)."""
        if self.address is None:
            raise RuntimeError("start_head first")
        args = [f"--address={self.address}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return self._start(f"node{len(self.nodes)}", num_cpus, args, wrap or [])

    def stop_node(self, node: subprocess.Popen) -> list[int]:
        """Kill one node's process session (the head learns it is gone); returns the process ids left."""
        _kill(node)
        return session_pids(node.pid)

    def _start(self, name: str, num_cpus: int, args: list[str], wrap: Sequence[str] = ()) -> subprocess.Popen:
        """Start a node; a second try if the first does not come up (``ray start`` gives a node's raylet 30 s
        to register with the head, which a machine busy with other work can miss)."""
        ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        cmd = [*wrap, ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}"]
        cmd += args
        cmd += [f"--temp-dir={self.temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats"]
        for attempt in range(START_ATTEMPTS):
            ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
            log_path = Path(self.temp_dir) / f"{name}-{attempt}.log"
            with open(log_path, "wb") as log:
                node = subprocess.Popen(
                    cmd + ports, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.nodes.append((node, log_path))
            try:
                self._wait(
                    lambda log=log_path: b"Ray runtime started" in log.read_bytes(), f"Ray {name}", node
                )
                return node
            except RuntimeError:
                if attempt + 1 == START_ATTEMPTS:
                    raise
                _kill(node)

    def _wait(self, ready, what: str, node: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + NODE_START_S
        while not ready():
            if (node is not None and node.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {NODE_START_S} s:\n{self.logs()[-3000:]}")
            time.sleep(0.5)

    def ray_nodes(self) -> list[dict]:
        """``ray.nodes()`` of the cluster (``NodeID``, ``Alive``, ``Resources``, ...), from a driver apart."""
        code = (
            "import json, ray\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
            "print(json.dumps(ray.nodes()))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        """The ``ray start`` output of every node (for failure messages)."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')}" for _, path in self.nodes)

    def stop(self) -> list[int]:
        """Kill every node's process session; returns the process ids left behind (none, normally)."""
        for node, _ in reversed(self.nodes):  # workers first: the head outlives its nodes
            _kill(node)
        leftover = [pid for node, _ in self.nodes for pid in session_pids(node.pid)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leftover


def jobs_api_head(env: dict[str, str] | None = None, num_cpus: int = 2):
    """Generator for a module fixture: the Jobs API URL of a local Ray head (``num_cpus`` CPUs, loopback, no
    token authentication; ``env`` as ``LocalRayCluster``'s), killed at the end; skips when Ray's Jobs API
    (ray[default]) is missing or the head does not start."""
    import pytest

    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    cluster = LocalRayCluster(env=env)
    try:
        try:
            cluster.start_head(num_cpus, dashboard=True)
        except RuntimeError as e:
            pytest.skip(f"local Ray head with the Jobs API did not start: {e}")
        yield cluster.dashboard
    finally:
        leftover = cluster.stop()
        assert not leftover, f"Ray head processes left behind: {leftover}"


def private_mounts(hidden: Path) -> list[str] | None:
    """A command prefix that runs a command in a mount namespace of its own where ``hidden`` is an empty
    folder (a tmpfs over it): a node started so sees this machine's files but not those under ``hidden``, as
    a node on another machine would not. None where this machine cannot (no ``unshare``, or not allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    prefix += ["sh", "-c", 'mount -t tmpfs hqlabel-hidden "$0" && exec "$@"', str(hidden)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def _kill(node: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process session of ``node`` (a ``ray start`` and all it started)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        if not session_pids(node.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)  # start_new_session: the process group id is the node's pid
        deadline = time.monotonic() + wait_s
        while node.poll() is None or session_pids(node.pid):  # poll() reaps the node's zombie
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=10)
