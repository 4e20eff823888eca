"""The fused Gram-form path (vars_ode.fused): the same function and gradients as the generic path and
as a float64 brute force written out here, the power iteration by squaring, the activation memory it
keeps, and the dense static atoms (static="dense") it shares with VARS-SD."""
import importlib.util
import math
import pathlib
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import vars_ode.fused as fused_module
from vars_ode import VARSLayer
from vars_ode.fused import _power, fused_attention_core, gram_sparse_code
from vars_ode.ops import lipschitz_constant

D64 = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def pair(seed, **kw):
    torch.manual_seed(seed)
    fused = VARSLayer(24, 3, qkv_bias=True, **kw).to(D64)
    generic = VARSLayer(24, 3, qkv_bias=True, fused=False, **kw).to(D64)
    generic.load_state_dict(fused.state_dict())
    return fused, generic


def run(layer, x):
    y = layer(x)
    grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *layer.parameters()])
    return y, grads


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), solver=st.sampled_from(["ista", "fista"]), steps=st.integers(1, 4),
       init=st.sampled_from(["zeros", "encode"]), lipschitz=st.sampled_from(["power", "eigvalsh", "official"]),
       variant=st.sampled_from(["d", "sd-dense", "s-dense"]), prefix=st.integers(0, 1), side=st.sampled_from([3, 4]),
       lam=st.sampled_from([0.0, 0.05, 0.3]), qk_norm=st.booleans(), residual=st.sampled_from(["value", "none"]),
       recompute=st.booleans())
def test_fused_matches_generic_path(seed, solver, steps, init, lipschitz, variant, prefix, side, lam, qk_norm,
                                    residual, recompute):
    kind, _, static = variant.partition("-")
    kw = dict(dictionary=kind, solver=solver, steps=steps, init=init, lipschitz=lipschitz, image_size=3,
              num_prefix_tokens=prefix, lam=lam, qk_norm=qk_norm, residual=residual)
    if static:
        kw.update(static=static, num_static_atoms=5)
    fused, generic = pair(seed, **kw)
    fused.recompute = recompute
    assert fused._fusable() and not generic._fusable()
    x = torch.randn(2, prefix + side * side, 24, dtype=D64, requires_grad=True)
    y1, g1 = run(fused, x)
    y2, g2 = run(generic, x)
    assert rel(y1, y2) < 1e-10
    for a, b in zip(g1, g2):
        assert rel(a, b) < 1e-9
    assert torch.allclose(fused.last_stats.residual, generic.last_stats.residual, rtol=1e-8, atol=1e-12)
    assert int(fused.last_stats.iterations) == steps
    # the counts come from the scaled code on the fused path: the same zeros (an entry at the threshold
    # itself may round either way, hence one entry of slack per problem)
    assert (fused.last_stats.nnz - generic.last_stats.nnz).abs().max() <= 1


def test_fused_matches_float64_brute_force():
    """VARS-D written out with explicit matrices: features, K, exact L, ISTA, decode + v, projection."""
    torch.manual_seed(3)
    layer = VARSLayer(12, 2, dictionary="d", solver="ista", steps=4, lipschitz="eigvalsh", lam=0.05).to(D64)
    x = torch.randn(3, 10, 12, dtype=D64)
    y = layer(x)
    B, N, C = x.shape
    h, dh = 2, 6
    qv = x @ layer.qkv.weight.T
    q = qv[..., :C].reshape(B, N, h, dh).transpose(1, 2)
    v = qv[..., C:].reshape(B, N, h, dh).transpose(1, 2)
    W = layer.dictionary.rand_matrix.to(D64)
    qh = q / q.norm(dim=-1, keepdim=True)
    phi = torch.exp(torch.einsum("bhnd,hdm->bhnm", qh, W) - 0.5) / math.sqrt(W.shape[-1])
    phi = phi / phi.norm(dim=-2, keepdim=True)
    out = torch.empty_like(v)
    for b in range(B):
        for i in range(h):
            P = phi[b, i]
            K = P.T @ P
            L = torch.linalg.eigvalsh(K)[-1]
            u = torch.zeros(P.shape[1], dh, dtype=D64)
            for _ in range(4):
                z = u - (K @ u - P.T @ v[b, i]) / L
                u = torch.sign(z) * torch.clamp(z.abs() - 0.05 / L, min=0)
            out[b, i] = P @ u + v[b, i]
    ref = out.transpose(1, 2).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias
    assert rel(y, ref) < 1e-11


@given(seed=st.integers(0, 10_000), iters=st.integers(1, 20))
def test_power_by_squaring_is_the_same_iterate(seed, iters):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(2, 3, 30, 9, generator=g, dtype=D64)
    G = A.transpose(-1, -2) @ A
    s = torch.rand(2, 3, 9, 1, generator=g, dtype=D64) + 0.5
    K = G * (s * s.transpose(-1, -2))
    ref = lipschitz_constant(K, "power", iters=iters)
    a = _power(G, s, iters, squaring=False).reshape(ref.shape)
    b = _power(G, s, iters, squaring=True).reshape(ref.shape)
    assert torch.allclose(a, ref, rtol=1e-12) and torch.allclose(b, ref, rtol=1e-10)
    for per in (1, 4):  # groups of one and of four problems (6 = 4 + 2) give the same numbers
        with mock.patch.object(fused_module, "POWER_GROUP_BYTES", per * 9 * 9 * 8):
            assert torch.equal(_power(G, s, iters, squaring=False), a.reshape(2, 3, 1, 1))


@given(seed=st.integers(0, 10_000), m=st.integers(2, 48), iters=st.integers(0, 40),
       small=st.integers(0, 20), zero=st.booleans())
@example(seed=0, m=2, iters=21, small=20, zero=True)  # every atom clamped or empty: 0.2% off before (1e25 at 25)
@example(seed=0, m=2, iters=40, small=20, zero=True)  # the iterate vanished before the last step: 0 before
def test_power_in_float32_with_tiny_and_empty_atoms(seed, m, iters, small, zero):
    """The row power iteration normalises only every few steps: in float32, with an atom 10^-small the
    size of the others (d down to 1e-40, clamped as in the forward pass) and an all-zero atom, it stays
    finite and agrees with lipschitz_constant run in float64 on the same K; also where every atom is clamped
    or empty (m = 2 with a zero atom), so that K's top eigenvalue is below one."""
    g = torch.Generator().manual_seed(seed)
    Fm = torch.rand(3, 40, m, generator=g, dtype=D64)
    Fm[:, :, 0] *= 10.0 ** -small
    if zero:
        Fm[:, :, -1] = 0
    G = (Fm.transpose(-1, -2) @ Fm).float()
    d = torch.diagonal(G, dim1=-2, dim2=-1)
    s = d.clamp_min(torch.finfo(torch.float32).tiny).rsqrt().unsqueeze(-1)
    K = G.double() * (s.double() * s.double().transpose(-1, -2))
    ref = lipschitz_constant(K, "power", iters=iters)
    got = _power(G.unsqueeze(0), s.unsqueeze(0), iters, squaring=False).reshape(ref.shape)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), ref, rtol=1e-4)


def test_gradients_with_static_atoms_against_autograd():
    """Hand-written backward vs autograd through the same computation written with plain tensor ops
    (L detached in both, as in the layer)."""
    from vars_ode.lasso import GramOperator
    from vars_ode.solvers.iterative import fista

    g = torch.Generator().manual_seed(0)
    B, h, N, dh, m, ms = 2, 2, 7, 3, 4, 3
    q = torch.randn(B, h, N, dh, generator=g, dtype=D64, requires_grad=True)
    v = torch.randn(B, h, N, dh, generator=g, dtype=D64, requires_grad=True)
    S = torch.randn(h, N, ms, generator=g, dtype=D64, requires_grad=True)
    W = torch.randn(h, dh, m, generator=g, dtype=D64)
    w = torch.randn(B, h, N, dh, generator=g, dtype=D64)
    for solver in ("ista", "fista"):
        out = gram_sparse_code(q, v, W, 0.05, static=S, steps=3, solver=solver, init="encode")[0]
        got = torch.autograd.grad((out * w).sum(), (q, v, S))
        phi = torch.exp((q / q.norm(dim=-1, keepdim=True)) @ W)
        P = torch.cat([phi, S.expand(B, h, N, ms)], -1)
        P = P / P.norm(dim=-2, keepdim=True)
        K, b = P.transpose(-1, -2) @ P, P.transpose(-1, -2) @ v
        L = lipschitz_constant(K.detach(), "power", iters=10)[..., None, None]
        if solver == "ista":
            u = b
            for _ in range(3):
                z = u - (K @ u - b) / L
                u = torch.sign(z) * torch.relu(z.abs() - 0.05 / L)
        else:
            u = fista(GramOperator(K), (b,), 0.05, L.squeeze(-1), (b,), tol=0, max_iter=3)[0][0]
        ref = torch.autograd.grad(((P @ u) * w).sum(), (q, v, S))
        for a, r in zip(got, ref):
            assert rel(a, r) < 1e-10


def saved_bytes(fn, *args):
    """Bytes autograd keeps for the backward pass of ``fn(*args)`` (benchmarks/memory_cpu.py's counter)."""
    spec = importlib.util.spec_from_file_location("memory_cpu", ROOT / "benchmarks" / "memory_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.saved_bytes(lambda: fn(*args))


def test_activation_memory():
    """Without kept features the fused node keeps its input and m x m / m x dh tensors, nothing N x m;
    keeping them adds one N x m tensor (and a contiguous copy of v, the iterates, the step matrix in place of
    G); the generic path keeps several."""
    torch.manual_seed(0)
    B, N, C, h = 4, 197, 48, 2
    dh, m = C // h, C  # m = 2 dh
    qv = torch.randn(B, N, 2, h, dh, requires_grad=True)
    W = torch.randn(h, dh, m)
    nm = B * h * N * m * 4  # one (B, h, N, m) float32 tensor
    small = B * h * (m * m + m * dh) * 4 * 1.2  # G, F^T v and per-atom vectors
    lean = saved_bytes(lambda t: fused_attention_core(t, W, 0.1, steps=3, recompute=True)[0], qv)
    kept = saved_bytes(lambda t: fused_attention_core(t, W, 0.1, steps=3, recompute=False)[0], qv)
    assert lean < qv.numel() * 4 + small, (lean, qv.numel() * 4, small)
    v_bytes = qv.numel() * 4 // 2
    iterates = B * h * m * (m + 6 * dh) * 4  # A; code, 2 points, 3 pre-shrinkage values
    gram = B * h * m * m * 4  # G: kept only to rebuild A when recomputing
    assert abs(kept - lean - nm - v_bytes - iterates + gram) < 0.05 * nm, (kept, lean, nm, iterates)
    x = torch.randn(B, N, C, requires_grad=True)
    generic = VARSLayer(C, h, dictionary="d", steps=3, fused=False)
    fused = VARSLayer(C, h, dictionary="d", steps=3, recompute=True)  # the default on CUDA devices
    assert saved_bytes(generic, x) > saved_bytes(fused, x) + 2 * nm


def test_bf16_autocast_keeps_q_and_v_in_bf16():
    torch.manual_seed(0)
    layer = VARSLayer(48, 2, dictionary="d", steps=3)
    x = torch.randn(2, 65, 48)
    dtypes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    y32 = layer(x)
    assert rel(y.float(), y32) < 5e-2
    assert torch.float64 not in dtypes and dtypes.count(torch.bfloat16) >= 2


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kw", [dict(dictionary="d"), dict(dictionary="sd", static="dense", image_size=8),
                                dict(dictionary="d", solver="fista", init="encode")])
def test_backward_inside_autocast_matches_backward_outside(kw, recompute):
    # torch.autograd.grad called inside an autocast region (CUDA graph capture of a training step does
    # this, and so do gradient penalties) must neither fail on the node's float32 buffers nor recast
    # its products: the gradients are the ones taken outside the region
    torch.manual_seed(1)
    layer = VARSLayer(48, 2, steps=3, recompute=recompute, **kw)
    x = torch.randn(2, 65, 48, requires_grad=True)
    grads = []
    for inside in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            loss = (y.float() * torch.cos(y.float())).sum()
            if inside:
                grads.append(torch.autograd.grad(loss, [x, *layer.parameters()]))
        if not inside:
            grads.append(torch.autograd.grad(loss, [x, *layer.parameters()]))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and a direct call of the node inside autocast keeps its float32 work: same output as outside
    qv = torch.randn(2, 65, 2, 2, 24, dtype=torch.bfloat16)
    W = torch.randn(2, 24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fused_attention_core(qv, W, 0.1, steps=3, low_dtype=torch.bfloat16, recompute=recompute)[0]
    outside = fused_attention_core(qv, W, 0.1, steps=3, low_dtype=torch.bfloat16, recompute=recompute)[0]
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("einsum", [True, False, None])
def test_rowdot_forms_agree_with_float64(einsum):
    # both forms of the backward's row products (einsum on CPUs, multiply and sum on CUDA devices)
    from vars_ode.fused import _rowdot
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 37, 64, generator=g), torch.randn(2, 3, 37, 64, generator=g)
    b = b.transpose(-1, -2).contiguous().transpose(-1, -2)  # a strided operand, as views are in the node
    want = (a.double() * b.double()).sum(-1)
    got = _rowdot(a, b, einsum)
    assert got.shape == (2, 3, 37) and got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_backward_with_the_cuda_row_products_matches_float64_generic_path():
    # the node's gradients with the multiply-and-sum rows (the CUDA form, forced on the CPU) against the
    # float64 generic path
    import functools
    fused, generic = pair(4, dictionary="d", steps=3)
    x = torch.randn(2, 17, 24, dtype=D64, requires_grad=True)
    with mock.patch.object(fused_module, "_rowdot", functools.partial(fused_module._rowdot, einsum=False)):
        y, grads = run(fused, x)
    y_ref, grads_ref = run(generic, x)
    assert rel(y, y_ref) < 1e-10
    for a, b in zip(grads, grads_ref):
        assert rel(a, b) < 1e-9


def test_tf32_only_for_cuda_autocast_and_restored():
    # the node's float32 products may use TF32 only on CUDA under 16-bit autocast; the global flag is
    # restored after the node, also when the node raises, and a user's own setting is left as it was
    from vars_ode.fused import _node_precision, _uses_tf32
    matmul = torch.backends.cuda.matmul
    assert _uses_tf32("cuda", torch.bfloat16) and _uses_tf32("cuda", torch.float16)
    assert not _uses_tf32("cuda", torch.float32) and not _uses_tf32("cpu", torch.bfloat16)
    with mock.patch.object(fused_module, "TF32_UNDER_AUTOCAST", False):
        assert not _uses_tf32("cuda", torch.bfloat16)

    def flag():
        return matmul.allow_tf32

    def boom():
        raise RuntimeError("inside")

    before = matmul.allow_tf32
    try:
        for user in (False, True):
            matmul.allow_tf32 = user
            assert _node_precision("cuda", True, flag)
            assert matmul.allow_tf32 == user
            assert _node_precision("cuda", False, flag) == user
            with pytest.raises(RuntimeError, match="inside"):
                _node_precision("cuda", True, boom)
            assert matmul.allow_tf32 == user
            with torch.autocast("cpu", dtype=torch.bfloat16):  # and autocast is off inside the call
                assert not _node_precision("cpu", False, torch.is_autocast_enabled, "cpu")
                assert _node_precision("cuda", True, flag) and matmul.allow_tf32 == user
    finally:
        matmul.allow_tf32 = before


def test_tf32_flag_left_alone_under_torch_compile():
    # traced code reads the flag when it is compiled: the node does not flip it there (the global
    # setting decides), and does when it runs eagerly
    from vars_ode.fused import _node_precision
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        def f(x):
            return _node_precision("cuda", True, lambda t: t * (2.0 if matmul.allow_tf32 else 3.0), x)

        x = torch.ones(3)
        torch._dynamo.reset()
        assert torch.equal(f(x), 2 * x)
        assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), 3 * x)
        assert not matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before


def _c_compiler():
    import shutil
    return any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang"))


@pytest.mark.long
@pytest.mark.parametrize("kw, autocast", [
    (dict(dictionary="d"), False),
    (dict(dictionary="sd", static="dense", image_size=4, recompute=True), True),  # the CUDA configuration
])
def test_torch_compile_fullgraph_matches_eager(kw, autocast):
    # the fused node traces into one graph (no graph break: fullgraph=True raises on one), forward and
    # backward, and computes what the eager node computes. Inductor where a C compiler is found; else
    # the same traced forward and backward graphs run op by op (aot_eager)
    torch.manual_seed(5)
    layer = VARSLayer(24, 3, qkv_bias=True, steps=3, **kw)
    x = torch.randn(2, 17, 24, requires_grad=True)

    def run(f):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(x).float()
        return y, torch.autograd.grad((y * torch.cos(y)).sum(), [x, *layer.parameters()])

    torch._dynamo.reset()
    y_eager, g_eager = run(layer)
    y_comp, g_comp = run(torch.compile(layer, fullgraph=True, backend="inductor" if _c_compiler() else "aot_eager"))
    bound = 3e-2 if autocast else 1e-5  # bf16: inductor may round its fused intermediates differently
    assert rel(y_comp, y_eager) < bound
    for a, b in zip(g_comp, g_eager, strict=True):
        assert rel(a, b) < bound


def test_dense_static_atoms_resample_and_train():
    torch.manual_seed(0)
    layer = VARSLayer(24, 3, dictionary="sd", static="dense", image_size=4, num_static_atoms=6)
    assert layer.dictionary.static.atoms.shape == (3, 16, 6)
    for N in (17, 50):  # the stored 4x4 grid with a CLS token, and a resampled 7x7 grid
        x = torch.randn(2, N, 24)
        layer(x).square().sum().backward()
        assert torch.isfinite(layer.dictionary.static.atoms.grad).all()
        assert layer.dictionary.static.atoms.grad.abs().sum() > 0
        layer.zero_grad()
    raw = layer.dictionary.static.raw((4, 4), 1)
    assert raw.shape == (3, 17, 6) and raw[:, 0].abs().sum() == 0  # zero at the prefix token


@pytest.mark.parametrize("kwargs, match", [
    (dict(rand_matrix=None, static=None), "rand_matrix, static or both"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(solver="dopri5"), "solver must be one of"),
    (dict(init="ones"), "init must be"),
    (dict(static=torch.zeros(3, 5, 2)), "static must have shape"),
])
def test_gram_sparse_code_bad_arguments(kwargs, match):
    q = v = torch.zeros(1, 2, 5, 3)
    args = dict(rand_matrix=torch.zeros(2, 3, 4), steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gram_sparse_code(q, v, args.pop("rand_matrix"), 0.1, **args)


def test_layer_bad_static_arguments():
    with pytest.raises(ValueError, match="static must be one of"):
        VARSLayer(24, 3, dictionary="sd", static="fft")
    with pytest.raises(ValueError, match="num_static_atoms must be a positive integer"):
        VARSLayer(24, 3, dictionary="sd", static="dense", num_static_atoms=0)
    with pytest.raises(ValueError, match="static='dense' is for compat='paper'"):
        VARSLayer(24, 3, dictionary="sd", static="dense", compat="official")
    with pytest.raises(ValueError, match="fused must be True or False"):
        VARSLayer(24, 3, dictionary="d", fused=1)
    with pytest.raises(ValueError, match="recompute must be True, False or None"):
        VARSLayer(24, 3, dictionary="d", recompute="yes")


@pytest.mark.parametrize("solver", ["ista", "fista"])
def test_cuda_defaults_on_the_cpu(solver):
    """The choices made for CUDA devices (power iteration by squaring, recomputed features and iterates)
    give the outputs and gradients of the CPU ones, here on the CPU."""
    g = torch.Generator().manual_seed(2)
    qv = torch.randn(3, 17, 2, 2, 4, generator=g, dtype=D64, requires_grad=True)
    W = torch.randn(2, 4, 8, generator=g, dtype=D64)
    S = torch.randn(2, 17, 3, generator=g, dtype=D64, requires_grad=True)
    res = []
    for squaring, recompute in ((False, False), (False, True), (True, False), (True, True)):
        out = fused_attention_core(qv, W, 0.05, static=S, steps=4, solver=solver, squaring=squaring,
                                   recompute=recompute)[0]
        res.append((out, *torch.autograd.grad(out.square().sum(), (qv, S))))
    for other in res[1:]:
        for a, b in zip(other, res[0]):
            assert rel(a, b) < 1e-10


@pytest.mark.parametrize("variant", ["d", "sd-dense"])
def test_code_dropout_matches_the_generic_path(variant):
    """attn_drop in training: the fused node draws the mask nn.Dropout draws on the generic path."""
    kind, _, static = variant.partition("-")
    kw = dict(dictionary=kind, steps=3, attn_drop=0.4, image_size=3, **({"static": static} if static else {}))
    fused, generic = pair(5, **kw)
    fused.train(), generic.train()
    x = torch.randn(2, 10, 24, dtype=D64, requires_grad=True)
    torch.manual_seed(11)
    y1, g1 = run(fused, x)
    torch.manual_seed(11)
    y2, g2 = run(generic, x)
    assert rel(y1, y2) < 1e-10 and all(rel(a, b) < 1e-9 for a, b in zip(g1, g2))
    torch.manual_seed(12)
    assert rel(fused(x), y1) > 1e-3  # another draw, another mask


@pytest.mark.parametrize("kw", [dict(dictionary="d"), dict(dictionary="sd", static="dense", image_size=14)])
def test_fp16_autocast_gradients_are_finite_and_close(kw):
    # under fp16 autocast the node's products run in float32: fp16 cannot hold G's small entries nor the
    # backward's terms in diag(G)^(-3/2) (at DeiT-Ti head size these overflowed to inf and NaN). Its
    # errors against float64 are then those of the generic path under the same autocast (the rest of
    # the layer, in fp16, sets them: 2e-2 for x at this shape)
    torch.manual_seed(0)
    ref = VARSLayer(192, 3, steps=3, qkv_bias=True, **kw).to(D64)
    x = torch.randn(2, 197, 192, dtype=D64, requires_grad=True)
    y_ref, g_ref = run(ref, x)
    errors = []
    for fused in (True, False):
        layer = VARSLayer(192, 3, steps=3, qkv_bias=True, fused=fused, **kw)
        layer.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        with torch.autocast("cpu", dtype=torch.float16):
            y, g = run(layer, x.detach().float().requires_grad_())
        assert y.dtype == torch.float16 and all(torch.isfinite(t).all() for t in g)
        errors.append([rel(y.double(), y_ref)] + [rel(a.double(), b) for a, b in zip(g, g_ref)])
    for fused_err, generic_err in zip(*errors):
        assert fused_err <= 1.25 * generic_err + 1e-4


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(solver="fista", init="encode"), dict(static=True)])
def test_lazy_statistics_replay_the_solve(kw, recompute):
    # stats="lazy" returns a replay of the code and the problem: equal to what stats="eager" returns
    torch.manual_seed(3)
    kw = dict(kw)
    static = torch.randn(2, 20, 5, dtype=D64) if kw.pop("static", False) else None
    qv = torch.randn(2, 20, 2, 2, 8, dtype=D64, requires_grad=True)
    W = torch.randn(2, 8, 12, dtype=D64)
    args = dict(static=static, steps=3, recompute=recompute, **kw)
    out, u, problem = fused_attention_core(qv, W, 0.1, **args)
    out_lazy, replay = fused_attention_core(qv, W, 0.1, stats="lazy", **args)
    assert torch.equal(out, out_lazy)
    u2, problem2 = replay()
    assert replay()[0] is u2  # replayed once
    assert torch.equal(u, u2) and all(torch.equal(a, b) for a, b in zip(problem, problem2))
    with pytest.raises(ValueError, match="stats must be"):
        fused_attention_core(qv, W, 0.1, stats="later", **args)


def test_layer_statistics_keep_only_what_the_backward_keeps():
    # with recompute, a layer's last_stats holds no tensor of its own (the code, the m x m step matrix and
    # b / L took 100 MB a layer at B 256 until the layer's next call): only storages saved for backward
    torch.manual_seed(0)
    layer = VARSLayer(48, 3, dictionary="d", recompute=True)
    x = torch.randn(2, 50, 48)
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    held = [t for t in _closure_cells(layer.last_stats) if isinstance(t, torch.Tensor)]
    assert held and all(t.untyped_storage().data_ptr() in saved for t in held)
    residual = layer.last_stats.residual  # and they still give the statistics
    y.sum().backward()
    assert torch.isfinite(residual).all() and layer.last_stats.nnz.shape == (2, 3, 16)


def _closure_cells(stats):
    # the cell contents of the callables a LayerStats holds, followed into nested closures
    todo, cells, seen = [stats._code_src, stats._residual_fn], [], set()
    while todo:
        fn = todo.pop()
        if id(fn) in seen or not callable(fn) or not getattr(fn, "__closure__", None):
            continue
        seen.add(id(fn))
        for cell in fn.__closure__:
            value = cell.cell_contents
            cells.append(value)
            if callable(value):
                todo.append(value)
            elif isinstance(value, (list, tuple)):
                cells.extend(value)
    return cells


@pytest.mark.parametrize("dictionary", [dict(dictionary="d"), dict(dictionary="sd", static="dense", image_size=4)],
                         ids=["d", "sd-dense"])
@pytest.mark.parametrize("kw", [dict(solver="euler"), dict(solver="rk4", init="encode"), dict(solver="dopri5"),
                                dict(solver="bosh3", grad="adjoint"), dict(solver="dopri5", lam=0.0),
                                dict(solver="midpoint", solver_options={"options": {"step_size": 0.3}})],
                         ids=["euler", "rk4-encode", "dopri5", "bosh3-adjoint", "dopri5-lam0", "midpoint-step"])
def test_fused_ode_integration_equals_the_generic_path(dictionary, kw):
    # the node integrates Eq. 8-9 on its scaled problem (threshold 1/2, atol / tau) with the native methods and
    # reverses the integration by hand (vars_ode.solvers.gram_ode): the generic path's output, gradients and
    # evaluation count, float64, over a horizon of 3
    fused, generic = pair(3, steps=3.0, **dictionary, **kw)
    x = torch.randn(2, 17, 24, dtype=D64, requires_grad=True)
    R = torch.randn(2, 17, 24, dtype=D64)
    outs = []
    for layer in (fused, generic):
        y = layer(x)
        grads = torch.autograd.grad((y * R).sum(), [x, *layer.parameters()], allow_unused=True)
        outs.append((y, grads, layer.last_stats))
    (yf, gf, sf), (yg, gg, sg) = outs
    torch.testing.assert_close(yf, yg, rtol=1e-12, atol=1e-12)
    assert sum(g is not None for g in gf) == sum(g is not None for g in gg) >= 3
    for a, b in zip(gf, gg):
        if b is not None:  # (an adaptive step's accepted size differs in its last bits between the two)
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert sf.unit == sg.unit == "function evaluations" and int(sf.iterations) == int(sg.iterations) > 3
    torch.testing.assert_close(sf.residual, sg.residual, rtol=1e-10, atol=1e-12)
