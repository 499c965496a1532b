"""Pydantic specs of the jobs users run; the resolved spec is saved with every output (``job.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hqlabel.platform.config import DEFAULT_SEGMENTER, LabelerConfig
from hqlabel.platform.images import DEFAULT_MAX_PIXELS
from hqlabel.workers.decode import DEFAULT_MAX_SIDE


class LabelJobSpec(BaseModel):
    """``hqlabel label``: text-prompted boxes and HQ-SAM masks for every image of a dataset."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="A folder of images (recursive) or a Parquet file/folder.")
    out: str = Field(description="Output folder: masks/, errors/ and job.json are written here.")
    labeler: LabelerConfig = Field(description="Models, class list and thresholds.")
    id_column: str = Field("image_id", description="Parquet input: column holding the image id.")
    image_column: str = Field("image", description="Parquet input: column holding the encoded image bytes.")
    batch_size: int = Field(8, ge=1, description="Images per model call.")
    num_workers: int | None = Field(
        None, ge=1, description="Labeling actors; default one per GPU, or as many as the CPUs allow."
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images become error rows.")
    max_side: int = Field(
        DEFAULT_MAX_SIDE, ge=64, description="Images are downscaled to this longest side before the models."
    )
    overwrite: bool = Field(False, description="Replace the outputs of an earlier run in `out`.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://...'); default local."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance; default all.")


class SegmentJobSpec(BaseModel):
    """``hqlabel segment``: masks for hand-given prompts on one image, for quick inspection."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="The image file.")
    out: str = Field(description="Folder for the mask PNGs, the overlay PNG and masks.json.")
    boxes: list[tuple[float, float, float, float]] = Field(
        default_factory=list, description="XYXY pixel boxes, one object each."
    )
    points: list[tuple[float, float, int]] = Field(
        default_factory=list, description="(x, y, label) clicks, label 1 foreground / 0 background."
    )
    segmenter: str = Field(
        DEFAULT_SEGMENTER, description="SAM-HQ / SAM hub id, directory or .pth checkpoint."
    )
    preset: Literal["tiny-random"] | None = Field(
        None, description="Tiny random models (offline smoke runs)."
    )
    hq_weights: str | None = Field(None, description="Fine-tuned HQ-token weights loaded on top.")
    hq_token_only: bool = Field(False, description="HQ logits alone instead of SAM + HQ logits.")
    multimask: Literal["off", "best", "all"] = Field("off", description="One mask, the best of 3, or all 3.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images are refused.")
