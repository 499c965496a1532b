"""The ``hqlabel`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from hqlabel import __version__
from hqlabel.jobs.args import (
    add_json_cap_arg,
    add_model_args,
    add_storage_args,
    resource_amount,
    storage_options,
)
from hqlabel.jobs.cluster import ADDRESS_HELP
from hqlabel.platform.config import DEFAULT_SEGMENTER, PRESETS
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
    add_model_args(p)
    p.add_argument("--box-threshold", type=float, default=0.35, help="minimum box score (default 0.35)")
    p.add_argument("--text-threshold", type=float, default=0.25, help="minimum class token score (0.25)")
    p.add_argument("--nms-threshold", type=float, default=0.5, help="same-class box IoU merged by NMS (0.5)")
    p.add_argument(
        "--mask-nms",
        type=float,
        help="class-agnostic NMS by mask IoU, e.g. 0.8: of two masks of an image overlapping more, the "
        "lower-scored is dropped (duplicates box NMS misses; default: off)",
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
    p.add_argument("--max-pixels", type=int, help="images with more pixels become error rows (100M)")
    p.add_argument(
        "--max-bytes",
        type=int,
        help="image files (or inline bytes) larger than this many bytes become error rows, unread (512 MiB)",
    )
    p.add_argument("--max-side", type=int, help="downscale longer images to this side first (1333)")
    p.add_argument(
        "--tile",
        type=int,
        metavar="SIZE",
        help="small objects in large images: images whose longer side is over SIZE pixels keep their full "
        "resolution and the detector runs on overlapping SIZE x SIZE tiles (one detector pass per tile); "
        "masks stay whole, at the original resolution (default: no tiling)",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        metavar="FRACTION",
        help="with --tile: share of a tile its neighbour also covers, in [0, 0.9] (default 0.2)",
    )
    p.add_argument(
        "--tile-full-image",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --tile: also detect on the whole downscaled image, for objects larger than a tile "
        "(default: on)",
    )
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
    p.add_argument(
        "--service",
        action="store_true",
        help="label on the warm labeling service (`hqlabel serve start`) instead of starting model actors: "
        "its cluster is --address, else the one serve start recorded; refused when none runs or its models "
        "differ from this job's (--classes, --prompts and the thresholds are the job's own)",
    )
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
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tile_full_image=args.tile_full_image,
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
        service=args.service,
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
    p.add_argument(
        "--service",
        action="store_true",
        help="segment on the warm labeling service (`hqlabel serve start`): no model loaded here; refused "
        "when none runs or its segmenter differs",
    )
    p.add_argument(
        "--address", help="with --service: the service's Ray cluster (default: the one serve start recorded)"
    )
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
        service=args.service,
        ray_address=args.address,
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
    from hqlabel.formats import FORMATS

    p = sub.add_parser(
        "export",
        help="export a labeling job's output folder as COCO JSON, YOLO-seg polygons, mask PNGs or "
        "Label Studio tasks",
        description="Convert the labels folder LABELS (a label --out) into a training format, streaming.",
    )
    p.add_argument("labels", help="the labeling job's --out folder (local or s3://)")
    p.add_argument(
        "--format",
        required=True,
        choices=tuple(FORMATS),
        help="coco: one instances JSON (RLE masks); yolo-seg: labels/*.txt polygons + data.yaml; "
        "masks-png: one 0/255 PNG per instance; label-studio: tasks JSON with brush pre-annotations + "
        "its labeling config XML",
    )
    p.add_argument(
        "--out", required=True, help="coco, label-studio: the JSON file; otherwise a folder (local or s3://)"
    )
    p.add_argument(
        "--min-part-area",
        type=float,
        help="yolo-seg: drop mask parts with a smaller polygon area in pixels (default 4)",
    )
    p.add_argument(
        "--image-root-url",
        help="label-studio: prefix of every task's image URL, followed by the image id (default "
        "/data/local-files/?d=, Label Studio's local file serving; e.g. https://host/images/ or s3://bucket/)",
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


def _add_flywheel_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flywheel",
        help="the loop as one resumable pipeline: label, curate (review), train, gate, relabel, compare",
        description="Run or inspect one turn of the flywheel described by FLYWHEEL.yaml; every stage "
        "leaves a marker in the flywheel's dir and is skipped once done: a rerun resumes where it stopped",
    )
    fly = p.add_subparsers(dest="flywheel_command", required=True)
    run = fly.add_parser("run", help="run the stages not done yet (resume)")
    run.add_argument("flywheel", help="the FLYWHEEL.yaml file")
    run.add_argument(
        "--address",
        help="local (default): stages run here on a local Ray; http://HEAD:8265: the driver and every stage "
        "run as Ray Jobs on that cluster (Jobs API), so this machine may disconnect",
    )
    run.add_argument("--no-wait", action="store_true", help="with a Jobs API --address: submit and return")
    run.set_defaults(func=_flywheel_run)
    status = fly.add_parser("status", help="each stage's state, the gate's verdict, the current weights")
    status.add_argument("flywheel", help="the FLYWHEEL.yaml file")
    status.set_defaults(func=_flywheel_status)
    stage = fly.add_parser("stage", help="run one stage (what each Ray Job of a cluster run executes)")
    stage.add_argument("flywheel", help="the FLYWHEEL.yaml file")
    stage.add_argument("stage", help="label, curate, train, gate, relabel or compare")
    stage.set_defaults(func=_flywheel_stage)


def _flywheel_run(args: argparse.Namespace) -> int:
    from hqlabel.jobs.flywheel import run_flywheel

    address = None if args.address in (None, "local") else args.address
    if address is not None and not address.startswith(("http://", "https://")):
        raise ValueError(
            f"--address {address}: give local or a cluster's Jobs API (http://HEAD:8265); a flywheel started "
            "on a cluster node joins that cluster through RAY_ADDRESS"
        )
    if args.no_wait and (address is None or not address.startswith(("http://", "https://"))):
        raise ValueError("--no-wait needs a cluster's Jobs API --address (http://HEAD:8265)")
    result = run_flywheel(args.flywheel, address=address, wait=not args.no_wait)
    if isinstance(result, str):  # the driver job's status
        return 0 if result in ("SUCCEEDED", "PENDING") else 1
    return 0


def _flywheel_status(args: argparse.Namespace) -> int:
    from hqlabel.jobs.flywheel import flywheel_status, load_flywheel

    print(flywheel_status(load_flywheel(args.flywheel))["text"])
    return 0


def _flywheel_stage(args: argparse.Namespace) -> int:
    from hqlabel.jobs.flywheel import RANDOM_WARNING, load_flywheel, run_stage

    spec = load_flywheel(args.flywheel)
    if spec.models.preset is not None:
        print(RANDOM_WARNING)
    marker = run_stage(spec, args.stage)
    print(f"stage {args.stage}: {marker['status']}")
    return 0


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="the model registry: HQ-weights versions, their lineage and gates; promote or roll back",
        description="List, promote or roll back the HQ-weights versions of a registry (a flywheel's "
        "DIR/registry by default).",
    )
    models = p.add_subparsers(dest="models_command", required=True)
    for name, text in (
        ("list", "every version: kind, status, validation scores, labels it was trained on"),
        ("show", "one version's full record (lineage, gates) as JSON"),
        ("promote", "make VERSION the current weights"),
        ("rollback", "make the previously current version (or --to VERSION) current again"),
    ):
        q = models.add_parser(name, help=text)
        q.add_argument("--registry", required=True, help="the registry folder (e.g. FLYWHEEL_DIR/registry)")
        if name in ("show", "promote"):
            q.add_argument("version", help="a version id, e.g. w2")
        if name == "promote":
            q.add_argument(
                "--by", default="manual", help="who or what promotes it (recorded; default manual)"
            )
        if name == "rollback":
            q.add_argument("--to", help="the version to make current (default: the one before the current)")
        q.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hqlabel.training.registry import Registry

    if not Path(args.registry).is_dir():
        raise NotADirectoryError(f"--registry {args.registry}: no such folder (a flywheel's DIR/registry)")
    registry = Registry(args.registry)
    if args.models_command == "list":
        print(registry.table())
    elif args.models_command == "show":
        print(json.dumps({**registry.get(args.version), "current": registry.current()}, indent=2))
    elif args.models_command == "promote":
        registry.promote(args.version, by=args.by)
        print(f"current weights: {args.version}")
    else:
        print(f"current weights: {registry.rollback(args.to)} (rolled back)")
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
    _add_flywheel_parser(sub)
    _add_models_parser(sub)
    from hqlabel.jobs import curate, evaluate, import_gt, review, service, synthetic, train

    curate.add_parser(sub)
    review.add_parser(sub)
    import_gt.add_parser(sub)
    synthetic.add_synthetic_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    service.add_parser(sub)
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
