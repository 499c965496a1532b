"""infra/Dockerfile: the torch x CUDA build it installs exists, its pip commands are what check_pins.py
resolves, and its working directory is writable by the image's user with any builder.

The online half (every ``pip install`` resolved with ``--dry-run`` against the indexes) is
``python infra/check_pins.py``, which .ci/run runs; these tests are the offline, always-on part.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"
DOCKERFILE = INFRA / "Dockerfile"

_spec = importlib.util.spec_from_file_location("check_pins", INFRA / "check_pins.py")
check_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_pins)


def _with_arg(text: str, name: str, value: str) -> str:
    new, count = re.subn(rf"^ARG {name}=\S+$", f"ARG {name}={value}", text, flags=re.MULTILINE)
    assert count == 1, f"no ARG {name}= in the Dockerfile"
    return new


def test_dockerfile_torch_build_is_published():
    args = check_pins.dockerfile_args(DOCKERFILE.read_text())
    assert check_pins.check_torch_cuda(args).startswith("ok")


@pytest.mark.parametrize(
    ("cuda_tag", "torch_version", "expected"),
    [
        ("cu128", "2.13.0", r"torch 2\.13\.0 is not built for cu128 .*cu126, cu130"),  # the old pin
        ("cu124", "2.12.1", r"not built for cu124"),
        ("cu126", "2.99.0", r"torch 2\.99\.0: its CUDA builds are not in TORCH_CUDA_BUILDS"),
    ],
)
def test_unpublished_torch_builds_are_rejected(cuda_tag, torch_version, expected):
    text = _with_arg(_with_arg(DOCKERFILE.read_text(), "CUDA_TAG", cuda_tag), "TORCH_VERSION", torch_version)
    with pytest.raises(ValueError, match=expected):
        check_pins.check_torch_cuda(check_pins.dockerfile_args(text))


def test_offline_main_fails_on_a_bad_pin(tmp_path, capsys):
    bad = tmp_path / "Dockerfile"
    bad.write_text(_with_arg(DOCKERFILE.read_text(), "CUDA_TAG", "cu128"))
    assert check_pins.main(["--offline", "--dockerfile", str(bad)]) == 1
    assert "FAIL torch 2.13.0 is not built for cu128" in capsys.readouterr().out
    assert check_pins.main(["--offline"]) == 0


def test_pip_commands_are_the_dockerfiles_with_args_substituted():
    text = DOCKERFILE.read_text()
    args = check_pins.dockerfile_args(text)
    commands = check_pins.pip_install_commands(text)
    assert commands[0] == [
        "--index-url",
        f"https://download.pytorch.org/whl/{args['CUDA_TAG']}",
        f"torch=={args['TORCH_VERSION']}",
    ]
    assert commands[1] == [".[s3,export]", f"ray[data,train]=={args['RAY_VERSION']}"]
    assert len(commands) == 2, commands
    assert check_pins.python_version(args) == "3.11"
    assert "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu" in text


def test_undeclared_arg_is_named():
    text = DOCKERFILE.read_text().replace("${TORCH_VERSION}", "${TORCH_VERSON}")
    with pytest.raises(ValueError, match=r"\$\{TORCH_VERSON\} but declares no ARG TORCH_VERSON"):
        check_pins.pip_install_commands(text)


def test_workdir_is_created_for_the_user_before_user_switches():
    # Without BuildKit, WORKDIR creates a missing directory owned by root even after USER ray, and the
    # in-place `pip install .` cannot write there: it must exist, owned by ray, before USER/WORKDIR.
    lines = [line for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    workdir = next(line.split()[1] for line in instructions if line.startswith("WORKDIR "))
    user_at = max(i for i, line in enumerate(instructions) if line.startswith("USER "))
    assert instructions[user_at] == "USER ray"
    assert instructions.index(f"WORKDIR {workdir}") > user_at
    created = [
        line
        for line in instructions[:user_at]
        if line.startswith("RUN ")
        and f"mkdir -p {workdir}" in line
        and re.search(rf"chown ray\S* {workdir}", line)
    ]
    assert created, f"{workdir} is not created and chowned to ray before the last USER"
