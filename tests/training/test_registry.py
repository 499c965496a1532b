"""The model registry (``hqlabel.training.registry``) and ``hqlabel models list|show|promote|rollback``."""

from __future__ import annotations

import json
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
