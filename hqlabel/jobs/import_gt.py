"""``hqlabel import-gt SOURCE --out DIR``: ground-truth masks (a COCO instances JSON, a Label Studio JSON
export, or a DIS5K / ThinObject-5K mask folder) -> an instance dataset (``hqlabel.platform.instances``) for
``hqlabel train`` / ``hqlabel eval``. The readers live in ``hqlabel.platform.groundtruth`` (COCO, mask
folder) and ``hqlabel.formats.label_studio``."""

from __future__ import annotations

import argparse
from typing import Any

from hqlabel.jobs.args import add_json_cap_arg, add_storage_args, storage_options
from hqlabel.platform import groundtruth, storage
from hqlabel.platform.instances import write_instances
from hqlabel.platform.storage import StorageOptions

SOURCE_FORMATS = ("coco", "label-studio", "mask-folder")


def run_import_gt(
    source: str,
    out: str,
    *,
    images: str | None = None,
    label: str = "object",
    include_crowd: bool = False,
    image_root_url: str | None = None,
    source_format: str | None = None,
    options: StorageOptions = StorageOptions(),
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> dict[str, Any]:
    """Write the ground truth at ``source`` as an instance dataset at ``out`` (both local or ``s3://``).

    Args:
        source: a COCO instances ``.json`` (kind ``"coco"``), a Label Studio JSON export (kind
            ``"label-studio"``) or a mask folder (kind ``"mask-folder"``).
        images: COCO, Label Studio: the folder of the images (default: the JSON's folder).
        label: mask folder only: the class name of every mask.
        include_crowd: COCO only: keep ``iscrowd`` annotations.
        image_root_url: Label Studio only: the prefix of the tasks' image URLs, removed to get the image
            path under ``images`` (default ``/data/local-files/?d=``).
        source_format: ``"coco"``, ``"label-studio"`` or ``"mask-folder"``; None: a folder is a mask folder,
            a ``.json`` file a Label Studio export when it is a JSON list, else COCO.
        max_json_bytes: COCO, Label Studio: refuse a larger JSON file (``--max-json-bytes``) before reading.

    Returns:
        The dataset's ``dataset.json`` document; ``provenance.skipped`` holds the reader's counts.

    Raises:
        FileNotFoundError: ``source`` (or an image) does not exist.
        ValueError: an option given for another kind, malformed input (see the readers), or ``out`` already
            holds an instance dataset.
        ImportError: a Label Studio export without label-studio-converter installed (the install hint).
    """
    stats: dict[str, int] = {}
    # recorded in dataset.json: absolute, so that it means the same from any directory ("gt.json" too)
    source, out, images = storage.absolute(source), storage.absolute(out), storage.absolute(images)
    kind = source_format or _detect_kind(source, options)
    if kind not in SOURCE_FORMATS:
        raise ValueError(f"unknown ground-truth format {kind!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if image_root_url is not None and kind != "label-studio":
        raise ValueError(f"--image-root-url is for Label Studio exports; {source} is read as {kind}")
    if kind == "label-studio":
        if label != "object" or include_crowd:
            raise ValueError(
                "--label and --include-crowd are not for Label Studio exports; their labels are the results' "
                "brush / polygon labels"
            )
        from hqlabel.formats.label_studio import DEFAULT_IMAGE_ROOT_URL, read_label_studio_instances

        image_root_url = DEFAULT_IMAGE_ROOT_URL if image_root_url is None else image_root_url
        provenance: dict[str, Any] = {
            "images_root": images or source.rstrip("/").rsplit("/", 1)[0],
            "image_root_url": image_root_url,
        }
        reader = read_label_studio_instances(
            source,
            options,
            images_root=images,
            image_root_url=image_root_url,
            stats=stats,
            max_json_bytes=max_json_bytes,
        )
    elif kind == "coco":
        if label != "object":
            raise ValueError("--label is for mask folders; a COCO file's labels are its category names")
        provenance = {"images_root": images or source.rstrip("/").rsplit("/", 1)[0]}
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
                "--images is for COCO and Label Studio files, --include-crowd for COCO; a mask folder "
                "holds its own images"
            )
        if not storage.exists(source, options):
            raise FileNotFoundError(
                f"{source} does not exist; pass a COCO instances .json or a mask folder (im/ + gt/)"
            )
        provenance = {"label": label}
        reader = groundtruth.read_mask_folder(source, options, label=label, stats=stats)
    provenance["include_crowd"] = include_crowd
    provenance["counts"] = stats  # filled in while the reader runs; written after it ends
    return write_instances(reader, out, kind=kind, source=source, provenance=provenance, options=options)


def _detect_kind(source: str, options: StorageOptions) -> str:
    """``mask-folder`` unless ``source`` ends in ``.json``; then ``label-studio`` when the document is a JSON
    list (its first non-blank byte is ``[``), else ``coco``. Reads at most the first 4 KiB."""
    if not source.lower().endswith(".json"):
        return "mask-folder"
    fs, path = storage.resolve(source, options)
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(4096)
    except OSError:  # missing, unreadable: the COCO reader reports it (with its retries and messages)
        return "coco"
    return "label-studio" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else "coco"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``import-gt`` subcommand."""
    p = sub.add_parser(
        "import-gt",
        help="import ground-truth masks (COCO JSON, a Label Studio JSON export or an im/ + gt/ mask folder) "
        "as an instance dataset",
        description="Convert SOURCE, a COCO instances JSON (polygon or RLE segmentations), a Label Studio "
        "JSON export (brush and polygon results) or a DIS5K / ThinObject-5K mask folder (ROOT/im/NAME.jpg + "
        "ROOT/gt/NAME.png), into an instance dataset.",
    )
    p.add_argument("source", help="COCO .json, Label Studio export .json or mask folder, local or s3://")
    p.add_argument(
        "--format",
        dest="source_format",
        choices=SOURCE_FORMATS,
        help="what SOURCE is (default: a folder is a mask folder; a .json holding a list is a Label Studio "
        "export, else COCO)",
    )
    p.add_argument("--out", required=True, help="the instance dataset folder to write (local or s3://)")
    p.add_argument("--images", help="COCO, Label Studio: folder of the images (default: the JSON's folder)")
    p.add_argument(
        "--image-root-url",
        help="Label Studio: prefix of the tasks' image URLs, removed to get the path under --images "
        "(default /data/local-files/?d=); tasks exported by hqlabel carry their image id and need none",
    )
    p.add_argument("--label", default="object", help="mask folder: class name of the masks (object)")
    p.add_argument("--include-crowd", action="store_true", help="COCO: keep iscrowd annotations")
    add_json_cap_arg(p, "a COCO or Label Studio JSON")
    add_storage_args(p)
    p.set_defaults(func=_import_gt)


def _import_gt(args: argparse.Namespace) -> int:
    manifest = run_import_gt(
        args.source,
        args.out,
        images=args.images,
        label=args.label,
        include_crowd=args.include_crowd,
        image_root_url=args.image_root_url,
        source_format=args.source_format,
        options=storage_options(args),
        max_json_bytes=args.max_json_bytes,
    )
    print(
        f"imported {manifest['num_images']} images, {manifest['num_instances']} instances "
        f"({manifest['kind']}) to {args.out}"
    )
    return 0
