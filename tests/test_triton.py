"""The Triton kernels of the fused VARS-D / dense VARS-SD node (vars_ode.triton_gram, ``kernels="triton"``)
against the PyTorch node (vars_ode.fused) in float64: forward, code, problem statistics and gradients
(of the static atoms too). Without a GPU
the kernels run in Triton's interpreter (tests/conftest.py turns it on), the same kernel code at small
shapes; on a CUDA machine these tests run them compiled."""
import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from vars_ode import VARSLayer, triton_gram
from vars_ode.fused import fused_attention_core

D64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# no skip: without a GPU, tests/conftest.py turns the interpreter on, and a machine where neither runs
# should fail here (the kernels' ValueError says what is missing), not pass by skipping
pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def configured(**kw):
    saved = dict(triton_gram.CONFIG)
    triton_gram.CONFIG.update(kw)
    try:
        yield
    finally:
        triton_gram.CONFIG.update(saved)


def core_run(kernels, qv, W, go, dtype, static=None, **kw):
    # the node's output, code, L and step matrix, and the gradients w.r.t. qv (and the static atoms), for
    # the loss <out, go>
    qv = qv.to(DEVICE, dtype).requires_grad_()
    work = D64 if dtype == D64 else torch.float32
    Wk = W.to(DEVICE, work)
    Sk = static.to(DEVICE, work).requires_grad_() if static is not None else None
    out, u, (A, bs, L, tau) = fused_attention_core(qv, Wk, kw.pop("weight"), static=Sk, kernels=kernels,
                                                   recompute=True, **kw)
    grads = torch.autograd.grad(out, [qv] + ([Sk] if Sk is not None else []), go.to(DEVICE, out.dtype))
    res = dict(out=out, code=u * tau, b=bs * tau, L=L, A=A, grad=grads[0])
    if Sk is not None:
        res["grad_static"] = grads[1]
    return res


def kink_margin(res, weight, steps, init):
    """How far ISTA's values before each shrinkage stay from the threshold, relative to their scale: ``steps`` steps
    replayed in float64 from a node's step matrix and ``b / L`` (its threshold is one in the scaled units). Inputs
    closer than a float32 rounding to it have a gradient that depends on which side the rounding falls."""
    if weight == 0:
        return float("inf")
    A, L = res["A"].double(), res["L"].double()
    tau = weight / L
    bs = res["b"].double() / tau
    y = bs * L if init == "encode" else None
    worst, scale = float("inf"), 1.0
    for _ in range(steps):
        p = bs if y is None else A @ y + bs
        worst = min(worst, float((p.abs() - 1).abs().min()))
        scale = max(scale, float(p.abs().max()))
        y = torch.nn.functional.softshrink(p, 1.0)
    return worst / scale


def problem(seed, B, N, h, dh, m, ms=0):
    # queries and values, W, the output's gradient and (ms > 0) static atoms: Gaussian, as the layer
    # initialises them, zero on the first token, as on a class token
    g = torch.Generator().manual_seed(seed)
    qv, W, go = (torch.randn(B, N, 2, h, dh, generator=g, dtype=D64), torch.randn(h, dh, m, generator=g, dtype=D64),
                 torch.randn(B, N, h, dh, generator=g, dtype=D64))
    if not ms:
        return qv, W, go, None
    S = torch.randn(h, N, ms, generator=g, dtype=D64)
    S[:, 0] = 0.0
    return qv, W, go, S


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), N=st.integers(1, 70), h=st.integers(1, 3),
       dh=st.sampled_from([4, 8, 13, 16]), m=st.sampled_from([3, 8, 16, 21, 32]), ms=st.sampled_from([0, 0, 5, 16]),
       steps=st.integers(1, 4),
       weight=st.sampled_from([0.0, 0.02, 0.3]), init=st.sampled_from(["zeros", "encode"]),
       residual=st.booleans(), power_iters=st.sampled_from([1, 10]), block_n=st.sampled_from([None, 16]),
       programs=st.sampled_from([None, 1000]))
def test_triton_node_matches_torch_node(seed, B, N, h, dh, m, ms, steps, weight, init, residual, power_iters,
                                        block_n, programs):
    # float32 kernels against the PyTorch node in float64; programs=1000 splits the tokens' reductions
    # into chunks (partial sums), block_n 16 gives several tiles per chunk; ms > 0: static atoms (VARS-SD)
    qv, W, go, S = problem(seed, B, N, h, dh, m, ms)
    kw = dict(steps=steps, weight=weight, init=init, residual=residual, power_iters=power_iters, static=S)
    ref = core_run("torch", qv, W, go, D64, **kw)
    # a draw with a value before the threshold within 1e-5 of it is not one whose gradient float32 can match:
    # seed 179 (B 3, N 36, h 2, dh 16, m 32, one step from the encoding, weight 0.02) had one 1.8e-8 from it; a
    # relative perturbation of 1e-7 of the inputs moved the float64 gradient by 2.1e-2, to within 6.7e-7 of the
    # kernels' (about 7% of the test's draws come within 1e-5, none of 150 within 1e-6)
    assume(kink_margin(ref, weight, steps, init) > 1e-5)
    with configured(block_n=block_n, programs=programs):
        tri = core_run("triton", qv, W, go, torch.float32, **kw)
    assert tri["out"].dtype == torch.float32 and tri["out"].shape == (B, N, h, dh)
    for name in ref:
        assert tri[name].shape == ref[name].shape, name
        # the code and b / L lose digits where ISTA's steps cancel; the rest is float32 rounding
        assert rel(tri[name], ref[name]) < (1e-4 if name in ("code", "b") else 2e-5), name


@pytest.mark.parametrize("programs", [None, 1000])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, ms", [(128, 0), (96, 32)])
def test_low_precision_products_as_accurate_as_the_torch_node(low, programs, m, ms):
    # bf16 / fp16 products over the tokens (float32 accumulation): no further from float64 than the
    # PyTorch node given the same inputs and low dtype, within 30%. With bf16 that node also rounds G and
    # F^T v to bf16; with fp16 it computes in float32 (fp16's range cannot hold its G and dG), while the
    # kernels keep fp16 products: they work with the unit atoms F diag(s), whose entries fp16 holds.
    # Both keep G and F^T v for the backward pass in bf16 under bf16 (in float32 under fp16). ms: static
    # atoms (VARS-SD), whose gradient is compared too
    qv, W, go, S = problem(3, 2, 150, 3, 64, m, ms)
    kw = dict(steps=3, weight=0.3, init="zeros", residual=True, static=S)
    ref = core_run("torch", qv, W, go, D64, **kw)
    low_torch = core_run("torch", qv, W, go, low, low_dtype=low, **kw)
    with configured(programs=programs):  # 1000: the tokens' sums in three chunks, then rounded
        low_triton = core_run("triton", qv, W, go, low, low_dtype=low, **kw)
    assert low_triton["out"].dtype == low and low_triton["grad"].dtype == low
    for name in ("out", "grad", "L", "A") + (("grad_static",) if ms else ()):
        bound = max(1.3 * rel(low_torch[name], ref[name]), 1e-3)
        assert rel(low_triton[name], ref[name]) <= bound, name


def layer_pair(seed, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(dictionary="d"), **kw)
    ref = VARSLayer(48, 3, qkv_bias=True, **kw).to(D64)
    tri = VARSLayer(48, 3, qkv_bias=True, kernels="triton", **kw).to(DEVICE)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, tri


def layer_run(layer, x):
    y = layer(x)
    return y, torch.autograd.grad((y * torch.cos(y)).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("kw", [dict(), dict(init="encode", lam=0.05, steps=5, qk_norm=True),
                                dict(residual="none", rand_feat_dim_ratio=1),
                                dict(dictionary="sd", static="dense", image_size=7)])
def test_layer_with_triton_kernels_matches_torch_kernels(kw):
    ref, tri = layer_pair(0, **kw)
    x = torch.randn(2, 50, 48, dtype=D64, requires_grad=True)
    y_ref, g_ref = layer_run(ref, x)
    y, g = layer_run(tri, x.detach().float().to(DEVICE).requires_grad_())
    assert rel(y, y_ref) < 2e-5
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 5e-5
    # the statistics come from the kernels' outputs (code, step matrix, b / L)
    st_ref, st = ref.last_stats, tri.last_stats
    assert rel(st.residual, st_ref.residual) < 1e-4
    # non-zero counts per problem: a float32 solve may put an entry on the other side of the threshold
    assert (st.nnz.cpu() - st_ref.nnz).abs().max() <= 1 and st.nnz.sum() > 0


@pytest.mark.parametrize("attention, kw", [("vars_d", {}), ("vars_sd", dict(static="dense"))])
def test_vars_rvt_training_step_with_triton_kernels(attention, kw):
    # a model built with kernels="triton" trains: one step under autocast gives the loss and gradients of
    # the same model with the PyTorch kernels (both with low-precision products: loose bound)
    import timm

    torch.manual_seed(0)
    # one block per stage (of 10 and 2): each stage's heads and sizes, a sixth of the interpreter's time
    models = [timm.create_model("vars_rvt_tiny", num_classes=10, img_size=32, attention=attention, kernels=k,
                                depth=[1, 1], **kw).to(DEVICE) for k in ("torch", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.eval()  # no stochastic depth: the two models compute the same function
    assert any(getattr(mod, "kernels", None) == "triton" for mod in models[1].modules())
    x, y = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 7], device=DEVICE)
    losses, grads = [], []
    for model in models:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    assert torch.isfinite(losses[1]) and abs(losses[1].item() - losses[0].item()) < 2e-2 * abs(losses[0].item())
    flat = [torch.cat([g.float().flatten() for g in gs]) for gs in grads]
    assert rel(flat[1], flat[0]) < 5e-2


@pytest.mark.parametrize("kw, names", [
    (dict(dictionary="sd"), ["dictionary"]),  # convolutional templates
    (dict(dictionary="s", static="dense"), ["dictionary"]),
    (dict(solver="fista"), ["solver"]),
    (dict(lipschitz="eigvalsh", attn_drop=0.1), ["lipschitz", "attn_drop"]),
    (dict(fused=False), ["fused"]),
    (dict(solver="dopri5", steps=3.0), ["solver", "steps"]),
])
def test_layer_refuses_what_the_kernels_do_not_cover(kw, names):
    opts = dict(dictionary="d", **kw) if "dictionary" not in kw else kw
    with pytest.raises(ValueError, match="kernels='triton'") as err:
        VARSLayer(48, 3, kernels="triton", **opts)
    for name in names:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("kw, message", [
    (dict(dictionary="sd", static="dense"), r"got head_dim 64 and m \+ m_s = 128 \+ 64 = 192: use kernels='torch'"),
    (dict(dictionary="d", rand_feat_dim_ratio=3), "got head_dim 64 and m 192: use kernels='torch'"),
    (dict(dictionary="d", num_heads=1), "got head_dim 192 and m 384: use kernels='torch'"),
])
def test_layer_refuses_sizes_beyond_the_kernels_when_built(kw, message):
    # DeiT-Ti width with VARS-SD dense (128 + 64 atoms), too many dynamic atoms, too wide a head: refused
    # when the layer is built, not at its first call; vars_rvt_tiny's VARS-SD dense heads (64 + 32) pass
    heads = kw.pop("num_heads", 3)
    with pytest.raises(ValueError, match=message):
        VARSLayer(192, heads, kernels="triton", **kw)
    VARSLayer(192, 6, kernels="triton", dictionary="sd", static="dense")


def test_bad_kernels_argument_and_uncovered_calls():
    with pytest.raises(ValueError, match="kernels"):
        VARSLayer(48, 3, dictionary="d", kernels="cuda")
    layer = VARSLayer(48, 3, dictionary="d", kernels="triton")
    layer.set_solver("fista")
    with pytest.raises(ValueError, match="solver='ista'"):
        layer(torch.randn(1, 4, 48))
    layer.set_solver("dopri5", steps=2.0)  # fused (vars_ode.fused integrates it), but not in Triton's kernels
    with pytest.raises(ValueError, match="supports solver='ista', got 'dopri5'"):
        layer(torch.randn(1, 4, 48))
    layer.set_solver("dopri5", steps=2.0, solver_options={"integrator": "torchdiffeq"})
    with pytest.raises(ValueError, match="needs the fused path"):
        layer(torch.randn(1, 4, 48))
    qv, W = torch.randn(1, 4, 2, 3, 16), torch.randn(3, 16, 32)
    with pytest.raises(ValueError, match="kernels must be one of"):
        fused_attention_core(qv, W, 0.1, steps=3, kernels="cuda")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fused_attention_core(qv.double(), W.double(), 0.1, steps=3, kernels="triton")
    with pytest.raises(ValueError, match="needs dynamic atoms"):
        fused_attention_core(qv[:, :, 1:], None, 0.1, steps=3, kernels="triton", static=torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"at most 128 atoms .* got head_dim 16 and m \+ m_s = 32 \+ 100 = 132"):
        fused_attention_core(qv, W, 0.1, steps=3, kernels="triton", static=torch.randn(3, 4, 100))
    with pytest.raises(ValueError, match="dropout"):
        fused_attention_core(qv, W, 0.1, steps=3, kernels="triton", dropout=0.1)
    with pytest.raises(ValueError, match="head_dim <= 64 and at most 128 atoms .* got head_dim 16 and m 256"):
        fused_attention_core(qv, torch.randn(3, 16, 256), 0.1, steps=3, kernels="triton")
    with pytest.raises(ValueError, match="got head_dim 128 and m 128"):
        fused_attention_core(torch.randn(1, 4, 2, 1, 128), torch.randn(1, 128, 128), 0.1, steps=3, kernels="triton")


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    # CPU tensors outside the interpreter (any machine, with or without a GPU): a ValueError that says how
    code = ("import torch\nfrom vars_ode.fused import fused_attention_core\n"
            "try:\n    fused_attention_core(torch.randn(1, 4, 2, 3, 16), torch.randn(3, 16, 32), 0.1, steps=3, "
            "kernels='triton')\nexcept ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stderr[-2000:]


@pytest.mark.long
def test_kernels_compile_for_hopper_without_a_gpu():
    # Triton's compiler and ptxas build the six kernels (and the four that differ for static atoms) for sm_90
    # (H100 / H200) on any machine: the dtype and constexpr rules of the compiler, which the interpreter
    # does not apply, and the shared memory a launch needs are checked here
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot.py"
    # (the exit status is 1 when a kernel needs more shared memory than the card has)
    out = subprocess.run([sys.executable, str(script), "--arch", "90", "--low", "bf16,fp32", "--static"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout
    tables = out.stdout.split("\nsm_90, ")[1:]
    assert len(tables) == 4, out.stdout
    for table in tables:
        static = table.split("\n")[0].endswith("static atoms")
        kernels = ["gram", "decode", "gcode", "features_backward"] + ([] if static else ["solve", "solve_backward"])
        for kernel in kernels:
            assert f"| {kernel} | 8 |" in table, out.stdout


@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_lazy_statistics_of_the_kernels(low):
    # stats="lazy": the kernels write no code or step matrix; the replay from what the backward pass keeps
    # (G and F^T v in the product dtype, s, L) gives the statistics the kernels write with stats="eager"
    qv, W, _, _ = problem(5, 2, 40, 2, 16, 32)
    qv = qv.to(DEVICE, low or torch.float32)
    W = W.to(DEVICE, torch.float32)
    kw = dict(steps=3, low_dtype=low, kernels="triton")
    out, u, problem_ = fused_attention_core(qv, W, 0.2, **kw)
    out_lazy, replay = fused_attention_core(qv, W, 0.2, stats="lazy", **kw)
    assert torch.equal(out, out_lazy)
    u2, problem2 = replay()
    assert u2.shape == u.shape and rel(u2, u) < 1e-5
    for a, b in zip(problem2, problem_):
        assert a.shape == b.shape and rel(a, b) < 1e-5
