"""What one HQ-token training run is: data, base model, recipe. Saved as ``RUN/config.json`` and inside every
checkpoint; ``--resume`` refuses a run whose config differs in anything that changes the result."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hqlabel.platform.config import DEFAULT_SEGMENTER
from hqlabel.platform.storage import StorageOptions

PromptType = Literal["box", "point", "noise_mask"]


class TrainConfig(BaseModel):
    """The HQ-SAM recipe (Ke et al. 2023): Adam lr 1e-3, 12 epochs, lr x 0.1 from epoch 10, prompts from the
    GT box / 10 positive points / a noisy mask, BCE + dice on 112 x 112 uncertain points, large-scale jitter
    and flips. SAM frozen; only the HQ modules train."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Training masks: an instance dataset, COCO instances JSON or mask folder.")
    out: str = Field(description="Run folder (local or s3://): config, checkpoints/, best/, metrics.")
    val_data: str | None = Field(None, description="Validation masks; default: a held-out split of `data`.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of `data` held out for validation when `val_data` is unset."
    )
    images_root: str | None = Field(None, description="COCO input: the image folder (default: the JSON's).")
    base: str = Field(DEFAULT_SEGMENTER, description="Frozen SAM-HQ: hub id, local dir or original .pth.")
    preset: Literal["tiny-random"] | None = Field(
        None, description="Tiny random SAM-HQ as the base (offline smoke runs; results mean nothing)."
    )
    init_weights: str | None = Field(None, description="HQ weights to start from (default: the base's).")
    data_revision: str | None = Field(
        None,
        description="The data's version: 'files:' and a digest of the names, sizes and versions (mtime or "
        "ETag) of the files of `data` and `val_data` (and a COCO JSON's images), recorded when a run starts "
        "(`hqlabel train`); --resume refuses data that changed since. Set by hand, a run checks the files "
        "against it.",
    )
    epochs: int = Field(12, ge=1, description="Passes over the training images.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    lr_drop_epoch: int = Field(10, ge=1, description="The learning rate is multiplied by lr_gamma from here.")
    lr_gamma: float = Field(0.1, gt=0, description="Step decay factor.")
    batch_size: int = Field(4, ge=1, description="Images per optimizer step, per worker.")
    instances_per_image: int = Field(
        8,
        ge=1,
        description="At most this many of an image's instances train per step, drawn anew each epoch "
        "(sam-hq trains one mask per image: 1).",
    )
    num_points: int = Field(112 * 112, ge=1, description="Uncertain points per mask for the loss.")
    prompt_types: list[PromptType] = Field(
        default_factory=lambda: ["box", "point", "noise_mask"], description="Prompt kinds sampled per image."
    )
    num_prompt_points: int = Field(10, ge=1, description="Positive points of a point prompt.")
    jitter: tuple[float, float] = Field((0.1, 2.0), description="Large-scale jitter scale range.")
    flip: bool = Field(True, description="Random horizontal flips.")
    val_mask: Literal["hq", "sam+hq"] = Field(
        "hq",
        description="Validation (model selection) scores the HQ token's mask alone, as sam-hq's training "
        "code does ('hq'), or the SAM + HQ logits that labeling uses ('sam+hq').",
    )
    seed: int = Field(0, description="Seeds shuffling, augmentation, prompts and loss points.")
    loader_threads: int = Field(
        2, ge=0, description="Threads per worker that read, decode and augment the next batches (0: none)."
    )
    prefetch_batches: int = Field(2, ge=1, description="Batches made ahead of the training step.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'; Ray Train workers use their GPU.")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL.")
    s3_region: str | None = Field(None, description="S3 region.")

    # Fields that do not change what a run computes; --resume accepts a change in them.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "out", "device", "s3_endpoint", "s3_region", "epochs", "loader_threads", "prefetch_batches"
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        low, high = self.jitter
        if not 0 < low <= high:
            raise ValueError(f"jitter must be (low, high) with 0 < low <= high, got {self.jitter}")
        if not self.prompt_types:
            raise ValueError("prompt_types must name at least one of box, point, noise_mask")
        return self

    def with_absolute_paths(self) -> TrainConfig:
        """This config with local relative paths made absolute: Ray Train workers run in another directory.
        URIs (``s3://``, ``file://``) and hub ids (a ``base`` that is no local path) stay as they are."""

        def absolute(path: str | None, *, must_exist: bool = False) -> str | None:
            if path is None or "://" in path:
                return path
            local = Path(path).expanduser()
            if must_exist and not local.exists():
                return path  # a hub id such as syscv-community/sam-hq-vit-base
            return str(local.absolute())

        return self.model_copy(
            update={
                "data": absolute(self.data),
                "out": absolute(self.out),
                "val_data": absolute(self.val_data),
                "images_root": absolute(self.images_root),
                "init_weights": absolute(self.init_weights),
                "base": absolute(self.base, must_exist=True),
            }
        )

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(self.s3_endpoint, self.s3_region)

    @property
    def base_name(self) -> str:
        return self.preset or self.base

    # Fields that a checkpoint written before they existed does not record: not compared on --resume.
    ADDED_PINS: ClassVar[tuple[str, ...]] = ("data_revision",)

    def result_fields(self) -> dict:
        return self.model_dump(mode="json", exclude=set(self.RESUMABLE_CHANGES))

    def resume_error(self, saved: dict) -> str | None:
        """Why this config cannot resume a run whose checkpoint saved ``saved`` (its ``result_fields``), or
        None: the fields in which they differ, with the fix."""
        changed = sorted(
            name
            for name, value in self.result_fields().items()
            if saved.get(name) != value and (name in saved or name not in self.ADDED_PINS)
        )
        if not changed:
            return None
        data = (
            f"; the files of --data / --val-data changed since its checkpoints were written (data_revision "
            f"{saved.get('data_revision')} then, {self.data_revision} now): restore them"
            if "data_revision" in changed
            else ""
        )
        return (
            f"--resume: this run's settings differ from {self.out}'s in {changed}{data}; use the same "
            "settings, or train into a new --out"
        )
