"""Checks a job's driver runs before anything starts (no Ray, nothing written): each mistake is one line
naming the option and the fix, instead of a traceback from inside a Ray actor minutes later.

What depends on the hardware (``--device cuda``, ``--precision fp16`` / ``bf16``) is checked against this
machine only when the job runs on a new local Ray, whose workers are this machine; on a cluster the workers'
GPUs are not known before Ray starts (an autoscaler may still add them).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from hqlabel.platform.config import LabelerConfig

TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's true values
HUB_PROBE_S = 3.0  # how long to wait for the Hugging Face hub's TCP handshake before calling it offline


def check_device(device: str, precision: str, *, local: bool) -> None:
    """``--device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; with ``local``, one this machine has, and
    ``--precision`` one that device supports (fp16 needs a GPU, bf16 on a GPU needs compute capability 8.0+).

    Raises:
        ValueError: the device or precision, with the fix.
    """
    import torch

    from hqlabel.platform.config import resolve_precision

    resolved = None
    if device != "auto":
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
        if resolved.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if local:
        if resolved is None:
            resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if resolved.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(
                    f"--device {device} asked for, but this machine has no CUDA GPU (or torch is a CPU "
                    "build); use --device cpu (or auto), or join a GPU cluster with --address"
                )
            if resolved.index is not None and resolved.index >= count:
                raise ValueError(
                    f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
                )
    if resolved is not None and (local or resolved.type == "cpu"):
        try:
            resolve_precision(precision, resolved)
        except ValueError as e:
            where = "this machine's GPU" if resolved.type == "cuda" else "the CPU"
            raise ValueError(f"--precision {precision} on {where}: {e}") from e


def check_compile(compile: bool, device: str, *, local: bool) -> None:
    """``--compile`` on the CPU of a local Ray: torch's inductor builds C++ kernels, so a C++ compiler
    (``CXX``, ``g++``, ``c++`` or ``clang++``) must be found.

    Raises:
        ValueError: none is found, with the fix.
    """
    if not compile or not local:
        return
    import shutil

    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if on_cpu and not any(name and shutil.which(name) for name in compilers):
        raise ValueError(
            "--compile on the CPU needs a C++ compiler and none was found (CXX, g++, c++, clang++); install "
            "one (Debian: apt-get install g++) or leave --compile off"
        )


def check_hq_weights(path: str | None) -> None:
    """``--hq-weights`` names a readable HQ-weights file (or a folder holding one).

    Raises:
        FileNotFoundError / ValueError: what is wrong with it, naming the option.
    """
    if path is None:
        return
    from hqlabel.segmenters.hq_weights import read_hq_weights

    try:
        read_hq_weights(path)
    except FileNotFoundError as e:
        fix = (
            ""
            if "; " in str(e)
            else "; pass the hq_weights.safetensors of `hqlabel train`, or its run folder"
        )
        raise FileNotFoundError(f"--hq-weights: {e}{fix}") from e
    except ValueError as e:
        raise ValueError(f"--hq-weights: {e}") from e


def hq_weights_pin(path: str | None, revision: str | None) -> str | None:
    """The ``hq_weights_revision`` a job records for ``--hq-weights PATH`` (None without one): the file's
    digest, which must match ``revision`` when one is given (set by hand, or an earlier run's).

    Raises:
        ValueError: the file is not the one ``revision`` names, with the fix.
    """
    if path is None:
        return None
    from hqlabel.segmenters.hq_weights import hq_weights_revision

    found = hq_weights_revision(path)
    if revision is not None and revision != found:
        raise ValueError(
            f"--hq-weights: {path} has changed (its digest is {found}, {revision} is expected); pass the "
            "weights that revision names, or drop hq_weights_revision (a resumed run: --overwrite)"
        )
    return found


def model_roles(config: LabelerConfig) -> list[str]:
    """The models ``config`` loads: ``detector`` and ``segmenter``, or the segmenter alone for given boxes."""
    return ["detector", "segmenter"] if config.prompts == "detector" else ["segmenter"]


def model_pins(config: LabelerConfig, revisions: dict[str, str | None] | None = None) -> dict[str, str]:
    """``{"detector_revision": ..., "segmenter_revision": ...}`` pinning the models ``config`` loads
    (``model_roles``; not for a preset): ``hub.model_revision`` of each at ``revisions["--ROLE"]`` when given,
    else at the config's own revision, i.e. a hub model's commit in the cache or a local model's ``files:``
    fingerprint. What a label job records, and the Python API's ``Labeler.config``.

    Raises:
        ModelLoadError: a hub model with no snapshot in the cache (load it first).
    """
    from hqlabel.platform.hub import model_revision

    pins = {}
    for role in model_roles(config):
        option = f"--{role}"
        revision = (revisions or {}).get(option, getattr(config, f"{role}_revision"))
        pins[f"{role}_revision"] = model_revision(getattr(config, role), revision, what=role, option=option)
    return pins


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) opens."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_hub() -> bool:
    """Whether models can come from the local cache only: ``HF_HUB_OFFLINE`` is set, or the hub does not
    answer. In the latter case ``HF_HUB_OFFLINE=1`` is set for this process (and the Ray it starts), so that
    loading a model takes the cache at once instead of ~25 s of connection retries per file.

    Call before ``huggingface_hub`` is imported (it reads the variable then); if it already was, its
    constant is updated too.
    """
    offline = any(
        os.environ.get(name, "").strip().upper() in TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if not offline and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        offline = True
    constants = sys.modules.get("huggingface_hub.constants")
    if offline and constants is not None:
        constants.HF_HUB_OFFLINE = True
    return offline


def check_pretrained(
    models: list[tuple[str, str, str, str]], *, revisions: dict[str, str | None] | None = None
) -> None:
    """Each ``(name, what, option, default)`` loads its config (from a local directory, the hub, or offline
    the cache; at ``revisions[option]`` when given): the ones the user set (``name != default``) first, so
    a wrong ``--segmenter`` is named as such even where the default detector is not cached. Offline
    (``offline_hub``) that takes seconds.

    Raises:
        ModelLoadError: the first that cannot load, naming its option and how to get it.
    """
    if not models:
        return
    if any(not Path(name).expanduser().is_dir() for name, *_ in models):
        offline_hub()  # before transformers imports huggingface_hub
    from transformers import AutoConfig

    from hqlabel.platform.hub import load_pretrained

    for name, what, option, _ in sorted(models, key=lambda model: model[0] == model[3]):
        revision = (revisions or {}).get(option)
        load_pretrained(AutoConfig.from_pretrained, name, what=what, option=option, revision=revision)


TRAIN_EXTRA = (
    "aiohttp",
    "aiohttp_cors",
    "pandas",
    "tensorboardX",
)  # from ray[train,default]: the train extra


def check_train_extra() -> None:
    """``hqlabel train`` has what the ``train`` extra installs: Ray Train's dependencies and the state API
    (ray[default]) that its clean-up watcher polls (without it, a warning every few seconds).

    Raises:
        ImportError: the modules missing, with the install command.
    """
    import importlib.util

    missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"hqlabel train needs the train extra ({', '.join(missing)} missing): pip install "
            "'hqlabel[train]' (from a clone: pip install -e '.[train]')"
        )
