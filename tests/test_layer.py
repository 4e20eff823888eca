"""VARSLayer: shapes and gradients for every dictionary x solver, the self-attention special case,
the official numerics and parameter names, timm integration, symmetry properties and argument checks.

References are computed independently in the tests (float64 brute force), never hard-coded."""
import math
import warnings

import pytest
import torch
from torch import nn

import vars_ode
from conftest import eager_and_compiled_twice
from vars_ode.layer import VARSLayer, attention_maps, replace_attention

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
DICTS = ["s", "d", "sd"]


def tokens(B=2, p=1, side=3, C=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, p + side * side, C, generator=g, dtype=torch.float64).to(dtype)


def identity_proj(layer):
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(layer.dim))
        layer.proj.bias.zero_()


def split_qv(layer, x):
    """q and v of the layer, (B, h, N, dh), from its qkv weights (independent of its forward)."""
    B, N, C = x.shape
    h, dh = layer.num_heads, layer.head_dim
    qv = x @ layer.qkv.weight.T
    if layer.qkv.bias is not None:
        qv = qv + layer.qkv.bias
    q = qv[..., :C].reshape(B, N, h, dh).transpose(1, 2)
    v = qv[..., C:].reshape(B, N, h, dh).transpose(1, 2)
    return q, v


def features(q, W):
    """Positive random features written out: exp(w^T q_hat - 1/2) / sqrt(m), columns normalised."""
    m = W.shape[-1]
    qh = q / q.norm(dim=-1, keepdim=True)
    phi = torch.exp(torch.einsum("bhnd,hdm->bhnm", qh, W) - 0.5) / math.sqrt(m)
    return phi / phi.norm(dim=-2, keepdim=True)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dictionary", DICTS)
@pytest.mark.parametrize("solver", ["ista", "fista", "dopri5", "rk4"])
def test_shapes_and_gradients(dictionary, solver):
    torch.manual_seed(0)
    layer = VARSLayer(8, 2, dictionary=dictionary, solver=solver, steps=2, kernel_size=3, atoms_per_channel=2)
    x = tokens().requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if dictionary != "d":
        assert layer.dictionary.static.kernel.grad.abs().sum() > 0 if dictionary == "sd" else \
            layer.dictionary.kernel.grad.abs().sum() > 0
    stats = layer.last_stats
    assert stats.solver == solver and int(stats.iterations) > 0
    assert torch.isfinite(stats.residual).all() and 0 <= float(stats.sparsity) <= 1


@pytest.mark.parametrize("dictionary", DICTS)
def test_float64_and_bf16_autocast(dictionary):
    torch.manual_seed(1)
    layer = VARSLayer(8, 2, dictionary=dictionary, kernel_size=3, atoms_per_channel=2)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    y32 = layer(x)
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max() + 0.05  # bf16 only rounds the projections
    y64 = layer.double()(x.double())
    assert y64.dtype == D64 and torch.isfinite(y64).all()


@pytest.mark.parametrize("dictionary", ["s", "sd"])
def test_static_dictionary_at_a_second_resolution(dictionary):
    torch.manual_seed(2)
    layer = VARSLayer(8, 2, dictionary=dictionary, kernel_size=3, atoms_per_channel=2)
    for side in (3, 5):  # train-like and eval-like grids, one CLS token
        x = tokens(side=side)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    layer.num_prefix_tokens = 0
    y = layer(tokens(p=0, side=4))
    assert torch.isfinite(y).all()
    layer.grid_size = (2, 8)  # non-square grid, set explicitly
    assert torch.isfinite(layer(tokens(p=0, side=4))).all()
    with pytest.raises(ValueError, match="grid"):
        layer.grid_size = None
        layer(torch.randn(1, 15, 8))
    layer.grid_size = (2, 2)  # a fixed grid, fed another size (timm's dynamic_img_size): the error says why
    with pytest.raises(ValueError, match=r"do not match N = 9 tokens: the layer's static atoms are laid out"):
        layer(torch.randn(1, 9, 8))


@pytest.mark.parametrize("dictionary", ["s", "sd"])
def test_circular_shift_equivariance(dictionary):
    # with circular templates and no prefix token, the whole layer commutes with circular shifts of the grid
    torch.manual_seed(3)
    layer = VARSLayer(8, 2, dictionary=dictionary, padding="circular", kernel_size=3, atoms_per_channel=2,
                      num_prefix_tokens=0, lam=0.05, steps=4).double()
    x = tokens(p=0, side=5, dtype=D64)
    shift = lambda t: t.reshape(2, 5, 5, 8).roll((2, 1), (1, 2)).reshape(2, 25, 8)  # noqa: E731
    torch.testing.assert_close(layer(shift(x)), shift(layer(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dictionary", ["s", "sd"])
@pytest.mark.parametrize("solver", [dict(solver="ista", steps=3), dict(solver="dopri5", steps=2.0),
                                    dict(solver="fista", steps=None, tol=1e-6, grad="implicit")])
def test_template_matrices_give_the_convolutions_layer(monkeypatch, dictionary, solver):
    # the templates as matrix products (vars_ode.dictionaries.MATRIX_DEVICES, opt-in; here on the CPU) change neither
    # the layer's output nor any gradient: ISTA, an adaptive ODE and the implicit equilibrium
    from vars_ode import dictionaries

    torch.manual_seed(3)
    layer = VARSLayer(12, 2, dictionary=dictionary, image_size=4, kernel_size=3, **solver).double()
    x = torch.randn(2, 17, 12, dtype=torch.float64, requires_grad=True)

    def run():
        y = layer(x)
        return [y] + list(torch.autograd.grad((y * torch.cos(y)).sum(), [x, *layer.parameters()]))

    convolutions = run()
    monkeypatch.setattr(dictionaries, "MATRIX_DEVICES", {"cpu"})
    products = run()
    for a, b in zip(products, convolutions):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_dynamic_layer_is_permutation_equivariant():
    torch.manual_seed(4)
    layer = VARSLayer(8, 2, dictionary="d", solver="fista", steps=5).double()
    x = tokens(dtype=D64)
    perm = torch.randperm(x.shape[1])
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["euler", "ista"])
def test_self_attention_special_case(how):
    """Paper Sec. 3.4: one Euler step of Eq. 15 from Z = X, without sparsity, is Performer attention
    Phi Phi^T V + V (here with the normalisation 1/L of the rescaled dynamics)."""
    torch.manual_seed(5)
    kw = dict(solver="euler", steps=1, solver_options={"options": {"step_size": 1.0}}) if how == "euler" else \
        dict(solver="ista", steps=1)
    layer = VARSLayer(8, 2, dictionary="d", lam=0.0, lipschitz="eigvalsh", qkv_bias=True, **kw).double()
    identity_proj(layer)
    x = tokens(dtype=D64)
    q, v = split_qv(layer, x)
    phi = features(q, layer.dictionary.rand_matrix)
    K = phi.transpose(-1, -2) @ phi
    L = torch.linalg.eigvalsh(K)[..., -1][..., None, None]
    expected = (phi @ (phi.transpose(-1, -2) @ v)) / L + v
    expected = expected.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_more_steps_lower_residual_and_equilibrium():
    torch.manual_seed(6)
    x = tokens(dtype=D64)
    res = {}
    for steps in (2, 50):
        layer = VARSLayer(8, 2, dictionary="d", solver="fista", steps=steps).double()
        torch.manual_seed(6)
        layer.load_state_dict(VARSLayer(8, 2, dictionary="d").double().state_dict())
        layer(x)
        res[steps] = layer.last_stats.residual.mean()
    assert res[50] < res[2]
    layer.set_solver("fista", steps=None, tol=1e-7)
    layer.max_iter = 200_000
    layer(x)
    assert layer.last_stats.residual.max() <= 1e-7


def test_implicit_gradient_matches_converged_unroll():
    torch.manual_seed(7)
    layer = VARSLayer(4, 1, dictionary="d", solver="fista", steps=None, tol=1e-11, max_iter=500_000,
                      grad="implicit", lam=0.05).double()
    x = torch.randn(1, 5, 4, dtype=D64, requires_grad=True)
    w = torch.randn(1, 5, 4, dtype=D64)
    (layer(x) * w).sum().backward()
    g_imp = x.grad.clone()
    x.grad = None
    layer.set_solver(grad="unroll", steps=None, tol=1e-11)
    (layer(x) * w).sum().backward()
    torch.testing.assert_close(g_imp, x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dictionary,static", [("s", "conv"), ("sd", "conv"), ("sd", "dense"), ("d", "conv")])
def test_equilibrium_layer_implicit_gradient_by_finite_differences(dictionary, static):
    # steps=None with grad="implicit" on every dictionary: conjugate gradients with the operator (no Gram
    # matrix for the convolutional templates); the solution map's derivative, checked by central differences
    # along a random direction of the input and of the output (gradcheck's fast mode: each finite difference is
    # a solve to 1e-13, about 900 FISTA iterations for VARS-SD)
    torch.manual_seed(11)
    layer = VARSLayer(4, 2, dictionary=dictionary, static=static, solver="fista", steps=None, tol=1e-13,
                      max_iter=200_000, grad="implicit", lam=0.05, kernel_size=3, atoms_per_channel=2,
                      image_size=2, num_static_atoms=2).double()
    x = torch.randn(1, 5, 4, dtype=D64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    assert layer.last_stats.residual.max() <= 1e-13


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("dictionary", ["d", "sd"])
def test_equilibrium_layer_memory_does_not_grow_with_iterations(dictionary):
    torch.manual_seed(12)
    layer = VARSLayer(8, 2, dictionary=dictionary, solver="fista", steps=None, grad="implicit", lam=0.1,
                      kernel_size=3, atoms_per_channel=2, max_iter=100_000).double()
    x = torch.randn(2, 10, 8, dtype=D64, requires_grad=True)
    kept = {}
    for tol in (1e-2, 1e-9):
        layer.set_solver(tol=tol)
        kept[tol] = _saved_bytes(lambda: layer(x))
        kept[tol, "iters"] = int(layer.last_stats.iterations)
    assert kept[1e-9, "iters"] > 4 * kept[1e-2, "iters"]
    assert kept[1e-9] == kept[1e-2]
    layer.set_solver(grad="unroll")  # the same solve, unrolled, keeps every iteration
    assert _saved_bytes(lambda: layer(x)) > 4 * kept[1e-9]


@pytest.mark.parametrize("dictionary,static", [("d", "conv"), ("sd", "dense"), ("s", "conv"), ("sd", "conv")])
def test_equilibrium_recompute_gives_the_same_output_and_gradients(dictionary, static):
    # recompute=True at the equilibrium (grad="implicit"): the dictionary is built again in the backward pass and the
    # implicit gradient attached to the code found in the forward pass; the same output and gradients as keeping
    # everything (float64, code dropout in training: the checkpoint replays the same mask), no second solve
    import dataclasses

    from vars_ode.solvers import _solve

    x = torch.randn(2, 10, 8, dtype=D64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    got = {}
    for recompute in (False, True):
        torch.manual_seed(13)
        layer = VARSLayer(8, 2, dictionary=dictionary, static=static, solver="fista", steps=None, tol=1e-6,
                          grad="implicit", attn_drop=0.2, kernel_size=3, atoms_per_channel=2, image_size=3,
                          num_static_atoms=2, recompute=recompute).double().train()
        solves = []
        spec = _solve.SOLVERS["fista"]
        counting = dataclasses.replace(spec, fn=lambda *a, **k: solves.append(1) or spec.fn(*a, **k))
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(_solve.SOLVERS, "fista", counting)
            torch.manual_seed(5)
            y = layer(x)
            grads = torch.autograd.grad((y * y.detach().sin()).sum(), [x, *layer.parameters()], allow_unused=True)
        assert len(solves) == 1
        got[recompute] = (y.detach(), [g for g in grads if g is not None], float(layer.last_stats.residual.max()))
    (y0, g0, r0), (y1, g1, r1) = got[False], got[True]
    assert r1 == r0 <= 1e-6
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-14)
    assert len(g1) == len(g0) >= 3
    for a, b in zip(g1, g0):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("recompute", [False, True])
def test_an_equilibrium_short_of_tol_warns_in_training_not_in_evaluation(recompute):
    # the implicit gradient's warning (problems above tol) is about the gradient: in training it stays, with the
    # dictionary recomputed in the backward pass too (whose solve runs without a graph); under no_grad it is silent
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(13)
    layer = VARSLayer(8, 2, dictionary="d", solver="fista", steps=None, tol=1e-6, max_iter=2, grad="implicit",
                      recompute=recompute)
    with pytest.warns(RuntimeWarning, match="problems stopped above tol"):
        layer(x).sum().backward()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert float(layer.last_stats.residual.max()) > 1e-6  # (short of tol: the statistics say so)


def test_record_mode_matches_and_maps_are_reconstructions():
    torch.manual_seed(8)
    for dictionary in DICTS:
        layer = VARSLayer(8, 2, dictionary=dictionary, residual="none", kernel_size=3, atoms_per_channel=2).double()
        identity_proj(layer)
        x = tokens(dtype=D64)
        y = layer(x)
        maps = attention_maps(nn.Sequential(layer), x)["0"]
        assert maps.shape == (2, 3, x.shape[1])
        assert not layer.record_maps  # restored
        torch.testing.assert_close(maps[:, -1], y.abs().mean(-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer(x), y)
    # an ODE solver records one map per unit of time
    layer = VARSLayer(8, 2, dictionary="d", solver="rk4", steps=3).double()
    assert attention_maps(nn.Sequential(layer), tokens(dtype=D64))["0"].shape == (2, 3, 10)


def test_solver_swap_after_training():
    torch.manual_seed(9)
    x, target = tokens(B=4, C=8), tokens(B=4, C=8, seed=1)
    for train, evaluate in (("ista", "dopri5"), ("dopri5", "ista")):
        layer = VARSLayer(8, 2, dictionary="sd", solver=train, steps=3, kernel_size=3, atoms_per_channel=2)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        for _ in range(4):
            opt.zero_grad()
            loss = (layer(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            before = layer(x)
            after = layer.set_solver(evaluate, steps=3)(x)
        assert torch.isfinite(after).all()
        rel = float((after - before).norm() / before.norm())
        print(f"trained with {train}, evaluated with {evaluate}: relative output change {rel:.3f}")
        assert rel < 1.0


@pytest.mark.parametrize("dictionary", DICTS)
def test_timm_create_model(dictionary):
    import timm
    torch.manual_seed(10)
    attn = VARSLayer.configure(dictionary=dictionary, solver="dopri5" if dictionary == "d" else "ista",
                               kernel_size=3)
    model = timm.create_model("deit_tiny_patch16_224", attn_layer=attn, pretrained=False, img_size=48, depth=1,
                              num_classes=5)
    assert isinstance(model.blocks[0].attn, VARSLayer) and model.blocks[0].attn.dictionary_kind == dictionary
    logits = model(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize("solver", sorted(__import__("vars_ode").SOLVERS))
def test_timm_create_model_with_every_solver(solver):
    import timm
    torch.manual_seed(12)
    for dictionary in DICTS:
        if __import__("vars_ode").SOLVERS[solver].needs_gram and dictionary != "d":
            with pytest.raises(ValueError, match=solver):
                VARSLayer(16, 2, dictionary=dictionary, solver=solver, steps=2)(torch.randn(1, 5, 16))
            continue
        kw, inference = dict(steps=2), False
        spec = __import__("vars_ode").SOLVERS[solver]
        if not spec.unrolls:  # a compiled loop, or scipy's integrator: no graph through the iterations
            with pytest.raises(ValueError, match="grad='implicit'"):
                VARSLayer(16, 2, dictionary=dictionary, solver=solver, steps=2)
            # cd: the equilibrium's gradient. scipy_solver: a horizon without a gradient (its equilibrium to 1e-4 is
            # out of reach here: at random initialisation 202 of VARS-D's 384 problems are still above it after
            # 10,000 evaluations, 153 with dopri5, whose horizon this test runs)
            kw = dict(steps=2, grad="implicit") if spec.ode else dict(steps=None, tol=1e-4, grad="implicit")
            inference = spec.ode
        attn = VARSLayer.configure(dictionary=dictionary, solver=solver, kernel_size=3, **kw)
        model = timm.create_model("deit_tiny_patch16_224", attn_layer=attn, pretrained=False, img_size=32,
                                  depth=1, num_classes=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no solver warns on a plain call (scipy's min_step did)
            # nor says that a problem stopped short of tol when only float32's rounding put it there (cd stops at
            # tol in float64: one of 384 codes read 1.00017e-4 at tol 1e-4 once cast)
            warnings.simplefilter("error", RuntimeWarning)
            with torch.set_grad_enabled(not inference):
                logits = model(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 3) and torch.isfinite(logits).all(), (solver, dictionary)


def test_configure_and_replace_attention():
    import timm
    with pytest.raises(ValueError, match="bogus"):
        VARSLayer.configure(bogus=1)
    sub = VARSLayer.configure(dictionary="d").configure(steps=2)
    layer = sub(8, num_heads=2)
    assert issubclass(sub, VARSLayer) and layer.steps == 2 and layer.dictionary_kind == "d"
    assert sub(8, num_heads=2, steps=4).steps == 4  # explicit arguments win
    torch.manual_seed(11)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3,
                              qkv_bias=True)
    old = model.blocks[1].attn
    C = old.qkv.in_features
    replace_attention(model, dictionary="sd", kernel_size=3)
    new = model.blocks[1].attn
    assert isinstance(new, VARSLayer) and new.num_prefix_tokens == 1 and new.num_heads == old.num_heads
    torch.testing.assert_close(new.qkv.weight, torch.cat([old.qkv.weight[:C], old.qkv.weight[2 * C:]]))
    torch.testing.assert_close(new.qkv.bias, torch.cat([old.qkv.bias[:C], old.qkv.bias[2 * C:]]))
    torch.testing.assert_close(new.proj.weight, old.proj.weight)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()
    # nothing left to replace: refused, not a silent no-op (a second call, or a model whose attention is its own)
    with pytest.raises(ValueError, match="VARSLayer already"):
        replace_attention(model, dictionary="d")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                             embed_dim=8, depths=(1,), num_heads=(1,), num_classes=3)
    with pytest.raises(ValueError, match=r"attention modules found: \['WindowAttention'\]"):
        replace_attention(swin, dictionary="d")


# ---------------------------------------------------------------------------------------------
def official_state_dict(C, h, m, kind, image_size, qkv_bias, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    mm = 2 * m if kind == "sd" else m
    sd = {"qkv.weight": r(2 * C, C) / C ** 0.5, "proj.weight": r(C, C) / C ** 0.5, "proj.bias": r(C) * 0.1,
          "rand_matrix": r(h, C // h, m), "L": torch.full((h,), 25.0, dtype=D64),
          "learned_k": torch.eye(mm, dtype=D64) + 0.05 * r(mm, mm), "learned_lam": 1 + 0.1 * r(1),
          "learned_L": 1 + 0.1 * r(1).abs()}
    if qkv_bias:
        sd["qkv.bias"] = r(2 * C) * 0.1
    if kind == "sd":
        sd["kernel"] = r(1, h, image_size ** 2, m)
    return sd


def official_reference(sd, x, h, lam, steps, kind):
    """The official VARS_D / VARS_SD forward, written out from its description (FACTS.md, section 2)."""
    B, N, C = x.shape
    dh = C // h
    qv = x @ sd["qkv.weight"].T + (sd["qkv.bias"] if "qkv.bias" in sd else 0)
    qv = qv.reshape(B, N, 2, h, dh).permute(2, 0, 3, 1, 4)
    q, v = qv[0], qv[1]
    m = sd["rand_matrix"].shape[-1]
    qh = q / q.norm(dim=-1, keepdim=True)
    phi = torch.exp(torch.einsum("bhnd,hdm->bhnm", qh, sd["rand_matrix"]) - 0.5) / m ** 0.5
    if kind == "sd":
        phi = torch.cat([phi, sd["kernel"].expand(B, -1, -1, -1)], -1)
    phi = phi / phi.norm(dim=-2, keepdim=True)
    K = phi.transpose(-1, -2) @ phi
    b = phi.transpose(-1, -2) @ v
    L = (K.abs().sum(-1).max(-1).values + 1)[..., None, None] / sd["learned_L"]
    lam = sd["learned_lam"] * lam
    Kw = sd["learned_k"] @ K @ sd["learned_k"]
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    g = lambda t, thr: torch.sign(t) * gelu(t.abs() - thr)  # noqa: E731
    u = g(b, lam)
    for _ in range(steps):
        u = g(u - (Kw @ u - b) / L, lam / L)
    out = (phi @ u).transpose(1, 2).reshape(B, N, C)
    return out @ sd["proj.weight"].T + sd["proj.bias"]


@pytest.mark.parametrize("kind", ["d", "sd"])
def test_official_state_dict_and_numerics(kind):
    C, h, side = 8, 2, 3
    layer = VARSLayer(C, h, dictionary=kind, compat="official", qkv_bias=True, image_size=side).double()
    assert layer.steps == 5 and layer.residual == "none"
    sd = official_state_dict(C, h, 2 * C // h, kind, side, True, seed=12)
    layer.load_state_dict(sd, strict=True)
    assert not layer.rand_matrix.requires_grad and layer.learned_k.requires_grad
    x = tokens(p=0, side=side, C=C, dtype=D64)
    torch.testing.assert_close(layer(x), official_reference(sd, x, h, 0.3, 5, kind), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(layer.last_stats.residual).all()
    bad = dict(sd, learned_k=torch.eye(3, dtype=D64))
    with pytest.raises(RuntimeError, match="learned_k"):
        layer.load_state_dict(bad, strict=True)
    missing = {k: t for k, t in sd.items() if k != "rand_matrix"}
    with pytest.raises(RuntimeError, match="rand_matrix"):
        layer.load_state_dict(missing, strict=True)
    maps = attention_maps(nn.Sequential(layer), x)["0"]
    assert maps.shape == (2, 5, x.shape[1])
    torch.testing.assert_close(maps[:, -1], ((layer(x) - sd["proj.bias"]) @ torch.linalg.inv(sd["proj.weight"]).T)
                               .reshape(2, x.shape[1], h, C // h).abs().mean((2, 3)))
    if kind == "sd":
        with pytest.raises(ValueError, match="image_size"):
            layer(tokens(p=0, side=4, C=C, dtype=D64))


def test_compat_official_builds_the_official_class_by_every_route(tmp_path):
    from vars_ode import OfficialVARSAttention

    C, h, side = 8, 2, 3
    sd = official_state_dict(C, h, 2 * C // h, "sd", side, False, seed=5)
    x = tokens(p=0, side=side, C=C, dtype=D64)
    ref = official_reference(sd, x, h, 0.3, 5, "sd")
    configured = VARSLayer.configure(dictionary="sd", compat="official", image_size=side)
    built = [VARSLayer(C, h, dictionary="sd", compat="official", image_size=side),
             OfficialVARSAttention(C, h, dictionary="sd", image_size=side), configured(C, num_heads=h)]
    for layer in built:
        assert type(layer) is OfficialVARSAttention and isinstance(layer, VARSLayer)
        layer.double().load_state_dict(sd, strict=True)
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)
    # a whole layer saved and loaded (pickle) is the same class with the same output
    torch.save(built[2], tmp_path / "layer.pt")
    again = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert type(again) is OfficialVARSAttention
    torch.testing.assert_close(again(x), ref, rtol=1e-10, atol=1e-12)
    # the paper layer is untouched by the dispatch, also configured
    assert type(VARSLayer(C, h, dictionary="d")) is VARSLayer
    assert type(VARSLayer.configure(dictionary="d")(C, num_heads=h)).__mro__[1] is VARSLayer
    with pytest.raises(ValueError, match="compat='paper'"):
        OfficialVARSAttention(C, h, compat="paper")
    with pytest.raises(ValueError, match="static='dense'"):
        VARSLayer(C, h, compat="official", static="dense")


def test_redraw_features_changes_the_dictionary():
    torch.manual_seed(13)
    for compat in ("paper", "official"):
        layer = VARSLayer(8, 2, dictionary="d", compat=compat)
        x = tokens()
        y0 = layer(x)
        layer.redraw_features(torch.Generator().manual_seed(3))
        assert not torch.allclose(layer(x), y0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dictionary="xyz"), "dictionary"),
    (dict(solver="newton"), "solver"),
    (dict(lam=-0.1), "lam"),
    (dict(num_heads=3), "num_heads"),
    (dict(grad="magic"), "grad"),
    (dict(grad="adjoint", solver="ista"), "adjoint"),
    (dict(solver="active_set", dictionary="sd"), "active_set"),
    (dict(compat="official", dictionary="s"), "compat"),
    (dict(compat="official", solver="fista"), "solver"),
    (dict(steps=0), "steps"),
    (dict(attn_head_dim=3), "attn_head_dim"),
    (dict(residual="both"), "residual"),
    (dict(num_prefix_tokens=-1), "num_prefix_tokens"),
    (dict(padding="reflect", dictionary="s"), "padding"),
    (dict(compat="modern"), "compat"),
    (dict(rope=True), "rope"),
    (dict(dictionary="d", grad="implicit", steps=None, tol=-1.0), "tol"),
    (dict(solver="dopri5", solver_options={"rtol": -1.0}), "rtol must be a finite non-negative number"),
    (dict(solver="dopri5", solver_options={"rtol": 0.0}), "rtol and atol are both 0"),
    (dict(solver="dopri5", solver_options=[("rtol", 1e-3)]), "solver_options must be a dict"),
    (dict(solver="implicit_adams", steps=None, grad="adjoint"), "grad='adjoint' to a tolerance"),
    (dict(solver="rk4", steps=None, grad="adjoint", solver_options={"integrator": "torchdiffeq"}), "continuous adjoint"),
    (dict(solver="rk4", grad="adjoint", solver_options={"integrator": "newton"}), "integrator"),
])
def test_bad_arguments(kwargs, match):
    kw = dict(num_heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VARSLayer(8, **kw)


def test_bad_forward_arguments():
    layer = VARSLayer(8, 2, dictionary="d")
    x = tokens()
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.zeros(10, 10))
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, is_causal=True)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match="solver"):
        layer.set_solver("newton")
    # set_solver checks what the layer will run: the options it keeps for the same solver included
    layer.set_solver("rk4", steps=3.0, grad="adjoint", solver_options={"integrator": "torchdiffeq"})
    with pytest.raises(ValueError, match="continuous adjoint"):
        layer.set_solver(steps=None)
    assert layer.steps == 3.0 and layer.solver_options == {"integrator": "torchdiffeq"}
    layer.set_solver("dopri5", steps=None)  # the native discrete adjoint to a tolerance is the unrolled gradient
    assert layer.tol == 1e-4  # the equilibrium's default tolerance, not the horizon's 0 (a solve to max_iter)
    layer.set_solver("ista", steps=3, grad="unroll")
    assert layer.tol == 0.0
    layer.set_solver("fista", steps="equilibrium", tol=1e-2)
    layer.set_solver(solver="admm")
    assert layer.tol == 1e-2  # kept within the equilibrium
    layer.set_solver("ista", steps=3)
    assert (layer.steps, layer.tol) == (3, 0.0)  # and not carried to a horizon
    layer.set_solver("fista", steps=None, grad="implicit")
    layer.set_solver(solver="admm")
    assert layer.grad == "implicit"  # the equilibrium's gradient kept within the equilibrium
    layer.set_solver("ista", steps=3)
    assert layer.grad == "unroll"  # and not carried to a horizon (its gradient would be an unreached equilibrium's)
    layer.set_solver("fista", steps=None, grad="implicit").set_solver("ista", steps=3, grad="implicit")
    assert layer.grad == "implicit"  # unless asked for
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's mixed dtypes stay allowed
        assert layer(x.bfloat16()).shape == x.shape


def test_public_exports():
    for name in ("VARSLayer", "replace_attention", "attention_maps", "StaticDictionary", "DynamicDictionary",
                 "UnionDictionary", "DenseStaticDictionary", "gram_sparse_code"):
        assert hasattr(vars_ode, name), name


@pytest.mark.parametrize("dictionary", ["d", "sd"])
def test_adjoint_gradient_matches_unrolled_ode(dictionary):
    torch.manual_seed(14)
    # the field has kinks (the soft threshold): the adjoint converges to the unrolled gradient with the tolerance
    opts = {"rtol": 1e-7, "atol": 1e-9}
    layer = VARSLayer(4, 1, dictionary=dictionary, solver="dopri5", steps=2.0, grad="adjoint", kernel_size=3,
                      atoms_per_channel=1, solver_options=opts).double()
    x = tokens(B=1, side=2, C=4, dtype=D64).requires_grad_()
    (layer(x) ** 2).sum().backward()
    g_adj = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    layer.set_solver(grad="unroll")
    (layer(x) ** 2).sum().backward()
    g_unr = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(g_adj, g_unr):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=2e-3 * float(b.abs().max()))


@pytest.mark.parametrize("dictionary", DICTS)
def test_timm_style_options(dictionary):
    torch.manual_seed(15)
    layer = VARSLayer(8, 2, dictionary=dictionary, qk_norm=True, scale_norm=True, gated=True, dim_out=6,
                      attn_drop=0.5, proj_drop=0.1, qkv_bias=True, proj_bias=False, norm_layer=nn.LayerNorm,
                      kernel_size=3)
    layer.train()
    y = layer(tokens())
    assert y.shape == (2, 10, 6) and torch.isfinite(y).all() and layer.proj.bias is None
    y.sum().backward()
    assert layer.gate.weight.grad is not None and isinstance(layer.norm, nn.LayerNorm)
    assert isinstance(layer.q_norm, nn.LayerNorm) == (dictionary != "s")


@pytest.mark.parametrize("dictionary", ["d", "sd"])
def test_torch_compile_with_an_adaptive_ode_solver(dictionary):
    # an adaptive integration decides on the host (the native integrators read the device between bursts of steps,
    # torchdiffeq's loops at every step and its torch.unique, which Inductor cannot lower): traced, every read
    # would be a guard and a graph break. Under torch.compile it runs eagerly, as one graph break: the graphs around
    # it are captured once. The compiled layer gives the eager layer's output (to 5e-10 of its largest entry in
    # float64) and its gradients to the integration's tolerance: eagerly, the Gram-form integration is one node with
    # its own reverse pass; compiled, autograd differentiates the same integrator's steps (about 1e-6 of the largest
    # entry apart at rtol 1e-6; in float32, rounding flipped accepted steps and took that to 7e-4). aot_eager: the
    # same capture and graph breaks as Inductor without its code generation (Inductor's code for the layers is
    # checked by test_torch_compile_fullgraph_generic_path_with_statistics and tests/test_fused.py)
    torch.manual_seed(0)
    layer = VARSLayer(16, 2, dictionary=dictionary, solver="dopri5",
                      solver_options={"rtol": 1e-6, "atol": 1e-8}).double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)

    eager, compiled, again, graphs, stats = eager_and_compiled_twice(layer, x)
    # the graphs around the break, captured once, a second call reusing them (traced, the integration's steps made
    # 24 / 23 graphs of 3,964 / 13,142 operations, and took 30 / 77 s here)
    assert stats["unique_graphs"] == graphs <= 16, stats
    assert stats["calls_captured"] <= 400, stats
    assert len(eager) == len(compiled) > 3
    for i, (a, b, c) in enumerate(zip(eager, compiled, again)):
        for got in (b, c):
            torch.testing.assert_close(got, a, rtol=0, atol=(1e-7 if i == 0 else 1e-4) * float(a.abs().max()))


@pytest.mark.parametrize("kwargs", [dict(dictionary="s"), dict(dictionary="sd"), dict(dictionary="sd", solver="fista"),
                                    dict(dictionary="d", fused=False), dict(dictionary="sd", solver="rk4", steps=1),
                                    dict(dictionary="d", solver="admm", steps=4)],
                         ids=["s", "sd", "sd-fista", "d-generic", "sd-rk4", "d-admm"])
def test_torch_compile_fullgraph_generic_path_with_statistics(kwargs):
    # the operator-form and generic Gram-form paths compile as one graph (their statistics kept the atoms
    # object, which torch.compile cannot carry out of a graph: "Reconstruction failure"); the compiled
    # layer's output, gradients and statistics are the eager layer's
    torch._dynamo.reset()
    torch.manual_seed(1)
    layer = VARSLayer(16, 2, **kwargs)
    x = torch.randn(2, 17, 16)

    def run(f):
        layer.zero_grad()
        y = f(x)
        y.sum().backward()
        st = layer.last_stats
        return [y.detach(), st.residual, st.nnz.float(), st.sparsity] + [p.grad.clone() for p in layer.parameters()
                                                                         if p.grad is not None]

    # aot_eager: the graph capture (where the statistics broke it) and AOT autograd, without the C++ compiler
    eager, compiled = run(layer), run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    assert len(eager) == len(compiled) > 5
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))


def test_layers_and_models_pickle_whole_and_load_in_a_fresh_process(tmp_path):
    # torch.save of a whole layer after a forward pass (its statistics hold closures over that pass) and of a
    # timm model built with a configured layer class (VARSLayer.configure: no importable name); a new
    # interpreter loads both and gives the same outputs
    import pickle
    import subprocess
    import sys

    import timm

    torch.manual_seed(0)
    layer = VARSLayer(16, 2, dictionary="sd", solver="rk4")
    x = torch.randn(2, 17, 16)
    y = layer(x)
    assert layer.last_stats is not None
    model = timm.create_model("vars_deit_tiny", attention="vars_d", img_size=32, patch_size=8, num_classes=3).eval()
    xi = torch.randn(1, 3, 32, 32)
    ym = model(xi)
    assert type(model.blocks[0].attn).__name__ == "VARSLayerConfigured"
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(xi), ym)
    torch.save({"layer": layer, "model": model, "x": x, "xi": xi, "y": y, "ym": ym}, tmp_path / "whole.pt")
    code = ("import sys, torch\nimport vars_ode\n"
            "d = torch.load(sys.argv[1], weights_only=False)\n"
            "assert torch.equal(d['layer'](d['x']), d['y'])\n"
            "assert torch.equal(d['model'](d['xi']), d['ym'])\nprint('same')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "whole.pt")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("kwargs, name", [(dict(static="dense", image_size=0), "image_size"),
                                          (dict(kernel_size=0), "kernel_size"),
                                          (dict(atoms_per_channel=True), "atoms_per_channel")])
def test_layer_sizes_are_checked_when_it_is_built(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer"):
        VARSLayer(16, 2, **kwargs)


@pytest.mark.parametrize("dictionary", ["d", "s", "sd"])
@pytest.mark.parametrize("kwargs", [{}, dict(solver="dopri5"), dict(steps=None, tol=1e-3, grad="implicit")])
def test_layer_refuses_no_tokens_and_passes_an_empty_batch(dictionary, kwargs):
    layer = VARSLayer(16, 2, dictionary=dictionary, **kwargs)
    with pytest.raises(ValueError, match="x has no tokens"):
        layer(torch.randn(2, 0, 16))
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 5, 16) and x.grad.shape == (0, 5, 16)


@pytest.mark.parametrize("dictionary, kw", [("d", {}), ("sd", dict(static="dense", image_size=4)),
                                            ("sd", dict(image_size=4)), ("s", dict(image_size=4))])
def test_a_swap_from_the_equilibrium_to_a_horizon_trains_as_a_layer_built_for_the_horizon(dictionary, kw):
    # set_solver("ista", steps=3) on a layer trained at its equilibrium (grad="implicit") kept the implicit gradient:
    # the same outputs as a layer built for 3 steps, and gradients 0.5-70 apart (a warning at every call)
    x = torch.randn(2, 17, 12, dtype=D64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    built = VARSLayer(12, 2, dictionary=dictionary, solver="ista", steps=3, kernel_size=3, atoms_per_channel=2,
                      dtype=D64, **kw)
    swapped = VARSLayer(12, 2, dictionary=dictionary, solver="fista", steps=None, tol=1e-6, grad="implicit",
                        kernel_size=3, atoms_per_channel=2, dtype=D64, **kw)
    swapped.load_state_dict(built.state_dict())
    swapped.set_solver("ista", steps=3)
    grads = []
    for layer in (built, swapped):
        leaf = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no implicit gradient of a horizon)
            y = layer(leaf)
            y.sin().sum().backward()
        grads.append([y.detach(), leaf.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["cd", "scipy_solver"])
def test_a_trained_layer_is_evaluated_with_a_solver_that_has_no_unrolled_gradient(solver):
    # set_solver("cd") on a layer trained with ISTA (grad="unroll") was refused ("use grad='implicit'") even for an
    # evaluation under no_grad: notebook 07's test-time swap needed a gradient mode for a pass that takes none
    x = torch.randn(2, 17, 12, dtype=D64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    layer = VARSLayer(12, 2, dictionary="d", solver="ista", steps=3, dtype=D64)
    reference = VARSLayer(12, 2, dictionary="d", solver="fista", steps=None, tol=1e-10, dtype=D64)
    reference.load_state_dict(layer.state_dict())
    layer.set_solver(solver, steps=None, tol=1e-7)  # (outputs within 1.2e-7 of the reference's)
    assert layer.grad == "implicit"  # the one gradient it has
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)
    leaf = x.clone().requires_grad_()
    layer(leaf).sin().sum().backward()  # and it trains, with the equilibrium's gradient
    reference.set_solver(grad="implicit")
    ref_leaf = x.clone().requires_grad_()
    reference(ref_leaf).sin().sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)
    # back to a horizon of a solver that unrolls: the horizon's own gradient, as from any equilibrium
    assert layer.set_solver("ista", steps=3).grad == "unroll"
    # from its horizon too, where the implicit gradient was the solver's, not asked for
    layer.set_solver(solver, steps=3 if solver == "cd" else 3.0)
    assert layer.grad == "implicit"
    assert layer.set_solver("fista", steps=3).grad == "unroll"
    layer.set_solver("fista", steps=3, grad="implicit")
    assert layer.set_solver(steps=5).grad == "implicit"  # (asked for: kept)
    with pytest.raises(ValueError, match="cannot be differentiated through its iterations"):
        layer.set_solver(solver, grad="unroll")  # asked for and impossible: refused, as by the constructor
    with pytest.raises(ValueError, match="cannot be differentiated through its iterations"):
        VARSLayer(12, 2, dictionary="d", solver=solver, steps=None)


def test_set_solver_keeps_options_for_the_same_solver_only():
    # solver_options belong to a solver: FISTA's restart survives a new tolerance, not a switch to dopri5
    # (which refused it by name: "unknown option(s) ['restart']")
    layer = VARSLayer(16, 2, dictionary="d", solver="fista", solver_options={"restart": False})
    x = torch.randn(1, 9, 16)
    layer.set_solver(steps=5)
    assert layer.solver_options == {"restart": False}
    layer.set_solver("dopri5", steps=2.0)
    assert layer.solver_options == {}
    y = layer(x)
    assert torch.isfinite(y).all() and layer.last_stats.unit == "function evaluations"
    layer.set_solver("rk4", solver_options={"options": {"step_size": 0.5}})
    assert layer(x).shape == x.shape and int(layer.last_stats.iterations) == 16


def test_equilibrium_survives_timm_create_model():
    # timm.create_model drops every keyword whose value is None, so steps=None reached the layers as their default
    # (3 steps, with an implicit gradient of an equilibrium never reached); steps="equilibrium" is None, and the
    # training script's --model-kwargs steps=None is passed on so
    import timm

    from vars_ode.robustness.cli import parse_kwargs
    from vars_ode.robustness.engine import create_model

    kw = dict(attention="vars_d", patch_size=4, embed_dim=16, depth=1, num_heads=2, in_chans=1, img_size=8,
              num_classes=3)
    dropped = timm.create_model("vars_deit_tiny", solver="admm", steps=None, **kw)
    assert [m.steps for m in dropped.modules() if isinstance(m, VARSLayer)] == [3]  # what timm does with None
    for model in (timm.create_model("vars_deit_tiny", solver="admm", steps="equilibrium", tol=1e-3, **kw),
                  create_model("vars_deit_tiny", **dict(kw, **parse_kwargs(["solver='admm'", "steps=None", "tol=1e-3"])))):
        layer, = [m for m in model.modules() if isinstance(m, VARSLayer)]
        assert layer.steps is None and layer.tol == 1e-3
        model(torch.randn(2, 1, 8, 8))
        assert float(layer.last_stats.residual.max()) <= 1e-3 and int(layer.last_stats.iterations) > 3
    assert VARSLayer(8, 2, dictionary="d").set_solver(steps="equilibrium").steps is None
    with pytest.raises(ValueError, match="steps"):
        VARSLayer(8, 2, dictionary="d", steps="forever")


@pytest.mark.parametrize("tokens, seed", [(1, 0), (3, 1), (8, 2)])
def test_active_set_layer_on_fewer_tokens_than_features_has_finite_gradients(tokens, seed):
    # VARS-D's atoms live in R^N: with N tokens below the 24 features of a head, a support of more than N atoms is a
    # singular block, whose factorisation fails; the polish keeps FISTA's code there, and the backward pass through
    # the failed factor gave NaN gradients for the input and the query weights (these seeds did)
    torch.manual_seed(seed)
    layer = VARSLayer(12, 1, dictionary="d", solver="active_set")
    x = torch.randn(1, tokens, 12, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
