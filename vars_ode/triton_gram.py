"""The fused VARS-D (and dense VARS-SD) node as six Triton kernels (``kernels="triton"``).

:mod:`vars_ode.fused` runs a VARS-D solve as one autograd node made of PyTorch operations (an H200
profile of a VARS-D block's forward and backward counted 227 kernels, most of them the node's passes over
``(B, h, N, m)`` or ``(B, h, m, m)`` tensors in memory). Here the same computation, with the same results
up to rounding, is three kernels forward and three backward; the features ``F = exp(q^ W - c)`` never
reach memory (each kernel that needs them recomputes a tile from the queries; with static atoms ``S``
(VARS-SD, ``static="dense"``) the tile is ``[exp(q^ W - c), S]``, the static atoms' columns loaded):

    forward   tokens  per (b, h) and token chunk: q^, F, then G = F^T F and a = F^T v (partial sums)
              solve   per (b, h): s = diag(G)^-1/2, L by power iteration, A = I - K / L, ISTA steps
              decode  per (b, h) and token block: F, then out = F (s u) (+ v) in the output layout
    backward  tokens  per (b, h) and token chunk: F, then (F diag(s))^T g (partial sums)
              solve   per (b, h): the steps replayed and reversed: gradients of G, a and s u
              feats   per (b, h) and token block: F, the gradients of F, of q^ and q, and of v, written
                      in ``qv``'s layout (and of S per batch entry, summed over the batch after)

Only the ``(B, h, m, m)`` and ``(B, h, m, dh)`` problem tensors pass between kernels. The activation
memory is the layer's input ``qv`` and those (as ``recompute=True`` of the PyTorch node).

Covered: dynamic atoms (VARS-D) with or without dense static ones (VARS-SD), ISTA, ``init`` zeros or
encode, ``lipschitz="power"``, no dropout on the code, head_dim up to 64 and up to 128 atoms per head
(dynamic and static together: vars_rvt_tiny's 64 + 32, not DeiT-Ti's 128 + 64), float32 or (under
autocast) bf16 / fp16 products over the tokens with float32 accumulation; the ``m x m`` iteration is
float32. Float64 inputs are refused (use the PyTorch node).

On CUDA devices the kernels are compiled by Triton. Anywhere else they run in Triton's interpreter,
which must be switched on before Triton is first imported (``TRITON_INTERPRET=1``; the test suite does
so on machines without a GPU): slow, for tests of the same kernel code on small shapes.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships with triton on Linux
    triton = tl = None

#: Launch settings, for tuning on a device: tokens per tile (``None``: 64, or fewer for short sequences),
#: warps per program of the token kernels and of the ``m x m`` kernels (``None``: by ``m``), and the
#: number of programs the reductions over the tokens aim for (they split the tokens of a (b, h) problem
#: into chunks when ``B h`` is smaller; ``None``: four per multiprocessor on CUDA devices, 1 elsewhere).
CONFIG = {"block_n": None, "warps_tokens": None, "warps_solve": None, "programs": None}
#: the largest heads the kernels are built for (:func:`check_sizes`)
MAX_HEAD_DIM, MAX_ATOMS = 64, 128


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton 3.4 and later; before, the environment variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def available(device) -> bool:
    """Whether ``kernels="triton"`` can run on ``device`` in this process."""
    if triton is None:
        return False
    return interpreting() or torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _rne_bf16(x):
        # float32 x rounded to bf16's 8 significant bits, to nearest with ties to even, as float32: the
        # interpreter's casts to bf16 truncate (toward zero), where the card's and PyTorch's round to nearest
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _cast(x, DT: tl.constexpr, UPCAST: tl.constexpr):
        # x.to(DT), rounded to nearest in the interpreter too (UPCAST; see _rne_bf16)
        if UPCAST:
            if DT == tl.bfloat16:
                x = _rne_bf16(x)
        return x.to(DT)

    @triton.jit
    def _low(x, LOW: tl.constexpr, UPCAST: tl.constexpr):
        # round to the product dtype; UPCAST (the interpreter, whose dot has no bf16) back to float32,
        # which multiplies the rounded values exactly and accumulates in float32 as the tensor cores do
        y = _cast(x, LOW, UPCAST)
        if UPCAST:
            y = y.to(tl.float32)
        return y

    @triton.jit
    def _tile(ptr, offs_n, offs_d, s_n, s_d, mask):
        return tl.load(ptr + offs_n[:, None] * s_n + offs_d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _features(q, Wt, cc, nmask, offs_n, offs_m, m, S_h, ms, sS_n, sS_m, PREC: tl.constexpr,
                  STATIC: tl.constexpr):
        # unit queries q^ = q / max(|q|, 1e-12), 1 / max(|q|, 1e-12) and the atoms of a tile of tokens: the
        # m dynamic ones exp(q^ W - c), then (STATIC) the head's m_s static ones (S_h: the head's (N, m_s)
        # atoms), columns m to m + m_s; zero outside the tokens and atoms
        rn = 1.0 / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)
        qn = q * rn[:, None]
        z = tl.dot(qn, Wt, input_precision=PREC)
        F = tl.where(nmask[:, None] & (offs_m < m)[None, :], tl.exp(z - cc[None, :]), 0.0)
        if STATIC:
            F += _static_tile(S_h, ms, sS_n, sS_m, nmask, offs_n, offs_m, m)
        return qn, rn, F

    @triton.jit
    def _static_tile(S_h, ms, sS_n, sS_m, nmask, offs_n, offs_m, m):
        # the static atoms S[h, tokens, :] placed in columns m to m + m_s of a (tokens, M) tile, zero elsewhere
        smask = nmask[:, None] & ((offs_m >= m) & (offs_m < m + ms))[None, :]
        return tl.load(S_h + offs_n[:, None] * sS_n + (offs_m - m)[None, :] * sS_m, mask=smask,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _weights(W_ptr, hh, dh, m, offs_d, offs_m, sW_h, sW_d, sW_m):
        # the head's projection W (dh, m) and c_j = |w_j|, which bounds w_j^T q^ (|q^| = 1): exp(q^ W - c)
        # cannot overflow, and the constant factor per atom cancels in the normalisation
        dmask, mmask = offs_d < dh, offs_m < m
        Wt = tl.load(W_ptr + hh * sW_h + offs_d[:, None] * sW_d + offs_m[None, :] * sW_m,
                     mask=dmask[:, None] & mmask[None, :], other=0.0)
        return Wt, tl.sqrt(tl.sum(Wt * Wt, axis=0))

    @triton.jit
    def _tokens_kernel(qv_ptr, W_ptr, S_ptr, s_ptr, x_ptr, G_ptr, acc_ptr, N, H, dh, m, ms, chunk, BH,
                       s_b, s_n, s_h, s_d, sW_h, sW_d, sW_m, sS_h, sS_n, sS_m, x_b, x_n, x_h, x_d,
                       BN: tl.constexpr, DH: tl.constexpr, M: tl.constexpr, LOW: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, STATIC: tl.constexpr, GRAM: tl.constexpr):
        # a reduction over one chunk of the tokens of one (b, h), partial sums: with GRAM, G = F^T F and
        # F^T x (x = v; the forward pass); without, (F diag(s))^T x (x = g, the output's gradient: the
        # gradient w.r.t. the code u' tau)
        pid, sp = tl.program_id(0), tl.program_id(1)
        b, hh = pid // H, pid % H
        offs_d, offs_m, offs_t = tl.arange(0, DH), tl.arange(0, M), tl.arange(0, BN)
        Wt, cc = _weights(W_ptr, hh, dh, m, offs_d, offs_m, sW_h, sW_d, sW_m)
        dmask = offs_d < dh
        if not GRAM:
            s = tl.load(s_ptr + pid * M + offs_m)
        G = tl.zeros((M, M), tl.float32)
        acc = tl.zeros((M, DH), tl.float32)
        n0 = sp * chunk
        n1 = tl.minimum(n0 + chunk, N)
        for start in range(n0, n1, BN):
            offs_n = start + offs_t
            nmask = offs_n < n1
            tmask = nmask[:, None] & dmask[None, :]
            q = _tile(qv_ptr + b * s_b + hh * s_h, offs_n, offs_d, s_n, s_d, tmask)
            x = _tile(x_ptr + b * x_b + hh * x_h, offs_n, offs_d, x_n, x_d, tmask)
            qn, rn, F = _features(q, Wt, cc, nmask, offs_n, offs_m, m, S_ptr + hh * sS_h, ms, sS_n, sS_m, PREC,
                                  STATIC)
            if GRAM:
                Fl = _low(F, LOW, UPCAST)
                G += tl.dot(tl.trans(Fl), Fl, input_precision=PREC)
            else:
                Fl = _low(F * s[None, :], LOW, UPCAST)
            acc += tl.dot(tl.trans(Fl), _low(x, LOW, UPCAST), input_precision=PREC)
        out = sp * BH + pid
        # in the buffers' dtype: bf16 when the chunk is the whole sequence under bf16 (G and F^T v, kept
        # for the backward pass as the PyTorch node keeps them), float32 otherwise
        tl.store(acc_ptr + out * M * DH + offs_m[:, None] * DH + offs_d[None, :],
                 _cast(acc, acc_ptr.dtype.element_ty, UPCAST))
        if GRAM:
            tl.store(G_ptr + out * M * M + offs_m[:, None] * M + offs_m[None, :],
                     _cast(G, G_ptr.dtype.element_ty, UPCAST))

    @triton.jit
    def _softshrink(p):
        return tl.where(p > 1.0, p - 1.0, tl.where(p < -1.0, p + 1.0, 0.0))

    @triton.jit
    def _problem(G_ptr, a_ptr, L_ptr, pid, m, weight, m_rsqrt, ITERS: tl.constexpr, NORM: tl.constexpr,
                 M: tl.constexpr, DH: tl.constexpr, SHRINK: tl.constexpr, FROM_G: tl.constexpr):
        # the rescaled problem of one (b, h): d = diag(G), s = d^-1/2, L (power iteration on
        # K = diag(s) G diag(s), or read back when not FROM_G), the step matrix A = I - K / L, tau = w / L
        # (1 when w = 0) and bs = a s / w (a s / L when w = 0)
        offs_m, offs_d = tl.arange(0, M), tl.arange(0, DH)
        mmask = offs_m < m
        eye = offs_m[:, None] == offs_m[None, :]
        G = tl.load(G_ptr + pid * M * M + offs_m[:, None] * M + offs_m[None, :]).to(tl.float32)
        a = tl.load(a_ptr + pid * M * DH + offs_m[:, None] * DH + offs_d[None, :]).to(tl.float32)
        d = tl.load(G_ptr + pid * M * M + offs_m * (M + 1)).to(tl.float32)  # the diagonal, read directly
        s = tl.where(mmask, 1.0 / tl.sqrt(tl.maximum(d, 1.1754943508222875e-38)), 0.0)
        K = (s[:, None] * G) * s[None, :]  # G is not needed further: one m x m matrix held
        if FROM_G:
            # the largest eigenvalue of K from the normalised ones vector. K is symmetric, so K v is a sum
            # over K's rows or over its columns: the steps alternate, and each one's result is already laid
            # out for the next (no exchange of v between the threads in between). |K v| <= trace(K) |v|
            # <= m |v| (unit diagonal): v is normalised only every NORM steps and after the last
            v = tl.where(mmask, m_rsqrt, 0.0)
            for k in tl.static_range(ITERS):
                if k % 2 == 0:
                    v = tl.sum(K * v[None, :], axis=1)
                else:
                    v = tl.sum(K * v[:, None], axis=0)
                if (k + 1) % NORM == 0 or k == ITERS - 1:
                    v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1.1754943508222875e-38)
            if ITERS % 2 == 0:
                L = tl.sum(v * tl.sum(K * v[None, :], axis=1), axis=0)
            else:
                L = tl.sum(v * tl.sum(K * v[:, None], axis=0), axis=0)
        else:
            L = tl.load(L_ptr + pid)
        A = tl.where(eye, 1.0, 0.0) - K * (1.0 / L)
        if SHRINK:
            tau = weight / L
            bscale = s / weight
        else:
            tau = L * 0.0 + 1.0
            bscale = s / L
        bs = a * bscale[:, None]
        return d, s, L, A, tau, bs

    @triton.jit
    def _replay(A, bs, L, STOP: tl.constexpr, ENCODE: tl.constexpr, SHRINK: tl.constexpr, PREC: tl.constexpr):
        # ISTA from y_0 (0, or bs L with ENCODE) up to step STOP: returns y_STOP and p_STOP = A y_STOP + bs
        if ENCODE:
            y = bs * L
        else:
            y = bs * 0.0
        p = bs
        for k in tl.static_range(STOP + 1):
            if ENCODE or k > 0:
                p = tl.dot(A, y, input_precision=PREC) + bs
            else:
                p = bs
            if k < STOP:
                if SHRINK:
                    y = _softshrink(p)
                else:
                    y = p
        return y, p

    @triton.jit
    def _solve_kernel(G_ptr, a_ptr, s_ptr, code_ptr, u_ptr, A_ptr, bs_ptr, L_ptr, tau_ptr, m, weight, m_rsqrt,
                      ITERS: tl.constexpr, NORM: tl.constexpr, STEPS: tl.constexpr, M: tl.constexpr,
                      DH: tl.constexpr, SHRINK: tl.constexpr, ENCODE: tl.constexpr, PREC: tl.constexpr,
                      STATS: tl.constexpr):
        # the solve of one (b, h): s, L, the code u' tau (for the unit atoms F diag(s)) and, with STATS, the
        # scaled code u', the step matrix and b
        pid = tl.program_id(0)
        offs_m, offs_d = tl.arange(0, M), tl.arange(0, DH)
        d, s, L, A, tau, bs = _problem(G_ptr, a_ptr, L_ptr, pid, m, weight, m_rsqrt, ITERS, NORM, M, DH, SHRINK,
                                       True)
        y, p = _replay(A, bs, L, STEPS - 1, ENCODE, SHRINK, PREC)
        if SHRINK:
            u = _softshrink(p)
        else:
            u = p
        md = offs_m[:, None] * DH + offs_d[None, :]
        tl.store(s_ptr + pid * M + offs_m, s)
        tl.store(code_ptr + pid * M * DH + md, u * tau)
        tl.store(L_ptr + pid, L)
        tl.store(tau_ptr + pid, tau)
        if STATS:
            tl.store(u_ptr + pid * M * DH + md, u)
            tl.store(bs_ptr + pid * M * DH + md, bs)
            tl.store(A_ptr + pid * M * M + offs_m[:, None] * M + offs_m[None, :], A)

    @triton.jit
    def _token_block(qv_ptr, W_ptr, S_ptr, s_ptr, N, H, dh, m, ms, s_b, s_n, s_h, s_d, sW_h, sW_d, sW_m, sS_h,
                     sS_n, sS_m, BN: tl.constexpr, DH: tl.constexpr, M: tl.constexpr, PREC: tl.constexpr,
                     STATIC: tl.constexpr):
        # the block of tokens of a program of the (B h, token blocks) grid: its (b, h), offsets, mask of
        # the (tokens, dh) tile, the queries' base pointer, W, the unit queries, 1 / |q|, the atoms F and
        # the unit atoms F diag(s)
        pid, blk = tl.program_id(0), tl.program_id(1)
        b, hh = pid // H, pid % H
        offs_d, offs_m = tl.arange(0, DH), tl.arange(0, M)
        offs_n = blk * BN + tl.arange(0, BN)
        nmask = offs_n < N
        tmask = nmask[:, None] & (offs_d < dh)[None, :]
        Wt, cc = _weights(W_ptr, hh, dh, m, offs_d, offs_m, sW_h, sW_d, sW_m)
        base = qv_ptr + b * s_b + hh * s_h
        qn, rn, F = _features(_tile(base, offs_n, offs_d, s_n, s_d, tmask), Wt, cc, nmask, offs_n, offs_m, m,
                              S_ptr + hh * sS_h, ms, sS_n, sS_m, PREC, STATIC)
        Fn = F * tl.load(s_ptr + pid * M + offs_m)[None, :]
        return b, hh, offs_n, offs_d, offs_m, tmask, base, Wt, qn, rn, F, Fn

    @triton.jit
    def _decode_kernel(qv_ptr, W_ptr, S_ptr, s_ptr, code_ptr, out_ptr, N, H, dh, m, ms,
                       s_b, s_n, s_k, s_h, s_d, sW_h, sW_d, sW_m, sS_h, sS_n, sS_m, o_b, o_n, o_h, o_d,
                       BN: tl.constexpr, DH: tl.constexpr, M: tl.constexpr, LOW: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, STATIC: tl.constexpr, RESIDUAL: tl.constexpr):
        # out = (F diag(s)) (u' tau) (+ v) for one block of tokens of one (b, h), in the (B, N, h, dh)
        # layout: the unit atoms and the code, both bounded (F and s u can each leave fp16's range)
        pid = tl.program_id(0)
        b, hh, offs_n, offs_d, offs_m, tmask, base, Wt, qn, rn, F, Fn = _token_block(
            qv_ptr, W_ptr, S_ptr, s_ptr, N, H, dh, m, ms, s_b, s_n, s_h, s_d, sW_h, sW_d, sW_m, sS_h, sS_n, sS_m,
            BN, DH, M, PREC, STATIC)
        code = tl.load(code_ptr + pid * M * DH + offs_m[:, None] * DH + offs_d[None, :])
        out = tl.dot(_low(Fn, LOW, UPCAST), _low(code, LOW, UPCAST), input_precision=PREC)
        if RESIDUAL:
            out += _tile(base + s_k, offs_n, offs_d, s_n, s_d, tmask)
        tl.store(out_ptr + b * o_b + hh * o_h + offs_n[:, None] * o_n + offs_d[None, :] * o_d,
                 _cast(out, out_ptr.dtype.element_ty, UPCAST), mask=tmask)

    @triton.jit
    def _solve_backward_kernel(G_ptr, a_ptr, L_ptr, gc_ptr, H_ptr, ga_ptr, code_ptr, m, weight,
                               STEPS: tl.constexpr, M: tl.constexpr, DH: tl.constexpr, SHRINK: tl.constexpr,
                               ENCODE: tl.constexpr, PREC: tl.constexpr):
        # the ISTA steps replayed, then reversed, for one (b, h). Written for the unit atoms F diag(s):
        # H = diag(s)^-1 (dG + dG^T) diag(s)^-1 (with the diagonal's share through s), da / s and the
        # code u' tau, which the features' kernel needs (all bounded where dG, da and s u need not be)
        pid = tl.program_id(0)
        offs_m, offs_d = tl.arange(0, M), tl.arange(0, DH)
        mmask = offs_m < m
        eye = offs_m[:, None] == offs_m[None, :]
        md = offs_m[:, None] * DH + offs_d[None, :]
        d, s, L, A, tau, bs = _problem(G_ptr, a_ptr, L_ptr, pid, m, weight, 1.0, 1, 1, M, DH, SHRINK, False)
        s_safe = tl.where(mmask, s, 1.0)
        y, p = _replay(A, bs, L, STEPS - 1, ENCODE, SHRINK, PREC)
        if SHRINK:
            u = _softshrink(p)
        else:
            u = p
        code = u * tau
        tl.store(code_ptr + pid * M * DH + md, code)  # stored now: not held through the steps below
        gc = tl.load(gc_ptr + pid * M * DH + md)  # d loss / d (u' tau) for the unit atoms
        g_s = tl.sum(gc * code, axis=1) / s_safe  # out = F diag(s) u' tau
        g_u = gc * tau
        g_bs = gc * 0.0
        Q = tl.zeros((M, M), tl.float32)  # d loss / d A = sum_t gp_t y_t^T
        for i in tl.static_range(STEPS):  # t = STEPS - 1 - i, from the last step back
            y, p = _replay(A, bs, L, STEPS - 1 - i, ENCODE, SHRINK, PREC)
            if SHRINK:
                gp = tl.where((p > 1.0) | (p < -1.0), g_u, 0.0)
            else:
                gp = g_u
            g_bs += gp
            if ENCODE or STEPS - 1 - i > 0:
                Q += tl.dot(gp, tl.trans(y), input_precision=PREC)
                g_u = tl.dot(A, gp, input_precision=PREC)  # A symmetric
        if ENCODE:
            g_bs += g_u * L  # y_0 = bs L
        # bs = a s / w (a s / L when w = 0): da / s = g_bs / w, ds = rowsum(g_bs o bs) / s
        if SHRINK:
            ga_s = g_bs / weight
        else:
            ga_s = g_bs / L
        g_s += tl.sum(g_bs * bs, axis=1) / s_safe
        # A = I - diag(s) G diag(s) / L: with Q2 = Q + Q^T, dG + dG^T = -diag(s) Q2 diag(s) / L and
        # ds = rowsum(Q2 o (A - I)) / s; s = d^-1/2 adds -g_s s^3 / 2 to dG's diagonal, s^2 more than H's
        Q2 = Q + tl.trans(Q)
        g_s += (tl.sum(Q2 * A, axis=1) - tl.sum(tl.where(eye, Q2, 0.0), axis=1)) / s_safe
        Hm = Q2 * (-1.0 / L)
        g_d = tl.where(mmask & (d > 1.1754943508222875e-38), -g_s * s, 0.0)
        Hm += tl.where(eye, g_d[:, None], 0.0)
        tl.store(H_ptr + pid * M * M + offs_m[:, None] * M + offs_m[None, :], Hm)
        tl.store(ga_ptr + pid * M * DH + md, ga_s)

    @triton.jit
    def _features_backward_kernel(qv_ptr, W_ptr, S_ptr, s_ptr, g_ptr, H_ptr, ga_ptr, code_ptr, gqv_ptr, gS_ptr,
                                  N, H, dh, m, ms, s_b, s_n, s_k, s_h, s_d, sW_h, sW_d, sW_m, sS_h, sS_n, sS_m,
                                  g_b, g_n, g_h, g_d, r_b, r_n, r_k, r_h, r_d, t_b, t_h, t_n, t_m,
                                  BN: tl.constexpr, DH: tl.constexpr, M: tl.constexpr, LOW: tl.constexpr,
                                  UPCAST: tl.constexpr, PREC: tl.constexpr, STATIC: tl.constexpr,
                                  GRAD_S: tl.constexpr, RESIDUAL: tl.constexpr):
        # G = F^T F, a = F^T v, out = F (s u) (+ v): dF = F (dG + dG^T) + v da^T + g (s u)^T and
        # dv = F da (+ g). With Fn = F diag(s): dF = R diag(s), R = Fn H + v (da / s)^T + g (u' tau)^T, so
        # that the gradient through the exponential is R o Fn and dv = Fn (da / s) (+ g); then through
        # the normalisation of the queries to dq, written with dv in qv's layout. With GRAD_S, the static
        # atoms' columns of dF = R diag(s) are written for this b ((B, h, N, m_s), summed over b after)
        pid = tl.program_id(0)
        b, hh, offs_n, offs_d, offs_m, tmask, base, Wt, qn, rn, F, Fn = _token_block(
            qv_ptr, W_ptr, S_ptr, s_ptr, N, H, dh, m, ms, s_b, s_n, s_h, s_d, sW_h, sW_d, sW_m, sS_h, sS_n, sS_m,
            BN, DH, M, PREC, STATIC)
        md = offs_m[:, None] * DH + offs_d[None, :]
        v = _low(_tile(base + s_k, offs_n, offs_d, s_n, s_d, tmask), LOW, UPCAST)
        g = _tile(g_ptr + b * g_b + hh * g_h, offs_n, offs_d, g_n, g_d, tmask)
        Fl = _low(Fn, LOW, UPCAST)
        Hm = _low(tl.load(H_ptr + pid * M * M + offs_m[:, None] * M + offs_m[None, :]), LOW, UPCAST)
        ga = _low(tl.load(ga_ptr + pid * M * DH + md), LOW, UPCAST)
        code = _low(tl.load(code_ptr + pid * M * DH + md), LOW, UPCAST)
        R = tl.dot(Fl, Hm, input_precision=PREC)
        R += tl.dot(v, tl.trans(ga), input_precision=PREC)
        R += tl.dot(_low(g, LOW, UPCAST), tl.trans(code), input_precision=PREC)
        g_v = tl.dot(Fl, ga, input_precision=PREC)
        if RESIDUAL:
            g_v += g
        g_qn = tl.dot(R * Fn, tl.trans(Wt), input_precision=PREC)  # through the exponential
        g_qn -= qn * tl.sum(qn * g_qn, axis=1)[:, None]  # q^ = q / |q|
        out = gqv_ptr + b * r_b + hh * r_h + offs_n[:, None] * r_n + offs_d[None, :] * r_d
        tl.store(out, _cast(g_qn * rn[:, None], gqv_ptr.dtype.element_ty, UPCAST), mask=tmask)
        tl.store(out + r_k, _cast(g_v, gqv_ptr.dtype.element_ty, UPCAST), mask=tmask)
        if GRAD_S:
            smask = (offs_n < N)[:, None] & ((offs_m >= m) & (offs_m < m + ms))[None, :]
            dS = R * tl.load(s_ptr + pid * M + offs_m)[None, :]
            tl.store(gS_ptr + b * t_b + hh * t_h + offs_n[:, None] * t_n + (offs_m - m)[None, :] * t_m, dS,
                     mask=smask)


#: the product dtypes the kernels take, as Triton names them
_TL_DTYPES = ({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
              if triton is not None else {})


def _pow2(n, lo=16):
    return max(lo, 1 << (int(n) - 1).bit_length())


def norm_every(m):
    """Power steps between normalisations in the solve kernel: ``|K v| <= m |v|``, and ``m^k`` stays within
    the cube root of float32's range (as vars_ode.fused's power iteration on CPUs)."""
    return max(1, int(math.log(torch.finfo(torch.float32).max) / (3 * math.log(max(m, 2)))))


def block_tokens(low, static):
    """Tokens per tile of the token kernels (``CONFIG["block_n"]`` unset): 64, or 32 for float32 products with
    static atoms, where the Gram kernel's pipelined loads of 64 tokens take 245,760 bytes of shared memory
    at 128 atoms and dh 64 (``benchmarks/triton_aot.py --static``), over the H100's 232,448."""
    return 32 if static and low == torch.float32 else 64


class _Plan:
    """Tile sizes, grids and precisions of one call."""

    def __init__(self, qv, m, low, static, tf32):
        B, N, _, h, dh = qv.shape
        self.m, self.BH = m, B * h
        self.DH, self.M = _pow2(dh), _pow2(m)
        self.BN = CONFIG["block_n"] or min(block_tokens(low, static), _pow2(N))
        big = self.M * max(self.M, self.DH) >= 128 * 128
        self.warps_tokens = CONFIG["warps_tokens"] or (8 if big else 4)
        self.warps_solve = CONFIG["warps_solve"] or (8 if big else 4)
        programs = CONFIG["programs"]
        if programs is None:
            programs = (4 * torch.cuda.get_device_properties(qv.device).multi_processor_count
                        if qv.device.type == "cuda" else 1)
        blocks = triton.cdiv(N, self.BN)
        splits = min(blocks, max(1, triton.cdiv(programs, self.BH)))
        self.chunk = triton.cdiv(blocks, splits) * self.BN
        self.splits = triton.cdiv(N, self.chunk)
        self.low = _TL_DTYPES[low]
        self.upcast = interpreting()
        # the m x m iteration and the features' exponent: TF32 under autocast (as the PyTorch node), or
        # when the user allows it for float32 products
        tf32 = tf32 or torch.backends.cuda.matmul.allow_tf32
        self.prec = "tf32" if tf32 and not self.upcast else "ieee"
        self.tokens = dict(BN=self.BN, DH=self.DH, M=self.M, LOW=self.low, UPCAST=self.upcast, PREC=self.prec)

    def reduce(self, parts):
        # the chunks' partial sums (splits, BH, ...) -> (BH, ...)
        return parts[0] if self.splits == 1 else parts.sum(0)


def _strides(t):
    return tuple(t.stride())


def _static_args(S, other):
    # the static atoms' tensor and strides (h, N, m_s), and the STATIC flag; without static atoms any
    # tensor will do as the pointer (the loads are compiled out)
    if S is None:
        return other, (0, 0, 0), dict(STATIC=False)
    return S.detach(), _strides(S), dict(STATIC=True)


class _TritonGramSparseCode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qv, W, S, weight, steps, init, power_iters, low, residual, lazy, tf32):
        B, N, _, h, dh = qv.shape
        md, ms = W.shape[-1], (S.shape[-1] if S is not None else 0)
        m = md + ms  # the dynamic atoms, then the static ones
        plan = _Plan(qv, m, low, S is not None, tf32)
        dev, f32 = qv.device, torch.float32
        Wf = W.detach().to(f32)
        Sx, sstr, static = _static_args(S, Wf)
        BH, M, DH, P = plan.BH, plan.M, plan.DH, plan.splits
        # G and F^T v rounded to bf16 under bf16 autocast, as the PyTorch node does: the solve and its replay
        # in the backward pass read the same values, and the backward keeps half the bytes (fp16 cannot
        # hold G's small entries: float32 there)
        kept = torch.bfloat16 if low == torch.bfloat16 else f32
        Gp = torch.empty(P, BH, M, M, dtype=kept if P == 1 else f32, device=dev)
        ap = torch.empty(P, BH, M, DH, dtype=kept if P == 1 else f32, device=dev)
        wstr = _strides(Wf)
        q, v = qv.select(2, 0), qv.select(2, 1)  # (B, N, h, dh) views
        _tokens_kernel[(BH, P)](q, Wf, Sx, Gp, v, Gp, ap, N, h, dh, md, ms, plan.chunk, BH, *_strides(q), *wstr, *sstr,
                                *_strides(v), GRAM=True, num_warps=plan.warps_tokens, **plan.tokens, **static)
        G, a = plan.reduce(Gp).to(kept), plan.reduce(ap).to(kept)
        code = torch.empty(BH, M, DH, dtype=f32, device=dev)
        s = torch.empty(BH, M, dtype=f32, device=dev)
        if lazy:  # no statistics written: the stores are compiled out (any pointer will do)
            u = bs = A = code
        else:
            u, bs = torch.empty(BH, M, DH, dtype=f32, device=dev), torch.empty(BH, M, DH, dtype=f32, device=dev)
            A = torch.empty(BH, M, M, dtype=f32, device=dev)
        L, tau = torch.empty(BH, dtype=f32, device=dev), torch.empty(BH, dtype=f32, device=dev)
        shrink, encode = weight > 0, init == "encode"
        _solve_kernel[(BH,)](G, a, s, code, u, A, bs, L, tau, m, float(weight), m ** -0.5, ITERS=power_iters,
                             NORM=norm_every(m), STEPS=steps, M=M, DH=DH, SHRINK=shrink, ENCODE=encode,
                             PREC=plan.prec, STATS=not lazy, num_warps=plan.warps_solve)
        out = torch.empty(B, N, h, dh, dtype=low, device=dev)
        _decode_kernel[(BH, triton.cdiv(N, plan.BN))](qv, Wf, Sx, s, code, out, N, h, dh, md, ms, *_strides(qv),
                                                      *wstr, *sstr, *_strides(out), RESIDUAL=residual,
                                                      num_warps=plan.warps_tokens, **plan.tokens, **static)
        ctx.save_for_backward(qv, Wf, S, G, a, L, s)
        ctx.cfg = (plan, md, float(weight), steps, shrink, encode, residual)
        ctx.set_materialize_grads(False)

        def view(t, cols):
            return t.view(B, h, M, -1)[:, :, :m, :cols]

        if lazy:  # what the backward pass keeps, from which replay_stats runs the solve again when asked
            stats = (view(G, m), view(a, dh), view(s, 1), L.view(B, h, 1, 1), tau.view(B, h, 1, 1))
        else:
            stats = (view(u, dh), view(A, m), view(bs, dh), L.view(B, h, 1, 1), tau.view(B, h, 1, 1))
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    def backward(ctx, g_out, *_):
        qv, Wf, S, G, a, L, s = ctx.saved_tensors
        plan, md, weight, steps, shrink, encode, residual = ctx.cfg
        if g_out is None:
            return (None,) * 11
        B, N, _, h, dh = qv.shape
        BH, M, DH, P, m = plan.BH, plan.M, plan.DH, plan.splits, plan.m
        ms = m - md
        dev, f32 = qv.device, torch.float32
        wstr, gstr = _strides(Wf), _strides(g_out)
        Sx, sstr, static = _static_args(S, Wf)
        gp = torch.empty(P, BH, M, DH, dtype=f32, device=dev)
        q = qv.select(2, 0)
        _tokens_kernel[(BH, P)](q, Wf, Sx, s, g_out, gp, gp, N, h, dh, md, ms, plan.chunk, BH, *_strides(q), *wstr,
                                *sstr, *gstr, GRAM=False, num_warps=plan.warps_tokens, **plan.tokens, **static)
        gc = plan.reduce(gp)
        Hm = torch.empty(BH, M, M, dtype=f32, device=dev)
        ga, code = torch.empty(BH, M, DH, dtype=f32, device=dev), torch.empty(BH, M, DH, dtype=f32, device=dev)
        _solve_backward_kernel[(BH,)](G, a, L, gc, Hm, ga, code, m, weight, STEPS=steps, M=M, DH=DH, SHRINK=shrink,
                                      ENCODE=encode, PREC=plan.prec, num_warps=plan.warps_solve)
        g_qv = torch.empty_like(qv)
        # the static atoms' gradient per batch entry (float32), summed over the batch below: no atomics, the
        # same sum on every run
        g_Sb = torch.empty(B, h, N, ms, dtype=f32, device=dev) if S is not None and ctx.needs_input_grad[2] else None
        _features_backward_kernel[(BH, triton.cdiv(N, plan.BN))](
            qv, Wf, Sx, s, g_out, Hm, ga, code, g_qv, g_Sb if g_Sb is not None else Hm, N, h, dh, md, ms,
            *_strides(qv), *wstr, *sstr, *gstr, *_strides(g_qv), *(_strides(g_Sb) if g_Sb is not None else (0,) * 4),
            RESIDUAL=residual, GRAD_S=g_Sb is not None, num_warps=plan.warps_tokens, **plan.tokens, **static)
        g_S = g_Sb.sum(0).to(S.dtype) if g_Sb is not None else None
        return g_qv, None, g_S, None, None, None, None, None, None, None, None


def check_sizes(head_dim, m, m_s=None):
    """Raise a ValueError when heads of ``head_dim`` with ``m`` dynamic and ``m_s`` static atoms (``None``: no
    static atoms) are beyond what the kernels are built for. One ``m x m`` float32 matrix per program, and
    (tokens x m) tiles: beyond head_dim 64 or 128 atoms in all the kernels need more shared memory than an
    H100 / H200 block has (benchmarks/triton_aot.py: 294-393 KB at 128 / 128)."""
    if head_dim > MAX_HEAD_DIM or m + (m_s or 0) > MAX_ATOMS:
        atoms = f"m {m}" if m_s is None else f"m + m_s = {m} + {m_s} = {m + m_s}"
        raise ValueError(f"kernels='triton' is built for head_dim <= {MAX_HEAD_DIM} and at most {MAX_ATOMS} atoms "
                         f"per head (m = rand_feat_dim_ratio * head_dim, plus m_s = num_static_atoms for VARS-SD); "
                         f"got head_dim {head_dim} and {atoms}: use kernels='torch', or fewer atoms")


def check_supported(qv, rand_matrix, static, solver, lipschitz, dropout):
    """Raise a ValueError naming what ``kernels="triton"`` does not cover for these arguments."""
    if triton is None:
        raise ValueError("kernels='triton' needs the triton package")
    if rand_matrix is None:
        raise ValueError("kernels='triton' needs dynamic atoms (VARS-D, or VARS-SD with static='dense'): "
                         "rand_matrix given, got None")
    if solver != "ista":
        raise ValueError(f"kernels='triton' supports solver='ista', got {solver!r}")
    if lipschitz != "power":
        raise ValueError(f"kernels='triton' supports lipschitz='power', got {lipschitz!r}")
    if dropout > 0:
        raise ValueError(f"kernels='triton' supports no dropout on the code, got dropout={dropout!r}")
    check_sizes(qv.shape[-1], rand_matrix.shape[-1], static.shape[-1] if static is not None else None)
    if qv.dtype not in _TL_DTYPES:
        raise ValueError(f"kernels='triton' takes float32, bfloat16 or float16 inputs, got qv of {qv.dtype}")
    if not available(qv.device):
        raise ValueError(f"kernels='triton' runs on CUDA devices, or anywhere in Triton's interpreter "
                         f"(TRITON_INTERPRET=1 set before triton is imported); got qv on {qv.device}")


@torch.compiler.disable
def triton_gram_node(qv, rand_matrix, static, weight, steps, init, power_iters, low, residual, lazy, tf32):
    """The Triton backend of :func:`vars_ode.fused.fused_attention_core` (which checks the arguments, sets the
    node's precisions and builds the statistics): ``(out, *kept)``; ``kept`` is ``(u, A, b', L, tau)``, or with
    ``lazy`` what the backward pass keeps (``G``, ``F^T v``, ``s``, ``L``, ...). ``tf32``: TF32 for the
    ``m x m`` iteration and the features' exponent."""
    if low not in _TL_DTYPES:
        raise ValueError(f"low_dtype must be float32, bfloat16 or float16 for kernels='triton', got {low}")
    return _TritonGramSparseCode.apply(qv, rand_matrix, static, float(weight), int(steps), init, int(power_iters),
                                       low, bool(residual), lazy, bool(tf32))


__all__ = ["CONFIG", "MAX_HEAD_DIM", "MAX_ATOMS", "available", "interpreting", "check_sizes", "check_supported",
           "triton_gram_node"]
