"""The official code's VARS-D / VARS-SD attention modules (github bfshi/VARS, ``vars_block.py``), as a layer class.

:class:`OfficialVARSAttention` is what ``VARSLayer(..., compat="official")`` builds (also through
``VARSLayer.configure`` and the host models' ``compat="official"``). It is a :class:`vars_ode.VARSLayer`: the
same projections, prefix handling, statistics (``last_stats``), attention maps and timm drop-in arguments,
with the official module's parameters and its solve in place of the library's dictionaries and solvers. Its
parameter names and shapes are the official module's, so an official ``state_dict`` loads with ``strict=True``:

* ``qkv.weight`` ``(2C, C)`` (``qkv.bias`` with ``qkv_bias``), ``proj.weight`` ``(C, C)``, ``proj.bias`` ``(C,)``;
* ``rand_matrix`` ``(h, dh, m)``: a frozen Gaussian matrix stored as a parameter (``requires_grad=False``);
* ``L`` ``(h,)``: an unused parameter of the official module (initialised to 25), kept for loading;
* ``learned_k`` ``(m', m')`` (``m' = m``, or ``2m`` for ``"sd"``): the matrix ``W`` (init identity) turning
  ``K`` into ``W K W``; ``learned_lam`` ``(1,)`` and ``learned_L`` ``(1,)`` (init 1);
* ``"sd"`` only: ``kernel`` ``(1, h, image_size**2, m)``, the learned static atoms at a fixed resolution
  (``N`` must equal ``image_size**2``: no prefix tokens, no other resolution).

Its numerics: features ``exp(w^T q^ - 1/2) / sqrt(m)`` of L2-normalised queries
(:func:`vars_ode.dictionaries.positive_random_features` without stabilisation), concatenated with ``kernel`` for
``"sd"``, columns normalised over tokens; ``L = max row L1 norm of K + 1`` (detached), divided by ``learned_L``;
``lam`` times ``learned_lam``; initial code ``g(P^T v, lam)``; ``steps`` (default 5) steps
``u <- g(u - (W K W u - P^T v) / L, lam / L)`` with ``g(x, t) = sign(x) GELU(|x| - t)``; output ``proj(P u)``
(``residual="none"`` by default). The official VARS-S is a whole block (BatchNorm, MLP, FFT templates), not an
attention module, so only ``"d"`` and ``"sd"`` exist here; the official loop is ISTA with unrolled gradients and
a fixed number of steps, so ``solver``, ``grad`` and ``steps`` accept only those.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dictionaries import positive_random_features
from .layer import COMPAT_CLASSES, LayerStats, VARSLayer
from .ops import _kkt_residual_gram


def _gelu_threshold(t, thr):
    # the official shrinkage g(x, t) = sign(x) GELU(|x| - t)
    return torch.sign(t) * F.gelu(t.abs() - thr)


class OfficialVARSAttention(VARSLayer):
    """The official VARS-D (``dictionary="d"``) or VARS-SD (``"sd"``) attention module; arguments as
    :class:`vars_ode.VARSLayer` (``compat`` must be ``"official"``; ``steps`` defaults to 5, ``residual`` to
    ``"none"``; ``image_size`` is the token grid side of the ``"sd"`` kernel)."""

    default_steps, default_residual = 5, "none"

    def __init__(self, dim: int, num_heads: int = 8, *, compat: str = "official", **kwargs):
        if compat != "official":
            raise ValueError(f"OfficialVARSAttention is the compat='official' layer, got compat={compat!r}; "
                             "use VARSLayer for compat='paper'")
        super().__init__(dim, num_heads, compat=compat, **kwargs)

    def _build_dictionary(self, cfg):
        if self.dictionary_kind == "s":
            raise ValueError("compat='official' supports dictionary 'd' or 'sd': the official VARS-S is a whole "
                             "block (BatchNorm, MLP, FFT templates); use dictionary='s' with compat='paper'")
        if cfg["static"] == "dense":
            raise ValueError("static='dense' is for compat='paper' (the official 'sd' has its own learned atoms)")
        h, dh, m = self.num_heads, self.head_dim, self.num_features
        dd = dict(device=cfg["device"], dtype=cfg["dtype"] or torch.float32)
        self.rand_matrix = nn.Parameter(torch.randn(h, dh, m, **dd), requires_grad=False)
        if self.dictionary_kind == "sd":
            self.image_size = cfg["image_size"]
            self.kernel = nn.Parameter(torch.randn(1, h, self.image_size ** 2, m, **dd))
        self.L = nn.Parameter(torch.full((h,), 25.0, **dd), requires_grad=False)
        mm = 2 * m if self.dictionary_kind == "sd" else m
        self.learned_k = nn.Parameter(torch.eye(mm, **dd))
        self.learned_lam = nn.Parameter(torch.ones(1, **dd))
        self.learned_L = nn.Parameter(torch.ones(1, **dd))
        self.dictionary = None

    def _check_solver(self, solver, steps, tol, grad):
        if solver != "ista" or grad != "unroll":
            raise ValueError(f"compat='official' runs the official unrolled ISTA loop: solver must be 'ista' and grad "
                             f"'unroll', got solver={solver!r}, grad={grad!r}")
        if steps is None:
            raise ValueError("steps=None (solve to equilibrium) is not available with compat='official'")
        return super()._check_solver(solver, steps, tol, grad)

    def _fusable(self) -> bool:
        return False

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new ``rand_matrix`` (standard Gaussian, as the official module's initialisation)."""
        with torch.no_grad():
            self.rand_matrix.copy_(torch.randn(self.rand_matrix.shape, generator=generator,
                                               dtype=torch.float64).to(self.rand_matrix))

    def _sparse(self, q, v, N):
        B = v.shape[0]
        phi = positive_random_features(q, self.rand_matrix, stabilize=False, normalize=False)
        if self.dictionary_kind == "sd":
            if N != self.kernel.shape[2]:
                raise ValueError(f"compat='official' with dictionary 'sd' has a fixed-resolution kernel of "
                                 f"{self.kernel.shape[2]} tokens (image_size={self.image_size}), got N = {N}")
            phi = torch.cat([phi, self.kernel.to(q.dtype).expand(B, -1, -1, -1)], dim=-1)
        phi = F.normalize(phi, p=2, dim=-2)
        K = phi.transpose(-1, -2) @ phi
        Bm = phi.transpose(-1, -2) @ v
        L = K.abs().sum(-1).amax(-1).detach()[..., None, None] + 1
        lam = self.learned_lam.to(q.dtype) * self.lam
        L = L / self.learned_L.to(q.dtype)
        Wk = self.learned_k.to(q.dtype)
        Kw = Wk @ K @ Wk
        u = _gelu_threshold(Bm, lam)
        record = [u.detach()] if self.record_maps else None
        for _ in range(self.steps):
            u = _gelu_threshold(u - (Kw @ u - Bm) / L, lam / L)
            if record is not None:
                record.append(u.detach())
        Kd, Bd, ud, lamd = Kw.detach(), Bm.detach(), u.detach(), lam.detach()
        self.last_stats = LayerStats("ista", "iterations", torch.tensor(self.steps), (ud,),
                                     lambda: _kkt_residual_gram(Kd, Bd, ud, lamd), lambda i, t, op="sum": t.sum(-2))
        u = self.attn_drop(u)
        if record is not None:
            with torch.no_grad():
                self.last_maps = torch.stack([(phi @ c).abs().mean((1, 3)) for c in record[1:]], 1)
        return phi @ u


COMPAT_CLASSES["official"] = OfficialVARSAttention
