"""Gradients through the LASSO solution.

Three ways, chosen by ``solve(..., grad=...)``:

* ``"unroll"``: autograd records every iteration (exact for the computation performed; memory
  grows with the number of iterations).
* ``"implicit"``: the solution ``u*`` of ``min 0.5 u^T K u - u^T b + w ||u||_1`` satisfies, on its
  active set ``S``, ``K_SS u*_S = b_S - w sign(u*_S)``, and ``u*`` is zero off ``S``. Differentiating
  this identity gives the gradient at the fixed point with one linear solve, whatever the number of
  iterations: with ``v_S = K_SS^{-1} g_S`` (``g`` the incoming gradient) and ``v`` zero off ``S``,
  ``dL/db = v``, ``dL/dK = -v u*^T`` and ``dL/dw = -v . sign(u*)``.
* ``"adjoint"``: torchdiffeq's adjoint method through the ODE solve (ODE solvers only).
"""
from __future__ import annotations

import torch

from .ops import support_system

GRAD_MODES = ("unroll", "implicit", "adjoint")
IMPLICIT_SOLVES = ("direct", "cg")


def _masked_system_apply(K, D, V):
    # (D K D + I - D) V for column masks D (..., m, k): each column has its own active set.
    return D * (K @ (D * V)) + (1 - D) * V


def _cg(K, D, R, iters, tol):
    X = torch.zeros_like(R)
    Rk = R.clone()
    Pk = Rk.clone()
    rs = (Rk * Rk).sum(-2, keepdim=True)
    for _ in range(iters):
        AP = _masked_system_apply(K, D, Pk)
        denom = (Pk * AP).sum(-2, keepdim=True)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(R.dtype).tiny), torch.zeros_like(rs))
        X = X + alpha * Pk
        Rk = Rk - alpha * AP
        rs_new = (Rk * Rk).sum(-2, keepdim=True)
        if float(rs_new.max().sqrt()) <= tol:
            break
        Pk = Rk + (rs_new / rs.clamp_min(torch.finfo(R.dtype).tiny)) * Pk
        rs = rs_new
    return X


class ImplicitLasso(torch.autograd.Function):
    """``code = ImplicitLasso.apply(K, B, w, code_star, method, cg_iters)``: identity in the forward
    pass, implicit differentiation of the LASSO fixed point in the backward pass.

    Shapes: ``K`` ``(..., m, m)``, ``B`` and ``code_star`` ``(..., m, k)``, ``w`` ``(..., 1, k)``.
    """

    @staticmethod
    def forward(ctx, K, B, w, code, method="direct", cg_iters=500):
        ctx.save_for_backward(K, code)
        ctx.method, ctx.cg_iters = method, cg_iters
        ctx.shapes = (K.shape, B.shape, w.shape)
        return code.clone()

    @staticmethod
    def backward(ctx, G):
        K, code = ctx.saved_tensors
        Kshape, Bshape, wshape = ctx.shapes
        D = (code != 0).to(G.dtype)
        rhs = D * G
        if ctx.method == "cg":
            V = _cg(K, D, rhs, ctx.cg_iters, tol=torch.finfo(G.dtype).eps * float(rhs.abs().max().clamp_min(1)))
        else:
            M = support_system(K, D)
            r = rhs.transpose(-1, -2).unsqueeze(-1)
            sol, info = torch.linalg.solve_ex(M, r)
            if bool((info != 0).any()):
                sol = torch.linalg.pinv(M) @ r
            V = sol.squeeze(-1).transpose(-1, -2)
        gK = -(V @ code.transpose(-1, -2))
        gw = -(V * torch.sign(code)).sum(-2, keepdim=True)
        gB = V
        return gK.sum_to_size(Kshape), gB.sum_to_size(Bshape), gw.sum_to_size(wshape), None, None, None
