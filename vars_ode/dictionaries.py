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

:func:`solve_operator` runs ISTA, FISTA or any torchdiffeq method on an :class:`Atoms` in operator
form (``gram_apply`` instead of a matrix); it is what the layer uses for the static and union
dictionaries, whose Gram matrices (``rHW x rHW`` per channel) are too large to form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_positive
from .ops import _soft, lipschitz_constant

PADDINGS = ("zeros", "circular")
OPERATOR_GRAD_MODES = ("unroll", "adjoint")


def _bcast(t, fn):
    # per-problem tensors of 0 dims (a global lam) broadcast everywhere as they are
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return fn(t)


class Atoms:
    """The dictionary of one input: ``P`` as an operator. Subclasses implement the methods below.

    Codes are tuples of tensors (blocks); signals are ``(B, h, N, dh)``.
    """

    #: number of code blocks
    num_blocks = 1

    def encode(self, x: torch.Tensor) -> tuple:
        """``P^T x``: ``(B, h, N, dh)`` signal -> code tuple."""
        raise NotImplementedError

    def decode(self, code: tuple) -> torch.Tensor:
        """``P u``: code tuple -> ``(B, h, N, dh)`` signal."""
        raise NotImplementedError

    def gram_apply(self, code: tuple) -> tuple:
        """``P^T P u``, code tuple -> code tuple."""
        return self.encode(self.decode(code))

    def gram(self) -> torch.Tensor:
        """The Gram matrix ``K = P^T P`` where it is small; raises otherwise."""
        raise NotImplementedError(f"{type(self).__name__} has no explicit Gram matrix; use gram_apply")

    def lipschitz(self) -> torch.Tensor:
        """Bound on the largest eigenvalue of ``P^T P``, per problem, broadcastable to ``(B, h, dh)``."""
        raise NotImplementedError

    def expand(self, i: int, t):
        """Per-problem tensor (broadcastable to ``(B, h, dh)``) -> broadcastable to block ``i``."""
        raise NotImplementedError

    def reduce_dims(self, i: int):
        """The dimensions of block ``i`` over which a code's atoms run (those :meth:`reduce` reduces)."""
        raise NotImplementedError

    def reduce(self, i: int, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Block ``i`` tensor -> per-problem ``(B, h, dh)`` by ``op`` in ``{"sum", "amax"}`` over atoms."""
        return _reduce_dims(t, self.reduce_dims(i), op)

    def roots(self) -> tuple:
        """Tensors from which everything the operator uses is computed, none a function of another."""
        return ()

    def with_roots(self, roots: tuple) -> "Atoms":
        """The same operator rebuilt from other root tensors (the ODE adjoint solves on detached copies)."""
        raise NotImplementedError

    def recipe(self) -> tuple:
        """``(factory, args, kwargs)``: plain values and detached tensors from which :func:`rebuild` makes the
        same operator, without gradients. A layer's statistics keep this instead of the object, which
        torch.compile cannot carry out of a compiled graph."""
        raise NotImplementedError


def rebuild(recipe: tuple) -> Atoms:
    """The operator of :meth:`Atoms.recipe`."""
    factory, args, kwargs = recipe
    return factory(*args, **kwargs)


def _reduce_dims(t, dims, op):
    return t.sum(dims) if op == "sum" else t.amax(dims)


class DynamicAtoms(Atoms):
    """Random-feature atoms ``Phi = F D^{-1}`` of shape ``(B, h, N, m)`` (columns are atoms over tokens).

    ``F`` (``raw``) are the positive features and ``D`` the diagonal of their column norms: the
    normalisation is applied on the code side (``Phi u = F (D^{-1} u)``, ``Phi^T x = D^{-1} F^T x``,
    ``K = D^{-1} F^T F D^{-1}``), so no ``N x m`` tensor is rescaled. ``phi`` gives the normalised matrix.
    """

    num_blocks = 1

    def __init__(self, raw: torch.Tensor, *, lipschitz: str = "power", power_iters: int = 10):
        self.raw = raw
        G = raw.transpose(-1, -2) @ raw
        d = torch.diagonal(G, dim1=-2, dim2=-1)
        self.inv_norm = d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt().unsqueeze(-1)  # (B, h, m, 1)
        self._K = G * self.inv_norm * self.inv_norm.transpose(-1, -2)
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
        return self._K

    def gram_apply(self, code):
        return (self._K @ code[0],)

    def lipschitz(self):
        """``(B, h, 1)``: the top eigenvalue of ``K`` by ``lipschitz`` (``"power"``: a few power
        iterations, no host synchronisation; ``"eigvalsh"``: exact; ``"official"``: max row L1 + 1)."""
        L = lipschitz_constant(self._K.detach(), self.lipschitz_method, iters=self.power_iters)
        return L.unsqueeze(-1)

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

    def encode(self, x):
        B, h, N, dh = x.shape
        C, r = h * dh, self.r
        if N - self.p != self.H * self.W:
            raise ValueError(f"the signal has {N} tokens, but the static dictionary is bound to {self.p} prefix "
                             f"tokens and a {self.H}x{self.W} grid")
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
        u = u.reshape(B, C * r, H, W)
        if self.padding == "circular":
            y = _unwrap_circular(_templates_conv_t(u, self.kernel, 0, C), self.pad, H, W)
        else:
            y = _templates_conv_t(u, self.kernel, self.pad, C)
        y = y.reshape(B, h, dh, H * W).transpose(-1, -2)
        if self.p:
            y = F.pad(y, (0, 0, self.p, 0))
        return y

    def lipschitz(self):
        """``(1, h, dh)``: per channel, ``max_omega sum_j |k_j^(omega)|^2`` (exact when circular,
        an upper bound with zero padding)."""
        return static_lipschitz(self.kernel.detach(), (self.H, self.W), self.padding, self.r).reshape(1, self.h, -1)

    def expand(self, i, t):
        return _bcast(t, lambda s: s[..., None, None, None])

    def reduce_dims(self, i):
        return (-3, -2, -1)

    def roots(self):
        return (self.kernel,)

    def recipe(self):
        return StaticAtoms, (self.kernel.detach(), self.h, self.r, (self.H, self.W), self.p, self.padding), {}

    def with_roots(self, roots):
        return StaticAtoms(roots[0], self.h, self.r, (self.H, self.W), self.p, self.padding)


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

    def expand(self, i, t):
        return (self.dynamic if i == 0 else self.static).expand(0, t)

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


# ---------------------------------------------------------------------------------------------
# operator-form solvers


def _tmap(fn, *ts):
    return tuple(fn(*args) for args in zip(*ts))


def kkt_residual_operator(atoms: Atoms, code: tuple, B: tuple, weight) -> torch.Tensor:
    """KKT residual of ``code`` for ``min 0.5 u^T P^T P u - u^T b + weight ||u||_1``, per problem ``(B, h, dh)``."""
    Ku = atoms.gram_apply(code)
    out = None
    for i, (u, k, b) in enumerate(zip(code, Ku, B)):
        w = atoms.expand(i, weight)
        g = k - b
        viol = torch.where(u != 0, (g + w * torch.sign(u)).abs(), torch.relu(g.abs() - w))
        r = atoms.reduce(i, viol, "amax")
        out = r if out is None else torch.maximum(out, r)
    return out


class _OperatorLCA(nn.Module):
    """The coupled field of Eq. 8-9 projected on the atoms (as :class:`vars_ode.GramVARSDynamics`),
    with ``K`` applied as an operator, on the problem rescaled by ``L``. State: ``(W blocks, U blocks)``."""

    def __init__(self, atoms, Bs, Ls, thr, alpha, beta, gamma):
        super().__init__()
        self.atoms, self.Bs, self.Ls, self.thr = atoms, Bs, Ls, thr
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.nfe = 0

    def Ka(self, a):
        return _tmap(lambda k, L: k / L, self.atoms.gram_apply(a), self.Ls)

    def initial_state(self, code):
        Ka = self.Ka(code)
        W = _tmap(lambda b, k: (b + k) / self.alpha, self.Bs, Ka)
        U = _tmap(lambda c, t: c + torch.sign(c) * t, code, self.thr)
        return W + U

    def forward(self, t, state):
        self.nfe += 1
        n = len(state) // 2
        W, U = state[:n], state[n:]
        a = _tmap(_soft, U, self.thr)
        Ka = self.Ka(a)
        dW = _tmap(lambda w, k, b: -self.alpha * w + k + b, W, Ka, self.Bs)
        dU = _tmap(lambda u, k, aa, w: -self.beta * u - self.gamma * (k - aa) + w, U, Ka, a, W)
        return dW + dU


def solve_operator(atoms: Atoms, B: tuple, weight, solver: str = "ista", *, steps=3, tol: float = 0.0,
                   max_iter: int = 10_000, grad: str = "unroll", init="zeros", L=None, options: dict | None = None,
                   record: list | None = None, check_every: int = 10):
    """Solve ``min_u 0.5 ||P u - x||^2 + weight ||u||_1`` per problem with ``P`` given as an operator.

    Arguments:
        atoms: the bound dictionary.
        B: code tuple ``P^T x``.
        weight: the L1 weight, a float or a tensor broadcastable to ``(B, h, dh)``.
        solver: ``"ista"``, ``"fista"`` or a torchdiffeq method (integrating Eq. 8-9 rescaled by ``L``, so
            one unit of time is about one ISTA step).
        steps: iterations (ista / fista) or the integration horizon (ODE); ``None`` iterates until the
            KKT residual is at most ``tol`` (checked every ``check_every`` iterations, or after every
            doubling window for ODE solvers) or ``max_iter`` iterations / evaluations are spent.
        grad: ``"unroll"`` or, with an ODE solver, ``"adjoint"``.
        init: ``"zeros"``, ``"encode"`` (``u0 = P^T x``) or a code tuple.
        L: per-problem Lipschitz bound (default ``atoms.lipschitz()``); detached.
        options: ``rtol``, ``atol``, ``options`` (torchdiffeq's), ``window`` (first window of the steady-state
            mode), ``alpha``, ``beta``, ``gamma``, ``integrator`` for ODE solvers; ``restart`` for fista.
            ``integrator`` is ``"auto"`` (default: the fixed-step methods of
            :mod:`vars_ode.solvers.native`, which do not wait on the device at each step, except with
            ``record`` or ``grad="adjoint"``), ``"torchdiffeq"`` or ``"native"`` (fixed-step methods only
            here; the adaptive native methods need the Gram form).
        record: a list that receives the (detached) code after every iteration / unit of time.

    Returns:
        ``(code tuple, iterations)``; ``iterations`` is a 0-dim long tensor (ISTA / FISTA iterations or
        ODE function evaluations).
    """
    from .solvers import SOLVERS, native
    from .solvers.ode import ADAMS, DEFAULT_STEP_SIZE, FIXED_STEP, _eager, choose_integrator

    check_choice("solver", solver, SOLVERS)
    check_choice("grad", grad, OPERATOR_GRAD_MODES)
    if solver == "active_set":
        raise ValueError("solver 'active_set' needs the Gram matrix, which the static and union dictionaries "
                         "never form (they run in operator form); use 'ista', 'fista' or an ODE solver")
    is_ode = solver not in ("ista", "fista")
    if grad == "adjoint" and not is_ode:
        raise ValueError(f"grad='adjoint' needs an ODE solver, got solver={solver!r}")
    options = dict(options or {})
    n = len(B)
    dev = B[0].device
    L = (atoms.lipschitz() if L is None else L)
    L = torch.as_tensor(L, dtype=B[0].dtype, device=dev).detach().clamp_min(torch.finfo(B[0].dtype).tiny)
    Ls = tuple(atoms.expand(i, L) for i in range(n))
    ws = tuple(atoms.expand(i, weight) for i in range(n))
    if isinstance(init, str):
        check_choice("init", init, ("zeros", "encode"))
        u = tuple(torch.zeros_like(b) for b in B) if init == "zeros" else tuple(B)
    else:
        u = tuple(init)

    def residual(code):
        return kkt_residual_operator(atoms, code, B, weight)

    def rec(code):
        if record is not None:
            record.append(tuple(c.detach() for c in code))

    zero_start = isinstance(init, str) and init == "zeros"  # then K u0 = 0: skip the first product

    if solver in ("ista", "fista"):
        restart = options.pop("restart", True) if solver == "fista" else True
        if options:
            valid = "valid options: ['restart']" if solver == "fista" else "it takes none"
            raise ValueError(f"unknown option(s) {sorted(options)} for solver {solver!r}; {valid}")
        # A step is u <- S_{w/L}(u + b/L - K u / L). With a positive float weight the iterate is the code
        # divided by its threshold tau = w / L, so that the shrinkage is softshrink(., 1): three passes
        # over the code per step instead of eight; the code itself is tau times the iterate.
        invL = tuple(1.0 / Li for Li in Ls)
        if not isinstance(weight, torch.Tensor) and weight > 0:
            taus = tuple(w / Li for w, Li in zip(ws, Ls))
            bs = tuple(b / w for b, w in zip(B, ws))
            u = tuple(ui / ti for ui, ti in zip(u, taus))

            def shrink(ps):
                return tuple(F.softshrink(p, 1.0) for p in ps)

            def real(code):
                return tuple(c * t for c, t in zip(code, taus))
        else:
            thrs = tuple(w / Li for w, Li in zip(ws, Ls))
            bs = tuple(b * il for b, il in zip(B, invL))

            def shrink(ps):
                return tuple(_soft(p, t) for p, t in zip(ps, thrs))

            def real(code):
                return code

        def step(y, first):
            if first and zero_start:  # K u0 = 0: skip the product
                return shrink(tuple(y_ + b for y_, b in zip(y, bs)))
            Ky = atoms.gram_apply(y)
            return shrink(tuple(torch.addcmul(yi + b, k, il, value=-1.0) for yi, k, b, il in zip(y, Ky, bs, invL)))

        y, t, it = u, torch.ones((), dtype=B[0].dtype, device=dev), 0
        while steps is None or it < steps:
            if steps is None and it % check_every == 0 and (it >= max_iter or bool(residual(real(u)).amax() <= tol)):
                break
            un = step(y, it == 0)
            if solver == "fista":
                tn = (1 + torch.sqrt(1 + 4 * t * t)) / 2
                beta = (t - 1) / tn
                if restart:  # the test is invariant under the positive scaling of each problem
                    bad = sum(atoms.reduce(i, (yi - ni) * (ni - ui)) for i, (yi, ni, ui) in enumerate(zip(y, un, u))) > 0
                    beta = torch.where(bad, torch.zeros_like(bad, dtype=beta.dtype), beta)
                    tn = torch.where(bad, torch.ones_like(beta), tn)
                y = tuple(ni + atoms.expand(i, beta) * (ni - ui) for i, (ni, ui) in enumerate(zip(un, u)))
                t = tn
            else:
                y = un
            u, it = un, it + 1
            if record is not None:
                rec(real(u))
        return real(u), torch.full((), it, dtype=torch.long, device=dev)

    # ODE solvers
    from torchdiffeq import odeint, odeint_adjoint

    alpha, beta_, gamma = (float(options.pop(k, d)) for k, d in (("alpha", 1.0), ("beta", 2.0), ("gamma", 2.0)))
    rtol = options.pop("rtol", 1e-3 if steps is not None else min(1e-3, max(tol * 1e-2, 1e-10)))
    atol = options.pop("atol", rtol * 1e-2)
    window = float(options.pop("window", 4.0))
    ode_opts = dict(options.pop("options", None) or {})
    integrator = options.pop("integrator", "auto")
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for solver {solver!r}; valid options: "
                         "['alpha', 'atol', 'beta', 'gamma', 'integrator', 'options', 'rtol', 'window']")
    engine = choose_integrator("torchdiffeq" if integrator == "auto" and record is not None else integrator,
                               solver, grad)
    if engine == "native" and solver not in native.FIXED_TABLEAUX:
        raise ValueError(f"integrator='native' in operator form has the fixed-step methods "
                         f"{list(native.FIXED_TABLEAUX)}, got {solver!r}; the adaptive native methods need a "
                         "Gram-form dictionary (dictionary 'd', or a dense static part)")
    if solver in FIXED_STEP:
        ode_opts.setdefault("step_size", 0.1 if solver == "explicit_adams" else DEFAULT_STEP_SIZE)
    if solver in ADAMS:
        ode_opts.setdefault("max_order", 4)
    if solver == "scipy_solver":
        ode_opts.setdefault("solver", "RK45")  # LSODA forms a dense Jacobian: n^2 memory
    step = native.fixed_step_size(solver, ode_opts) if engine == "native" else None
    thr = _tmap(lambda w, Li: w / Li / (alpha * beta_), ws, Ls)
    kw = dict(rtol=rtol, atol=atol, method=solver, options=ode_opts)

    def run(atoms_, B_, u_):
        # the whole ODE solve on (atoms_, B_, u_); returns (codes..., nfe)
        f = _OperatorLCA(atoms_, _tmap(lambda b, Li: b / Li, B_, Ls), Ls, thr, alpha, beta_, gamma)
        state = f.initial_state(u_)

        def integrate(st, pts):
            if engine == "native":
                # piecewise between the output times; each piece on torchdiffeq's grid from its start
                out = [st]
                for a, b in zip(pts[:-1], pts[1:]):
                    out.append(native.integrate_fixed(f, out[-1], a, b, solver, step))
                return tuple([o[i] for o in out] for i in range(len(st)))
            ts = torch.tensor(pts, dtype=B_[0].dtype, device=dev)
            if grad == "adjoint":
                params = tuple(t for t in (*atoms_.roots(), *B_) if t.requires_grad)
                return _eager(odeint_adjoint, f, st, ts, adjoint_params=params, **kw)
            return _eager(odeint, f, st, ts, **kw)

        def codes(st):
            return _tmap(_soft, st[n:], thr)

        if steps is not None:
            T = float(steps)
            grid = [0.0] + ([float(s) for s in range(1, math.ceil(T))] if record is not None else []) + [T]
            traj = integrate(state, grid)
            for j in range(1, len(grid) - 1):
                rec(codes(tuple(s[j] for s in traj)))
            out = codes(tuple(s[-1] for s in traj))
            rec(out)
            return out, f.nfe
        t0, span = 0.0, window
        while True:
            out = codes(state)
            if f.nfe >= max_iter or bool(kkt_residual_operator(atoms_, out, B_, weight).amax() <= tol):
                return out, f.nfe
            traj = integrate(state, [t0, t0 + span])
            state = tuple(s[-1] for s in traj)
            rec(codes(state))
            t0, span = t0 + span, min(2 * span, 256.0)

    if grad != "adjoint":
        code, nfe = run(atoms, tuple(B), u)
    else:
        roots = atoms.roots()
        nr, nb = len(roots), len(B)
        box = {}

        def run_flat(*proxies):
            code, box["nfe"] = run(atoms.with_roots(proxies[:nr]), proxies[nr:nr + nb], proxies[nr + nb:])
            return code

        code = _CutGraph.apply(run_flat, *roots, *B, *u)
        nfe = box["nfe"]
    return tuple(code), torch.full((), nfe, dtype=torch.long, device=dev)


class _CutGraph(torch.autograd.Function):
    """``fn(*inputs)`` computed on detached copies of ``inputs``, differentiated back onto them.

    torchdiffeq's adjoint differentiates the field with respect to its ``adjoint_params`` by autograd;
    if one of them (``P^T x``) is computed from another (the atoms), the shared path would be counted
    twice. Running the solve on independent leaf copies and returning their gradients for the real
    inputs keeps every path once, so ``B`` and the atoms may come from the same graph.
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        proxies = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        with torch.enable_grad():
            outs = tuple(fn(*proxies))
        ctx.proxies, ctx.outs = proxies, outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        want = [i for i, p in enumerate(ctx.proxies) if p.requires_grad]
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        got = [None] * len(ctx.proxies)
        if want and pairs:
            gs = torch.autograd.grad([o for o, _ in pairs], [ctx.proxies[i] for i in want], [g for _, g in pairs],
                                     allow_unused=True)
            for i, g in zip(want, gs):
                got[i] = g
        del ctx.outs, ctx.proxies
        return (None, *got)
