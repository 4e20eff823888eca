import os

# pytest-xdist runs two workers on two cores, each with its own thread pool (and so do the scripts and
# notebook kernels the tests start): threads that wait must sleep, not spin, or the workers slow each
# other down several times over (set before torch loads OpenMP; inherited by subprocesses)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# and one thread each: two workers already fill two cores (the scripts started by tests inherit it unless they
# set their own --threads); VARS_ODE_TEST_THREADS=2 gives each worker two, which measured 9% slower
# (tests/test_layer.py, test_fused.py, test_native.py: 149 s against 137 s)
THREADS = int(os.environ.get("VARS_ODE_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import torch  # noqa: E402

# Without a GPU the Triton kernels (vars_ode.triton_gram) run in Triton's interpreter, which has to be on
# before triton is first imported (timm imports it): torch alone does not import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings

# "vars" (default) draws the same examples on every run, so CI is reproducible; "explore" draws
# new ones each run and more of them: HYPOTHESIS_PROFILE=explore python -m pytest
settings.register_profile("vars", deadline=None, max_examples=12, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=60, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vars"))

torch.set_num_threads(THREADS)


def sklearn_lasso(P, x, lam):
    """The reference minimiser of ``0.5 ||P a - x||^2 + lam ||a||_1`` by scikit-learn's coordinate descent (its
    objective is divided by ``d``); ``x`` of shape ``(d,)`` or ``(n, d)`` (one problem per row)."""
    from sklearn.linear_model import Lasso
    d = P.shape[-2]
    model = Lasso(alpha=lam / d, fit_intercept=False, tol=1e-14, max_iter=10**6)
    return torch.from_numpy(model.fit(P.numpy(), x.numpy().T).coef_)


def make_problem(seed: int, d: int, m: int, dtype=torch.float64, batch=()):
    """A random, well-posed LASSO instance: P with unit-variance columns scaled by 1/sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(*batch, d, generator=g, dtype=torch.float64)
    return P.to(dtype), x.to(dtype)


def output_and_grads(layer, f, x) -> list:
    """``f(x)`` (the layer, or the layer compiled) and, after the backward pass of its sum, the gradients of the
    layer's parameters that have one: ``[output, *gradients]``, detached copies (the gradients are zeroed first)."""
    layer.zero_grad()
    y = f(x)
    y.sum().backward()
    return [y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]


def eager_and_compiled_twice(layer, x):
    """``(eager, compiled, again, first, stats)``: :func:`output_and_grads` of ``layer`` eagerly, then through
    ``torch.compile(backend="aot_eager")`` twice (from a reset of torch._dynamo and its counters); ``first``: the
    graphs captured by the first compiled call, ``stats``: torch._dynamo's counters after the second (a second call
    that captures more graphs recompiled)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = output_and_grads(layer, layer, x)
    compiled_layer = torch.compile(layer, backend="aot_eager")
    compiled = output_and_grads(layer, compiled_layer, x)
    first = counters["stats"]["unique_graphs"]
    again = output_and_grads(layer, compiled_layer, x)
    return eager, compiled, again, first, dict(counters["stats"])


def conditioned_problem(seed: int, d: int, m: int, decades: float, n: int):
    """``P`` (``d x m``, ``m <= d``) with singular values geometric from 1 down to ``10^-decades`` (``K``'s condition
    number ``10^(2 decades)``), and ``n`` signals."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(P, full_matrices=False)
    P = U @ torch.diag(torch.logspace(0, -decades, m, dtype=torch.float64)) @ Vh
    return P, torch.randn(n, d, generator=g, dtype=torch.float64)


def horizon_errors(solver: str, lam: float, steps, fine: float):
    """The largest error of ``solver`` over a horizon of 2 in equal steps of each of ``steps`` against rk4 with steps
    of ``fine`` (four signals of :func:`make_problem`), and the observed orders between successive steps."""
    import math

    import vars_ode as vo
    P, X = make_problem(5, 20, 12, batch=(4,))
    ref = vo.solve(P, X, lam, "rk4", tol=0.0, t_end=2.0, options={"step_size": fine}).code
    errors = [(vo.solve(P, X, lam, solver, tol=0.0, t_end=2.0, step_size=h).code - ref).abs().max().item()
              for h in steps]
    return errors, [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.fixture
def problem():
    return make_problem(0, 20, 12)


@pytest.fixture
def one_thread():
    """For files of tiny problems: intra-op threads only add synchronisation (badly so on a loaded
    machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads_as_found():
    """Every test starts with THREADS intra-op threads. A benchmark's main() sets its own --threads for the process,
    and solver="cd" once left numba's count behind (tests/test_coordinate.py); a later test in the same worker then
    ran with two threads, where float reductions may split differently (test_pipeline's bitwise resume against a
    one-thread subprocess failed that way)."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@torch.no_grad()
def static_dense(atoms, h, dh, r, H, W, N):
    # a code with batch 1 holding one-hot entries; column j of channel c is decode(e_{c, j})
    m = r * H * W
    P = torch.zeros(h, dh, N, m, dtype=torch.float64)
    for c in range(h * dh):
        hh, jj = divmod(c, dh)
        for j in range(m):
            e = torch.zeros(1, h, dh, m, dtype=torch.float64)
            e[0, hh, jj, j] = 1
            P[hh, jj, :, j] = atoms.decode((e.reshape(1, h, dh, r, H, W),))[0, hh, :, jj]
    return P


def pytest_collection_modifyitems(items):
    """The tests marked ``long`` first, in their order, then the others: xdist hands tests out in this order, and a
    worker that starts a long test last keeps the run going after the other has finished (the Triton compile for
    sm_90, 37 s, started near the end, ended the suite 31 s after the other worker)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
