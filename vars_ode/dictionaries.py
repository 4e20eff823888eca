"""Dictionaries of a VARS layer: static (VARS-S), dynamic (VARS-D) and their union (VARS-SD).

A dictionary is an ``nn.Module`` holding what is learned or drawn once (templates, random
projections). Given one input it is *bound* (:meth:`~StaticDictionary.bind`) to an :class:`Atoms`
object, the operator ``P`` of that input, which offers

* ``decode(code) = P u`` and ``encode(x) = P^T x`` (exact adjoints of each other),
* ``gram_apply(code) = P^T P u`` and, where it is small, the Gram matrix itself (:meth:`Atoms.gram`),
* ``lipschitz()``: a bound on the largest eigenvalue of ``P^T P`` per problem.

Layout (one attention layer, ``h`` heads of ``dh`` channels, ``N`` tokens, ``C = h * dh``):

* signals are ``(B, h, N, dh)``: each of the ``B * C`` channels is one LASSO problem over tokens
  (paper Eq. 16: every channel ``X^mu`` is reconstructed separately);
* a code is a *tuple of blocks* (one per kind of atom):
  dynamic block ``(B, h, m, dh)`` (``m`` random features per head, shared by the head's channels),
  static block ``(B, h, dh, r, H, W)`` (``r`` templates per channel at every grid position);
* per-problem quantities (``L``, ``lam``, residuals) broadcast to ``(B, h, dh)``;
  :meth:`Atoms.expand` turns them into a block's shape and :meth:`Atoms.reduce` reduces a block
  back to them.

Static dictionary (paper Sec. 3.5): ``P^T`` is a depthwise convolution of each channel's token
grid with ``r`` learned ``k x k`` templates (``groups = C``), ``P`` the transposed convolution with
the same kernel, so the atoms are all translations of the templates and the dictionary works at
any resolution. Templates are used normalised to unit L2 norm. Padding is ``"zeros"`` (atoms are
cut at the border) or ``"circular"`` (as the official code's FFT templates). Prefix tokens (a CLS
token) are not on the grid: the static atoms are zero there, ``encode`` ignores them and
``decode`` returns zeros at them (the layer decides what a prefix token receives, see
:mod:`vars_ode.layer`). The Lipschitz bound is exact for circular padding and an upper bound for
zero padding: the largest, over the frequencies of an FFT of size ``(H + k - 1, W + k - 1)``
(``(H, W)`` when circular), of ``sum_j |k_j^(omega)|^2``, per channel.

Dynamic dictionary (paper Eq. 16, official code): ``Phi(Q)`` are positive random features of the
queries (Performer / FAVOR+): each query is L2-normalised, then
``phi(q)_j = exp(w_j^T q - |q|^2 / 2) / sqrt(m)`` with ``w_j`` Gaussian (optionally orthogonal), and
every atom (a column of ``Phi``, a function over tokens) is normalised to unit L2 norm over the
tokens, as in the official code. The largest value per atom is subtracted inside the exponential
for numerical stability; it cancels exactly in the column normalisation. Its Gram matrix
``K = Phi^T Phi`` is ``(B, h, m, m)``: the token count never enters the iteration.

Union (VARS-SD): the atoms of both, code ``(dynamic block, static block)``; its Lipschitz bound is
the sum of the two (``||[A B]||^2 <= ||A||^2 + ||B||^2``).

Dense static atoms (:class:`DenseStaticDictionary`, the layer's ``static="dense"``): ``m_s`` learned
maps over the token grid per head, shared by the head's channels, as the official VARS-SD's static
part. Appended to the random features they keep the small Gram form of VARS-D (a
:class:`DynamicAtoms` over ``m + m_s`` raw columns), which the convolutional templates, being
``r * H * W`` atoms per channel, cannot.

Bound atoms are :class:`vars_ode.lasso.Operator` s: every solver of :mod:`vars_ode.solvers` runs on them
(:func:`vars_ode.solvers.solve_operator`), in operator form (``gram_apply`` instead of a matrix) for the static
and union dictionaries, whose Gram matrices (``rHW x rHW`` per channel) are too large to form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_positive
from .lasso import SPIKE_RATIO, Operator, RankOneMetric, _bcast, dominant, rank_one_split, reduce_over
from .ops import lipschitz_constant

PADDINGS = ("zeros", "circular")

#: :data:`vars_ode.lasso.SPIKE_RATIO` for the union with the convolutional templates (:meth:`UnionAtoms.metric`),
#: whose templates' block, 38x the features' at DeiT-Ti's width, takes the scalar steps: there the metric costs
#: little per iteration
UNION_SPIKE_RATIO = 2.0
#: the weight ``e`` with which :meth:`UnionAtoms.metric` splits the coupling of features and templates: ``1 + e`` on
#: the features' block, ``1 + 1 / e`` on the templates' (3 took the fewest FISTA iterations of 1, 2, 3 and
#: ``L_s / lambda_2`` per problem on a DeiT-Ti-width layer; benchmarks/RESULTS.md, twenty-seventh session)
UNION_SPLIT = 3.0


class Atoms(Operator):
    """The dictionary of one input: ``P`` as an operator (a :class:`vars_ode.lasso.Operator` for ``K = P^T P``,
    with ``encode`` and ``decode`` besides). Codes are tuples of tensors (blocks); signals are ``(B, h, N, dh)``;
    per-problem tensors broadcast to ``(B, h, dh)``.
    """

    def encode(self, x: torch.Tensor) -> tuple:
        """``P^T x``: ``(B, h, N, dh)`` signal -> code tuple."""
        raise NotImplementedError

    def decode(self, code: tuple) -> torch.Tensor:
        """``P u``: code tuple -> ``(B, h, N, dh)`` signal."""
        raise NotImplementedError

    def gram_apply(self, code: tuple) -> tuple:
        """``P^T P u``, code tuple -> code tuple."""
        return self.encode(self.decode(code))

    def recipe(self) -> tuple:
        """``(factory, args, kwargs)``: plain values and detached tensors from which :func:`rebuild` makes the
        same operator, without gradients. A layer's statistics keep this instead of the object, which
        torch.compile cannot carry out of a compiled graph."""
        raise NotImplementedError


def rebuild(recipe: tuple) -> Atoms:
    """The operator of :meth:`Atoms.recipe`."""
    factory, args, kwargs = recipe
    return factory(*args, **kwargs)


class DynamicAtoms(Atoms):
    """Random-feature atoms ``Phi = F D^{-1}`` of shape ``(B, h, N, m)`` (columns are atoms over tokens).

    ``F`` (``raw``) are the positive features and ``D`` the diagonal of their column norms: the
    normalisation is applied on the code side (``Phi u = F (D^{-1} u)``, ``Phi^T x = D^{-1} F^T x``,
    ``K = D^{-1} F^T F D^{-1}``), so no ``N x m`` tensor is rescaled. ``phi`` gives the normalised matrix.
    """

    num_blocks = 1

    def __init__(self, raw: torch.Tensor, *, lipschitz: str = "power", power_iters: int = 10):
        self.raw = raw
        d = raw.square().sum(-2)  # the columns' squared norms, (B, h, m)
        self.inv_norm = d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt().unsqueeze(-1)  # (B, h, m, 1)
        self._K = None  # formed on request (gram): the operator form (encode / decode) never needs it with a graph
        # (rank_one_split of K, whether K is finite), at the first split(): active_set asks at every chunk
        self._split = None
        self.lipschitz_method = lipschitz
        self.power_iters = power_iters

    @property
    def phi(self) -> torch.Tensor:
        """The normalised atoms ``(B, h, N, m)`` (formed on request)."""
        return self.raw * self.inv_norm.transpose(-1, -2)

    def encode(self, x):
        return ((self.raw.transpose(-1, -2) @ x) * self.inv_norm,)

    def decode(self, code):
        return self.raw @ (code[0] * self.inv_norm)

    def gram(self):
        """``K = D^{-1} F^T F D^{-1}``, ``(B, h, m, m)``, formed at the first request with its graph to ``raw``
        (where ``raw`` has one), whatever the grad mode of that request: a solver may ask first under
        ``no_grad`` and an implicit gradient later, through the same ``K``."""
        if self._K is None:
            with torch.enable_grad():
                self._K = self._gram_of(self.raw, self.inv_norm)
        return self._K

    @staticmethod
    def _gram_of(raw, inv_norm):
        return (raw.transpose(-1, -2) @ raw) * inv_norm * inv_norm.transpose(-1, -2)

    def gram_apply(self, code):
        return (self.gram() @ code[0],)

    def lipschitz(self):
        """``(B, h, 1)``: the top eigenvalue of ``K`` by ``lipschitz`` (``"power"``: a few power
        iterations, no host synchronisation; ``"eigvalsh"``: exact; ``"official"``: max row L1 + 1).
        Without a graph: where ``K`` is not formed (the operator form), it is formed here from detached
        features and dropped, so that the backward pass never goes through a Gram matrix the solve did not use."""
        return lipschitz_constant(self._detached_gram(), self.lipschitz_method, iters=self.power_iters).unsqueeze(-1)

    def _detached_gram(self):
        if self._K is not None:
            return self._K.detach()
        with torch.no_grad():
            return self._gram_of(self.raw.detach(), self.inv_norm.detach())

    def split(self, min_ratio: float = SPIKE_RATIO):
        """``K = lambda_1 v v^T + R``, ``R <= lambda_2 I`` per image and head (:func:`vars_ode.lasso.rank_one_split`):
        ``(lambda_1, v, lambda_2)`` of shapes ``(B, h, 1)``, ``(B, h, m, 1)``, ``(B, h, 1)``, or ``None`` where some
        head's ``lambda_1`` is less than ``min_ratio`` times its ``lambda_2`` (a metric would not pay), or ``K`` is
        not finite."""
        if self._split is None:
            K = self._detached_gram()
            finite = torch.isfinite(K).all()  # decided with the gate, in one read (lasso.dominant)
            zero = torch.zeros((), dtype=K.dtype, device=K.device)
            self._split = rank_one_split(torch.where(finite, K, zero)), finite
        split, finite = self._split
        if not dominant(split, min_ratio, finite):
            return None
        lam1, v, lam2 = split
        return lam1.unsqueeze(-1), v.unsqueeze(-1), lam2.unsqueeze(-1)

    def metric(self):
        """``lambda_2 I + (lambda_1 - lambda_2) v v^T`` (:class:`vars_ode.lasso.RankOneMetric`): the positive features'
        mean atom takes the short step alone."""
        split = self.split()
        if split is None:
            return None
        lam1, v, lam2 = split
        return RankOneMetric((lam2,), v, lam1 - lam2)

    def expand(self, i, t):
        return _bcast(t, lambda s: s.unsqueeze(-2))

    def reduce_dims(self, i):
        return -2

    def roots(self):
        return (self.raw,)

    def recipe(self):
        return DynamicAtoms, (self.raw.detach(),), dict(lipschitz=self.lipschitz_method, power_iters=self.power_iters)

    def with_roots(self, roots):
        return DynamicAtoms(roots[0], lipschitz=self.lipschitz_method, power_iters=self.power_iters)


class StaticAtoms(Atoms):
    """Convolutional atoms: ``r`` normalised templates per channel, translated over an ``H x W`` grid."""

    num_blocks = 1

    def __init__(self, kernel: torch.Tensor, num_heads: int, atoms_per_channel: int, grid: tuple,
                 num_prefix_tokens: int, padding: str):
        # kernel: (C * r, 1, k, k), already normalised
        self.kernel = kernel
        self.h, self.r = num_heads, atoms_per_channel
        self.H, self.W = grid
        self.p = num_prefix_tokens
        self.padding = padding
        self.pad = kernel.shape[-1] // 2
        self._matrices = None  # (C, H W, r H W), built at the first use on a MATRIX_DEVICES device

    def _as_matrices(self, device) -> bool:
        # whether P^T and P run as per-channel matrix products (see MATRIX_DEVICES)
        return (device.type in MATRIX_DEVICES and self.padding == "zeros"
                and self.H * self.W <= MATRIX_MAX_GRID)

    def matrices(self) -> torch.Tensor:
        """``(C, H W, r H W)``: ``P^T`` of each channel as a matrix (token ``q`` of the grid to template ``j`` at
        token ``p`` in column ``j H W + p``), gathered from the templates (zero padding), so differentiable in them."""
        # built again where a graph is wanted and the cached one was built without (a solve under no_grad first)
        track = torch.is_grad_enabled() and self.kernel.requires_grad
        if self._matrices is None or (track and not self._matrices.requires_grad):
            self._matrices = template_matrices(self.kernel, self.r, (self.H, self.W))
        return self._matrices

    def encode(self, x):
        B, h, N, dh = x.shape
        C, r = h * dh, self.r
        if N - self.p != self.H * self.W:
            raise ValueError(f"the signal has {N} tokens, but the static dictionary is bound to {self.p} prefix "
                             f"tokens and a {self.H}x{self.W} grid")
        if self._as_matrices(x.device):
            # (C, B, H W) @ (C, H W, r H W): the code in (C, B, r H W) memory, seen as (B, h, dh, r, H, W)
            g = x[:, :, self.p:, :].permute(1, 3, 0, 2).reshape(C, B, self.H * self.W)
            y = torch.matmul(g, self.matrices())
            return (y.transpose(0, 1).reshape(B, h, dh, r, self.H, self.W),)
        # the grid in channels-last memory (B, H, W, C), where the depthwise convolution is fastest
        g = x[:, :, self.p:, :].permute(0, 2, 1, 3).reshape(B, self.H, self.W, C).permute(0, 3, 1, 2)
        if self.padding == "circular":
            g = F.pad(g, (self.pad,) * 4, mode="circular")
            y = _templates_conv(g, self.kernel, 0, C)
        else:
            y = _templates_conv(g, self.kernel, self.pad, C)
        return (y.reshape(B, h, dh, r, self.H, self.W),)

    def decode(self, code):
        u = code[0]
        B, h, dh, r, H, W = u.shape
        C = h * dh
        if self._as_matrices(u.device):
            y = torch.matmul(u.reshape(B, C, r * H * W).transpose(0, 1), self.matrices().transpose(1, 2))
            y = y.reshape(h, dh, B, H * W).permute(2, 0, 3, 1)
            return F.pad(y, (0, 0, self.p, 0)) if self.p else y
        u = u.reshape(B, C * r, H, W)
        if self.padding == "circular":
            y = _unwrap_circular(_templates_conv_t(u, self.kernel, 0, C), self.pad, H, W)
        else:
            y = _templates_conv_t(u, self.kernel, self.pad, C)
        y = y.reshape(B, h, dh, H * W).transpose(-1, -2)
        if self.p:
            y = F.pad(y, (0, 0, self.p, 0))
        return y

    def gram_apply(self, code):
        """``P^T P u`` on the grid: the transposed convolution, then the convolution, without the round trip through
        the token layout (prefix tokens, head split) that ``encode(decode(u))`` makes; the same values up to
        rounding. The matrix form (:data:`MATRIX_DEVICES`) goes through ``encode`` and ``decode``."""
        u = code[0]
        if self._as_matrices(u.device):
            return super().gram_apply(code)
        B, h, dh, r, H, W = u.shape
        C = h * dh
        u = u.reshape(B, C * r, H, W)
        if self.padding == "circular":
            y = _unwrap_circular(_templates_conv_t(u, self.kernel, 0, C), self.pad, H, W)
            y = _templates_conv(F.pad(y, (self.pad,) * 4, mode="circular"), self.kernel, 0, C)
        else:
            y = _templates_conv(_templates_conv_t(u, self.kernel, self.pad, C), self.kernel, self.pad, C)
        return (y.reshape(B, h, dh, r, H, W),)

    def lipschitz(self):
        """``(1, h, dh)``: per channel, ``max_omega sum_j |k_j^(omega)|^2`` (exact when circular,
        an upper bound with zero padding)."""
        return static_lipschitz(self.kernel.detach(), (self.H, self.W), self.padding, self.r).reshape(1, self.h, -1)

    def expand(self, i, t):
        """Per-problem ``(..., h, dh)`` -> ``(..., h, dh, r, 1, 1)``, written out over the templates. On the CPU the
        code's memory runs over channels and templates innermost (``(B, H, W, C, r)``, :func:`_conv_by_template`);
        a factor broadcast over ``r`` as well has stride 0 there, and every element-wise kernel with it loops over
        runs of ``r`` entries: 6-13x slower than over the ``C r`` entries that this tensor's memory matches
        (benchmarks/RESULTS.md, twenty-fifth session). The same values either way."""
        def full(s):
            s = s[..., None, None, None]
            return s.expand(torch.broadcast_shapes(s.shape, (self.h, self.dh, self.r, 1, 1))).contiguous()
        return _bcast(t, full)

    @property
    def dh(self) -> int:
        """Channels per head."""
        return self.kernel.shape[0] // (self.r * self.h)

    def reduce_dims(self, i):
        return (-3, -2, -1)

    def reduce(self, i, t, op="sum"):
        """Over the templates and the grid. Where ``t`` lies in memory as the CPU's code does (``(B, H, W, C, r)``),
        the grid first, over whole channel-template rows, then the templates: 3x faster for a sum, 8x for a maximum
        (the same maximum; a sum rounded in another order) than one reduction over dimensions that are not
        adjacent in memory (benchmarks/RESULTS.md, twenty-fifth session)."""
        m = t.permute(0, 4, 5, 1, 2, 3) if t.dim() == 6 else None
        if m is None or not m.is_contiguous():
            return super().reduce(i, t, op)
        B, H, W, h, dh, r = m.shape
        red = torch.sum if op == "sum" else torch.amax
        return red(red(m.reshape(B, H * W, h * dh * r), 1).view(B, h, dh, r), -1)

    def roots(self):
        return (self.kernel,)

    def recipe(self):
        return StaticAtoms, (self.kernel.detach(), self.h, self.r, (self.H, self.W), self.p, self.padding), {}

    def with_roots(self, roots):
        return StaticAtoms(roots[0], self.h, self.r, (self.H, self.W), self.p, self.padding)


#: device types on which the templates' ``P^T`` and ``P`` run as per-channel matrix products
#: (:meth:`StaticAtoms.matrices`, zero padding, grids of at most MATRIX_MAX_GRID tokens) instead of convolutions:
#: ``H W / k^2`` times the convolution's arithmetic, on a GPU's tensor cores. Opt-in
#: (``vars_ode.dictionaries.MATRIX_DEVICES.add("cuda")``): on an H200 the grouped convolutions of VARS-S / VARS-SD at
#: DeiT-Ti's width made a block 40x timm's, and the products gave the same forward and gradients there (float64 to
#: 1.3e-15), but they are not yet timed on a card (benchmarks/RESULTS.md, twelfth session; ``benchmarks/gpu.py
#: --blocks vars_sd,vars_sd_matrices`` times them). On CPUs the arithmetic is the cost.
MATRIX_DEVICES: set = set()
#: the largest grid (tokens) for the matrix form: its matrices take ``C r (H W)^2`` entries (192 channels, 5
#: templates: 37 M at 14 x 14, 590 M at 28 x 28)
MATRIX_MAX_GRID = 784


def template_matrices(kernel: torch.Tensor, r: int, grid: tuple) -> torch.Tensor:
    """``(C, H W, r H W)``: for ``r`` templates per channel (``kernel`` ``(C r, 1, k, k)``, odd ``k``), the matrix of
    ``conv2d(x, kernel, padding=k // 2, groups=C)`` of each channel on an ``H x W`` grid: entry ``(q, j H W + p)`` is
    template ``j``'s weight at offset ``q - p + k // 2`` (zero outside the template)."""
    Cr, _, k, _ = kernel.shape
    C, (H, W), pad = Cr // r, grid, k // 2
    dev = kernel.device
    ys, xs = torch.arange(H, device=dev), torch.arange(W, device=dev)
    dy = (ys[:, None] - ys[None, :] + pad)[:, None, :, None]  # (q_y, 1, p_y, 1)
    dx = (xs[:, None] - xs[None, :] + pad)[None, :, None, :]  # (1, q_x, 1, p_x)
    inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    index = torch.where(inside, dy * k + dx, k * k).reshape(H * W, H * W)  # k * k: the zero appended below
    flat = F.pad(kernel.reshape(C, r, k * k), (0, 1))
    return flat[:, :, index].transpose(1, 2).reshape(C, H * W, r * H * W)


def _conv_by_template(x, kernel, pad, C):
    # conv2d(x, kernel, padding=pad, groups=C) for r = kernel.shape[0] / C templates per channel, as r
    # depthwise convolutions of one template each (channel c r + j of the result: template j of channel c).
    # In memory (B, H', W', C, r): channels-last, as oneDNN's own result, the layout that the code's
    # element-wise steps and the gradients downstream have always had
    r = kernel.shape[0] // C
    kv = kernel.unflatten(0, (C, r))
    ys = [F.conv2d(x, kv[:, j], padding=pad, groups=C).permute(0, 2, 3, 1) for j in range(r)]
    return torch.stack(ys, -1).permute(0, 3, 4, 1, 2).flatten(1, 2)


def _conv_t_by_template(u, kernel, pad, C):
    # conv_transpose2d(u, kernel, padding=pad, groups=C): the sum over the r templates of one depthwise
    # transposed convolution each
    r = kernel.shape[0] // C
    u, kv = u.unflatten(1, (C, r)), kernel.unflatten(0, (C, r))
    y = F.conv_transpose2d(u[:, :, 0], kv[:, 0], padding=pad, groups=C)
    for j in range(1, r):
        y = y + F.conv_transpose2d(u[:, :, j], kv[:, j], padding=pad, groups=C)
    return y


def _kernel_grad(g, inp, kernel, pad, C, transposed):
    # the gradient w.r.t. the kernel of conv2d (conv_transpose2d when ``transposed``) with groups C, as one call
    # (faster than template by template)
    return torch.ops.aten.convolution_backward(g, inp, kernel, None, [1, 1], [pad, pad], [1, 1], transposed, [0, 0],
                                               C, [False, True, False])[1]


class _TemplateConv(torch.autograd.Function):
    """``conv2d(x, kernel, padding=pad, groups=C)`` with ``r`` output channels per group (the templates' ``P^T``),
    or with ``transposed`` its adjoint ``conv_transpose2d`` (``P``), computed template by template; each one's
    input gradient is the other. On the CPU oneDNN runs a depthwise convolution with one output per channel
    several times faster than one with ``r`` (``benchmarks/RESULTS.md``); the kernel's gradient is one call,
    which is the faster there."""

    @staticmethod
    def forward(ctx, x, kernel, pad, C, transposed):
        ctx.save_for_backward(x, kernel)
        ctx.pad, ctx.C, ctx.transposed = pad, C, transposed
        return (_conv_t_by_template if transposed else _conv_by_template)(x, kernel, pad, C)

    @staticmethod
    def backward(ctx, g):
        x, kernel = ctx.saved_tensors
        adjoint = _conv_by_template if ctx.transposed else _conv_t_by_template
        gx = adjoint(g, kernel, ctx.pad, ctx.C) if ctx.needs_input_grad[0] else None
        gk = _kernel_grad(g, x, kernel, ctx.pad, ctx.C, ctx.transposed) if ctx.needs_input_grad[1] else None
        return gx, gk, None, None, None


#: device types on which the convolutional templates run template by template (:class:`_TemplateConv`); elsewhere
#: as one grouped convolution. Measured faster on CPUs; on CUDA devices not yet measured
#: (``benchmarks/gpu.py``'s ``vars_sd_by_template`` block times it)
BY_TEMPLATE_DEVICES = {"cpu"}


def _templates_conv(x, kernel, pad, C):
    # P^T on the grid: template by template on the BY_TEMPLATE_DEVICES, one grouped convolution elsewhere
    if x.device.type in BY_TEMPLATE_DEVICES:
        return _TemplateConv.apply(x, kernel, pad, C, False)
    return F.conv2d(x, kernel, padding=pad, groups=C)


def _templates_conv_t(u, kernel, pad, C):
    # P on the grid, as _templates_conv
    if u.device.type in BY_TEMPLATE_DEVICES:
        return _TemplateConv.apply(u, kernel, pad, C, True)
    return F.conv_transpose2d(u, kernel, padding=pad, groups=C)


def _unwrap_circular(y, p, H, W):
    # adjoint of circular padding by p on both sides of the last two dimensions
    if p == 0:
        return y
    dev = y.device
    iy = (torch.arange(H + 2 * p, device=dev) - p) % H
    ix = (torch.arange(W + 2 * p, device=dev) - p) % W
    out = torch.zeros(*y.shape[:-2], H, W + 2 * p, dtype=y.dtype, device=dev).index_add(-2, iy, y)
    return torch.zeros(*y.shape[:-2], H, W, dtype=y.dtype, device=dev).index_add(-1, ix, out)


def static_lipschitz(kernel: torch.Tensor, grid: tuple, padding: str, atoms_per_channel: int) -> torch.Tensor:
    """Largest eigenvalue bound of ``P^T P`` for a depthwise convolutional dictionary, per channel.

    Arguments:
        kernel: ``(C * r, 1, k, k)`` templates (``r = atoms_per_channel``).
        grid: ``(H, W)`` token grid.
        padding: ``"zeros"`` or ``"circular"``.

    Returns:
        ``(C,)``: ``max_omega sum_j |FFT(k_j)(omega)|^2`` on an FFT grid of size ``(H + k - 1, W + k - 1)``
        (zero padding: the convolution embeds in a circular one of that size, so this bounds it) or
        ``(H, W)`` (circular padding, where it is exact; templates larger than the grid wrap around).
    """
    H, W = grid
    k = kernel.shape[-1]
    r = atoms_per_channel
    ker = kernel.reshape(-1, r, k, k)
    if ker.dtype not in (torch.float32, torch.float64):
        ker = ker.float()
    if padding == "circular":
        dev = ker.device
        iy, ix = torch.arange(k, device=dev) % H, torch.arange(k, device=dev) % W
        ker = torch.zeros(*ker.shape[:-2], H, k, dtype=ker.dtype, device=dev).index_add(-2, iy, ker)
        ker = torch.zeros(*ker.shape[:-2], H, W, dtype=ker.dtype, device=dev).index_add(-1, ix, ker)
        size = (H, W)
    else:
        size = (H + k - 1, W + k - 1)
    spec = torch.fft.rfft2(ker, s=size)
    return (spec.real.pow(2) + spec.imag.pow(2)).sum(1).flatten(1).amax(-1).to(kernel.dtype)


class UnionAtoms(Atoms):
    """The atoms of a :class:`DynamicAtoms` and a :class:`StaticAtoms`; code ``(dynamic, static)``."""

    num_blocks = 2

    def __init__(self, dynamic: DynamicAtoms, static: StaticAtoms):
        self.dynamic, self.static = dynamic, static

    def encode(self, x):
        return self.dynamic.encode(x) + self.static.encode(x)

    def decode(self, code):
        return self.dynamic.decode(code[:1]) + self.static.decode(code[1:])

    def lipschitz(self):
        return self.dynamic.lipschitz() + self.static.lipschitz()

    def metric(self):
        """``(1 + e) (lambda_2 I + (lambda_1 - lambda_2) v v^T)`` on the features' block and ``(1 + 1 / e) L_s`` on the
        templates' (``e`` = :data:`UNION_SPLIT`): ``||P_d a + P_s c||^2 <= (1 + e) ||P_d a||^2 + (1 + 1 / e) ||P_s c||^2``
        bounds the two blocks' coupling. On a DeiT-Ti-width layer ``lambda_1`` is about 55, ``lambda_2`` 3.5 and
        ``L_s`` 8-20: steps about four times the scalar bound's (``lambda_1 + L_s``) away from ``v``."""
        split = self.dynamic.split(UNION_SPIKE_RATIO)
        if split is None:
            return None
        lam1, v, lam2 = split
        e = UNION_SPLIT
        return RankOneMetric(((1 + e) * lam2, (1 + 1 / e) * self.static.lipschitz()), v, (1 + e) * (lam1 - lam2))

    def expand(self, i, t):
        return (self.dynamic if i == 0 else self.static).expand(0, t)

    def reduce(self, i, t, op="sum"):
        return (self.dynamic if i == 0 else self.static).reduce(0, t, op)

    def reduce_dims(self, i):
        return (self.dynamic if i == 0 else self.static).reduce_dims(0)

    def roots(self):
        return self.dynamic.roots() + self.static.roots()

    def recipe(self):
        return _union_of, (self.dynamic.recipe(), self.static.recipe()), {}

    def with_roots(self, roots):
        return UnionAtoms(self.dynamic.with_roots(roots[:1]), self.static.with_roots(roots[1:]))


def _union_of(dynamic: tuple, static: tuple) -> UnionAtoms:
    return UnionAtoms(rebuild(dynamic), rebuild(static))


class _GradInOwnLayout(torch.autograd.Function):
    """The identity, whose gradient comes back in the input's own strides. The depthwise convolution's weight
    gradient is channels-last (strides ``(25, 1, 5, 1)`` for ``(C r, 1, 5, 5)`` templates, equal to the
    parameter's but for the size-1 dimension), which DistributedDataParallel's gradient buckets, laid out
    like the parameter, take only through a copy, with a warning at every step."""

    @staticmethod
    def forward(ctx, x):
        ctx.layout = x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if g.stride() == ctx.layout:
            return g
        return torch.empty_strided(g.shape, ctx.layout, dtype=g.dtype, device=g.device).copy_(g)


class StaticDictionary(nn.Module):
    """VARS-S templates: ``P^T`` a depthwise convolution over the token grid, ``P`` its transpose.

    Arguments:
        channels: ``C``, the number of signal channels (``h * dh``).
        num_heads: ``h`` (the layout of the channels).
        atoms_per_channel: ``r`` templates per channel (the official code uses 5).
        kernel_size: ``k``, odd.
        padding: ``"zeros"`` or ``"circular"``.

    Parameter ``kernel``: ``(C * r, 1, k, k)``; templates are used normalised to unit L2 norm.
    """

    def __init__(self, channels: int, num_heads: int, *, atoms_per_channel: int = 5, kernel_size: int = 5,
                 padding: str = "zeros", device=None, dtype=None):
        super().__init__()
        check_positive("channels", channels, integer=True)
        check_positive("atoms_per_channel", atoms_per_channel, integer=True)
        check_positive("kernel_size", kernel_size, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (so that P^T keeps the grid's size), got {kernel_size}")
        check_choice("padding", padding, PADDINGS)
        self.channels, self.num_heads = channels, num_heads
        self.atoms_per_channel, self.kernel_size, self.padding = atoms_per_channel, kernel_size, padding
        self.kernel = nn.Parameter(torch.randn(channels * atoms_per_channel, 1, kernel_size, kernel_size,
                                               device=device, dtype=dtype))

    def normalized_kernel(self, dtype=None) -> torch.Tensor:
        """``(C * r, 1, k, k)`` templates of unit L2 norm."""
        k = _GradInOwnLayout.apply(self.kernel)
        k = k if dtype is None else k.to(dtype)
        return k / k.flatten(1).norm(dim=-1).clamp_min(torch.finfo(k.dtype).tiny)[:, None, None, None]

    def bind(self, grid: tuple, num_prefix_tokens: int = 0, *, dtype=None) -> StaticAtoms:
        """The atoms on an ``H x W`` grid (tokens ``num_prefix_tokens:`` of the signal)."""
        H, W = grid
        if self.padding == "circular" and (self.kernel_size // 2 > min(H, W)):
            raise ValueError(f"kernel_size {self.kernel_size} too large for circular padding on a {H}x{W} grid")
        return StaticAtoms(self.normalized_kernel(dtype), self.num_heads, self.atoms_per_channel, (H, W),
                           num_prefix_tokens, self.padding)

    def extra_repr(self):
        return (f"channels={self.channels}, atoms_per_channel={self.atoms_per_channel}, "
                f"kernel_size={self.kernel_size}, padding={self.padding!r}")


def draw_features(num_heads: int, head_dim: int, num_features: int, *, orthogonal: bool = False,
                  generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """Random projection ``(h, dh, m)`` with standard Gaussian columns (FAVOR+).

    ``orthogonal=True`` draws, per head, blocks of ``dh`` mutually orthogonal directions (QR of a
    Gaussian matrix) with chi-distributed lengths, so that each column is still marginally Gaussian.
    """
    g = dict(generator=generator) if generator is not None else {}
    if not orthogonal:
        return torch.randn(num_heads, head_dim, num_features, dtype=torch.float64, **g).to(dtype)
    blocks = []
    nb = math.ceil(num_features / head_dim)
    for _ in range(nb):
        G = torch.randn(num_heads, head_dim, head_dim, dtype=torch.float64, **g)
        Q, R = torch.linalg.qr(G)
        Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
        lengths = torch.randn(num_heads, head_dim, head_dim, dtype=torch.float64, **g).norm(dim=-2)
        blocks.append(Q * lengths.unsqueeze(-2))
    return torch.cat(blocks, -1)[..., :num_features].contiguous().to(dtype)


def positive_random_features(q: torch.Tensor, rand_matrix: torch.Tensor, *, stabilize: bool = True,
                             normalize: bool = True) -> torch.Tensor:
    """``Phi``: ``(B, h, N, dh)`` queries -> ``(B, h, N, m)`` atoms of unit L2 norm over tokens.

    ``phi(q)_j = exp(w_j^T q^ - 1/2) / sqrt(m)`` with ``q^ = q / |q|``; then every column is
    normalised over the tokens. ``stabilize`` subtracts each column's largest exponent first (a
    per-column factor, cancelled by the normalisation). ``normalize=False`` returns the features
    before the column normalisation, up to a positive factor per column (with ``stabilize`` the
    constant factors ``exp(-1/2) / sqrt(m)`` are left out too: the normalisation cancels them).
    """
    m = rand_matrix.shape[-1]
    qn = F.normalize(q, dim=-1)
    z = qn @ rand_matrix.to(q.dtype)
    if stabilize:
        phi = torch.exp(z - z.detach().amax(dim=-2, keepdim=True))
    else:
        phi = torch.exp(z - 0.5 * qn.pow(2).sum(-1, keepdim=True)) / math.sqrt(m)
    return F.normalize(phi, dim=-2) if normalize else phi


class DynamicDictionary(nn.Module):
    """VARS-D atoms: positive random features of the queries, ``m`` per head.

    Arguments:
        num_heads, head_dim: ``h`` and ``dh``.
        num_features: ``m`` (``rand_feat_dim_ratio * head_dim`` in the layer).
        orthogonal: orthogonal random features.
        lipschitz: how ``L`` is computed from ``K`` (``"power"``, ``"eigvalsh"``, ``"official"``).

    Buffer ``rand_matrix``: ``(h, dh, m)``, fixed until :meth:`redraw_features`.
    """

    def __init__(self, num_heads: int, head_dim: int, num_features: int, *, orthogonal: bool = False,
                 lipschitz: str = "power", power_iters: int = 10, device=None, dtype=None):
        super().__init__()
        check_positive("num_features", num_features, integer=True)
        check_choice("lipschitz", lipschitz, ("power", "eigvalsh", "official"))
        self.num_heads, self.head_dim, self.num_features = num_heads, head_dim, num_features
        self.orthogonal, self.lipschitz, self.power_iters = orthogonal, lipschitz, power_iters
        w = draw_features(num_heads, head_dim, num_features, orthogonal=orthogonal, dtype=dtype or torch.float32)
        self.register_buffer("rand_matrix", w.to(device))

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection in place."""
        w = draw_features(self.num_heads, self.head_dim, self.num_features, orthogonal=self.orthogonal,
                          generator=generator, dtype=self.rand_matrix.dtype)
        self.rand_matrix.copy_(w.to(self.rand_matrix.device))

    def features(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, h, N, dh)`` queries -> ``(B, h, N, m)`` normalised atoms."""
        return positive_random_features(q, self.rand_matrix)

    def bind(self, q: torch.Tensor) -> DynamicAtoms:
        raw = positive_random_features(q, self.rand_matrix, normalize=False)
        return DynamicAtoms(raw, lipschitz=self.lipschitz, power_iters=self.power_iters)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, num_features={self.num_features}, orthogonal={self.orthogonal}"


class UnionDictionary(nn.Module):
    """VARS-SD: the atoms of a :class:`DynamicDictionary` and a :class:`StaticDictionary`."""

    def __init__(self, dynamic: DynamicDictionary, static: StaticDictionary):
        super().__init__()
        self.dynamic, self.static = dynamic, static

    def redraw_features(self, generator=None):
        self.dynamic.redraw_features(generator)

    def bind(self, q, grid, num_prefix_tokens=0, *, dtype=None) -> UnionAtoms:
        return UnionAtoms(self.dynamic.bind(q), self.static.bind(grid, num_prefix_tokens, dtype=dtype))


class DenseStaticDictionary(nn.Module):
    """Learned static atoms over the token grid, shared by the channels of a head (the official VARS-SD's
    static part): ``m_s`` atoms per head, each a free map over an ``H0 x W0`` grid.

    Unlike the convolutional templates of :class:`StaticDictionary` (``r`` per channel at every grid
    position), these atoms are few and shared, so a dictionary that includes them keeps the small
    Gram form of the dynamic one: ``K`` is ``(m + m_s) x (m + m_s)`` per head, and the layer solves it
    like VARS-D. On another grid the atoms are resampled bilinearly; they are zero at prefix tokens.

    Arguments:
        num_heads: ``h``; num_atoms: ``m_s``; grid: ``(H0, W0)``, the grid the atoms are stored at.

    Parameter ``atoms``: ``(h, H0 * W0, m_s)``, standard Gaussian at initialisation (the column
    normalisation of the layer makes their scale irrelevant).
    """

    def __init__(self, num_heads: int, num_atoms: int, grid: tuple, *, device=None, dtype=None):
        super().__init__()
        check_positive("num_atoms", num_atoms, integer=True)
        self.num_heads, self.num_atoms, self.grid = num_heads, num_atoms, tuple(grid)
        self.atoms = nn.Parameter(torch.randn(num_heads, grid[0] * grid[1], num_atoms, device=device, dtype=dtype))

    def raw(self, grid: tuple, num_prefix_tokens: int = 0) -> torch.Tensor:
        """``(h, p + H * W, m_s)``: the atoms on an ``H x W`` grid after ``p`` prefix tokens (zero there)."""
        H, W = grid
        a = self.atoms
        if (H, W) != self.grid:
            h, _, m = a.shape
            maps = a.transpose(1, 2).reshape(1, h * m, *self.grid)
            maps = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)
            a = maps.reshape(h, m, H * W).transpose(1, 2)
        if num_prefix_tokens:
            a = F.pad(a, (0, 0, num_prefix_tokens, 0))
        return a

    def bind(self, grid: tuple, num_prefix_tokens: int = 0, *, batch: int = 1, dynamic_raw=None,
             lipschitz: str = "power", power_iters: int = 10) -> DynamicAtoms:
        """Gram-form atoms (a :class:`DynamicAtoms`): these atoms, after ``dynamic_raw`` ``(B, h, N, m)``
        features when given (the union of VARS-SD)."""
        raw = self.raw(grid, num_prefix_tokens)
        if dynamic_raw is not None:
            B, h, N, _ = dynamic_raw.shape
            raw = torch.cat([dynamic_raw, raw.to(dynamic_raw.dtype).expand(B, h, N, -1)], -1)
        else:
            raw = raw.expand(batch, *raw.shape)
        return DynamicAtoms(raw, lipschitz=lipschitz, power_iters=power_iters)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, num_atoms={self.num_atoms}, grid={self.grid}"
