"""The attention of the paper's starred baselines: Performer (FAVOR+) linear attention.

The paper's modified baselines (DeiT*, RVT*; Shi et al. 2022, Sec. 4 "Experimental Setup") replace
softmax attention by the Performer approximation (Choromanski et al., 2020), on which VARS-D is also
built. The softmax kernel exp(q.k) is approximated by an inner product of positive random features,

    phi(x) = exp(W^T x - ||x||^2 / 2) / sqrt(m),        W: (head_dim, m) with N(0, 1) entries,

so that attention becomes linear in the number of tokens N:

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j)).

The official code (bfshi/VARS ``Performer_Attention``) L2-normalises queries and keys before the
feature map, keeps W frozen (shape (heads, head_dim, m), m = 2 head_dim), and forms the N x N matrix
explicitly before normalising its rows; :class:`PerformerAttention` computes the same quantity in
O(N m head_dim) and uses the same parameter names (``qkv``, ``proj``, ``rand_matrix``), so an official
RVT* checkpoint loads into it.

:data:`SelfAttention` is timm's softmax attention, re-exported so that both baselines are reachable
from one place.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from timm.layers import Attention as SelfAttention
from torch import nn

__all__ = ["MaskedSelfAttention", "PerformerAttention", "SelfAttention", "positive_random_features"]


class MaskedSelfAttention(SelfAttention):
    """Softmax attention with RVT+'s learned position-aware scaling (the official ``rvt_*_plus`` models):
    the scaled logits ``q.k / sqrt(d)`` are multiplied by ``sigmoid(att_mask)``, a learned
    (heads, N, N) table for a fixed number N of tokens, before the softmax.

    ``att_mask`` starts at zero (every logit halved); the official code leaves it uninitialised.
    As a host's attention layer: ``functools.partial(MaskedSelfAttention, num_tokens=N)``.

    Shapes:
        forward: x (B, N, C) -> (B, N, C), N = ``num_tokens``.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_tokens: int = 196, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.num_tokens = int(num_tokens)
        self.att_mask = nn.Parameter(torch.zeros(num_heads, self.num_tokens, self.num_tokens))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("MaskedSelfAttention takes no attn_mask / is_causal (its mask is learned)")
        B, N, C = x.shape
        if N != self.num_tokens:
            raise ValueError(f"MaskedSelfAttention has a learned mask for {self.num_tokens} tokens, got {N}")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = (attn * torch.sigmoid(self.att_mask)).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def positive_random_features(x: torch.Tensor, proj: torch.Tensor, *, normalize: bool = True,
                             stabilize_dims: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """FAVOR+ positive random features of the rows of ``x``.

    Arguments:
        x: (..., H, N, d) queries or keys, one head per slice of dimension -3.
        proj: (H, d, m) Gaussian projection, one (d, m) matrix per head.
        normalize: L2-normalise each row of ``x`` first (official VARS behaviour); otherwise scale it
            by d^(-1/4), which makes phi(q).phi(k) an unbiased estimate of exp(q.k / sqrt(d)).
        stabilize_dims: if given, subtract the maximum of the exponent over these dimensions (a
            constant factor that cancels in the attention's ratio: use (-1,) for queries and
            (-2, -1) for keys) to avoid overflow.

    Returns:
        (..., H, N, m) non-negative features exp(W^T x - ||x||^2 / 2) / sqrt(m).
    """
    m = proj.shape[-1]
    if normalize:
        x = F.normalize(x, dim=-1)
    else:
        x = x * x.shape[-1] ** -0.25
    logits = x @ proj - x.pow(2).sum(dim=-1, keepdim=True) / 2
    if stabilize_dims is not None:
        logits = logits - logits.amax(dim=stabilize_dims, keepdim=True).detach()
    return torch.exp(logits) * m ** -0.5


class PerformerAttention(nn.Module):
    """Multi-head Performer attention with positive random features (linear in the token count).

    Same constructor keywords as timm's ``Attention`` (so it can be passed as ``attn_layer=`` to timm's
    ``VisionTransformer``/``Block``), plus the random-feature options.

    Arguments:
        dim: token dimension C.
        num_heads: number of heads H.
        attn_head_dim: per-head dimension d (default C // H).
        dim_out: output dimension (default C).
        qkv_bias, proj_bias: biases of the input and output projections.
        qk_norm: apply ``norm_layer`` to queries and keys per head (before the feature map).
        scale_norm: apply ``norm_layer`` to the attention output before the projection.
        gated: multiply the attention output by a sigmoid gate computed from the input.
        attn_drop: must be 0: linear attention never forms the attention matrix to drop from.
        proj_drop: dropout after the output projection.
        norm_layer: normalisation constructor used by ``qk_norm`` / ``scale_norm``.
        rand_feat_dim_ratio: m = ratio * d random features per head (official: 2).
        num_random_features: m, overriding ``rand_feat_dim_ratio``.
        normalize_qk: L2-normalise queries and keys before the feature map (official VARS code);
            False gives the textbook FAVOR+ estimate of exp(q.k / sqrt(d)).
        eps: floor of the row normaliser (official: F.normalize's 1e-12).

    Shapes:
        forward: x (B, N, C) -> (B, N, dim_out).

    The frozen projection ``rand_matrix`` (H, d, m) is a persistent buffer: it is saved and loaded
    with the state dict but is not a trainable parameter.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: Optional[int] = None,
            dim_out: Optional[int] = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            *,
            rand_feat_dim_ratio: float = 2,
            num_random_features: Optional[int] = None,
            normalize_qk: bool = True,
            eps: float = 1e-12,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if attn_drop:
            raise ValueError(
                f"attn_drop must be 0 for PerformerAttention (linear attention forms no attention "
                f"matrix to drop from), got {attn_drop!r}")
        if num_random_features is None:
            if not rand_feat_dim_ratio or rand_feat_dim_ratio <= 0:
                raise ValueError(f"rand_feat_dim_ratio must be positive, got {rand_feat_dim_ratio!r}")
            num_random_features = int(round(rand_feat_dim_ratio * head_dim))
        if not isinstance(num_random_features, int) or num_random_features <= 0:
            raise ValueError(f"num_random_features must be a positive integer, got {num_random_features!r}")
        dim_out = dim_out or dim

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.num_random_features = num_random_features
        self.normalize_qk = normalize_qk
        self.eps = eps

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("rand_matrix", torch.randn(num_heads, head_dim, num_random_features, **dd))

    @classmethod
    def configure(cls, **defaults) -> type:
        """A subclass whose constructor uses ``defaults`` for the given keywords.

        timm builds attention as ``attn_layer(dim, num_heads=..., qkv_bias=..., ...)`` and needs a
        class, so options such as ``rand_feat_dim_ratio`` are bound here rather than by a partial.
        """
        parent = cls

        class Configured(parent):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**defaults, **kwargs})

        Configured.__name__ = Configured.__qualname__ = cls.__name__
        Configured.__module__ = cls.__module__
        return Configured

    def redraw_features(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw a fresh Gaussian projection in place."""
        with torch.no_grad():
            self.rand_matrix.copy_(torch.randn(self.rand_matrix.shape, generator=generator,
                                               dtype=self.rand_matrix.dtype).to(self.rand_matrix.device))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, dim_out). Masks are not supported by this linear attention."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported by PerformerAttention "
                             "(pass attn_mask=None and is_causal=False)")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # (B, H, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        proj = self.rand_matrix.to(q.dtype)
        # Unit-norm inputs keep the exponent in [-|w| - 1/2, |w| - 1/2]: no stabiliser needed (and
        # none in the official code); unnormalised ones subtract maxima that cancel in the ratio.
        raw = not self.normalize_qk
        phi_q = positive_random_features(q, proj, normalize=self.normalize_qk,
                                         stabilize_dims=(-1,) if raw else None)
        phi_k = positive_random_features(k, proj, normalize=self.normalize_qk,
                                         stabilize_dims=(-2, -1) if raw else None)
        kv = phi_k.transpose(-2, -1) @ v                          # (B, H, m, d)
        k_sum = phi_k.sum(dim=-2).unsqueeze(-1)                    # (B, H, m, 1)
        out = (phi_q @ kv) / (phi_q @ k_sum).clamp_min(self.eps)    # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
