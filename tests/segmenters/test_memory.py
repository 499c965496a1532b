"""Many prompts on one image with a real-size decoder: chunked decoding is exact and bounds peak memory.
The last test: upsampling masks to a large image stays within ``iter_masks``' float32 budget.

The model is ``tiny_random_sam_hq(image_size=1024, patch_size=16, decoder_hidden=256)``: a tiny encoder but
the released models' decoder shapes (256 x 64 x 64 image embeddings, 256 x 256 low-res masks), so decoder
activations are as large as in production. Both checks run in one subprocess (a fresh process's peak RSS);
each box through a real-size decoder takes ~0.1 s on two CPU cores, hence the single run and 40 boxes: two
full chunks and a partial one, 2.5x the chunk, which unchunked would need ~2.5 GiB, above the bound.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]  # ~20 s alone; a busy 2-core machine needs more

BOXES = 40
CHUNK = 16
MIB = 2**20

# Per prompt, the HQ decoder keeps ~8 float32 maps of 32 channels x 256 x 256 (8 MiB each) alive at its peak:
# the upscaled SAM embedding, the 64-channel mask_conv1 output and its (permuted) layer norm and GELU, the
# per-prompt copy of the HQ features, mask_conv2's output and the sum: ~64 MiB (measured: ~62 MiB). A chunk of
# 16 is ~1 GiB (measured 0.93 GiB); the 40 results (40 x 256 x 256 x 4 B = 10 MiB) and one iter_masks chunk
# at 1024 x 1024 (16 x 1024^2 x 4 B x 2 interpolations = 128 MiB) add little. The bound allows 1.5x the
# per-prompt estimate plus 256 MiB (1.75 GiB). Unchunked, the same decode needs ~40 x 64 MiB = 2.5 GiB (300
# boxes measured by hand: 19.0 GiB; chunk 32: 1.9 GiB, chunk 64: 3.9 GiB), above the bound, so a decoder
# that ignored the chunk size fails the test.
PER_PROMPT = 64 * MIB
BOUND = CHUNK * PER_PROMPT * 3 // 2 + 256 * MIB

SCRIPT = f"""
import json, resource

import numpy as np
import torch

from hqlabel.segmenters import tiny_random_sam_hq


def peak():  # bytes (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


seg = tiny_random_sam_hq(0, image_size=1024, patch_size=16, decoder_hidden=256, chunk_size={CHUNK})
image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
embeddings = seg.embed([image])
g = torch.Generator().manual_seed(0)
corner = torch.rand({BOXES}, 2, generator=g) * 900
boxes = torch.cat([corner, corner + 16 + torch.rand({BOXES}, 2, generator=g) * 100], 1)

before = peak()
logits = seg.predict_boxes(embeddings, [boxes])[0]
count, positive, shapes = 0, 0, set()
for chunk in seg.iter_masks(logits, (1024, 1024), chunk_size={CHUNK}):
    shapes.add(tuple(chunk.shape[1:]))
    positive += int(chunk.sum())
    count += len(chunk)
delta = peak() - before

alone = [seg.predict_boxes(embeddings, [box[None]])[0] for box in boxes]
alone_logits = torch.cat([a.logits for a in alone])
alone_iou = torch.cat([a.iou_scores for a in alone])
print(json.dumps(dict(
    before=before,
    delta=delta,
    logits_shape=list(logits.logits.shape),
    count=count,
    mask_shapes=sorted(shapes),
    foreground=positive / (count * 1024 * 1024),
    logits_diff=(logits.logits - alone_logits).abs().max().item(),
    logits_scale=alone_logits.abs().max().item(),
    iou_diff=(logits.iou_scores - alone_iou).abs().max().item(),
    iou_scale=alone_iou.abs().max().item(),
)))
"""


@pytest.fixture(scope="module")
def run() -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_chunked_decoding_equals_decoding_each_box_alone(run: dict) -> None:
    assert run["logits_shape"] == [BOXES, 1, 256, 256]
    assert run["logits_scale"] > 0 and run["iou_scale"] > 0
    assert run["logits_diff"] <= 1e-5 * run["logits_scale"]
    assert run["iou_diff"] <= 1e-5 * run["iou_scale"]


def test_peak_memory_is_bounded_by_the_chunk_size(run: dict) -> None:
    assert run["count"] == BOXES and run["mask_shapes"] == [[1, 1024, 1024]]
    assert 0.01 < run["foreground"] < 0.99
    assert run["delta"] < BOUND, f"peak RSS grew {run['delta'] / MIB:.0f} MiB, bound {BOUND / MIB:.0f} MiB"


# --- iter_masks: a float32 budget, not the image size, bounds upsampling ----------------------------------
#
# 16 prompts of a 2000 x 3000 image (the released models' frame: 683 x 1024 of 1024 x 1024). Per prompt the
# old path (one resize per 16-prompt chunk, kept here as the unbounded budget) holds the first resize
# (2.7 MiB), the full-size float32 logits (22.9 MiB) and the bool mask (5.7 MiB): ~490 MiB a chunk. A 12 MiB
# budget gives one prompt per chunk and strips of 98 rows (21 strips a mask): the first resize, the last-axis
# pass (7.8 MiB) and a strip stay within the budget; the yielded bool mask (5.7 MiB) comes on top. The bound
# adds 32 MiB for the allocator (measured: 27 MB of growth budgeted, 475 MB unbudgeted). The masks are hashed
# in place (their column-major memory), so consuming them allocates nothing.
RESIZE_BUDGET = 12 * MIB
RESIZE_SIZE = (2000, 3000)
RESIZE_BOUND = RESIZE_BUDGET + RESIZE_SIZE[0] * RESIZE_SIZE[1] + 32 * MIB

RESIZE_SCRIPT = """
import hashlib, json, sys

import torch

from hqlabel.segmenters import tiny_random_sam_hq
from hqlabel.segmenters.structures import MaskLogits


def status(field):  # bytes, from /proc/self/status (kB there)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


budget = int(sys.argv[1])
seg = tiny_random_sam_hq(0, image_size=1024, patch_size=16)
low = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
logits = torch.nn.functional.interpolate(low, size=(256, 256), mode="bilinear")  # smooth blobs
small = MaskLogits(logits[:2], torch.zeros(2, 1), (200, 300), (683, 1024))
for _ in seg.iter_masks(small, budget_bytes=budget):  # warm-up (kernels, thread pool), not measured
    pass
masks = MaskLogits(logits, torch.zeros(16, 1), (2000, 3000), (683, 1024))
# The high-water mark is reset to the current RSS first (Linux, /proc/self/clear_refs): a peak reached while
# the model was built would otherwise hide the loop's (ru_maxrss cannot be reset).
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
sizes, foreground, digest = [], 0, hashlib.sha256()
for chunk in seg.iter_masks(masks, chunk_size=16, budget_bytes=budget):
    sizes.append(len(chunk))
    foreground += int(chunk[..., ::10, ::10].sum())
    digest.update(chunk.transpose(-1, -2).numpy().data)  # contiguous W x H memory: no copy
    del chunk
delta = status("VmHWM") - before
print(json.dumps(dict(delta=delta, sizes=sizes, foreground=foreground, digest=digest.hexdigest())))
"""


def resize_run(budget: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RESIZE_SCRIPT, str(budget)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_upsampling_memory_is_bounded_by_the_budget_not_the_image_size() -> None:
    from hqlabel.segmenters.hq_sam import resize_plan

    prompts, rows = resize_plan(1, (683, 1024), RESIZE_SIZE, RESIZE_BUDGET)
    assert prompts == 1 and -(-RESIZE_SIZE[0] // rows) >= 20  # many strips a mask
    budgeted, unbounded = resize_run(RESIZE_BUDGET), resize_run(2**40)
    assert budgeted["sizes"] == [1] * 16 and unbounded["sizes"] == [16]
    assert budgeted["digest"] == unbounded["digest"]  # the same masks, bit for bit
    assert 0.1 < budgeted["foreground"] / (16 * 200 * 300) < 0.9
    assert budgeted["delta"] < RESIZE_BOUND, (
        f"peak RSS grew {budgeted['delta'] / MIB:.0f} MiB, bound {RESIZE_BOUND / MIB:.0f} MiB"
    )
    assert unbounded["delta"] > 4 * RESIZE_BOUND  # the bound is far below what the old path needs
