"""``hqlabel curate LABELS --out CURATED``: keep the good masks of a labeling job as an instance dataset.

Reads a labels folder (the ``--out`` of ``hqlabel label``) one shard at a time: its
``masks/part-SHARD.parquet`` and ``images/part-SHARD.parquet``, never the whole folder. A mask is kept when
it passes every filter given (a filter left at None does not filter):

* ``labels``: its class is one of these;
* ``min_score``: detector score >= this (e.g. 0.4);
* ``min_pred_iou``: HQ-SAM predicted IoU >= this (e.g. 0.9);
* ``min_area``: mask pixels >= this.

Decisions (``decisions``) go over the filters. They come from a file (CSV / JSON, ``read_decisions``:
accept or reject) or from a review folder (``LABELS/review`` written by ``hqlabel review``, ``read_review``:
accept, reject, relabel, and corrected masks). ``reject`` always drops the mask; ``accept`` and ``relabel``
keep it whatever score, predicted IoU or area say (it is still restricted to ``labels``, which defines the
dataset's classes, checked against the new class of a relabel); a corrected mask without a decision counts as
accepted (the reviewer drew it). A relabelled mask takes its new class; a corrected mask replaces the
labeler's and becomes the training target (box: its tight box; area and ``pred_iou``: its own). Kept rows say
what happened in ``review`` ("accept", "relabel", "fix") and ``corrected``; unreviewed rows leave both null.
Masks kept by a decision that a threshold would have dropped are counted as ``overridden``.

A dropped mask is counted under the first reason that applies, in this order: ``rejected``, ``label``,
``score``, ``pred_iou``, ``area``. The curated images are fetched again from the job's input (``job.json``
``spec.input``, or ``images`` when it moved); an image that is gone or changed size is dropped with its masks
(``image_unavailable`` / ``image_changed``) and a warning. Images with no kept mask are not written. Kept
masks keep their ``instance_id``, ``score`` and ``pred_iou``; ``origin`` is ``labels:<LABELS>``.

``dataset.json`` ``provenance`` records the labels folder, the job's labeler config and models (with
``random_weights``), the filters, the decisions (``file``: their source, ``kind``: "file" or "review",
accepted / rejected / relabelled / corrected / overridden / unknown, ``reviewers``) and the counts kept and
dropped per reason.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow.compute as pc

from hqlabel.jobs.args import add_json_cap_arg, add_storage_args
from hqlabel.platform import storage
from hqlabel.platform.groundtruth import image_size
from hqlabel.platform.instances import ImageInstances, Instance, write_instances
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.sources import files_by_shard, job_images
from hqlabel.platform.storage import StorageOptions
from hqlabel.review.store import ReviewState, read_review

logger = logging.getLogger(__name__)

__all__ = ["DECISIONS", "add_parser", "load_decisions", "read_decisions", "run_curate"]

DECISIONS = ("accept", "reject")
DROP_REASONS = ("rejected", "label", "score", "pred_iou", "area", "image_unavailable", "image_changed")
_MASK_COLUMNS = ["image_id", "instance_id", "label", "score", "box", "mask", "area", "pred_iou"]


def _decision_entry(
    item: Any, where: str
) -> tuple[tuple[str, int], str]:  # ((image_id, instance_id), decision)
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with image_id, instance_id, decision; got {item!r}")
    missing = [k for k in ("image_id", "instance_id", "decision") if item.get(k) in (None, "")]
    if missing:
        raise ValueError(
            f"{where}: missing {', '.join(missing)} (each entry needs image_id, instance_id, decision)"
        )
    decision = str(item["decision"]).strip().lower()
    if decision not in DECISIONS:
        raise ValueError(f"{where}: decision {item['decision']!r} is not one of {', '.join(DECISIONS)}")
    try:
        instance_id = int(str(item["instance_id"]).strip())
    except ValueError as e:
        raise ValueError(f"{where}: instance_id {item['instance_id']!r} is not an integer") from e
    return (str(item["image_id"]), instance_id), decision


def read_decisions(
    uri: str, options: StorageOptions = StorageOptions(), *, max_bytes: int = storage.DEFAULT_MAX_JSON_BYTES
) -> dict[tuple[str, int], str]:
    """A reviewer's decisions: ``{(image_id, instance_id): "accept" | "reject"}``.

    The file (local or ``s3://``) is a CSV with the header ``image_id,instance_id,decision``, JSON lines
    (one object per line) or a JSON list of such objects; the form is detected from the content. A file
    larger than ``max_bytes`` is refused before it is read (``--max-json-bytes``).

    Raises:
        FileNotFoundError: no such file.
        TooLargeError: it is over ``max_bytes``.
        ValueError: not one of those forms, a missing field, a decision other than accept / reject, a
            non-integer instance_id, or two different decisions for one mask (the line / entry is named).
    """
    data = storage.read_bytes(uri, options, max_bytes=max_bytes, option="--max-json-bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"decisions file {uri} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    stripped = text.lstrip()
    entries: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"decisions file {uri} is not valid JSON ({e})") from e
        entries = [(f"{uri} entry {k}", item) for k, item in enumerate(items)]
    elif stripped.startswith("{"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{uri} line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{uri} line {number} is not a JSON object ({e})") from e
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in reader.fieldnames or []]
        if not {"image_id", "instance_id", "decision"} <= set(header):
            raise ValueError(
                f"decisions file {uri}: expected a CSV header image_id,instance_id,decision (or JSON lines / "
                f"a JSON list of such objects), got {header}"
            )
        reader.fieldnames = header
        entries = [(f"{uri} line {reader.line_num}", dict(row)) for row in reader]
    decisions: dict[tuple[str, int], str] = {}
    for where, item in entries:
        key, decision = _decision_entry(item, where)
        if decisions.get(key, decision) != decision:
            raise ValueError(
                f"{where}: image {key[0]!r} instance {key[1]} is both accepted and rejected; keep one"
            )
        decisions[key] = decision
    return decisions


def load_decisions(
    uri: str, options: StorageOptions = StorageOptions(), *, max_bytes: int = storage.DEFAULT_MAX_JSON_BYTES
) -> tuple[dict[tuple[str, int], ReviewState], str]:
    """The decisions at ``uri`` as ``({(image_id, instance_id): ReviewState}, kind)``: a folder is a review
    folder (``read_review``, kind "review"), a file a decisions file (``read_decisions``, kind "file").

    Raises:
        FileNotFoundError: nothing at ``uri``, or a folder without review files.
        ValueError / TooLargeError: as ``read_decisions``.
    """
    if storage.is_dir(uri, options):
        return read_review(uri, options), "review"
    verdicts = read_decisions(uri, options, max_bytes=max_bytes)
    return {key: ReviewState(decision=decision) for key, decision in verdicts.items()}, "file"


def _drop_reason(
    row: dict[str, Any],
    labels: set[str] | None,
    min_score: float | None,
    min_pred_iou: float | None,
    min_area: int | None,
) -> str | None:
    """The first threshold ``row`` (a masks row) fails, or None."""
    if labels is not None and row["label"] not in labels:
        return "label"
    if min_score is not None and row["score"] < min_score:
        return "score"
    if min_pred_iou is not None and row["pred_iou"] < min_pred_iou:
        return "pred_iou"
    if min_area is not None and row["area"] < min_area:
        return "area"
    return None


def run_curate(
    labels: str,
    out: str,
    *,
    min_pred_iou: float | None = None,
    min_score: float | None = None,
    classes: list[str] | None = None,
    min_area: int | None = None,
    decisions: str | None = None,
    images: str | None = None,
    options: StorageOptions = StorageOptions(),
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> dict[str, Any]:
    """Write the masks of the labels folder ``labels`` that pass the filters as an instance dataset at ``out``
    (kind ``"curated"``; see the module docstring for the rules).

    Args:
        labels: a labeling job's ``--out`` folder (local or ``s3://``).
        out: the instance dataset folder to write (local or ``s3://``).
        min_pred_iou / min_score / min_area: thresholds (inclusive); None = no filter.
        classes: keep only these classes; None = all.
        decisions: a review folder (``LABELS/review``, see ``hqlabel.review.store``) or a decisions file (see
            ``read_decisions``, refused over ``max_json_bytes``).
        images: the job's input, when it moved since labeling (default: ``job.json`` ``spec.input``).

    Returns:
        The ``dataset.json`` document (its ``provenance`` holds the counts).

    Raises:
        FileNotFoundError: ``labels`` is not a labels folder, or its input / the decisions file is gone.
        ValueError: a labels folder without masks, a bad threshold or decisions file, an existing ``out``.
    """
    for name, value in (("--min-pred-iou", min_pred_iou), ("--min-score", min_score)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if min_area is not None and min_area < 0:
        raise ValueError(f"--min-area must be >= 0, got {min_area}")
    if classes is not None and not classes:
        raise ValueError("--labels names no class; give a comma-separated list such as cat,dog")
    # recorded in dataset.json: absolute, so that it means the same from any directory
    labels, out, images, decisions = (storage.absolute(p) for p in (labels, out, images, decisions))
    folder = LabelsFolder(labels, options)
    mask_files = files_by_shard(folder.mask_files)
    if not mask_files:
        raise ValueError(
            f"{labels} has no masks (masks/part-*.parquet): expected the --out folder of a finished "
            "`hqlabel label` run with at least one instance"
        )
    verdicts, kind = load_decisions(decisions, options, max_bytes=max_json_bytes) if decisions else ({}, None)
    spec = folder.job.get("spec", {})
    _warn_unknown_classes(classes, spec, labels)
    models = folder.job.get("models", {})
    if models.get("random_weights"):
        logger.warning(
            "%s was labeled with random weights (preset tiny-random): its masks are meaningless", labels
        )
    reader = job_images(folder.uri, spec, images, options)

    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    decided = {"accepted": 0, "rejected": 0, "relabelled": 0, "corrected": 0, "overridden": 0, "unknown": 0}
    images_count = {"labeled": 0, "written": 0, "without_kept_masks": 0, "repeated_id": 0}
    provenance: dict[str, Any] = {
        "labels": folder.uri,
        "labeler": spec.get("labeler", {}),
        "models": models,
        "random_weights": bool(models.get("random_weights", False)),
        "job_input": images or spec.get("input"),
        "filters": {
            "min_pred_iou": min_pred_iou,
            "min_score": min_score,
            "labels": classes,
            "min_area": min_area,
        },
        "decisions": {
            "file": decisions,
            "kind": kind,
            **decided,
            "reviewers": sorted({r for v in verdicts.values() for r in (v.reviewer, v.fixed_by) if r}),
        },
        "counts": {"kept": 0, "dropped": dropped, "kept_by_label": kept, "images": images_count},
    }
    wanted_labels = set(classes) if classes is not None else None
    origin = f"labels:{folder.uri}"
    seen_pairs: set[tuple[str, int]] = set()

    def curated() -> Iterator[ImageInstances]:
        written: set[str] = set()
        image_files = files_by_shard(folder.image_files)
        for shard in sorted(image_files):
            table = storage.read_parquet(image_files[shard], options, columns=["image_id", "height", "width"])
            table = table.filter(pc.is_valid(table["height"]))
            ids = table["image_id"].to_pylist()
            counts = Counter(ids)
            sizes = {r["image_id"]: (r["height"], r["width"]) for r in table.to_pylist()}
            images_count["labeled"] += len(counts)
            if shard not in mask_files:
                images_count["without_kept_masks"] += len(counts)
                continue
            by_image: dict[str, list[Instance]] = {}
            masks = storage.read_parquet(mask_files[shard], options, columns=_MASK_COLUMNS)
            for row in masks.sort_by([("image_id", "ascending"), ("instance_id", "ascending")]).to_pylist():
                key = (row["image_id"], int(row["instance_id"]))
                seen_pairs.add(key)
                verdict = verdicts.get(key)
                review = None
                if verdict is not None:
                    review = verdict.decision or ("fix" if verdict.corrected else None)
                if review == "relabel":
                    row["label"] = verdict.label
                reason = _drop_reason(row, wanted_labels, min_score, min_pred_iou, min_area)
                if review == "reject":
                    decided["rejected"] += 1
                    dropped["rejected"] += 1
                    continue
                if review is not None:
                    decided["relabelled" if review == "relabel" else "accepted"] += 1
                    if reason not in (None, "label"):
                        decided["overridden"] += 1
                        reason = None
                if reason is not None:
                    dropped[reason] += 1
                    continue
                instance = Instance.from_row(row, origin=origin)
                if review is not None:
                    instance.review, instance.corrected = review, verdict.corrected
                if verdict is not None and verdict.corrected:
                    decided["corrected"] += 1
                    instance = Instance(
                        instance.instance_id,
                        instance.label,
                        verdict.mask,  # the reviewer's mask: its own tight box and area
                        score=instance.score,
                        pred_iou=verdict.pred_iou,
                        origin=origin,
                        review=review,
                        corrected=True,
                    )
                by_image.setdefault(row["image_id"], []).append(instance)
            repeated = {i for i in by_image if counts[i] > 1 or i in written}
            if repeated:  # masks name their image by id only: a repeated id's masks cannot be assigned
                logger.warning(
                    "shard %s: left out %d image(s) whose image_id occurs more than once",
                    shard,
                    len(repeated),
                )
                images_count["repeated_id"] += len(repeated)
            wanted = {i for i in by_image if i not in repeated}
            images_count["without_kept_masks"] += len(counts) - len(wanted) - len(repeated)
            for image_id, data, problem in reader.read(shard, wanted):
                instances = by_image[image_id]
                if data is None:
                    logger.warning("image %r: %s; left out", image_id, problem)
                    dropped["image_unavailable"] += len(instances)
                    continue
                try:
                    size = image_size(data, f"image {image_id!r}")
                except ValueError as e:
                    logger.warning("%s; left out", e)
                    dropped["image_unavailable"] += len(instances)
                    continue
                if size != sizes.get(image_id, size):
                    logger.warning(
                        "image %r is %s now, %s when labeled; left out", image_id, size, sizes[image_id]
                    )
                    dropped["image_changed"] += len(instances)
                    continue
                written.add(image_id)
                images_count["written"] += 1
                provenance["counts"]["kept"] += len(instances)
                kept.update(i.label for i in instances)
                height, width = size
                yield ImageInstances(image_id, data, height, width, instances)
        unknown = len(verdicts.keys() - seen_pairs)
        decided["unknown"] = unknown
        if unknown:
            logger.warning(
                "%d decision(s) name masks (image_id, instance_id) that are not in %s; ignored",
                unknown,
                labels,
            )
        provenance["decisions"].update(decided)
        provenance["counts"]["dropped"] = dict(dropped)
        provenance["counts"]["kept_by_label"] = dict(sorted(kept.items()))

    manifest = write_instances(
        curated(), out, kind="curated", source=folder.uri, provenance=provenance, options=options
    )
    if manifest["num_instances"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in manifest["provenance"]["counts"]["dropped"].items() if v)
        logger.warning(
            "curate kept 0 masks of %s (dropped: %s): %s is empty; loosen the filters", labels, reasons, out
        )
    return manifest


def _warn_unknown_classes(classes: list[str] | None, spec: dict[str, Any], labels: str) -> None:
    """A warning for ``--labels`` classes that the labeling job did not detect (its ``--classes``); a job
    that took its boxes' labels from the dataset (``--prompts boxes``) has no class list to check."""
    job_classes = spec.get("labeler", {}).get("classes") or []
    if classes is None or not job_classes:
        return
    unknown = [c for c in classes if c not in job_classes]
    if unknown:
        logger.warning(
            "--labels %s: not a class of %s (its classes: %s); no mask can have it",
            ", ".join(unknown),
            labels,
            ", ".join(job_classes),
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``curate`` subcommand."""
    p = sub.add_parser(
        "curate",
        help="keep the good masks of a labeling job as an instance dataset (for hqlabel train / eval)",
        description="Filter the masks of LABELS (a label --out) by predicted IoU, score, class and area, "
        "apply a reviewer's accept/reject decisions, and write the kept masks with their images to CURATED. "
        "Every filter is off unless given.",
    )
    p.add_argument("labels", help="the labeling job's --out folder (local or s3://)")
    p.add_argument("--out", required=True, help="the instance dataset folder to write (local or s3://)")
    p.add_argument(
        "--min-pred-iou", type=float, help="keep masks with HQ-SAM predicted IoU >= this (e.g. 0.9)"
    )
    p.add_argument("--min-score", type=float, help="keep masks with detector score >= this (e.g. 0.4)")
    p.add_argument("--labels", dest="classes", help="comma-separated classes to keep (default: all)")
    p.add_argument("--min-area", type=int, help="keep masks with at least this many pixels")
    p.add_argument(
        "--decisions",
        help="LABELS/review (the decisions and corrected masks of `hqlabel review`), or a CSV "
        "image_id,instance_id,decision (or JSON lines / a JSON list): accept and relabel override the "
        "thresholds, reject always drops, corrected masks replace the labeler's",
    )
    p.add_argument("--images", help="the job's input, if it has moved (default: job.json's spec.input)")
    add_json_cap_arg(p, "a decisions file")
    add_storage_args(p)
    p.set_defaults(func=_curate)


def _curate(args: argparse.Namespace) -> int:
    from hqlabel.jobs.functions import curate

    manifest = curate(
        args.labels,
        out=args.out,
        min_pred_iou=args.min_pred_iou,
        min_score=args.min_score,
        classes=args.classes,
        min_area=args.min_area,
        decisions=args.decisions,
        images=args.images,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        max_json_bytes=args.max_json_bytes,
    )
    counts = manifest["provenance"]["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v) or "none"
    print(
        f"curated {manifest['num_instances']} masks on {manifest['num_images']} images to {args.out} "
        f"(dropped: {dropped})"
    )
    return 0
