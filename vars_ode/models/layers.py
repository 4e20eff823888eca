"""Building blocks shared by the host models: the convolutional stem, GFNet's global filter and the linear
classifier head of timm's protocol."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from timm.layers import to_2tuple
from torch import nn

from .._validation import check_choice

__all__ = ["ConvPatchEmbed", "GlobalFilter", "LinearHead"]


class ConvPatchEmbed(nn.Module):
    """Convolutional patch embedding ("early convolutions", Xiao et al., 2021).

    Replaces the single p x p, stride-p patchify convolution by log2(p) 3x3 stride-2
    convolution + BatchNorm + ReLU layers followed by one 1x1 convolution to ``embed_dim``. With
    ``channels=None`` the widths double up to ``embed_dim`` (e.g. 24, 48, 96, 192 for DeiT-Ti), the
    paper's choice for its ~1 GFLOP models.

    Accepts timm ``PatchEmbed``'s keywords so that it can be given to timm's ``VisionTransformer`` as
    ``embed_layer=``.

    Arguments:
        img_size: input size (int or (H, W)).
        patch_size: total stride p, a power of two >= 2 (16 gives 4 stride-2 convolutions).
        in_chans: input channels.
        embed_dim: output channels C.
        channels: widths of the 3x3 convolutions (length log2(p)); default doubles to ``embed_dim``.
        norm_layer: optional normalisation of the output tokens (timm's ``embed_norm_layer``).
        flatten: return (B, N, C) tokens rather than (B, C, H', W') maps.
        output_fmt: 'NHWC' returns (B, H', W', C) (used by timm's ``dynamic_img_size``).
        bias: bias of the final 1x1 convolution.
        strict_img_size: reject inputs whose size differs from ``img_size``.
        dynamic_img_pad: pad inputs to a multiple of p.

    Shapes:
        forward: (B, in_chans, H, W) -> (B, ceil(H/p) * ceil(W/p), C) (or as ``flatten`` / ``output_fmt`` say).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            channels: Optional[Sequence[int]] = None,
            norm_layer=None,
            flatten: bool = True,
            output_fmt: Optional[str] = None,
            bias: bool = True,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        patch = to_2tuple(patch_size)
        if patch[0] != patch[1] or patch[0] < 2 or patch[0] & (patch[0] - 1):
            raise ValueError(f"patch_size must be a square power of two >= 2, got {patch_size!r}")
        n = int(math.log2(patch[0]))
        if channels is None:
            channels = [max(1, embed_dim // 2 ** (n - 1 - i)) for i in range(n)]
        channels = list(channels)
        if len(channels) != n:
            raise ValueError(f"channels must have log2(patch_size) = {n} entries, got {channels!r}")
        if output_fmt not in (None, "NCHW", "NHWC", "NLC"):
            raise ValueError(f"output_fmt must be one of [None, 'NCHW', 'NHWC', 'NLC'], got {output_fmt!r}")

        self.patch_size = patch
        self.img_size = to_2tuple(img_size) if img_size is not None else None
        self.grid_size = self.grid_for(self.img_size, patch) if img_size else None
        self.num_patches = self.grid_size[0] * self.grid_size[1] if img_size else None
        self.output_fmt = output_fmt
        self.flatten = flatten if output_fmt is None else output_fmt == "NLC"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad

        layers = []
        c_in = in_chans
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False, **dd),
                       nn.BatchNorm2d(c, **dd), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.Conv2d(c_in, embed_dim, 1, bias=bias, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    @staticmethod
    def grid_for(img_size, patch_size) -> Tuple[int, int]:
        """The token grid of an input of ``img_size``: ``ceil(s / p)`` a side. Each 3x3 stride-2 convolution (padding
        1) maps a side s to ceil(s / 2), so a side that is not a multiple of p keeps its last, partial patch,
        padded (``dynamic_img_pad``) or not."""
        return tuple(-(-s // p) for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size)))

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid (H', W') for an input of size ``img_size`` (:meth:`grid_for`)."""
        return self.grid_for(img_size, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> tokens (B, N, C), or maps as configured."""
        H, W = x.shape[-2:]
        if self.strict_img_size and self.img_size is not None and (H, W) != self.img_size:
            raise ValueError(f"input size {(H, W)} does not match img_size {self.img_size} "
                             f"(build the model with img_size={(H, W)})")
        if self.dynamic_img_pad:
            ph = (-H) % self.patch_size[0]
            pw = (-W) % self.patch_size[1]
            x = nn.functional.pad(x, (0, pw, 0, ph))
        x = self.proj(x)                                   # (B, C, H', W')
        if self.output_fmt == "NHWC":
            return self.norm(x.permute(0, 2, 3, 1))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)               # (B, N, C)
            return self.norm(x)
        if not isinstance(self.norm, nn.Identity):
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class GlobalFilter(nn.Module):
    """GFNet's global filter (Rao et al., 2021): a learned per-channel filter in 2-D Fourier space.

    ``complex_weight`` has GFNet's name and shape (h, w // 2 + 1, C, 2) (real and imaginary parts).

    Arguments:
        dim: channels C.
        grid_size: token grid (h, w) the filter is defined on (fixed resolution).

    Shapes:
        forward: x (B, N, C) with N = h * w -> (B, N, C).
    """

    def __init__(self, dim: int, grid_size: Union[int, Tuple[int, int]] = 14, *, device=None, dtype=None):
        super().__init__()
        h, w = to_2tuple(grid_size)
        self.grid_size = (h, w)
        self.complex_weight = nn.Parameter(
            torch.randn(h, w // 2 + 1, dim, 2, device=device, dtype=dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h, w = self.grid_size
        if N != h * w:
            raise ValueError(f"GlobalFilter on a {h}x{w} grid got {N} tokens")
        dtype = x.dtype
        y = x.reshape(B, h, w, C)
        if y.dtype not in (torch.float32, torch.float64):  # FFTs of half types: compute in float32
            y = y.float()
        y = torch.fft.rfft2(y, dim=(1, 2), norm="ortho")
        y = y * torch.view_as_complex(self.complex_weight.to(y.real.dtype).contiguous())
        y = torch.fft.irfft2(y, s=(h, w), dim=(1, 2), norm="ortho")
        return y.reshape(B, N, C).to(dtype)


class LinearHead:
    """timm's classifier protocol for a host whose head is ``Linear(embed_dim, num_classes)`` over average-pooled
    features (a mixin: the host sets ``embed_dim``, ``num_classes`` and ``head``)."""

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            check_choice("global_pool", global_pool, ("avg",))
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
