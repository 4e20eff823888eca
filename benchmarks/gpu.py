"""GPU benchmark of the VARS layers against timm's fused attention (issue targets in the tables).

    python benchmarks/gpu.py --graphs        # on a CUDA machine: correctness first, then the tables
    python benchmarks/gpu.py --device cpu --quick   # the same code path at toy sizes (tested in CI)

1. Correctness: VARS-D, VARS-SD (convolutional templates) and VARS-SD with dense static atoms on the
   device (fp32 forward and gradients with TF32 off, bf16 autocast forward) against the same layer in
   float64 on the CPU; a gradient's bound is 2e-3 or 4x the CPU's own fp32 error for that tensor. A
   batched LASSO (FISTA, float64) on the device against the CPU. The script stops with exit code 1 if
   a check fails, before timing anything (``--time-anyway`` times regardless).
2. Blocks at DeiT-Ti width (dim 192, 3 heads): forward+backward under bf16 autocast, median of
   ``--iters`` CUDA-event timings taken in three rounds with the order rotated, peak memory above the
   inputs; timm's Block (fused SDPA) is the baseline measured in the same process and a block without
   attention gives the rest of the block; B 256 x N 196 and B 4 x N 12544. ``--graphs`` also times the
   blocks captured as CUDA graphs (no launch costs). ``--ab-file F`` adds ``NAME@ab`` blocks that run
   another version of vars_ode/fused.py (an A/B in one process). ``vars_d_triton`` (and
   ``vars_sd_dense_triton`` in the training table) runs the fused node as Triton kernels
   (vars_ode.triton_gram); they have their own correctness check, and a failure there drops only the
   Triton variants from the tables (the exit code is still 1). ``--core`` adds a table
   of the attention cores alone (SDPA, PyTorch node, Triton node; ``--triton-sweep`` for launch
   settings).
3. Training steps of vars_rvt_tiny (B 256, 224 px, AdamW, bf16 autocast): images/s and peak memory
   (model and optimiser state included), attention="self" as the baseline. ``--train-graphs`` adds
   ``NAME+graph`` rows: the whole step (forward, backward, AdamW) captured as one CUDA graph, against
   ``self+graph`` (the eager steps are bound by the host's launches, and vary by 13% between runs).
4. Solvers to a KKT residual of 1e-4 on layer-sized Gram systems (fp32; 192 systems of 128 atoms with
   64 problems each, as VARS-D at B 64), with the Lipschitz constants computed once and timed apart:
   work, milliseconds and host reads (vars_ode.sync) of ISTA, FISTA and the ODE methods through
   torchdiffeq and through vars_ode.solvers.native.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import vars_ode as vo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

#: block variants: name -> VARSLayer options (None: timm's own attention; "identity": no attention at
#: all, the cost of the rest of the block). ``_tf32``: False keeps the fused node's float32 products
#: out of TF32 under autocast (vars_ode.fused.TF32_UNDER_AUTOCAST).
VARIANTS = {
    "timm": None,
    "identity": "identity",
    "vars_d": dict(dictionary="d"),
    "vars_d_generic": dict(dictionary="d", fused=False),
    "vars_d_keep": dict(dictionary="d", recompute=False),  # features kept for the backward
    "vars_d_recompute": dict(dictionary="d", recompute=True),  # features recomputed in the backward
    "vars_d_fp32": dict(dictionary="d", _tf32=False),
    "vars_d_triton": dict(dictionary="d", kernels="triton"),  # the node as six Triton kernels
    "vars_sd": dict(dictionary="sd"),
    # the convolutional templates template by template (vars_ode.dictionaries.BY_TEMPLATE_DEVICES), as on CPUs
    "vars_sd_by_template": dict(dictionary="sd", _by_template=True),
    "vars_sd_dense": dict(dictionary="sd", static="dense"),
    "vars_sd_dense32": dict(dictionary="sd", static="dense", num_static_atoms=32),  # the default is head_dim (64)
    "vars_s": dict(dictionary="s"),  # the layer's default static atoms: convolutional templates
    # the templates as per-channel matrix products (vars_ode.dictionaries.MATRIX_DEVICES, opt-in: the device's type
    # added for the forward)
    "vars_sd_matrices": dict(dictionary="sd", _matrices=True),
    "vars_s_matrices": dict(dictionary="s", _matrices=True),
    "vars_s_dense": dict(dictionary="s", static="dense"),
}
#: the layer's solvers on the card (issue 18's table): name -> (the ISTA-3 variant of the same dictionary, solver
#: options). Each is timed against timm's block and against its own dictionary's ISTA 3; the dictionary's options
#: come from the base variant, so a row differs from its base by the solver alone.
SOLVER_VARIANTS = {
    "vars_d_euler": ("vars_d", dict(solver="euler", steps=3.0)),
    "vars_d_rk4": ("vars_d", dict(solver="rk4", steps=3.0)),
    "vars_d_dopri5": ("vars_d", dict(solver="dopri5", steps=3.0)),
    "vars_d_bosh3": ("vars_d", dict(solver="bosh3", steps=3.0)),
    "vars_d_dopri5_adjoint": ("vars_d", dict(solver="dopri5", steps=3.0, grad="adjoint")),
    # a budget of 6 attempts (37 evaluations; the default loop takes 4-5 over this horizon): no host read, so the
    # block is also captured as a CUDA graph
    "vars_d_dopri5_fixed6": ("vars_d", dict(solver="dopri5", steps=3.0,
                                            solver_options={"options": {"fixed_attempts": 6}})),
    # the same integration and its reverse pass compiled by torch.compile (Inductor: Triton kernels on a card; the
    # first call compiles, before the timing)
    "vars_d_dopri5_fixed6_compiled": ("vars_d", dict(solver="dopri5", steps=3.0, solver_options={
        "options": {"fixed_attempts": 6, "compile": True}})),
    "vars_d_eq": ("vars_d", dict(solver="admm", steps=None, tol=1e-4, grad="implicit")),
    "vars_d_eq_1e-3": ("vars_d", dict(solver="admm", steps=None, tol=1e-3, grad="implicit")),
    "vars_d_fista_eq": ("vars_d", dict(solver="fista", steps=None, tol=1e-4, grad="implicit")),
    "vars_sd_dense_rk4": ("vars_sd_dense", dict(solver="rk4", steps=3.0)),
    "vars_sd_dense_dopri5": ("vars_sd_dense", dict(solver="dopri5", steps=3.0)),
    "vars_sd_dense_dopri5_adjoint": ("vars_sd_dense", dict(solver="dopri5", steps=3.0, grad="adjoint")),
    "vars_sd_dense_dopri5_fixed6": ("vars_sd_dense", dict(solver="dopri5", steps=3.0,
                                                          solver_options={"options": {"fixed_attempts": 6}})),
    "vars_sd_dense_eq": ("vars_sd_dense", dict(solver="admm", steps=None, tol=1e-4, grad="implicit")),
    "vars_sd_dopri5": ("vars_sd", dict(solver="dopri5", steps=3.0)),
    "vars_sd_eq": ("vars_sd", dict(solver="fista", steps=None, tol=1e-4, grad="implicit")),
    "vars_s_dopri5": ("vars_s", dict(solver="dopri5", steps=3.0)),
    "vars_s_dense_dopri5": ("vars_s_dense", dict(solver="dopri5", steps=3.0)),
}
#: the blocks and training variants run when ``--blocks`` / ``--train`` are not given (the solver variants and
#: VARS-S are asked for by name, or all at once with ``--blocks solvers``)
DEFAULT_BLOCKS = tuple(n for n in VARIANTS if not n.startswith("vars_s_") and n not in ("vars_s", "vars_sd_matrices"))
VARIANTS.update({name: dict(VARIANTS[base], **kw) for name, (base, kw) in SOLVER_VARIANTS.items()})
#: ``--blocks solvers``: the solver table (timm's block, the block without attention, each dictionary's ISTA 3, the
#: solver variants but the convolutional VARS-SD's equilibrium, about 100x its ISTA 3: seconds a step on a card)
SOLVER_BLOCKS = ("timm", "identity", *dict.fromkeys(base for base, _ in SOLVER_VARIANTS.values()),
                 *(n for n in SOLVER_VARIANTS if n != "vars_sd_eq"))
TRAIN_VARIANTS = {
    "self": dict(attention="self"),
    "vars_d": dict(attention="vars_d"),
    "vars_d_generic": dict(attention="vars_d", fused=False),
    "vars_d_keep": dict(attention="vars_d", recompute=False),
    "vars_d_recompute": dict(attention="vars_d", recompute=True),
    "vars_d_fp32": dict(attention="vars_d", _tf32=False),
    "vars_d_triton": dict(attention="vars_d", kernels="triton"),
    "vars_sd_dense": dict(attention="vars_sd", static="dense"),
    # vars_rvt_tiny's heads: 64 dynamic + 32 static atoms, within the kernels' 128 (DeiT-Ti's 128 + 64 are not)
    "vars_sd_dense_triton": dict(attention="vars_sd", static="dense", kernels="triton"),
    "vars_sd": dict(attention="vars_sd"),  # the hosts' default VARS-SD (what the README's ImageNet command trains)
    "vars_d_rk4": dict(attention="vars_d", solver="rk4", steps=3.0),
    "vars_d_dopri5": dict(attention="vars_d", solver="dopri5", steps=3.0),
    "vars_d_dopri5_fixed6": dict(attention="vars_d", solver="dopri5", steps=3.0,
                                 solver_options={"options": {"fixed_attempts": 6}}),
    "vars_d_dopri5_fixed6_compiled": dict(attention="vars_d", solver="dopri5", steps=3.0,
                                          solver_options={"options": {"fixed_attempts": 6, "compile": True}}),
    "vars_d_eq": dict(attention="vars_d", solver="admm", steps=None, tol=1e-4, grad="implicit"),
}
DEFAULT_TRAIN = ("self", "vars_d", "vars_d_generic", "vars_d_keep", "vars_d_recompute", "vars_d_fp32", "vars_d_triton",
                 "vars_sd_dense", "vars_sd_dense_triton")


def _tf32_option(opts):
    # (options without the benchmark's own ``_tf32`` key, the vars_ode.fused.TF32_UNDER_AUTOCAST to use)
    if not isinstance(opts, dict):
        return opts, True
    opts = dict(opts)
    return opts, opts.pop("_tf32", True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timings(fn, device, iters, warmup=3):
    """Milliseconds of ``iters`` calls of ``fn`` (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def timed(fn, device, iters, warmup=3):
    return statistics.median(timings(fn, device, iters, warmup))


def rounds_ms(steps, device, iters, rounds=3):
    """Median milliseconds per call of each of ``steps`` (name -> callable), timed in ``rounds`` turns with
    the order rotated and reversed between turns (benchmarks/layer_cpu.py's turn_order), so that a drift
    of the card's clocks, or a variant's place after another, weighs on all alike. ``iters``: calls per
    variant, one number or name -> number."""
    from layer_cpu import turn_order

    if iters == 1:  # the code path only (the tests): one call per variant, no warm-up; its time is not a measurement
        rounds = 1
    if not isinstance(iters, dict):
        iters = dict.fromkeys(steps, iters)
    per = {name: max(1, n // rounds) for name, n in iters.items()}
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name in turn_order(steps, r):
            try:
                warmup = 0 if iters[name] == 1 else (3 if iters[name] > rounds else 1) if r == 0 else 1
                times[name] += timings(steps[name], device, per[name], warmup=warmup)
            except torch.OutOfMemoryError:
                times[name].append(float("nan"))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib(device, fn):
    """Peak memory of one call of ``fn`` above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _rel(a, b):
    return float((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30))


class _full_fp32:
    """No TF32 in cuDNN convolutions or CUDA matrix products inside (PyTorch lets cuDNN use TF32 by
    default): the fp32 checks measure the layer's arithmetic, not the card's reduced-precision mode."""

    def __enter__(self):
        self.before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.before


def _layer_run(layer, x):
    y = layer(x)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *layer.parameters()])
    return y.detach(), dict(zip(names, grads))


def _worst_row(label, grads, ref, bounds):
    # the gradient furthest from its bound relative to it (a NaN first): (label, error, bound)
    ratio = {n: _rel(grads[n].float(), ref[n]) / bounds[n] for n in ref}
    worst = next((n for n, r in ratio.items() if r != r), max(ratio, key=ratio.get))
    return f"{label} (worst: {worst})", _rel(grads[worst].float(), ref[worst]), bounds[worst]


def _layer_rows(name, opts, device, quick, device_opts=None, bf16_gradients=False, fp32_gradient_bound=2e-3):
    """Rows of one layer: fp32 forward and gradients on ``device`` (TF32 off) and its bf16 autocast forward,
    against the layer in float64 on the CPU. The forward's bound is 1e-4 relative to its largest entry and a
    gradient's ``fp32_gradient_bound`` (2e-3), or 4x the error of the same fp32 layer on the CPU where that is larger
    (an adaptive solver or one run to a tolerance may take other steps in float32 than in float64); the float64 run
    on the device within 1e-9 of the reference (the tolerance, for a layer run to one). ``opts`` may name a
    solver (ISTA with 3 steps otherwise). ``device_opts``: options of the
    device's layer only (``kernels="triton"``: the references keep the PyTorch kernels). ``bf16_gradients``:
    also the bf16 autocast gradients, within 1.5x those of the reference layer on the same device, or 5e-2."""
    B, N, C, H = (2, 17, 24, 3) if quick else (8, 197, 192, 3)

    def layer(**extra):
        return vo.VARSLayer(C, H, qkv_bias=True, **{"solver": "ista", "steps": 3, **opts, **extra})

    ref = layer().double()
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    y_ref, g_ref = _layer_run(ref, x)
    cpu, dev = layer(), layer(**(device_opts or {}))  # fp32 on the CPU, fp32 on the device
    for lay in (cpu, dev):
        lay.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    y_cpu, g_cpu = _layer_run(cpu, x.detach().float().requires_grad_())
    dev = dev.to(device)
    xd = x.detach().float().to(device).requires_grad_()
    with _full_fp32():
        y32, g32 = _layer_run(dev, xd)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if bf16_gradients:
            y16, g16 = _layer_run(dev, xd)
            _, g16_ref = _layer_run(cpu.to(device), xd)
        else:
            y16 = dev(xd)
    if not device_opts:
        # float64 on the device: the same arithmetic as the reference, so the same result to rounding, also where
        # fp32 gradients are at the mercy of rounding (a slope of the soft threshold that rounding flips from 0 to 1
        # in one of many stages changes a gradient by 1e-3 and more while the output agrees to 1e-7)
        y64, g64 = _layer_run(ref.to(device), x.detach().to(device).requires_grad_())
        ref.cpu()
        err64 = max([_rel(y64, y_ref)] + [_rel(g64[n], g_ref[n]) for n in g_ref])
    rows = [(f"{name} layer fp32 forward", _rel(y32, y_ref), max(1e-4, 4 * _rel(y_cpu, y_ref))),
            _worst_row(f"{name} layer fp32 gradients", g32, g_ref,
                       {n: max(fp32_gradient_bound, 4 * _rel(g_cpu[n], g_ref[n])) for n in g_ref}),
            (f"{name} layer bf16 autocast forward", _rel(y16.detach().float(), y_ref), 5e-2)]
    if bf16_gradients:
        rows.append(_worst_row(f"{name} layer bf16 autocast gradients", g16, g_ref,
                               {n: max(5e-2, 1.5 * _rel(g16_ref[n].float(), g_ref[n])) for n in g_ref}))
    if not device_opts:
        # run to a tolerance, the two float64 solves may stop after different iterations (a residual check on
        # either side of tol): both within tol of the equilibrium, so within about tol of each other (the ADMM
        # equilibrium layer on an H200: 5.9e-9 at tol 1e-4)
        tol64 = opts["tol"] if "steps" in opts and opts["steps"] is None else 0.0
        rows.append((f"{name} layer float64 forward and gradients (the largest)", err64, max(1e-9, tol64)))
    return rows


def _report(rows, title="check"):
    # prints the rows as a table; True when every error is within its bound (a NaN fails)
    print(f"| {title} | max relative error | bound | ok |\n|---|---|---|---|")
    ok = True
    for name, err, bound in rows:
        good = err <= bound
        ok &= good
        print(f"| {name} | {err:.2e} | {bound:.2g} | {'yes' if good else 'NO'} |")
    return ok


def check_correctness(device, quick):
    """fp32 forward and gradients on ``device`` against float64 on the CPU (see _layer_rows): some
    gradients cancel (VARS-SD's convolution kernels at B 8 x N 197: 3.1e-3 in fp32 on the CPU), and what
    is checked is that the device computes what fp32 can. Then a batched LASSO in float64."""
    rows = []
    torch.manual_seed(0)
    image = 4 if quick else 14
    for name, opts in (("VARS-D", dict(dictionary="d")), ("VARS-SD", dict(dictionary="sd")),
                       ("VARS-SD dense", dict(dictionary="sd", static="dense", image_size=image))):
        rows += _layer_rows(name, opts, device, quick)
    P = torch.randn(64, 48, dtype=torch.float64) / 8
    X = torch.randn(32 if quick else 512, 64, dtype=torch.float64)
    cpu = vo.solve(P, X, 0.1, "fista", tol=1e-10).code
    gpu = vo.solve(P.to(device), X.to(device), 0.1, "fista", tol=1e-10).code.cpu()
    rows.append(("LASSO fista float64 (max abs difference)", (gpu - cpu).abs().max().item(), 1e-8))
    return _report(rows), rows


def check_solver_layers(device, quick, variants):
    """The solver variants among ``variants`` (SOLVER_VARIANTS), each as a layer on ``device`` against the
    same layer in float64 on the CPU (_layer_rows: fp32 forward and gradients, bf16 autocast forward, float64).
    Their fp32 gradients are bounded by 5e-2 (or 4x the CPU's fp32 error): over tens of evaluations, rounding moves
    a soft-threshold slope from 0 to 1 here and there, which changes a gradient discretely while the output agrees
    to 1e-7 (VARS-D dopri5 on an H200: 1.7e-2 in one run, 4e-5 in the next; the fused and the generic fp32 layers on
    one CPU differ by up to 2e-3); the float64 row checks the device's arithmetic to 1e-9. Returns (ok, rows) and
    prints the rows; ``(True, [])`` when none is asked for."""
    names = [n for n in variants if n in SOLVER_VARIANTS]
    if not names:
        return True, []
    torch.manual_seed(0)
    rows = []
    for name in names:
        opts = dict(VARIANTS[name])
        if opts.get("static") == "dense" and quick:
            opts["image_size"] = 4
        rows += _layer_rows(name, opts, device, quick, fp32_gradient_bound=5e-2)
    return _report(rows, "check (solvers in the layer)"), rows


def is_triton(name):
    opts = VARIANTS.get(name.removesuffix("+compile").partition("@")[0], TRAIN_VARIANTS.get(name))
    return isinstance(opts, dict) and opts.get("kernels") == "triton"


def check_triton(device, quick):
    """The VARS-D and dense VARS-SD layers with ``kernels="triton"`` on ``device`` against the same layers
    with the PyTorch kernels (_layer_rows; bf16 gradients too: the first run of the kernels' bf16
    tensor-core products, which the interpreter does not have). VARS-SD with 64 dynamic and 64 static
    atoms per head (``rand_feat_dim_ratio=1``): the kernels take at most 128. A kernel that fails to
    compile or run fails its row. Returns (ok, rows) and prints the rows."""
    from vars_ode import triton_gram

    torch.manual_seed(0)
    layers = (("VARS-D triton", dict(dictionary="d")),
              ("VARS-SD dense triton", dict(dictionary="sd", static="dense", image_size=4 if quick else 14,
                                            rand_feat_dim_ratio=1)))
    rows = []
    for name, opts in layers:
        if not triton_gram.available(device):
            rows.append((f"{name}: no Triton for {device.type} tensors here (TRITON_INTERPRET=1 on CPUs)",
                         float("nan"), 0.0))
            continue
        try:
            rows += _layer_rows(name, opts, device, quick, device_opts=dict(kernels="triton"), bf16_gradients=True)
        except Exception as exc:  # a kernel that does not compile or run on this device fails its check
            rows.append((f"{name}: {type(exc).__name__}: {str(exc)[:300]}", float("nan"), 0.0))
    return _report(rows, "check (Triton kernels)"), rows


def triton_kernel_report():
    """Registers, spilled bytes and shared memory of every Triton kernel of vars_ode.triton_gram compiled
    in this process (as the card's driver loaded them), one line each; [] without compiled kernels."""
    from vars_ode import triton_gram

    lines = []
    for name in dir(triton_gram):
        fn = getattr(triton_gram, name)
        try:
            for caches in getattr(fn, "device_caches", {}).values():
                for kernel in caches[0].values():
                    kernel = kernel.result() if hasattr(kernel, "result") else kernel
                    meta = kernel.metadata
                    lines.append(f"{name}: {meta.num_warps} warps, {kernel.n_regs} registers, "
                                 f"{kernel.n_spills} spilled, {meta.shared} B shared")
        except Exception as exc:  # a diagnostic: Triton versions differ in these attributes
            lines.append(f"{name}: {type(exc).__name__}: {exc}")
    if lines:
        print("\nTriton kernels compiled here:\n" + "\n".join(sorted(set(lines))))
    return lines


def block_step(block, x, amp, cache=True, tf32=True):
    def step():
        vo.fused.TF32_UNDER_AUTOCAST = tf32
        with torch.autocast(x.device.type, dtype=amp, cache_enabled=cache):
            out = block(x)
        out.float().sum().backward()
    return step


class _DeviceIn(torch.nn.Module):
    # a block run with its device's type in one of vars_ode.dictionaries' device sets (BY_TEMPLATE_DEVICES: the
    # convolutional templates template by template; MATRIX_DEVICES: as per-channel matrix products). The choice is
    # made in the forward pass, which records the autograd functions that the backward pass then runs
    def __init__(self, block, setting):
        super().__init__()
        self.block, self.setting = block, setting

    def forward(self, x):
        devices = getattr(vo.dictionaries, self.setting)
        added = x.device.type not in devices
        devices.add(x.device.type)
        try:
            return self.block(x)
        finally:
            if added:
                devices.discard(x.device.type)


class _NoAttention(torch.nn.Module):
    # the identity in the attention's place (timm's Block passes attn_mask / is_causal keywords)
    def forward(self, x, *args, **kwargs):
        return x


#: the other version of vars_ode/fused.py for the ``@ab`` variants (``--ab-file``), or None
OTHER_CORE = None
#: torch.compile's backend for the ``+compile`` variants (``--compile-backend``)
COMPILE_BACKEND = "inductor"


def variant(name, table=None):
    """(options, tf32, other) of a variant name; ``name@ab`` runs the fused node of ``--ab-file``;
    ``name+compile`` is the block through ``torch.compile(fullgraph=True)`` (see make_block)."""
    base, _, tag = name.removesuffix("+compile").partition("@")
    opts, tf32 = _tf32_option((VARIANTS if table is None else table)[base])
    return opts, tf32, tag == "ab"


def make_block(dim, heads, name, device):
    """timm's Block with its own attention ("timm"), none ("identity") or a VARSLayer; older timm without
    the ``attn_layer`` argument gets the layer swapped in after construction. ``+compile``: the block
    through ``torch.compile(fullgraph=True)`` (compiled at its first call, in the warm-up)."""
    if name.endswith("+compile"):
        return torch.compile(make_block(dim, heads, name.removesuffix("+compile"), device), fullgraph=True,
                             backend=COMPILE_BACKEND)
    opts, _, other = variant(name)
    if opts is None or opts == "identity":
        block = Block(dim, heads, qkv_bias=True)
        if opts == "identity":
            block.attn = _NoAttention()
        return block.to(device)
    opts = dict(opts)
    if opts.pop("_by_template", False):
        return _DeviceIn(make_block(dim, heads, "vars_sd", device), "BY_TEMPLATE_DEVICES")
    if opts.pop("_matrices", False):
        return _DeviceIn(make_block(dim, heads, "vars_" + opts["dictionary"], device), "MATRIX_DEVICES")
    cls = vo.VARSLayer.configure(**opts)
    if other:
        from ab_fused import with_core

        cls = with_core(cls, OTHER_CORE)
    try:
        block = Block(dim, heads, qkv_bias=True, attn_layer=cls)
    except TypeError:
        block = Block(dim, heads, qkv_bias=True)
        block.attn = cls(dim, num_heads=heads, qkv_bias=True)
    return block.to(device)


#: a block step slower than this (seconds) is timed 3 times instead of ``--iters``
SLOW_S = 0.25
GRAPHED = ("timm", "identity", "vars_d", "vars_d_keep", "vars_d_recompute", "vars_d_fp32", "vars_d_triton",
           "vars_sd_dense")


def graphed_ms(block, x, iters, tf32=True):
    """Forward+backward of a block captured as CUDA graphs (launch costs removed), or NaN if capture fails.
    Captured and replayed under bf16 autocast (its weight cache off, as graph capture requires)."""
    try:
        vo.fused.TF32_UNDER_AUTOCAST = tf32  # fixed at capture
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            g = torch.cuda.make_graphed_callables(block, (x,))
        ms = timed(block_step(g, x, torch.bfloat16, cache=False, tf32=tf32), x.device, iters)
        del g
        return ms
    except Exception as exc:  # capture is a diagnostic: report, do not stop the benchmark
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        return float("nan")
    finally:
        vo.fused.TF32_UNDER_AUTOCAST = True
        gc.collect()
        if x.is_cuda:
            torch.cuda.empty_cache()


def block_table(device, quick, iters, variants, graphs=False, shapes=None, progress=None):
    """Blocks of each variant at each ``(B, N)`` of ``shapes`` (the default: B 256 x N 196 and B 4 x N 12544; toy
    sizes with ``quick``). Each variant's second call is printed when it is made (its time and host reads), each
    shape's table when it is measured, and ``progress(results)`` is called after each shape: a run stopped by a
    time limit keeps what it measured."""
    dim, heads = 192, 3
    shapes = ([(2, 16), (1, 64)] if quick else [(256, 196), (4, 12544)]) if shapes is None else shapes
    results = []
    for B, N in shapes:
        x = torch.randn(B, N, dim, device=device, requires_grad=True)
        row = {"B": B, "N": N}
        blocks, steps, calls = {}, {}, {}
        for name in variants:  # a variant that fails on this device is left out (timm's is the baseline)
            try:
                blocks[name] = make_block(dim, heads, name, device)
                steps[name] = block_step(blocks[name], x, torch.bfloat16, tf32=variant(name)[1])
                steps[name]()
                # the second call: host reads of a forward+backward, and the calls to time (3 for a slow one)
                sync(device)
                t0 = time.perf_counter()
                with vo.count_host_syncs() as reads:
                    steps[name]()
                sync(device)
                row[name + "_reads"] = reads.count
                seconds = time.perf_counter() - t0
                calls[name] = iters if seconds < SLOW_S else min(iters, 3)
                print(f"block {name}, B {B} x N {N}: second call {seconds * 1e3:.1f} ms, {reads.count} host reads",
                      flush=True)
            except Exception as exc:
                if name == "timm":
                    raise
                print(f"block variant {name}, B {B} x N {N}: left out, {type(exc).__name__}: {str(exc)[:200]}")
                blocks.pop(name, None)
                steps.pop(name, None)
        ms = rounds_ms(steps, device, calls if iters > 1 else iters)
        for name in variants:
            if name not in steps:
                row[name] = (float("nan"), float("nan"))
                continue
            try:
                mib = peak_mib(device, steps[name])
            except torch.OutOfMemoryError:
                mib = float("nan")
            row[name] = (ms[name], mib)
        vo.fused.TF32_UNDER_AUTOCAST = True
        ran = set(steps)
        del blocks, steps
        if graphs and device.type == "cuda":
            for name in variants:
                # the solver variants that read nothing back to the host in a step can be captured
                capturable = name in SOLVER_VARIANTS and row.get(name + "_reads") == 0
                if (name.partition("@")[0] in GRAPHED or capturable) and name in ran:
                    row[name + "_graphed"] = graphed_ms(make_block(dim, heads, name, device),
                                                        x.detach().clone().requires_grad_(), iters, variant(name)[1])
        results.append(row)
        _print_blocks(row, variants)
        if progress is not None:
            progress(results)
    print("targets: N 196: VARS-D <= 1.25x, VARS-SD <= 1.5x; N 12544: VARS-D >= 2x faster than timm (<= 0.5x); "
          "against ISTA 3 (issue 18, CPU): euler <= 1.5x, rk4 <= 2.5x, dopri5 <= 3x, dopri5 adjoint <= 6x, "
          "equilibrium <= 5x")
    return results


def _print_blocks(r, variants):
    # one shape's table of block_table
    nan = float("nan")
    t, rest = r["timm"], r.get("identity")
    gt = r.get("timm_graphed", nan)
    print(f"\n| block, B {r['B']} x N {r['N']}, bf16 fwd+bwd | ms (/ timm) | CUDA graph ms (/ timm) | "
          "attention alone ms (/ timm) | peak MiB above inputs (/ timm) | host reads | "
          "/ own ISTA 3: block, graph, attention alone |\n|---|---|---|---|---|---|---|")
    for n in variants:
        ms, mib = r[n]
        g = r.get(n + "_graphed", nan)
        attn = ms - rest[0] if rest else nan
        tattn = t[0] - rest[0] if rest else nan
        base = SOLVER_VARIANTS.get(n, (None,))[0]
        if base in r:
            bms, bg = r[base][0], r.get(base + "_graphed", nan)
            battn = bms - rest[0] if rest else nan
            own = f"{ms / bms:.2f}x, {g / bg:.2f}x, {attn / battn:.2f}x"
        else:
            own = ""
        print(f"| {n} | {ms:.2f} ({ms / t[0]:.2f}x) | {g:.2f} ({g / gt:.2f}x) | {attn:.2f} ({attn / tattn:.2f}x) "
              f"| {mib:.0f} ({mib / t[1]:.2f}x) | {r.get(n + '_reads', '')} | {own} |", flush=True)


def profile_block(device, quick, name="vars_d", top=25, path=None):
    """Kernel launches and the most expensive kernels of one forward+backward of a block."""
    from torch.profiler import ProfilerActivity, profile

    B, N = (2, 16) if quick else (256, 196)
    block = make_block(192, 3, name, device)
    x = torch.randn(B, N, 192, device=device, requires_grad=True)
    step = block_step(block, x, torch.bfloat16)
    for _ in range(3):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                      row_limit=top)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    summary = f"{name}: {len(kernels)} device kernels in one forward+backward (B {B}, N {N})"
    if path:
        with open(path, "a") as fh:
            fh.write(summary + "\n" + table + "\n")
    print("\n" + summary)
    return len(kernels)


def core_table(device, quick, iters, sweep=""):
    """Forward+backward of the attention cores alone under bf16 (no projections or norms): SDPA on q, k, v;
    vars_ode.fused_attention_core with the PyTorch kernels and with the Triton kernels. DeiT-Ti heads
    (3 x 64, m 128) at both block shapes, the Triton kernels also at the launch settings of ``sweep``
    ("block_n/warps_tokens/warps_solve", comma-separated); vars_rvt_tiny's heads (6 x 32, m 64, and 32
    static atoms more for VARS-SD dense, with their gradient) at the training shape. Eager CUDA-event
    timings, rounds with the order rotated."""
    from vars_ode import triton_gram
    from vars_ode.fused import fused_attention_core

    settings = [None] + [tuple(int(v) for v in spec.split("/")) for spec in sweep.split(",") if spec]
    small = [(2, 16)] if quick else None
    configs = [("DeiT-Ti VARS-D heads", 3, 64, 128, 0, small or [(256, 196), (4, 12544)], settings),
               ("vars_rvt_tiny VARS-D heads", 6, 32, 64, 0, small or [(256, 196)], [None]),
               ("vars_rvt_tiny VARS-SD dense heads", 6, 32, 64, 32, small or [(256, 196)], [None])]
    results = []
    for label, h, dh, m, ms, shapes, config_settings in configs:
        W = torch.randn(h, dh, m, device=device)
        for B, N in shapes:
            qkv = torch.randn(B, h, N, 3, dh, device=device, dtype=torch.bfloat16)
            qv = torch.randn(B, N, 2, h, dh, device=device, dtype=torch.bfloat16, requires_grad=True)
            S = torch.randn(h, N, ms, device=device, requires_grad=True) if ms else None

            def sdpa(qkv=qkv):
                q, k, v = qkv.detach().requires_grad_().unbind(-2)
                F.scaled_dot_product_attention(q, k, v).float().sum().backward()

            def node(kernels, setting, qv=qv, W=W, S=S):
                def run():
                    if setting:
                        triton_gram.CONFIG.update(zip(("block_n", "warps_tokens", "warps_solve"), setting))
                    try:
                        out = fused_attention_core(qv, W, 0.15, static=S, steps=3, low_dtype=torch.bfloat16,
                                                   kernels=kernels, stats="lazy")[0]  # as the layer calls it
                        out.float().sum().backward()
                    finally:
                        triton_gram.CONFIG.update(block_n=None, warps_tokens=None, warps_solve=None)
                return run

            steps = {"sdpa": sdpa, "torch node": node("torch", None)}
            if triton_gram.available(device):
                for setting in config_settings:
                    run = node("triton", setting)
                    name = "triton node" + (" %d/%d/%d" % setting if setting else "")
                    try:  # a launch setting the card cannot run (shared memory, registers) is left out, said why
                        run()
                    except Exception as exc:
                        print(f"{label}, {name}: left out, {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    steps[name] = run
            times = rounds_ms(steps, device, iters)
            results.append({"heads": label, "B": B, "N": N, **times})
            print(f"\n| attention core alone, {label}, B {B} x N {N}, bf16 fwd+bwd | ms | / SDPA |\n|---|---|---|")
            for name, t in times.items():
                print(f"| {name} | {t:.3f} | {t / times['sdpa']:.2f}x |")
    return results


def train_step(model, opt, images, labels, cache=True):
    # ``cache``: autocast's weight cache (off for CUDA graph capture)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, cache_enabled=cache):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    return step


def graphed_train_step(model, images, labels, capture=True, warmup=3):
    """A whole training step (bf16 autocast forward, backward, AdamW) captured as one CUDA graph: returns the
    graph's replay, which runs the step on the same ``images`` and ``labels`` with no launch from the host.
    The optimiser is capturable (its step count on the device); the warm-up steps run on a side stream, as
    capture requires. ``capture=False`` (any device) returns the same step uncaptured, after the warm-up."""
    cuda = images.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=cuda)
    eager = train_step(model, opt, images, labels, cache=False)
    side = torch.cuda.Stream() if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
        for _ in range(warmup):
            eager()
    if not (cuda and capture):
        return eager
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the gradients, None at the capture's start, are written afresh at every replay
        eager()

    def replay(model=model, opt=opt):
        # the graph holds addresses, not tensors: the model's parameters and the optimiser's state must outlive
        # it (a replay after they were freed wrote into released memory: an illegal memory access on an H200)
        graph.replay()
    return replay


def _train_batch(device, quick):
    B, size = (4, 32) if quick else (256, 224)
    return B, size, torch.randn(B, 3, size, size, device=device), torch.randint(0, 1000, (B,), device=device)


def training_table(device, quick, iters, variants):
    """Images/s (median over rounds with the order rotated) and peak memory of a whole training step,
    model and optimiser state included (each variant measured alone)."""
    import timm
    B, size, images, labels = _train_batch(device, quick)

    def build(name):
        kw, tf32, _ = variant(name, TRAIN_VARIANTS)
        # --quick: two blocks and one (the full model is 10 and 2): the same code path at a toy cost
        shallow = {"depth": (2, 1)} if quick else {}
        model = timm.create_model("vars_rvt_tiny", num_classes=1000, img_size=size, **shallow, **kw).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = train_step(model, opt, images, labels)

        def run():
            vo.fused.TF32_UNDER_AUTOCAST = tf32
            try:
                step()
            finally:
                vo.fused.TF32_UNDER_AUTOCAST = True
        return run

    mem = {}
    for name in variants:  # peak memory, each alone: from before the model is built
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        try:
            run = build(name)
            run()
            if device.type != "cuda":  # one step finds a variant that fails; there is no memory to read
                mem[name] = float("nan")
                continue
            run()  # the optimiser's state exists from the first step on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except torch.OutOfMemoryError:
            mem[name] = float("nan")
        except Exception as exc:  # a variant that fails on this device is left out, not the table
            if name == "self":
                raise
            print(f"training variant {name}: left out, {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            run = None
    variants = [name for name in variants if name in mem]
    runs = {name: build(name) for name in variants}
    ms = rounds_ms(runs, device, iters)
    out = {name: (B / ms[name] * 1e3, mem[name]) for name in variants}
    del runs
    s = out["self"]
    print(f"\n| vars_rvt_tiny train step, B {B}, {size} px | images/s (ratio) | peak MiB (ratio) |\n|---|---|---|")
    for name, (ips, mib) in out.items():
        print(f"| {name} | {ips:.0f} ({ips / s[0]:.2f}x) | {mib:.0f} ({mib / s[1]:.2f}x) |")
    print("targets: VARS-D >= 0.9x the images/s of self, <= 1.1x its peak memory")
    return out


def graph_training_table(device, quick, iters, variants):
    """Images/s of whole training steps captured as CUDA graphs (``NAME+graph``), where the host's launches,
    which bound the eager steps, cost nothing; ratios against ``self+graph``. CUDA only; run last, so
    that a capture that fails cannot touch the sections before it."""
    import timm
    if device.type != "cuda":
        print("CUDA graphs need a CUDA device: no +graph rows")
        return {}
    B, size, images, labels = _train_batch(device, quick)
    gc.collect()
    torch.cuda.empty_cache()
    captured = {}
    for name in ["self"] + [v for v in variants if v != "self"]:
        kw, tf32, _ = variant(name, TRAIN_VARIANTS)
        try:
            vo.fused.TF32_UNDER_AUTOCAST = tf32  # fixed at capture
            model = timm.create_model("vars_rvt_tiny", num_classes=1000, img_size=size,
                                      **({"depth": (2, 1)} if quick else {}), **kw).to(device)
            captured[name + "+graph"] = graphed_train_step(model, images, labels)
        except Exception as exc:  # a variant that cannot be captured is left out, not the table
            print(f"training variant {name}+graph: left out, {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            vo.fused.TF32_UNDER_AUTOCAST = True
    ms = rounds_ms(captured, device, iters)
    out = {name: B / ms[name] * 1e3 for name in captured}
    del captured
    gc.collect()
    torch.cuda.empty_cache()
    ref = out.get("self+graph", float("nan"))
    print(f"\n| vars_rvt_tiny train step as a CUDA graph, B {B}, {size} px | images/s (ratio) |\n|---|---|")
    for name, ips in out.items():
        print(f"| {name} | {ips:.0f} ({ips / ref:.2f}x) |")
    return out


ODE_SOLVERS = ("ista", "fista", "rk4@torchdiffeq", "rk4@native", "bosh3@torchdiffeq", "bosh3@native",
               "dopri5@torchdiffeq", "dopri5@native")


def ode_table(device, quick, tol=1e-4, max_evals=20_000):
    """Solvers to a KKT residual on Gram systems shaped like VARS-D's (fp32)."""
    systems, tokens, m, k = (2, 24, 8, 4) if quick else (192, 196, 128, 64)
    if quick:  # the code path only
        tol, max_evals = 1e-2, 2_000
    g = torch.Generator().manual_seed(0)
    P = torch.randn(systems, tokens, m, generator=g) / tokens**0.5
    V = torch.randn(systems, tokens, k, generator=g)
    K, B = (P.transpose(-1, -2) @ P).to(device), (P.transpose(-1, -2) @ V).to(device)
    # the Lipschitz constants once, timed apart: every solver gets the same L (the solve's default,
    # eigvalsh), so that the rows time the solvers alone
    lip = {}
    for method in ("eigvalsh", "power"):
        lip[method] = (vo.lipschitz_constant(K, method), timed(lambda method=method: vo.lipschitz_constant(K, method), device, 3, 1))
    L = lip["eigvalsh"][0]
    print(f"\nL of {systems} Gram systems {m}x{m}: eigvalsh {lip['eigvalsh'][1]:.1f} ms, 50 power steps "
          f"{lip['power'][1]:.1f} ms (largest relative gap {float(((lip['power'][0] - L) / L).abs().max()):.1e})")
    rows = {}
    for spec in ODE_SOLVERS:
        name, _, integrator = spec.partition("@")
        kw = dict(max_iter=max_evals, **({"integrator": integrator} if integrator else {}))

        def run():
            return vo.solve_gram(K, B, 0.1, name, tol=tol, L=L, **kw)

        sol = run()
        ms = timed(run, device, 1, warmup=0)
        with vo.count_host_syncs() as reads:
            run()
        st = sol.stats
        rows[spec] = dict(work=int(st.iterations.max()), unit=st.unit, converged=float(st.converged.float().mean()),
                          residual=float(st.residual.max()), ms=ms, reads=reads.count)
    rows["lipschitz_ms"] = {method: v[1] for method, v in lip.items()}
    f = rows["fista"]["ms"]
    print(f"\n| solver ({systems} Gram systems {m}x{m}, {k} problems each, fp32, tol {tol:g}, L given) | work | unit | "
          "converged | ms (/ FISTA) | host reads |\n|---|---|---|---|---|---|")
    for spec, r in rows.items():
        if spec == "lipschitz_ms":
            continue
        print(f"| {spec} | {r['work']} | {r['unit']} | {r['converged']:.3f} | {r['ms']:.1f} ({r['ms'] / f:.1f}x) | {r['reads']} |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the CPU test path)")
    ap.add_argument("--iters", type=int, default=20,
                    help="timed calls per variant (1: the code path only, as the tests run it: one call, no warm-up)")
    ap.add_argument("--blocks", default=",".join(DEFAULT_BLOCKS),
                    help=f"block variants, from {list(VARIANTS)}; 'solvers' adds the solver table's {list(SOLVER_BLOCKS)}")
    ap.add_argument("--train", default=",".join(DEFAULT_TRAIN), help=f"training variants, from {list(TRAIN_VARIANTS)}")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--train-graphs", nargs="?", const="self,vars_d,vars_d_triton,vars_sd_dense_triton", default="",
                    help="also time these training variants as whole steps captured in CUDA graphs (NAME+graph; "
                         "default self,vars_d,vars_d_triton,vars_sd_dense_triton; about 10 s each)")
    ap.add_argument("--skip-ode", action="store_true", help="skip the solver table (section 4)")
    ap.add_argument("--profile", help="append a kernel profile of the VARS-D block to this file")
    ap.add_argument("--graphs", action="store_true", help="also time timm, VARS-D and VARS-SD dense blocks as CUDA graphs")
    ap.add_argument("--time-anyway", action="store_true", help="time even if a correctness check fails")
    ap.add_argument("--checks-only", action="store_true", help="the correctness checks of the asked blocks, no timing")
    ap.add_argument("--shapes", default="256x196,4x12544", help="the blocks' B x N, comma-separated (not with --quick)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--ab-file", help="another version of vars_ode/fused.py: adds NAME@ab block variants that "
                                      "run it (A/B in one process, as benchmarks/ab_fused.py on the CPU)")
    ap.add_argument("--ab-variants", default="vars_d,vars_sd_dense", help="the block variants run with --ab-file")
    ap.add_argument("--compile", nargs="?", const="timm,vars_d,vars_sd_dense", default="",
                    help="also time these block variants through torch.compile(fullgraph=True) (NAME+compile; "
                         "default timm,vars_d,vars_sd_dense; about a minute of compilation each)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend for the +compile variants (aot_eager: the same graph capture "
                         "without code generation, seconds instead of a minute on a CPU)")
    ap.add_argument("--core", action="store_true",
                    help="also time the attention cores alone (SDPA, the PyTorch node, the Triton node), bf16")
    ap.add_argument("--triton-sweep", default="",
                    help="with --core: Triton launch settings to time, as block_n/warps_tokens/warps_solve "
                         "separated by commas (e.g. 64/4/8,32/4/8,128/8/16)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise SystemExit(f"--compile-backend: unknown backend {args.compile_backend!r}; choose from "
                         f"{torch._dynamo.list_backends(exclude_tags=())}")
    global COMPILE_BACKEND
    COMPILE_BACKEND = args.compile_backend
    named = [b for part in args.blocks.split(",") for b in (SOLVER_BLOCKS if part == "solvers" else [part])]
    blocks = ["timm"] + [b for b in dict.fromkeys(named) if b and b != "timm"]
    train = ["self"] + [t for t in args.train.split(",") if t and t != "self"]
    for b in blocks:
        if b not in VARIANTS:
            raise SystemExit(f"--blocks: unknown variant {b!r}; choose from {list(VARIANTS)}")
    for b in filter(None, args.compile.split(",")):
        if b not in VARIANTS:
            raise SystemExit(f"--compile: unknown variant {b!r}; choose from {list(VARIANTS)}")
        blocks.append(b + "+compile")
    if args.ab_file:
        from ab_fused import load_other, other_core

        global OTHER_CORE
        OTHER_CORE = other_core(load_other(None, args.ab_file))
        for b in args.ab_variants.split(","):
            if b not in VARIANTS or VARIANTS[b] in (None, "identity"):
                raise SystemExit(f"--ab-variants: {b!r} is not a VARS block variant of {list(VARIANTS)}")
            blocks.append(b + "@ab")
    for t in train + [t for t in args.train_graphs.split(",") if t]:
        if t not in TRAIN_VARIANTS:
            raise SystemExit(f"--train / --train-graphs: unknown variant {t!r}; choose from {list(TRAIN_VARIANTS)}")
    try:
        shapes = None if args.quick else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if shapes is not None and not all(len(t) == 2 and min(t) > 0 for t in shapes):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--shapes: expected B x N pairs such as 256x196,4x12544, got {args.shapes!r}")
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import timm
    print(f"device: {name}; torch {torch.__version__}; timm {timm.__version__}\n")
    ok, checks = check_correctness(device, args.quick)
    ok_solvers, rows = check_solver_layers(device, args.quick, blocks)
    ok, checks = ok and ok_solvers, checks + rows
    if not ok and not args.time_anyway:
        print("correctness check failed: no timings", file=sys.stderr)
        return 1
    from vars_ode import triton_gram

    if triton_gram.interpreting() and device.type != "cuda" and not args.skip_training:
        # a training step of the whole model in Triton's interpreter takes minutes: the blocks table and
        # the tests cover that code path
        print("Triton's interpreter: the Triton variants are left out of the training table")
        train = [t for t in train if not is_triton(t)]
    if any(is_triton(n) for n in blocks + train):
        ok_triton, rows = check_triton(device, args.quick)
        checks += rows
        if not ok_triton and not args.time_anyway:
            # the Triton variants alone are not timed; the rest is, and the exit code says it failed
            print("Triton kernels: check failed, their variants are not timed", file=sys.stderr)
            ok = False
            blocks = [b for b in blocks if not is_triton(b)]
            train = [t for t in train if not is_triton(t)]
    results = {"device": name, "torch": torch.__version__, "checks": checks}
    if args.checks_only:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=str)
        return 0 if ok else 1

    def record(key, value):
        # the JSON is rewritten after every section: a run stopped by a time limit keeps what it measured
        results[key] = value
        results["seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=str)

    record("blocks", block_table(device, args.quick, args.iters, blocks, graphs=args.graphs, shapes=shapes,
                                 progress=lambda done: record("blocks", done)))
    if args.profile:
        record("kernels", {name: profile_block(device, args.quick, name=name, path=args.profile)
                           for name in ("vars_d", "vars_d_triton") if name in blocks})
    if args.core:
        record("core", core_table(device, args.quick, args.iters, args.triton_sweep))
    if device.type == "cuda":
        record("triton_kernels", triton_kernel_report())
    if not args.skip_training:
        record("train", training_table(device, args.quick, args.iters, train))
    if not args.skip_ode:
        record("ode", ode_table(device, args.quick))
    graph_variants = [t for t in args.train_graphs.split(",") if t]
    if graph_variants and triton_gram.interpreting() and device.type != "cuda":
        graph_variants = [t for t in graph_variants if not is_triton(t)]
    if graph_variants:
        record("train_graphs", graph_training_table(device, args.quick, args.iters, graph_variants))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
