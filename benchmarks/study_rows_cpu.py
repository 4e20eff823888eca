"""Training images/s of the robustness study's rows (``vars_ode.robustness.study.ROWS``) on real Fashion-MNIST images.

Each row's model is built as the study builds it (the host of ``StudyConfig``), optionally with the weights of a
checkpoint (a trained VARS-D model: its layers' problems are harder than a new model's), and timed over one
forward and backward pass of a batch of training images, best of ``--repeats`` after a warm-up. Also printed: the
iterations (or evaluations) each attention layer spent in its last forward pass.

    python benchmarks/study_rows_cpu.py vars_d vars_d_eq vars_d_fista [--images 128] [--repeats 2]
        [--weights results/fmnist/runs/vars_d_eq-seed1/checkpoint.pth]

``--weights`` takes any study run's checkpoint of the same host. Git keeps them from 2026-12-04 on; the runs that
finished before (among them ``vars_d-seed2``, named in benchmarks/RESULTS.md) kept only their results.

Needs the Debian package ``dataset-fashion-mnist`` (or ``--fmnist PATH``). Stop the study while timing.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vars_ode.robustness.datasets import load_fashion_mnist
from vars_ode.robustness.study import ROWS, StudyConfig, _pixels, build_model


def time_row(model, x, t, repeats: int) -> tuple[float, list[int]]:
    """Best seconds of one training step (forward, loss, backward) and the layers' iterations of the last."""
    model.train()
    best = float("inf")
    for r in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        F.cross_entropy(model(x), t).backward()
        if r:
            best = min(best, time.perf_counter() - t0)
    its = [int(m.last_stats.iterations) for m in model.modules() if getattr(m, "last_stats", None) is not None]
    return best, its


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", choices=list(ROWS))
    ap.add_argument("--images", type=int, default=128, help="batch of training images (the study's batch: 128)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None, help="a checkpoint whose model weights every row loads (same host)")
    ap.add_argument("--fmnist", default=None, help="Fashion-MNIST folder (default: the installed package)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("train", args.fmnist)
    x, t = _pixels(images[:args.images]), torch.from_numpy(labels[:args.images]).long()
    state = None
    if args.weights:
        from vars_ode.models.checkpoint import load_checkpoint_file
        state = load_checkpoint_file(args.weights)["model"]
    cfg = StudyConfig()
    print(f"{cfg.model} {cfg.model_kwargs}, {args.images} Fashion-MNIST training images, {args.threads} threads, "
          f"best of {args.repeats}" + (f", weights {args.weights}" if state is not None else ", new models"))
    print()
    print("| row | training images/s | iterations per layer |")
    print("|---|---|---|")
    for row in args.rows:
        torch.manual_seed(0)
        model = build_model(cfg, row)
        if state is not None:
            model.load_state_dict(state)
        seconds, its = time_row(model, x, t, args.repeats)
        print(f"| {row} | {args.images / seconds:.0f} | {', '.join(map(str, its)) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
