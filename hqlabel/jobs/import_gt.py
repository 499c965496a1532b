"""``hqlabel import-gt SOURCE --out DIR``: ground-truth masks (COCO instances JSON or a DIS5K / ThinObject-5K
mask folder) -> an instance dataset (``hqlabel.platform.instances``) for ``hqlabel train`` / ``hqlabel eval``.
The readers live in ``hqlabel.platform.groundtruth``."""

from __future__ import annotations

import argparse
from typing import Any

from hqlabel.jobs.args import add_json_cap_arg, add_storage_args, storage_options
from hqlabel.platform import groundtruth, storage
from hqlabel.platform.instances import write_instances
from hqlabel.platform.storage import StorageOptions


def run_import_gt(
    source: str,
    out: str,
    *,
    images: str | None = None,
    label: str = "object",
    include_crowd: bool = False,
    options: StorageOptions = StorageOptions(),
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> dict[str, Any]:
    """Write the ground truth at ``source`` as an instance dataset at ``out`` (both local or ``s3://``).

    Args:
        source: a COCO instances ``.json`` (kind ``"coco"``) or a mask folder (kind ``"mask-folder"``).
        images: COCO only: the folder of the ``file_name``s (default: the JSON's folder).
        label: mask folder only: the class name of every mask.
        include_crowd: COCO only: keep ``iscrowd`` annotations.
        max_json_bytes: COCO only: refuse a larger JSON file (``--max-json-bytes``) before reading it.

    Returns:
        The dataset's ``dataset.json`` document; ``provenance.skipped`` holds the reader's counts.

    Raises:
        FileNotFoundError: ``source`` (or an image) does not exist.
        ValueError: ``--images`` / ``--label`` given for the other kind, malformed input (see the readers),
            or ``out`` already holds an instance dataset.
    """
    stats: dict[str, int] = {}
    # recorded in dataset.json: absolute, so that it means the same from any directory ("gt.json" too)
    source, out, images = storage.absolute(source), storage.absolute(out), storage.absolute(images)
    if source.lower().endswith(".json"):
        if label != "object":
            raise ValueError("--label is for mask folders; a COCO file's labels are its category names")
        kind = "coco"
        provenance: dict[str, Any] = {"images_root": images or source.rstrip("/").rsplit("/", 1)[0]}
        reader = groundtruth.read_coco_instances(
            source,
            options,
            images_root=images,
            include_crowd=include_crowd,
            stats=stats,
            max_json_bytes=max_json_bytes,
        )
    else:
        if images is not None or include_crowd:
            raise ValueError(
                "--images and --include-crowd are for COCO files; a mask folder holds its own images"
            )
        if not storage.exists(source, options):
            raise FileNotFoundError(
                f"{source} does not exist; pass a COCO instances .json or a mask folder (im/ + gt/)"
            )
        kind = "mask-folder"
        provenance = {"label": label}
        reader = groundtruth.read_mask_folder(source, options, label=label, stats=stats)
    provenance["include_crowd"] = include_crowd
    provenance["counts"] = stats  # filled in while the reader runs; written after it ends
    return write_instances(reader, out, kind=kind, source=source, provenance=provenance, options=options)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``import-gt`` subcommand."""
    p = sub.add_parser(
        "import-gt",
        help="import ground-truth masks (COCO JSON or an im/ + gt/ mask folder) as an instance dataset",
        description="Convert SOURCE, a COCO instances JSON (polygon or RLE segmentations) or a DIS5K / "
        "ThinObject-5K mask folder (ROOT/im/NAME.jpg + ROOT/gt/NAME.png), into an instance dataset.",
    )
    p.add_argument("source", help="COCO instances .json or mask folder, local or s3://")
    p.add_argument("--out", required=True, help="the instance dataset folder to write (local or s3://)")
    p.add_argument("--images", help="COCO: folder of the file_names (default: the JSON's folder)")
    p.add_argument("--label", default="object", help="mask folder: class name of the masks (object)")
    p.add_argument("--include-crowd", action="store_true", help="COCO: keep iscrowd annotations")
    add_json_cap_arg(p, "a COCO JSON")
    add_storage_args(p)
    p.set_defaults(func=_import_gt)


def _import_gt(args: argparse.Namespace) -> int:
    manifest = run_import_gt(
        args.source,
        args.out,
        images=args.images,
        label=args.label,
        include_crowd=args.include_crowd,
        options=storage_options(args),
        max_json_bytes=args.max_json_bytes,
    )
    print(
        f"imported {manifest['num_images']} images, {manifest['num_instances']} instances "
        f"({manifest['kind']}) to {args.out}"
    )
    return 0
