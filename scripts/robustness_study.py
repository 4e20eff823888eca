#!/usr/bin/env python
"""Offline robustness study: self-attention vs Performer vs VARS-S / -D / -SD on Fashion-MNIST.

Trains one small host model per attention with the same budget (epochs, batch, optimiser, data) and
three seeds, then evaluates each on the Fashion-MNIST test set (clean top-1), on Fashion-MNIST-C (the
15 ImageNet-C corruptions x 5 severities generated with `imagecorruptions`, cached under
``<output_dir>/fashion-mnist-c``; mCE here is the *unnormalised* mean corruption error in percent,
as there is no AlexNet reference for Fashion-MNIST) and under PGD (L-inf eps 1/255, 5 steps of
0.5/255, random start). Prints a Table-2-like Markdown table of mean +- std over seeds.

Every run is a pair of `scripts/train_imagenet.py` subprocesses (train, then --eval), so a run that
is interrupted continues from its checkpoint when the study is started again.

    python scripts/robustness_study.py --device cuda   # full study: 5 x 3 runs of 10 epochs on 60k images
    python scripts/robustness_study.py --quick         # pipeline check: 3 steps, 64 test images, 3 corruptions

On two shared CPU cores a 0.5 M-parameter self-attention host trains at roughly 40 images/s (VARS
variants 2-4x slower), so the full study is a GPU job; on CPU-only machines shrink it with --subset / --epochs.

Needs: the registered VARS host (default ``vars_deit_tiny``, from ``import vars_ode``),
Fashion-MNIST (``apt-get install dataset-fashion-mnist`` or --fmnist-path) and
``pip install imagecorruptions-imaug``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vars_ode.robustness import (IMAGENET_C_CORRUPTIONS, DatasetError, find_fashion_mnist, mean_std,  # noqa: E402
                                 missing_vars_models, require_imagecorruptions)
from vars_ode.models.checkpoint import CheckpointError, load_checkpoint_file  # noqa: E402
from vars_ode.robustness.cli import ArgumentParser, parse_kwargs, positive_int  # noqa: E402

TRAIN = ROOT / "scripts" / "train_imagenet.py"
NAMES = {"self": "Self-attention", "performer": "Performer", "vars_s": "VARS-S", "vars_d": "VARS-D",
         "vars_sd": "VARS-SD", "none": "(model default)"}
QUICK_CORRUPTIONS = ["gaussian_noise", "motion_blur", "contrast"]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vars_deit_tiny")
    p.add_argument("--attentions", nargs="+", default=["self", "performer", "vars_s", "vars_d", "vars_sd"],
                   help="attention= values; 'none' passes no attention (plain timm models)")
    p.add_argument("--model-kwargs", nargs="*", default=["patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=None, help="default 10 (quick: 1)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 128 (quick: 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="per 512 images")
    p.add_argument("--subset", type=positive_int, default=None, help="training images (quick: 512)")
    p.add_argument("--eval-subset", type=positive_int, default=None, help="test images (default 2000, quick: 100)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    p.add_argument("--corruptions", nargs="*", default=None, help="default all 15 (quick: 3)")
    p.add_argument("--fmnist-path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--output_dir", "--output-dir", default="runs/robustness_study")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the pipeline")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs = a.epochs or 1
        a.subset = a.subset or 512
        a.eval_subset = a.eval_subset or 64
        a.corruptions = a.corruptions or QUICK_CORRUPTIONS
        a.max_steps_per_epoch = a.max_steps_per_epoch or 3
        a.batch_size = a.batch_size or 64
    a.epochs = a.epochs or 10
    a.eval_subset = a.eval_subset or 2000
    a.batch_size = a.batch_size or 128
    a.corruptions = a.corruptions or list(IMAGENET_C_CORRUPTIONS)
    return a


def preflight(a) -> list[str]:
    """Everything missing, as messages (empty when the study can run)."""
    problems = []
    try:
        find_fashion_mnist(a.fmnist_path)
    except DatasetError as e:
        problems.append(str(e))
    try:
        require_imagecorruptions()
    except ImportError as e:
        problems.append(str(e))
    atts = [x for x in a.attentions if x != "none"]
    probe = dict(num_classes=10, in_chans=1, img_size=28, **parse_kwargs(a.model_kwargs))
    if atts:
        problems += missing_vars_models(atts, a.model, **probe)
    if "none" in a.attentions:
        try:
            from vars_ode.robustness import create_model
            create_model(a.model, **probe)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{a.model}: {type(e).__name__}: {e}")
    return problems


def run(cmd, log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"command failed ({r.returncode}), see {log}:\n  " + " ".join(cmd) + "\n" +
                           "".join(log.read_text().splitlines(True)[-15:]))


def one_run(a, attention: str, seed: int) -> dict:
    out = Path(a.output_dir) / f"{attention}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    common = [sys.executable, str(TRAIN), "--data-set", "fashion-mnist", "--model", a.model, "--device", a.device,
              "--num_workers", "0", "--seed", str(seed), "--output_dir", str(out), "--batch-size", str(a.batch_size),
              "--no-progress", "--model-kwargs", *a.model_kwargs]
    if attention != "none":
        common += ["--attention", attention]
    if a.fmnist_path:
        common += ["--fmnist-path", a.fmnist_path]
    if a.threads:
        common += ["--threads", str(a.threads)]
    ckpt = out / "checkpoint.pth"
    done = False
    if ckpt.is_file():
        try:
            done = load_checkpoint_file(ckpt)["epoch"] + 1 >= a.epochs
        except CheckpointError as e:  # a run killed while writing: start this run again
            print(f"note: {e}; training this run again", file=sys.stderr)
            ckpt.unlink()
    if not done:
        train = common + ["--epochs", str(a.epochs), "--lr", str(a.lr), "--eval-every", "0"]
        if a.subset:
            train += ["--subset", str(a.subset)]
        if a.max_steps_per_epoch:
            train += ["--max-steps-per-epoch", str(a.max_steps_per_epoch)]
        if ckpt.is_file():
            train += ["--resume", str(ckpt)]
        run(train, out / "train.log")
    ev = common + ["--eval", "--resume", str(ckpt), "--eval-subset", str(a.eval_subset), "--pgd_test",
                   "--inc_path", str(Path(a.output_dir) / "fashion-mnist-c"), "--corruptions", *a.corruptions]
    run(ev, out / "eval.log")
    return json.loads(res_file.read_text())


def table(results: dict) -> str:
    lines = ["| Attention | Params (M) | Clean ↑ | mCE ↓ | PGD ↑ |", "|---|---|---|---|---|"]
    for att, runs in results.items():
        cell = lambda k: "{:.1f} ± {:.1f}".format(*mean_std([r[k] for r in runs]))  # noqa: E731
        lines.append(f"| {NAMES.get(att, att)} | {runs[0]['params_M']:.2f} | {cell('acc1')} | {cell('mCE')} | "
                     f"{cell('pgd_acc1')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = get_args(argv)
    problems = preflight(a)
    if problems:
        print("robustness_study: cannot run, missing:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {}
    for att in a.attentions:
        for seed in a.seeds:
            print(f"[{time.time() - t0:7.1f}s] {a.model} attention={att} seed={seed}", flush=True)
            results.setdefault(att, []).append(one_run(a, att, seed))
    md = table(results)
    n_c = len(a.corruptions)
    caption = (f"Fashion-MNIST, {a.model} ({' '.join(a.model_kwargs)}), {a.epochs} epochs, seeds {a.seeds}; "
               f"clean top-1 on {a.eval_subset} test images; mCE = unnormalised mean error over {n_c} "
               f"corruptions x 5 severities (Fashion-MNIST-C); PGD L-inf eps 1/255, 5 x 0.5/255. Mean ± std.")
    print("\n" + caption + "\n\n" + md)
    (Path(a.output_dir) / "study.md").write_text(caption + "\n\n" + md + "\n")
    (Path(a.output_dir) / "study.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
