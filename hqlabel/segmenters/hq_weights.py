"""Fine-tuned HQ-SAM weights on their own: only the HQ-token modules, as safetensors, base model recorded.

HQ-SAM trains ~1.1M (ViT-B) to ~1.6M (ViT-H) parameters on top of a frozen SAM; a fine-tuned result is
those tensors alone. ``save_hq_weights`` writes them with the base model id in the file's metadata, and
``load_hq_weights`` puts them back into a base ``SamHQModel`` (``hqlabel label --hq-weights PATH``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from transformers import SamHQModel

from hqlabel import __version__

logger = logging.getLogger(__name__)

FORMAT = "hqlabel-hq-weights/1"
HQ_WEIGHTS_FILE = "hq_weights.safetensors"  # its name inside a training run's checkpoint and best/ folders
# The HQ-SAM modules inside transformers' SamHQMaskDecoder: the HQ token, its 3-layer MLP, the ViT-feature
# compression, the image-embedding encoder and the mask-feature convs. Everything else is SAM, frozen.
HQ_MODULE_PREFIXES: tuple[str, ...] = tuple(
    f"mask_decoder.{name}"
    for name in (
        "hq_token.",
        "hq_mask_mlp.",
        "compress_vit_conv1.",
        "compress_vit_norm.",
        "compress_vit_conv2.",
        "encoder_conv1.",
        "encoder_norm.",
        "encoder_conv2.",
        "mask_conv1.",
        "mask_norm.",
        "mask_conv2.",
    )
)


def is_hq_parameter(name: str) -> bool:
    """Whether a ``SamHQModel`` state-dict key belongs to the trainable HQ modules."""
    return name.startswith(HQ_MODULE_PREFIXES)


def hq_state_dict(model: SamHQModel) -> dict[str, torch.Tensor]:
    """The HQ-module tensors of ``model`` (detached, contiguous, on CPU)."""
    if not isinstance(model, SamHQModel):
        raise TypeError(f"HQ weights come from a SamHQModel, got {type(model).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_hq_parameter(k)}


def hq_weights_bytes(model: SamHQModel, *, base_model: str, extra: dict | None = None) -> bytes:
    """The HQ modules of ``model`` as a safetensors file's bytes (what ``save_hq_weights`` writes), for
    storage that is not a local path (a training run's checkpoints on S3)."""
    return save(hq_state_dict(model), metadata=_metadata(model, base_model, extra))


def save_hq_weights(
    model: SamHQModel, path: str | Path, *, base_model: str, extra: dict | None = None
) -> Path:
    """Write the HQ modules of ``model`` to ``path`` (safetensors).

    Args:
        base_model: id or path of the frozen SAM-HQ the weights were trained on (recorded, checked on load).
        extra: more JSON-serialisable metadata (e.g. the training run's config).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(hq_state_dict(model), str(path), metadata=_metadata(model, base_model, extra))
    return path


def _metadata(model: SamHQModel, base_model: str, extra: dict | None) -> dict[str, str]:
    metadata = {
        "format": FORMAT,
        "base_model": base_model,
        "hqlabel_version": __version__,
        "vit_dim": str(model.config.mask_decoder_config.vit_dim),
        "hidden_size": str(model.config.mask_decoder_config.hidden_size),
    }
    if extra:
        metadata["extra"] = json.dumps(extra)
    return metadata


def resolve_hq_weights(path: str | Path) -> Path:
    """The weights file ``path`` names: the file itself, a folder holding ``hq_weights.safetensors``
    (``RUN/best``, a checkpoint folder), or a training run folder (its ``best/``).

    Raises:
        FileNotFoundError: none of those exist.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for candidate in (path / HQ_WEIGHTS_FILE, path / "best" / HQ_WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} holds no {HQ_WEIGHTS_FILE} (nor best/{HQ_WEIGHTS_FILE}); pass a weights file, a run's "
            "best/ folder or the run folder of `hqlabel train`"
        )
    raise FileNotFoundError(f"HQ weights file {path} does not exist")


def hq_weights_revision(path: str | Path) -> str:
    """``sha256:`` + a digest of the bytes of the weights file ``path`` names (``resolve_hq_weights``): what a
    job records to tell the weights it labeled with from those the same path holds later (a retrained run).

    Raises:
        FileNotFoundError: as ``resolve_hq_weights``.
    """
    digest = hashlib.sha256()
    with resolve_hq_weights(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def read_hq_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an HQ-weights file, validated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not HQ weights, or holding non-HQ tensors.
    """
    path = resolve_hq_weights(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-export it") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an HQLabel HQ-weights file (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); "
            "to use a full SAM-HQ checkpoint pass it as --segmenter instead"
        )
    foreign = sorted(k for k in tensors if not is_hq_parameter(k))
    if foreign:
        raise ValueError(f"{path} holds tensors outside the HQ modules: {foreign[:5]}")
    return tensors, metadata


def load_hq_weights(model: SamHQModel, path: str | Path, *, base_model: str | None = None) -> dict[str, str]:
    """Load HQ weights into ``model`` in place; every HQ tensor must be present with the model's shape.

    Args:
        base_model: the id of ``model``; a different recorded base is logged as a warning (weights trained on
            one SAM-HQ size cannot load into another: that is a shape error).

    Returns:
        The file's metadata.
    """
    tensors, metadata = read_hq_weights(path)
    own = hq_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"{path} lacks HQ tensors {missing[:5]} ({len(missing)} in all)")
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tensors[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"HQ weights in {path} were trained on {metadata.get('base_model')!r} and do not fit this model "
            f"(shapes file vs model: {wrong[:3]}); pass the matching --segmenter"
        )
    recorded = metadata.get("base_model")
    if base_model is not None and recorded not in (None, base_model):
        logger.warning("HQ weights %s were trained on %s, loading them into %s", path, recorded, base_model)
    with torch.no_grad():
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return metadata
