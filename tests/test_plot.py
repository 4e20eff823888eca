"""vars_ode.plot: each function draws the expected artists, with the data it was given, on tiny inputs."""
from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torchdiffeq import odeint  # noqa: E402

import vars_ode as vo  # noqa: E402
import vars_ode.plot as vp  # noqa: E402

DT = torch.float64


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def two_atoms(seed=3):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(3, 2, generator=g, dtype=DT)
    x = torch.randn(3, generator=g, dtype=DT)
    return P, x, 0.4 * float((P.T @ x).abs().max())


def line(ax, label):
    hits = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(hits) == 1, [ln.get_label() for ln in ax.get_lines()]
    return hits[0]


def lifted(code, theta):
    return code + theta * torch.sign(code)


# ----------------------------------------------------------------------------------------------
def test_import_does_not_load_pyplot():
    out = subprocess.run([sys.executable, "-c", "import sys, vars_ode.plot; print('matplotlib.pyplot' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_solver_path_is_ista_by_hand_and_ode_horizons():
    P, x, lam = two_atoms()
    path = vp.solver_path(P, x, lam, "ista", 4)
    assert path.shape == (5, 2)
    L = float(torch.linalg.eigvalsh(P.T @ P)[-1])
    u = torch.zeros(2, dtype=DT)
    assert torch.equal(path[0], u)
    for k in range(1, 5):
        u = vo.soft_threshold(u - (P.T @ (P @ u - x)) / L, lam / L)
        torch.testing.assert_close(path[k], u, rtol=1e-10, atol=1e-12)
    enc = vp.solver_path(P, x, lam, "fista", [2, 5], init="encode")
    torch.testing.assert_close(enc[0], P.T @ x)
    torch.testing.assert_close(enc[2], vo.solve(P, x, lam, "fista", tol=0.0, max_iter=5, init="encode").code)
    ode = vp.solver_path(P, x, lam, "rk4", [1.5, 3.0])
    torch.testing.assert_close(ode[2], vo.solve(P, x, lam, "rk4", tol=0.0, t_end=3.0).code)
    assert not torch.equal(ode[1], ode[2])
    with pytest.raises(ValueError, match="increasing"):
        vp.solver_path(P, x, lam, "ista", [3, 2])
    with pytest.raises(ValueError, match="solver"):
        vp.solver_path(P, x, lam, "newton", 2)


def test_phase_portrait_artists_and_data():
    P, x, lam = two_atoms()
    fig, ax = vp.phase_portrait(P, x, lam, solvers=("ista", "dopri5"), steps=4, grid=9, t_max=40.0,
                                starts=[[-1.0, 1.0], [1.0, -1.0]])
    assert fig is ax.figure
    d = ax.vars_data
    theta = lam / 2
    assert d["theta"] == pytest.approx(theta)
    lasso = vo.solve(P, x, lam, "fista", tol=1e-12, max_iter=100_000).code
    torch.testing.assert_close(d["lasso"], lasso, rtol=0, atol=1e-9)
    # streamlines and energy contours
    assert any(isinstance(c, LineCollection) and len(c.get_segments()) > 0 for c in ax.collections)
    assert any(isinstance(c, ContourSet) for c in ax.collections)
    # the two dead-zone bands: 2 theta wide in u_1 (vertical band) and in u_2 (horizontal band)
    spans = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(spans) == 2
    assert sorted(p.get_width() for p in spans)[0] == pytest.approx(2 * theta)      # axvspan: data-wide in u_1
    assert sorted(p.get_height() for p in spans)[0] == pytest.approx(2 * theta)     # axhspan: data-high in u_2
    assert sorted(p.get_x() for p in spans)[0] == pytest.approx(-theta)
    # the LASSO set: every drawn point maps to the minimiser under g
    ls = line(ax, "g(u) = LASSO minimiser")
    pts = torch.tensor(np.c_[ls.get_xdata(), ls.get_ydata()], dtype=DT)
    torch.testing.assert_close(vo.soft_threshold(pts, theta), lasso.expand_as(pts), rtol=0, atol=1e-9)
    # ISTA iterates: points, the lifted codes of solver_path
    it = line(ax, "ista iterates (0..4)")
    assert it.get_marker() == "o" and len(it.get_xdata()) == 5
    want = lifted(vp.solver_path(P, x, lam, "ista", 4), theta)
    np.testing.assert_allclose(np.c_[it.get_xdata(), it.get_ydata()], want.numpy())
    assert len(line(ax, "dopri5 (horizons 0..4)").get_xdata()) == 5
    # flows: both kinds drawn; with the paper's alpha, beta, gamma the flow ends in the LASSO set
    assert len([ln for ln in ax.get_lines() if ln.get_color() == "tab:red"]) == 2
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]) == 2
    for ends in d["equilibria"].values():
        assert ends.shape == (2, 2)
        torch.testing.assert_close(vo.soft_threshold(ends, theta), lasso.expand(2, 2), rtol=0, atol=1e-5)


def test_phase_portrait_off_the_lasso_and_given_axes():
    P, x, lam = two_atoms()
    fig0, ax0 = plt.subplots()
    fig, ax = vp.phase_portrait(P, x, lam, beta=1.0, gamma=1.0, solvers=(), flows=("reduced",), grid=7,
                                energy_levels=0, starts=[[0.5, 0.5]], ax=ax0)
    assert fig is fig0 and ax is ax0
    assert not any(isinstance(c, ContourSet) for c in ax.collections)
    end = ax.vars_data["equilibria"]["reduced"][0]
    code = vo.soft_threshold(end, lam / 2)
    assert float((code - ax.vars_data["lasso"]).abs().max()) > 1e-2   # beta = gamma = 1: not the LASSO
    with pytest.raises(ValueError, match=r"\(d, 2\)"):
        vp.phase_portrait(torch.randn(3, 3, dtype=DT), torch.randn(3, dtype=DT), 0.1)


def test_convergence_lines_follow_the_traces():
    P, x, lam = two_atoms()
    trace = []
    sol = vo.solve(P, x, lam, "ista", tol=1e-8, trace=trace)
    fista = vo.solve(P, x, lam, "fista", tol=1e-8, trace=[])
    fig, ax = vp.convergence({"ista": sol, "fista": fista, "pairs": trace}, tols=(1e-4, 1e-8))
    assert [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")] == ["ista", "fista", "pairs"]
    w, r = np.array(trace).T
    ln = line(ax, "ista")
    np.testing.assert_array_equal(ln.get_xdata(), np.maximum(w, 1))
    np.testing.assert_array_equal(ln.get_ydata(), np.where(r > 0, r, np.nan))
    np.testing.assert_array_equal(line(ax, "fista").get_ydata()[:2], np.array(fista.stats.trace)[:2, 1])
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]) == 2
    fig, ax = vp.convergence({"ista": {"trace": trace, "seconds": 2.0}}, x="seconds")
    xs = line(ax, "ista").get_xdata()
    assert xs[-1] == pytest.approx(2.0) and xs[0] == pytest.approx(2.0 / w[-1])
    with pytest.raises(ValueError, match="seconds"):
        vp.convergence({"ista": trace}, x="seconds")
    with pytest.raises(ValueError, match="trace"):
        vp.convergence({"ista": vo.solve(P, x, lam, "ista")})


def test_energy_curves_are_the_dynamics_energies():
    P, x, lam = two_atoms()
    f = vo.VARSDynamics(P, x, lam)
    ts = torch.linspace(0, 30, 61, dtype=DT)
    z, u = odeint(f, f.initial_state(), ts, rtol=1e-10, atol=1e-12)
    fig, ax = vp.energy(f, (z, u), ts)
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert len(labels) == 2 and labels[0].startswith("Eq. 22") and labels[1].startswith("E_H")
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), f.lasso_energy((z, u)).numpy())
    eh = ax.get_lines()[1].get_ydata()
    np.testing.assert_allclose(eh, (f.energy((z, u)) + x @ x).numpy())
    # at the equilibrium the shifted E_H meets the LASSO minimum (alpha = 1, beta = gamma = 2)
    lasso_min = float(vo.lasso_objective(P, vo.solve(P, x, lam, "fista", tol=1e-12).code, x, lam))
    assert eh[-1] == pytest.approx(lasso_min, abs=1e-6)
    rise = float(np.diff(eh).max())
    assert f"largest rise {rise:.1e}" in labels[1]
    fig, ax = vp.energy(vo.ReducedVARSDynamics(P, x, lam), u, ts, minimum=lasso_min)
    assert len(ax.get_lines()) == 1 and ax.get_yscale() == "log"
    assert (ax.get_lines()[0].get_ydata() > 0).all()
    with pytest.raises(ValueError, match="pair"):
        vp.energy(f, u)


def tiny_layer(**kw):
    torch.manual_seed(0)
    return vo.VARSLayer(8, 2, dictionary="d", lam=0.1, init="encode", **kw)


def test_attention_overlay_draws_the_maps_of_attention_maps():
    layer = tiny_layer(steps=3)
    tokens = torch.randn(2, 1 + 16, 8)
    maps = vo.attention_maps(layer, tokens)[""]        # the layer itself is the model: name ""
    assert maps.shape[0] == 2 and maps.shape[-1] == 17
    T = maps.shape[1]
    image = torch.rand(1, 8, 8)
    fig, axes = vp.attention_overlay(image, maps[0], title="tiny")
    assert len(axes) == T and len(fig.axes) == T + 1          # one colour bar
    want = maps[0, :, 1:].reshape(T, 4, 4).numpy()
    for k, a in enumerate(axes):
        ims = a.get_images()
        assert len(ims) == 2
        scaled = (image[0] - image.min()) / (image.max() - image.min())        # min-max scaled for display
        np.testing.assert_allclose(ims[0].get_array(), scaled.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ims[1].get_array(), want[k], rtol=1e-6)
        assert ims[1].get_clim() == pytest.approx((want.min(), want.max()), rel=1e-6)
        assert a.get_title() == f"step {k}"
    fig, axes = vp.attention_overlay(torch.rand(8, 8, 3), want, steps=[0, T - 1], colorbar=False, first_step=1)
    assert len(axes) == 2 and len(fig.axes) == 2
    assert [a.get_title() for a in axes] == ["step 1", f"step {T}"]
    given = plt.subplots(1, 3)[1]
    fig, axes = vp.attention_overlay(image, maps[0], steps=[0], ax=given)
    assert axes[0] is given[0]
    with pytest.raises(ValueError, match="grid"):
        vp.attention_overlay(image, torch.rand(3, 15), prefix_tokens=0)
    with pytest.raises(ValueError, match=r"one image's maps of one layer.*\[layer\]\[i\]"):
        vp.attention_overlay(image, {"blocks.0.attn": maps})  # attention_maps' whole output
    with pytest.raises(ValueError, match=r"give 3 x 17 grids for a"):
        vp.attention_overlay(image, torch.rand(2, 3, 17))  # one layer's (B, T, N), not one image's


def test_code_statistics_counts_zeros_and_active_atoms():
    codes = [torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])]
    fig, (a0, a1) = vp.code_statistics(codes, steps=[1, 3])
    np.testing.assert_allclose(a0.get_lines()[0].get_ydata(), [0.5, 5 / 6])
    np.testing.assert_allclose(a1.get_lines()[0].get_ydata(), [1.5, 0.5])
    np.testing.assert_array_equal(a0.get_lines()[0].get_xdata(), [1, 3])
    # atoms along dim 0: per column
    fig, (a0, a1) = vp.code_statistics(codes, dim=0)
    np.testing.assert_allclose(a1.get_lines()[0].get_ydata(), [1.0, 1 / 3])
    # from a layer's statistics, several labelled curves, into given axes
    layer, tokens, stats = tiny_layer(), torch.randn(2, 17, 8), []
    for k in (1, 2, 4):
        layer.set_solver("ista", steps=k)
        with torch.no_grad():
            layer(tokens)
        stats.append(layer.last_stats)
    given = plt.subplots(1, 2)[1]
    fig, (a0, a1) = vp.code_statistics({"ista": stats, "codes": codes + codes[:1]}, steps=[1, 2, 4], ax=given)
    assert a0 is given[0] and [ln.get_label() for ln in a0.get_lines()] == ["ista", "codes"]
    np.testing.assert_allclose(a0.get_lines()[0].get_ydata(), [float(s.sparsity) for s in stats])
    np.testing.assert_allclose(a1.get_lines()[0].get_ydata(), [float(s.nnz.double().mean()) for s in stats])
    assert a0.vars_data["ista"]["sparsity"] == list(a0.get_lines()[0].get_ydata())
    with pytest.raises(ValueError, match="steps"):
        vp.code_statistics(codes, steps=[1])
    with pytest.raises(ValueError, match="code tensors or LayerStats, got str"):
        vp.code_statistics(["ista"])
