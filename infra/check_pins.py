"""Check infra/Dockerfile's pins without Docker: the torch x CUDA build exists, every `pip install` resolves.

    python infra/check_pins.py              # matrix check + pip resolution (needs the package indexes)
    python infra/check_pins.py --offline    # matrix check only

1. Offline: ``TORCH_VERSION`` x ``CUDA_TAG`` must be a build PyTorch publishes (``TORCH_CUDA_BUILDS``, from
   PyTorch's release compatibility matrix). This is what catches ``torch==2.13.0`` from the cu128 index.
2. Online: each ``RUN pip install ...`` line of the Dockerfile, with its ARGs substituted and the same
   index options, is run as ``pip install --dry-run`` in a clean virtualenv of the image's Python (resolution
   and metadata only: no multi-GB wheel downloads). pip's own configuration and environment are ignored
   (``--isolated``), as in the image. When the CUDA index (download.pytorch.org) cannot be reached, the
   torch pin is resolved on PyPI instead and the output says that the CUDA build itself was NOT checked.

Exit status 0 when every check passed, 1 otherwise; one line per check.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"
REPO = DOCKERFILE.parents[1]

# The CUDA builds PyTorch publishes per torch minor version (https://download.pytorch.org/whl/<tag>/torch/),
# from PyTorch's release compatibility matrix (RELEASE.md): 2.11 is the last release built for CUDA 12.8;
# 2.12 and 2.13 are built for CUDA 12.6 and 13.0. Add a row when TORCH_VERSION moves to a newer minor.
TORCH_CUDA_BUILDS: dict[str, frozenset[str]] = {
    "2.12": frozenset({"cpu", "cu126", "cu130"}),
    "2.13": frozenset({"cpu", "cu126", "cu130"}),
}
PYPI_SIMPLE = "https://pypi.org/simple"


def dockerfile_args(text: str) -> dict[str, str]:
    """Default values of every ``ARG NAME=value`` in the Dockerfile (before and after FROM)."""
    return {m[1]: m[2].strip("\"'") for m in re.finditer(r"^ARG (\w+)=(\S+)\s*$", text, re.MULTILINE)}


def pip_install_commands(text: str) -> list[list[str]]:
    """The argv of every ``pip install`` in a RUN instruction, ARGs substituted, up to a following ``&&``."""
    args = dockerfile_args(text)
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        if not line.startswith("RUN "):
            continue
        for part in line[4:].split("&&"):
            argv = shlex.split(part)
            if argv[:2] == ["pip", "install"]:
                expanded = [re.sub(r"\$\{(\w+)\}", lambda m: _arg(args, m[1]), a) for a in argv[2:]]
                commands.append(expanded)
    return commands


def _arg(args: dict[str, str], name: str) -> str:
    if name not in args:
        raise ValueError(f"infra/Dockerfile uses ${{{name}}} but declares no ARG {name}=<default>; add one")
    return args[name]


def check_torch_cuda(args: dict[str, str]) -> str:
    """Raise ValueError unless TORCH_VERSION x CUDA_TAG is a published PyTorch build; return a report line."""
    torch_version, cuda_tag = args.get("TORCH_VERSION"), args.get("CUDA_TAG")
    if not torch_version or not cuda_tag:
        raise ValueError("infra/Dockerfile must declare ARG TORCH_VERSION=<x.y.z> and ARG CUDA_TAG=<cuXYZ>")
    minor = ".".join(torch_version.split(".")[:2])
    if minor not in TORCH_CUDA_BUILDS:
        raise ValueError(
            f"torch {torch_version}: its CUDA builds are not in TORCH_CUDA_BUILDS of infra/check_pins.py; "
            "add them from PyTorch's release compatibility matrix"
        )
    builds = TORCH_CUDA_BUILDS[minor]
    if cuda_tag not in builds:
        raise ValueError(
            f"torch {torch_version} is not built for {cuda_tag} (PyTorch publishes "
            f"{', '.join(sorted(builds))} for it): change CUDA_TAG or TORCH_VERSION in infra/Dockerfile"
        )
    return f"ok   torch {torch_version} is published for {cuda_tag} (PyTorch release matrix)"


def python_version(args: dict[str, str]) -> str:
    """'3.11' from ``ARG PYTHON_TAG=py311`` (the base image's Python)."""
    match = re.fullmatch(r"py(\d)(\d+)", args.get("PYTHON_TAG", ""))
    if not match:
        raise ValueError("infra/Dockerfile must declare ARG PYTHON_TAG=pyXY (the base image's Python)")
    return f"{match[1]}.{match[2]}"


def _reachable(index_url: str, package: str) -> bool:
    """Whether the index's host answers at all (an HTTP error still counts: then pip reports the problem)."""
    try:
        with urllib.request.urlopen(f"{index_url.rstrip('/')}/{package}/", timeout=15):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _index_url(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--index-url" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--index-url="):
            return a.split("=", 1)[1]
    return None


def _replace_index(argv: list[str], new: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            out.append(new)
            skip = False
        elif a == "--index-url":
            out.append(a)
            skip = True
        elif a.startswith("--index-url="):
            out.append(f"--index-url={new}")
        else:
            out.append(a)
    return out


def resolve(commands: list[list[str]], args: dict[str, str]) -> list[tuple[bool, str]]:
    """``pip install --dry-run`` every install command in one clean virtualenv; (ok, report line) each."""
    results: list[tuple[bool, str]] = []
    torch_pin = f"torch=={args['TORCH_VERSION']}"
    with tempfile.TemporaryDirectory(prefix="hqlabel-pins-") as tmp:
        venv = Path(tmp) / "venv"
        # --without-pip + this pip's --python: no ensurepip needed (Debian's python3 lacks it without
        # python3-venv), and the resolution still sees only the clean environment's (empty) site-packages.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        pip = [sys.executable, "-m", "pip", "--python", python, "--isolated", "--disable-pip-version-check"]
        for argv in commands:
            note = ""
            index = _index_url(argv)
            if index and not _reachable(index, "torch"):
                argv = _replace_index(argv, PYPI_SIMPLE)
                note = (
                    f" -- NOT the CUDA build: {index} is unreachable from here, so this resolved the same "
                    "version on PyPI; the CUDA wheel's existence rests on the release-matrix check only"
                )
            if index is None and torch_pin not in argv:
                # The image installed torch in an earlier step: hold it at that pin for this resolution.
                argv = [*argv, torch_pin]
            cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", *argv]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            shown = "pip install " + " ".join(shlex.quote(a) for a in argv)
            if proc.returncode == 0:
                results.append((True, f"ok   resolves: {shown}{note}"))
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                results.append((False, f"FAIL does not resolve: {shown}{note}: {' | '.join(tail)}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    parser.add_argument("--offline", action="store_true", help="only the release-matrix check, no pip")
    options = parser.parse_args(argv)
    text = options.dockerfile.read_text()
    args = dockerfile_args(text)
    ok = True
    try:
        print(check_torch_cuda(args))
        version = python_version(args)
    except ValueError as e:
        print(f"FAIL {e}")
        return 1
    if options.offline:
        return 0
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != version:
        print(f"FAIL the image runs Python {version}; run this script with Python {version}, not {here}")
        return 1
    for passed, line in resolve(pip_install_commands(text), args):
        print(line)
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
