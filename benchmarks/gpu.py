"""GPU benchmark of the VARS layers against timm's fused attention (issue targets in the table).

    python benchmarks/gpu.py                 # on a CUDA machine: correctness first, then the tables
    python benchmarks/gpu.py --device cpu --quick   # the same code path at toy sizes (tested in CI)

1. Correctness: a VARS-D and a VARS-SD layer on the device (fp32 and bf16 autocast) against the
   same layer in float64 on the CPU; a batched LASSO on the device against the CPU float64 solve.
   The script stops with exit code 1 if a check fails, before timing anything.
2. Blocks at DeiT-Ti width (dim 192, 3 heads): forward+backward under bf16 autocast, median of
   ``--iters`` CUDA-event timings, peak memory; timm's Block (fused SDPA) is the baseline measured
   in the same process; B 256 x N 196 and B 4 x N 12544.
3. Training steps of vars_rvt_tiny (B 256, 224 px): images/s and peak memory, attention="self" baseline.
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
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def check_correctness(device, quick):
    ok = True
    rows = []
    torch.manual_seed(0)
    B, N, C, H = (2, 16, 24, 3) if quick else (8, 196, 192, 3)
    for dictionary in ("d", "sd"):
        ref = vo.VARSLayer(C, H, dictionary=dictionary, solver="ista", steps=3).double().eval()
        x = torch.randn(B, N, C, dtype=torch.float64)
        with torch.no_grad():
            y_ref = ref(x)
            dev = vo.VARSLayer(C, H, dictionary=dictionary, solver="ista", steps=3)
            dev.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
            dev = dev.to(device).eval()
            y32 = dev(x.float().to(device)).double().cpu()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y16 = dev(x.float().to(device)).double().cpu()
        scale = y_ref.abs().max().item()
        e32 = (y32 - y_ref).abs().max().item() / scale
        e16 = (y16 - y_ref).abs().max().item() / scale
        rows.append((f"VARS-{dictionary.upper()} layer fp32", e32, 1e-4))
        rows.append((f"VARS-{dictionary.upper()} layer bf16 autocast", e16, 5e-2))
    P = torch.randn(64, 48, dtype=torch.float64) / 8
    X = torch.randn(32 if quick else 512, 64, dtype=torch.float64)
    cpu = vo.solve(P, X, 0.1, "fista", tol=1e-10).code
    gpu = vo.solve(P.to(device), X.to(device), 0.1, "fista", tol=1e-10).code.cpu()
    rows.append(("LASSO fista float64", (gpu - cpu).abs().max().item(), 1e-8))
    print("| check | max relative error | bound | ok |\n|---|---|---|---|")
    for name, err, bound in rows:
        good = err <= bound
        ok &= good
        print(f"| {name} | {err:.2e} | {bound:g} | {'yes' if good else 'NO'} |")
    return ok, rows


def block_table(device, quick, iters):
    dim, heads = 192, 3
    shapes = [(2, 16), (1, 64)] if quick else [(256, 196), (4, 12544)]
    amp = torch.bfloat16
    results = []
    for B, N in shapes:
        x = torch.randn(B, N, dim, device=device)
        row = {"B": B, "N": N}
        for name, attn in (("timm", None), ("vars_d", vo.VARSLayer.configure(dictionary="d")),
                           ("vars_sd", vo.VARSLayer.configure(dictionary="sd"))):
            kw = {} if attn is None else {"attn_layer": attn}
            block = Block(dim, heads, qkv_bias=True, **kw).to(device)

            def step():
                with torch.autocast(device.type, dtype=amp):
                    out = block(x.requires_grad_())
                out.float().sum().backward()

            row[name] = (timed(step, device, iters), peak_mib(device, step))
        results.append(row)
    print("\n| B x N | timm Block ms | VARS-D ms (ratio) | VARS-SD ms (ratio) | peak MiB timm / D / SD |")
    print("|---|---|---|---|---|")
    for r in results:
        t, d, sd = r["timm"], r["vars_d"], r["vars_sd"]
        print(f"| {r['B']} x {r['N']} | {t[0]:.2f} | {d[0]:.2f} ({d[0] / t[0]:.2f}x) | {sd[0]:.2f} ({sd[0] / t[0]:.2f}x) "
              f"| {t[1]:.0f} / {d[1]:.0f} / {sd[1]:.0f} |")
    print("targets: N 196: VARS-D <= 1.25x, VARS-SD <= 1.5x; N 12544: VARS-D >= 2x faster than timm")
    return results


def training_table(device, quick, iters):
    import timm
    B, size = (4, 32) if quick else (256, 224)
    out = {}
    for attention in ("self", "vars_d"):
        model = timm.create_model("vars_rvt_tiny", attention=attention, num_classes=1000, img_size=size).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(B, 3, size, size, device=device)
        labels = torch.randint(0, 1000, (B,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = timed(step, device, iters)
        out[attention] = (B / ms * 1e3, peak_mib(device, step))
    s, d = out["self"], out["vars_d"]
    print(f"\n| vars_rvt_tiny train step, B {B}, {size} px | images/s | peak MiB |\n|---|---|---|")
    print(f"| attention=self | {s[0]:.0f} | {s[1]:.0f} |")
    print(f"| attention=vars_d | {d[0]:.0f} ({d[0] / s[0]:.2f}x) | {d[1]:.0f} ({d[1] / s[1]:.2f}x) |")
    print("targets: VARS-D >= 0.9x the images/s of self, <= 1.1x its peak memory")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the CPU test path)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}\n")
    ok, checks = check_correctness(device, args.quick)
    if not ok:
        print("correctness check failed: no timings", file=sys.stderr)
        return 1
    blocks = block_table(device, args.quick, args.iters)
    train = None if args.skip_training else training_table(device, args.quick, max(3, args.iters // 2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "checks": checks, "blocks": blocks, "train": train}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
