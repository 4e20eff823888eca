"""Coordinate descent on the Gram form, one compiled loop per problem: ``solver="cd"``.

For each problem, ``min_u 0.5 u^T K u - u^T b + w ||u||_1`` is minimised one coordinate at a time, keeping the
gradient ``g = K u - b``: coordinate ``j`` moves to ``soft(u_j - g_j / K_jj, w / K_jj)``, and a move ``d`` updates
``g`` by ``d K[:, j]`` (``m`` multiply-adds; none when the coordinate stays). After each sweep over the ``m``
coordinates the problem's KKT residual (:func:`vars_ode.lasso.kkt_residual_operator`'s, from ``g``) is compared
with ``tol``, as every solver's (:func:`vars_ode.solve` makes it relative by rescaling the problem); the problem
stops there, independently of the others. ``tol = 0`` runs exactly ``max_iter`` sweeps.

This is scikit-learn's algorithm for ``Lasso(precompute=True)``, written for a batch: the problems run in parallel
over the CPU threads (numba's ``prange``), each in its own cache-sized ``K`` (``128 x 128`` doubles: 128 KiB).
Batched tensor solvers (FISTA, the active set) spend one small matrix product per problem and iteration inside a
library call, about 10 us each (benchmarks/RESULTS.md, fourth session); here a sweep of 128 coordinates costs a few
microseconds. It is the fastest solver of the library for many small problems with a dictionary each, on the CPU.

Requirements and limits: an operator with a Gram matrix, CPU tensors, and numba (``pip install numba``, in the
``dev`` extra; compiled on first use, cached on disk). It has no unrolled gradient: with ``grad="implicit"`` the
solve runs without a graph and the gradient is the equilibrium's (as for every solver); with ``grad="unroll"``
inputs that need a gradient are refused.
"""
from __future__ import annotations

import torch

from .iterative import _reject

_KERNEL = None
_prange = range  # the loop over problems: numba.prange once _kernel compiles _sweeps


def _kernel():
    # compiled on first use (numba's import and compilation cost seconds; its cache keeps the machine code on disk)
    global _KERNEL, _prange, _residual
    if _KERNEL is None:
        try:
            import numba
        except ImportError as err:
            raise ImportError("solver='cd' needs numba (pip install numba; the dev extra has it)") from err
        _prange = numba.prange  # read by numba when it compiles _sweeps
        _residual = numba.njit(cache=True)(_residual)
        _KERNEL = numba.njit(parallel=True, cache=True)(_sweeps), numba
    return _KERNEL


def _residual(g, u, w):
    # the KKT residual from the gradient g = K u - b: the infinity norm of the minimum-norm subgradient
    r = 0.0
    for j in range(u.shape[0]):
        if u[j] > 0.0:
            v = abs(g[j] + w)
        elif u[j] < 0.0:
            v = abs(g[j] - w)
        else:
            v = abs(g[j]) - w
            if v < 0.0:
                v = 0.0
        if not v <= r:  # NaN propagates
            r = v
    return r


def _sweeps(K, kidx, B, w, U, tol, max_sweeps, budget, iters, resid):
    # K: (nK, m, m); kidx: (n,) the K of each problem; B, U: (n, m); w: (n,); iters, resid: (n,) outputs
    n, m = B.shape
    for p in _prange(n):
        Kp = K[kidx[p]]
        b = B[p]
        u = U[p]
        wp = w[p]
        g = Kp @ u - b
        r = 0.0
        done = 0
        for it in range(max_sweeps):
            for j in range(m):
                kjj = Kp[j, j]
                old = u[j]
                if kjj > 0.0:
                    z = old - g[j] / kjj
                    t = wp / kjj
                    new = z - t if z > t else (z + t if z < -t else 0.0)
                else:  # a zero atom: its coordinate is zero at every minimiser
                    new = 0.0
                d = new - old
                if d != 0.0:
                    u[j] = new
                    row = Kp[j]  # K is symmetric: row j is column j, contiguous
                    for i in range(m):
                        g[i] += d * row[i]
            done = it + 1
            r = _residual(g, u, wp)
            if not budget and r <= tol:
                # the kept gradient has drifted by the rounding of its updates: confirm with a fresh one
                g = Kp @ u - b
                r = _residual(g, u, wp)
            if not budget and (r <= tol or not r == r):
                break
        iters[p] = done
        resid[p] = r


def coordinate_descent(op, B, w, L, init, *, tol, max_iter, **unused):
    """``solver="cd"``: coordinate descent per problem on ``op.gram()`` (module docstring). ``max_iter`` counts
    sweeps over the coordinates; returns ``(code, sweeps per problem)``."""
    _reject(unused, "cd", ())
    (b,) = B
    if b.device.type != "cpu":
        raise ValueError(f"solver='cd' runs on CPU tensors, got a {b.device.type} tensor; on other devices use "
                         "'active_set', 'fista' or 'admm'")
    K = op.gram()  # (no graph through it: registered with unrolls=False, which solve_problem enforces)
    kernel, numba = _kernel()
    dtype = torch.float64  # float32 problems too: the kept gradient's updates accumulate no float32 rounding
    lead, m, k = b.shape[:-2], b.shape[-2], b.shape[-1]
    Kx = K.detach().to(dtype)
    klead = torch.broadcast_shapes(Kx.shape[:-2], lead)
    # one K per matrix of the batch, indexed by each problem (no copy of K per column)
    Kc = Kx.expand(*klead, m, m).reshape(-1, m, m).contiguous()
    nK = Kc.shape[0]
    bb = b.detach().to(dtype).expand(*klead, m, k)
    n = bb[..., 0, :].numel()
    kidx = torch.arange(nK).repeat_interleave(k)
    Bp = bb.reshape(nK, m, k).transpose(1, 2).reshape(n, m).contiguous()
    wp = torch.as_tensor(op.expand(0, w), dtype=dtype).detach().expand(*klead, 1, k).reshape(n).contiguous()
    if init is None:
        U = torch.zeros(n, m, dtype=dtype)
    else:
        U = init[0].detach().to(dtype).expand(*klead, m, k).reshape(nK, m, k).transpose(1, 2).reshape(n, m).contiguous()
    iters = torch.zeros(n, dtype=torch.int64)
    resid = torch.zeros(n, dtype=dtype)
    threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(Kc.numpy(), kidx.numpy(), Bp.numpy(), wp.numpy(), U.numpy(), float(tol), int(max_iter),
               bool(tol <= 0), iters.numpy(), resid.numpy())
    finally:
        numba.set_num_threads(previous)
        # numba's OpenMP layer and torch share one OpenMP runtime: numba's setting is torch's too, so torch's own
        # count is put back (else a solve with "cd" leaves torch with numba's count)
        torch.set_num_threads(threads)
    code = U.reshape(nK, k, m).transpose(1, 2).reshape(*klead, m, k).to(b.dtype)
    return (code,), iters.reshape(*klead, k)
