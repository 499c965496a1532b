"""``hqlabel submit`` / ``hqlabel jobs`` against a real local Ray head with the Jobs API (a cluster of its
own, separate from the session's in-process Ray), plus the error paths without one."""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hqlabel.jobs.cli import main
from hqlabel.jobs.submit import build_runtime_env, entrypoint

HEAD_START_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:  # e.g. 401 from a token-auth cluster: the server is up
        return True
    except OSError:
        return False
    return True


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.fixture(scope="module")
def ray_head():
    """Jobs API URL of a local Ray head (2 CPUs, loopback), its own process session; killed by session id.

    Never ``ray stop``: that would kill every Ray process on the machine, the test session's Ray too.
    """
    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="hqray")  # short: Ray's unix socket paths live under it
    dash_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A loopback-only test cluster: no token auth (Ray turns it on when ~/.ray/auth_token exists).
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}"]
    cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
    cmd += [f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    cmd += ["--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w+b")  # noqa: SIM115  (closed at teardown)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while not _answers(f"{url}/api/version"):
            if head.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                pytest.skip(f"local Ray head with the Jobs API did not start in {HEAD_START_S} s: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            if not _session_pids(head.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)  # start_new_session: the head's process group id is its pid
            deadline = time.monotonic() + wait_s
            while head.poll() is None or _session_pids(head.pid):  # poll() reaps the head's zombie
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        head.wait(timeout=10)
        log.close()
        leftover = _session_pids(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray head processes left behind: {leftover}"


@pytest.mark.timeout(240)
def test_submit_label_job_to_a_real_head(ray_head, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    label = ["label", str(image_folder), "--classes", "cat", "--preset", "tiny-random", "--out", str(out)]
    code = main(["submit", "--address", ray_head, "--", *label, "--no-progress", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "submitted " in captured.out and "SUCCEEDED" in captured.out
    assert "labeled 5 images" in captured.out  # the job's own summary line, streamed from its logs
    submission_id = captured.out.split("submitted ", 1)[1].split()[0]
    images = {p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*") if p.is_file()}
    assert set(pq.read_table(out / "masks")["image_id"].to_pylist()) == images

    assert main(["jobs", "--address", ray_head]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["SUBMISSION", "ID"]
    row = next(line for line in table if line.startswith(submission_id))
    assert "SUCCEEDED" in row and "hqlabel label" in row


@pytest.mark.timeout(240)
def test_submit_reports_a_failed_job(ray_head, tmp_path, capsys):
    code = main(["submit", "--address", ray_head, "--", "label", str(tmp_path / "missing"), "--out", "o"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_unreachable_address_is_one_line(capsys):
    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    address = f"http://127.0.0.1:{_free_port()}"
    code = main(["submit", "--address", address, "--", "label", "in", "--out", "out"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and address in err and "8265" in err and "ray start" in err
    assert main(["jobs", "--address", address]) == 2


def test_missing_cluster_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import fails as without ray[default]
    code = main(["jobs", "--address", "http://127.0.0.1:8265"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "hqlabel[cluster]"' in err


def test_entrypoint_and_runtime_env(tmp_path):
    assert entrypoint(["--", "label", "my images", "--classes", "cat, dog"]) == (
        "hqlabel label 'my images' --classes 'cat, dog'"
    )
    with pytest.raises(ValueError, match="no command"):
        entrypoint(["--"])
    assert build_runtime_env() == {}
    env = build_runtime_env(str(tmp_path), ["pkg==1.0"])
    assert env == {"working_dir": str(tmp_path.resolve()), "pip": ["pkg==1.0"]}
    assert build_runtime_env("s3://bucket/code.zip") == {"working_dir": "s3://bucket/code.zip"}
    with pytest.raises(NotADirectoryError):
        build_runtime_env(str(tmp_path / "missing"))
