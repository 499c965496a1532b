"""``FLYWHEEL.yaml``: what one turn of the flywheel labels, curates, trains, gates and relabels (pydantic).

Relative paths in the file are relative to the file's folder. Example (every key is described on its field)::

    dir: runs/fw1                  # the flywheel's folder: stage markers, labels versions, train run, reports
    input: images/                 # the dataset to label (as `hqlabel label INPUT`)
    classes: [circle, square]      # the ontology
    models: {preset: tiny-random}  # or detector / segmenter / hq_weights (the starting HQ weights)
    label: {batch_size: 2, shard_size: 4}      # any other `hqlabel label` option
    curate: {min_pred_iou: 0.5, decisions: review/}   # thresholds and / or a reviewer's decisions
    train: {epochs: 1, batch_size: 2}          # any `hqlabel train` option
    validation: {holdout: 0.25}    # or {data: gt/}: ground truth (instance dataset, COCO JSON, mask folder)
    gate: {min_mbiou_delta: 0.5, min_miou_delta: 0.0}  # points; the candidate must beat current weights
    relabel: {shards: below, max_mean_pred_iou: 0.9}   # or {shards: all}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hqlabel.platform.config import DEFAULT_DETECTOR, DEFAULT_SEGMENTER

__all__ = ["FlywheelSpec", "load_flywheel"]

# label / train options the flywheel sets itself
_LABEL_OWNED = {"input", "out", "classes", "detector", "segmenter", "hq_weights", "preset", "overwrite"}
_LABEL_OWNED |= {"ray_address", "retry_errors", "prompts"}
_TRAIN_OWNED = {"data", "out", "base", "preset", "init_weights", "val_data", "resume", "ray_address"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsSpec(_Strict):
    detector: str = Field(
        DEFAULT_DETECTOR, description="Detector hub id or local dir (as `label --detector`)."
    )
    segmenter: str = Field(DEFAULT_SEGMENTER, description="Frozen SAM-HQ base: hub id, local dir or .pth.")
    hq_weights: str | None = Field(
        None,
        description="HQ weights labeling starts from when the registry is empty (default: the base's own); "
        "registered as the first version.",
    )
    preset: Literal["tiny-random"] | None = Field(
        None, description="Tiny random models (offline smoke runs; every number they give means nothing)."
    )


class CurateSpec(_Strict):
    min_pred_iou: float | None = Field(
        None, ge=0, le=1, description="Keep masks with HQ-SAM pred IoU >= this."
    )
    min_score: float | None = Field(None, ge=0, le=1, description="Keep masks with detector score >= this.")
    min_area: int | None = Field(None, ge=0, description="Keep masks of at least this many pixels.")
    decisions: str | None = Field(
        None,
        description="A reviewer's decisions: a file (CSV / JSON lines / JSON list of image_id, instance_id, "
        "decision) or a folder of such files, merged; accept / reject override the thresholds.",
    )


class ValidationSpec(_Strict):
    data: str | None = Field(
        None, description="Ground-truth masks: instance dataset, COCO JSON, mask folder."
    )
    images: str | None = Field(None, description="COCO `data`: its image folder (default: the JSON's).")
    holdout: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Instead of `data`: hold out this share of the curated images (chosen by a hash of the "
        "image id, so the same images every run) for validation; the rest trains.",
    )

    @model_validator(mode="after")
    def _one(self) -> ValidationSpec:
        if (self.data is None) == (self.holdout is None):
            raise ValueError("give validation.data (ground truth) or validation.holdout (a share), not both")
        return self


class GateSpec(_Strict):
    min_mbiou_delta: float = Field(
        0.5,
        description="Promote only when validation mBIoU (points, 0-100) >= the current weights' + this. "
        "-100 makes the gate always pass, 101 always fail (for tests of the loop itself).",
    )
    min_miou_delta: float = Field(0.0, description="... and mIoU (points) >= the current weights' + this.")


class RelabelSpec(_Strict):
    shards: Literal["all", "below"] = Field(
        "all",
        description="After a promotion relabel every shard, or the shards 'below' the quality threshold.",
    )
    max_mean_pred_iou: float | None = Field(
        None,
        ge=0,
        description="shards: below: a shard whose masks' mean HQ-SAM pred IoU is under this (or that has no "
        "masks) is relabeled; the others are kept as they are.",
    )

    @model_validator(mode="after")
    def _threshold(self) -> RelabelSpec:
        if (self.shards == "below") != (self.max_mean_pred_iou is not None):
            raise ValueError("relabel: shards 'below' needs max_mean_pred_iou, and only it takes one")
        return self


class FlywheelSpec(_Strict):
    """One turn of the flywheel; resolved (absolute paths) and saved as ``DIR/flywheel.json``."""

    dir: str = Field(description="The flywheel's folder (local or a filesystem every node mounts).")
    input: str = Field(description="The dataset to label: image folder, Parquet, COCO JSON; local or s3://.")
    classes: list[str] = Field(description="The ontology: class names (a list or 'a, b').")
    models: ModelsSpec = Field(default_factory=ModelsSpec)
    label: dict[str, Any] = Field(default_factory=dict, description="Other `hqlabel label` options.")
    curate: CurateSpec = Field(default_factory=CurateSpec)
    train: dict[str, Any] = Field(default_factory=dict, description="`hqlabel train` options (epochs, ...).")
    candidate: Literal["best", "last"] = Field(
        "best",
        description="The trained weights the gate judges: the run's best epoch on the validation set (its "
        "best/, which may be the starting weights when no epoch beat them) or its last epoch's.",
    )
    validation: ValidationSpec
    gate: GateSpec = Field(default_factory=GateSpec)
    relabel: RelabelSpec = Field(default_factory=RelabelSpec)
    registry: str | None = Field(None, description="The model registry folder (default DIR/registry).")
    compare_limit: int = Field(12, ge=1, description="Images in the comparison gallery (largest changes).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (local runs; default all).")

    @field_validator("classes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [c.strip() for c in value.split(",") if c.strip()]
        if not value:
            raise ValueError("name at least one class, e.g. classes: [cat, dog]")
        return value

    @field_validator("dir", "registry")
    @classmethod
    def _local(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError(f"{value!r}: use a local folder (or a shared filesystem every node mounts)")
        return value

    @field_validator("label")
    @classmethod
    def _label_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from hqlabel.jobs.functions import label_spec

        owned = sorted(_LABEL_OWNED & set(options))
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by the flywheel (use input, classes, models instead)")
        label_spec("x", out="y", classes="x", **options)  # unknown options and bad values: one line
        return options

    @field_validator("train")
    @classmethod
    def _train_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from hqlabel.jobs.functions import RUN_OPTIONS
        from hqlabel.training.config import TrainConfig

        owned = sorted(_TRAIN_OWNED & set(options))
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by the flywheel (use models / validation instead)")
        known = (set(TrainConfig.model_fields) | set(RUN_OPTIONS)) - _TRAIN_OWNED
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}"
            )
        TrainConfig(data="x", out="y", **{k: v for k, v in options.items() if k not in RUN_OPTIONS})
        return options

    def resolved(self, root: Path) -> FlywheelSpec:
        """This spec with local relative paths made absolute against ``root`` (the YAML's folder)."""

        def absolute(path: str | None, must_exist: bool = False) -> str | None:
            if path is None or "://" in path:
                return path
            local = Path(path).expanduser()
            local = local if local.is_absolute() else root / local
            if must_exist and not local.exists():
                return path  # a hub id
            return str(local.resolve())

        models = self.models.model_copy(
            update={
                "detector": absolute(self.models.detector, True),
                "segmenter": absolute(self.models.segmenter, True),
                "hq_weights": absolute(self.models.hq_weights),
            }
        )
        return self.model_copy(
            update={
                "dir": absolute(self.dir),
                "input": absolute(self.input),
                "models": models,
                "curate": self.curate.model_copy(update={"decisions": absolute(self.curate.decisions)}),
                "validation": self.validation.model_copy(
                    update={
                        "data": absolute(self.validation.data),
                        "images": absolute(self.validation.images),
                    }
                ),
                "registry": absolute(self.registry) or str(Path(absolute(self.dir)) / "registry"),
            }
        )


def load_flywheel(path: str | Path) -> FlywheelSpec:
    """Read and validate ``FLYWHEEL.yaml`` (or .json); paths resolved against its folder.

    Raises:
        FileNotFoundError: no such file; ValueError: not YAML, not a mapping, or a bad field (pydantic's
        ValidationError, shown as one line by the CLI).
    """
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"flywheel file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of keys (dir, input, classes, ...), got {type(data).__name__}"
        )
    return FlywheelSpec(**data).resolved(file.resolve().parent)
