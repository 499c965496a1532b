"""``hqlabel submit`` / ``hqlabel jobs`` against a real local Ray head with the Jobs API (a cluster of its
own, separate from the session's in-process Ray), plus the error paths without one."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest
from local_ray import free_port, jobs_api_head

from hqlabel.jobs.cli import main
from hqlabel.jobs.submit import build_runtime_env, entrypoint


@pytest.fixture(scope="module")
def ray_head():
    """Jobs API URL of a local Ray head (2 CPUs, loopback, no token authentication), killed at the end."""
    yield from jobs_api_head()


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
    address = f"http://127.0.0.1:{free_port()}"
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
