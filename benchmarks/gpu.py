"""GPU benchmark of the VARS layers against timm's fused attention (issue targets in the tables).

    python benchmarks/gpu.py                 # on a CUDA machine: correctness first, then the tables
    python benchmarks/gpu.py --device cpu --quick   # the same code path at toy sizes (tested in CI)

1. Correctness: VARS-D, VARS-SD (convolutional templates) and VARS-SD with dense static atoms on the
   device (fp32 forward and gradients, bf16 autocast forward) against the same layer in float64 on the
   CPU; a batched LASSO (FISTA, float64) on the device against the CPU. The script stops with exit
   code 1 if a check fails, before timing anything (``--time-anyway`` times regardless).
2. Blocks at DeiT-Ti width (dim 192, 3 heads): forward+backward under bf16 autocast, median of
   ``--iters`` CUDA-event timings, peak memory; timm's Block (fused SDPA) is the baseline measured in
   the same process; B 256 x N 196 and B 4 x N 12544. VARS-D is timed on its fused path and on the
   generic one (``fused=False``, the previous implementation).
3. Training steps of vars_rvt_tiny (B 256, 224 px, AdamW, bf16 autocast): images/s and peak memory,
   attention="self" as the baseline.
4. Solvers to a KKT residual of 1e-4 on layer-sized Gram systems (fp32; 192 systems of 128 atoms with
   64 problems each, as VARS-D at B 64): work, milliseconds and host reads (vars_ode.sync) of ISTA,
   FISTA and the ODE methods through torchdiffeq and through vars_ode.solvers.native.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import vars_ode as vo

#: block variants: name -> VARSLayer options (None: timm's own attention)
VARIANTS = {
    "timm": None,
    "vars_d": dict(dictionary="d"),
    "vars_d_generic": dict(dictionary="d", fused=False),
    "vars_sd": dict(dictionary="sd"),
    "vars_sd_dense": dict(dictionary="sd", static="dense"),
    "vars_sd_dense32": dict(dictionary="sd", static="dense", num_static_atoms=32),  # the default is head_dim (64)
}
TRAIN_VARIANTS = {
    "self": dict(attention="self"),
    "vars_d": dict(attention="vars_d"),
    "vars_d_generic": dict(attention="vars_d", fused=False),
    "vars_sd_dense": dict(attention="vars_sd", static="dense"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=3):
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
    return statistics.median(times)


def peak_mib(device, fn):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _rel(a, b):
    return float((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_correctness(device, quick):
    rows = []
    torch.manual_seed(0)
    B, N, C, H = (2, 17, 24, 3) if quick else (8, 197, 192, 3)
    image = 4 if quick else 14
    for name, opts in (("VARS-D", dict(dictionary="d")), ("VARS-SD", dict(dictionary="sd")),
                       ("VARS-SD dense", dict(dictionary="sd", static="dense", image_size=image))):
        ref = vo.VARSLayer(C, H, solver="ista", steps=3, qkv_bias=True, **opts).double()
        x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
        y_ref = ref(x)
        g_ref = torch.autograd.grad((y_ref * torch.cos(y_ref)).sum(), [x, *ref.parameters()])
        dev = vo.VARSLayer(C, H, solver="ista", steps=3, qkv_bias=True, **opts)
        dev.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        dev = dev.to(device)
        xd = x.detach().float().to(device).requires_grad_()
        y32 = dev(xd)
        g32 = torch.autograd.grad((y32 * torch.cos(y32)).sum(), [xd, *dev.parameters()])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y16 = dev(xd)
        rows.append((f"{name} layer fp32 forward", _rel(y32.detach(), y_ref.detach()), 1e-4))
        rows.append((f"{name} layer fp32 gradients (worst tensor)",
                     max(_rel(a, b) for a, b in zip(g32, g_ref)), 2e-3))
        rows.append((f"{name} layer bf16 autocast forward", _rel(y16.detach().float(), y_ref.detach()), 5e-2))
    P = torch.randn(64, 48, dtype=torch.float64) / 8
    X = torch.randn(32 if quick else 512, 64, dtype=torch.float64)
    cpu = vo.solve(P, X, 0.1, "fista", tol=1e-10).code
    gpu = vo.solve(P.to(device), X.to(device), 0.1, "fista", tol=1e-10).code.cpu()
    rows.append(("LASSO fista float64 (max abs difference)", (gpu - cpu).abs().max().item(), 1e-8))
    print("| check | max relative error | bound | ok |\n|---|---|---|---|")
    ok = True
    for name, err, bound in rows:
        good = err <= bound  # NaN fails
        ok &= good
        print(f"| {name} | {err:.2e} | {bound:g} | {'yes' if good else 'NO'} |")
    return ok, rows


def block_step(block, x, amp, cache=True):
    def step():
        with torch.autocast(x.device.type, dtype=amp, cache_enabled=cache):
            out = block(x)
        out.float().sum().backward()
    return step


def make_block(dim, heads, opts, device):
    """timm's Block with its own attention (``opts`` None) or a VARSLayer; older timm without the
    ``attn_layer`` argument gets the layer swapped in after construction."""
    if opts is None:
        return Block(dim, heads, qkv_bias=True).to(device)
    cls = vo.VARSLayer.configure(**opts)
    try:
        block = Block(dim, heads, qkv_bias=True, attn_layer=cls)
    except TypeError:
        block = Block(dim, heads, qkv_bias=True)
        block.attn = cls(dim, num_heads=heads, qkv_bias=True)
    return block.to(device)


def graphed_ms(block, x, iters):
    """Forward+backward of a block captured as CUDA graphs (launch costs removed), or NaN if capture fails.
    Captured and replayed under bf16 autocast (its weight cache off, as graph capture requires)."""
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            g = torch.cuda.make_graphed_callables(block, (x,))
        return timed(block_step(g, x, torch.bfloat16, cache=False), x.device, iters)
    except Exception as exc:  # capture is a diagnostic: report, do not stop the benchmark
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        return float("nan")


def block_table(device, quick, iters, variants, graphs=False):
    dim, heads = 192, 3
    shapes = [(2, 16), (1, 64)] if quick else [(256, 196), (4, 12544)]
    results = []
    for B, N in shapes:
        x = torch.randn(B, N, dim, device=device, requires_grad=True)
        row = {"B": B, "N": N}
        for name in variants:
            block = make_block(dim, heads, VARIANTS[name], device)
            step = block_step(block, x, torch.bfloat16)
            try:
                row[name] = (timed(step, device, iters), peak_mib(device, step))
            except torch.OutOfMemoryError:
                row[name] = (float("nan"), float("nan"))
            if graphs and device.type == "cuda" and name in ("timm", "vars_d", "vars_sd_dense"):
                row[name + "_graphed"] = graphed_ms(make_block(dim, heads, VARIANTS[name], device),
                                                    x.detach().clone().requires_grad_(), iters)
            del block
        results.append(row)
    names = [n for n in variants if n != "timm"]
    print("\n| B x N | timm Block ms | " + " | ".join(f"{n} ms (ratio)" for n in names) + " | peak MiB timm / "
          + " / ".join(names) + " |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in results:
        t = r["timm"]
        cells = " | ".join(f"{r[n][0]:.2f} ({r[n][0] / t[0]:.2f}x)" for n in names)
        mem = " / ".join(f"{r[n][1]:.0f}" for n in names)
        print(f"| {r['B']} x {r['N']} | {t[0]:.2f} | {cells} | {t[1]:.0f} / {mem} |")
    print("targets: N 196: VARS-D <= 1.25x, VARS-SD <= 1.5x; N 12544: VARS-D >= 2x faster than timm (<= 0.5x)")
    for r in results:
        g = {k[:-8]: v for k, v in r.items() if k.endswith("_graphed")}
        if g:
            print(f"CUDA graphs, B {r['B']} x N {r['N']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in g.items()))
    return results


def profile_block(device, quick, name="vars_d", top=12, path=None):
    """Kernel launches and the most expensive kernels of one forward+backward of a block."""
    from torch.profiler import ProfilerActivity, profile

    B, N = (2, 16) if quick else (256, 196)
    block = make_block(192, 3, VARIANTS[name], device)
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


def train_step(model, opt, images, labels):
    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def training_table(device, quick, iters, variants):
    import timm
    B, size = (4, 32) if quick else (256, 224)
    out = {}
    for name in variants:
        kw = dict(TRAIN_VARIANTS[name])
        model = timm.create_model("vars_rvt_tiny", num_classes=1000, img_size=size, **kw).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(B, 3, size, size, device=device)
        labels = torch.randint(0, 1000, (B,), device=device)

        step = train_step(model, opt, images, labels)
        try:
            ms = timed(step, device, iters)
            out[name] = (B / ms * 1e3, peak_mib(device, step))
        except torch.OutOfMemoryError:
            out[name] = (float("nan"), float("nan"))
        del model, opt, step
    s = out["self"]
    print(f"\n| vars_rvt_tiny train step, B {B}, {size} px | images/s (ratio) | peak MiB (ratio) |\n|---|---|---|")
    for name, (ips, mem) in out.items():
        print(f"| {name} | {ips:.0f} ({ips / s[0]:.2f}x) | {mem:.0f} ({mem / s[1]:.2f}x) |")
    print("targets: VARS-D >= 0.9x the images/s of self, <= 1.1x its peak memory")
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
    rows = {}
    for spec in ODE_SOLVERS:
        name, _, integrator = spec.partition("@")
        kw = dict(max_iter=max_evals, **({"integrator": integrator} if integrator else {}))

        def run():
            return vo.solve_gram(K, B, 0.1, name, tol=tol, **kw)

        sol = run()
        ms = timed(run, device, 1, warmup=0)
        with vo.count_host_syncs() as reads:
            run()
        st = sol.stats
        rows[spec] = dict(work=int(st.iterations.max()), unit=st.unit, converged=float(st.converged.float().mean()),
                          residual=float(st.residual.max()), ms=ms, reads=reads.count)
    f = rows["fista"]["ms"]
    print(f"\n| solver ({systems} Gram systems {m}x{m}, {k} problems each, fp32, tol {tol:g}) | work | unit | "
          "converged | ms (/ FISTA) | host reads |\n|---|---|---|---|---|---|")
    for spec, r in rows.items():
        print(f"| {spec} | {r['work']} | {r['unit']} | {r['converged']:.3f} | {r['ms']:.1f} ({r['ms'] / f:.1f}x) | {r['reads']} |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the CPU test path)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--blocks", default=",".join(VARIANTS), help=f"block variants, from {list(VARIANTS)}")
    ap.add_argument("--train", default=",".join(TRAIN_VARIANTS), help=f"training variants, from {list(TRAIN_VARIANTS)}")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-ode", action="store_true", help="skip the solver table (section 4)")
    ap.add_argument("--profile", help="append a kernel profile of the VARS-D block to this file")
    ap.add_argument("--graphs", action="store_true", help="also time timm, VARS-D and VARS-SD dense blocks as CUDA graphs")
    ap.add_argument("--time-anyway", action="store_true", help="time even if a correctness check fails")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    blocks = ["timm"] + [b for b in args.blocks.split(",") if b and b != "timm"]
    train = ["self"] + [t for t in args.train.split(",") if t and t != "self"]
    for b in blocks:
        if b not in VARIANTS:
            raise SystemExit(f"--blocks: unknown variant {b!r}; choose from {list(VARIANTS)}")
    for t in train:
        if t not in TRAIN_VARIANTS:
            raise SystemExit(f"--train: unknown variant {t!r}; choose from {list(TRAIN_VARIANTS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import timm
    print(f"device: {name}; torch {torch.__version__}; timm {timm.__version__}\n")
    ok, checks = check_correctness(device, args.quick)
    if not ok and not args.time_anyway:
        print("correctness check failed: no timings", file=sys.stderr)
        return 1
    block_rows = block_table(device, args.quick, args.iters, blocks, graphs=args.graphs)
    kernels = profile_block(device, args.quick, path=args.profile) if args.profile else None
    train_rows = None if args.skip_training else training_table(device, args.quick, max(3, args.iters // 2), train)
    ode_rows = None if args.skip_ode else ode_table(device, args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "checks": checks, "blocks": block_rows,
                       "kernels": kernels, "train": train_rows, "ode": ode_rows}, fh, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
