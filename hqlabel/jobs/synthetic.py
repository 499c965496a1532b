"""``hqlabel synth-data OUT``: write the synthetic fine-structure dataset (``hqlabel.training.synthetic``) as
an instance dataset (kind ``"synthetic"``), for training smoke runs without downloads."""

from __future__ import annotations

import argparse

from hqlabel.jobs.args import add_storage_args, storage_options


def add_synthetic_parser(sub: argparse._SubParsersAction) -> None:
    """The ``synth-data`` subcommand."""
    p = sub.add_parser(
        "synth-data",
        help="write a synthetic fine-structure instance dataset (thin lines, rings, lattices; exact masks)",
        description="Draw COUNT images of thin lines, rings / shapes with holes and lattices / fences on "
        "noisy backgrounds, with exact masks, and write them as an instance dataset to OUT.",
    )
    p.add_argument("out", help="the instance dataset folder to write (local or s3://)")
    p.add_argument("--count", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image, 1-3 (default 3)")
    add_storage_args(p)
    p.set_defaults(func=_synth_data)


def _synth_data(args: argparse.Namespace) -> int:
    from hqlabel.training.synthetic import write_fine_structure_dataset

    manifest = write_fine_structure_dataset(
        args.out,
        args.count,
        args.size,
        args.seed,
        storage_options(args),
        max_objects=args.max_objects,
    )
    print(
        f"wrote {manifest['num_images']} synthetic images, {manifest['num_instances']} instances "
        f"({', '.join(manifest['labels'])}) to {args.out}"
    )
    return 0
