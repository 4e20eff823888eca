"""The fused node's integration and its reverse pass compiled (``options={"compile": ...}``,
vars_ode.solvers.compiled_ode) against the same integration run eagerly: outputs, every gradient and the
evaluation count, in float64; and a steady state's attempts compiled (``vo.solve(..., options={"compile": ...})``,
compiled_ode.steady_attempt) against the eager attempts, scikit-learn and the refusals."""
import math

import pytest
import torch

import vars_ode as vo
from conftest import make_problem, sklearn_lasso
from vars_ode.dynamics import VARSField
from vars_ode.lasso import GramOperator
from vars_ode.solvers import compiled_ode, native


class CountingBackend:
    """A torch.compile backend that runs ``inner`` and counts the graphs handed to it: a compiled call that fell
    back to eager code would leave the count at zero, and the comparison with eager would prove nothing."""

    def __init__(self, inner="aot_eager"):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, inputs)


def _layer(dictionary, solver, steps, options, grad="unroll", seed=0):
    torch.manual_seed(seed)
    kw = (dict(dictionary="sd", static="dense", num_static_atoms=6) if dictionary == "sd-dense"
          else dict(dictionary=dictionary))
    return vo.VARSLayer(16, 2, solver=solver, steps=steps, grad=grad, solver_options=options, **kw).double()


def _run(layer, x):
    x = x.detach().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    layer.forced = layer.last_stats.forced
    return [y.detach()] + grads, int(layer.last_stats.iterations.max())


def _assert_same(got, ref):
    assert len(got) == len(ref) > 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("dictionary,solver,grad,options", [
    ("d", "dopri5", "unroll", {"fixed_attempts": 4}),          # about the budget the default loop needs
    ("d", "dopri5", "unroll", {"fixed_attempts": 2}),          # a budget that binds: the last step forced
    ("d", "bosh3", "adjoint", {"fixed_attempts": 3}),          # a checkpointed tape: stages evaluated again
    ("sd-dense", "rk4", "unroll", {"step_size": 0.75}),        # a fixed-step method needs no budget
])
def test_compiled_integration_equals_the_eager_one(dictionary, solver, grad, options):
    backend = CountingBackend()
    x = torch.randn(2, 17, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eager, compiled = (_layer(dictionary, solver, 3, {"options": dict(options)}, grad),
                       _layer(dictionary, solver, 3, {"options": {**options, "compile": backend}}, grad))
    ref, evals = _run(eager, x)
    got, evals_c = _run(compiled, x)
    assert backend.graphs >= 2  # the forward integration and the reverse pass, each one graph
    assert evals_c == evals
    _assert_same(got, ref)
    # the problems the budget forced (LayerStats.forced) come out of the compiled graph as they do eagerly
    if solver == "rk4":
        assert eager.forced is None and compiled.forced is None
    else:
        assert torch.equal(compiled.forced, eager.forced) and compiled.forced.shape == (2, 2, 8)
        if options["fixed_attempts"] == 2:
            assert int(eager.forced.sum()) > 0  # the budget binds


@pytest.mark.long
def test_compiled_with_inductor_in_float32_is_as_close_to_float64_as_eager():
    # the default backend (True: Inductor, C++ on the CPU) on the method, dopri5 with a budget. Inductor
    # reorders and fuses sums: in float32 the compiled integration differs from the eager one by rounding, and stays
    # as close to the float64 answer (at a DeiT-Ti layer's size closer). The budget is unrolled into the graph, and
    # Inductor's code generation grows with it: two attempts compile in about 35 s here, five took 70 s
    assert compiled_ode.backend("dopri5", True, {"fixed_attempts": 2}) == "inductor"
    inductor = CountingBackend("inductor")
    x = torch.randn(2, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref, _ = _run(_layer("d", "dopri5", 3, {"options": {"fixed_attempts": 2}}), x)
    outs = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": inductor})):
        layer = _layer("d", "dopri5", 3, {"options": {"fixed_attempts": 2, **extra}}).float()
        outs[name], evals = _run(layer, x.float())
        assert evals == 13
    assert inductor.graphs >= 2
    for i, r in enumerate(ref):
        scale = float(r.abs().max())
        err_e = float((outs["eager"][i].double() - r).abs().max()) / scale
        err_c = float((outs["compiled"][i].double() - r).abs().max()) / scale
        assert err_c <= max(10 * err_e, 1e-5), (i, err_c, err_e)


def test_a_compiled_model_ignores_the_option():
    # under torch.compile the layer takes the generic path, compiled with the rest: the option has nothing to add
    torch._dynamo.reset()
    layer = _layer("d", "dopri5", 2, {"options": {"fixed_attempts": 2, "compile": True}}).float()
    plain = _layer("d", "dopri5", 2, {"options": {"fixed_attempts": 2}}).float()
    x = torch.randn(2, 5, 16)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver,options,match", [
    ("dopri5", {"compile": True}, r"options\['compile'\] with method 'dopri5' needs options\['fixed_attempts'\]"),
    ("bosh3", {"compile": True, "first_step": 0.3}, r"needs options\['fixed_attempts'\]"),
    ("rk4", {"compile": "no-such-backend"}, r"options\['compile'\] must be True, False, a torch.compile backend"),
    ("euler", {"compile": 3}, r"options\['compile'\] must be True, False"),
])
def test_bad_compile_options_are_named(solver, options, match):
    layer = _layer("d", solver, 2, {"options": options})
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(1, 5, 16, dtype=torch.float64))


def test_the_generic_path_refuses_the_option():
    P = torch.randn(12, 8, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"options\['compile'\] compiles the fused layer node's integration"):
        vo.solve(P, x, lam=0.1, solver="rk4", t_end=2.0, options={"compile": True})
    # conv templates run in operator form, not in the fused node
    layer = vo.VARSLayer(16, 2, dictionary="sd", solver="rk4", steps=2, solver_options={"options": {"compile": True}})
    with pytest.raises(ValueError, match=r"options\['compile'\] compiles the fused layer node's integration"):
        layer(torch.randn(1, 17, 16))
    # a False value is no request
    out = vo.solve(P, x, lam=0.1, solver="rk4", t_end=2.0, options={"compile": False})
    ref = vo.solve(P, x, lam=0.1, solver="rk4", t_end=2.0)
    assert torch.equal(out.code, ref.code)
    assert compiled_ode.backend("rk4", False, {}) is None


def test_under_a_dispatch_mode_the_same_functions_run_eagerly():
    # count_host_syncs is a dispatch mode, under which torch.compile traces nothing: the option then runs the same
    # integration uncompiled (no error), and a budget still reads nothing
    backend = CountingBackend()
    layer = _layer("d", "dopri5", 3, {"options": {"fixed_attempts": 5, "compile": backend}})
    x = torch.randn(2, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with vo.sync.count_host_syncs() as reads:
        y = layer(x)
    assert reads.count == 0 and backend.graphs == 0
    ref, _ = _run(_layer("d", "dopri5", 3, {"options": {"fixed_attempts": 5}}), x)
    torch.testing.assert_close(y.detach(), ref[0], rtol=1e-12, atol=1e-12)


def test_more_settings_than_torch_compiles_default_limit():
    # torch.compile keeps 8 versions of a function by default, and with fullgraph=True the ninth fails; a process
    # with a few layers' settings (methods, budgets, shapes, train and eval batches) needs more
    backend = CountingBackend()
    x = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for step in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3):  # nine settings
        opts = {"step_size": step}
        ref, _ = _run(_layer("d", "euler", 2, {"options": opts}), x)
        got, _ = _run(_layer("d", "euler", 2, {"options": {**opts, "compile": backend}}), x)
        _assert_same(got, ref)
    assert backend.graphs >= 18


def _steady_pair(backend, seed=0, k=6):
    # two dopri5 integrators of one Gram-form field to its steady state (Hairer's control, as in vo.solve), the
    # second with its attempts compiled by backend
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(30, 20, generator=g, dtype=torch.float64) / 30 ** 0.5
    X = torch.randn(30, k, generator=g, dtype=torch.float64)
    K = P.T @ P
    L = float(torch.linalg.eigvalsh(K)[-1])
    pairs = []
    for attempt in (None, compiled_ode.steady_attempt(backend)):
        f = VARSField(GramOperator(K / L), ((P.T @ X) / L,), (torch.full((1, k), 0.05 / L, dtype=torch.float64),))
        f.active = (torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:k].unsqueeze(0),)
        rk = native.AdaptiveRK(f, "dopri5", 1e-6, 1e-7, (k,), torch.float64, "cpu", {"beta": 0.04, "max_step": 1.0})
        rk.attempt = attempt
        # one column's tolerances tightened, as a stalled problem's are (ode.STALL_TIGHTEN)
        rk.tighten = torch.tensor([1.0, 10.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:k]
        assert compiled_ode.steady_eligible(rk)
        y = f.initial_state()
        live = torch.ones(k, dtype=torch.bool)
        with torch.no_grad():
            for duration in (4.0, 8.0, 16.0):
                y = rk.advance(y, duration, live, math.inf, 32.0)
        pairs.append((y, rk, f))
    return pairs


def test_a_steady_states_compiled_attempts_are_the_eager_ones():
    # aot_eager runs the traced operations as they are: the same states, clocks, step sizes and counters as the
    # eager attempts, to rounding; the counting backend shows that the attempts were compiled (a graph was made)
    backend = CountingBackend()
    (ye, rke, fe), (yc, rkc, fc) = _steady_pair(backend)
    assert backend.graphs >= 1
    for a, b in zip(ye, yc):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    for name in ("time", "dt", "previous"):
        torch.testing.assert_close(getattr(rkc, name), getattr(rke, name), rtol=1e-12, atol=0)
    assert torch.equal(rkc.evaluations, rke.evaluations) and rkc.attempts == rke.attempts > 20
    assert fc.nfe == fe.nfe
    assert float(rkc.dt.max()) == 1.0  # max_step binds (the stability limit is near 1.26), in the compiled attempts too
    # the frozen column did not move
    assert bool((yc[1][:, 2] == 0).all()) and bool((yc[1][:, 0] != 0).any())


@pytest.mark.long
def test_a_compiled_steady_state_reaches_the_lasso_solution():

    P, X = make_problem(3, 24, 16, batch=(5,))
    for method in ("dopri5", "bosh3"):
        sol = vo.solve(P, X, 0.1, method, tol=1e-7, options={"compile": True})
        assert bool(sol.stats.converged.all()), sol.stats.summary()
        assert (sol.code - sklearn_lasso(P, X, 0.1)).abs().max().item() < 1e-5
        eager = vo.solve(P, X, 0.1, method, tol=1e-7)
        assert abs(int(sol.stats.iterations.max()) - int(eager.stats.iterations.max())) <= 0.1 * int(
            eager.stats.iterations.max())
    # a dictionary per problem (K of shape (5, 16, 16)): the same capture through aot_eager (Inductor's code for it
    # took another 8.5 s here; its batched products are ATen's, as eagerly)
    Pp = P + 0.1 * torch.randn(5, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    per_problem = CountingBackend()
    sol = vo.solve(Pp, X, 0.1, "dopri5", tol=1e-7, options={"compile": per_problem})
    assert per_problem.graphs >= 1 and bool(sol.stats.converged.all()), sol.stats.summary()
    ref = torch.stack([sklearn_lasso(Pp[i], X[i], 0.1) for i in range(5)])
    assert (sol.code - ref).abs().max().item() < 1e-5
    # the option reaches the attempts (a graph was made), and aot_eager's attempts are the eager ones
    backend = CountingBackend()
    counted = vo.solve(P, X, 0.1, "dopri5", tol=1e-7, options={"compile": backend})
    assert backend.graphs >= 1
    torch.testing.assert_close(counted.code, vo.solve(P, X, 0.1, "dopri5", tol=1e-7).code, rtol=0, atol=1e-10)
    # grad="implicit" through the compiled steady state: the equilibrium's gradient
    Pg = P.clone().requires_grad_(True)
    g1 = torch.autograd.grad(vo.solve(Pg, X, 0.1, "dopri5", tol=1e-7, grad="implicit",
                                      options={"compile": True}).code.sum(), Pg)[0]
    g2 = torch.autograd.grad(vo.solve(Pg, X, 0.1, "dopri5", tol=1e-7, grad="implicit").code.sum(), Pg)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="rk4", tol=1e-6), r"here method 'rk4', t_end None"),
    (dict(solver="dopri5", t_end=2.0), r"here method 'dopri5', t_end 2.0"),
    (dict(solver="dopri5", tol=1e-6, integrator="torchdiffeq"), r"integrator 'torchdiffeq'"),
    (dict(solver="dopri5", tol=1e-6, grad="unroll", requires_grad=True), r"here a gradient goes through the steps"),
    (dict(solver="bosh3", tol=1e-6, backend="no-such-backend"), r"options\['compile'\] must be True, False"),
])
def test_a_steady_states_compile_option_is_refused_where_it_does_not_apply(kwargs, match):
    # (a VARSLayer's equilibrium: test_a_layers_equilibrium_refuses_the_steady_compile_option)
    kwargs = dict(kwargs)
    P = torch.randn(12, 8, dtype=torch.float64).requires_grad_(kwargs.pop("requires_grad", False))
    x = torch.randn(3, 12, dtype=torch.float64)
    backend = kwargs.pop("backend", True)
    with pytest.raises(ValueError, match=match):
        vo.solve(P, x, lam=0.1, options={"compile": backend}, **kwargs)


@pytest.mark.parametrize("kw,match", [
    (dict(dictionary="d"), r"this problem's layout \(DynamicAtoms, a VARSLayer's equilibrium\) has none"),
    (dict(dictionary="sd"), r"with a Gram matrix \(one block\), integrated natively; here the operator has none"),
])
def test_a_layers_equilibrium_refuses_the_steady_compile_option(kw, match):
    layer = vo.VARSLayer(16, 2, solver="dopri5", steps=None, tol=1e-4, grad="implicit",
                         solver_options={"options": {"compile": True}}, **kw)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(1, 17, 16))
