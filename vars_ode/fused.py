"""Fused Gram-form VARS-D: the whole sparse-coding step of a dynamic-dictionary layer as one autograd node.

For queries ``q`` and values ``v`` (``(B, h, N, dh)``) and a random projection ``W`` (``(h, dh, m)``),
:func:`gram_sparse_code` computes what the layer's generic path computes for ``dictionary="d"`` with
a fixed number of ISTA or FISTA steps and unrolled gradients:

    q^ = q / |q|,  F = exp(q^ W - c)            positive random features, (B, h, N, m)
    G = F^T F,  s = diag(G)^(-1/2)              atoms F diag(s), normalised over the tokens
    K = diag(s) G diag(s),  b = s * F^T v       Gram form, (B, h, m, m) and (B, h, m, dh)
    u <- S_{w/L}(u - (K u - b) / L)             ``steps`` ISTA (or FISTA) iterations, L from K (detached)
    returns F (s * u): the reconstruction P u, (B, h, N, dh)

``c_j = |w_j|`` bounds ``w_j^T q^`` (``|q^| = 1``), so the exponential cannot overflow; it is a
constant factor per atom, which the normalisation cancels (the generic path subtracts the column
maximum instead: the same atoms). Its backward pass is written by hand: it keeps ``q``, ``v`` and the
small ``m x m`` / ``m x dh`` iterates, and recomputes ``F`` (one product and one exponential) rather
than storing any ``N x m`` tensor, so the activation memory of the layer is that of its inputs.
It needs no host synchronisation and launches a fixed, small number of kernels.

``low_dtype`` (bf16 / fp16, used under autocast) runs the products over the tokens (features, ``G``,
``F^T v``, the decoding and their gradients) in that precision; the iteration on ``K`` and ``b`` is
always float32 (or float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from .ops import lipschitz_constant

FUSED_SOLVERS = ("ista", "fista")


def _bmm(a, b, acc=None, alpha=1.0):
    # alpha * (a @ b) (+ acc) over (B, h, ., .) tensors as one batched GEMM; b and acc may broadcast
    if acc is None and alpha == 1.0:
        return torch.matmul(a, b)
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    if acc is None:
        out = torch.bmm(a3, b3) if alpha == 1.0 else torch.baddbmm(a3.new_zeros(()), a3, b3, beta=0.0, alpha=alpha)
    else:
        acc3 = acc.expand(*lead, *acc.shape[-2:]).reshape(-1, *acc.shape[-2:])  # broadcast rows stay rows
        out = torch.baddbmm(acc3, a3, b3, alpha=alpha)
    return out.view(*lead, *out.shape[-2:])


def _bmm_(out, a, b, alpha=1.0):
    # out += alpha * (a @ b) in place (out contiguous); b may broadcast
    lead = a.shape[:-2]
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                          b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:]), alpha=alpha)


def _power(G, s, iters, squaring):
    """The largest eigenvalue of ``K = diag(s) G diag(s)`` after ``iters`` power iterations from the
    normalised ones vector (as :func:`vars_ode.ops.lipschitz_constant`), ``(B, h, 1, 1)``.

    ``squaring=False``: ``iters`` matrix-vector products (few FLOPs, about 60 kernels for 10 steps).
    ``squaring=True``: the same iterate ``K^iters v0`` from ``log2(iters)`` matrix squarings (about 12
    kernels for 10 steps: for GPUs, where a launch costs more than these FLOPs). ``K`` is scaled by its
    Frobenius norm first, so that the top eigenvalue of the scaled matrix lies in ``[m^-1/2, 1]`` and
    its 16th power cannot underflow; longer chains are rescaled every four squarings.
    """
    v = torch.full_like(s, s.shape[-2] ** -0.5)
    if not squaring or iters <= 1:
        tiny = torch.finfo(s.dtype).tiny
        for _ in range(iters):
            v = s * (G @ (s * v))
            v = v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)
        return ((s * (G @ (s * v))) * v).sum(-2, keepdim=True)
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


def _soft(v, thr):
    return v - torch.clamp(v, -thr, thr)


def _problem(G, a, s, L, weight):
    # the rescaled problem: K / L = G o (s s^T) / L, b / L = s a / L, threshold weight / L
    step = 1.0 / L
    ss = _bmm(s * step, s.transpose(-1, -2))  # diag(s) . diag(s) / L as an outer product
    return G * ss, a * (s * step), weight * step, ss


def _iterate(Ks, bs, L, thr, steps, solver, restart, init):
    """``steps`` ISTA / FISTA iterations on the rescaled problem; returns the code and, for the backward
    pass, the points ``y_t`` the steps were taken from (``None`` for a zero code), the pre-threshold values
    ``p_t = y_t - (K y_t - b) / L`` and the FISTA momenta."""
    u = bs * L if init == "encode" else None  # u0 = b; None: the zero code (its products are skipped)
    ys, ps, betas = [], [], []
    y, t = u, None
    for _ in range(steps):
        p = bs if y is None else _bmm(Ks, y, acc=y + bs, alpha=-1.0)
        ys.append(y)
        ps.append(p)
        u_next = _soft(p, thr)
        if solver == "fista":
            # gradient-based restart, as vars_ode.solvers.iterative.fista (tol = 0)
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


def _atoms(q, rnorm, W, c, S, shape, work):
    # the raw atoms (B, h, N, m [+ m_s]) in the working dtype, and the dynamic part alone
    B, h, N, _ = shape
    parts, Fd, qn = [], None, None
    if W is not None:
        if rnorm is None:
            rnorm = torch.rsqrt(q.to(work).pow(2).sum(-1, keepdim=True).clamp_min(1e-24))  # F.normalize's eps
        qn = q.to(work) * rnorm
        Fd = _bmm(qn, W.to(work)).sub_(c).exp_()  # exp(qn W - c): one GEMM, two in-place passes
        parts.append(Fd)
    if S is not None:
        parts.append(S.to(work).expand(B, h, N, S.shape[-1]))
    F = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    return F, Fd, qn, rnorm


class _GramSparseCode(torch.autograd.Function):
    # saves q, v (in their own dtype), G and F^T v (in the dtype of their products) and per-atom /
    # per-problem vectors; the features and the iterates are recomputed in the backward pass
    @staticmethod
    def forward(ctx, q, v, W, S, weight, steps, solver, restart, init, lipschitz, power_iters, low, squaring):
        work = torch.float64 if v.dtype == torch.float64 else torch.float32
        c = W.to(work).pow(2).sum(1, keepdim=True).sqrt().unsqueeze(0) if W is not None else None  # (1, h, 1, m)
        F, _, _, rnorm = _atoms(q, None, W, c, S, v.shape, work)
        Fl = F.to(low)
        Ft = Fl.transpose(-1, -2)
        Gl, al = _bmm(Ft, Fl), _bmm(Ft, v.to(low))
        G, a = Gl.to(work), al.to(work)
        d = torch.diagonal(G, dim1=-2, dim2=-1)
        tiny = torch.finfo(work).tiny
        s = d.clamp_min(tiny).rsqrt().unsqueeze(-1)  # (B, h, m, 1)
        if lipschitz == "power":
            L = _power(G, s, power_iters, squaring)
        else:
            L = lipschitz_constant(G * (s * s.transpose(-1, -2)), lipschitz, iters=power_iters)[..., None, None]
        Ks, bs, thr, _ = _problem(G, a, s, L, weight)
        u, *_ = _iterate(Ks, bs, L, thr, steps, solver, restart, init)
        recon = _bmm(Fl, (u * s).to(low))
        ctx.save_for_backward(q if W is not None else None, rnorm, v, W, c, S, Gl, al, s, L)
        ctx.cfg = (steps, solver, restart, init, low, float(weight), (d > tiny).unsqueeze(-1), work,
                   q.dtype if q is not None else None)
        ctx.mark_non_differentiable(u, Ks, bs, L)
        return recon, u, Ks, bs, L

    @staticmethod
    def backward(ctx, g_recon, _gu, _gK, _gb, _gL):
        steps, solver, restart, init, low, weight, d_ok, work, q_dtype = ctx.cfg
        q, rnorm, v, W, c, S, Gl, al, s, L = ctx.saved_tensors
        G, a = Gl.to(work), al.to(work)
        Ks, bs, thr, ss = _problem(G, a, s, L, weight)
        u, ys, ps, betas = _iterate(Ks, bs, L, thr, steps, solver, restart, init)  # the same iterates again
        su = u * s
        F, Fd, qn, _ = _atoms(q, rnorm, W, c, S, v.shape, work)
        Fl, gl = F.to(low), g_recon.to(low).contiguous()
        step = 1.0 / L
        # recon = F (s u)
        g_su = _bmm(Fl.transpose(-1, -2), gl).to(work)  # (B, h, m, dh)
        g_s = (g_su * su).sum(-1, keepdim=True) / s  # = sum_dh g_c * u
        g_u = g_su * s
        # the iterations in reverse: p_t = y_t + b/L - (K/L) y_t, u_{t+1} = soft(p_t)
        g_bs = P = None  # P = d loss / d (K / L) = -sum_t gp_t y_t^T
        gy_next = gy_next2 = None
        for t in range(steps - 1, -1, -1):
            if solver == "fista" and gy_next is not None:
                # y_{t+1} = u_{t+1} + beta_{t+1} (u_{t+1} - u_t), beta_{t+1} = betas[t]
                g_u = g_u + (1 + betas[t]) * gy_next
                if gy_next2 is not None:
                    g_u = g_u - betas[t + 1] * gy_next2
            gp = g_u * (ps[t].abs() > thr)
            g_bs = gp if g_bs is None else g_bs + gp
            if ys[t] is not None:
                if P is None:
                    P = _bmm(gp, ys[t].transpose(-1, -2), alpha=-1.0)
                else:
                    _bmm_(P, gp, ys[t].transpose(-1, -2), alpha=-1.0)
            g_y = _bmm(Ks, gp, acc=gp, alpha=-1.0)
            if solver == "ista":
                g_u = g_y
            else:
                gy_next2, gy_next = gy_next, g_y
                g_u = torch.zeros_like(g_y)
        if solver == "fista":
            g_u = g_u + gy_next  # y_0 = u_0
            if gy_next2 is not None:
                g_u = g_u - betas[0] * gy_next2
        # d loss / d b (b = s a)
        g_b = g_bs * step
        if init == "encode":
            g_b = g_b + g_u
        g_s = g_s + (g_b * a).sum(-1, keepdim=True)
        g_a = (g_b * s).to(low)
        if P is not None:
            # K / L = G o ss (ss = s s^T / L): with S = P + P^T, dG + dG^T = S o ss, ds = rowsum(S o K / L) / s
            Psym = P + P.transpose(-1, -2)
            g_s = g_s + (Psym * Ks).sum(-1, keepdim=True) / s
            g_Gs = Psym.mul_(ss)  # dG + dG^T
        else:
            g_Gs = torch.zeros_like(ss)
        g_d = torch.where(d_ok, -0.5 * g_s * s.pow(3), 0.0)
        g_Gs.diagonal(dim1=-2, dim2=-1).add_(2 * g_d.squeeze(-1))
        # G = F^T F, a = F^T v, recon = F (s u): dF = F (dG + dG^T) + v da^T + g (s u)^T
        vl = v.to(low)
        g_F = _bmm(Fl, g_Gs.to(low))
        _bmm_(g_F, vl, g_a.transpose(-1, -2))
        _bmm_(g_F, gl, su.to(low).transpose(-1, -2))
        g_v = _bmm(Fl, g_a).to(v.dtype)
        g_q = g_S = None
        m = 0
        if W is not None:
            m = W.shape[-1]
            g_z = g_F[..., :m].to(work).mul_(Fd)  # through the exponential
            g_qn = _bmm(g_z, W.to(work).transpose(-1, -2))
            g_q = ((g_qn - qn * (qn * g_qn).sum(-1, keepdim=True)) * rnorm).to(q_dtype)
        if S is not None and ctx.needs_input_grad[3]:
            g_S = g_F[..., m:].sum(0, keepdim=S.dim() == 4).to(S.dtype)
        return g_q, g_v, None, g_S, None, None, None, None, None, None, None, None, None


def gram_sparse_code(q, v, rand_matrix, weight, *, static=None, steps: int, solver: str = "ista",
                     restart: bool = True, init: str = "zeros", lipschitz: str = "power", power_iters: int = 10,
                     low_dtype=None, squaring=None):
    """Fused Gram-form sparse coding (see the module docstring).

    Arguments:
        q, v: ``(B, h, N, dh)`` queries and values (any float dtype; the iteration runs in float32, or
            float64 for float64 values). ``q`` may be ``None`` when ``rand_matrix`` is.
        rand_matrix: ``(h, dh, m)`` random projection of the dynamic atoms (no gradient), or ``None``.
        weight: the L1 weight (a float).
        static: ``(h, N, m_s)`` learned static atoms appended to the dynamic ones (VARS-SD with dense
            templates; gradients flow to it), or ``None``. Columns are normalised like the dynamic ones.
        steps: ISTA / FISTA iterations; solver: ``"ista"`` or ``"fista"`` (``restart`` as in FISTA).
        init: ``"zeros"`` or ``"encode"`` (``u0 = b``).
        lipschitz, power_iters: how ``L`` is computed from ``K`` (detached).
        low_dtype: dtype of the products over the tokens (default: the working dtype).
        squaring: compute the power iteration by repeated squaring (default: on CUDA devices).

    Returns:
        ``(recon, code, (K / L, b / L, L))``: the reconstruction ``(B, h, N, dh)`` (in ``low_dtype``) and,
        without gradients, the code ``(B, h, m, dh)`` and the rescaled problem with its ``L``
        ``(B, h, 1, 1)`` (for statistics).
    """
    if solver not in FUSED_SOLVERS:
        raise ValueError(f"solver must be one of {FUSED_SOLVERS}, got {solver!r}")
    if init not in ("zeros", "encode"):
        raise ValueError(f"init must be 'zeros' or 'encode', got {init!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if rand_matrix is None and static is None:
        raise ValueError("gram_sparse_code needs rand_matrix, static or both")
    if v.dim() != 4:
        raise ValueError(f"v must have shape (B, h, N, dh), got {tuple(v.shape)}")
    if rand_matrix is not None and (q is None or q.shape != v.shape):
        raise ValueError(f"q must have the shape of v {tuple(v.shape)}, got {None if q is None else tuple(q.shape)}")
    if static is not None and (static.dim() != 3 or static.shape[:2] != v.shape[1:3]):
        raise ValueError(f"static must have shape (h, N, m_s) = ({v.shape[1]}, {v.shape[2]}, m_s), "
                         f"got {tuple(static.shape)}")
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    low = low_dtype or work
    squaring = v.device.type == "cuda" if squaring is None else bool(squaring)
    recon, code, Ks, bs, L = _GramSparseCode.apply(
        None if q is None else q.contiguous(), v.contiguous(), rand_matrix, static, weight, steps, solver,
        bool(restart), init, lipschitz, power_iters, low, squaring)
    return recon, code, (Ks, bs, L)
