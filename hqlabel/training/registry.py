"""The model registry: every HQ-weights version a flywheel made or started from, with its lineage and gates.

A registry is a folder (local or on a filesystem every node mounts)::

    REGISTRY/versions/w3/version.json      {"version", "created_at", "kind": "base" | "trained", "weights",
                                            "lineage": {labels, decisions, curated, base model, init weights
                                            version, training config, ...}, "scores", "gates": [...]}
    REGISTRY/versions/w3/hq_weights.safetensors   a copy of the weights (absent for the base model's own)
    REGISTRY/current.json                  {"current": "w3", "history": [{"action", "version", "at", "by"}]}

Versions are numbered in the order they are registered (``w1``, ``w2``, ...) and never change once written,
except for the gate decisions appended to ``gates``. ``current`` is the version that labeling uses: moved by
``promote`` (a passed gate, or a person) and ``rollback``; every move is appended to ``history``. Files are
replaced atomically (written aside, then renamed), and every change (register, record a gate, promote, roll
back) holds an exclusive lock on ``REGISTRY/.lock`` (``flock``; NFS clients map it to a POSIX lock), so two
writers (a flywheel's driver and a person promoting, two flywheels on one registry) neither take one version
number twice nor lose each other's history entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hqlabel.segmenters.hq_weights import HQ_WEIGHTS_FILE, resolve_hq_weights

__all__ = ["Registry", "now"]

_VERSION = re.compile(r"^w(\d+)$")


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    aside.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(aside, path)


class Registry:
    """HQ-weights versions with lineage under ``root`` (created on the first ``register``)."""

    def __init__(self, root: str | Path) -> None:
        if "://" in str(root) and not str(root).startswith("file://"):
            raise ValueError(
                f"registry {root}: the registry is a local (or shared, mounted) folder, not a URI"
            )
        self.root = Path(str(root).removeprefix("file://")).expanduser().absolute()

    # ---- reading ----------------------------------------------------------------------------------------
    def _version_dir(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise ValueError(f"weights version {version!r} is not of the form w1, w2, ...")
        return self.root / "versions" / version

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version's record, oldest first."""
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        names = [
            p.name for p in folder.iterdir() if _VERSION.match(p.name) and (p / "version.json").is_file()
        ]
        return [self.get(name) for name in sorted(names, key=lambda n: int(n[1:]))]

    def get(self, version: str) -> dict[str, Any]:
        """The record of ``version``. Raises ValueError naming the known versions when there is none."""
        path = self._version_dir(version) / "version.json"
        if not path.is_file():
            known = ", ".join(v["version"] for v in self.versions()) or "none"
            raise ValueError(f"no weights version {version} in the registry {self.root} (known: {known})")
        return json.loads(path.read_text())

    def state(self) -> dict[str, Any]:
        """``current.json``: ``{"current": version | None, "history": [...]}``."""
        path = self.root / "current.json"
        return json.loads(path.read_text()) if path.is_file() else {"current": None, "history": []}

    def current(self) -> str | None:
        """The version labeling uses now, or None for an empty registry."""
        return self.state()["current"]

    def weights(self, version: str) -> str | None:
        """The weights file of ``version`` (absolute path), or None: the base model's own HQ weights."""
        record = self.get(version)
        return None if record["weights"] is None else str(self._version_dir(version) / record["weights"])

    def find(self, **lineage: Any) -> dict[str, Any] | None:
        """The first version whose lineage has all these items (a flywheel re-registering after a crash)."""
        for record in self.versions():
            if all(record["lineage"].get(k) == v for k, v in lineage.items()):
                return record
        return None

    # ---- writing: each public method holds the lock once (flock is not re-entrant across file handles) ----
    @contextlib.contextmanager
    def _locked(self, *, create: bool = False) -> Iterator[None]:
        if not create and not self.root.is_dir():  # nothing to change (the caller's get() says so)
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
            yield

    def register(
        self,
        weights: str | None,
        *,
        kind: str,
        lineage: dict[str, Any],
        scores: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add a version: a copy of ``weights`` (a file, ``RUN/best`` or a run folder; None: the base model's
        own HQ weights) and its lineage. Not promoted: ``promote`` makes it current. The first version of an
        empty registry becomes current at once (what labeling used before any gate)."""
        with self._locked(create=True):
            return self._register(weights, kind=kind, lineage=lineage, scores=scores)

    def _register(
        self, weights: str | None, *, kind: str, lineage: dict[str, Any], scores: dict[str, Any] | None
    ) -> dict[str, Any]:
        existing = [int(v["version"][1:]) for v in self.versions()]
        version = f"w{max(existing, default=0) + 1}"
        folder = self._version_dir(version)
        staging = folder.with_name(f".{version}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        name = None
        if weights is not None:
            shutil.copyfile(resolve_hq_weights(weights), staging / HQ_WEIGHTS_FILE)
            name = HQ_WEIGHTS_FILE
        record = {
            "version": version,
            "created_at": now(),
            "kind": kind,
            "weights": name,
            "source_weights": weights,
            "lineage": lineage,
            "scores": scores or {},
            "gates": [],
            "promoted": False,
        }
        _write_json(staging / "version.json", record)
        os.replace(staging, folder)  # the version appears whole or not at all
        if self.current() is None:
            self._move(version, action="initial", by="register")
        return self.get(version)

    def record_gate(
        self, version: str, gate: dict[str, Any], *, scores: dict[str, Any] | None = None
    ) -> None:
        """Append a gate decision (its scores, thresholds and verdict) to ``version``'s record; ``scores``
        (the validation mIoU / mBIoU the gate measured) are added to the record's ``scores``."""
        with self._locked():
            record = self.get(version)
            record["gates"].append({**gate, "at": gate.get("at", now())})
            record["scores"].update(scores or {})
            _write_json(self._version_dir(version) / "version.json", record)

    def promote(self, version: str, *, by: str) -> None:
        """Make ``version`` current (``by``: the gate's or a person's name, recorded with the time)."""
        with self._locked():
            self.get(version)
            self._move(version, action="promote", by=by)

    def rollback(self, to: str | None = None, *, by: str = "rollback") -> str:
        """Make ``to`` current, by default the version that was current before the current one. Returns it.

        Raises:
            ValueError: nothing to roll back to, or an unknown version.
        """
        with self._locked():
            state = self.state()
            if to is None:
                earlier = [h["version"] for h in state["history"] if h["version"] != state["current"]]
                if not earlier:
                    raise ValueError(f"registry {self.root}: no earlier current version to roll back to")
                to = earlier[-1]
            self.get(to)
            self._move(to, action="rollback", by=by)
            return to

    def _move(self, version: str, *, action: str, by: str) -> None:
        state = self.state()
        state["current"] = version
        state["history"].append({"action": action, "version": version, "at": now(), "by": by})
        _write_json(self.root / "current.json", state)
        record = self.get(version)
        if not record["promoted"]:
            record["promoted"] = True
            record["promoted_at"] = state["history"][-1]["at"]
            record["promoted_by"] = by
            _write_json(self._version_dir(version) / "version.json", record)

    def table(self) -> str:
        """One line per version: id, kind, current / promoted, created, validation scores, weights."""
        current = self.current()
        rows = [("VERSION", "KIND", "STATUS", "CREATED", "VAL mIoU/mBIoU", "TRAINED ON")]
        for v in self.versions():
            status = "current" if v["version"] == current else ("promoted" if v["promoted"] else "-")
            scores = v.get("scores", {})
            val = (
                f"{100 * scores['miou']:.2f} / {100 * scores['mbiou']:.2f}"
                if scores.get("miou") is not None
                else "-"
            )
            rows.append(
                (v["version"], v["kind"], status, v["created_at"], val, str(v["lineage"].get("labels", "-")))
            )
        if len(rows) == 1:
            return f"no weights versions in {self.root}"
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join(
            "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]) for r in rows
        )
