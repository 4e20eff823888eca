"""ISTA with its residual on the signal (vars_ode.solvers.signal_ista) against the generic ISTA of the solver stack
(solve_problem: Eq. 12 on the code, with b = P^T x), in float64: reconstructions, codes and gradients with
respect to the signal and the dictionary's parameters; and the layer that chooses it against the same layer
on the generic path."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vars_ode import VARSLayer
from vars_ode.dictionaries import DynamicDictionary, StaticDictionary, UnionDictionary
from vars_ode.solvers import signal_ista, solve_problem

D64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def dictionary(kind, h, dh, padding, r, k):
    st_ = StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=k, padding=padding, dtype=D64)
    with torch.no_grad():
        st_.kernel.normal_()  # templates of different norms: L differs per channel
    if kind == "s":
        return st_, lambda q, grid, p: st_.bind(grid, p, dtype=D64)
    dyn = DynamicDictionary(h, dh, 6, dtype=D64)
    if kind == "d":
        return dyn, lambda q, grid, p: dyn.bind(q)
    un = UnionDictionary(dyn, st_)
    return un, lambda q, grid, p: un.bind(q, grid, p, dtype=D64)


def both(kind, seed, steps, w, padding, prefix, r, k, init="zeros"):
    """(reconstruction, code, gradients) by the signal-space ISTA and by the generic one."""
    torch.manual_seed(seed)
    h, dh, H, W = 2, 3, 4, 5
    module, bind = dictionary(kind, h, dh, padding, r, k)
    N = prefix + H * W
    x0, q0 = torch.randn(2, h, N, dh, dtype=D64), torch.randn(2, h, N, dh, dtype=D64)
    go = torch.randn(2, h, N, dh, dtype=D64)
    out = []
    for signal in (True, False):
        module.zero_grad()
        x, q = x0.clone().requires_grad_(), q0.clone().requires_grad_()
        atoms = bind(q, (H, W), prefix)
        if signal:
            recon, code = signal_ista.ista_in_signal_space(atoms, x, w, steps, init=init)
            code = code()
        else:
            b = atoms.encode(x)
            u, _ = solve_problem(atoms, b, w, "ista", tol=0.0, max_iter=steps, init=b if init == "encode" else None)
            recon, code = atoms.decode(u), tuple(c.detach() for c in u)
        (recon * go).sum().backward()
        grads = [x.grad, q.grad] + [p.grad for p in module.parameters() if p.grad is not None]
        out.append((recon.detach(), code, [g.clone() for g in grads if g is not None]))
    return out


@pytest.mark.parametrize("kind", ["s", "sd", "d"])
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4), w=st.sampled_from([0.0, 0.05, 0.4]),
       padding=st.sampled_from(["zeros", "circular"]), prefix=st.integers(0, 2), r=st.integers(1, 3),
       k=st.sampled_from([1, 3]), init=st.sampled_from(["zeros", "encode"]))
def test_signal_space_ista_is_the_generic_ista(kind, seed, steps, w, padding, prefix, r, k, init):
    (ra, ca, ga), (rb, cb, gb) = both(kind, seed, steps, w, padding, prefix, r, k, init)
    scale = float(rb.abs().max()) + 1e-300
    assert float((ra - rb).abs().max()) <= 1e-12 * scale
    assert len(ca) == len(cb) and all(a.shape == b.shape for a, b in zip(ca, cb))
    for a, b in zip(ca, cb):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12 * (float(b.abs().max()) + 1))
        assert torch.equal(a == 0, b == 0) or w == 0.0  # the same support (no entry on the threshold here)
    assert len(ga) == len(gb) >= 2
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * (float(b.abs().max()) + 1))


def test_covers_only_what_it_computes():
    atoms = StaticDictionary(6, 2, dtype=D64).bind((3, 3))
    assert signal_ista.covers(atoms, 0.1, 3, "zeros", "unroll", {}) and signal_ista.covers(atoms, 0.1, 3, "encode",
                                                                                            "unroll", {})
    for args in [(atoms, torch.tensor(0.1), 3, "zeros", "unroll", {}),  # a per-problem weight
                 (atoms, 0.1, 0, "zeros", "unroll", {}), (atoms, 0.1, None, "zeros", "unroll", {}),
                 (atoms, 0.1, 3.0, "zeros", "unroll", {}), (atoms, 0.1, True, "zeros", "unroll", {}),
                 (atoms, 0.1, 3, "random", "unroll", {}), (atoms, 0.1, 3, "zeros", "implicit", {}),
                 (atoms, 0.1, 3, "zeros", "unroll", {"check_every": 2}),
                 (DynamicDictionary(2, 3, 4, dtype=D64).bind(torch.randn(1, 2, 5, 3, dtype=D64)), 0.1, 3, "zeros",
                  "unroll", {})]:  # Gram form: the fused node's
        assert not signal_ista.covers(*args)


@pytest.mark.parametrize("kwargs", [dict(dictionary="s"), dict(dictionary="sd"), dict(dictionary="s", steps=1),
                                    dict(dictionary="sd", padding="circular", residual="value"),
                                    dict(dictionary="s", attn_drop=0.3), dict(dictionary="sd", init="encode"),
                                    dict(dictionary="s", init="encode", steps=1)])
def test_layer_on_the_signal_space_path_is_the_layer_on_the_generic_path(kwargs):
    # the same layer with a solver option the backend does not cover (check_every, which a fixed budget
    # ignores) takes solve_problem: outputs, every gradient and the statistics agree; with attention dropout
    # in training, the same mask (the same random draws)
    torch.manual_seed(3)
    kw = dict(dict(steps=3, image_size=4, lam=0.1), **kwargs)
    a = VARSLayer(24, 2, **kw).double()
    b = VARSLayer(24, 2, solver_options={"check_every": 1}, **kw).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 17, 24, dtype=D64)
    res = []
    for layer in (a, b):
        layer.train("attn_drop" in kwargs)
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=D64).view_as(y)).sum().backward()
        st_ = layer.last_stats
        res.append([y.detach(), xi.grad, st_.residual, st_.nnz, st_.sparsity, st_.iterations]
                   + [p.grad for p in layer.parameters() if p.grad is not None])
    assert len(res[0]) == len(res[1]) > 7
    for u, v in zip(*res):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
