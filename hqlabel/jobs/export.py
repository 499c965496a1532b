"""``hqlabel export LABELS --format coco|yolo-seg|masks-png --out PATH``: a labeling job's output folder in
a training-ready format. The formats themselves live in ``hqlabel.platform.export``."""

from __future__ import annotations

import argparse

from hqlabel.jobs.args import storage_options
from hqlabel.platform.export import ExportSummary, export_labels


def run_export(args: argparse.Namespace) -> ExportSummary:
    """Run the export the parsed ``hqlabel export`` arguments describe.

    Raises:
        ValueError: ``--min-part-area`` is negative, or the format is unknown.
        FileNotFoundError: LABELS is not a labels folder.
        ValueError: a mask of LABELS declares more pixels than its job's ``--max-pixels`` (yolo-seg,
            masks-png: refused before decoding).
    """
    if args.min_part_area < 0:
        raise ValueError(f"--min-part-area must be >= 0 pixels, got {args.min_part_area}")
    return export_labels(
        args.labels,
        args.out,
        args.format,
        storage_options(args),
        min_part_area=args.min_part_area,
    )
