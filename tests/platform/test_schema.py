import pyarrow as pa
import pytest

from hqlabel.platform.config import LabelerConfig, parse_classes
from hqlabel.platform.schema import (
    ERRORS_SCHEMA,
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    RESULT_SCHEMA,
    results_to_tables,
)


def _instance(k: int, label: str) -> dict:
    return {
        "instance_id": k,
        "label": label,
        "score": 0.5 + k / 10,
        "box": [0.0, 1.0, 2.0, 3.0],
        "mask": {"size": [4, 5], "counts": b"abc"},
        "area": 7 + k,
        "pred_iou": 0.9,
    }


def test_results_split_into_masks_and_errors():
    results = pa.Table.from_pylist(
        [
            {
                "image_id": "a",
                "instances": [_instance(0, "cat"), _instance(1, "dog")],
                "error_stage": None,
                "error": None,
                "height": 4,
                "width": 5,
            },
            {"image_id": "b", "instances": None, "error_stage": "decode", "error": "truncated"},
            {"image_id": "c", "instances": [], "error_stage": None, "error": None},
            {"image_id": "d", "instances": [_instance(0, "dog")], "error_stage": None, "error": None},
            {"image_id": "e", "instances": None, "error_stage": "read", "error": "EIO", "retryable": True},
        ],
        schema=RESULT_SCHEMA,
    )
    masks, errors, images = results_to_tables(results)
    assert masks.schema == MASKS_SCHEMA
    assert errors.schema == ERRORS_SCHEMA
    assert masks["image_id"].to_pylist() == ["a", "a", "d"]
    assert masks["instance_id"].to_pylist() == [0, 1, 0]
    assert masks["label"].to_pylist() == ["cat", "dog", "dog"]
    assert masks["area"].to_pylist() == [7, 8, 7]
    assert masks["mask"][0].as_py() == {"size": [4, 5], "counts": b"abc"}
    assert errors.to_pylist() == [  # an error row without the flag (an older result) is not retryable
        {"image_id": "b", "stage": "decode", "error": "truncated", "retryable": False},
        {"image_id": "e", "stage": "read", "error": "EIO", "retryable": True},
    ]
    assert images.schema == IMAGES_SCHEMA
    assert images["image_id"].to_pylist() == ["a", "b", "c", "d", "e"]
    assert images["num_instances"].to_pylist() == [2, 0, 0, 1, 0]
    assert images["error_stage"].to_pylist() == [None, "decode", None, None, "read"]
    assert images["height"].to_pylist()[0] == 4


def test_empty_results_give_empty_tables():
    masks, errors, images = results_to_tables(RESULT_SCHEMA.empty_table())
    assert masks.num_rows == 0 and errors.num_rows == 0 and images.num_rows == 0
    assert masks.schema == MASKS_SCHEMA


def test_parse_classes_cleans_and_deduplicates():
    assert parse_classes(" person, bicycle ,, traffic  light, Person") == [
        "person",
        "bicycle",
        "traffic light",
    ]
    assert parse_classes(["cat", "dog"]) == ["cat", "dog"]


@pytest.mark.parametrize("bad", ["", " , ", "st. bernard"])
def test_parse_classes_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parse_classes(bad)


def test_labeler_config_validates_classes_and_thresholds():
    assert LabelerConfig(classes="a, b").classes == ["a", "b"]
    assert LabelerConfig(prompts="boxes").classes == []
    with pytest.raises(ValueError, match="--classes"):
        LabelerConfig(classes="")
    with pytest.raises(ValueError):
        LabelerConfig(classes="a", box_threshold=1.5)


def test_conform_fills_the_quality_signals_of_an_older_masks_table():
    from hqlabel.platform.schema import MASKS_SCHEMA, SIGNAL_NAMES, conform

    row = {
        "image_id": "a",
        "instance_id": 0,
        "label": "cat",
        "score": 0.5,
        "box": [0.0, 0.0, 1.0, 1.0],
        "mask": {"size": [1, 1], "counts": b"01"},
        "area": 1,
        "pred_iou": 0.9,
    }
    old = pa.Table.from_pylist([row])  # as written before the signal columns existed
    table = conform(old, MASKS_SCHEMA)
    assert table.schema == MASKS_SCHEMA
    assert all(table[name].null_count == 1 for name in SIGNAL_NAMES)
    with pytest.raises(ValueError, match=r"lacks the columns \['pred_iou'\]"):
        conform(old.drop_columns(["pred_iou"]), MASKS_SCHEMA)
