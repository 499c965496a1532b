"""The ``hqlabel`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from hqlabel import __version__
from hqlabel.jobs.args import add_json_cap_arg, add_storage_args, resource_amount, storage_options
from hqlabel.jobs.cluster import ADDRESS_HELP
from hqlabel.platform.config import DEFAULT_DETECTOR, DEFAULT_SEGMENTER, PRECISIONS, PRESETS
from hqlabel.platform.lease import DEFAULT_TTL, LeaseError

# Errors that come from the user's input or environment: shown as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, LeaseError)


def _add_label_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="label a dataset: text prompt -> detector boxes -> HQ-SAM masks -> Parquet",
        description="Detect the --classes in every image of INPUT and write one HQ-SAM mask per instance.",
    )
    p.add_argument(
        "input",
        help="a folder of images (recursive), Parquet file/folder of shards, or COCO JSON; local or s3://",
    )
    p.add_argument(
        "--classes",
        default="",
        help='comma-separated class names, e.g. "person, bicycle"; with synonyms (the detector is prompted '
        'with them, rows are labeled with the class): "person: man, woman; car: car, truck", or a .yaml / '
        ".json file of a mapping class -> list of synonyms (or of a list of names)",
    )
    p.add_argument(
        "--prompts",
        choices=("detector", "boxes"),
        default="detector",
        help="detector: boxes from --classes; boxes: the dataset's own boxes (COCO / a boxes column)",
    )
    p.add_argument("--out", required=True, help="output folder, local or s3:// (masks/, errors/, images/)")
    p.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        help="detector hub id or local dir: Grounding DINO (default) or OWLv2, e.g. "
        "google/owlv2-base-patch16-ensemble (chosen by its config); with --preset tiny-random a family: "
        "grounding-dino or owlv2",
    )
    p.add_argument(
        "--segmenter", default=DEFAULT_SEGMENTER, help="SAM-HQ / SAM hub id, local dir or original .pth file"
    )
    for role in ("detector", "segmenter"):
        p.add_argument(
            f"--{role}-revision",
            help=f"hub commit hash, branch or tag of --{role} (default: the default branch's commit when the "
            "job starts; a resumed job reuses the commit its first run recorded)",
        )
    p.add_argument("--hq-weights", help="fine-tuned HQ-token weights (safetensors) on top of --segmenter")
    p.add_argument("--preset", choices=PRESETS, help="tiny randomly initialised models (offline smoke runs)")
    p.add_argument("--box-threshold", type=float, default=0.35, help="minimum box score (default 0.35)")
    p.add_argument("--text-threshold", type=float, default=0.25, help="minimum class token score (0.25)")
    p.add_argument("--nms-threshold", type=float, default=0.5, help="same-class box IoU merged by NMS (0.5)")
    p.add_argument(
        "--mask-nms",
        type=float,
        help="class-agnostic NMS by mask IoU, e.g. 0.8: of two masks of an image overlapping more, the "
        "lower-scored is dropped (duplicates box NMS misses; default: off)",
    )
    p.add_argument(
        "--hq-token-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="masks from the HQ token alone instead of SAM + HQ logits (default: off)",
    )
    p.add_argument(
        "--multimask",
        choices=("off", "best"),
        default="off",
        help="off: SAM's single-mask token; best: the original SysCV release's best-of-3 SAM mask + HQ",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument(
        "--num-workers", type=int, help="labeling actors, a fixed pool (default: one per GPU, or by CPUs)"
    )
    p.add_argument(
        "--max-workers",
        type=int,
        help="autoscaling pool instead: start with one actor per GPU present, grow to this many as GPU nodes "
        "join (with --device cuda, also before any has joined)",
    )
    p.add_argument("--min-workers", type=int, help="autoscaling pool: the fewest actors it keeps (default 1)")
    p.add_argument(
        "--actor-resource",
        type=resource_amount,
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="a custom Ray resource each labeling actor asks for, placing the actors on the nodes that offer "
        "it (e.g. a node type started with `ray start --resources`, or accelerator_type:A100); repeatable; "
        "refused when no node offers it",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autocast dtype of the models: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, "
        "fp16 (GPU only); weights stay fp32 (default auto)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the segmenter's image encoder (GPU-oriented; the first batch compiles, ~40 s for "
        "ViT-L; encoder batches are padded to the first one's size so that it compiles once)",
    )
    p.add_argument(
        "--preprocess",
        choices=("auto", "processor", "torch"),
        default="auto",
        help="where images are resized and normalised: processor (transformers' processors, CPU), torch (on "
        "the model's device), auto (torch on CUDA, else processor) (default auto)",
    )
    p.add_argument("--max-pixels", type=int, help="images with more pixels become error rows (100M)")
    p.add_argument(
        "--max-bytes",
        type=int,
        help="image files (or inline bytes) larger than this many bytes become error rows, unread (512 MiB)",
    )
    p.add_argument("--max-side", type=int, help="downscale longer images to this side first (1333)")
    add_json_cap_arg(p, "a COCO JSON input")
    p.add_argument("--id-column", default="image_id", help="Parquet input: image id column")
    p.add_argument("--image-column", default="image", help="Parquet input: encoded image bytes column")
    p.add_argument("--uri-column", default="uri", help="Parquet input: image reference column (s3://, paths)")
    p.add_argument("--boxes-column", default="boxes", help="Parquet input: XYXY boxes for --prompts boxes")
    p.add_argument("--labels-column", default="labels", help="Parquet input: class names of those boxes")
    p.add_argument("--coco-images", help="COCO input: image folder (default: the JSON's folder)")
    p.add_argument(
        "--allow-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="let image references (a Parquet uri, a COCO file_name, a symlink) read under PREFIX (a local "
        "folder, file:// or s3:// prefix) although it is outside the dataset; repeatable (default: only "
        "inside the dataset; others become error rows)",
    )
    p.add_argument("--shard-size", type=int, help="folder/COCO input: images per shard (1000)")
    add_storage_args(p)
    p.add_argument(
        "--overwrite", action="store_true", help="start over in --out (default: resume an earlier run there)"
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="also relabel the images with retryable error rows (transient storage errors, a broken device, "
        "an actor that died on them) of the finished shards in --out, with the same settings",
    )
    p.add_argument(
        "--max-actor-restarts",
        type=int,
        help="times one labeling actor that died (crash, OOM kill, broken device) is restarted before the "
        "job stops; a rerun resumes (default 16)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        help=f"seconds this run's lease on --out (OUT/_lease.json) outlives it if it dies; another run into "
        f"--out is refused until then (default {DEFAULT_TTL:g}, renewed every third)",
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from hqlabel.jobs.functions import label

    summary = label(
        args.input,
        out=args.out,
        classes=args.classes,
        progress=not args.no_progress,
        prompts=args.prompts,
        detector=args.detector,
        segmenter=args.segmenter,
        detector_revision=args.detector_revision,
        segmenter_revision=args.segmenter_revision,
        preset=args.preset,
        box_threshold=args.box_threshold,
        text_threshold=args.text_threshold,
        nms_threshold=args.nms_threshold,
        mask_nms=args.mask_nms,
        hq_token_only=args.hq_token_only,
        multimask=args.multimask,
        hq_weights=args.hq_weights,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        preprocess=args.preprocess,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        max_json_bytes=args.max_json_bytes,
        max_side=args.max_side,
        num_workers=args.num_workers,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        num_cpus=args.num_cpus,
        shard_size=args.shard_size,
        lease_ttl=args.lease_ttl,
        max_actor_restarts=args.max_actor_restarts,
        id_column=args.id_column,
        image_column=args.image_column,
        uri_column=args.uri_column,
        boxes_column=args.boxes_column,
        labels_column=args.labels_column,
        coco_images=args.coco_images,
        allow_prefix=args.allow_prefix,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        actor_resources=dict(args.actor_resource),
        ray_address=args.address,
    )
    print(summary)
    return 0


def _numbers(text: str, count: tuple[int, ...], what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in count:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {' or '.join(map(str, count))} numbers")
    return values


def _box(text: str) -> tuple[float, ...]:
    return _numbers(text, (4,), "box")


def _point(text: str) -> tuple[float, float, int]:
    values = _numbers(text, (2, 3), "point")
    return values[0], values[1], int(values[2]) if len(values) == 3 else 1


def _add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="HQ-SAM masks for boxes or clicks on one image (mask + overlay PNGs)",
        description="Segment the objects given by --box (one object each) or --point clicks (one object).",
    )
    p.add_argument("image", help="the image file")
    p.add_argument("--box", type=_box, action="append", default=[], help="x0,y0,x1,y1 pixels (repeatable)")
    p.add_argument(
        "--point", type=_point, action="append", default=[], help="x,y[,label] (label 1 fg, 0 bg; repeatable)"
    )
    p.add_argument("--out", default=".", help="output folder (default: current)")
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="SAM-HQ / SAM hub id, dir or .pth file")
    p.add_argument("--hq-weights", help="fine-tuned HQ-token weights (safetensors)")
    p.add_argument("--preset", choices=PRESETS, help="tiny randomly initialised model (offline)")
    p.add_argument("--hq-token-only", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--multimask", choices=("off", "best", "all"), default="off")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-pixels", type=int, help="refuse images with more pixels (100M, as label)")
    p.add_argument("--max-bytes", type=int, help="refuse image files larger than this, unread (512 MiB)")
    p.set_defaults(func=_segment)


def _segment(args: argparse.Namespace) -> int:
    from hqlabel.jobs.segment import run_segment
    from hqlabel.jobs.spec import SegmentJobSpec

    spec = SegmentJobSpec(
        image=args.image,
        out=args.out,
        boxes=args.box,
        points=args.point,
        segmenter=args.segmenter,
        preset=args.preset,
        hq_weights=args.hq_weights,
        hq_token_only=args.hq_token_only,
        multimask=args.multimask,
        device=args.device,
        **{
            k: v
            for k, v in {"max_pixels": args.max_pixels, "max_bytes": args.max_bytes}.items()
            if v is not None
        },
    )
    print(run_segment(spec))
    return 0


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="progress of a labeling job's output folder (shards, instances, errors)"
    )
    p.add_argument("out", help="the job's --out folder (local or s3://)")
    add_storage_args(p)
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from hqlabel.jobs.status import job_status

    print(job_status(args.out, storage_options(args)))
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a labeling job's output folder as COCO JSON, YOLO-seg polygons or mask PNGs",
        description="Convert the labels folder LABELS (a label --out) into a training format, streaming.",
    )
    p.add_argument("labels", help="the labeling job's --out folder (local or s3://)")
    p.add_argument(
        "--format",
        required=True,
        choices=("coco", "yolo-seg", "masks-png"),
        help="coco: one instances JSON (RLE masks); yolo-seg: labels/*.txt polygons + data.yaml; "
        "masks-png: one 0/255 PNG per instance",
    )
    p.add_argument("--out", required=True, help="coco: the JSON file; otherwise a folder (local or s3://)")
    p.add_argument(
        "--min-part-area",
        type=float,
        default=4.0,
        help="yolo-seg: drop mask parts with a smaller polygon area in pixels (default 4)",
    )
    add_storage_args(p)
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from hqlabel.jobs.export import run_export

    try:
        print(run_export(args))
    except ImportError as e:  # a missing optional extra (OpenCV for yolo-seg): its install hint, one line
        if args.verbose:
            raise
        print(f"hqlabel: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_show_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="look at a labeling job's output: overlay PNGs, contact sheets and a static HTML gallery",
        description="Draw the masks of LABELS (a label --out) on their images and write DIR/index.html.",
    )
    p.add_argument("labels", help="the labeling job's --out folder (local or s3://)")
    p.add_argument("--out", required=True, help="local folder for overlays/, sheets/ and index.html")
    p.add_argument("--images", help="the job's input, if it has moved (default: job.json's spec.input)")
    p.add_argument("--limit", type=int, default=200, help="at most this many images (default 200)")
    add_storage_args(p)
    p.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from hqlabel.jobs.show import run_show

    print(run_show(args))
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write synthetic demo images (shapes) to try the pipeline")
    p.add_argument("out", help="folder to write the images to")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from hqlabel.platform.demo import make_demo_images

    paths = make_demo_images(args.out, args.num_images, seed=args.seed)
    print(f"wrote {len(paths)} demo images to {args.out} (classes: circle, square, triangle)")
    return 0


def _add_submit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run an hqlabel command on a Ray cluster as a Ray Job (needs hqlabel[cluster])",
        description="Submit `hqlabel COMMAND ...` through the cluster's Ray Jobs API and follow its logs; "
        "exit 0 when the job SUCCEEDED. Example: hqlabel submit --address http://HEAD:8265 -- label s3://in "
        "--classes cat --out s3://out",
    )
    p.add_argument("--address", required=True, help="the cluster's Jobs API, e.g. http://HEAD:8265")
    p.add_argument(
        "--working-dir",
        help="local folder (or remote zip URI) shipped as the job's working dir (default none)",
    )
    p.add_argument("--pip", nargs="+", default=[], metavar="PKG", help="extra pip requirements for the job")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the hqlabel command")
    p.set_defaults(func=_submit)


def _submit(args: argparse.Namespace) -> int:
    from hqlabel.jobs.submit import submit

    try:
        status = submit(args.address, args.cmd, args.working_dir, args.pip, wait=not args.no_wait)
    except ImportError as e:  # the cluster extra is missing: its install hint, one line
        if args.verbose:
            raise
        print(f"hqlabel: error: {e}", file=sys.stderr)
        return 2
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def _add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list the Ray Jobs of a cluster (needs hqlabel[cluster])")
    p.add_argument("--address", required=True, help="the cluster's Jobs API, e.g. http://HEAD:8265")
    p.set_defaults(func=_jobs)


def _jobs(args: argparse.Namespace) -> int:
    from hqlabel.jobs.submit import jobs_table

    try:
        print(jobs_table(args.address))
    except ImportError as e:
        if args.verbose:
            raise
        print(f"hqlabel: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hqlabel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hqlabel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_label_parser(sub)
    _add_segment_parser(sub)
    _add_status_parser(sub)
    _add_export_parser(sub)
    _add_show_parser(sub)
    _add_demo_parser(sub)
    _add_submit_parser(sub)
    _add_jobs_parser(sub)
    from hqlabel.jobs import curate, evaluate, import_gt, synthetic, train

    curate.add_parser(sub)
    import_gt.add_parser(sub)
    synthetic.add_synthetic_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def _one_line(error: Exception) -> str:
    """A user error as one line: pydantic's validation errors become "field: problem; ..."."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            (".".join(str(part) for part in err["loc"]) + ": " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ")
            for err in error.errors()
        )
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hqlabel`` command: 0 done, 1 a job that did not succeed, 2 a user error (one line on stderr),
    130 interrupted (Ctrl-C: one line, no traceback, wherever it lands, imports included)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # A second Ctrl-C while Ray shuts down (at exit) would end in a traceback: this one is enough.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("hqlabel: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:  # our progress bar and summary say what Ray Data's execution logs would
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"hqlabel: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        if args.verbose or "pip install" not in str(e):  # only a missing extra, named with its install hint
            raise
        print(f"hqlabel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
