import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import encode, random_image
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.jobs.segment import build_prompts
from hqlabel.jobs.spec import SegmentJobSpec
from hqlabel.segmenters import Prompts, tiny_random_sam_hq


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(random_image(4, (90, 120))))
    return path


def test_segment_writes_masks_matching_the_segmenter(image_path, tmp_path, capsys):
    out = tmp_path / "seg"
    code = main(
        [
            *["segment", str(image_path), "--box", "10,20,60,70", "--box", "50,5,110,80"],
            *["--preset", "tiny-random", "--out", str(out)],
        ]
    )
    assert code == 0
    assert "wrote 2 masks" in capsys.readouterr().out
    masks = [np.asarray(Image.open(out / f"photo_mask_{k}.png")) > 0 for k in range(2)]
    overlay = Image.open(out / "photo_overlay.png")
    assert overlay.size == (120, 90)
    assert all(m.shape == (90, 120) for m in masks)

    segmenter = tiny_random_sam_hq()  # the same preset, called directly
    image = np.asarray(Image.open(image_path).convert("RGB"))
    boxes = torch.tensor([[10, 20, 60, 70], [50, 5, 110, 80]], dtype=torch.float32)
    (logits,) = segmenter.predict(segmenter.embed([image]), [Prompts(boxes=boxes)])
    expected = torch.cat(list(segmenter.iter_masks(logits)))[:, 0].numpy()
    assert np.array_equal(np.stack(masks), expected)
    assert 0 < expected.sum() < expected.size, "masks should be neither empty nor full"

    record = json.loads((out / "photo_masks.json").read_text())
    assert record["random_weights"] is True
    assert record["masks"] == ["photo_mask_0.png", "photo_mask_1.png"]
    assert len(record["pred_iou"]) == 2


def test_segment_multimask_all_writes_three_masks_per_object(image_path, tmp_path):
    out = tmp_path / "multi"
    args = ["segment", str(image_path), "--point", "40,40", "--point", "80,60,0", "--multimask", "all"]
    assert main([*args, "--preset", "tiny-random", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_mask_*.png")) == [f"photo_mask_0_{j}.png" for j in range(3)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "50,50,10,10"], "is empty"),
        (["--box", "0,0,10,10", "--box", "5,5,20,20", "--point", "3,3"], "at most one --box"),
        ([], "at least one --box"),
    ],
)
def test_segment_rejects_bad_prompts_in_one_line(image_path, tmp_path, capsys, args, message):
    code = main(["segment", str(image_path), *args, "--preset", "tiny-random", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_segment_rejects_a_malformed_box_at_parse_time(image_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(image_path), "--box", "1,2,3"])
    assert exit_info.value.code == 2
    assert "expected 4 numbers" in capsys.readouterr().err


def test_points_attach_to_a_single_box_as_one_object():
    spec = SegmentJobSpec(image="x.png", out=".", boxes=[(0, 0, 10, 10)], points=[(2, 3, 1), (7, 8, 0)])
    prompts = build_prompts(spec)
    assert len(prompts) == 1
    assert prompts.points.shape == (1, 2, 2) and prompts.point_labels.tolist() == [[1, 0]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "10,20,121,70"], "--box 10,20,121,70 is outside the 120 x 90 image"),
        (["--point", "30,95"], "--point 30,95 is outside the 120 x 90 image"),
        (
            ["--box", "10,20,60,70", "--max-pixels", "10000"],
            "over the limit of 10000 pixels; raise --max-pixels",
        ),
        (["--box", "10,20,60,70", "--max-bytes", "100"], "over --max-bytes 100; raise --max-bytes"),
        (["--box", "10,20,60,70", "--hq-weights", "runs/nope"], "--hq-weights: HQ weights file"),
        (["--box", "10,20,60,70", "--device", "gpu"], "--device 'gpu' is not a device"),
    ],
)
def test_segment_checks_everything_before_building_a_model(
    image_path, tmp_path, capsys, monkeypatch, extra, message
):
    import hqlabel.jobs.segment as segment_job

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(segment_job, "build_segmenter", refuse)
    out = tmp_path / "seg"
    code = main(["segment", str(image_path), "--preset", "tiny-random", "--out", str(out), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hqlabel: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.timeout(120)
def test_segment_on_the_service_checks_the_image_here_and_loads_no_model(image_path, tmp_path):
    """``--service`` with no service running: the image and prompts are checked first, as without it; then a
    one-line error naming the service; torch's segmenters (and transformers) are never imported."""
    code = (
        "import json, sys\n"
        "from hqlabel.jobs.cli import main\n"
        "argv = sys.argv[1:]\n"
        "codes = [main(argv + ['--box', '10,20,60,70']), main(argv + ['--box', '10,20,130,70'])]\n"
        "heavy = sorted({'transformers', 'hqlabel.segmenters'} & set(sys.modules))\n"
        "print('RESULT ' + json.dumps([codes, heavy]))\n"
    )
    argv = ["segment", str(image_path), "--preset", "tiny-random", "--out", str(tmp_path / "o"), "--service"]
    env = {**os.environ, "HQLABEL_SERVICE_FILE": str(tmp_path / "none.json")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stderr
    assert json.loads(result[0].removeprefix("RESULT ")) == [[2, 2], []]
    errors = [line for line in done.stderr.splitlines() if line.startswith("hqlabel: error:")]
    assert len(errors) == 2 and "Traceback" not in done.stderr
    assert "no labeling service is running" in errors[0] and "hqlabel serve start" in errors[0]
    assert "--box 10,20,130,70 is outside the 120 x 90 image" in errors[1]  # checked before the service
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--service", "--device", "cpu"], "drop --device or --service"),
        (["--address", "127.0.0.1:1"], "add --service, or drop --address"),
    ],
)
def test_segment_service_options_in_one_line(image_path, tmp_path, capsys, extra, message):
    argv = ["segment", str(image_path), "--box", "1,1,9,9", "--preset", "tiny-random", "--out", str(tmp_path)]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
