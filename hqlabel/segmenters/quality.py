"""Mask quality signals computed from the decoder's logits, alongside the masks (no extra decoder call).

* ``HQLogitsCapture``: the HQ token's own logits of a ``SamHQModel`` decoder call. transformers returns SAM's
  logits + HQ's (or HQ's alone with ``hq_token_only``); with the HQ part kept, SAM's own mask logits are the
  difference, so SAM's mask and the HQ-corrected one come out of one decoder call.
* ``MaskSignals``: per mask, the stability score (computed on the final logits at the resolution the masks
  are thresholded at, the same tensor ``HQSamSegmenter.iter_masks`` thresholds) and the IoU of the final mask
  with SAM's own mask (at the model's input resolution, from the first of ``iter_masks``' two resizes, so
  that SAM's logits never take the full-resolution resize).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# SAM's automatic mask generator: ``stability_score_offset`` 1.0 around ``mask_threshold``.
STABILITY_OFFSET = 1.0


class HQLogitsCapture:
    """Forward hooks on a ``SamHQModel``'s mask decoder that rebuild the HQ token's logits of each call.

    The decoder computes ``masks_hq = hq_mask_mlp(hq_token) @ (mask_conv2(...) + hq_features)`` with
    ``hq_features = encoder_conv2(...) [+ compress_vit_conv2(...)]`` and returns ``masks_sam + masks_hq``; the
    hooks keep those four module outputs while ``enabled``, and the last one's hook redoes that one product
    at once (the same operands as the model's) and lets the feature maps go; ``hq_logits`` hands it over
    (B*N x 1 x 256 x 256 for N prompts). A class, not closures, so that a model with the hooks still pickles.
    """

    _MODULES = ("encoder_conv2", "compress_vit_conv2", "mask_conv2", "hq_mask_mlp")

    def __init__(self, decoder: nn.Module) -> None:
        self.enabled = False
        self.outputs: dict[str, Tensor] = {}
        for name in self._MODULES:
            getattr(decoder, name).register_forward_hook(_Keep(self, name))

    def start(self) -> None:
        self.enabled = True
        self.outputs = {}

    def hq_logits(self, n: int) -> Tensor:
        """The last call's HQ logits: n x 1 x h x w (n prompts, one image), and stop capturing."""
        self.enabled = False
        logits, self.outputs = self.outputs.pop("logits"), {}
        return logits.reshape(n, 1, *logits.shape[-2:])

    def _product(self) -> None:
        """Called as soon as the HQ token's hypernetwork output exists: the product, and the kept feature
        maps released (they would otherwise outlive the decoder call, B*N x 32 x 256 x 256 each)."""
        out = self.outputs
        self.outputs = {}
        features = out["mask_conv2"]  # B*N x C x h x w
        hq_features = out["encoder_conv2"]
        if "compress_vit_conv2" in out:
            hq_features = hq_features + out["compress_vit_conv2"]
        if hq_features.shape[0] != features.shape[0]:  # one image embedding shared by the prompts
            hq_features = hq_features.repeat_interleave(features.shape[0] // hq_features.shape[0], 0)
        features = features + hq_features
        c, h, w = features.shape[1:]
        hyper = out["hq_mask_mlp"].reshape(-1, 1, c)  # B*N x 1 x C
        self.outputs = {"logits": (hyper @ features.reshape(-1, c, h * w)).reshape(-1, h, w)}


class _Keep:
    def __init__(self, capture: HQLogitsCapture, name: str) -> None:
        self.capture, self.name = capture, name

    def __call__(self, _module: nn.Module, _args: tuple, output: Tensor) -> None:
        if self.capture.enabled:
            self.capture.outputs[self.name] = output
            if self.name == "hq_mask_mlp":  # the last of the four in the decoder's forward
                self.capture._product()


class MaskSignals:
    """Accumulates the stability score and the HQ-vs-SAM IoU of one image's masks while ``iter_masks``
    resizes them; ``result()`` gives N x K float32 tensors (N prompts, K masks each).

    Args:
        threshold: the segmenter's ``mask_threshold``.
        sam_logits: N x K x h x w SAM-only low-res logits (``MaskLogits.sam_logits``), or None: the final mask
            is SAM's (plain SAM), and the IoU is 1.0.
    """

    def __init__(self, threshold: float, sam_logits: Tensor | None) -> None:
        self.threshold = threshold
        self.sam_logits = sam_logits
        self.stability: list[Tensor] = []
        self.agreement: list[Tensor] = []
        self._counts: Tensor | None = None

    def input_frame(self, final: Tensor, sam: Tensor | None) -> None:
        """One chunk of prompts at the model's input resolution: n x K x ... final and SAM logits."""
        if sam is None:
            self.agreement.append(final.new_ones(final.shape[:2]))
            return
        self.agreement.append(mask_iou(final > self.threshold, sam > self.threshold))

    def output_frame(self, logits: Tensor, *, last: bool = True) -> None:
        """Final logits at the output resolution: a chunk of prompts (n x K x ...), or one strip of rows of
        them (``last``: the chunk's final strip)."""
        counts = torch.stack(
            [
                (logits > self.threshold + STABILITY_OFFSET).sum((-2, -1)),
                (logits > self.threshold - STABILITY_OFFSET).sum((-2, -1)),
            ]
        )
        self._counts = counts if self._counts is None else self._counts + counts
        if last:
            high, low = self._counts
            # an empty low-threshold mask: nothing is unstable (SAM's generator divides by zero here)
            self.stability.append(torch.where(low > 0, high / low.clamp(min=1), 1.0).float())
            self._counts = None

    def result(self) -> tuple[Tensor, Tensor]:
        """``(stability, hq_sam_iou)``, N x K float32 each, on the segmenter's device."""
        return torch.cat(self.stability), torch.cat(self.agreement)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boolean masks over the last two axes (1.0 when both are empty)."""
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).float()
