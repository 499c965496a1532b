"""Typed configuration shared by the model layers, the workers and the jobs.

``LabelerConfig`` is everything a worker needs to build its models and label images; job specs embed it,
and the resolved value is saved next to every output (``job.json``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "syscv-community/sam-hq-vit-base"
PRESETS = ("tiny-random",)
# what --detector may name under --preset tiny-random (tiny random models of these architectures)
DETECTOR_FAMILIES = ("grounding-dino", "mm-grounding-dino", "owlv2", "sam3")
# what --segmenter may name under --preset tiny-random (hqlabel.segmenters.TINY_RANDOM)
SEGMENTER_FAMILIES = ("sam-hq", "sam", "sam-hq-light")
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Preprocess = Literal["auto", "processor", "torch"]  # see hqlabel.platform.preprocess
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
# --tile: the smallest tile side (detectors enlarge their input to ~800 pixels: smaller tiles add passes, not
# detail), the largest overlap (a stride of 10% of a tile already means 100 tiles per tile-sized area), and
# the overlap a tile gets by default (SAHI's)
UNCOMPILED_DETECTORS = ("owlv2", "sam3")  # detector families --compile does not cover yet
TILE_MIN = 256
TILE_OVERLAP_MAX = 0.9
DEFAULT_TILE_OVERLAP = 0.2


def compile_refused(detector: str) -> str:
    """The one-line error of ``--compile`` with a detector family it does not cover."""
    return f"--compile does not cover --detector {detector} yet; drop --compile"


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; ``None`` means plain float32 (no autocast).

    ``"auto"`` is bfloat16 on a CUDA device that supports it (compute capability 8.0+: A100, H100, L4, ...),
    else float32. Weights stay float32 whatever the precision; only the forward passes run under
    ``torch.autocast``.

    Raises:
        ValueError: an unknown precision, float16 on the CPU (CPU autocast supports bfloat16 only), or
            bfloat16 on a CUDA device without it.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    cuda_bf16 = (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported(including_emulation=False)
    )
    if precision == "fp32" or (precision == "auto" and not cuda_bf16):
        return None
    if precision == "fp16":
        if device.type == "cpu":
            raise ValueError("precision 'fp16' is not supported on the CPU; use --precision bf16 or fp32")
        return torch.float16
    if device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"{device} does not support bfloat16; use --precision fp16 or fp32")
    return torch.bfloat16


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype`` (``resolve_precision``'s); a no-op context for None."""
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def parse_classes(text: str | list[str]) -> list[str]:
    """Turn ``"person, bicycle, traffic light"`` (or a list) into a clean, de-duplicated class list.

    Names keep their spelling (the output ``label`` column uses them as given); blank entries are dropped.

    Raises:
        ValueError: no class is left, or a name contains ``.`` (Grounding DINO separates classes with it).
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    classes: list[str] = []
    seen: set[str] = set()
    for item in items:
        name = " ".join(str(item).split())
        if not name:
            continue
        if "." in name:
            raise ValueError(
                f"class name {name!r} contains '.', which separates classes in the detector prompt; "
                "remove it (e.g. 'st. bernard' -> 'st bernard')"
            )
        key = name.lower()
        if key not in seen:
            seen.add(key)
            classes.append(name)
    if not classes:
        raise ValueError(
            f"no class names in {text!r}; pass a comma-separated list such as --classes 'cat, dog'"
        )
    return classes


class LabelerConfig(BaseModel):
    """What a labeling worker builds and how it labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[str] = Field(
        default_factory=list,
        description="Class names to detect; the output `label` column takes these values. Also accepts "
        "synonyms ('person: man, woman; car: car, truck', a mapping, or a .yaml / .json file of one; see "
        "hqlabel.platform.ontology), which fill `synonyms`.",
    )
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per class, the phrases the detector is prompted with (rows are labeled with the class "
        "name); empty: each class is prompted with its own name.",
    )
    prompts: Literal["detector", "boxes"] = Field(
        "detector",
        description="'detector': boxes from the text prompt; 'boxes': the dataset's own boxes (no detector).",
    )
    detector: str = Field(
        DEFAULT_DETECTOR,
        description="Detector hub id or local directory: Grounding DINO, MM-Grounding-DINO, OWLv2 or SAM 3 "
        "(picked by its config's model_type). Under preset 'tiny-random': an architecture family, "
        "'grounding-dino' (also the default id), 'mm-grounding-dino', 'owlv2' or 'sam3'.",
    )
    segmenter: str = Field(
        DEFAULT_SEGMENTER,
        description="SAM-HQ (or SAM) hub id, local directory, or original checkpoint (sam_hq_vit_b.pth). "
        "Under preset 'tiny-random': an architecture family, 'sam-hq' (also the default id) or 'sam'.",
    )
    detector_revision: str | None = Field(
        None,
        description="The detector's version: a hub commit hash (or branch / tag, resolved to its commit when "
        "a job starts), or for a local directory 'files:' and a fingerprint of its files. None: the default "
        "branch, pinned by the job (recorded in job.json, reused on resume).",
    )
    segmenter_revision: str | None = Field(
        None, description="The segmenter's version, as detector_revision (a .pth checkpoint: 'files:...')."
    )
    hq_weights: str | None = Field(
        None, description="Fine-tuned HQ-token weights (safetensors) loaded on top of the segmenter."
    )
    hq_weights_revision: str | None = Field(
        None,
        description="The HQ weights' version: 'sha256:' and a digest of the file's bytes, recorded when a "
        "job starts (job.json); a resumed job whose file has changed since is refused. Set by hand, a job "
        "checks the file against it.",
    )
    preset: Literal["tiny-random"] | None = Field(
        None, description="Build tiny randomly initialised models instead of loading weights (offline tests)."
    )
    box_threshold: float = Field(0.35, ge=0.0, le=1.0, description="Minimum detector score of a kept box.")
    text_threshold: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Per-class floor: a class's best token score for a box (Grounding DINO, "
        "MM-Grounding-DINO), its query score (OWLv2), or its presence score in the image (SAM 3).",
    )
    nms_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="IoU above which same-class boxes are merged."
    )
    max_detections: int = Field(
        100, ge=1, description="Most instances kept per image (highest scores first)."
    )
    hq_token_only: bool = Field(
        False, description="Masks from the HQ token alone instead of SAM logits + HQ logits."
    )
    multimask: Literal["off", "best"] = Field(
        "off",
        description="'off': SAM's single-mask token; 'best': the original release's best-of-3 SAM mask + HQ.",
    )
    mask_threshold: float = Field(0.0, description="Logit threshold that binarises masks.")
    decoder_chunk_size: int = Field(
        16, ge=1, description="Prompts per mask-decoder call (~60 MB each at ViT-B decoder size, float32)."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Precision = Field(
        "auto",
        description="Autocast dtype of the detector and segmenter forward passes (weights stay float32): "
        "'auto' = bf16 on CUDA devices that support it (compute capability 8.0+), else fp32; 'bf16' (CPU or "
        "GPU); 'fp16' (GPU only); 'fp32' (no autocast). Outputs are float32 either way.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the segmenter's image encoder and the Grounding DINO detector "
        "(GPU-oriented: the first batch of each new shape compiles, seconds to minutes; needs a C++ "
        "compiler on the CPU). Batches are padded to the first one's size and detector images to a canvas "
        "that only grows, so each compiles once per canvas; the OWLv2 and SAM 3 detectors refuse it.",
    )
    mask_nms: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Class-agnostic NMS by mask IoU: of two masks of an image overlapping by more than this "
        "(e.g. 0.8), the lower-scored is dropped (duplicates that box NMS misses); None: off.",
    )
    preprocess: Preprocess = Field(
        "auto",
        description="Where images are resized and normalised for the models: 'processor' (transformers' "
        "processors, CPU), 'torch' (on the model's device), 'auto' (torch on CUDA, the processor elsewhere).",
    )
    tile: int | None = Field(
        None,
        description="Tiled detection (hqlabel.workers.tiling): images whose longer side is over this many "
        "pixels keep their full resolution and the detector runs on overlapping tiles of this side; masks "
        "stay whole. None: no tiling.",
    )
    tile_overlap: float | None = Field(
        None,
        description=f"With tile: share of a tile its neighbour also covers, in [0, {TILE_OVERLAP_MAX}] "
        f"(default {DEFAULT_TILE_OVERLAP}).",
    )
    tile_full_image: bool | None = Field(
        None,
        description="With tile: also detect on the whole (downscaled) image, for objects larger than a tile "
        "(default True).",
    )

    @model_validator(mode="before")
    @classmethod
    def _parse_ontology(cls, data: Any) -> Any:
        """``classes`` as a list or synonyms (inline, a mapping, a file) -> ``classes`` and ``synonyms``."""
        if not isinstance(data, dict) or data.get("classes") in (None, []):
            return data
        if data["classes"] == "":
            return {**data, "classes": []}
        from hqlabel.platform.ontology import parse_ontology

        classes, synonyms = parse_ontology(data["classes"])
        if synonyms and data.get("synonyms"):
            raise ValueError("classes with synonyms and synonyms= both given; pass the synonyms once")
        return {**data, "classes": classes, "synonyms": synonyms or data.get("synonyms") or {}}

    @model_validator(mode="after")
    def _synonyms_name_the_classes(self) -> LabelerConfig:
        if not self.synonyms:
            return self
        extra = sorted(set(self.synonyms) - set(self.classes))
        missing = [c for c in self.classes if c not in self.synonyms]
        empty = [c for c, prompts in self.synonyms.items() if not prompts]
        if extra or missing or empty:
            raise ValueError(
                f"synonyms must give each class its prompts: not classes {extra}, classes without synonyms "
                f"{missing}, empty lists {empty}; pass them together as --classes 'class: synonym, ...; ...'"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _tile_defaults(cls, data):
        if isinstance(data, dict) and data.get("tile") is not None:
            data = {
                **data,
                "tile_overlap": DEFAULT_TILE_OVERLAP
                if data.get("tile_overlap") is None
                else data["tile_overlap"],
                "tile_full_image": True if data.get("tile_full_image") is None else data["tile_full_image"],
            }
        return data

    @model_validator(mode="after")
    def _check_tiling(self) -> LabelerConfig:
        if self.tile is None:
            given = [name for name in ("tile_overlap", "tile_full_image") if getattr(self, name) is not None]
            if given:
                option = "--" + given[0].replace("_", "-")
                raise ValueError(
                    f"{option} applies to tiled detection: give --tile SIZE too, or leave it out"
                )
            return self
        if self.tile < TILE_MIN:
            raise ValueError(
                f"--tile {self.tile} is too small: tiles must be at least {TILE_MIN} pixels (a detector "
                "enlarges smaller ones 3x or more to its ~800-pixel input: more passes, no more detail); "
                f"give --tile {TILE_MIN} or more"
            )
        if not 0.0 <= self.tile_overlap <= TILE_OVERLAP_MAX:
            raise ValueError(
                f"--tile-overlap {self.tile_overlap} is out of range: give a fraction of the tile in "
                f"[0, {TILE_OVERLAP_MAX}], e.g. {DEFAULT_TILE_OVERLAP}"
            )
        if self.prompts == "boxes":
            raise ValueError(
                "--tile tiles the detector's input; --prompts boxes runs no detector: drop --tile"
            )
        return self

    @model_validator(mode="after")
    def _classes_for_the_detector(self) -> LabelerConfig:
        if self.prompts == "detector" and not self.classes:
            raise ValueError(
                "the detector needs --classes (e.g. --classes 'cat, dog'), or use --prompts boxes"
            )
        return self

    @model_validator(mode="after")
    def _compile_covers_the_detector(self) -> LabelerConfig:
        # a hub id's family is known once its config loads: its detector refuses --compile as it is built
        refused = self.prompts == "detector" and self.detector in UNCOMPILED_DETECTORS
        if self.compile and self.preset is not None and refused:
            raise ValueError(compile_refused(self.detector))
        return self

    @model_validator(mode="after")
    def _preset_detector_is_a_family(self) -> LabelerConfig:
        families = (DEFAULT_DETECTOR, *DETECTOR_FAMILIES)
        if self.preset is not None and self.prompts == "detector" and self.detector not in families:
            raise ValueError(
                f"under --preset {self.preset}, --detector names an architecture family, one of "
                f"{list(DETECTOR_FAMILIES)}; got {self.detector!r}"
            )
        if self.preset is not None and self.segmenter not in (DEFAULT_SEGMENTER, *SEGMENTER_FAMILIES):
            raise ValueError(
                f"under --preset {self.preset}, --segmenter names an architecture family, one of "
                f"{list(SEGMENTER_FAMILIES)}; got {self.segmenter!r}"
            )
        return self


# What a job may choose on a warm service: everything else of LabelerConfig builds the models.
PER_JOB_FIELDS = (
    "classes",
    "synonyms",
    "prompts",
    "box_threshold",
    "text_threshold",
    "nms_threshold",
    "max_detections",
    "mask_nms",
    "tile",
    "tile_overlap",
    "tile_full_image",
)
MODEL_FIELDS = tuple(name for name in LabelerConfig.model_fields if name not in PER_JOB_FIELDS)
# The model fields that define a segmenter's masks for given prompts (``hqlabel segment --service``, review's
# click fixes on the service); device, compile and decoder_chunk_size change where and how fast, not what.
SEGMENTER_FIELDS = (
    "segmenter",
    "segmenter_revision",
    "preset",
    "hq_weights",
    "hq_weights_revision",
    "hq_token_only",
    "multimask",
    "mask_threshold",
    "precision",
    "preprocess",
)


def model_differences(service: LabelerConfig, job: LabelerConfig) -> list[str]:
    """``"field: service VALUE, job VALUE"`` for each model setting in which ``job`` differs from ``service``
    (empty: the service can label the job). A service without a detector cannot serve detector prompts."""
    differ = [
        f"{name}: service {getattr(service, name)!r}, job {getattr(job, name)!r}"
        for name in MODEL_FIELDS
        if getattr(service, name) != getattr(job, name)
    ]
    if job.prompts == "detector" and service.prompts == "boxes":
        differ.append(
            "prompts: the service has no detector (started with --prompts boxes), the job needs one"
        )
    return differ


def segmenter_differences(service: LabelerConfig, caller: LabelerConfig | dict[str, Any]) -> list[str]:
    """``"field: service VALUE, caller VALUE"`` for each ``SEGMENTER_FIELDS`` setting in which ``caller``
    differs from ``service`` (empty: the service's segmenter gives the caller's masks). A ``LabelerConfig``
    caller is compared on every segmenter field, a dict on the fields it names; a caller's
    ``segmenter_revision`` or ``hq_weights_revision`` of None takes the service's (as ``label --service``
    does).

    Raises:
        ValueError: a dict names a field that is not in ``SEGMENTER_FIELDS``.
    """
    given = (
        {name: getattr(caller, name) for name in SEGMENTER_FIELDS}
        if isinstance(caller, LabelerConfig)
        else dict(caller)
    )
    unknown = sorted(set(given) - set(SEGMENTER_FIELDS))
    if unknown:
        raise ValueError(
            f"segmenter settings {unknown} are not segmenter fields; give some of {SEGMENTER_FIELDS}"
        )
    for name in ("segmenter_revision", "hq_weights_revision"):
        if given.get(name) is None:
            given.pop(name, None)
    return [
        f"{name}: service {getattr(service, name)!r}, caller {value!r}"
        for name, value in given.items()
        if getattr(service, name) != value
    ]
