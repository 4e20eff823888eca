"""Fuzzing the public entries with hypothesis: any input, valid or not, either gives a finite result of the
documented shape or raises ValueError / TypeError with a message (never an IndexError, a RuntimeError
from deep inside torch, a hang or a silent NaN on finite input)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vars_ode as vo
from vars_ode.models import CheckpointError, load_official_checkpoint

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMED = (ValueError, TypeError)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
SOLVER_NAMES = ["ista", "fista", "active_set", "admm", "cd", "euler", "rk4", "dopri5", "bosh3", "implicit_euler", "rkc",
                "no_such_solver", ""]


def _tensor(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return t.to(dtype)




def mostly(valid, invalid, k=6):
    """Valid values about k times as often as invalid ones, so that both paths are exercised."""
    return st.sampled_from([True] * k + [False]).flatmap(lambda ok: valid if ok else invalid)


lam_values = mostly(st.floats(0, 2), st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                               st.integers(-3, 3), st.sampled_from(["0.1", None, [0.1, 0.2]])), 3)
GOOD_DTYPES = st.sampled_from([torch.float32, torch.float64])
dtypes = mostly(GOOD_DTYPES, st.sampled_from(DTYPES))
solvers = mostly(st.sampled_from(SOLVER_NAMES[:7]), st.sampled_from(SOLVER_NAMES[7:]), 10)


def _check_named(e: Exception):
    assert isinstance(e, NAMED), f"{type(e).__name__}: {e}"
    # the message names what is wrong (not Python's own words about a conversion deep inside)
    assert str(e) and not str(e).startswith(("cannot convert", "could not convert", "invalid literal")), str(e)


def _check_solution(sol, inputs_finite: bool, atom_dim: int = -1):
    """Every problem has a finite code, or its status says it met a non-finite value."""
    nonfinite = sol.stats.status == vo.Status.NONFINITE
    finite = torch.isfinite(sol.code).all(atom_dim)
    assert (finite | nonfinite).all()
    if inputs_finite:
        assert finite.all() and not nonfinite.any()


@FUZZ
@given(d=mostly(st.integers(1, 5), st.just(0)), m=mostly(st.integers(1, 5), st.just(0)),
       batch=st.sampled_from([(), (0,), (1,), (3,), (2, 2)]), x_extra=mostly(st.just(0), st.sampled_from([1, -1])),
       dtype=dtypes, x_dtype=mostly(st.none(), GOOD_DTYPES, 10), lam=lam_values, solver=solvers,
       tol=mostly(st.sampled_from([1e-6, 0.0, 1e-3]), st.sampled_from([-1.0, float("nan")])),
       scale=st.sampled_from([1.0, 1e-20, 1e20, 1e30, -1.0, 0.0]), p_scale=mostly(st.just(1.0), st.just(0.0), 4),
       seed=st.integers(0, 1000))
@example(d=3, m=2, batch=(2,), x_extra=0, dtype=torch.float64, x_dtype=None, lam=0.1, solver="admm", tol=1e-6,
         scale=1.0, p_scale=0.0, seed=0)  # a zero dictionary: ADMM's inverse was infinite there
def test_solve_either_answers_or_names_the_problem(d, m, batch, x_extra, dtype, x_dtype, lam, solver, tol, scale,
                                                   p_scale, seed):
    P = _tensor((d, m), dtype, p_scale, seed)
    x = _tensor((*batch, max(0, d + x_extra)), x_dtype or dtype, scale, seed + 1)
    try:
        sol = vo.solve(P, x, lam, solver, tol=tol, max_iter=200)
    except Exception as e:  # noqa: BLE001
        _check_named(e)
        return
    assert sol.code.shape == (*batch, m)
    _check_solution(sol, inputs_finite=abs(scale) <= 1 and (not isinstance(lam, float) or math.isfinite(lam)))


@FUZZ
@given(m=mostly(st.integers(1, 5), st.just(0)), cols=st.integers(0, 4), b_rows=mostly(st.just(0), st.just(1)),
       dtype=dtypes, lam=lam_values, solver=solvers,
       L=mostly(st.sampled_from([None, "tensor"]), st.sampled_from([1.0, 0.0, -1.0, float("nan"), "wrong"]), 3),
       symmetric=st.booleans(), seed=st.integers(0, 1000))
@example(m=1, cols=1, b_rows=0, dtype=torch.float32, lam=0.0, solver="ista", L=1.0, symmetric=True, seed=0)
def test_solve_gram_either_answers_or_names_the_problem(m, cols, b_rows, dtype, lam, solver, L, symmetric, seed):
    A = _tensor((m + 2, m), torch.float64, 1.0, seed)
    K = (A.T @ A).to(dtype) if symmetric else _tensor((m, m), dtype, 1.0, seed)
    B = _tensor((m + b_rows, cols), dtype, 1.0, seed + 1)
    # a given L is trusted: one below K's largest eigenvalue (up to about 24 here) can make ISTA's and FISTA's steps
    # grow without bound, reported as status nonfinite (m=1, lam=0, L=1.0 with K = 7.2, ista: the code -inf)
    computed_L = L is None
    if L == "tensor":
        L = torch.full((cols,), 10.0)
    elif L == "wrong":
        L = torch.ones(cols + 2)
    try:
        sol = vo.solve_gram(K, B, lam, solver, tol=1e-6, max_iter=200, L=L)
    except Exception as e:  # noqa: BLE001
        _check_named(e)
        return
    assert sol.code.shape == (m, cols)
    if symmetric:
        _check_solution(sol, inputs_finite=computed_L and (not isinstance(lam, float) or math.isfinite(lam)), atom_dim=0)


LAYER_OPTIONS = {  # valid values first; the last one or two of each list are not
    "dictionary": (["d", "s", "sd"], ["x"]),
    "solver": (["ista", "fista", "rk4", "dopri5", "bosh3", "active_set", "admm", "implicit_euler", "rkc", "cd"], ["nope"]),
    "steps": ([1, 3, None, 2.5], [0, -1]),
    "lam": ([0.0, 0.3], [-1.0, float("inf")]),
    "grad": (["unroll", "implicit", "adjoint"], ["nope"]),
    "static": (["conv", "dense"], ["nope"]),
    "image_size": ([4], [0, -2]),
    "kernel_size": ([3], [0]),
    "tol": ([None, 1e-3], [-1.0]),
    "num_prefix_tokens": (["auto", 0, 1], [-1]),
    "rand_feat_dim_ratio": ([2, 0.5], [0]),
}


@FUZZ
@given(opts=st.fixed_dictionaries({}, optional={k: mostly(st.sampled_from(v), st.sampled_from(bad), 12)
                                              for k, (v, bad) in LAYER_OPTIONS.items()}),
       heads=st.sampled_from([1, 2, 3]), B=st.sampled_from([0, 1, 2]), N=mostly(st.sampled_from([1, 16, 17]), st.just(0)),
       seed=st.integers(0, 100))
def test_vars_layer_either_answers_or_names_the_problem(opts, heads, B, N, seed):
    torch.manual_seed(seed)
    try:
        layer = vo.VARSLayer(12, heads, **opts)
    except Exception as e:  # noqa: BLE001
        _check_named(e)
        return
    x = torch.randn(B, N, 12, requires_grad=True)
    try:
        y = layer(x)
    except Exception as e:  # noqa: BLE001
        _check_named(e)
        return
    assert y.shape == (B, N, 12) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def small_host():
    import timm
    return timm.create_model("vars_deit_tiny", attention="vars_d", num_classes=3, img_size=16, patch_size=8,
                             embed_dim=16, depth=1, num_heads=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cut=st.floats(0, 1), kind=st.sampled_from(["bytes", "truncated", "other"]))
@example(data=b"j", cut=0.0, kind="bytes")  # a cut-off pickle opcode: struct.error from the weights-only unpickler
def test_load_official_checkpoint_refuses_any_bad_file_with_a_checkpoint_error(small_host, tmp_path_factory, data,
                                                                               cut, kind):
    path = tmp_path_factory.mktemp("ckpt") / "c.pth"
    if kind == "bytes":
        path.write_bytes(data)
    else:
        buf = io.BytesIO()
        state = small_host.state_dict()
        if kind == "other":  # a checkpoint of another shape
            state = {k: torch.zeros(v.numel() + 1) for k, v in state.items()}
        torch.save({"model": state}, buf)
        raw = buf.getvalue()
        path.write_bytes(raw[:int(cut * len(raw))] if kind == "truncated" and cut < 1 else raw)
    before = {k: v.clone() for k, v in small_host.state_dict().items()}
    try:
        load_official_checkpoint(small_host, path)
    except Exception as e:  # noqa: BLE001
        assert isinstance(e, (CheckpointError, ValueError)), f"{type(e).__name__}: {e}"
        assert str(path) in str(e) or "key" in str(e).lower() or "shape" in str(e).lower(), str(e)
        after = small_host.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint changed the model"
        return
    assert kind == "truncated" and cut >= 1 or not math.isnan(cut)
