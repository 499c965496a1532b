"""The HQ-token training recipe on tiny random models: what trains, what stays frozen, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hqlabel.platform.instances import iter_instances
from hqlabel.segmenters import build_segmenter, tiny_random_sam_hq
from hqlabel.segmenters.hq_weights import is_hq_parameter, resolve_hq_weights
from hqlabel.training.config import TrainConfig
from hqlabel.training.data import load_splits, make_example
from hqlabel.training.model import encode, freeze_all_but_hq, sam_from_sam_hq
from hqlabel.training.recipe import run_training, train_step
from hqlabel.training.synthetic import write_fine_structure_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synthetic") / "data")
    write_fine_structure_dataset(out, 8, size=96, seed=3)
    return out


def _config(data: str, out, **kwargs) -> TrainConfig:
    defaults = dict(
        data=data,
        out=str(out),
        preset="tiny-random",
        epochs=2,
        batch_size=2,
        val_fraction=0.25,
        num_points=256,
    )
    return TrainConfig(**(defaults | kwargs))


def test_only_the_hq_modules_train_and_the_loss_goes_down(dataset, tmp_path):
    config = _config(dataset, tmp_path / "run", jitter=(1.0, 1.0), flip=False, lr=1e-2)
    segmenter = tiny_random_sam_hq(hq_token_only=True)
    params = freeze_all_but_hq(segmenter.model)
    assert sum(p.numel() for p in params) == sum(
        p.numel() for n, p in segmenter.model.named_parameters() if is_hq_parameter(n)
    )
    before = {k: v.clone() for k, v in segmenter.model.state_dict().items()}
    train, _ = load_splits(config)
    examples = [make_example(item, 128, config, np.random.default_rng(0)) for item in train[:4]]
    optimizer = torch.optim.Adam(params, lr=config.lr)

    def fixed_loss() -> float:  # same prompts and loss points every time
        with torch.no_grad():
            return train_step(segmenter, examples, config, torch.Generator().manual_seed(1))[0].item()

    start = fixed_loss()
    for _ in range(15):
        optimizer.zero_grad()
        loss, count = train_step(segmenter, examples, config, torch.Generator().manual_seed(1))
        loss.backward()
        optimizer.step()
    assert count > 0
    assert fixed_loss() < start - 0.05

    after = segmenter.model.state_dict()
    frozen = [k for k in before if not is_hq_parameter(k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical
    changed = [k for k in before if is_hq_parameter(k) and not torch.equal(before[k], after[k])]
    assert "mask_decoder.hq_token.weight" in changed
    assert len(changed) >= 0.8 * sum(is_hq_parameter(k) for k in before)


def test_encoder_runs_without_building_a_graph():
    segmenter = tiny_random_sam_hq(hq_token_only=True)
    freeze_all_but_hq(segmenter.model)
    images = np.zeros((2, 128, 128, 3), dtype=np.uint8)
    embeddings = encode(segmenter, images, [(128, 128), (64, 100)])
    assert not embeddings.image_embeddings.requires_grad
    assert embeddings.original_sizes == [(128, 128), (128, 128)]
    with pytest.raises(ValueError, match="128 x 128"):
        encode(segmenter, np.zeros((1, 64, 64, 3), dtype=np.uint8), [(64, 64)])


def test_a_run_writes_checkpoints_best_and_the_untrained_baseline(dataset, tmp_path):
    out = tmp_path / "run"
    result = run_training(_config(dataset, out))
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["val_count"] > 0 and "train_loss" not in history[0]
    assert history[0]["val_empty"] == 0  # empty/empty pairs left out of the means, counted
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(history))
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"] == 2
    state = json.loads((out / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["config"]["preset"] == "tiny-random" and "out" not in state["config"]
    assert state["config"]["world"]["workers"] == 1
    assert resolve_hq_weights(out) == out / "best" / "hq_weights.safetensors"
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["epoch"] == result["best"]["epoch"]
    # The run's best weights load for relabeling, and they are the HQ modules only.
    tuned = build_segmenter("unused", preset="tiny-random", hq_weights=str(out / "best"))
    assert set(load_file(out / "best" / "hq_weights.safetensors")) == {
        k for k in tuned.model.state_dict() if is_hq_parameter(k)
    }


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(dataset, tmp_path):
    whole = run_training(_config(dataset, tmp_path / "whole", epochs=3))
    run_training(_config(dataset, tmp_path / "split", epochs=2))
    resumed = run_training(_config(dataset, tmp_path / "split", epochs=3), resume=True)
    assert resumed["history"] == whole["history"]
    a = load_file(tmp_path / "whole" / "checkpoints" / "epoch-0003" / "hq_weights.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "epoch-0003" / "hq_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trainer_a = torch.load(tmp_path / "whole" / "checkpoints" / "epoch-0003" / "trainer.pt")
    trainer_b = torch.load(tmp_path / "split" / "checkpoints" / "epoch-0003" / "trainer.pt")
    assert trainer_a["scheduler"] == trainer_b["scheduler"]


def test_resume_and_restart_mistakes_are_refused(dataset, tmp_path):
    out = tmp_path / "run"
    run_training(_config(dataset, out, epochs=1))
    with pytest.raises(ValueError, match="--resume"):
        run_training(_config(dataset, out, epochs=1))
    with pytest.raises(ValueError, match=r"differ.*\['lr'\]"):
        run_training(_config(dataset, out, epochs=2, lr=5e-4), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training(_config(dataset, tmp_path / "fresh"), resume=True)


def test_resume_with_changed_data_is_refused_in_the_driver_and_the_worker(dataset, tmp_path):
    import shutil

    from hqlabel.jobs.train import pin_data
    from hqlabel.training.checkpoint import check_resume

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "run"
    first = pin_data(_config(str(data), out, epochs=1))
    assert first.data_revision.startswith("files:") and pin_data(first) == first  # stable
    run_training(first)
    check_resume(str(out), first.model_copy(update={"epochs": 2}), 1)  # the same data: resumable
    with pytest.raises(ValueError, match=r"trained with 1 worker\(s\), this run has 2"):
        check_resume(str(out), first.model_copy(update={"epochs": 2}), 2)  # the driver checks workers too

    part = sorted(data.rglob("*.parquet"))[0]
    part.write_bytes(part.read_bytes())  # rewritten in place: a new modification time
    changed = pin_data(_config(str(data), out, epochs=2))
    assert changed.data_revision != first.data_revision
    with pytest.raises(ValueError, match=r"\['data_revision'\]; the files of --data / --val-data changed"):
        check_resume(str(out), changed, 1)
    with pytest.raises(ValueError, match="data_revision"):
        run_training(changed, resume=True)
    with pytest.raises(ValueError, match=r"--data: the files of .* have changed"):
        pin_data(changed.model_copy(update={"data_revision": first.data_revision}))

    # A checkpoint written before data_revision existed does not record it: not compared.
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    state_file = Path(latest["path"]) / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["data_revision"]
    state_file.write_text(json.dumps(state))
    check_resume(str(out), changed, 1)


def test_checkpoints_on_s3(dataset, tmp_path, s3_endpoint, s3_bucket):
    out = f"s3://{s3_bucket}/runs/a"
    run_training(_config(dataset, out, epochs=1, s3_endpoint=s3_endpoint))
    resumed = run_training(_config(dataset, out, epochs=2, s3_endpoint=s3_endpoint), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]


def test_validation_split_is_stable_and_disjoint(dataset, tmp_path):
    config = _config(dataset, tmp_path / "run", val_fraction=0.5)
    train, val = load_splits(config)
    again_train, again_val = load_splits(config)
    ids = [i.image_id for i in train], [i.image_id for i in val]
    assert ids == ([i.image_id for i in again_train], [i.image_id for i in again_val])
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) + len(ids[1]) == len(list(iter_instances(dataset)))


def test_sam_from_sam_hq_is_the_frozen_sam():
    hq = tiny_random_sam_hq()
    sam = sam_from_sam_hq(hq)
    assert not sam.is_hq
    hq_state = hq.model.state_dict()
    for key, value in sam.model.state_dict().items():
        assert torch.equal(value, hq_state[key]), key
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    logits = sam.predict_boxes(sam.embed([image]), [torch.tensor([[4.0, 4.0, 40.0, 30.0]])])[0]
    assert logits.logits.shape == (1, 1, 64, 64)
    with pytest.raises(TypeError, match="SamHQModel"):
        sam_from_sam_hq(sam)


def test_trains_straight_from_a_mask_folder_and_a_coco_json(tmp_path):
    """``--data`` takes ground truth as published: DIS5K-style im/ + gt/ folders and COCO instances JSON."""
    from PIL import Image

    from hqlabel.platform.rle import encode_mask

    folder = tmp_path / "dis"
    (folder / "im").mkdir(parents=True)
    (folder / "gt").mkdir()
    rng = np.random.default_rng(0)
    annotations, images = [], []
    for k in range(4):
        pixels = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
        mask = np.zeros((72, 96), dtype=bool)
        mask[10 + k : 50, 20 : 23 + 2 * k] = True  # a thin bar
        pixels[mask] = 255
        Image.fromarray(pixels).save(folder / "im" / f"{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "gt" / f"{k}.png")
        rle = encode_mask(mask)
        images.append({"id": k, "file_name": f"{k}.png", "height": 72, "width": 96})
        annotations.append(
            {"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "bbox": [20, 10, 3, 40],
             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}
        )  # fmt: skip
    coco = folder / "im" / "instances.json"
    coco.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "bar"}]})
    )
    for data, name in ((str(folder), "from-folder"), (str(coco), "from-coco")):
        config = _config(data, tmp_path / name, epochs=1, val_fraction=0.5, jitter=(1.0, 1.0))
        train, val = load_splits(config)
        assert sorted(i.image_id for i in [*train, *val]) == [f"{k}.png" for k in range(4)]
        assert all(len(i.instances) == 1 and i.masks()[0, 13:50, 20].all() for i in [*train, *val])
        result = run_training(config)
        assert [h["epoch"] for h in result["history"]] == [0, 1]
        assert result["history"][1]["train_masks"] == len(train)  # every object once (no crop at scale 1)
    # A COCO JSON's data revision covers its images (the JSON's folder here): a replaced image changes it.
    from hqlabel.training.data import data_revision

    config = _config(str(coco), tmp_path / "from-coco")
    before = data_revision(config)
    (folder / "im" / "0.png").write_bytes((folder / "im" / "1.png").read_bytes())
    assert data_revision(config) != before


def test_validation_scores_the_hq_mask_by_default(dataset, tmp_path):
    """sam-hq's validation scores the HQ token's mask alone; ``val_mask="sam+hq"`` scores SAM + HQ logits."""
    from hqlabel.training.evaluate import evaluate_segmenter
    from hqlabel.training.recipe import validate

    config = _config(dataset, tmp_path / "run", val_fraction=0.5)
    assert config.val_mask == "hq"
    _, val = load_splits(config)
    segmenter = tiny_random_sam_hq(hq_token_only=False)
    hq_only = evaluate_segmenter(tiny_random_sam_hq(hq_token_only=True), val).summary()
    sam_plus_hq = evaluate_segmenter(tiny_random_sam_hq(hq_token_only=False), val).summary()
    assert hq_only != sam_plus_hq  # the two masks differ on this model, so the check below tells them apart
    assert validate(segmenter, val, config, 0, 1) == pytest.approx(hq_only, nan_ok=True)
    assert segmenter.hq_token_only is False  # restored
    both = config.model_copy(update={"val_mask": "sam+hq"})
    assert validate(segmenter, val, both, 0, 1) == pytest.approx(sam_plus_hq, nan_ok=True)
    assert "empty" in hq_only  # the left-out empty/empty pairs are counted (history: val_empty)
