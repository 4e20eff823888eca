"""Activation memory of a transformer block: the bytes autograd keeps for the backward pass.

    python benchmarks/memory_cpu.py [--batch 256] [--tokens 196] [--model-batch 32]

Counts every tensor saved for backward during one forward pass (shared storages once), under bf16
autocast as in GPU training, for timm's Block (fused SDPA attention) and for the same block with VARS
layers; then the same for one forward pass of vars_rvt_tiny (224 px) with attention="self" and
"vars_d". The fused VARS path is measured with ``recompute=True``, its default on CUDA devices, so
these numbers stand for the activation memory a GPU run keeps (the issue's peak-memory target);
they are exact byte counts, not timings, so the CPU measures them as a GPU would see them.
"""
from __future__ import annotations

import argparse

import torch
from timm.models.vision_transformer import Block

import vars_ode as vo

VARIANTS = {
    "timm Block (SDPA)": None,
    "VARS-D fused (recompute)": dict(dictionary="d", recompute=True),
    "VARS-D fused (keep)": dict(dictionary="d", recompute=False),
    "VARS-D generic": dict(dictionary="d", fused=False),
    "VARS-SD dense fused (recompute)": dict(dictionary="sd", static="dense", recompute=True),
    "VARS-SD conv (generic)": dict(dictionary="sd"),
}


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while ``fn()`` runs (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--model-batch", type=int, default=32, help="batch of the vars_rvt_tiny rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, heads = 192, 3
    x = torch.randn(args.batch, args.tokens, dim, requires_grad=True)
    rows = {}
    for name, opts in VARIANTS.items():
        kw = {} if opts is None else {"attn_layer": vo.VARSLayer.configure(**opts)}
        block = Block(dim, heads, qkv_bias=True, **kw)

        def fwd():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                block(x)

        rows[name] = saved_bytes(fwd) / 2**20
    base = rows["timm Block (SDPA)"]
    print(f"Activation memory kept for backward, one block (dim {dim}, {heads} heads), B {args.batch} x N "
          f"{args.tokens}, bf16 autocast\n")
    print("| block | MiB | ratio to timm |\n|---|---|---|")
    for name, mib in rows.items():
        print(f"| {name} | {mib:.0f} | {mib / base:.2f}x |")

    import timm

    out = {}
    images = torch.randn(args.model_batch, 3, 224, 224)
    for name, kw in (("self", dict(attention="self")), ("vars_d", dict(attention="vars_d", recompute=True))):
        model = timm.create_model("vars_rvt_tiny", num_classes=1000, **kw)

        def fwd():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(images)

        out[name] = saved_bytes(fwd) / 2**20
    print(f"\nvars_rvt_tiny, B {args.model_batch}, 224 px, bf16 autocast: activation memory kept for backward")
    print("| attention | MiB | ratio to self |\n|---|---|---|")
    for name, mib in out.items():
        print(f"| {name} | {mib:.0f} | {mib / out['self']:.2f}x |")
    return rows, out


if __name__ == "__main__":
    main()
