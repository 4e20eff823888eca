"""Figures of the VARS dynamics, of the solvers and of attention layers (matplotlib).

Every function draws into the axes given with ``ax=`` (a new figure when ``ax`` is None) and returns
``(fig, ax)``; nothing is shown or saved, so the module works under any backend, ``Agg`` included::

    import vars_ode.plot as vp
    fig, ax = vp.phase_portrait(P, x, lam, solvers=("ista", "fista", "dopri5"))
    fig.savefig("phase.png")

* :func:`phase_portrait`: the planar flow of a two-atom problem (reduced Eq. 20), the dead zone of
  ``g``, the LASSO minimiser, trajectories of the reduced and of the coupled (Eq. 8-9, projected on
  ``u``) flows, and the iterates of any solver of :data:`vars_ode.SOLVERS`.
* :func:`convergence`: KKT residual against work or seconds for several solves.
* :func:`energy`: Eq. 22 and the coupled Lyapunov energy along a trajectory.
* :func:`attention_overlay`: per-iteration attention maps (:func:`vars_ode.attention_maps`) over an image.
* :func:`code_statistics`: sparsity and active-set size per step.
* :func:`solver_path`: the codes a solver reaches after 0, 1, ..., k steps (or ODE horizons).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .dynamics import ReducedVARSDynamics, VARSDynamics
from .layer import LayerStats
from .ops import penalty_weight
from .solvers import SOLVERS, Solution, is_ode, solve

__all__ = ["attention_overlay", "code_statistics", "convergence", "energy", "phase_portrait", "solver_path"]


def _axes(ax, n=1, figsize=None):
    """``(fig, ax)``: the given axes (one, or a sequence of ``n``), else new ones in a new figure."""
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, n, figsize=figsize or (4.8 * n, 4.0), squeeze=False)
        ax = ax[0] if n > 1 else ax[0, 0]
        return fig, ax
    if n > 1:
        ax = np.asarray(ax, dtype=object).ravel()
        if len(ax) < n:
            raise ValueError(f"ax must hold at least {n} axes, got {len(ax)}")
        return ax[0].figure, ax[:n]
    if isinstance(ax, (Sequence, np.ndarray)):
        raise ValueError("ax must be one matplotlib Axes here")
    return ax.figure, ax


def _numpy(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=float)


# ----------------------------------------------------------------------------------------------
# solver iterates
# ----------------------------------------------------------------------------------------------
def solver_path(P, x, lam, solver: str = "ista", steps=10, *, init="zeros", convention: str = "eq10",
                **options) -> torch.Tensor:
    """The codes of ``vars_ode.solve(P, x, lam, solver)`` after ``0, 1, ..., steps`` steps.

    ``steps``: an int ``k`` (steps ``1..k``) or an increasing sequence of step counts. For ISTA / FISTA /
    active-set a step is an iteration (``max_iter=k, tol=0``); for an ODE solver it is the horizon
    ``t_end=k`` of the rescaled dynamics (one unit of time is close to one ISTA iteration). Entry 0
    is the initial code (zeros, ``P^T x`` for ``init="encode"``, or the given tensor).

    Returns ``(1 + len(steps), ..., m)``. Each step is a separate solve from the start, so this is
    meant for small problems (figures), not for long runs.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    ks = list(range(1, steps + 1)) if isinstance(steps, int) else list(steps)
    if not ks or any(k <= 0 for k in ks) or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"steps must be a positive int or an increasing sequence of positive numbers, got {steps!r}")
    if isinstance(init, torch.Tensor):
        first = init
    elif init == "encode":
        first = (P.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)
    elif init == "zeros":
        first = torch.zeros(*x.shape[:-1], P.shape[-1], dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"init must be 'zeros', 'encode' or a tensor, got {init!r}")
    out = [first.expand(*torch.broadcast_shapes(first.shape, x.shape[:-1] + (P.shape[-1],)))]
    for k in ks:
        if is_ode(solver):
            sol = solve(P, x, lam, solver, tol=0.0, init=init, convention=convention, t_end=float(k), **options)
        else:
            if int(k) != k:
                raise ValueError(f"{solver} takes whole steps, got {k!r}")
            sol = solve(P, x, lam, solver, tol=0.0, max_iter=int(k), init=init, convention=convention, **options)
        out.append(sol.code)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# phase portrait
# ----------------------------------------------------------------------------------------------
def _threshold(lam, convention, threshold):
    if threshold is not None:
        return float(threshold)
    return float(penalty_weight(torch.as_tensor(float(lam), dtype=torch.float64), convention)) / 2


def _lift(code, theta):
    """A point ``u`` with ``g(u) = code``: each non-zero entry moved out by the threshold."""
    return code + theta * torch.sign(code)


def phase_portrait(P, x, lam, *, alpha: float = 1.0, beta: float = 2.0, gamma: float = 2.0,
                   convention: str = "eq10", threshold=None, starts=None, flows=("reduced", "coupled"),
                   t_max: float = 20.0, solvers=("ista",), steps=10, init="zeros", solver_options=None,
                   grid: int = 25, lim=None, energy_levels: int = 12, legend: bool = True, ax=None):
    """The planar flow of a two-atom problem in the plane of the neuron states ``u``.

    Draws: streamlines of the reduced field (Eq. 20, ``vars_ode.ReducedVARSDynamics``); level sets of
    Eq. 22 at ``g(u)`` (``energy_levels``, 0 for none); the dead zone ``|u_i| <= theta`` of each atom
    (grey bands, where ``g`` is zero); the set ``{u : g(u) = LASSO minimiser}`` (a point, a segment or
    a square: an inactive atom may sit anywhere in its dead zone), with the minimiser from FISTA;
    trajectories of the flows in ``flows`` from each of ``starts`` (reduced: solid; ``"coupled"``:
    Eq. 8-9 from ``(x / alpha, u0)`` projected on ``u``, dashed) with their end points (the flow's
    equilibrium; it lies on the LASSO set exactly when ``alpha, beta, gamma, threshold`` keep the
    equivalence); and the iterates of each solver in ``solvers`` (:func:`solver_path` up to ``steps``)
    lifted into the ``u`` plane by ``u = a + theta sign(a)``: ISTA / FISTA / active-set as points, ODE
    solvers (at horizons ``1..steps``) as lines with small markers.

    Arguments:
        P: ``(d, 2)`` dictionary; x: ``(d,)``; lam, convention, alpha, beta, gamma, threshold: as
            :class:`vars_ode.VARSDynamics` (``threshold`` defaults to half the L1 weight).
        starts: ``(k, 2)`` initial ``u`` of the flow trajectories (default: four points near the corners).
        t_max: integration time of the trajectories (torchdiffeq dopri5).
        lim: half-width of the square shown (default: from the minimiser, the threshold and ``starts``).

    Returns ``(fig, ax)``; the computed points are kept on ``ax.vars_data`` (a dict: ``"lasso"``,
    ``"equilibria"``, ``"theta"``, ``"paths"``) for captions and checks.
    """
    from torchdiffeq import odeint

    P = torch.as_tensor(P, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    if P.dim() != 2 or P.shape[1] != 2:
        raise ValueError(f"P must have shape (d, 2), got {tuple(P.shape)}")
    if x.shape != (P.shape[0],):
        raise ValueError(f"x must have shape ({P.shape[0]},), got {tuple(x.shape)}")
    for f_ in flows:
        if f_ not in ("reduced", "coupled"):
            raise ValueError(f"flows must name 'reduced' and/or 'coupled', got {flows!r}")
    fig, ax = _axes(ax, figsize=(5.6, 5.2))
    theta = _threshold(lam, convention, threshold)
    kw = dict(alpha=alpha, beta=beta, gamma=gamma, convention=convention, threshold=threshold)
    reduced = ReducedVARSDynamics(P, x, lam, **kw)
    coupled = VARSDynamics(P, x, lam, **kw)
    lasso = solve(P, x, lam, "fista", tol=1e-12, max_iter=200_000, convention=convention).code
    lifted = _lift(lasso, theta)
    paths = {s: solver_path(P, x, lam, s, steps, init=init, convention=convention, **(solver_options or {}))
             for s in solvers}
    if lim is None:
        pts = [lifted.abs().max() + theta, torch.tensor(2.0 * theta)]
        pts += [_lift(p, theta).abs().max() for p in paths.values()]
        lim = 1.3 * float(max(pts))
    if starts is None:
        starts = torch.tensor([[-0.9, 0.8], [0.85, 0.9], [0.9, -0.85], [-0.8, -0.9]], dtype=torch.float64) * lim
    starts = torch.as_tensor(starts, dtype=torch.float64).reshape(-1, 2)

    # the field and the energy on a grid
    g1 = torch.linspace(-lim, lim, grid, dtype=torch.float64)
    U1, U2 = torch.meshgrid(g1, g1, indexing="xy")
    UU = torch.stack([U1, U2], -1)
    with torch.no_grad():
        V = reduced(0.0, UU)
        E = reduced.energy(UU)
    if energy_levels:
        ax.contour(_numpy(U1), _numpy(U2), _numpy(E), levels=energy_levels, cmap="viridis", linewidths=0.6,
                   alpha=0.8)
    ax.streamplot(_numpy(U1), _numpy(U2), _numpy(V[..., 0]), _numpy(V[..., 1]), density=1.0, color="0.35",
                  linewidth=0.5, arrowsize=0.8)
    ax.axvspan(-theta, theta, color="grey", alpha=0.15, lw=0)
    ax.axhspan(-theta, theta, color="grey", alpha=0.15, lw=0, label=f"dead zone |u_i| <= {theta:.3g}")

    # the set of u with g(u) = LASSO minimiser
    lo = [float(lifted[i]) if lasso[i] != 0 else -theta for i in range(2)]
    hi = [float(lifted[i]) if lasso[i] != 0 else theta for i in range(2)]
    ax.plot([lo[0], hi[0], hi[0], lo[0], lo[0]], [lo[1], lo[1], hi[1], hi[1], lo[1]], color="red", lw=2.5,
            marker="*", ms=13, label="g(u) = LASSO minimiser", zorder=5)

    # flow trajectories
    ts = torch.linspace(0.0, float(t_max), 400, dtype=torch.float64)
    ends = {}
    with torch.no_grad():
        for j, u0 in enumerate(starts):
            if "reduced" in flows:
                tr = odeint(reduced, u0.clone(), ts, rtol=1e-8, atol=1e-10)
                ax.plot(_numpy(tr[:, 0]), _numpy(tr[:, 1]), color="tab:red", lw=1.2,
                        label="reduced flow (Eq. 20)" if j == 0 else None)
                ends.setdefault("reduced", []).append(tr[-1])
            if "coupled" in flows:
                z0 = coupled.initial_state()[0]
                _, tr = odeint(coupled, (z0, u0.clone()), ts, rtol=1e-8, atol=1e-10)
                ax.plot(_numpy(tr[:, 0]), _numpy(tr[:, 1]), color="tab:purple", lw=1.0, ls="--",
                        label="coupled flow (Eq. 8-9), u" if j == 0 else None)
                ends.setdefault("coupled", []).append(tr[-1])
        equilibria = {k: torch.stack(v) for k, v in ends.items()}
    for k, v in equilibria.items():
        ax.plot(_numpy(v[:, 0]), _numpy(v[:, 1]), "o", mfc="white", mec="black", ms=7, zorder=6,
                label="end of the flow" if k == next(iter(equilibria)) else None)

    # solver iterates
    for i, (s, path) in enumerate(paths.items()):
        u = _lift(path, theta)
        colour = f"C{(i + 2) % 10}"
        if is_ode(s):
            ax.plot(_numpy(u[:, 0]), _numpy(u[:, 1]), "-", marker=".", ms=4, color=colour, lw=1.5,
                    label=f"{s} (horizons 0..{len(path) - 1})")
        else:
            ax.plot(_numpy(u[:, 0]), _numpy(u[:, 1]), "o", ls=":", lw=0.8, ms=4, color=colour,
                    label=f"{s} iterates (0..{len(path) - 1})")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="u_1", ylabel="u_2", aspect="equal",
           title=f"alpha {alpha:g}, beta {beta:g}, gamma {gamma:g}")
    if legend:
        ax.legend(fontsize=7, loc="lower left")
    ax.vars_data = dict(lasso=lasso, lifted=lifted, theta=theta, equilibria=equilibria, paths=paths, lim=lim)
    return fig, ax


# ----------------------------------------------------------------------------------------------
# convergence and energy
# ----------------------------------------------------------------------------------------------
_X_LABELS = {"work": "work (iterations or function evaluations)", "iterations": "iterations",
             "evaluations": "function evaluations", "seconds": "seconds (work-proportional)"}


def _trace_of(run):
    """``(work array, residual array, seconds or None, unit or None)`` of one run."""
    seconds = unit = None
    if isinstance(run, Solution):
        trace, unit = run.stats.trace, run.stats.unit
        if trace is None:
            raise ValueError("this Solution has no trace: solve with trace=[]")
    elif isinstance(run, Mapping):
        trace, seconds, unit = run["trace"], run.get("seconds"), run.get("unit")
    else:
        trace = run
    arr = np.asarray([(float(w), float(r)) for w, r in trace], dtype=float).reshape(-1, 2)
    if not len(arr):
        raise ValueError("empty trace")
    return arr[:, 0], arr[:, 1], seconds, unit


def convergence(runs, *, x: str = "work", tols=(), ax=None, title=None, markers: bool = True):
    """KKT residual against work (iterations / function evaluations) or seconds, one line per run.

    ``runs``: ``{label: run}`` where a run is a :class:`vars_ode.Solution` solved with ``trace=[]``, a
    sequence of ``(work, residual)`` pairs (the ``trace`` list itself), or a dict ``{"trace": pairs,
    "seconds": total wall time, "unit": ...}``. ``x``: ``"work"``, ``"iterations"``, ``"evaluations"``
    or ``"seconds"`` (needs ``"seconds"`` in every run; each point's time is the run's total time
    times its share of the work). Work 0 (the start) is drawn at 1 on the log axis; a residual of
    exactly 0 is left out (it has no place on a log axis). ``tols``: dotted
    horizontal lines. Returns ``(fig, ax)``.
    """
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {list(_X_LABELS)}, got {x!r}")
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty mapping {label: run}")
    fig, ax = _axes(ax, figsize=(6.0, 4.0))
    for label, run in runs.items():
        w, r, seconds, _ = _trace_of(run)
        if x == "seconds":
            if seconds is None:
                raise ValueError(f"run {label!r} has no 'seconds' (pass a dict with 'trace' and 'seconds')")
            xs = np.maximum(w, 1.0) / max(w[-1], 1.0) * float(seconds)
        else:
            xs = np.maximum(w, 1.0)
        ax.plot(xs, np.where(r > 0, r, np.nan), ".-" if markers else "-", ms=3, label=str(label))
    for t in tols:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel=_X_LABELS[x], ylabel="KKT residual", title=title)
    ax.legend(fontsize=8)
    return fig, ax


def energy(dynamics, states, t=None, *, minimum=None, ax=None, title=None):
    """Eq. 22 (the LASSO objective at ``g(u)``) and, for the coupled system, its Lyapunov energy.

    ``dynamics``: :class:`vars_ode.VARSDynamics` (``states = (z, u)`` as returned by ``odeint``, each
    ``(T, ...)``) or :class:`vars_ode.ReducedVARSDynamics` (``states = u``, ``(T, ...)``). The coupled
    energy ``E_H`` is drawn shifted by ``||x||^2`` (computed as twice Eq. 22 at a zero code), so that
    with ``alpha = 1, beta = gamma = 2`` both curves share their minimum, the LASSO minimum. With
    ``minimum`` given, ``E - minimum`` is drawn on a log axis. Each label carries the curve's largest
    rise between two samples. Leading problem dimensions are summed. Returns ``(fig, ax)``; the curves
    are kept on ``ax.vars_data``.
    """
    coupled = isinstance(dynamics, VARSDynamics)
    if not coupled and not isinstance(dynamics, ReducedVARSDynamics):
        raise ValueError("dynamics must be a vars_ode.VARSDynamics or vars_ode.ReducedVARSDynamics")
    if coupled and not (isinstance(states, (tuple, list)) and len(states) == 2):
        raise ValueError("for VARSDynamics, states must be the pair (z, u) of trajectories")
    u = states[1] if coupled else states
    T = u.shape[0]
    ts = np.arange(T, dtype=float) if t is None else _numpy(t)
    if ts.shape != (T,):
        raise ValueError(f"t must have {T} entries, got shape {ts.shape}")
    fig, ax = _axes(ax, figsize=(6.0, 4.0))
    with torch.no_grad():
        st = (states[0], states[1]) if coupled else states
        curves = {"Eq. 22 (LASSO objective at g(u))": dynamics.lasso_energy(st)}
        if coupled:
            xx = 2.0 * dynamics.lasso_energy(torch.zeros_like(u[0]))
            curves["E_H + ||x||^2 (Lyapunov, Eq. 8-9)"] = dynamics.energy(st) + xx
    data = {}
    for name, c in curves.items():
        c = c.reshape(T, -1).sum(-1)
        y = _numpy(c)
        rise = float(np.max(np.diff(y))) if T > 1 else 0.0
        if minimum is not None:
            y = np.maximum(y - float(minimum), 1e-300)
        ax.plot(ts, y, label=f"{name}; largest rise {rise:.1e}")
        data[name] = c
    if minimum is not None:
        ax.set_yscale("log")
    ax.set(xlabel="t", ylabel="energy" + (" - minimum" if minimum is not None else ""),
           title=title or ("coupled flow (Eq. 8-9)" if coupled else "reduced flow (Eq. 20)"))
    ax.legend(fontsize=8)
    ax.vars_data = data
    return fig, ax


# ----------------------------------------------------------------------------------------------
# attention maps and code statistics
# ----------------------------------------------------------------------------------------------
def _image_hw(image):
    img = _numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"image must be (H, W), (1 or 3, H, W) or (H, W, 1 or 3), got shape {tuple(img.shape)}")
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _map_grid(maps, grid, prefix_tokens):
    if isinstance(maps, Mapping):
        raise ValueError(f"maps must be one image's maps of one layer, (T, N) or (T, H, W), got a mapping with keys "
                         f"{list(maps)[:3]}: pass attention_maps(...)[layer][i] for image i")
    m = _numpy(maps)
    if m.ndim == 3:
        return m
    if m.ndim != 2:
        raise ValueError(f"maps must be (T, N) or (T, H, W), got shape {tuple(m.shape)}")
    N = m.shape[1]
    if grid is None:
        if prefix_tokens == "auto":
            s = math.isqrt(N)
            prefix_tokens = N - s * s
        side = math.isqrt(N - prefix_tokens)
        grid = (side, side)
    elif prefix_tokens == "auto":
        prefix_tokens = N - grid[0] * grid[1]
    if prefix_tokens < 0 or N - prefix_tokens != grid[0] * grid[1]:
        raise ValueError(f"{N} tokens do not make a {grid} grid after {prefix_tokens} prefix tokens")
    return m[:, prefix_tokens:].reshape(m.shape[0], *grid)


def attention_overlay(image, maps, *, steps=None, grid=None, prefix_tokens="auto", cmap: str = "inferno",
                      alpha: float = 0.6, colorbar: bool = True, first_step: int = 0, ax=None, title=None):
    """Per-iteration attention maps drawn over the image, one panel per step, with one colour bar.

    ``image``: ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with one or three channels (min-max scaled
    for display). ``maps``: ``(T, N)``, one image's entry of :func:`vars_ode.attention_maps` (``T``
    recorded iterations, ``N`` tokens, prefix tokens first: they are dropped, ``"auto"`` as the
    layer: ``N - floor(sqrt(N))**2``, and the rest reshaped to ``grid``, square by default), or
    ``(T, h, w)``. ``steps``: which of the ``T`` maps to draw (default all); panel titles number them
    from ``first_step`` (``1`` for :func:`vars_ode.attention_maps`, whose first map is the iterate
    after one step). All panels share one colour scale. ``ax``: a sequence of at least ``len(steps)``
    axes. Returns ``(fig, axes)``.
    """
    img = _image_hw(image)
    grids = _map_grid(maps, grid, prefix_tokens)
    (h, w), (H, W) = grids.shape[1:], img.shape[:2]
    if not 0.5 <= (w / h) / (W / H) <= 2.0:  # most likely attention_maps' (B, T, N) of one layer, read as (T, h, w)
        raise ValueError(f"maps of shape {tuple(grids.shape)} give {h} x {w} grids for a {H} x {W} image; pass one "
                         f"image's maps, (T, N) (attention_maps(...)[layer][i]) or (T, h, w) with the image's aspect")
    steps = list(range(grids.shape[0])) if steps is None else list(steps)
    if not steps or any(not 0 <= s < grids.shape[0] for s in steps):
        raise ValueError(f"steps must index the {grids.shape[0]} maps, got {steps!r}")
    n = len(steps)
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, n, figsize=(2.3 * n + (0.6 if colorbar else 0), 2.5), squeeze=False)
        axes = axes[0]
    else:
        axes = np.asarray([ax] if not isinstance(ax, (Sequence, np.ndarray)) else ax, dtype=object).ravel()
        if len(axes) < n:
            raise ValueError(f"ax must hold at least {n} axes (one per step), got {len(axes)}")
        axes = axes[:n]
        fig = axes[0].figure
    H, W = img.shape[:2]
    vmin, vmax = float(grids[steps].min()), float(grids[steps].max())
    im = None
    for a, s in zip(axes, steps):
        a.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        im = a.imshow(grids[s], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest",
                      extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        a.set_title(f"step {s + first_step}", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    if colorbar:
        cb = fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _stats_of(item, dim):
    """``(sparsity, active-set size)`` of one code tensor or one :class:`vars_ode.LayerStats`."""
    if isinstance(item, LayerStats):
        return float(item.sparsity), float(item.nnz.double().mean())
    if not isinstance(item, (torch.Tensor, np.ndarray)):
        raise ValueError(f"data's entries must be code tensors or LayerStats, got {type(item).__name__}")
    c = torch.as_tensor(item)
    nz = c != 0
    return float(1.0 - nz.double().mean()), float(nz.double().sum(dim).mean())


def code_statistics(data, *, steps=None, dim: int = -1, ax=None, title=None):
    """Sparsity (fraction of zero entries) and active-set size (mean non-zeros per problem) per step.

    ``data``: a sequence, one entry per step, of code tensors (atoms along ``dim``) or of
    :class:`vars_ode.LayerStats` (a layer's ``last_stats``); or ``{label: such a sequence}`` for
    several curves. ``steps``: the x values (default ``0, 1, ...``). ``ax``: two axes. Returns
    ``(fig, (ax_sparsity, ax_active))``; the numbers are kept on ``ax_sparsity.vars_data``.
    """
    series = dict(data) if isinstance(data, Mapping) else {None: data}
    if not series or any(len(v) == 0 for v in series.values()):
        raise ValueError("data must hold at least one step")
    fig, axes = _axes(ax, n=2, figsize=(10.0, 3.6))
    out = {}
    for label, seq in series.items():
        xs = list(range(len(seq))) if steps is None else list(steps)
        if len(xs) != len(seq):
            raise ValueError(f"steps has {len(xs)} entries for {len(seq)} steps of data")
        sp, act = zip(*(_stats_of(it, dim) for it in seq))
        axes[0].plot(xs, sp, "o-", ms=4, label=label)
        axes[1].plot(xs, act, "o-", ms=4, label=label)
        out[label] = dict(sparsity=list(sp), active=list(act))
    axes[0].set(xlabel="step", ylabel="fraction of zero code entries", title="sparsity", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="step", ylabel="non-zero atoms per problem", title="active-set size")
    if any(k is not None for k in series):
        for a in axes:
            a.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    axes[0].vars_data = out
    return fig, (axes[0], axes[1])
