"""``WarmLabeler.segment`` without Ray: the service's segmenter on one image (``segment --service``, review's
click fixes), the same masks as a local segmenter, one encoder pass per cached image, other settings refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.jobs.segment import segmenter_settings
from hqlabel.jobs.service_client import decode_result, fix_prompts, image_key
from hqlabel.jobs.spec import SegmentJobSpec
from hqlabel.platform.config import SEGMENTER_FIELDS, LabelerConfig
from hqlabel.platform.rle import decode_mask, encode_masks
from hqlabel.review.fix import Fixer
from hqlabel.workers.warm import WarmLabeler

TINY = {"preset": "tiny-random", "device": "cpu"}
# what `hqlabel segment --preset tiny-random --service` asks for
SEGMENT = segmenter_settings(
    SegmentJobSpec(image="x.png", out=".", boxes=[(0, 0, 1, 1)], preset="tiny-random")
)


@pytest.fixture(scope="module")
def warm() -> WarmLabeler:
    """A service's actor started with ``--prompts boxes``: a segmenter and no detector."""
    labeler = WarmLabeler(LabelerConfig(prompts="boxes", **TINY))
    assert labeler.worker.labeler.detector is None
    return labeler


@pytest.fixture
def encoder_calls(warm):
    """Counts the forward passes of the actor's image encoder."""
    calls = []
    hook = warm.worker.labeler.segmenter.model.vision_encoder.register_forward_hook(
        lambda *_: calls.append(1)
    )
    yield calls
    hook.remove()


def test_segment_matches_the_local_segment_command(warm, tmp_path):
    image = random_image(4, (90, 120))
    path = tmp_path / "photo.png"
    path.write_bytes(encode(image))
    for name, args, fields in (
        (
            "boxes",
            ["--box", "10,20,60,70", "--box", "50,5,110,80"],
            {"boxes": [[10, 20, 60, 70], [50, 5, 110, 80]]},
        ),
        (
            "clicks",
            ["--box", "10,20,60,70", "--point", "30,40", "--point", "12,22,0"],
            {"boxes": [[10, 20, 60, 70]], "points": [[[30, 40], [12, 22]]], "point_labels": [[1, 0]]},
        ),
    ):
        out = tmp_path / name
        assert main(["segment", str(path), *args, "--preset", "tiny-random", "--out", str(out)]) == 0
        record = json.loads((out / "photo_masks.json").read_text())
        local = np.stack([np.asarray(Image.open(out / f)) > 0 for f in record["masks"]])
        result = warm.segment(image, fields, SEGMENT, key=name)
        masks, iou = decode_result(result)
        assert masks.shape == (len(local), 1, 90, 120) and result["size"] == [90, 120]
        assert [per[0] for per in result["masks"]] == encode_masks(local)  # the same RLE
        assert iou == record["pred_iou"]
        assert 0 < local.sum() < local.size


def test_the_encoder_runs_once_per_cached_image(warm, encoder_calls):
    image, other = random_image(1, (40, 56)), random_image(2, (40, 56))
    box = {"boxes": [[5, 5, 30, 30]]}
    before = warm.info()
    first = warm.segment(image, box, SEGMENT, key="img")
    second = warm.segment(image, fix_prompts([5, 5, 30, 30], [(10, 10, 1)]), SEGMENT, key="img")
    assert (first["encoded"], second["encoded"], len(encoder_calls)) == (True, False, 1)
    assert first["masks"] != second["masks"]  # the click changed the mask, with the cached embeddings
    again = warm.segment(image, box, SEGMENT, key="img")
    assert again == first | {"encoded": False}  # the cached embeddings give the first answer again
    assert warm.segment(None, box, SEGMENT, key="img") == again  # by key alone: no image sent
    assert warm.segment(None, box, SEGMENT, key="never-sent") == {"need_image": True}
    assert warm.segment(None, box, SEGMENT) == {"need_image": True}
    warm.segment(other, box, SEGMENT, key="other")
    warm.segment(image, box, SEGMENT)  # no key: encoded, not kept
    warm.segment(random_image(3, (41, 56)), box, SEGMENT, key="img")  # another size under a key: encoded
    assert len(encoder_calls) == 4
    info = warm.info()
    assert info["segments"] - before["segments"] == 7 and info["encodes"] - before["encodes"] == 4
    assert info["images"] - before["images"] == 6  # all but the request by key alone
    assert info["loads"] == before["loads"] and info["batches"] == before["batches"]


def test_other_segmenter_settings_are_refused_in_one_line(warm):
    image = random_image(1, (40, 56))
    for settings, named in (
        (SEGMENT | {"multimask": "best"}, "multimask: service 'off', caller 'best'"),
        (LabelerConfig(prompts="boxes", hq_token_only=True, **TINY), "hq_token_only: service False"),
        ({"preset": None}, "preset: service 'tiny-random', caller None"),
    ):
        with pytest.raises(ValueError) as error:
            warm.segment(image, {"boxes": [[1, 1, 20, 20]]}, settings)
        message = str(error.value)
        assert named in message and "\n" not in message and "hqlabel serve stop, serve start" in message
    with pytest.raises(ValueError, match="not segmenter fields"):
        warm.segment(image, {"boxes": [[1, 1, 20, 20]]}, {"classes": ["cat"]})
    # what differs outside the segmenter (device, classes, detector thresholds) is no reason to refuse
    job = LabelerConfig(classes=["cat"], box_threshold=0.1, **TINY | {"device": "auto"})
    assert warm.segment(image, {"boxes": [[1, 1, 20, 20]]}, job)["size"] == [40, 56]


def test_click_fix_prompts_give_the_local_fixers_mask(warm):
    """What ``ServiceFixer`` sends gives what the review app's local ``Fixer`` saves."""
    labeler = LabelerConfig(classes=["cat"], **TINY).model_dump(mode="json")
    fixer = Fixer(labeler, "cpu")
    image = random_image(5, (48, 64))
    settings = {name: labeler[name] for name in SEGMENTER_FIELDS}
    for points in ([(20.0, 20.0, 1)], [(20.0, 20.0, 1), (3.0, 3.0, 0)]):
        rle, area, iou = fixer.fix("a.png", image, [4.0, 6.0, 40.0, 44.0], points)
        result = warm.segment(
            image, fix_prompts([4.0, 6.0, 40.0, 44.0], points), settings, key=image_key(image)
        )
        assert result["masks"][0][0] == rle and result["iou"][0][0] == iou
        assert int(decode_mask(rle).sum()) == area
