"""Dictionaries: adjoints, Gram matrices and Lipschitz bounds against float64 brute force, and the
operator-form solver against scikit-learn's Lasso and the core Gram-form solver."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import static_dense
from vars_ode import solve_gram
from vars_ode.dictionaries import (DynamicDictionary, StaticAtoms, StaticDictionary, UnionDictionary,
                                   draw_features, positive_random_features)
from vars_ode.lasso import kkt_residual_operator
from vars_ode.solvers import solve_operator

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@given(H=st.integers(2, 6), W=st.integers(2, 6), k=st.sampled_from([1, 3, 5]), p=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_static_adjoint(padding, H, W, k, p, seed):
    torch.manual_seed(seed)
    h, dh, r = 2, 3, 2
    sd = StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=k, padding=padding).double()
    atoms = sd.bind((H, W), p)
    x = torch.randn(2, h, p + H * W, dh, dtype=D64)
    u = torch.randn(2, h, dh, r, H, W, dtype=D64)
    lhs = (atoms.encode(x)[0] * u).sum()
    rhs = (x * atoms.decode((u,))).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-10)
    # prefix tokens: atoms are zero there and encode ignores them
    assert atoms.decode((u,))[:, :, :p].abs().max() == 0 if p else True


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_static_lipschitz_bound(padding):
    torch.manual_seed(1)
    h, dh, r, H, W = 1, 2, 3, 5, 4
    sd = StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=3, padding=padding).double()
    atoms = sd.bind((H, W), 0)
    P = static_dense(atoms, h, dh, r, H, W, H * W)
    top = torch.linalg.eigvalsh(P.transpose(-1, -2) @ P)[..., -1]
    L = atoms.lipschitz().reshape(h, dh)
    if padding == "circular":
        torch.testing.assert_close(L, top, rtol=1e-10, atol=1e-10)
    else:
        assert (L >= top * (1 - 1e-10)).all()
        assert (L <= 4 * top).all()  # and not absurdly loose


def test_static_templates_normalised_and_translation_atoms():
    torch.manual_seed(2)
    sd = StaticDictionary(2, 1, atoms_per_channel=2, kernel_size=3, padding="circular").double()
    atoms = sd.bind((5, 5), 0)
    P = static_dense(atoms, 1, 2, 2, 5, 5, 25)
    # with circular padding every atom is a translated template of unit norm
    torch.testing.assert_close(P.norm(dim=-2), torch.ones(1, 2, 50, dtype=D64))


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_template_gradient_in_the_parameters_layout(padding):
    # the depthwise convolution's weight gradient comes back channels-last ((25, 1, 5, 1) for (C r, 1, 5, 5));
    # the templates' gradient must have the parameter's strides (DistributedDataParallel's buckets copy and
    # warn otherwise), with the same values as the gradient taken without the layout step
    torch.manual_seed(5)
    sd = StaticDictionary(8, 2, atoms_per_channel=3, kernel_size=5, padding=padding)  # float32: the oneDNN kernels
    x = torch.randn(2, 2, 1 + 36, 4)
    atoms = sd.bind((6, 6), 1)
    (atoms.decode(atoms.encode(x)) ** 2).sum().backward()
    assert sd.kernel.grad.stride() == sd.kernel.stride() == (25, 25, 5, 1)
    k = sd.kernel.detach().clone().requires_grad_()
    kn = k / k.flatten(1).norm(dim=-1)[:, None, None, None]
    from vars_ode.dictionaries import StaticAtoms
    ref = StaticAtoms(kn, 2, 3, (6, 6), 1, padding)
    (ref.decode(ref.encode(x)) ** 2).sum().backward()
    torch.testing.assert_close(sd.kernel.grad, k.grad, rtol=0, atol=0)


@pytest.mark.parametrize("pad", [0, 1])
def test_template_convolutions_match_grouped_convolutions(pad):
    # on CPUs P^T and P run template by template (_TemplateConv, plain and transposed), with the kernel's gradient as
    # one call: values and first and second derivatives against PyTorch's grouped convolutions, in float64
    import torch.nn.functional as F
    from vars_ode.dictionaries import _TemplateConv

    torch.manual_seed(6)
    C, r, k = 2, 3, 3  # pad 1: the atoms' "same" padding (kernel_size // 2)
    x = torch.randn(2, C, 5, 6, dtype=D64, requires_grad=True)
    u = torch.randn(2, C * r, 5, 6, dtype=D64, requires_grad=True)
    w = torch.randn(C * r, 1, k, k, dtype=D64, requires_grad=True)
    torch.testing.assert_close(_TemplateConv.apply(x, w, pad, C, False), F.conv2d(x, w, padding=pad, groups=C))
    torch.testing.assert_close(_TemplateConv.apply(u, w, pad, C, True), F.conv_transpose2d(u, w, padding=pad, groups=C))
    torch.autograd.gradcheck(lambda a, b: _TemplateConv.apply(a, b, pad, C, False), (x, w))
    torch.autograd.gradcheck(lambda a, b: _TemplateConv.apply(a, b, pad, C, True), (u, w))
    torch.autograd.gradgradcheck(lambda a, b: _TemplateConv.apply(a, b, pad, C, False), (x, w))
    torch.autograd.gradgradcheck(lambda a, b: _TemplateConv.apply(a, b, pad, C, True), (u, w))
    # float32 through oneDNN, channels-last input as the atoms give it: gradients as the grouped convolution's
    xs = torch.randn(2, 5, 6, C).permute(0, 3, 1, 2).requires_grad_()
    ws = w.detach().float().requires_grad_()
    g = torch.randn(2, C * r, 5 + 2 * pad - k + 1, 6 + 2 * pad - k + 1)
    ours = torch.autograd.grad(_TemplateConv.apply(xs, ws, pad, C, False), (xs, ws), g)
    ref = torch.autograd.grad(F.conv2d(xs, ws, padding=pad, groups=C), (xs, ws), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(H=st.integers(1, 6), W=st.integers(1, 6), k=st.sampled_from([1, 3, 5, 7, 13]), r=st.integers(1, 3),
       p=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_template_matrices_match_grouped_convolutions(H, W, k, r, p, seed):
    # the matrix form of P^T and P (MATRIX_DEVICES, opt-in; here on the CPU) against PyTorch's grouped
    # convolution and its transpose, values and the gradients in the signal, the code and the kernel, in float64;
    # templates larger than the grid included
    import torch.nn.functional as F
    from vars_ode import dictionaries as D

    torch.manual_seed(seed)
    h, dh = 2, 2
    C = h * dh
    static = StaticDictionary(C, h, atoms_per_channel=r, kernel_size=k).double()
    x = torch.randn(2, h, p + H * W, dh, dtype=D64, requires_grad=True)
    u = torch.randn(2, h, dh, r, H, W, dtype=D64, requires_grad=True)
    D.MATRIX_DEVICES.add("cpu")
    try:
        atoms = static.bind((H, W), p)
        assert atoms._as_matrices(x.device)
        enc, dec = atoms.encode(x)[0], atoms.decode((u,))
    finally:
        D.MATRIX_DEVICES.discard("cpu")
    kernel = static.normalized_kernel()
    grid = x[:, :, p:, :].permute(0, 1, 3, 2).reshape(2, C, H, W)
    enc_ref = F.conv2d(grid, kernel, padding=k // 2, groups=C).reshape(enc.shape)
    dec_ref = F.conv_transpose2d(u.reshape(2, C * r, H, W), kernel, padding=k // 2, groups=C)
    dec_ref = F.pad(dec_ref.reshape(2, h, dh, H * W).transpose(-1, -2), (0, 0, p, 0))
    torch.testing.assert_close(enc, enc_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dec, dec_ref, rtol=1e-12, atol=1e-12)
    ge, gd = torch.randn_like(enc), torch.randn_like(dec)
    ours = torch.autograd.grad((enc * ge).sum() + (dec * gd).sum(), (x, u, static.kernel))
    ref = torch.autograd.grad((enc_ref * ge).sum() + (dec_ref * gd).sum(), (x, u, static.kernel))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["zeros", "circular"]), st.integers(0, 2), st.sampled_from([1, 3, 5]),
       st.integers(1, 3))
def test_static_gram_apply_is_decode_then_encode(seed, padding, prefix, k, r):
    # StaticAtoms.gram_apply convolves on the grid directly: the same K u as P^T (P u) through the tokens, and the
    # same gradients for u and the templates (float64)
    g = torch.Generator().manual_seed(seed)
    H, W, h, dh = 4, 5, 2, 2
    if padding == "circular" and k // 2 > min(H, W):
        return
    kernel = torch.randn(h * dh * r, 1, k, k, generator=g, dtype=D64).requires_grad_(True)
    atoms = StaticAtoms(kernel, h, r, (H, W), prefix, padding)
    u = torch.randn(2, h, dh, r, H, W, generator=g, dtype=D64).requires_grad_(True)
    ours = atoms.gram_apply((u,))[0]
    ref = atoms.encode(atoms.decode((u,)))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ours.shape, generator=g, dtype=D64)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), (u, kernel)), torch.autograd.grad((ref * w).sum(), (u, kernel))):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_template_matrices_cached_without_a_graph_are_built_again_with_one(monkeypatch):
    # atoms first used under no_grad (a solver's iterations) and then with gradients: the kernel's gradient is there
    from vars_ode import dictionaries as D

    torch.manual_seed(2)
    static = StaticDictionary(4, 2, atoms_per_channel=2, kernel_size=3).double()
    x = torch.randn(1, 2, 9, 2, dtype=D64)
    reference = torch.autograd.grad(static.bind((3, 3)).encode(x)[0].square().sum(), static.kernel)[0]
    monkeypatch.setattr(D, "MATRIX_DEVICES", {"cpu"})
    atoms = static.bind((3, 3))
    with torch.no_grad():
        atoms.encode(x)
    grad = torch.autograd.grad(atoms.encode(x)[0].square().sum(), static.kernel)[0]
    torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


def test_template_matrices_only_where_asked(monkeypatch):
    # opt-in by device type; circular padding and grids above MATRIX_MAX_GRID keep the convolutions
    from vars_ode import dictionaries as D

    cuda = torch.device("cuda")  # only its type is read
    assert not D.StaticDictionary(4, 2).bind((14, 14))._as_matrices(cuda)  # the default: convolutions
    monkeypatch.setattr(D, "MATRIX_DEVICES", {"cuda"})
    assert D.StaticDictionary(4, 2).bind((14, 14))._as_matrices(cuda)
    assert not D.StaticDictionary(4, 2).bind((14, 14))._as_matrices(torch.device("cpu"))
    assert not D.StaticDictionary(4, 2, padding="circular").bind((14, 14))._as_matrices(cuda)
    assert not D.StaticDictionary(4, 2).bind((29, 28))._as_matrices(cuda)


def test_dynamic_gram_matches_brute_force():
    torch.manual_seed(3)
    B, h, N, dh, m = 2, 2, 9, 4, 8
    dyn = DynamicDictionary(h, dh, m, dtype=D64)
    q = torch.randn(B, h, N, dh, dtype=D64) * 3
    atoms = dyn.bind(q)
    # independent Phi: exp(w^T q_hat - 1/2) / sqrt(m), columns normalised over tokens
    phi = torch.zeros(B, h, N, m, dtype=D64)
    for b in range(B):
        for hh in range(h):
            for i in range(N):
                qh = q[b, hh, i] / q[b, hh, i].norm()
                for j in range(m):
                    phi[b, hh, i, j] = math.exp(float(dyn.rand_matrix[hh, :, j] @ qh) - 0.5) / math.sqrt(m)
    phi = phi / phi.norm(dim=-2, keepdim=True)
    torch.testing.assert_close(atoms.phi, phi, rtol=1e-12, atol=1e-14)
    K = torch.einsum("bhni,bhnj->bhij", phi, phi)
    torch.testing.assert_close(atoms.gram(), K, rtol=1e-12, atol=1e-13)
    v = torch.randn(B, h, N, dh, dtype=D64)
    u = torch.randn(B, h, m, dh, dtype=D64)
    assert torch.allclose((atoms.encode(v)[0] * u).sum(), (v * atoms.decode((u,))).sum(), rtol=1e-12)
    torch.testing.assert_close(atoms.gram_apply((u,))[0], atoms.encode(atoms.decode((u,)))[0])
    top = torch.linalg.eigvalsh(K)[..., -1]
    L = atoms.lipschitz().squeeze(-1)
    assert (L <= top * (1 + 1e-9)).all() and (L >= 0.5 * top).all()  # power iteration: ISTA-safe (< 2/L)


def test_dynamic_gram_formed_on_request_keeps_its_graph():
    # K is formed at the first gram() / gram_apply(), with its graph to the features even when that request comes
    # under no_grad (a solver's loop) and the gradient later (an implicit gradient through K); the operator form
    # (encode, decode, lipschitz) never keeps it, and the atoms' norms are those of the Gram matrix's diagonal
    torch.manual_seed(5)
    dyn = DynamicDictionary(2, 3, 6, dtype=D64)
    q = torch.randn(2, 2, 7, 3, dtype=D64, requires_grad=True)
    u = torch.randn(2, 2, 6, 3, dtype=D64)
    ref = dyn.bind(q)
    ref_L = ref.lipschitz()
    assert ref._K is None  # lipschitz alone: no Gram matrix kept
    (g_ref,) = torch.autograd.grad((ref.gram_apply((u,))[0] * u).sum(), q)
    atoms = dyn.bind(q)
    with torch.no_grad():
        atoms.gram()
    assert atoms.gram().requires_grad
    (g,) = torch.autograd.grad((atoms.gram_apply((u,))[0] * u).sum(), q)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(atoms.lipschitz(), ref_L, rtol=1e-12, atol=0)  # K formed or not: the same L
    G = ref.raw.transpose(-1, -2) @ ref.raw
    torch.testing.assert_close(ref.inv_norm.squeeze(-1), torch.diagonal(G, dim1=-2, dim2=-1).rsqrt(),
                               rtol=1e-14, atol=0)
    op = dyn.bind(q)
    op.decode(op.encode(torch.randn(2, 2, 7, 3, dtype=D64)))
    assert op._K is None


def test_feature_stabilisation_is_exact():
    torch.manual_seed(4)
    q = torch.randn(2, 3, 11, 5, dtype=D64) * 10
    w = draw_features(3, 5, 10, dtype=D64)
    a = positive_random_features(q, w, stabilize=True)
    b = positive_random_features(q, w, stabilize=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert (a > 0).all()


def test_orthogonal_features_and_redraw():
    w = draw_features(2, 4, 8, orthogonal=True, generator=torch.Generator().manual_seed(0), dtype=D64)
    for blk in (w[..., :4], w[..., 4:]):
        G = blk.transpose(-1, -2) @ blk
        off = G - torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
        assert off.abs().max() < 1e-10
    dyn = DynamicDictionary(2, 4, 8, orthogonal=True)
    before = dyn.rand_matrix.clone()
    dyn.redraw_features(torch.Generator().manual_seed(1))
    assert not torch.equal(before, dyn.rand_matrix)
    again = DynamicDictionary(2, 4, 8, orthogonal=True)
    again.redraw_features(torch.Generator().manual_seed(1))
    assert torch.equal(again.rand_matrix, dyn.rand_matrix)
    assert "rand_matrix" in dyn.state_dict() and not list(dyn.parameters())


def test_union_adjoint_and_lipschitz():
    torch.manual_seed(5)
    h, dh, m, r, H, W, p = 1, 2, 4, 2, 3, 3, 1
    N = p + H * W
    un = UnionDictionary(DynamicDictionary(h, dh, m, lipschitz="eigvalsh", dtype=D64),
                         StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=3).double())
    q = torch.randn(1, h, N, dh, dtype=D64)
    atoms = un.bind(q, (H, W), p)
    x = torch.randn(1, h, N, dh, dtype=D64)
    u = (torch.randn(1, h, m, dh, dtype=D64), torch.randn(1, h, dh, r, H, W, dtype=D64))
    enc = atoms.encode(x)
    lhs = sum((e * c).sum() for e, c in zip(enc, u))
    assert torch.allclose(lhs, (x * atoms.decode(u)).sum(), rtol=1e-12)
    # dense union dictionary of channel c: [Phi_head, static atoms of c]
    Ps = static_dense(atoms.static, h, dh, r, H, W, N)  # (h, dh, N, rHW)
    for j in range(dh):
        P = torch.cat([atoms.dynamic.phi[0, 0], Ps[0, j]], -1)
        top = torch.linalg.eigvalsh(P.T @ P)[-1]
        assert atoms.lipschitz()[0, 0, j] >= top * (1 - 1e-10)


def test_operator_solver_matches_sklearn_lasso():
    import sklearn.linear_model as sklearn
    torch.manual_seed(6)
    h, dh, r, H, W = 1, 2, 2, 4, 4
    sd = StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=3).double()
    atoms = sd.bind((H, W), 0)
    x = torch.randn(1, h, H * W, dh, dtype=D64)
    lam = 0.1
    code, _ = solve_operator(atoms, atoms.encode(x), lam, "fista", steps=None, tol=1e-10, max_iter=200_000)
    P = static_dense(atoms, h, dh, r, H, W, H * W)
    for j in range(dh):
        model = sklearn.Lasso(alpha=lam / (H * W), fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        model.fit(P[0, j].numpy(), x[0, 0, :, j].numpy())
        ref = torch.from_numpy(model.coef_)
        torch.testing.assert_close(code[0][0, 0, j].reshape(-1), ref, atol=1e-6, rtol=0)
    assert kkt_residual_operator(atoms, code, atoms.encode(x), lam).max() <= 1e-10


@pytest.mark.parametrize("solver", ["ista", "fista", "rk4"])
def test_operator_form_equals_core_gram_form(solver):
    torch.manual_seed(7)
    dyn = DynamicDictionary(2, 3, 6, lipschitz="eigvalsh", dtype=D64)
    q, v = torch.randn(2, 2, 7, 3, dtype=D64), torch.randn(2, 2, 7, 3, dtype=D64)
    atoms = dyn.bind(q)
    B = atoms.encode(v)
    code, _ = solve_operator(atoms, B, 0.05, solver, steps=4)
    opts = {"t_end": 4} if solver == "rk4" else {}
    ref = solve_gram(atoms.gram(), B[0], 0.05, solver, tol=0.0, max_iter=4, **opts).code
    torch.testing.assert_close(code[0], ref, rtol=1e-9, atol=1e-11)


def test_operator_ode_reaches_the_lasso_equilibrium():
    torch.manual_seed(8)
    un = UnionDictionary(DynamicDictionary(1, 2, 4, dtype=D64),
                         StaticDictionary(2, 1, atoms_per_channel=1, kernel_size=3).double())
    atoms = un.bind(torch.randn(1, 1, 10, 2, dtype=D64), (3, 3), 1)
    B = atoms.encode(torch.randn(1, 1, 10, 2, dtype=D64))
    ref, _ = solve_operator(atoms, B, 0.2, "fista", steps=None, tol=1e-9, max_iter=100_000)
    code, nfe = solve_operator(atoms, B, 0.2, "dopri5", steps=None, tol=1e-3, max_iter=50_000)
    assert kkt_residual_operator(atoms, code, B, 0.2).max() <= 1e-3
    for c, r in zip(code, ref):  # K is ill-conditioned: a KKT residual of 1e-3 leaves ~1e-2 in the code
        torch.testing.assert_close(c, r, atol=2e-2, rtol=0)


def test_static_expand_is_written_out_over_the_codes_memory():
    # StaticAtoms.expand: a per-problem tensor broadcast over the templates and written out, its (h, dh, r) entries in
    # the order of the code's channels and templates in memory (on the CPU the code is (B, H, W, C, r) underneath), so
    # that element-wise kernels with it run over whole channel-template rows; the same products as the plain
    # broadcast, for per-image, shared, per-head and per-channel tensors; a 0-dim one passes as it is
    atoms = StaticDictionary(6, 2, atoms_per_channel=3, kernel_size=3).bind((4, 4), 1)
    code = atoms.encode(torch.randn(2, 2, 17, 3))[0]
    assert code.shape == (2, 2, 3, 3, 4, 4) and not code.is_contiguous()
    for t in (torch.rand(2, 2, 3), torch.rand(1, 2, 3), torch.rand(2, 1, 1), torch.rand(2, 3)):
        e = atoms.expand(0, t)
        assert e.shape[-5:] == (2, 3, 3, 1, 1)
        assert e.stride()[-5:-2] == code.stride()[-5:-2] == (9, 3, 1)
        torch.testing.assert_close(e * code, t[..., None, None, None] * code, rtol=0, atol=0)
    scalar = torch.tensor(0.5)
    assert atoms.expand(0, scalar) is scalar


def test_static_reduce_over_the_codes_memory_equals_the_plain_reduction():
    # StaticAtoms.reduce (and the union's static block): over the templates and the grid, by rows of the CPU code's
    # memory where the tensor lies so; the plain reduction's maximum exactly and its sum to rounding, for a code in
    # the code's layout and for a contiguous one
    from vars_ode.dictionaries import DynamicAtoms, UnionAtoms
    atoms = StaticDictionary(6, 2, atoms_per_channel=3, kernel_size=3).bind((4, 4), 1, dtype=torch.float64)
    union = UnionAtoms(DynamicAtoms(torch.rand(2, 2, 17, 4, dtype=torch.float64)), atoms)
    code = atoms.encode(torch.randn(2, 2, 17, 3, dtype=torch.float64))[0]
    for t in (code, code.contiguous(), code.abs()):
        for op in (atoms, union):
            i = op.num_blocks - 1
            got_max, got_sum = op.reduce(i, t, "amax"), op.reduce(i, t)
            assert got_max.shape == got_sum.shape == (2, 2, 3)
            assert torch.equal(got_max, t.amax((-3, -2, -1)))
            torch.testing.assert_close(got_sum, t.sum((-3, -2, -1)), rtol=1e-13, atol=1e-13)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        StaticDictionary(4, 1, kernel_size=4)
    with pytest.raises(ValueError, match="padding"):
        StaticDictionary(4, 1, padding="reflect")
    with pytest.raises(ValueError, match="lipschitz"):
        DynamicDictionary(1, 4, 8, lipschitz="svd")
    dyn = DynamicDictionary(1, 2, 4)
    atoms = dyn.bind(torch.randn(1, 1, 5, 2))
    with pytest.raises(ValueError, match="solver"):
        solve_operator(atoms, atoms.encode(torch.randn(1, 1, 5, 2)), 0.1, "newton")
    with pytest.raises(ValueError, match="adjoint"):
        solve_operator(atoms, atoms.encode(torch.randn(1, 1, 5, 2)), 0.1, "ista", grad="adjoint")


def _plain_operator_steps(atoms, B, w, L, u, steps, fista):
    """ISTA / FISTA (no restart) written out on the operator, one problem block at a time."""
    def prox(y):
        Ky = atoms.gram_apply(y)
        out = []
        for i, (yi, k, b) in enumerate(zip(y, Ky, B)):
            Li = atoms.expand(i, L)
            z = yi - (k - b) / Li
            out.append(torch.sign(z) * torch.clamp(z.abs() - w / Li, min=0))
        return tuple(out)

    y, t = u, 1.0
    for _ in range(steps):
        un = prox(y)
        if not fista:
            y = u = un
            continue
        tn = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = tuple(ni + (t - 1) / tn * (ni - ui) for ni, ui in zip(un, u))
        u, t = un, tn
    return u


@pytest.mark.parametrize("solver", ["ista", "fista"])
@pytest.mark.parametrize("init", ["zeros", "encode"])
def test_operator_fixed_budget_against_a_plain_loop(solver, init):
    """The operator-form ISTA / FISTA (iterating on the threshold-scaled code) against the textbook loop
    written above, on union atoms in float64: same codes and gradients (FISTA restart is checked against
    the Gram form in test_operator_form_equals_core_gram_form)."""
    torch.manual_seed(9)
    q = torch.randn(2, 2, 10, 3, dtype=D64, requires_grad=True)
    x = torch.randn(2, 2, 10, 3, dtype=D64, requires_grad=True)
    st = StaticDictionary(6, 2, atoms_per_channel=2, kernel_size=3).double()
    un = UnionDictionary(DynamicDictionary(2, 3, 5, dtype=D64), st)
    out = []
    for mine in (True, False):
        atoms = un.bind(q, (3, 3), 1)
        B = atoms.encode(x)
        if mine:
            code, _ = solve_operator(atoms, B, 0.07, solver, steps=4, init=init, options={"restart": False}
                                     if solver == "fista" else None)
        else:
            L = atoms.lipschitz().detach()
            u0 = tuple(torch.zeros_like(b) for b in B) if init == "zeros" else B
            code = _plain_operator_steps(atoms, B, 0.07, L, u0, 4, solver == "fista")
        recon = atoms.decode(code)
        grads = torch.autograd.grad((recon * torch.cos(recon)).sum(), (q, x, st.kernel))
        out.append((recon, *grads))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
