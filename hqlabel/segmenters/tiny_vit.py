"""TinyViT, the image encoder of Light HQ-SAM (``sam_hq_vit_tiny.pth``), in plain torch.

Ported from ``segment_anything_hq/modeling/tiny_vit_sam.py`` (SysCV sam-hq, MIT licence; itself MobileSAM's
SAM adaptation of TinyViT, https://github.com/microsoft/Cream/tree/main/TinyViT, Copyright (c) 2022 Microsoft,
MIT licence; TinyViT adapts LeViT and Swin Transformer). Changes from the original: no ``timm`` dependency
(no drop path, which is inference-only identity in the released model; no classification head, which SAM
never calls), a ``TinyViTConfig`` dataclass, attention through ``scaled_dot_product_attention`` with the
learned biases as an additive mask, and the output grid computed from ``img_size`` (the original hard-codes
64 x 64). Module and parameter names are the original's, so a checkpoint's ``image_encoder.*`` tensors load
under the same names.

Layout (released ``vit_tiny``: embed dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10, windows
7/7/14/7, 1024 px input): a two-convolution stem (stride 4), a stage of MBConv blocks, then three stages of
windowed-attention blocks; every stage but the last ends in a patch merging that halves the grid, except
the one into the last stage (stride 1), so the output grid is ``img_size / 16`` (64 x 64), as ViT-SAM's.
A neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps it to ``out_chans`` (256) channels.

HQ-SAM's fused feature (``interm_embeddings[0]``) is the output of stage 1 after its patch merging:
B x 64 x 64 x ``embed_dims[2]`` (160), the ``vit_dim`` of the Light HQ-SAM mask decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionEncoderOutput


@dataclass
class TinyViTConfig:
    """TinyViT hyper-parameters; the defaults are the released Light HQ-SAM encoder (``build_sam_vit_t``)."""

    img_size: int = 1024
    in_chans: int = 3
    embed_dims: list[int] = field(default_factory=lambda: [64, 128, 160, 320])
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [2, 4, 5, 10])
    window_sizes: list[int] = field(default_factory=lambda: [7, 7, 14, 7])
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256

    def __post_init__(self) -> None:
        lengths = {len(self.embed_dims), len(self.depths), len(self.num_heads), len(self.window_sizes)}
        if lengths != {4}:
            raise ValueError(
                "TinyViT has 4 stages: embed_dims, depths, num_heads and window_sizes need 4 entries each, "
                "got "
                f"{self.embed_dims}, {self.depths}, {self.num_heads}, {self.window_sizes}"
            )
        if self.img_size % 16:
            raise ValueError(f"TinyViT's img_size must be a multiple of 16 (stride 16), got {self.img_size}")
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:], strict=True):
            if dim % heads:
                raise ValueError(f"TinyViT stage width {dim} is not divisible by its {heads} heads")

    @property
    def grid(self) -> int:
        """Side of the output embedding grid: ``img_size / 16``."""
        return self.img_size // 16

    def to_dict(self) -> dict:
        return asdict(self)


class Conv2d_BN(nn.Sequential):  # the original's name
    """Convolution without bias, then BatchNorm (keys ``c.*``, ``bn.*``)."""

    def __init__(
        self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_weight_init=1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convolutions, B x 3 x S x S -> B x D x S/4 x S/4."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project), on B x C x H x W."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2d_BN(dim, hidden, ks=1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2d_BN(hidden, dim, ks=1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Between stages: 1x1 conv to ``out_dim``, depthwise 3x3 conv with ``stride``, 1x1 conv.

    Takes B x C x H x W or B x HW x C tokens (of an ``input_resolution`` grid); returns B x H'W' x out_dim.
    """

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(len(x), h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x).flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear (B x N x C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Multi-head self-attention over one window (B x N x C), with a learned bias per head and per
    (|dy|, |dx|) offset between the window's positions (LeViT's attention bias)."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))  # one per |dy|, |dx|

    def bias_index(self, device: torch.device) -> Tensor:
        """N x N (N = window**2, row-major positions): the bias column of each pair, ``|dy| * window + |dx|``.

        The original enumerates the offsets in order of first appearance over ``itertools.product`` of the
        positions, which is this order (the first position, (0, 0), meets every offset in row-major order);
        computed here instead of kept as a non-persistent buffer, which loading on the meta device would leave
        uninitialised."""
        r = torch.arange(self.window, device=device)
        ys, xs = r.repeat_interleave(self.window), r.repeat(self.window)
        return (ys[:, None] - ys[None]).abs() * self.window + (xs[:, None] - xs[None]).abs()

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.key_dim, dim=-1)  # B x heads x N x key_dim each
        bias = self.attention_biases[:, self.bias_index(x.device)].to(q.dtype)  # heads x N x N
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows), depthwise local conv, MLP; on B x HW x C tokens."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        pad = local_conv_size // 2
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=pad, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        (h, w), ws = self.input_resolution, self.window_size
        b, length, c = x.shape
        if h == ws and w == ws:
            y = self.attn(x)
        else:
            y = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            y = self.attn(y)
            y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            y = y[:, :h, :w].reshape(b, length, c)
        x = x + y
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then (except in the last stage) patch merging."""

    def __init__(self, blocks: list[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of B x C x H x W (eps 1e-6, as SAM's)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class TinyViT(nn.Module):
    """The Light HQ-SAM image encoder; a drop-in ``SamHQModel.vision_encoder``.

    ``forward(pixel_values)`` (B x 3 x S x S, normalised and padded) returns ``SamHQVisionEncoderOutput``
    with ``last_hidden_state`` B x ``out_chans`` x S/16 x S/16 (the image embedding) and
    ``intermediate_embeddings`` ``[B x S/16 x S/16 x embed_dims[2]]`` (the early feature HQ-SAM fuses).
    """

    attention_implementation = "sdpa"

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.config = config
        dims, depths = config.embed_dims, config.depths
        self.patch_embed = PatchEmbed(config.in_chans, dims[0])
        side = config.img_size // 4
        # stage i runs on grid side / 2**i, except the last, which keeps stage 2's grid (stride-1 merging)
        sides = [side, side // 2, side // 4, side // 4]
        self.layers = nn.ModuleList()
        for i in range(4):
            downsample = None
            if i < 3:
                stride = 1 if i == 2 else 2
                downsample = PatchMerging((sides[i], sides[i]), dims[i], dims[i + 1], stride)
            if i == 0:
                self.layers.append(ConvLayer(dims[0], depths[0], config.mbconv_expand_ratio, downsample))
                continue
            blocks = [
                TinyViTBlock(
                    dims[i],
                    (sides[i], sides[i]),
                    config.num_heads[i],
                    config.window_sizes[i],
                    config.mlp_ratio,
                    config.local_conv_size,
                )
                for _ in range(depths[i])
            ]
            self.layers.append(BasicLayer(blocks, downsample))
        out = config.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Random init (the original's, plus variance-preserving convolutions: with the BatchNorms' unit
        running statistics a random encoder's signal then survives its ~20 convolutions)."""
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(self, pixel_values: Tensor, **_kwargs) -> SamHQVisionEncoderOutput:
        grid = self.config.grid
        if pixel_values.shape[-2:] != (self.config.img_size, self.config.img_size):
            raise ValueError(
                f"TinyViT takes {self.config.img_size} x {self.config.img_size} inputs (resized and padded "
                f"by the processor), got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.layers[0](self.patch_embed(pixel_values))
        x = self.layers[1](x)
        early = x.view(len(x), grid, grid, -1)  # stage 1 after its patch merging: HQ-SAM's fused feature
        x = self.layers[3](self.layers[2](x))
        x = self.neck(x.view(len(x), grid, grid, -1).permute(0, 3, 1, 2))
        return SamHQVisionEncoderOutput(last_hidden_state=x, intermediate_embeddings=[early])
