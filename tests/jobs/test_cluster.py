"""Joining a cluster with Ray's token authentication: ``hqlabel label --address`` and ``hqlabel jobs`` against
a real local head started with ``RAY_AUTH_MODE=token`` (its token in a file of the test's own), and the
one-line errors without the token or with a wrong one. Every client runs as a subprocess with a HOME of its
own, so this machine's ``~/.ray/auth_token`` plays no part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from local_ray import LocalRayCluster, clean_env

from hqlabel.jobs.cluster import TOKEN_HELP, auth_error, is_auth_failure

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hqlabel-test-token-0123456789"


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """``(GCS address, Jobs API URL, token file)`` of a head with token authentication and no CPUs."""
    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    token_file = tmp_path_factory.mktemp("token") / "auth_token"
    token_file.write_text(TOKEN)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PYTHONPATH=str(REPO))
    cluster = LocalRayCluster(env)
    try:
        address = cluster.start_head(0, dashboard=True)
        yield address, cluster.dashboard, token_file
    finally:
        leftover = cluster.stop()
        assert not leftover, f"Ray processes left behind: {leftover}"


def _hqlabel(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess whose Ray client settings are only ``env`` (and HOME, no token file).

    ``RAY_gcs_server_port_wait_time_s=1``: one connection attempt to the GCS instead of Ray's twenty, one
    second apart, before a refused client gives up.
    """
    home.mkdir(exist_ok=True)
    full_env = clean_env(HOME=str(home), PYTHONPATH=str(REPO), RAY_gcs_server_port_wait_time_s="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "hqlabel", *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("hqlabel: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_label_address_sends_the_token_that_ray_finds(token_head, image_folder, tmp_path):
    address, _, token_file = token_head
    label = ["label", str(image_folder), "--classes", "cat", "--preset", "tiny-random", "--no-progress"]
    label += ["--address", address]

    # The token file named by RAY_AUTH_TOKEN_PATH, without RAY_AUTH_MODE: the job joins the cluster; the
    # head has no CPUs and no worker node has joined, which is what it then reports (from the cluster).
    joined = _hqlabel(
        [*label, "--out", str(tmp_path / "a")], tmp_path / "home", RAY_AUTH_TOKEN_PATH=str(token_file)
    )
    assert "the Ray cluster has 0 CPUs" in _error_line(joined) and "add worker nodes" in joined.stderr

    missing = _error_line(_hqlabel([*label, "--out", str(tmp_path / "b")], tmp_path / "home"))
    assert f"the Ray cluster at {address} requires a token" in missing and "RAY_AUTH_TOKEN" in missing

    wrong = _error_line(
        _hqlabel([*label, "--out", str(tmp_path / "c")], tmp_path / "home", RAY_AUTH_TOKEN="x")
    )
    assert "refused the token from RAY_AUTH_TOKEN" in wrong and "RAY_AUTH_TOKEN_PATH" in wrong


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jobs_api_sends_the_token_that_ray_finds(token_head, tmp_path):
    _, url, _ = token_head
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)  # Ray's default token file, found last
    listed = _hqlabel(["jobs", "--address", url], home)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.startswith("SUBMISSION ID") or f"no jobs on {url}" in listed.stdout

    missing = _error_line(_hqlabel(["jobs", "--address", url], tmp_path / "other"))
    assert f"the Ray cluster at {url} requires a token" in missing and "none was found" in missing
    bad_path = _hqlabel(
        ["jobs", "--address", url], tmp_path / "other", RAY_AUTH_TOKEN_PATH=str(tmp_path / "no")
    )
    assert "RAY_AUTH_TOKEN_PATH" in _error_line(bad_path) and "is missing or empty" in bad_path.stderr


def test_auth_errors_name_where_the_token_came_from(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert str(auth_error("h:1")) == (
        f"the Ray cluster at h:1 requires a token (token authentication) and none was found: {TOKEN_HELP}"
    )
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert f"refused the token from {tmp_path / '.ray' / 'auth_token'}" in str(auth_error("h:1"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/tokens/t")
    assert "refused the token from RAY_AUTH_TOKEN_PATH (/tokens/t)" in str(auth_error("h:1"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert "refused the token from RAY_AUTH_TOKEN:" in str(auth_error("h:1"))


def test_auth_failures_are_told_from_other_connection_errors():
    from ray.exceptions import AuthenticationError

    assert is_auth_failure(AuthenticationError("RPC error: InvalidAuthToken: missing"))
    try:  # how ray.init reports it: the last attempt's traceback, as text, under a plain ConnectionError
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: ... InvalidAuthToken ...")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at h:1") from e
    except ConnectionError as e:
        assert is_auth_failure(e)
    assert not is_auth_failure(ConnectionError("Failed to connect to Ray cluster at h:1"))
