"""``hqlabel eval``: compare models on one ground-truth set, in one table.

Two protocols. Without ``--choice``: mIoU and boundary mIoU of SAM, the base HQ-SAM and retrained HQ weights,
every ground-truth instance segmented from its GT box (the HQ-SAM paper's protocol). With ``--choice
DETECTOR+SEGMENTER`` (repeatable): each choice labels the GT images end to end from the class names (the
labeling job's ``Labeler``), scored by COCO mask AP (pycocotools, ``iouType="segm"``) and by mIoU / mBIoU of
each GT instance against its best-overlapping same-class prediction. The table is printed and, with
``--out``, written as ``eval.md`` and ``eval.json`` (local or s3://).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hqlabel.jobs.args import add_storage_args
from hqlabel.platform import storage
from hqlabel.platform.config import DEFAULT_SEGMENTER, PRESETS, LabelerConfig
from hqlabel.platform.instances import open_instances
from hqlabel.platform.storage import StorageOptions


def run_eval(
    data: str,
    *,
    base: str = DEFAULT_SEGMENTER,
    preset: str | None = None,
    weights: list[str] | None = None,
    sam: str | None = None,
    out: str | None = None,
    images_root: str | None = None,
    hq_token_only: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    options: StorageOptions = StorageOptions(),
) -> dict[str, Any]:
    """Evaluate on ``data`` (instance dataset, COCO instances JSON or mask folder).

    Args:
        base: the frozen SAM-HQ (hub id, dir or .pth); ``preset`` replaces it with a tiny random one.
        weights: retrained HQ weights to compare (files, ``RUN/best`` folders or run folders).
        sam: a plain SAM model for the SAM row; default: the base HQ-SAM's own frozen SAM weights.
        hq_token_only: HQ rows use the HQ logits alone (default SAM + HQ logits, as labeling does).

    Returns:
        ``{"data", "base", "rows": [{"model", "miou", "mbiou", "count", "empty"}], "table"}``; ``empty``: the
        instances left out of the means (empty prediction of an empty ground truth).
    """
    from hqlabel.segmenters import build_segmenter
    from hqlabel.training.evaluate import evaluate_segmenter, metrics_table
    from hqlabel.training.model import sam_from_sam_hq
    from hqlabel.workers.labeler import resolve_device

    images = [i for i in open_instances(data, options, images_root=images_root) if i.instances]
    if not images:
        raise ValueError(f"{data} holds no images with masks to evaluate on")
    torch_device = resolve_device(device)
    kwargs = dict(hq_token_only=hq_token_only, multimask="off", device=torch_device)
    base_name = preset or base
    hq = build_segmenter(base, preset=preset, **kwargs)
    if not hq.is_hq:
        raise ValueError(f"--base {base} is plain SAM; eval compares HQ-SAM models, pass a SAM-HQ --base")
    if sam is None:
        sam_segmenter, sam_name = sam_from_sam_hq(hq, multimask="off"), f"SAM (frozen weights of {base_name})"
    else:
        sam_segmenter, sam_name = build_segmenter(sam, multimask="off", device=torch_device), f"SAM ({sam})"
    models = [(sam_name, sam_segmenter), (f"HQ-SAM {base_name}", hq)]
    for path in weights or []:
        models.append(
            (f"HQ-SAM {base_name} + {path}", build_segmenter(base, preset=preset, hq_weights=path, **kwargs))
        )
    rows, summaries = [], []
    for name, segmenter in models:
        summary = evaluate_segmenter(segmenter, images, batch_size=batch_size).summary()
        summaries.append((name, summary))
        rows.append({"model": name, **summary})
    table = metrics_table(summaries)
    report = {
        "data": data,
        "base": base_name,
        "random_weights": preset is not None,
        "hq_token_only": hq_token_only,
        "protocol": "one GT-box prompt per instance, single mask, boundary dilation 0.02 x diagonal",
        "rows": rows,
        "table": table,
    }
    if out is not None:
        storage.write_bytes(storage.join(out, "eval.json"), json.dumps(report, indent=2).encode(), options)
        storage.write_bytes(storage.join(out, "eval.md"), _markdown(report).encode(), options)
    return report


RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS (--preset tiny-random): these models are randomly initialised; the numbers below mean "
    "NOTHING about any real model."
)


def parse_choice(choice: str) -> tuple[str, str]:
    """``"DETECTOR+SEGMENTER"`` -> ``(detector, segmenter)``: hub ids, directories, or under a preset
    architecture families (``grounding-dino+sam-hq``)."""
    parts = choice.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"--choice {choice!r} must be DETECTOR+SEGMENTER, e.g. grounding-dino+sam-hq or "
            "IDEA-Research/grounding-dino-tiny+syscv-community/sam-hq-vit-base"
        )
    return parts[0].strip(), parts[1].strip()


def run_choice_eval(
    data: str,
    choices: list[str],
    *,
    classes: str | list[str] | None = None,
    preset: str | None = None,
    out: str | None = None,
    images_root: str | None = None,
    batch_size: int = 4,
    device: str = "auto",
    options: StorageOptions = StorageOptions(),
    **labeler: Any,
) -> dict[str, Any]:
    """Label the GT images of ``data`` with each detector + segmenter choice and score the masks.

    Args:
        choices: ``"DETECTOR+SEGMENTER"`` each (``parse_choice``); under ``preset`` architecture families.
        classes: the class names prompted (default: the GT's labels, sorted); GT instances of other labels
            are left out of AP (not a category) and score 0 in mIoU / mBIoU (nothing can match them).
        labeler: more ``LabelerConfig`` fields for every choice (``box_threshold``, ``text_threshold``,
            ``nms_threshold``, ``max_detections``, ``hq_token_only``, ...).

    Returns:
        ``{"data", "classes", "random_weights", "protocol", "rows": [{"choice", "detector", "segmenter",
        "ap", "ap50", "ap75", "miou", "mbiou", "gt_instances", "predictions"}], "table"}``; metrics in [0, 1].
    """
    from hqlabel.platform.images import decode_image
    from hqlabel.training.evaluate import mask_ap, matched_mask_metrics
    from hqlabel.workers.labeler import Labeler

    if not choices:
        raise ValueError("pass at least one --choice DETECTOR+SEGMENTER")
    pairs = [parse_choice(c) for c in choices]
    images = [i for i in open_instances(data, options, images_root=images_root) if i.instances]
    if not images:
        raise ValueError(f"{data} holds no images with masks to evaluate on")
    gt_labels = sorted({inst.label for image in images for inst in image.instances})
    configs = [
        LabelerConfig(
            classes=classes or gt_labels,
            detector=detector,
            segmenter=segmenter,
            preset=preset,
            device=device,
            multimask="off",
            **labeler,
        )
        for detector, segmenter in pairs
    ]
    class_list = configs[0].classes
    rows = []
    for choice, (detector, segmenter), config in zip(choices, pairs, configs, strict=True):
        model = Labeler.from_config(config)
        predictions: list[list[dict]] = []
        for start in range(0, len(images), batch_size):  # decoded a batch at a time, for each choice
            batch = images[start : start + batch_size]
            pixels = [decode_image(image.image) for image in batch]
            # masks at the GT's size, as a labeling job writes them at the original size
            predictions += model.label(pixels, [(image.height, image.width) for image in batch])
        summary = matched_mask_metrics(images, predictions).summary()
        rows.append(
            {
                "choice": choice,
                "detector": detector,
                "segmenter": segmenter,
                **mask_ap(images, predictions, class_list),
                "miou": summary["miou"],
                "mbiou": summary["mbiou"],
                "gt_instances": sum(len(image.instances) for image in images),
                "predictions": sum(map(len, predictions)),
            }
        )
    report = {
        "data": data,
        "classes": class_list,
        "random_weights": preset is not None,
        "protocol": "end to end: detector boxes from the class names -> segmenter masks; COCO mask AP "
        "(pycocotools segm); mIoU / mBIoU of each GT instance against its best same-class prediction "
        "(0 when none), boundary dilation 0.02 x diagonal",
        "rows": rows,
        "table": choices_table(rows, random_weights=preset is not None),
    }
    if out is not None:
        storage.write_bytes(storage.join(out, "eval.json"), json.dumps(report, indent=2).encode(), options)
        storage.write_bytes(storage.join(out, "eval.md"), _markdown(report).encode(), options)
    return report


def choices_table(rows: list[dict[str, Any]], *, random_weights: bool) -> str:
    """A Markdown table of ``run_choice_eval``'s rows (percentages); under random weights a banner first."""
    from hqlabel.training.evaluate import format_percent

    lines = [f"**{RANDOM_WEIGHTS_BANNER}**", ""] if random_weights else []
    lines += [
        "| detector + segmenter | mask AP | AP50 | AP75 | mIoU | mBIoU | GT instances | predictions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        metrics = " | ".join(format_percent(r[k]) for k in ("ap", "ap50", "ap75", "miou", "mbiou"))
        lines.append(f"| {r['choice']} | {metrics} | {r['gt_instances']} | {r['predictions']} |")
    return "\n".join(lines) + "\n"


def _markdown(report: dict[str, Any]) -> str:
    warning = (
        "\n**Random weights (`--preset`): these numbers mean nothing.**\n" if report["random_weights"] else ""
    )
    if "hq_token_only" in report:
        logits = f"; HQ logits {'alone' if report['hq_token_only'] else 'added to SAM logits'}"
    else:
        logits = f"; classes: {', '.join(report['classes'])}"
    return (
        f"# Evaluation on {report['data']}\n{warning}\nProtocol: {report['protocol']}{logits}. "
        "Metrics in %.\n\n" + report["table"]
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare models on ground-truth masks: SAM / HQ-SAM / HQ weights (GT boxes), or detector + "
        "segmenter choices end to end (--choice)",
        description="Without --choice: prompt every GT instance with its box; compare SAM, the base HQ-SAM "
        "and --weights by mIoU / mBIoU. With --choice DETECTOR+SEGMENTER (repeatable): label the GT images "
        "from the class names with each choice; compare mask AP (COCO, pycocotools), mIoU and mBIoU.",
    )
    p.add_argument("--data", required=True, help="instance dataset, COCO instances JSON or mask folder")
    p.add_argument("--base", default=DEFAULT_SEGMENTER, help="frozen SAM-HQ: hub id, local dir or .pth")
    p.add_argument("--preset", choices=PRESETS, help="tiny random SAM-HQ base (offline smoke runs)")
    p.add_argument(
        "--weights", action="append", help="retrained HQ weights: file, RUN/best or RUN (repeatable)"
    )
    p.add_argument("--sam", help="plain SAM for the SAM row (default: the base's own frozen SAM weights)")
    p.add_argument(
        "--choice",
        action="append",
        help="DETECTOR+SEGMENTER to compare end to end (repeatable), e.g. grounding-dino+sam-hq: hub ids "
        "or dirs; under --preset tiny-random families (detectors: grounding-dino, mm-grounding-dino, owlv2, "
        "sam3; segmenters: sam-hq, sam)",
    )
    p.add_argument("--classes", help="--choice: class names to prompt (default: the GT's labels)")
    p.add_argument("--box-threshold", type=float, help="--choice: detector box threshold (default 0.35)")
    p.add_argument("--text-threshold", type=float, help="--choice: detector text threshold (default 0.25)")
    p.add_argument("--max-detections", type=int, help="--choice: most instances per image (default 100)")
    p.add_argument("--out", help="write eval.md and eval.json here (local or s3://)")
    p.add_argument("--images", help="COCO input: image folder (default: the JSON's folder)")
    p.add_argument("--hq-token-only", action="store_true", help="HQ logits alone for the HQ-SAM rows")
    p.add_argument("--batch-size", type=int, default=4, help="images per encoder call (4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_storage_args(p)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    if args.preset:
        print(f"hqlabel: warning: --preset {args.preset} evaluates randomly initialised models")
    if args.choice:
        return _eval_choices(args)
    from hqlabel.jobs.functions import evaluate

    report = evaluate(
        args.data,
        base=args.base,
        preset=args.preset,
        weights=args.weights,
        sam=args.sam,
        out=args.out,
        images=args.images,
        hq_token_only=args.hq_token_only,
        batch_size=args.batch_size,
        device=args.device,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
    )
    print(report["table"], end="")
    return 0


def _eval_choices(args: argparse.Namespace) -> int:
    from hqlabel.jobs.functions import evaluate

    given = [f"--{k}" for k in ("base", "weights", "sam") if getattr(args, k) != _DEFAULTS[k]]
    if given or args.hq_token_only:
        raise ValueError(
            f"--choice compares detector + segmenter choices; {given or ['--hq-token-only']} belong to the "
            "GT-box protocol: drop them, or drop --choice"
        )
    thresholds = {
        k: getattr(args, k)
        for k in ("box_threshold", "text_threshold", "max_detections")
        if getattr(args, k) is not None
    }
    report = evaluate(
        args.data,
        choices=args.choice,
        classes=args.classes,
        preset=args.preset,
        out=args.out,
        images=args.images,
        batch_size=args.batch_size,
        device=args.device,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        **thresholds,
    )
    if report["random_weights"]:
        print(RANDOM_WEIGHTS_BANNER)
    print(report["table"], end="")
    return 0


_DEFAULTS = {"base": DEFAULT_SEGMENTER, "weights": None, "sam": None}
