"""Class lists with synonyms (an ontology): what the detector is prompted with vs. what rows are labeled.

``--classes`` takes, besides a plain list (``"cat, dog"``):

* inline synonyms: ``"person: man, woman, pedestrian; car: car, truck, van"`` (``;`` between classes, ``:``
  after a class name, its prompts comma-separated; an entry without ``:`` is prompted with its own name);
* a ``.yaml`` / ``.yml`` / ``.json`` file holding a mapping ``class -> [synonyms]`` (a string value is one
  synonym; an empty or null one means the class name itself) or a plain list of class names.

The detector is prompted with the synonyms; rows are labeled with the class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ONTOLOGY_SUFFIXES = (".yaml", ".yml", ".json")


def _clean(name: Any) -> str:
    return " ".join(str(name).split())


def _check_name(name: str, what: str) -> None:
    if "." in name:
        raise ValueError(
            f"{what} {name!r} contains '.', which separates classes in the detector prompt; "
            "remove it (e.g. 'st. bernard' -> 'st bernard')"
        )


def read_ontology_file(path: str) -> list[str] | dict[str, Any]:
    """The list or mapping in a ``.yaml`` / ``.yml`` / ``.json`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: it does not parse, or holds neither a list nor a mapping.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--classes file {path} does not exist; pass an existing .yaml or .json file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: both name the line
        raise ValueError(f"--classes file {path} does not parse: {e}") from e
    if not isinstance(data, (list, dict)):
        raise ValueError(
            f"--classes file {path} holds a {type(data).__name__}; it must hold a list of class names or a "
            "mapping class -> list of synonyms"
        )
    return data


def _parse_inline(text: str) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {}
    for entry in text.split(";"):
        if not entry.strip():
            continue
        name, sep, rest = entry.partition(":")
        mapping[_clean(name)] = rest.split(",") if sep else []
    return mapping


def parse_ontology(value: str | list | dict) -> tuple[list[str], dict[str, list[str]]]:
    """``(classes, synonyms)`` from a ``--classes`` value.

    Args:
        value: ``"cat, dog"``, ``"person: man, woman; car: car, truck"``, a ``.yaml`` / ``.json`` file name,
            a list of names, or a mapping ``class -> list of synonyms``.

    Returns:
        The class names (blank ones dropped, duplicates by case dropped, spelling kept), and ``synonyms``:
        empty for a plain list (each class is prompted with its name), else per class its prompts.

    Raises:
        ValueError: no class; a name or synonym with ``.``; a synonym of two classes (the detector could not
            tell them apart); a class repeated in a mapping. FileNotFoundError: a file that does not exist.
    """
    if isinstance(value, str) and value.strip().lower().endswith(ONTOLOGY_SUFFIXES):
        value = read_ontology_file(value.strip())
    if isinstance(value, str):
        value = _parse_inline(value) if ":" in value else value.split(",")
    if isinstance(value, dict):
        return _parse_mapping(value)
    classes: list[str] = []
    seen: set[str] = set()
    for item in value:
        name = _clean(item)
        if not name:
            continue
        _check_name(name, "class name")
        if name.lower() not in seen:
            seen.add(name.lower())
            classes.append(name)
    if not classes:
        raise ValueError(
            f"no class names in {value!r}; pass a comma-separated list such as --classes 'cat, dog'"
        )
    return classes, {}


def _parse_mapping(mapping: dict) -> tuple[list[str], dict[str, list[str]]]:
    classes: list[str] = []
    synonyms: dict[str, list[str]] = {}
    owner: dict[str, str] = {}  # synonym (lower case) -> class
    for raw, given in mapping.items():
        name = _clean(raw)
        if not name:
            raise ValueError(f"a blank class name in the --classes mapping (synonyms {given!r}); name it")
        _check_name(name, "class name")
        if name.lower() in {c.lower() for c in classes}:
            raise ValueError(f"class {name!r} appears twice in the --classes mapping; merge its synonyms")
        items = [given] if isinstance(given, str) else list(given or [])
        prompts: list[str] = []
        for item in items:
            synonym = _clean(item)
            if not synonym or synonym.lower() in (p.lower() for p in prompts):
                continue
            _check_name(synonym, f"synonym of {name!r}")
            if synonym.lower() in owner:
                raise ValueError(
                    f"synonym {synonym!r} is given for both {owner[synonym.lower()]!r} and {name!r}; "
                    "give each synonym to one class"
                )
            owner[synonym.lower()] = name
            prompts.append(synonym)
        classes.append(name)
        synonyms[name] = prompts or [name]
    if not classes:
        raise ValueError("the --classes mapping is empty; give at least one class -> [synonyms]")
    return classes, synonyms
