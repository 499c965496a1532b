"""``hqlabel submit`` / ``hqlabel jobs``: run any hqlabel command on a Ray cluster as a Ray Job.

The job runs through the cluster's Ray Jobs API (the dashboard's HTTP server, port 8265 by default), so the
command keeps running when the submitting machine goes away; its driver joins the cluster by itself (Ray sets
``RAY_ADDRESS`` for job drivers). Needs the ``cluster`` extra (``ray[default]``) on the submitting machine. A
cluster with token authentication gets the token Ray's own clients would find (``hqlabel.jobs.cluster``).
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from hqlabel.jobs.cluster import auth_error, use_cluster_token

INSTALL_HINT = 'hqlabel submit/jobs need the Ray Jobs client: pip install "hqlabel[cluster]"'
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _client(address: str):
    """A ``JobSubmissionClient`` of the Jobs API at ``address`` (``http://HEAD:8265``); one-line errors."""
    try:
        import aiohttp  # noqa: F401  (ray[default]: the client's log streaming)
        import requests  # noqa: F401  (ray[default]: the client's HTTP calls)
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    use_cluster_token()  # Ray's client sends the token it finds only once this is on
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise ConnectionError(
            f"cannot reach the Ray Jobs API at {address}: start the cluster (`ray start --head`) or check "
            "that its dashboard port (8265 by default) is reachable from here"
        ) from e
    except AuthenticationError as e:
        raise auth_error(address) from e


def build_runtime_env(working_dir: str | None = None, pip: Sequence[str] = ()) -> dict:
    """The job's ``runtime_env``: the working dir (uploaded by Ray when local) and extra pip requirements.

    Empty by default: the cluster image has hqlabel installed.
    """
    runtime_env: dict = {}
    if working_dir is not None:
        if "://" not in working_dir:  # a local folder: Ray zips and uploads it; remote URIs pass through
            path = Path(working_dir).expanduser()
            if not path.is_dir():
                raise NotADirectoryError(f"--working-dir {working_dir!r}: not a folder")
            working_dir = str(path.resolve())
        runtime_env["working_dir"] = working_dir
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def entrypoint(command: Sequence[str]) -> str:
    """The job's shell command: ``hqlabel`` followed by ``command`` (e.g. ``["label", "s3://in", ...]``)."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError('no command to submit: add one after "--", e.g. -- label s3://in --out s3://out')
    if command[0] == "hqlabel":
        command = command[1:]
    return shlex.join(["hqlabel", *command])


def _status(status) -> str:
    """``JobStatus.SUCCEEDED`` -> ``"SUCCEEDED"`` (a str enum whose ``str()`` has the class name)."""
    return str(getattr(status, "value", status))


async def _tail(client, submission_id: str, stream: TextIO) -> None:
    async for lines in client.tail_job_logs(submission_id):
        stream.write(lines)
        stream.flush()


def submit(
    address: str,
    command: Sequence[str],
    working_dir: str | None = None,
    pip: Sequence[str] = (),
    wait: bool = True,
    stream: TextIO | None = None,
    env_vars: dict[str, str] | None = None,
) -> str:
    """Submit ``hqlabel COMMAND`` to the cluster at ``address``; returns the final status (``wait``) or
    ``"PENDING"``. Prints the submission id, then, with ``wait``, the job's logs as they come. ``env_vars``:
    environment variables of the job's driver (its runtime_env)."""
    stream = stream or sys.stdout
    client = _client(address)
    runtime_env = build_runtime_env(working_dir, pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    submission_id = client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env or None)
    print(f"submitted {submission_id} to {address}", file=stream, flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow --address {address} {submission_id}", file=stream)
        return "PENDING"
    asyncio.run(_tail(client, submission_id, stream))
    status = _status(client.get_job_status(submission_id))
    while status not in TERMINAL:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = _status(client.get_job_status(submission_id))
    info = client.get_job_info(submission_id)
    reason = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {submission_id} {status}{reason}", file=stream)
    return status


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def jobs_table(address: str) -> str:
    """The cluster's jobs, newest first: submission id, status, start time, entrypoint."""
    jobs = sorted(_client(address).list_jobs(), key=lambda job: job.start_time or 0, reverse=True)
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENTRYPOINT")]
    rows += [
        (job.submission_id or job.job_id or "-", _status(job.status), _when(job.start_time), job.entrypoint)
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows
    ]
    return "\n".join(lines) if jobs else f"no jobs on {address}"
