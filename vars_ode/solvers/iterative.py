"""Proximal-gradient solvers in Gram form: ISTA (Eq. 12) and FISTA.

Both iterate on ``K = P^T P`` (``(..., m, m)``) and ``B = P^T X`` (``(..., m, k)``, one problem per
column), so the signal dimension never enters the loop. Problems whose KKT residual reaches
``tol`` are frozen; the loop ends when all are, or after ``max_iter`` iterations. With ``tol = 0``
the loop runs exactly ``max_iter`` iterations and never synchronises with the host.
"""
from __future__ import annotations

import torch

from ..ops import _soft


def _residual_from_grad(grad, u, w):
    on = (grad + w * torch.sign(u)).abs()
    off = torch.relu(grad.abs() - w)
    return torch.where(u != 0, on, off).amax(dim=-2, keepdim=True)


def ista(K, B, w, L, init, *, tol, max_iter, check_every=1, trace=None, **unused):
    """Eq. 12: ``u <- S_{w/L}(u - (K u - B) / L)``. Returns ``(code, iterations)``."""
    _reject(unused, "ista", ("check_every",))
    u = init
    step = 1.0 / L
    active = torch.ones(B.shape[:-2] + (1, B.shape[-1]), dtype=torch.bool, device=B.device)
    iters = torch.zeros(active.shape, dtype=torch.long, device=B.device)
    for it in range(max_iter):
        grad = K @ u - B
        if tol > 0 and it % check_every == 0:
            r = _residual_from_grad(grad, u, w)
            active = active & (r > tol) & torch.isfinite(r)
            if trace is not None:
                trace.append((it, float(r.amax())))
            if not bool(active.any()):
                break
        u_next = _soft(u - step * grad, w * step)
        u = torch.where(active, u_next, u) if tol > 0 else u_next
        iters = iters + active
    return u, iters


def fista(K, B, w, L, init, *, tol, max_iter, check_every=1, restart=True, trace=None, **unused):
    """FISTA (Beck & Teboulle, 2009) with optional gradient-based adaptive restart
    (O'Donoghue & Candes, 2015). One product with ``K`` per iteration. Returns ``(code, iterations)``."""
    _reject(unused, "fista", ("check_every", "restart"))
    u = init
    step = 1.0 / L
    Ku = K @ u
    y, Ky = u, Ku
    t = torch.ones(B.shape[:-2] + (1, B.shape[-1]), dtype=B.dtype, device=B.device)
    active = torch.ones(t.shape, dtype=torch.bool, device=B.device)
    iters = torch.zeros(t.shape, dtype=torch.long, device=B.device)
    for it in range(max_iter):
        if tol > 0 and it % check_every == 0:
            r = _residual_from_grad(Ku - B, u, w)
            active = active & (r > tol) & torch.isfinite(r)
            if trace is not None:
                trace.append((it, float(r.amax())))
            if not bool(active.any()):
                break
        u_next = _soft(y - step * (Ky - B), w * step)
        Ku_next = K @ u_next
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        beta = (t - 1) / t_next
        if restart:
            # restart the momentum where it points uphill: (y - u_next) . (u_next - u) > 0
            bad = ((y - u_next) * (u_next - u)).sum(-2, keepdim=True) > 0
            beta = torch.where(bad, torch.zeros_like(beta), beta)
            t_next = torch.where(bad, torch.ones_like(t_next), t_next)
        y_next = u_next + beta * (u_next - u)
        Ky_next = Ku_next + beta * (Ku_next - Ku)
        if tol > 0:
            u, Ku = torch.where(active, u_next, u), torch.where(active, Ku_next, Ku)
            y, Ky = torch.where(active, y_next, y), torch.where(active, Ky_next, Ky)
            t = torch.where(active, t_next, t)
        else:
            u, Ku, y, Ky, t = u_next, Ku_next, y_next, Ky_next, t_next
        iters = iters + active
    return u, iters


def _reject(unused, solver, known):
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver {solver!r}; valid options: {sorted(known)}")


def active_set(K, B, w, L, init, *, tol, max_iter, first_chunk=16, trace=None, **unused):
    """FISTA with Newton polishing on the active set, for solutions to machine precision.

    Chunks of FISTA iterations (``first_chunk``, then doubling) alternate with a polish step: on
    the current support ``S`` with signs ``s``, solve ``K_SS u_S = b_S - w s_S`` (one batched dense
    solve, a different support per problem). A problem takes the polished point when its KKT
    residual is at or below ``tol``, which happens as soon as FISTA has found the support and signs;
    the others continue with FISTA. ``max_iter`` bounds the FISTA iterations; polish steps count
    as one iteration each. Returns ``(code, iterations)``.
    """
    _reject(unused, "active_set", ("first_chunk",))
    if tol <= 0:
        raise ValueError("tol must be positive for solver 'active_set' (it stops on the KKT residual)")
    m = K.shape[-1]
    eye = torch.eye(m, dtype=K.dtype, device=K.device)
    u = init
    iters = torch.zeros(B.shape[:-2] + (1, B.shape[-1]), dtype=torch.long, device=B.device)
    spent, chunk = 0, int(first_chunk)
    while spent < max_iter:
        n = min(chunk, max_iter - spent)
        u, it = fista(K, B, w, L, u, tol=tol, max_iter=n)
        iters = iters + it
        spent += n
        r = _residual_from_grad(K @ u - B, u, w)
        todo = (r > tol) & torch.isfinite(r)
        if trace is not None:
            trace.append((spent, float(r.amax())))
        if not bool(todo.any()):
            break
        # Newton step on the support of every unfinished problem (batched over columns)
        D = (u != 0).to(K.dtype)
        Dt = D.transpose(-1, -2).unsqueeze(-1)  # (..., k, m, 1)
        M = Dt * K.unsqueeze(-3) * Dt.transpose(-1, -2) + (1 - Dt) * eye
        rhs = (D * (B - w * torch.sign(u))).transpose(-1, -2).unsqueeze(-1)
        sol, info = torch.linalg.solve_ex(M, rhs)
        cand = D * sol.squeeze(-1).transpose(-1, -2)
        ok_solve = (info == 0).unsqueeze(-2)
        rc = _residual_from_grad(K @ cand - B, cand, w)
        take = todo & ok_solve & (rc <= tol) & torch.isfinite(rc)
        u = torch.where(take, cand, u)
        iters = iters + todo
        if not bool((todo & ~take).any()):
            break
        chunk *= 2
    return u, iters
