"""``hqlabel eval``: mIoU and boundary mIoU of SAM, the base HQ-SAM and retrained HQ weights, side by side.

Every model segments every ground-truth instance from its GT box (the HQ-SAM paper's protocol); the table is
printed and, with ``--out``, written as ``eval.md`` and ``eval.json`` (local or s3://).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hqlabel.jobs.args import add_storage_args
from hqlabel.platform import storage
from hqlabel.platform.config import DEFAULT_SEGMENTER, PRESETS
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


def _markdown(report: dict[str, Any]) -> str:
    warning = (
        "\n**Random weights (`--preset`): these numbers mean nothing.**\n" if report["random_weights"] else ""
    )
    return (
        f"# Evaluation on {report['data']}\n{warning}\nProtocol: {report['protocol']}; "
        f"HQ logits {'alone' if report['hq_token_only'] else 'added to SAM logits'}. mIoU / mBIoU in %.\n\n"
        + report["table"]
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="mIoU / boundary mIoU of SAM, HQ-SAM and retrained HQ weights on ground-truth masks",
        description="Prompt every GT instance with its box; compare SAM, the base HQ-SAM and --weights.",
    )
    p.add_argument("--data", required=True, help="instance dataset, COCO instances JSON or mask folder")
    p.add_argument("--base", default=DEFAULT_SEGMENTER, help="frozen SAM-HQ: hub id, local dir or .pth")
    p.add_argument("--preset", choices=PRESETS, help="tiny random SAM-HQ base (offline smoke runs)")
    p.add_argument(
        "--weights", action="append", help="retrained HQ weights: file, RUN/best or RUN (repeatable)"
    )
    p.add_argument("--sam", help="plain SAM for the SAM row (default: the base's own frozen SAM weights)")
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
