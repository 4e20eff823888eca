"""Fused Gram-form sparse coding: the whole solve of a VARS-D (or dense VARS-S / VARS-SD) layer as one
autograd node.

For queries ``q`` and values ``v`` (``(B, h, N, dh)``), a random projection ``W`` (``(h, dh, m)``) and
optional learned static atoms ``S`` (``(h, N, m_s)``), :func:`gram_sparse_code` computes what the
layer's generic path computes with a fixed number of ISTA or FISTA steps and unrolled gradients:

    q^ = q / |q|,  F = [exp(q^ W - c), S]       raw atoms, (B, h, N, m [+ m_s])
    G = F^T F,  s = diag(G)^(-1/2)              atoms F diag(s), normalised over the tokens
    K = diag(s) G diag(s),  b = s * F^T v       Gram form, (B, h, m, m) and (B, h, m, dh)
    u <- S_{w/L}(u - (K u - b) / L)             ``steps`` ISTA (or FISTA) iterations, L from K (detached)
    returns F (s * u) (+ v): the reconstruction P u, (B, h, N, dh)

``c_j = |w_j|`` bounds ``w_j^T q^`` (``|q^| = 1``), so the exponential cannot overflow; it is a
constant factor per atom, which the normalisation cancels (the generic path subtracts the column
maximum instead: the same atoms). The iteration runs on the code divided by its threshold ``w / L``,
so that the shrinkage is ``softshrink(., 1)``, one kernel, for every problem at once.

With an :class:`ODESpec` the node integrates Eq. 8-9 over a horizon instead of iterating (a native Runge-Kutta
method, fixed or adaptive, on the same scaled problem: threshold 1/2 in units of ``tau``), and reverses the
integration with :func:`vars_ode.solvers.gram_ode.reverse`; the rest of the node (features, Gram matrix,
power iteration, decoding and their gradients) is shared with ISTA.

The backward pass is written by hand. The node keeps its input (the ``qv`` projection), ``G`` and
``F^T v`` (both small: ``m x m`` and ``m x dh`` per head) and per-atom vectors. With ``recompute=True``
(the default on CUDA devices) it recomputes the features (one product and one exponential) and
replays the iterations (a few ``m x m`` products) instead of storing them, so the activation memory of
the layer is about that of its inputs; with ``recompute=False`` (the default elsewhere) it keeps them,
which saves that work. Nothing synchronises with the host.

``low_dtype`` (bf16, used under autocast) runs the products over the tokens (``G``, ``F^T v``, the
decoding and their gradients) in that precision (fp16 autocast runs them in float32: fp16's range holds
neither ``G``'s small entries nor the backward's terms in ``diag(G)^(-3/2)``); the features' exponent
and the iteration on ``K`` and ``b`` are float32 (float64 for float64 inputs), on TF32 tensor cores on
CUDA devices (:data:`TF32_UNDER_AUTOCAST`). An autocast region around the node, or around its backward pass, does
not recast its products.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as nnf

from ._workspace import scratch
from .dynamics import VARSField
from .lasso import GramOperator
from .ops import lipschitz_constant
from .solvers import compiled_ode, gram_ode, native
from .solvers.ode import settings as ode_settings

FUSED_SOLVERS = ("ista", "fista")
#: the ODE methods the node integrates itself (natively, on its scaled problem; ``steps`` is then the horizon)
FUSED_ODE_METHODS = native.NATIVE_METHODS
KERNELS = ("torch", "triton")
# the power iteration on CPUs runs over groups of problems whose matrices take about this many bytes, so
# that each group's stay in the cores' caches across its iterations (a pass over all of a layer's m x m
# matrices per matrix-vector product reads them from further away each time)
POWER_GROUP_BYTES = 2 << 20


def _bmm(a, b, acc=None):
    # a @ b (+ acc) over (B, h, ., .) tensors as one batched GEMM; b and acc may broadcast
    if acc is None:
        return torch.matmul(a, b)
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    acc3 = acc.expand(*lead, *acc.shape[-2:]).reshape(-1, *acc.shape[-2:])
    return torch.baddbmm(acc3, a3, b3).view(*lead, *a.shape[-2:-1], b.shape[-1])


def _mm_into(name, a, b):
    # a @ b over (B, h, ., .) tensors into the scratch buffer ``name`` (see vars_ode._workspace): for
    # temporaries that do not outlive the forward or backward call
    out = scratch(name, (*a.shape[:-1], b.shape[-1]), a.dtype, a.device)
    return torch.matmul(a, b, out=out)


def _bmm_(out, a, b):
    # out += a @ b in place (out contiguous); b may broadcast
    lead = a.shape[:-2]
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                          b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:]))


def _power_rows(G, s, iters):
    # The power iteration of _power on row vectors (v^T K = (K v)^T for the symmetric K; a row times a
    # matrix reads the matrix in its memory order), group by group, on w = s * v: with K = diag(s) G diag(s),
    # v <- K v is w <- s^2 * (G w), two kernels into preallocated rows (six with a normalisation per step).
    # v = s * (G w) is normalised as in lipschitz_constant only every ``every`` steps and at the end: K has
    # a unit diagonal (zero for empty atoms), so |K v| <= trace(K) |v| <= m |v|, and ``every`` steps stay
    # within the cube root of the dtype's range. The eigenvalue is v^T K v with the last, unit v.
    # An atom whose squared norm d is below the dtype's tiny has d / tiny on that diagonal (s is d clamped to
    # tiny, to the power -1/2, as in the forward pass). Where every atom of a problem is such or empty, K's top
    # eigenvalue is below one and the iterate shrinks at every step, and G w, of the size of K v / s with s up to
    # tiny^-1/2, left float32's normal range: with float32 atoms of norm 3e-20 and 0 the estimate was 0.2% off
    # after 21 steps, 1e25 after 25 and zero from 30. Those problems iterate on K / k, k the largest entry of K's
    # diagonal (G / k: the factor cannot go into s, whose square is up to 2^126 in float32), and take back k at
    # the end; every other problem's factor is exactly one (the same numbers).
    tiny = torch.finfo(s.dtype).tiny
    m = G.shape[-1]
    Gf, sf = G.reshape(-1, m, m), s.reshape(-1, 1, m)
    top = (torch.diagonal(Gf, dim1=-2, dim2=-1) * sf.squeeze(-2).square()).amax(-1)[:, None, None]
    factor = torch.where((top > 0) & (top < 0.5), top, torch.ones_like(top))
    group = max(1, POWER_GROUP_BYTES // (m * m * G.element_size()))
    every = max(1, int(math.log(torch.finfo(s.dtype).max) / (3 * math.log(max(m, 2)))))
    lam = torch.empty(Gf.shape[0], 1, 1, dtype=G.dtype, device=G.device)
    for i in range(0, Gf.shape[0], group):
        Gi, si = Gf[i:i + group] / factor[i:i + group], sf[i:i + group]  # (G itself where the factor is one)
        s2 = si * si
        w = si * (m ** -0.5)  # s * v0, v0 the normalised ones vector
        t = torch.empty_like(w)
        for k in range(1, iters + 1):
            torch.bmm(w, Gi, out=t)  # (G w)^T
            if k == iters or k % every == 0:
                v = t * si
                v = v.div_(v.norm(dim=-1, keepdim=True).clamp_min(tiny))
                torch.mul(v, si, out=w)
            else:
                torch.mul(t, s2, out=w)
        torch.bmm(w, Gi, out=t)  # lambda = v^T K v = w^T G w
        torch.sum(t.mul_(w), dim=-1, keepdim=True, out=lam[i:i + group])
    return lam.mul_(factor).view(*G.shape[:-2], 1, 1)


def _power(G, s, iters, squaring):
    """The largest eigenvalue of ``K = diag(s) G diag(s)`` after ``iters`` power iterations from the
    normalised ones vector (as :func:`vars_ode.ops.lipschitz_constant`), ``(B, h, 1, 1)``.

    ``squaring=False``: ``iters`` matrix-vector products (few FLOPs, about 25 kernels for 10 steps, for each
    group of problems whose matrices take ``POWER_GROUP_BYTES``).
    ``squaring=True``: the same iterate ``K^iters v0`` from ``log2(iters)`` matrix squarings (about 12
    kernels for 10 steps: for GPUs, where a launch costs more than these FLOPs). ``K`` is scaled by its
    Frobenius norm first, so that the top eigenvalue of the scaled matrix lies in ``[m^-1/2, 1]`` and
    its 16th power cannot underflow; longer chains are rescaled every four squarings.
    """
    if not squaring or iters <= 1:
        return _power_rows(G, s, iters)
    v = torch.full_like(s, s.shape[-2] ** -0.5)
    K = G * (s * s.transpose(-1, -2))

    def unit(t, dim):
        return t / t.norm(dim=dim, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)

    P, n, k = unit(K, (-2, -1)), iters, 0
    while n:
        if n & 1:
            v = P @ v
        n >>= 1
        if n:
            P, k = P @ P, k + 1
            if k % 4 == 0:
                P = unit(P, (-2, -1))
    v = unit(v, -2)
    return ((K @ v) * v).sum(-2, keepdim=True)


class _Problem:
    """The rescaled problem of one solve: the step matrix ``A = I - K / L`` (``p = A y + b / L``); the code
    is iterated as ``u' = u / tau`` with ``tau = w / L`` its threshold (``tau = 1`` when ``w = 0``), so
    ``bs = b / L / tau`` and the shrinkage threshold is one."""

    def __init__(self, G, a, s, L, weight, A=None):
        step = 1.0 / L
        self.ncol = s.transpose(-1, -2) * (-step)  # -s^T / L: -K / L = diag(s) G diag(-s / L)
        if A is None:
            A = (G * s).mul_(self.ncol)  # two broadcast passes (an outer product s s^T would be a third)
            A.diagonal(dim1=-2, dim2=-1).add_(1.0)
        self.A = A
        self.shrink = weight > 0
        self.tau = weight * step if self.shrink else torch.ones_like(L)
        self.bscale = s * (1.0 / weight) if self.shrink else s * step  # bs = a * bscale
        self.a, self.L = a, L
        self._bs = None

    @property
    def bs(self):
        # formed when first asked for: a backward pass that keeps its iterates never needs it (cached
        # by hand: functools.cached_property takes a lock, which torch.compile cannot trace)
        if self._bs is None:
            self._bs = self.a * self.bscale
        return self._bs


def _shrink(p, on):
    return nnf.softshrink(p, 1.0) if on else p


def _iterate(pb, steps, solver, restart, init):
    """``steps`` ISTA / FISTA iterations on the scaled problem; returns the scaled code and, for the
    backward pass, the points ``y_t`` the steps were taken from (``None`` for a zero code), the
    pre-shrinkage values ``p_t = A y_t + bs`` and the FISTA momenta."""
    A, bs = pb.A, pb.bs
    u = bs * pb.L if init == "encode" else None  # u0 = b; None: the zero code (its products are skipped)
    ys, ps, betas = [], [], []
    y, t = u, None
    for _ in range(steps):
        p = bs if y is None else _bmm(A, y, acc=bs)
        ys.append(y)
        ps.append(p)
        u_next = _shrink(p, pb.shrink)
        if solver == "fista":
            # gradient-based restart, as vars_ode.solvers.iterative.fista (tol = 0); the test is
            # invariant under the positive scaling of the code
            t = torch.ones_like(bs[..., :1, :]) if t is None else t
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            beta = (t - 1) / t_next
            diff = u_next if u is None else u_next - u
            if restart:
                bad = (((u_next.neg() if y is None else y - u_next) * diff).sum(-2, keepdim=True)) > 0
                beta = torch.where(bad, torch.zeros_like(beta), beta)
                t_next = torch.where(bad, torch.ones_like(t_next), t_next)
            betas.append(beta)
            y, t = u_next + beta * diff, t_next
        else:
            y = u_next
        u = u_next
    return u, ys, ps, betas


class ODESpec:
    """How the node integrates Eq. 8-9 instead of iterating: ``method`` (native), horizon ``t_end``, ``rtol``,
    ``atol`` and ``options`` as :func:`vars_ode.solvers.ode.ode_solve` takes them, ``checkpoint`` (keep one state a
    step, ``grad="adjoint"``). ``options["compile"]`` (``True`` or a ``torch.compile`` backend) runs the integration
    and its reverse pass compiled (:mod:`vars_ode.solvers.compiled_ode`; the adaptive methods with a budget,
    ``options["fixed_attempts"]``). The forward pass writes the evaluations it spent into ``nfe`` and, with a budget,
    into ``forced`` how many times each problem's integration ended on a step its tolerance rejected (a long tensor
    of the problems' shape, :attr:`vars_ode.solvers.native.AdaptiveRK.forced`; ``None`` without a budget)."""

    def __init__(self, method, t_end, rtol=None, atol=None, options=None, checkpoint=False):
        self.method, self.t_end, self.checkpoint = method, float(t_end), bool(checkpoint)
        options = dict(options or {})
        self.compile = compiled_ode.backend(method, options.pop(compiled_ode.OPTION, None), options)
        self.rtol, self.atol, self.options = ode_settings(method, 0.0, rtol, atol, options)
        self.nfe, self.forced = 0, None


class _ODERun:
    # one integration on the scaled problem, with what its reverse pass needs (`taped`: a gradient can be asked
    # for; without one no tape is kept)
    def __init__(self, pb, spec, init, taped=True):
        m = pb.A.shape[-1]
        self.Ks = torch.eye(m, dtype=pb.A.dtype, device=pb.A.device) - pb.A  # K / L
        self.field = VARSField(GramOperator(self.Ks), (pb.bs,), (0.0,))  # Eq. 8-9's alpha, beta, gamma
        # the threshold w / (L alpha beta) of the rescaled field in units of tau = w / L (zero when w = 0)
        self.thr = 1.0 / (self.field.alpha * self.field.beta) if pb.shrink else 0.0
        self.field.thr = (self.thr,)
        self.c0 = pb.bs * pb.L if init == "encode" else None  # u0 = b, scaled
        y0 = self.field.initial_state(None if self.c0 is None else (self.c0,))
        # the generic path's absolute tolerance is in units of b / L: here atol / tau
        atol = spec.atol / pb.tau if pb.shrink else spec.atol
        self.compile = spec.compile
        if self.compile is not None:
            self.W, self.U, self.tape, spec.nfe, spec.forced = compiled_ode.integrate(
                self.Ks, pb.bs, y0, self.thr, spec.method, spec.t_end, spec.rtol, atol, spec.options,
                spec.checkpoint, backend=self.compile)
        else:
            self.tape = gram_ode.Tape(spec.checkpoint) if taped else None
            forced = []
            self.W, self.U = native.integrate(self.field, y0, 0.0, spec.t_end, spec.method, spec.rtol, atol,
                                              spec.options, tape=self.tape, forced=forced)
            spec.nfe, spec.forced = self.field.nfe, forced[0] if forced else None
        self.code = nnf.softshrink(self.U, self.thr) if self.thr > 0 else self.U

    def backward(self, g_code, pb):
        """``(d loss / d bs, d loss / d A)`` from the gradient of the scaled code."""
        f = self.field
        gU = torch.ops.aten.softshrink_backward(g_code, self.U, self.thr) if self.thr > 0 else g_code
        if self.compile is not None:
            gKs, g_bs, _, gW0, gU0 = compiled_ode.reverse(self.tape, self.Ks, f.Bs[0], self.thr,
                                                          (f.alpha, f.beta, f.gamma), gU, backend=self.compile)
        else:
            gKs, g_bs, _, gW0, gU0 = gram_ode.reverse(self.tape, f, self.Ks, self.thr, (f.alpha, f.beta, f.gamma), None,
                                                      gU)
        # the start (VARSField.initial_state): W0 = (bs + Ks c0) / alpha, U0 = c0 + sign(c0) thr, c0 = bs L
        gW0 = gW0 / f.alpha
        g_bs.add_(gW0)
        if self.c0 is not None:
            _bmm_(gKs, gW0, self.c0.transpose(-1, -2))
            g_c = _bmm(self.Ks, gW0, acc=gU0)
            g_bs.add_(g_c * pb.L)
        return g_bs, gKs.neg_()


def _rowdot(a, b, einsum=None):
    # (a * b).sum(-1) over (B, h, n, d) tensors. On CPUs einsum's batched row products are faster (no
    # temporary); on CUDA devices einsum runs them as B h n products of 1 x d by d x 1, several times
    # slower than a multiply and a row sum (H200, B 256 VARS-D: 164 us per call). ``einsum``: force one
    # form (None: by device).
    use_einsum = a.device.type == "cpu" if einsum is None else einsum
    if use_einsum:
        return torch.einsum("bhnd,bhnd->bhn", a, b)
    return (a * b).sum(-1)


def _split(qv, k):
    # (B, N, k, h, dh) -> views q, v of shape (B, h, N, dh) (q None when k == 1)
    v = qv[:, :, k - 1].transpose(1, 2)
    return (qv[:, :, 0].transpose(1, 2) if k == 2 else None), v


def _atoms(q, rnorm, W, c, S, shape, work, F=None):
    # the raw atoms F = [exp(qn W - c), S] (B, h, N, m [+ m_s]) in the working dtype, their dynamic part
    # (a view) and the unit queries; F given: the atoms kept from the forward pass
    B, h, N, dh = shape
    qn = Fd = None
    if W is not None:
        if rnorm is None:  # F.normalize: q / max(|q|, 1e-12)
            rnorm = torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=work).clamp_min(1e-12).reciprocal()
        qn = torch.mul(q, rnorm, out=scratch("qn", (B, h, N, dh), work, q.device))
    if F is None:
        if W is not None:
            # one GEMM, then exp(z - c) in place (the atoms) or into the union's buffer (z a temporary)
            z = (_bmm(qn, W.to(work)) if S is None else _mm_into("z", qn, W.to(work))).sub_(c)
            if S is None:
                F = z.exp_()
            else:
                F = torch.empty((B, h, N, W.shape[-1] + S.shape[-1]), dtype=work, device=q.device)
                F[..., :W.shape[-1]] = z.exp_()  # (an exponential into the strided slice is several times slower)
                F[..., W.shape[-1]:] = S.to(work)
        else:
            F = S.to(work).expand(B, h, N, S.shape[-1])
    if W is not None:
        Fd = F[..., :W.shape[-1]]
    return F, Fd, qn, rnorm


#: Under autocast on CUDA devices (``low_dtype`` bf16 or fp16), the node's float32 products (the features'
#: exponent, the power iteration and the ``m x m`` iteration, and their gradients) run on the TF32 tensor
#: cores: about ten bits of mantissa, more than the 16-bit products over the tokens that feed them carry.
#: Set to False to keep them in full float32 (``torch.backends.cuda.matmul.allow_tf32`` set by the user
#: applies either way). No effect on CPUs, in float32 / float64 without autocast, or on other devices.
#: The switch is PyTorch's process-wide flag, set around the node's forward and backward and restored
#: after them: float32 products that other threads run in that window also use TF32. Under
#: torch.compile the node leaves the flag alone: there the global setting decides
#: (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high")``).
TF32_UNDER_AUTOCAST = True


def _uses_tf32(device_type, low):
    return TF32_UNDER_AUTOCAST and device_type == "cuda" and low in (torch.bfloat16, torch.float16)


def _node_precision(device_type, tf32, fn, *args):
    """``fn(*args)`` with the node's own precisions. The node picks them (``low`` for the products over the
    tokens, ``work`` for the rest) and writes into buffers of those dtypes: an autocast region around a
    call of the node, or around the backward pass (``torch.autograd.grad`` inside ``torch.autocast``, as in
    CUDA graph capture of a training step), must not recast its products. ``tf32``: allow TF32 for CUDA
    float32 products in the call, restoring the global setting after it. Without either, a plain call.
    Under torch.compile autocast is always turned off around the call: a traced backward takes the
    forward's autocast state, whatever ``is_autocast_enabled`` says while it is traced."""
    autocast = device_type in ("cpu", "cuda") and (torch.compiler.is_compiling()
                                                   or torch.is_autocast_enabled(device_type))
    matmul = torch.backends.cuda.matmul
    flip = tf32 and not matmul.allow_tf32 and not torch.compiler.is_compiling()
    if not (autocast or flip):
        return fn(*args)
    with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
        if flip:
            matmul.allow_tf32 = True
        try:
            return fn(*args)
        finally:
            if flip:
                matmul.allow_tf32 = False


class _GramSparseCode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qv, W, S, weight, steps, solver, restart, init, lipschitz, power_iters, low, squaring,
                residual, recompute, drop, tf32, lazy, ode, taped):
        ctx.device_type, ctx.tf32 = qv.device.type, tf32
        return _node_precision(ctx.device_type, ctx.tf32, _GramSparseCode._forward, ctx, qv, W, S, weight, steps,
                               solver, restart, init, lipschitz, power_iters, low, squaring, residual, recompute,
                               drop, lazy, ode, taped)

    @staticmethod
    def backward(ctx, *grads):
        return _node_precision(ctx.device_type, ctx.tf32, _GramSparseCode._backward, ctx, *grads)

    @staticmethod
    def _forward(ctx, qv, W, S, weight, steps, solver, restart, init, lipschitz, power_iters, low, squaring,
                 residual, recompute, drop, lazy, ode, taped):
        B, N, k, h, dh = qv.shape
        q, v = _split(qv, k)
        work = torch.float64 if v.dtype == torch.float64 else torch.float32
        c = W.to(work).pow(2).sum(1, keepdim=True).sqrt().unsqueeze(0) if W is not None else None  # (1, h, 1, m)
        F, _, _, rnorm = _atoms(q, None, W, c, S, (B, h, N, dh), work)
        Fl = F.to(low)
        Ft = Fl.transpose(-1, -2)
        vl = v.to(low).contiguous()
        # G is needed again only to rebuild the step matrix when recomputing; kept A, it is a temporary
        Gl, al = (_bmm(Ft, Fl) if recompute else _mm_into("G", Ft, Fl)), _bmm(Ft, vl)
        G, a = Gl.to(work), al.to(work)
        d = torch.diagonal(G, dim1=-2, dim2=-1)
        tiny = torch.finfo(work).tiny
        s = d.clamp_min(tiny).rsqrt().unsqueeze(-1)  # (B, h, m, 1)
        if lipschitz == "power":
            L = _power(G, s, power_iters, squaring)
        else:
            L = lipschitz_constant(G * (s * s.transpose(-1, -2)), lipschitz, iters=power_iters)[..., None, None]
        pb = _Problem(G, a, s, L, weight)
        if ode is not None:  # Eq. 8-9 integrated instead of iterated; its tape is kept whatever recompute says
            ctx.ode_run = _ODERun(pb, ode, init, taped)
            u_scaled, ys, ps, betas = ctx.ode_run.code, [], [], []
        else:
            ctx.ode_run = None
            u_scaled, ys, ps, betas = _iterate(pb, steps, solver, restart, init)
        # dropout on the code (the layer's attn_drop): the scaled keep-mask of F.dropout, drawn as
        # nn.Dropout would draw it for a tensor of the code's shape
        mask = nnf.dropout(torch.ones_like(u_scaled), drop, True) if drop > 0 else None
        su = u_scaled * (pb.tau * s)  # s u
        if mask is not None:
            su = su * mask
        recon = _mm_into("recon", Fl, su.to(low))
        if torch.compiler.is_compiling():  # no out= into a strided view there; inductor fuses the two
            out = (recon + v if residual else recon).transpose(1, 2).contiguous()
        else:
            out = torch.empty((B, N, h, dh), dtype=low, device=qv.device)
            if residual:
                torch.add(recon, v, out=out.transpose(1, 2))  # + v and the (B, N, h, dh) layout in one pass
            else:
                out.transpose(1, 2).copy_(recon)
        if recompute:
            kept = ()
        else:  # features, contiguous values, step matrix and iterates
            kept = (F if W is not None else None, vl, pb.A, u_scaled, *(y for y in ys if y is not None),
                    *ps, *betas)
        ctx.save_for_backward(qv, rnorm, W, c, S, Gl if recompute else None, al, s, L, mask, *kept)
        ctx.cfg = (steps, solver, restart, init, low, float(weight), (d > tiny).unsqueeze(-1), work, residual,
                   recompute, [y is None for y in ys])
        # the statistics outputs in their scaled form (code = u' tau, b / L = bs tau): two passes saved, and
        # nothing more kept alive by a layer's ``last_stats``
        # lazy (with recompute): instead of the code and the problem, what the backward pass keeps anyway
        # (G and F^T v in the product dtype, s and L), from which they are replayed when asked for
        stats = (Gl, al, s, L, pb.tau) if lazy and recompute and ode is None else (u_scaled, pb.A, pb.bs, L, pb.tau)
        ctx.mark_non_differentiable(*stats)
        # no zero-filled m x m gradients for the statistics outputs (all non-differentiable, so ``out`` is the
        # only one with a gradient whenever backward runs)
        ctx.set_materialize_grads(False)
        return (out, *stats)

    @staticmethod
    def _backward(ctx, g_out, _gu, _gK, _gb, _gL, _gtau):
        steps, solver, restart, init, low, weight, d_ok, work, residual, recompute, y_none = ctx.cfg
        qv, rnorm, W, c, S, Gl, al, s, L, mask, *kept = ctx.saved_tensors
        B, N, k, h, dh = qv.shape
        q, v = _split(qv, k)
        G, a = (Gl.to(work) if recompute else None), al.to(work)
        run = ctx.ode_run
        if recompute:
            F = vl = None
            pb = _Problem(G, a, s, L, weight)
            if run is None:
                u, ys, ps, betas = _iterate(pb, steps, solver, restart, init)  # the same (scaled) iterates again
            else:
                u = run.code
        else:
            F, vl, A, u, *rest = kept
            pb = _Problem(G, a, s, L, weight, A)
            if run is None:
                it = iter(rest)
                ys = [None if none else next(it) for none in y_none]
                ps = [next(it) for _ in range(steps)]
                betas = list(it)
        su = u * (pb.tau * s)
        if mask is not None:
            su = su * mask
        F, Fd, qn, _ = _atoms(q, rnorm, W, c, S, (B, h, N, dh), work, F)
        Fl = F.to(low)
        gl = g_out.transpose(1, 2).to(low).contiguous()  # (B, h, N, dh)
        # out = F (s u) [+ v]; with u = tau u', the gradient w.r.t. the scaled code is tau * d/du
        g_su = _mm_into("g_su", Fl.transpose(-1, -2), gl).to(work)  # (B, h, m, dh)
        g_s = (g_su * su).sum(-1, keepdim=True) / s  # = sum_dh g_(su) * u
        g_u = g_su * (s * pb.tau) if mask is None else g_su * (s * pb.tau) * mask
        if run is not None:  # the integration in reverse (vars_ode.solvers.gram_ode)
            g_bs, Q = run.backward(g_u, pb)
        else:
            # the iterations in reverse: p_t = A y_t + bs, u_{t+1} = softshrink(p_t, 1)
            g_bs = Q = None  # Q = d loss / d A = -d loss / d (K / L) = sum_t gp_t y_t^T
            gy_next = gy_next2 = None
            for t in range(steps - 1, -1, -1):
                if solver == "fista" and gy_next is not None:
                    # y_{t+1} = u_{t+1} + beta_{t+1} (u_{t+1} - u_t), beta_{t+1} = betas[t]
                    g_u = g_u + (1 + betas[t]) * gy_next
                    if gy_next2 is not None:
                        g_u = g_u - betas[t + 1] * gy_next2
                gp = torch.ops.aten.softshrink_backward(g_u, ps[t], 1.0) if pb.shrink else g_u
                g_bs = gp if g_bs is None else g_bs + gp
                if ys[t] is not None:
                    if Q is None:
                        Q = _mm_into("Q", gp, ys[t].transpose(-1, -2))
                    else:
                        _bmm_(Q, gp, ys[t].transpose(-1, -2))
                if t == 0 and init == "zeros":
                    break  # u_0 = 0 is a constant: nothing flows further
                g_y = pb.A @ gp  # A symmetric
                if solver == "ista":
                    g_u = g_y
                else:
                    gy_next2, gy_next = gy_next, g_y
                    g_u = torch.zeros_like(g_y)
            if solver == "fista" and init == "encode":
                g_u = g_u + gy_next  # y_0 = u_0
                if gy_next2 is not None:
                    g_u = g_u - betas[0] * gy_next2
            if init == "encode":
                g_bs = g_bs + g_u * pb.L  # u0 = bs * L
        # bs = a * bscale, bscale = s / w (or s / L when w = 0)
        g_s = g_s + (g_bs * a).sum(-1, keepdim=True) * (pb.bscale / s)
        g_a = (g_bs * pb.bscale).to(low)
        if Q is not None:
            # A = I + G o nss (nss = -s s^T / L, never formed): with Q2 = Q + Q^T, dG + dG^T = Q2 o nss and
            # ds = rowsum(Q2 o (A - I)) / s
            Q2 = torch.add(Q, Q.transpose(-1, -2), out=scratch("Q2", Q.shape, Q.dtype, Q.device))
            rows = _rowdot(Q2, pb.A) - torch.diagonal(Q2, dim1=-2, dim2=-1)
            g_s = g_s + rows.unsqueeze(-1) / s
            g_Gs = Q2.mul_(s).mul_(pb.ncol)  # dG + dG^T = Q2 o (-s s^T / L)
        else:
            g_Gs = torch.zeros_like(pb.A)
        g_d = torch.where(d_ok, -0.5 * g_s * s.pow(3), 0.0)  # s = d^(-1/2), d = diag(G)
        g_Gs.diagonal(dim1=-2, dim2=-1).add_(2 * g_d.squeeze(-1))
        # G = F^T F, a = F^T v, out = F (s u): dF = F (dG + dG^T) + v da^T + g (s u)^T
        if vl is None:
            vl = v.to(low).contiguous()
        g_F = _mm_into("g_F", Fl, g_Gs.to(low))
        _bmm_(g_F, vl, g_a.transpose(-1, -2))
        _bmm_(g_F, gl, su.to(low).transpose(-1, -2))
        # the gradient is written into qv's layout in place, or (under torch.compile, which traces no out=
        # into strided views) stacked from its parts at the end
        compiling = torch.compiler.is_compiling()
        g_qv = None if compiling else torch.empty_like(qv)
        g_v = _mm_into("g_v", Fl, g_a)
        if compiling:
            parts = [g_v + g_out.transpose(1, 2) if residual else g_v]
        elif residual:
            torch.add(g_v, g_out.transpose(1, 2), out=_split(g_qv, k)[1])
        else:
            _split(g_qv, k)[1].copy_(g_v)
        g_S = None
        m = 0
        if W is not None:
            m = W.shape[-1]
            g_z = g_F[..., :m].to(work).mul_(Fd)  # through the exponential
            g_qn = _mm_into("g_qn", g_z, W.to(work).transpose(-1, -2))
            # q^ = q / |q|: dq = (dq^ - q^ (q^ . dq^)) / |q|
            g_qn.addcmul_(qn, _rowdot(qn, g_qn).unsqueeze(-1), value=-1.0)
            if compiling:
                parts.insert(0, g_qn * rnorm)
            else:
                torch.mul(g_qn, rnorm, out=_split(g_qv, k)[0])
        if compiling:
            g_qv = torch.stack([t.transpose(1, 2).to(qv.dtype) for t in parts], 2)
        if S is not None and ctx.needs_input_grad[2]:
            g_S = g_F[..., m:].sum(0).to(S.dtype)
        return (g_qv, None, g_S) + (None,) * 16


def _check(steps, solver, init, ode=None):
    if ode is not None:
        if solver != ode.method or not ode.t_end > 0:
            raise ValueError(f"an ODE solve needs solver = ode.method and a positive horizon, got {solver!r} and "
                             f"{ode.method!r} to t = {ode.t_end!r}")
    elif solver not in FUSED_SOLVERS:
        raise ValueError(f"solver must be one of {FUSED_SOLVERS}, got {solver!r}")
    if init not in ("zeros", "encode"):
        raise ValueError(f"init must be 'zeros' or 'encode', got {init!r}")
    if ode is None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def fused_attention_core(qv, rand_matrix, weight, *, static=None, steps: int, solver: str = "ista",
                         restart: bool = True, init: str = "zeros", lipschitz: str = "power", power_iters: int = 10,
                         low_dtype=None, squaring=None, residual: bool = True, recompute=None, dropout: float = 0.0,
                         kernels: str = "torch", stats: str = "eager", ode: ODESpec | None = None):
    """:func:`gram_sparse_code` on a layer's projection ``qv`` ``(B, N, k, h, dh)`` (``k = 2``: queries then
    values; ``k = 1``: values only, with ``rand_matrix=None``), returning ``(out, u', (I - K / L, b', L, tau))``
    with ``out = P u* (+ v)`` already in the ``(B, N, h, dh)`` layout of the output projection. Used by
    :class:`vars_ode.VARSLayer`; the gradient w.r.t. ``qv`` comes back in ``qv``'s own layout.

    The code and ``b / L`` come in the scaled form the iteration runs on: ``u* = u' tau`` and
    ``b / L = b' tau`` with ``tau = weight / L`` (``1`` when ``weight = 0``), ``(B, h, 1, 1)``; ``u'`` has the
    zeros of ``u*``. Multiply when they are needed (the layer's statistics do so on first access).

    ``recompute``: recompute the dynamic features ``(B, h, N, m)`` and replay the iterations in the backward
    pass (``True``), or keep them from the forward pass (``False``: faster, one ``N x m`` tensor and a few
    ``m x dh`` ones more per layer). Default: recomputed on CUDA devices (where activation memory is what
    limits a training batch), kept elsewhere. ``dropout``: probability of dropping a code entry before the
    decoding (the layer's ``attn_drop`` in training); the mask is drawn as ``nn.Dropout`` draws it.

    ``kernels``: ``"torch"`` (this module's node of PyTorch operations) or ``"triton"`` (the same solve as
    six Triton kernels, :mod:`vars_ode.triton_gram`: VARS-D or dense VARS-SD with ISTA; ``recompute``,
    ``squaring`` do not apply there).

    ``ode`` (an :class:`ODESpec`, with ``solver`` its method and ``steps`` its horizon): integrate Eq. 8-9
    instead of iterating; the integration's tape is kept for the backward pass whatever ``recompute`` says.

    ``stats="lazy"`` returns ``(out, replay)`` instead, ``replay()`` giving ``(u', (I - K / L, b', L, tau))``
    when called (:func:`replay_stats`): with ``recompute`` the code and the ``m x m`` step matrix are not
    kept, only what the backward pass keeps (a layer holds its statistics until its next call: at B 256
    they would take 50-100 MB a layer)."""
    _check(steps, solver, init, ode)
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if stats not in ("eager", "lazy"):
        raise ValueError(f"stats must be 'eager' or 'lazy', got {stats!r}")
    if qv.dim() != 5 or qv.shape[2] != (2 if rand_matrix is not None else 1):
        raise ValueError(f"qv must have shape (B, N, {2 if rand_matrix is not None else 1}, h, dh), "
                         f"got {tuple(qv.shape)}")
    if static is not None and (static.dim() != 3 or static.shape[:2] != (qv.shape[3], qv.shape[1])):
        raise ValueError(f"static must have shape (h, N, m_s) = ({qv.shape[3]}, {qv.shape[1]}, m_s), "
                         f"got {tuple(static.shape)}")
    if kernels == "triton":
        from .triton_gram import check_supported, triton_gram_node

        check_supported(qv, rand_matrix, static, solver, lipschitz, dropout)
        low = low_dtype or torch.float32
        out, *kept = _node_precision(qv.device.type, False, triton_gram_node, qv, rand_matrix, static, weight, steps,
                                     init, power_iters, low, residual, stats == "lazy", _uses_tf32(qv.device.type, low))
        if stats == "lazy":
            G, a, s, L, _ = kept
            return out, replay_stats(G, a, s, L, weight, steps=steps, init=init)
        u, A, bs, L, tau = kept
        return out, u, (A, bs, L, tau)
    work = torch.float64 if qv.dtype == torch.float64 else torch.float32
    low = low_dtype or work
    tf32 = _uses_tf32(qv.device.type, low)
    if low == torch.float16:
        # fp16's range holds neither the Gram matrix's small entries (atoms with small features: G ~ 1e-10)
        # nor the backward's terms in s^3 = diag(G)^(-3/2): its products run in float32 (TF32 on CUDA)
        low = work
    squaring = qv.device.type == "cuda" if squaring is None else bool(squaring)
    recompute = qv.device.type == "cuda" if recompute is None else bool(recompute)
    lazy = stats == "lazy"
    out, *kept = _GramSparseCode.apply(qv, rand_matrix, static, float(weight), steps, solver, bool(restart), init,
                                       lipschitz, power_iters, low, squaring, bool(residual), recompute,
                                       float(dropout), tf32, lazy, ode,
                                       torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                       for t in (qv, rand_matrix, static)))
    if not lazy:
        u, A, bs, L, tau = kept
        return out, u, (A, bs, L, tau)
    if not recompute or ode is not None:  # the code and the step matrix are kept for the backward pass anyway
        u, A, bs, L, tau = kept
        return out, lambda: (u, (A, bs, L, tau))
    Gl, al, s, L, _ = kept
    return out, replay_stats(Gl, al, s, L, weight, steps=steps, solver=solver, restart=restart, init=init)


def replay_stats(G, a, s, L, weight, *, steps, solver="ista", restart=True, init="zeros"):
    """A callable that returns ``(u', (I - K / L, b', L, tau))`` of a fused solve, as
    :func:`fused_attention_core` does, by running its iterations again from ``G``, ``F^T v``, ``s`` and
    ``L`` (float32 work for low-precision ``G``), once, when first called (``stats="lazy"``: a layer's
    statistics then keep alive only what the backward pass keeps)."""
    done = []

    def replay():
        if not done:
            with torch.no_grad():
                work = torch.float64 if G.dtype == torch.float64 else torch.float32
                pb = _Problem(G.to(work), a.to(work), s, L, float(weight))
                u = _iterate(pb, steps, solver, bool(restart), init)[0]
                done.append((u, (pb.A, pb.bs, L, pb.tau)))
        return done[0]
    return replay


def gram_sparse_code(q, v, rand_matrix, weight, *, static=None, steps: int, solver: str = "ista",
                     restart: bool = True, init: str = "zeros", lipschitz: str = "power", power_iters: int = 10,
                     low_dtype=None, squaring=None, recompute=None):
    """Fused Gram-form sparse coding (see the module docstring).

    Arguments:
        q, v: ``(B, h, N, dh)`` queries and values (any float dtype; the iteration runs in float32, or
            float64 for float64 values). ``q`` may be ``None`` when ``rand_matrix`` is.
        rand_matrix: ``(h, dh, m)`` random projection of the dynamic atoms (no gradient), or ``None``.
        weight: the L1 weight (a non-negative float).
        static: ``(h, N, m_s)`` learned static atoms appended to the dynamic ones (VARS-SD with dense
            templates; gradients flow to it), or ``None``. Columns are normalised like the dynamic ones.
        steps: ISTA / FISTA iterations; solver: ``"ista"`` or ``"fista"`` (``restart`` as in FISTA).
        init: ``"zeros"`` or ``"encode"`` (``u0 = b``).
        lipschitz, power_iters: how ``L`` is computed from ``K`` (detached).
        low_dtype: dtype of the products over the tokens (default: the working dtype; float16 is taken as
            float32, whose range the features' Gram matrix and its gradient need).
        squaring: compute the power iteration by repeated squaring (default: on CUDA devices).
        recompute: see :func:`fused_attention_core`.

    Returns:
        ``(recon, code, (K / L, b / L, L))``: the reconstruction ``P u`` ``(B, h, N, dh)`` (in ``low_dtype``)
        and, without gradients, the code ``(B, h, m, dh)`` and the rescaled problem with its ``L``
        ``(B, h, 1, 1)`` (for statistics).
    """
    _check(steps, solver, init)
    if rand_matrix is None and static is None:
        raise ValueError("gram_sparse_code needs rand_matrix, static or both")
    if v.dim() != 4:
        raise ValueError(f"v must have shape (B, h, N, dh), got {tuple(v.shape)}")
    if rand_matrix is not None and (q is None or q.shape != v.shape):
        raise ValueError(f"q must have the shape of v {tuple(v.shape)}, got {None if q is None else tuple(q.shape)}")
    if weight < 0:
        raise ValueError(f"weight must be non-negative, got {weight!r}")
    parts = ([q] if rand_matrix is not None else []) + [v]
    qv = torch.stack([t.transpose(1, 2) for t in parts], 2)  # (B, N, k, h, dh)
    out, u, problem = fused_attention_core(
        qv, rand_matrix, weight, static=static, steps=steps, solver=solver, restart=restart, init=init,
        lipschitz=lipschitz, power_iters=power_iters, low_dtype=low_dtype, squaring=squaring, residual=False,
        recompute=recompute)
    A, bs, L, tau = problem
    code = u * tau
    Ks = -A
    Ks.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return out.transpose(1, 2), code, (Ks, bs * tau, L)
