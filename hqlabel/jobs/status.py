"""``hqlabel status OUT``: how far a labeling job has got, from its manifest and completion markers."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions
from hqlabel.workers.writer import done_shards, read_markers


@dataclass
class JobStatus:
    out: str
    shards_total: int
    shards_done: int
    images_total: int
    images_done: int
    instances: int
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    retryable_errors: int = 0
    pending: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        errors = ", ".join(f"{stage} {n}" for stage, n in sorted(self.errors_by_stage.items())) or "none"
        failed = sum(self.errors_by_stage.values())  # one error row per image that failed
        done = f"{self.images_done}/{self.images_total}"
        images = f"{done} labeled"
        if failed:  # the images done include those that failed
            images = f"{done} done: {self.images_done - failed} labeled, {failed} failed"
        lines = [
            f"{self.out}",
            f"  shards:    {self.shards_done}/{self.shards_total} done, {len(self.pending)} pending",
            f"  images:    {images}",
            f"  instances: {self.instances}",
            f"  errors:    {sum(self.errors_by_stage.values())} ({errors})",
        ]
        if self.retryable_errors:
            lines.append(
                f"  retryable: {self.retryable_errors} (rerun the same `hqlabel label` with --retry-errors)"
            )
        if self.pending:
            shown = ", ".join(self.pending[:10]) + (" ..." if len(self.pending) > 10 else "")
            lines.append(f"  pending:   {shown} (rerun the same `hqlabel label` command to resume)")
        return "\n".join(lines)


def job_status(out: str, options: StorageOptions = StorageOptions()) -> JobStatus:
    """Count finished and pending shards, instances and errors by stage of the job in ``out``.

    Raises:
        FileNotFoundError: ``out`` holds no labeling job.
    """
    try:
        manifest = json.loads(storage.read_bytes(storage.join(out, "_manifest.json"), options))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{out} holds no labeling job (no _manifest.json); pass a label --out") from e
    status = JobStatus(out, len(manifest["shards"]), 0, 0, 0, 0)
    errors: Counter[str] = Counter()
    done = done_shards(out, options)  # one listing, then the markers of those shards, many at a time
    markers = read_markers(out, [s["id"] for s in manifest["shards"] if s["id"] in done], options)
    for shard in manifest["shards"]:
        status.images_total += shard["num_images"]
        marker = markers.get(shard["id"])
        if marker is None:
            status.pending.append(shard["id"])
            continue
        status.shards_done += 1
        status.images_done += marker["images"]
        status.instances += marker["instances"]
        errors.update(marker["errors_by_stage"])
        status.retryable_errors += marker.get("retryable_errors", 0)  # older markers: none
    status.errors_by_stage = dict(errors)
    return status
