"""``--classes`` with synonyms: inline, mapping files, and what LabelerConfig records."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.ontology import parse_ontology


def test_inline_synonyms() -> None:
    classes, synonyms = parse_ontology("person: man, woman,  pedestrian; car: car, truck, van; dog")
    assert classes == ["person", "car", "dog"]
    assert synonyms == {
        "person": ["man", "woman", "pedestrian"],
        "car": ["car", "truck", "van"],
        "dog": ["dog"],  # no synonyms given: its own name
    }


def test_plain_lists_are_as_before() -> None:
    assert parse_ontology(" cat, Dog ,, cat") == (["cat", "Dog"], {})
    assert parse_ontology(["cat", "dog"]) == (["cat", "dog"], {})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_mapping_and_list_files(tmp_path, suffix) -> None:
    mapping = {"person": ["man", "woman"], "car": "automobile", "tree": None}
    path = tmp_path / f"ontology{suffix}"
    text = json.dumps(mapping)  # JSON is YAML too
    path.write_text(text)
    assert parse_ontology(str(path)) == (
        ["person", "car", "tree"],
        {"person": ["man", "woman"], "car": ["automobile"], "tree": ["tree"]},
    )
    path.write_text(json.dumps(["cat", "dog"]))
    assert parse_ontology(str(path)) == (["cat", "dog"], {})


def test_yaml_block_mapping(tmp_path) -> None:
    path = tmp_path / "o.yml"
    path.write_text("person:\n  - man\n  - woman\ncar: [car, truck]\n")
    assert parse_ontology(str(path))[1] == {"person": ["man", "woman"], "car": ["car", "truck"]}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("person: man, woman; child: man", "synonym 'man' is given for both 'person' and 'child'"),
        ("person: st. man", "contains '.'"),
        ({"cat": ["kitty"], "Cat": ["puss"]}, "appears twice"),
        ("missing.yaml", "does not exist"),
        ("cat: kitty; : man", "a blank class name"),
        ({}, "mapping is empty"),
    ],
)
def test_bad_ontologies_are_named(value, match) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        parse_ontology(value)


def test_a_file_that_does_not_parse_or_holds_a_string(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        parse_ontology(str(bad))
    scalar = tmp_path / "s.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ValueError, match="holds a str"):
        parse_ontology(str(scalar))


def test_labeler_config_records_and_reloads_the_mapping() -> None:
    config = LabelerConfig(classes="person: man, woman; car: car", preset="tiny-random", mask_nms=0.8)
    assert config.classes == ["person", "car"]
    assert config.synonyms == {"person": ["man", "woman"], "car": ["car"]}
    dumped = config.model_dump(mode="json")
    assert dumped["synonyms"] == config.synonyms and dumped["mask_nms"] == 0.8
    assert LabelerConfig.model_validate(dumped) == config  # job.json round trip
    assert LabelerConfig(classes="cat, dog").synonyms == {}


def test_labeler_config_refuses_inconsistent_synonyms() -> None:
    with pytest.raises(ValidationError, match="classes without synonyms"):
        LabelerConfig(classes=["cat", "dog"], synonyms={"cat": ["kitty"]})
    with pytest.raises(ValidationError, match="pass the synonyms once"):
        LabelerConfig(classes="cat: kitty", synonyms={"cat": ["kitty"]})
    with pytest.raises(ValidationError, match="mask_nms"):
        LabelerConfig(classes="cat", mask_nms=1.5)
