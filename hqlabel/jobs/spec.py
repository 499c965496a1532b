"""Pydantic specs of the jobs users run; the resolved spec is saved with every output (``job.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hqlabel.jobs.resources import check_custom_resources
from hqlabel.platform import storage
from hqlabel.platform.config import DEFAULT_SEGMENTER, LabelerConfig
from hqlabel.platform.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from hqlabel.platform.lease import DEFAULT_TTL
from hqlabel.platform.readers import InputColumns
from hqlabel.platform.references import normalise
from hqlabel.platform.storage import DEFAULT_MAX_JSON_BYTES, StorageOptions
from hqlabel.workers.decode import DEFAULT_MAX_SIDE


def absolute_path(path: str | None, *, must_exist: bool = False) -> str | None:
    """``storage.absolute(path)``; with ``must_exist``, a name that is no existing local path (a hub id) as
    given."""
    if must_exist and path is not None and not Path(path).expanduser().exists():
        return path
    return storage.absolute(path)


class LabelJobSpec(BaseModel):
    """``hqlabel label``: text-prompted boxes and HQ-SAM masks for every image of a dataset."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(
        description="A folder of images (recursive), a Parquet file or folder of shards, or COCO JSON; "
        "local, file:// or s3://."
    )
    out: str = Field(description="Output folder (local or s3://): masks/, errors/, images/, job.json.")
    labeler: LabelerConfig = Field(description="Models, class list and thresholds.")
    id_column: str = Field("image_id", description="Parquet input: column holding the image id.")
    image_column: str = Field("image", description="Parquet input: column holding the encoded image bytes.")
    uri_column: str = Field(
        "uri", description="Parquet input: column with image references (s3://, file://, or relative paths)."
    )
    boxes_column: str = Field("boxes", description="Parquet input: existing XYXY boxes for --prompts boxes.")
    labels_column: str = Field("labels", description="Parquet input: the class names of those boxes.")
    coco_images: str | None = Field(None, description="COCO input: the image folder (default: the JSON's).")
    allow_prefix: list[str] = Field(
        default_factory=list,
        description="Places outside the dataset that image references (a Parquet uri, a COCO file_name, a "
        "symlink) may read: local folders, file:// or s3:// prefixes; others become error rows (stage "
        "'read').",
    )
    shard_size: int = Field(1000, ge=1, description="Folder / COCO input: images per shard (unit of resume).")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (e.g. http://host:9000).")
    s3_region: str | None = Field(None, description="S3 region (default: AWS_REGION, then us-east-1).")
    batch_size: int = Field(8, ge=1, description="Images per model call.")
    num_workers: int | None = Field(
        None,
        ge=1,
        description="Labeling actors, a fixed pool; default one per GPU, or as many as the CPUs allow.",
    )
    min_workers: int | None = Field(
        None, ge=1, description="Autoscaling pool (with max_workers): the fewest labeling actors; default 1."
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        description="Autoscaling pool: start with one actor per GPU present, grow to this many as GPU nodes "
        "join the cluster (an autoscaler's).",
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images become error rows.")
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES,
        ge=1,
        description="Larger encoded images become error rows (stage 'read'): files are refused by their "
        "stated size before they are read, inline bytes before they are decoded.",
    )
    max_json_bytes: int = Field(
        DEFAULT_MAX_JSON_BYTES,
        ge=1,
        description="A COCO JSON input larger than this is refused before it is read (parsing takes several "
        "times its size in memory).",
    )
    max_side: int = Field(
        DEFAULT_MAX_SIDE, ge=64, description="Images are downscaled to this longest side before the models."
    )
    overwrite: bool = Field(
        False, description="Start over, deleting an earlier run's outputs in `out` (default: resume it)."
    )
    retry_errors: bool = Field(
        False,
        description="Also relabel the images of finished shards that have retryable error rows (a transient "
        "storage error, a broken device, an actor that died labeling them); their shards are rewritten with "
        "the new rows in place of those error rows.",
    )
    max_actor_restarts: int = Field(
        16,
        ge=0,
        description="Times Ray restarts one labeling actor that died (a crash, the OOM killer, a broken "
        "device) before the job stops; a rerun resumes it.",
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each labeling actor asks for (--actor-resource NAME=AMOUNT), to "
        "place the actors on the nodes that offer them (e.g. a node type, or Ray's accelerator_type:A100); "
        "refused when no node offers one.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('HOST:PORT', 'ray://...', or 'auto' for Ray's discovery); default "
        "RAY_ADDRESS when set, else a new local Ray (never the cluster /tmp/ray/ray_current_cluster names).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance; default all.")
    service: bool = Field(
        False,
        description="Label on the warm labeling service (`hqlabel serve start`) of the cluster at "
        "`ray_address` (else the one `serve start` recorded) instead of starting model actors; refused when "
        "none runs or its models differ. Outputs and resume are the same either way.",
    )
    lease_ttl: float = Field(
        DEFAULT_TTL,
        ge=1,
        description="Seconds the run's lease on `out` (OUT/_lease.json, renewed every third of it) outlives "
        "the run if it dies; another run into `out` is refused until then.",
    )

    # Fields that change what a run writes; a rerun into the same `out` must agree on them to resume. The
    # batch size is one: Grounding DINO pads a batch to its largest image, which changes the others' boxes.
    OUTPUT_FIELDS: ClassVar[tuple[str, ...]] = (
        "input", "labeler", "id_column", "image_column", "uri_column", "boxes_column", "labels_column",
        "coco_images", "allow_prefix", "shard_size", "max_pixels", "max_bytes", "max_side", "batch_size",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_retry(self) -> LabelJobSpec:
        if self.retry_errors and self.overwrite:
            raise ValueError(
                "--retry-errors relabels the failed images of an earlier run, --overwrite deletes that run; "
                "pass one of them"
            )
        return self

    @field_validator("allow_prefix")
    @classmethod
    def _check_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix:
                raise ValueError("--allow-prefix '' would allow the working directory; give a folder or URI")
            normalise(prefix)  # a scheme other than s3:// or file://, or an S3 prefix without a bucket
        return prefixes

    @field_validator("actor_resources")
    @classmethod
    def _check_actor_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources, "--actor-resource")

    def with_absolute_paths(self) -> LabelJobSpec:
        """This spec with local paths absolute (``file://`` ones too), as ``job.json`` records them: ``show``,
        ``curate`` and a resume then work from any directory, and workers in other folders read the same
        files. ``s3://`` URIs stay; so do model names that are no local path (hub ids)."""
        labeler = self.labeler.model_copy(
            update={
                "detector": absolute_path(self.labeler.detector, must_exist=True),
                "segmenter": absolute_path(self.labeler.segmenter, must_exist=True),
                "hq_weights": absolute_path(self.labeler.hq_weights),
            }
        )
        return self.model_copy(
            update={
                "input": absolute_path(self.input),
                "out": absolute_path(self.out),
                "coco_images": absolute_path(self.coco_images),
                "labeler": labeler,
            }
        )

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(self.s3_endpoint, self.s3_region)

    @property
    def columns(self) -> InputColumns:
        return InputColumns(
            self.id_column, self.image_column, self.uri_column, self.boxes_column, self.labels_column
        )


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
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="Larger image files are refused, unread.")
    service: bool = Field(
        False,
        description="Segment on the warm labeling service (`hqlabel serve start`) instead of loading a "
        "model; refused when none runs or its segmenter differs.",
    )
    ray_address: str | None = Field(
        None, description="With service: the service's Ray cluster (default: the one `serve start` recorded)."
    )
