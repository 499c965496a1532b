"""The jobs as Python functions: ``hqlabel.label``, ``curate``, ``train``, ``evaluate``, ``export``.

The command line is a thin layer over these (``hqlabel.jobs.cli`` and the ``add_parser`` modules call them),
so a keyword here and its ``--option`` there are validated by the same code: the job specs (pydantic; a bad
value raises ``pydantic.ValidationError``, a ``ValueError``) and the ``run_*`` functions' own checks. Keyword
names are the spec fields' (``--address`` is ``ray_address``, ``--actor-resource`` ``actor_resources``, a
dict); ``None`` means the default, as an option left out does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hqlabel.platform.config import DEFAULT_SEGMENTER
from hqlabel.platform.storage import DEFAULT_MAX_JSON_BYTES, StorageOptions

if TYPE_CHECKING:
    from hqlabel.formats import ExportSummary
    from hqlabel.jobs.label import LabelSummary
    from hqlabel.jobs.spec import LabelJobSpec

__all__ = ["curate", "evaluate", "export", "label", "label_spec", "train"]


def _unknown(function: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"{function}() got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"the options are: {', '.join(sorted(known))}"
        )


def label_spec(input: str, *, out: str, classes: str | list[str] = "", **options: Any) -> LabelJobSpec:
    """The ``LabelJobSpec`` that ``hqlabel label INPUT --out OUT --classes ...`` builds.

    Args:
        input: a folder of images (recursive), a Parquet file or folder of shards, or a COCO JSON; local,
            ``file://`` or ``s3://``.
        out: the output folder (local or ``s3://``).
        classes: ``"cat, dog"`` or ``["cat", "dog"]``; with synonyms ``"person: man, woman; car: car"``, a
            mapping ``{"person": ["man", "woman"]}`` or a ``.yaml`` / ``.json`` file of one.
        options: any field of ``LabelerConfig`` (``detector``, ``segmenter``, ``preset``, ``box_threshold``,
            ``mask_nms``,
            ``prompts``, ``device``, ...) or of ``LabelJobSpec`` (``batch_size``, ``num_workers``,
            ``shard_size``, ``s3_endpoint``, ``ray_address``, ``overwrite``, ...); None values are left out.

    Raises:
        TypeError: an option that is neither.
        ValueError: a bad value (``pydantic.ValidationError``), as the command line reports it.
    """
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    labeler_fields = set(LabelerConfig.model_fields)
    job_fields = set(LabelJobSpec.model_fields) - {"input", "out", "labeler"}
    _unknown("label", options, labeler_fields | job_fields)
    given = {k: v for k, v in options.items() if v is not None}
    labeler = LabelerConfig(classes=classes, **{k: v for k, v in given.items() if k in labeler_fields})
    return LabelJobSpec(
        input=input, out=out, labeler=labeler, **{k: v for k, v in given.items() if k in job_fields}
    )


def label(
    input: str, *, out: str, classes: str | list[str] = "", progress: bool = False, **options: Any
) -> LabelSummary:
    """Label a dataset on Ray (a local one unless ``ray_address`` or ``RAY_ADDRESS`` names a cluster): one
    HQ-SAM mask per detected instance, written to ``out`` (``masks/``, ``errors/``, ``images/`` Parquet,
    ``job.json``). A rerun with the same arguments resumes; ``overwrite=True`` starts over.

    Args: as ``label_spec``; ``progress``: a progress bar on stderr. With ``service=True`` the job's driver
        runs in the warm service's job runner (``service_runner.run_on_service``).

    Returns:
        ``LabelSummary``: ``images``, ``instances``, ``errors``, ``seconds``, ``out``, ``images_this_run``.

    Raises:
        ValueError, FileNotFoundError: bad options or input (the command line's one-line errors).
        RuntimeError: some shards did not complete (call again to resume them).
    """
    spec = label_spec(input, out=out, classes=classes, **options)
    if spec.service:
        from hqlabel.jobs.service_runner import run_on_service

        return run_on_service(spec, progress=progress)
    from hqlabel.jobs.label import run_label_job

    return run_label_job(spec, progress=progress)


def curate(
    labels: str,
    *,
    out: str,
    min_pred_iou: float | None = None,
    min_score: float | None = None,
    classes: str | list[str] | None = None,
    min_area: int | None = None,
    decisions: str | None = None,
    images: str | None = None,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    max_json_bytes: int | None = None,
) -> dict[str, Any]:
    """Keep the good masks of a labels folder as an instance dataset at ``out`` (``hqlabel curate``).

    Args:
        labels: a labeling job's ``out`` folder (local or ``s3://``).
        min_pred_iou / min_score / min_area: inclusive thresholds; None: no filter.
        classes: classes to keep, ``"cat,dog"`` or a list (the command line's ``--labels``); None: all.
        decisions: ``LABELS/review`` (``hqlabel review``'s decisions and corrected masks), or a CSV / JSON
            lines file of ``image_id, instance_id, accept|reject``.
        images: the job's input, when it moved since labeling.

    Returns:
        The written ``dataset.json`` document (counts under ``provenance``).
    """
    from hqlabel.jobs.curate import run_curate

    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    return run_curate(
        labels,
        out,
        min_pred_iou=min_pred_iou,
        min_score=min_score,
        classes=classes,
        min_area=min_area,
        decisions=decisions,
        images=images,
        options=StorageOptions(s3_endpoint, s3_region),
        max_json_bytes=DEFAULT_MAX_JSON_BYTES if max_json_bytes is None else max_json_bytes,
    )


RUN_OPTIONS = ("workers", "gpus_per_worker", "worker_resources", "resume", "ray_address", "num_cpus")


def train(
    data: str, *, out: str, preset: str | None = None, max_failures: int = 0, **options: Any
) -> dict[str, Any]:
    """Retrain the HQ token on ``data`` with Ray Train (``hqlabel train``); checkpoints and ``best/`` in
    ``out``.

    Args:
        data: an instance dataset (``curate``), a COCO instances JSON or a mask folder.
        options: fields of ``TrainConfig`` (``epochs``, ``lr``, ``batch_size``, ``base``, ``val_data``,
            ``images_root``, ``jitter`` as ``(low, high)``, ...) and the run's ``workers``,
            ``gpus_per_worker``, ``worker_resources`` (dict), ``resume``, ``ray_address``, ``num_cpus``.

    Returns:
        ``{"history", "best", "out", "workers", "nodes"}``: per-epoch metrics, the best epoch's, ...
    """
    from hqlabel.jobs.train import run_train_job
    from hqlabel.training.config import TrainConfig

    config_fields = set(TrainConfig.model_fields) - {"data", "out", "preset"}
    _unknown("train", options, config_fields | set(RUN_OPTIONS))
    given = {k: v for k, v in options.items() if v is not None}
    config = TrainConfig(
        data=data, out=out, preset=preset, **{k: v for k, v in given.items() if k in config_fields}
    )
    run = {k: v for k, v in given.items() if k in RUN_OPTIONS}
    return run_train_job(config, max_failures=max_failures, **run)


def evaluate(
    data: str,
    *,
    base: str = DEFAULT_SEGMENTER,
    preset: str | None = None,
    weights: list[str] | None = None,
    sam: str | None = None,
    out: str | None = None,
    images: str | None = None,
    hq_token_only: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    choices: list[str] | None = None,
    classes: str | list[str] | None = None,
    **labeler: Any,
) -> dict[str, Any]:
    """mIoU / boundary mIoU of SAM, HQ-SAM and retrained HQ ``weights`` on ground-truth masks (``hqlabel
    eval``); every instance is prompted with its box. ``out``: also write ``eval.md`` and ``eval.json`` there.

    With ``choices`` (``["grounding-dino+sam-hq", ...]``, ``hqlabel eval --choice``): each detector +
    segmenter choice labels the images from ``classes`` (default: the GT's labels) instead, scored by mask AP,
    mIoU and mBIoU; ``labeler``: ``box_threshold``, ``text_threshold``, ``max_detections``, ... for every
    choice; ``base``, ``weights``, ``sam`` and ``hq_token_only`` do not apply.

    Returns:
        The report: ``rows`` (one per model) and ``table`` (markdown), as ``eval.json`` holds it.
    """
    from hqlabel.jobs.evaluate import run_choice_eval, run_eval

    if choices:
        return run_choice_eval(
            data,
            choices,
            classes=classes,
            preset=preset,
            out=out,
            images_root=images,
            batch_size=batch_size,
            device=device,
            options=StorageOptions(s3_endpoint, s3_region),
            **labeler,
        )
    return run_eval(
        data,
        base=base,
        preset=preset,
        weights=weights,
        sam=sam,
        out=out,
        images_root=images,
        hq_token_only=hq_token_only,
        batch_size=batch_size,
        device=device,
        options=StorageOptions(s3_endpoint, s3_region),
    )


def export(
    labels: str,
    *,
    out: str,
    format: str,
    min_part_area: float | None = None,
    image_root_url: str | None = None,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> ExportSummary:
    """Export a labels folder as ``format`` ``"coco"`` or ``"label-studio"`` (``out`` a JSON file),
    ``"yolo-seg"`` or ``"masks-png"`` (``out`` a folder), streaming (``hqlabel export``).

    Args:
        min_part_area: yolo-seg only: smallest mask part written as a polygon, in pixels (default 4).
        image_root_url: label-studio only: prefix of the tasks' image URLs (default
            ``/data/local-files/?d=``, Label Studio's local file serving).

    Raises:
        ValueError: ``min_part_area`` < 0, an unknown format, or an option of another format;
        FileNotFoundError: not a labels folder; ImportError: yolo-seg without OpenCV
        (``pip install hqlabel[export]``), label-studio without label-studio-converter
        (``pip install hqlabel[labelstudio]``).
    """
    from hqlabel.formats import export_labels

    if min_part_area is not None and min_part_area < 0:
        raise ValueError(f"--min-part-area must be >= 0 pixels, got {min_part_area}")
    return export_labels(
        labels,
        out,
        format,
        StorageOptions(s3_endpoint, s3_region),
        min_part_area=min_part_area,
        image_root_url=image_root_url,
    )
