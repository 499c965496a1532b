"""Many prompts on one image with a real-size decoder: chunked decoding is exact and bounds peak memory.

The model is ``tiny_random_sam_hq(image_size=1024, patch_size=16, decoder_hidden=256)``: a tiny encoder but
the released models' decoder shapes (256 x 64 x 64 image embeddings, 256 x 256 low-res masks), so decoder
activations are as large as in production. Both checks run in one subprocess (a fresh process's peak RSS);
300 boxes through a real-size decoder take ~0.1 s each on two CPU cores, hence the single run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]  # ~2 min alone; a busy 2-core machine needs more

BOXES = 300
CHUNK = 16
MIB = 2**20

# Per prompt, the HQ decoder keeps ~8 float32 maps of 32 channels x 256 x 256 (8 MiB each) alive at its peak:
# the upscaled SAM embedding, the 64-channel mask_conv1 output and its (permuted) layer norm and GELU, the
# per-prompt copy of the HQ features, mask_conv2's output and the sum: ~64 MiB (measured: ~62 MiB). A chunk of
# 16 is ~1 GiB (measured 0.93 GiB); the 300 results (300 x 256 x 256 x 4 B = 75 MiB) and one iter_masks chunk
# at 1024 x 1024 (16 x 1024^2 x 4 B x 2 interpolations = 128 MiB) add little. The bound allows 1.5x the
# per-prompt estimate plus 256 MiB. Unchunked, the same decode needs ~300 x 64 MiB = 19 GiB (measured by
# hand: 19.0 GiB; chunk 32: 1.9 GiB, chunk 64: 3.9 GiB), far above the bound, so it is not run here.
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
