"""``--compile`` for the detectors: Grounding DINO compiled once per canvas, with fixed input shapes (batch
padded to a fixed size, pixels to a canvas that only grows, text to the job's longest pass); tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hqlabel.detectors import tiny_random_owlv2, tiny_random_sam3
from hqlabel.detectors.base import Detections
from hqlabel.detectors.grounding_dino import GroundingDinoDetector, tiny_random_grounding_dino
from hqlabel.platform.config import LabelerConfig

CLASSES = ["cat", "traffic light"]
LOOSE = dict(box_threshold=0.0, text_threshold=0.0)  # many boxes per image: a sensitive comparison


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# batches of 3, 3 and 1 images of different sizes that all resize within a 128 x 128 canvas (the tiny
# processor resizes the shortest side to 128), then one with a wide image (128 x 192 once resized)
BATCHES = [
    [image(64, 64, 0), image(100, 100, 1), image(90, 90, 2)],
    [image(80, 80, 3), image(70, 70, 4), image(50, 50, 5)],
    [image(60, 60, 6)],
]
WIDE = [image(100, 150, 7), image(64, 64, 8)]


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given (each is one compilation) and runs
    them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph_module.forward


def assert_close_detections(got: list[Detections], expected: list[Detections], tol: float = 1e-4) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.boxes, b.boxes, atol=tol * 200, rtol=0)  # pixels of <= 200-px images
        torch.testing.assert_close(a.scores, b.scores, atol=tol, rtol=0)
        assert torch.equal(a.labels, b.labels)


@pytest.mark.slow
def test_traced_detector_matches_eager_and_compiles_once() -> None:
    """Through AOTAutograd (``aot_eager``: the tracing, functionalization and decompositions that inductor
    starts from, without its C++ code generation, which alone takes ~2 min cold on 2 cores for this graph;
    inductor's own CPU path is run by tests/segmenters/test_precision.py's compiled encoder): batches of 3, 3
    and 1 images of different sizes make one graph, and its detections are those of the eager model on the
    same canvas and padded batch."""
    compiled = tiny_random_grounding_dino(compile=True, compile_backend="aot_eager", **LOOSE)
    eager = tiny_random_grounding_dino(fixed_shapes=True, **LOOSE)
    assert compiled.compiled and compiled.fixed_shapes and not eager.compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in BATCHES:
        assert_close_detections(compiled.detect(batch, CLASSES), eager.detect(batch, CLASSES))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # one graph, no breaks
    assert compiled.canvas == eager.canvas == (128, 128) and compiled.batch == 3
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # compiled in place


def test_compiles_once_per_canvas() -> None:
    backend = CountingBackend()
    detector = tiny_random_grounding_dino(compile=True, compile_backend=backend)
    for batch in BATCHES:
        assert len(detector.detect(batch, CLASSES)) == len(batch)
    assert backend.graphs == 1 and detector.canvas == (128, 128) and detector.batch == 3
    # a wider image grows the canvas: one more compilation, then none for images within it
    assert len(detector.detect(WIDE, CLASSES)) == 2
    assert backend.graphs == 2 and detector.canvas == (128, 192)
    # a larger batch is split into calls of the fixed size, within the canvas: no new shape
    assert len(detector.detect([*BATCHES[0], *BATCHES[1], *WIDE], CLASSES)) == 8
    assert backend.graphs == 2


def test_compile_is_in_place(tmp_path) -> None:
    detector = tiny_random_grounding_dino(compile=True, compile_backend=CountingBackend())
    plain = tiny_random_grounding_dino()
    assert list(detector.model.state_dict()) == list(plain.model.state_dict())
    detector.save_pretrained(tmp_path)
    loaded = GroundingDinoDetector.from_pretrained(str(tmp_path))
    assert list(loaded.model.state_dict()) == list(plain.model.state_dict())


def test_fixed_shapes_make_detections_independent_of_the_batch() -> None:
    """Without compiling: on one canvas, an image's detections do not depend on the other images of its
    batch, nor on its place in it; padding the prompt's tokens (to a longer pass's length) changes nothing."""
    detector = tiny_random_grounding_dino(fixed_shapes=True, batch=3, canvas=(192, 192), **LOOSE)
    a, b, c = image(100, 150, 0), image(200, 120, 1), image(64, 64, 2)
    alone = [detector.detect([x], CLASSES)[0] for x in (a, b, c)]
    assert_close_detections(detector.detect([a, b, c], CLASSES), alone, tol=1e-5)
    assert_close_detections(detector.detect([c, a], CLASSES), [alone[2], alone[0]], tol=1e-5)
    assert_close_detections(detector.detect([b, c, a, b], CLASSES), [alone[1], alone[2], alone[0], alone[1]])
    assert detector.canvas == (192, 192) and detector.batch == 3
    (text,) = detector.passes(CLASSES)
    with torch.inference_mode():
        unpadded, padded = (detector._detect_pass([a, b], text, length) for length in (None, 40))
    for x, y in zip(unpadded, padded, strict=True):
        for u, v in zip(x, y, strict=True):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preprocess", ["processor", "torch"])
def test_both_preprocessing_paths_are_padded(preprocess: str) -> None:
    detector = tiny_random_grounding_dino(fixed_shapes=True, batch=4, preprocess=preprocess)
    (long_pass,) = detector.passes(["a much longer class name"])
    (short_pass,) = detector.passes(["cat"])
    length = detector._text_length([short_pass, long_pass])
    inputs = detector._inputs([image(100, 100, 0), image(50, 64, 1)], short_pass.prompt, length)
    assert inputs["pixel_values"].shape == (4, 3, 128, 192) and detector.canvas == (128, 192)
    assert inputs["pixel_mask"].shape == (4, 128, 192)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (4, length)
    mask = inputs["pixel_mask"]
    assert mask[0, :, :128].all() and not mask[0, :, 128:].any()  # 128 x 128 image, zeros around it
    assert mask[2:].all()  # the padding images are blank and valid (a zero mask makes NaN outputs)
    assert not inputs["pixel_values"][2:].any()
    assert not inputs["pixel_values"][0, :, :, 128:].any()


def test_labeler_config_compiles_the_detector() -> None:
    from hqlabel.workers.labeler import build_models

    config = LabelerConfig(classes="cat", preset="tiny-random", device="cpu", compile=True)
    detector, segmenter = build_models(config)
    assert detector.compiled and detector.fixed_shapes and segmenter.compiled
    detector, _ = build_models(LabelerConfig(classes="cat", preset="tiny-random", device="cpu"))
    assert not detector.compiled and not detector.fixed_shapes


@pytest.mark.parametrize(("build", "name"), [(tiny_random_owlv2, "owlv2"), (tiny_random_sam3, "sam3")])
def test_other_detectors_refuse_compile(build, name: str) -> None:
    with pytest.raises(ValueError, match=f"--compile does not cover --detector {name} yet; drop --compile"):
        build(compile=True)
    with pytest.raises(ValueError, match=f"--compile does not cover --detector {name} yet"):
        LabelerConfig(classes="cat", preset="tiny-random", detector=name, compile=True)
