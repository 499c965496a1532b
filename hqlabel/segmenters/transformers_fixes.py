"""A fix for ``transformers``' SAM-HQ mask decoder (seen in 5.24), applied to every HQ model HQLabel builds.

``SamHQMaskDecoder.forward`` runs the two-way transformer, then binds its image-token output to a variable
that it overwrites, and upscales the decoder's *input* image embedding instead, with height and width
transposed. Masks then ignore the prompt-image attention (IoU scores are unaffected). The reference SysCV code
and transformers' plain ``SamMaskDecoder`` upscale the transformer output. ``fix_sam_hq_mask_decoder`` makes a
model do that too, with two forward hooks and no weight or key changes; the parity tests against the official
``segment-anything-hq`` code (``tests/segmenters/test_checkpoints.py``) fail without it.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import SamHQModel


class _UpscaleTransformerOutput:
    """The two hooks of ``fix_sam_hq_mask_decoder`` (a class, not closures: a fixed model still pickles)."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None

    def keep(self, _module: nn.Module, _args: tuple, output: tuple[Tensor, Tensor]) -> None:
        self.tokens = output[1]  # B*N x 1 x hw x C: the image tokens after the two-way transformer

    def substitute(self, _module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor] | None:
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            return None
        (stale,) = args
        return (tokens.transpose(-1, -2).reshape(stale.shape),)  # B*N x C x h x w


def fix_sam_hq_mask_decoder(model: SamHQModel) -> SamHQModel:
    """Make ``model``'s mask decoder upscale the two-way transformer's output, as the reference HQ-SAM does.

    Two hooks, no weight or key changes (``save_pretrained`` is unaffected; the fix is not saved either): one
    keeps the transformer's updated image tokens, the other feeds them, laid out as B*N x C x h x w, to
    ``upscale_conv1`` in place of the stale, transposed tensor. Where ``transformers`` already passes the
    right tensor the hooks pass the same values, so applying the fix is always safe. Idempotent; returns
    ``model``.
    """
    decoder = model.mask_decoder
    if getattr(decoder, "_hqlabel_upscale_fixed", False):
        return model
    hooks = _UpscaleTransformerOutput()
    decoder.transformer.register_forward_hook(hooks.keep)
    decoder.upscale_conv1.register_forward_pre_hook(hooks.substitute)
    decoder._hqlabel_upscale_fixed = True
    return model
