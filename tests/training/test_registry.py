"""The model registry (``hqlabel.training.registry``) and ``hqlabel models list|show|promote|rollback``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hqlabel.jobs.cli import main
from hqlabel.training.registry import Registry


@pytest.fixture
def registry(tmp_path) -> Registry:
    """A base version (the base model's own weights) and two trained ones (weights files copied in)."""
    registry = Registry(tmp_path / "registry")
    registry.register(None, kind="base", lineage={"base_model": "m"})
    for k in (2, 3):
        run = tmp_path / f"run{k}" / "best"
        run.mkdir(parents=True)
        (run / "hq_weights.safetensors").write_bytes(b"weights %d" % k)
        registry.register(str(run), kind="trained", lineage={"base_model": "m", "labels": f"labels/v{k}"})
    return registry


def test_versions_weights_and_lineage(registry, tmp_path):
    assert [v["version"] for v in registry.versions()] == ["w1", "w2", "w3"]
    assert registry.current() == "w1"  # the first version is what labeling used before any gate
    assert registry.weights("w1") is None
    assert Path(registry.weights("w3")).read_bytes() == b"weights 3"  # a copy: the run may be deleted
    (tmp_path / "run3" / "best" / "hq_weights.safetensors").unlink()
    assert Path(registry.weights("w3")).read_bytes() == b"weights 3"
    assert registry.find(labels="labels/v2")["version"] == "w2" and registry.find(labels="x") is None
    assert not registry.get("w2")["promoted"]
    with pytest.raises(ValueError, match=r"no weights version w9 .*known: w1, w2, w3"):
        registry.get("w9")
    with pytest.raises(ValueError, match="not of the form"):
        registry.get("../w1")


def test_promote_gate_and_rollback(registry):
    registry.record_gate("w2", {"gate": "g", "passed": True})
    registry.promote("w2", by="g")
    registry.promote("w3", by="alice")
    assert registry.current() == "w3"
    assert registry.get("w2")["gates"][0]["passed"] and registry.get("w2")["promoted_by"] == "g"
    assert registry.rollback() == "w2"
    assert registry.current() == "w2"
    assert registry.rollback(to="w1") == "w1"
    actions = [(h["action"], h["version"], h["by"]) for h in registry.state()["history"]]
    assert actions == [
        ("initial", "w1", "register"),
        ("promote", "w2", "g"),
        ("promote", "w3", "alice"),
        ("rollback", "w2", "rollback"),
        ("rollback", "w1", "rollback"),
    ]


def test_rollback_with_nothing_before_is_an_error(tmp_path):
    registry = Registry(tmp_path / "r")
    registry.register(None, kind="base", lineage={})
    with pytest.raises(ValueError, match="no earlier current version"):
        registry.rollback()


WRITER = """
import sys, time
from pathlib import Path
from hqlabel.training.registry import Registry

registry, name, barrier = Registry(sys.argv[1]), sys.argv[2], Path(sys.argv[4])
(barrier / name).touch()  # start together (imports take seconds): wait for the other writer
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.001)
for k in range(int(sys.argv[3])):
    version = registry.register(None, kind="base", lineage={"writer": name, "k": k})["version"]
    registry.record_gate(version, {"gate": name, "passed": True})
    registry.promote(version, by=name)
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes register, gate and promote at once: every version number is taken once, and every
    promotion is in the history (one writer at a time, through the registry's lock)."""
    root, count, barrier = tmp_path / "r", 40, tmp_path / "barrier"
    barrier.mkdir()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), name, str(count), str(barrier)], stderr=subprocess.PIPE
        )
        for name in ("a", "b")
    ]
    errors = [writer.communicate(timeout=120)[1].decode()[-2000:] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    registry = Registry(root)
    versions = registry.versions()
    assert [v["version"] for v in versions] == [f"w{k}" for k in range(1, 2 * count + 1)]
    made = sorted((v["lineage"]["writer"], v["lineage"]["k"]) for v in versions)
    assert made == sorted((name, k) for name in "ab" for k in range(count))
    assert all(len(v["gates"]) == 1 and v["gates"][0]["gate"] == v["lineage"]["writer"] for v in versions)
    promoted = [(h["version"], h["by"]) for h in registry.state()["history"] if h["action"] == "promote"]
    assert sorted(promoted) == sorted((v["version"], v["lineage"]["writer"]) for v in versions)


def test_models_cli(registry, capsys):
    root = str(registry.root)
    assert main(["models", "list", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "KIND", "STATUS"] and len(lines) == 4
    assert lines[1].split()[:3] == ["w1", "base", "current"]
    assert main(["models", "promote", "w3", "--registry", root, "--by", "bob"]) == 0
    assert "current weights: w3" in capsys.readouterr().out
    assert main(["models", "show", "w3", "--registry", root]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["promoted_by"] == "bob" and shown["current"] == "w3"
    assert main(["models", "rollback", "--registry", root]) == 0
    assert "current weights: w1 (rolled back)" in capsys.readouterr().out
    assert main(["models", "promote", "w7", "--registry", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no weights version w7" in err
    assert main(["models", "list", "--registry", root + "-missing"]) == 2
    assert "no such folder" in capsys.readouterr().err
