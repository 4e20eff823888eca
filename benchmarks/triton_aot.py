"""Compile the Triton kernels of vars_ode.triton_gram for a CUDA architecture, with no GPU, and print what
ptxas reports for each: registers per thread, spilled bytes, shared memory.

    python benchmarks/triton_aot.py                      # sm_90 (H100 / H200)
    python benchmarks/triton_aot.py --arch 90 --sweep    # launch settings side by side
    python benchmarks/triton_aot.py --static             # and the VARS-SD (static atoms) variants

Triton compiles to PTX and ptxas (shipped with Triton) to machine code for any target on any machine:
errors that Triton's interpreter does not raise (dtype rules of ``tl.dot``, constexpr rules, shared
memory beyond the card's) show up here, and spills are the first thing to look at when tuning. It
does not time anything. Must run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import pathlib
import re
import sys

#: shared memory a block may use: sm_80 (A100) 163 KiB, sm_90 (H100 / H200) 227 KiB
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def kernels(low="bf16", block_n=None, warps_tokens=8, warps_solve=8, dh=64, m=128, steps=3, static=False):
    """(name, kernel, constexprs, pointer dtypes, num_warps) of a VARS-D layer's forward and backward,
    as vars_ode.triton_gram launches them (DeiT-Ti heads by default: dh 64, m 128 atoms in all); ``static``:
    a VARS-SD layer's (dense static atoms among the m, and their gradient). ``block_n=None``: the layer's
    default tile."""
    import triton.language as tl

    from vars_ode import triton_gram as tg

    block_n = block_n or default_block(low, static)

    lo = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[low]
    tok = dict(BN=block_n, DH=dh, M=m, LOW=lo, UPCAST=False, PREC="tf32", STATIC=static)
    solve = dict(STEPS=steps, M=m, DH=dh, SHRINK=True, ENCODE=False, PREC="tf32")
    p = "*" + low
    kept = "*bf16" if low == "bf16" else "*fp32"  # G and F^T v as the forward pass keeps them
    gk = {"G_ptr": kept, "a_ptr": kept}
    return [
        ("gram", tg._tokens_kernel, dict(tok, GRAM=True), {"qv_ptr": p, "x_ptr": p, "s_ptr": kept,
                                                           "G_ptr": kept, "acc_ptr": kept}, warps_tokens),
        ("solve", tg._solve_kernel, dict(solve, ITERS=10, NORM=tg.norm_every(m), STATS=False), gk, warps_solve),
        ("decode", tg._decode_kernel, dict(tok, RESIDUAL=True), {"qv_ptr": p, "out_ptr": p}, warps_tokens),
        ("gcode", tg._tokens_kernel, dict(tok, GRAM=False), {"qv_ptr": p, "x_ptr": p}, warps_tokens),
        ("solve_backward", tg._solve_backward_kernel, solve, gk, warps_solve),
        ("features_backward", tg._features_backward_kernel, dict(tok, RESIDUAL=True, GRAD_S=static),
         {"qv_ptr": p, "g_ptr": p, "gqv_ptr": p}, warps_tokens),
    ]


def default_block(low, static):
    """The layer's tokens per tile for these products (vars_ode.triton_gram.block_tokens)."""
    import torch

    from vars_ode import triton_gram as tg

    return tg.block_tokens({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[low], static)


def _signature(kernel, constexprs, pointers):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name in ("weight", "m_rsqrt"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, constexprs, pointers, warps, arch):
    """dict(registers, spill_stores, spill_loads, shared) of one kernel compiled for sm_<arch>: the registers and
    spills from the report of the ptxas run that builds Triton's cubin (its own options; no second ptxas run)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, pointers), constexprs=constexprs)
    printed = io.StringIO()
    # always_compile: a kernel from Triton's cache would come with no report
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(printed):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    report = printed.getvalue()
    if "Used " not in report:
        raise RuntimeError(f"no ptxas report for {kernel.fn.__name__}: {report[-2000:]!r}")

    def num(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared)


def table(arch, only=None, **settings):
    rows = []
    for name, kernel, constexprs, pointers, warps in kernels(**settings):
        if only is not None and name not in only:
            continue
        rows.append(dict(kernel=name, warps=warps, **compile_one(kernel, constexprs, pointers, warps, arch)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capabilities, comma-separated (default 90: H100 / H200)")
    ap.add_argument("--low", default="bf16", help="dtypes of the products over the tokens, comma-separated, "
                                                  "from bf16, fp16, fp32 (fp32: a layer without autocast)")
    ap.add_argument("--static", action="store_true",
                    help="also the kernels of a VARS-SD layer (dense static atoms: four of the six differ)")
    ap.add_argument("--sweep", action="store_true",
                    help="also block_n 32 / 128 and other warp counts (block_n/warps_tokens/warps_solve)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    settings = [(None, 8, 8)]  # the layer's default tile
    if args.sweep:
        settings += [(32, 4, 8), (64, 4, 8), (64, 8, 16), (128, 8, 8), (32, 4, 4)]
    lows = args.low.split(",")
    for low in lows:
        if low not in ("bf16", "fp16", "fp32"):
            raise SystemExit(f"--low: {low!r} is not one of bf16, fp16, fp32")
    ok = True
    for arch, low, (block_n, warps_tokens, warps_solve), static in itertools.product(
            (int(a) for a in args.arch.split(",")), lows, settings, (False, True) if args.static else (False,)):
        limit = SHARED_LIMIT.get(arch)
        block_n = block_n or default_block(low, static)
        print(f"\nsm_{arch}, {low}, block_n {block_n}, warps {warps_tokens} (tokens) / {warps_solve} (solve)"
              f"{', static atoms' if static else ''}\n"
              "| kernel | warps | registers | spill stores (B) | spill loads (B) | shared (B) |\n"
              "|---|---|---|---|---|---|")
        kernels_ = ("gram", "decode", "gcode", "features_backward") if static else None  # the others: the same
        for r in table(arch, low=low, block_n=block_n, warps_tokens=warps_tokens, warps_solve=warps_solve,
                       static=static, only=kernels_):
            over = limit is not None and r["shared"] > limit
            ok &= not over
            print(f"| {r['kernel']} | {r['warps']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} "
                  f"| {r['shared']}{' (over the limit)' if over else ''} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
