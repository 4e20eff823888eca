"""A/B of the fused node (vars_ode/fused.py) against another version of it, in one process.

The other version is read from a git revision (``--rev``) or a file (``--file``) and loaded as a second
module; a copy of the layer calls it instead of the installed ``vars_ode.fused``. Both layers share
their weights and take turns with timm's Attention on the same input (forward + backward, fp32, DeiT-Ti
width by default). Prints the median times, each one's ratio to timm's, and the median of the paired
ratios other / current (above 1: the current version is faster). Outputs and gradients of the two are
compared first.

    python benchmarks/ab_fused.py --rev HEAD~1 [--layers d,sd-dense] [--repeats 30]
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import inspect
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from timm.layers import Attention

import vars_ode.layer as layer_module
from vars_ode import VARSLayer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from layer_cpu import layer_kwargs, turn_order  # noqa: E402


def load_other(rev: str | None, file: str | None):
    """The other version of vars_ode/fused.py as a module (its relative imports point at vars_ode)."""
    if (rev is None) == (file is None):
        raise ValueError("give exactly one of --rev and --file")
    if rev is not None:
        source = subprocess.run(["git", "show", f"{rev}:vars_ode/fused.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    else:
        source = pathlib.Path(file).read_text()
    source = source.replace("from .", "from vars_ode.")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="ab_fused_"))
    atexit.register(shutil.rmtree, folder, True)  # (at exit, not before: tracebacks read the module from it)
    path = folder / "fused_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fused_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def other_core(mod):
    """The other version's fused_attention_core, called as the current layer calls it: older versions
    take no ``kernels`` or ``stats`` argument (their statistics are eager: wrapped as a replay)."""
    takes = inspect.signature(mod.fused_attention_core).parameters

    def core(*args, **kwargs):
        if "kernels" not in takes and kwargs.pop("kernels", "torch") != "torch":
            raise ValueError("the other fused.py has no kernels argument (PyTorch kernels only)")
        lazy = kwargs.get("stats") == "lazy"
        if "stats" not in takes:
            kwargs.pop("stats", None)
        elif lazy:
            return mod.fused_attention_core(*args, **kwargs)
        out, code, problem = mod.fused_attention_core(*args, **kwargs)
        if len(problem) == 3:  # versions that returned the code and b / L unscaled: tau = 1
            A, bs, L = problem
            problem = (A, bs, L, torch.ones_like(L))
        return (out, lambda: (code, problem)) if lazy else (out, code, problem)
    return core


def with_core(cls, core):
    """A subclass of the layer class ``cls`` whose forward calls ``core`` instead of the installed
    ``vars_ode.fused.fused_attention_core`` (what the layer module imported), restoring it after."""
    class Other(cls):
        def forward(self, *args, **kwargs):
            current = layer_module.fused_attention_core
            layer_module.fused_attention_core = core
            try:
                return super().forward(*args, **kwargs)
            finally:
                layer_module.fused_attention_core = current
    return Other


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="git revision of the other version")
    ap.add_argument("--file", help="path of the other version's fused.py")
    ap.add_argument("--layers", default="d,sd-dense",
                    help="comma-separated: d, sd-dense, s-dense; sd-dense:32 sets num_static_atoms")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--image-size", type=int, default=14, help="token grid side of the dense static atoms")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Other = with_core(VARSLayer, other_core(load_other(args.rev, args.file)))

    def run(layer, x):
        x = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        y = layer(x)
        grads = torch.autograd.grad(y.sum(), [x, *layer.parameters()], allow_unused=True)
        return time.perf_counter() - t0, [y.detach(), *(g for g in grads if g is not None)]

    print(f"CPU fwd+bwd, fp32, dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.tokens} tokens, "
          f"{args.threads} threads, {args.repeats} interleaved runs; other: {args.rev or args.file}")
    print("| layer | max rel. difference | current ms | other ms | current / timm | other / timm "
          "| paired other / current |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name in args.layers.split(","):
        torch.manual_seed(0)
        kw = dict(layer_kwargs(name), image_size=args.image_size)
        cur = VARSLayer(args.dim, args.heads, **kw)
        oth = Other(args.dim, args.heads, **kw)
        oth.load_state_dict(cur.state_dict())
        timm = Attention(args.dim, num_heads=args.heads, qkv_bias=True)
        x = torch.randn(args.batch, args.tokens, args.dim)
        a, b = run(cur, x)[1], run(oth, x)[1]
        diff = max(float((s - t).abs().max() / t.abs().max().clamp_min(1e-30)) for s, t in zip(a, b, strict=True))
        times = {"timm": [], "cur": [], "oth": []}
        turns = {"timm": timm, "cur": cur, "oth": oth}
        for i in range(args.repeats + 3):
            for key in turn_order(turns, i):  # each in every position of the turn, as often
                layer = turns[key]
                t = run(layer, x)[0]
                if i >= 3:
                    times[key].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = statistics.median(o / c for o, c in zip(times["oth"], times["cur"]))
        rows[name] = dict(diff=diff, paired=paired, **med)
        print(f"| {name} | {diff:.1e} | {1e3 * med['cur']:.1f} | {1e3 * med['oth']:.1f} | "
              f"{med['cur'] / med['timm']:.2f}x | {med['oth'] / med['timm']:.2f}x | {paired:.3f} |")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
