"""``hqlabel export LABELS --format coco|yolo-seg|masks-png|label-studio --out PATH``: a labeling job's
output folder in a training-ready format, or as Label Studio tasks to review. The formats themselves live in
``hqlabel.formats``, one module each."""

from __future__ import annotations

import argparse

from hqlabel.formats import ExportSummary


def run_export(args: argparse.Namespace) -> ExportSummary:
    """Run the export the parsed ``hqlabel export`` arguments describe.

    Raises:
        ValueError: ``--min-part-area`` is negative, the format is unknown, or an option is given to a format
            that does not take it.
        FileNotFoundError: LABELS is not a labels folder.
        ValueError: a mask of LABELS declares more pixels than its job's ``--max-pixels`` (yolo-seg,
            masks-png: refused before decoding).
    """
    from hqlabel.jobs.functions import export

    return export(
        args.labels,
        out=args.out,
        format=args.format,
        min_part_area=args.min_part_area,
        image_root_url=args.image_root_url,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
    )
