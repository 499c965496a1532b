"""Relabeling only some shards of a labels folder: which shards are under a quality threshold, a Parquet input
of their images, and the new labels version assembled from the old one and the relabeled shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["assemble", "selection_input", "shard_quality"]


def shard_quality(labels: Path) -> dict[str, float | None]:
    """Per shard of a labels folder: the mean HQ-SAM pred IoU of its masks (None: no masks)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hqlabel.platform.sources import files_by_shard

    images = files_by_shard([str(p) for p in sorted((labels / "images").glob("part-*.parquet"))])
    masks = files_by_shard([str(p) for p in sorted((labels / "masks").glob("part-*.parquet"))])
    quality: dict[str, float | None] = {}
    for shard in sorted(images):
        if shard not in masks:
            quality[shard] = None
            continue
        values = pq.read_table(masks[shard], columns=["pred_iou"])["pred_iou"]
        quality[shard] = float(pc.mean(values).as_py()) if len(values) else None
    return quality


def selection_input(old: Path, shards: list[str], into: Path) -> None:
    """A Parquet input of the images of ``shards`` of the labels folder ``old`` (ids and encoded bytes, read
    through the job's own input), one file per shard in shard order: shard k of the relabeling job is
    ``shards[k]`` of ``old``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hqlabel.platform.labels import LabelsFolder
    from hqlabel.platform.sources import job_images

    folder = LabelsFolder(str(old))
    reader = job_images(folder.uri, folder.job.get("spec", {}), None, folder.options)
    into.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(shards):
        table = pq.read_table(old / "images" / f"part-{shard}.parquet", columns=["image_id", "error_stage"])
        wanted = set(table.filter(pc.is_null(table["error_stage"]))["image_id"].to_pylist())
        rows = sorted(
            (image_id, data) for image_id, data, _ in reader.read(shard, wanted) if data is not None
        )
        pq.write_table(
            pa.table({"image_id": [r[0] for r in rows], "image": [r[1] for r in rows]}),
            into / f"part-{index:05d}.parquet",
        )


def assemble(old: Path, relabeled: Path, new: Path, shards: list[str]) -> None:
    """``new`` = ``old`` with its ``shards`` replaced by the relabeling job's (renamed back to the old shard
    ids): every image is found through the old job's input listing (its ``job.json`` and manifest)."""
    from hqlabel.platform.sources import files_by_shard

    staging = new.with_name(f".{new.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("masks", "errors", "images"):
        (staging / name).mkdir()
        ours = files_by_shard([str(p) for p in (relabeled / name).glob("part-*.parquet")])
        for file in sorted((old / name).glob("part-*.parquet")):
            shard = file.stem.removeprefix("part-")
            if shard not in shards:
                shutil.copyfile(file, staging / name / file.name)
        for index, shard in enumerate(shards):
            source = ours.get(f"{index:05d}")
            if source is not None:
                shutil.copyfile(source, staging / name / f"part-{shard}.parquet")
    shutil.copyfile(old / "_manifest.json", staging / "_manifest.json")
    job = json.loads((old / "job.json").read_text())
    relabel_job = json.loads((relabeled / "job.json").read_text())
    job["relabel"] = {
        "from": str(old),
        "shards": shards,
        "job": str(relabeled),
        "labeler": relabel_job.get("spec", {}).get("labeler"),
        "models": relabel_job.get("models"),
    }
    (staging / "job.json").write_text(json.dumps(job, indent=2))
    sidecar = json.loads((relabeled / "weights_version.json").read_text())
    sidecar["shards"] = shards
    sidecar["kept_shards"] = {
        "from": str(old),
        "weights_version": json.loads((old / "weights_version.json").read_text())["weights_version"],
    }
    (staging / "weights_version.json").write_text(json.dumps(sidecar, indent=2))
    shutil.rmtree(new, ignore_errors=True)
    os.replace(staging, new)
