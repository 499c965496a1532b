"""``hqlabel show LABELS --out DIR``: look at a labeling job's output: overlay PNGs, one contact sheet per
shard and a static ``index.html``. The drawing and the page live in ``hqlabel.review.gallery``."""

from __future__ import annotations

import argparse

from hqlabel.jobs.args import storage_options
from hqlabel.review.gallery import GallerySummary, write_gallery


def run_show(args: argparse.Namespace) -> GallerySummary:
    """Write the gallery the parsed ``hqlabel show`` arguments describe.

    Raises:
        ValueError: ``--limit`` below 1, or an ``s3://`` ``--out``.
        FileNotFoundError: LABELS is not a labels folder, or the job's input (``--images``) is gone.
    """
    return write_gallery(
        args.labels,
        args.out,
        images=args.images,
        limit=args.limit,
        options=storage_options(args),
    )
