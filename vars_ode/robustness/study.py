"""The Fashion-MNIST robustness study: which attention, and which way of solving VARS, is more robust?

One small ViT host (``vars_deit_tiny`` with a patch-4 stem) is trained with one recipe for every row:
self-attention, Performer, VARS-S / -D / -SD with 3 ISTA steps (the paper's rows), and VARS-D solved
three other ways (FISTA 3 steps, dopri5 over a horizon of 3, the equilibrium with implicit gradients).
Each trained model is evaluated on

* the full Fashion-MNIST test set (clean top-1, every image's correctness kept for the bootstrap);
* Fashion-MNIST-C: the 15 ImageNet-C corruptions x 5 severities of a fixed, cached test subset
  (generated once with ``imagecorruptions``); accuracy per corruption and severity, their mean, and the
  relative corruption error against self-attention (mCE with self-attention as the baseline, in percent);
* PGD (L-inf, 5 steps of eps/2, random start; eps 1/255 as in the paper, and 4/255) and FGSM (1/255) on
  a fixed test subset;
* inside the model (VARS rows): per layer, the KKT residual and the sparsity of the code at the end of
  the forward pass, and the entropy of the attention map after each iteration, clean and corrupted.

Statistics over seeds (mean, sample std) and, for every row against self-attention, the paired
difference with a 95% t interval over seeds (seed k of a row against seed k of self-attention) and a
95% bootstrap interval over test images (each image's correctness averaged over the seeds).

Solvers swapped at test time (:func:`run_swaps`, ``--swap TRAINED:SOLVER``): the finished runs of one row are
evaluated again with the solver settings of another row of the same attention (the equilibrium's models with 3 ISTA
steps, ISTA's with the equilibrium), the same evaluation; the report sets each against the same models with their
own solver (paired by seed) and against self-attention. That separates what a solver does at inference from what
training with it left in the weights.

Layout: ``<out>/runs/<row>-seed<k>/`` holds one run (``run.json`` its settings, the training
checkpoint and log, ``eval.json`` and ``eval.npz``); a run whose ``eval.json`` exists is not repeated
and an interrupted training resumes from its checkpoint. ``<out>/results.json``, ``results.md`` and
``results.png`` are rebuilt from the finished runs after each run and at the end of every invocation.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..layer import EQUILIBRIUM
from .attacks import NormalizedModel, fgsm_attack, pgd_attack
from .datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_c, load_fashion_mnist
from .metrics import IMAGENET_C_CORRUPTIONS, mean_std

__all__ = ["ROWS", "PRESETS", "Row", "StudyConfig", "run_study", "run_swaps", "parse_swap", "swap_solvers",
           "evaluate_run", "summarize", "markdown", "plot_study", "paired_seed_interval", "bootstrap_interval",
           "attention_entropy"]

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_imagenet.py"
SEVERITIES = (1, 2, 3, 4, 5)
BASELINE = "self"


@dataclass(frozen=True)
class Row:
    """One row of the study: a label, the ``attention=`` of the host and the layer's keywords."""
    label: str
    attention: str
    layer: dict = field(default_factory=dict)

    def model_kwargs(self) -> list[str]:
        return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.layer.items()]


#: the rows, in the order they are reported
ROWS: dict[str, Row] = {
    "self": Row("Self-attention", "self"),
    "performer": Row("Performer", "performer"),
    "vars_s": Row("VARS-S (ISTA 3)", "vars_s"),
    "vars_d": Row("VARS-D (ISTA 3)", "vars_d"),
    "vars_sd": Row("VARS-SD (ISTA 3)", "vars_sd"),
    "vars_d_fista": Row("VARS-D, FISTA 3", "vars_d", {"solver": "fista"}),
    "vars_d_dopri5": Row("VARS-D, dopri5 to t=3", "vars_d", {"solver": "dopri5"}),
    "vars_d_eq": Row("VARS-D, equilibrium (ADMM to tol 1e-3, implicit)", "vars_d",
                     {"solver": "admm", "steps": EQUILIBRIUM, "tol": 1e-3, "grad": "implicit"}),
}


@dataclass
class StudyConfig:
    """Everything a run depends on; two runs with different configs never share a folder."""
    rows: list = field(default_factory=lambda: list(ROWS))
    seeds: dict = field(default_factory=lambda: {r: [0, 1, 2] for r in ROWS})
    model: str = "vars_deit_tiny"
    model_kwargs: list = field(default_factory=lambda: ["patch_size=4", "embed_dim=64", "depth=4", "num_heads=2"])
    epochs: int = 20
    batch_size: int = 128
    lr: float = 4e-3            # per 512 images (train_imagenet.py scales it by the batch)
    subset: int | None = None   # training images (None: all 60,000)
    max_steps_per_epoch: int | None = None
    clean_images: int = 10_000  # clean accuracy on the first N test images (10,000: the whole set)
    corrupt_images: int = 2_000
    corruptions: list = field(default_factory=lambda: list(IMAGENET_C_CORRUPTIONS))
    attack_images: int = 1_000
    internal_images: int = 128
    eval_batch: int = 500
    bootstrap: int = 2_000

    def run_key(self) -> dict:
        """The settings that make a run (not the rows, seeds or how many run at once)."""
        d = asdict(self)
        for k in ("rows", "seeds", "bootstrap"):
            d.pop(k)
        return d


def _seeds(every: int, main: int) -> dict:
    return {r: list(range(main if r in (BASELINE, "vars_d") else every)) for r in ROWS}


#: named studies; "full" is the committed one, "toy" the test's
PRESETS: dict[str, StudyConfig] = {
    "full": StudyConfig(seeds=_seeds(2, 3)),
    "quick": StudyConfig(rows=["self", "vars_d"], seeds={"self": [0], "vars_d": [0]}, epochs=2, subset=20_000,
                         clean_images=2_000, corrupt_images=500, attack_images=200),
    "toy": StudyConfig(rows=["self", "vars_d"], seeds={"self": [0], "vars_d": [0]},
                       model_kwargs=["patch_size=4", "embed_dim=32", "depth=1", "num_heads=2"], epochs=1,
                       batch_size=32, subset=128, max_steps_per_epoch=2, clean_images=64, corrupt_images=32,
                       corruptions=["gaussian_noise", "contrast"], attack_images=16, internal_images=8,
                       eval_batch=64, bootstrap=200),
}


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def paired_seed_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean of paired differences and its two-sided t interval (None, None for fewer than two pairs)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("diffs is empty")
    m = float(d.mean())
    if d.size < 2:
        return m, None, None
    from scipy import stats
    if np.all(d == d[0]):
        return m, m, m
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(level)
    return m, float(ci.low), float(ci.high)


def bootstrap_interval(per_image_diff: np.ndarray, n_resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """Mean of a per-image paired difference and its percentile bootstrap interval over images."""
    d = np.asarray(per_image_diff, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"per_image_diff must be a non-empty vector, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for i in range(0, n_resamples, 100):  # resample in blocks: bounded memory for 10,000 images
        k = min(100, n_resamples - i)
        means[i:i + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(d.mean()), float(lo), float(hi)


def attention_entropy(maps: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """Entropy (nats) of each iteration's attention map over the patch tokens, averaged over images.

    ``maps`` is ``(B, T, N)`` non-negative (``vars_ode.layer.attention_maps``); prefix tokens are
    dropped and each map is normalised to sum 1. Returns ``(T,)``; log(number of patches) is uniform.
    """
    m = maps[..., prefix_tokens:].double().clamp_min(0)
    p = m / m.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return h.mean(0)


# ----------------------------------------------------------------------------------------------
# one run: train (train_imagenet.py, resumable) then evaluate
# ----------------------------------------------------------------------------------------------
def _run_dir(out: Path, row: str, seed: int) -> Path:
    return out / "runs" / f"{row}-seed{seed}"


def _check_run_json(run_dir: Path, cfg: StudyConfig, row: str, seed: int) -> None:
    want = {"row": row, "seed": seed, **cfg.run_key()}
    f = run_dir / "run.json"
    if f.is_file():
        have = json.loads(f.read_text())
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise ValueError(f"{run_dir} was made with other settings ({', '.join(diff)}); "
                             f"use another study folder or delete that run")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(want, indent=1))


def _call(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = "".join(log.read_text().splitlines(True)[-12:])
        raise RuntimeError(f"command failed ({r.returncode}), see {log}:\n  {' '.join(cmd)}\n{tail}")


def _trained_epochs(ckpt: Path) -> int:
    from ..models.checkpoint import CheckpointError, load_checkpoint_file
    if not ckpt.is_file():
        return 0
    try:
        return int(load_checkpoint_file(ckpt)["epoch"]) + 1
    except (CheckpointError, KeyError):  # killed while writing: train this run again
        ckpt.unlink()
        return 0


def train_run(cfg: StudyConfig, row: str, seed: int, run_dir: Path, threads: int, fmnist_path=None) -> None:
    """Train (or finish training) one run with ``scripts/train_imagenet.py``."""
    ckpt = run_dir / "checkpoint.pth"
    if _trained_epochs(ckpt) >= cfg.epochs:
        return
    r = ROWS[row]
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--data-set", "fashion-mnist", "--model", cfg.model,
           "--attention", r.attention, "--model-kwargs", *cfg.model_kwargs, *r.model_kwargs(),
           "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
           "--seed", str(seed), "--device", "cpu", "--num_workers", "0", "--threads", str(threads),
           "--no-model-ema", "--eval-every", "0", "--no-progress", "--output_dir", str(run_dir)]
    if cfg.subset:
        cmd += ["--subset", str(cfg.subset)]
    if cfg.max_steps_per_epoch:
        cmd += ["--max-steps-per-epoch", str(cfg.max_steps_per_epoch)]
    if fmnist_path:
        cmd += ["--fmnist-path", str(fmnist_path)]
    if ckpt.is_file():
        cmd += ["--resume", str(ckpt)]
    _call(cmd, run_dir / "train.log")


def build_model(cfg: StudyConfig, row: str) -> torch.nn.Module:
    from ..robustness.cli import parse_kwargs
    from .engine import create_model
    r = ROWS[row]
    return create_model(cfg.model, num_classes=10, in_chans=1, img_size=28, attention=r.attention,
                        **parse_kwargs(cfg.model_kwargs), **r.layer)


def parse_swap(text: str) -> tuple[str, str]:
    """``"TRAINED:SOLVER"`` -> ``(trained, solver)``: two different rows of :data:`ROWS` with the same attention."""
    trained, sep, solver = str(text).partition(":")
    if not sep or not trained or not solver:
        raise ValueError(f"--swap: expected TRAINED:SOLVER (two rows, e.g. vars_d_eq:vars_d), got {text!r}")
    for name in (trained, solver):
        if name not in ROWS:
            raise ValueError(f"--swap {text}: unknown row {name!r}; expected one of {list(ROWS)}")
    if trained == solver:
        raise ValueError(f"--swap {text}: the two rows are the same; the study's own evaluation is that one")
    if ROWS[trained].attention != ROWS[solver].attention:
        raise ValueError(f"--swap {text}: rows of the same attention only ({trained!r} is {ROWS[trained].attention!r}, "
                         f"{solver!r} is {ROWS[solver].attention!r})")
    return trained, solver


def swap_solvers(net: torch.nn.Module, like: torch.nn.Module) -> int:
    """Give every VARS layer of ``net`` the solver settings (solver, steps, tol, grad, options) of the layer of the
    same name in ``like`` (:meth:`VARSLayer.set_solver <vars_ode.VARSLayer.set_solver>`); returns how many layers."""
    from ..layer import VARSLayer
    mine = {n: m for n, m in net.named_modules() if isinstance(m, VARSLayer)}
    theirs = {n: m for n, m in like.named_modules() if isinstance(m, VARSLayer)}
    if set(mine) != set(theirs):
        raise ValueError(f"the two models have different VARS layers: {sorted(mine)} and {sorted(theirs)}")
    for name, layer in mine.items():
        ref = theirs[name]
        layer.set_solver(ref.solver, steps=ref.steps, tol=ref.tol, grad=ref.grad,
                         solver_options=dict(ref.solver_options))
    return len(mine)


def _eval_name(solver_row: str | None) -> str:
    # the evaluation files of a run: eval.json / eval.npz, or eval_as_<row>.* with another row's solver
    return "eval" if solver_row is None else f"eval_as_{solver_row}"


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div_(255).unsqueeze(1)


def _correct(model, x: torch.Tensor, y: torch.Tensor, batch: int, attack=None) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            out.append((model(xb).argmax(1) == yb).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _internals(model: torch.nn.Module, x: torch.Tensor) -> dict | None:
    """Per VARS layer: KKT residual, sparsity and per-iteration attention entropy on images ``x``."""
    from ..layer import VARSLayer, attention_maps as record_iteration_maps
    layers = {n: m for n, m in model.named_modules() if isinstance(m, VARSLayer)}
    if not layers:
        return None
    with torch.no_grad():
        maps = record_iteration_maps(model, x)
        out = {}
        for name, m in layers.items():
            s = m.last_stats
            out[name] = {"kkt_residual_mean": float(s.residual.float().mean()),
                         "kkt_residual_max": float(s.residual.float().max()),
                         "sparsity": float(s.sparsity),
                         "iterations": float(s.iterations.float().max()),
                         "entropy": [float(v) for v in attention_entropy(maps[name])] if name in maps else None}
    return out


def evaluate_run(cfg: StudyConfig, row: str, run_dir: Path, threads: int | None = None,
                 fmnist_path=None, cache_dir: Path | None = None, solver_row: str | None = None) -> dict:
    """Evaluate a trained run; writes ``eval.json`` (metrics) and ``eval.npz`` (per-image correctness). With
    ``solver_row``, the VARS layers first take that row's solver settings (:func:`swap_solvers`), and the files are
    ``eval_as_<solver_row>.json`` / ``.npz``."""
    from ..models.checkpoint import load_checkpoint_file
    if threads:
        torch.set_num_threads(threads)
    net = build_model(cfg, row)
    net.load_state_dict(load_checkpoint_file(run_dir / "checkpoint.pth")["model"])
    if solver_row is not None:
        parse_swap(f"{row}:{solver_row}")
        swap_solvers(net, build_model(cfg, solver_row))
    model = NormalizedModel(net, FASHION_MNIST_MEAN, FASHION_MNIST_STD).eval()
    xte, yte = load_fashion_mnist("test", fmnist_path)
    x, y = _pixels(xte[:cfg.clean_images]), torch.from_numpy(yte[:cfg.clean_images]).long()
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    clean = _correct(model, x, y, cfg.eval_batch)
    eval_ips = len(x) / (time.perf_counter() - t0)
    sets = fashion_mnist_c(cache_dir, cfg.corruptions, SEVERITIES, num_images=cfg.corrupt_images,
                           fmnist_root=fmnist_path)
    corrupt = {}
    for c in cfg.corruptions:
        corrupt[c] = np.stack([_correct(model, _pixels(sets[(c, s)][0]), torch.from_numpy(sets[(c, s)][1]).long(),
                                        cfg.eval_batch) for s in SEVERITIES])
    xa, ya = x[:cfg.attack_images], y[:cfg.attack_images]
    attacks = {
        "pgd1": lambda m, a, b: pgd_attack(m, a, b, eps=1 / 255, step_size=0.5 / 255, steps=5, generator=gen),
        "pgd4": lambda m, a, b: pgd_attack(m, a, b, eps=4 / 255, step_size=2 / 255, steps=5, generator=gen),
        "fgsm1": lambda m, a, b: fgsm_attack(m, a, b, eps=1 / 255),
    }
    adv = {k: _correct(model, xa, ya, cfg.eval_batch, attack=f) for k, f in attacks.items()}
    # inside the model: clean images, and the same images under every corruption at severity 3
    k = cfg.internal_images
    internal = {"clean": _internals(net, (x[:k] - model.mean) / model.std)}
    if internal["clean"] is not None:
        per_c = [_internals(net, (_pixels(sets[(c, 3)][0][:k]) - model.mean) / model.std) for c in cfg.corruptions]
        internal["corrupted"] = _average_internals(per_c)
    log = _read_log(run_dir / "log.csv")
    res = {
        "row": row, "solver_row": solver_row or row, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "clean_acc": 100 * float(clean.mean()),
        "corruption_acc": {c: [100 * float(v) for v in corrupt[c].mean(1)] for c in cfg.corruptions},
        "mean_corruption_acc": 100 * float(np.mean([corrupt[c].mean() for c in cfg.corruptions])),
        **{f"{k}_acc": 100 * float(v.mean()) for k, v in adv.items()},
        "train_images_per_s": log.get("images_per_s"), "train_time_s": log.get("time_s"),
        "eval_images_per_s": eval_ips, "internal": internal,
    }
    name = _eval_name(solver_row)
    np.savez_compressed(run_dir / f"{name}.npz", clean=clean, corrupt=np.stack([corrupt[c] for c in cfg.corruptions]),
                        **adv)
    (run_dir / f"{name}.json").write_text(json.dumps(res, indent=1))  # last: its presence marks the evaluation done
    return res


def _average_internals(items: list[dict]) -> dict:
    out = {}
    for name in items[0]:
        d = {k: float(np.mean([it[name][k] for it in items]))
             for k in ("kkt_residual_mean", "kkt_residual_max", "sparsity", "iterations")}
        ents = [it[name]["entropy"] for it in items if it[name]["entropy"] is not None]
        t = min((len(e) for e in ents), default=0)
        d["entropy"] = [float(np.mean([e[i] for e in ents])) for i in range(t)] if ents else None
        out[name] = d
    return out


def _read_log(path: Path) -> dict:
    import csv
    if not path.is_file():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ips = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    ts = [float(r["epoch_time_s"]) for r in rows if r.get("epoch_time_s")]
    # the best epoch: a run shares its machine, and the slowest epochs measure the others' load
    return {"images_per_s": float(max(ips)) if ips else None, "time_s": float(sum(ts)) if ts else None}


def _eval_in_subprocess(cfg: StudyConfig, row: str, run_dir: Path, threads: int, fmnist_path, cache_dir,
                        solver_row: str | None = None) -> None:
    spec = {"cfg": asdict(cfg), "row": row, "run_dir": str(run_dir), "threads": threads,
            "fmnist_path": fmnist_path and str(fmnist_path), "cache_dir": str(cache_dir), "solver_row": solver_row}
    name = _eval_name(solver_row)
    (run_dir / f"{name}_spec.json").write_text(json.dumps(spec))
    _call([sys.executable, "-m", "vars_ode.robustness.study", str(run_dir / f"{name}_spec.json")],
          run_dir / f"{name}.log")


def one_run(cfg: StudyConfig, row: str, seed: int, out: Path, threads: int, fmnist_path=None) -> dict:
    run_dir = _run_dir(out, row, seed)
    _check_run_json(run_dir, cfg, row, seed)
    if (run_dir / "eval.json").is_file():
        return json.loads((run_dir / "eval.json").read_text())
    train_run(cfg, row, seed, run_dir, threads, fmnist_path)
    _eval_in_subprocess(cfg, row, run_dir, threads, fmnist_path, out / "fashion-mnist-c")
    return json.loads((run_dir / "eval.json").read_text())


# ----------------------------------------------------------------------------------------------
# the study: runs, summary, report
# ----------------------------------------------------------------------------------------------
def run_study(cfg: StudyConfig, out, jobs: int = 1, threads: int | None = None, fmnist_path=None,
              log=print, report_cfg: StudyConfig | None = None) -> dict:
    """Run every (row, seed) of ``cfg`` not yet finished, ``jobs`` at a time; then write the report of
    ``report_cfg`` (default ``cfg``: a study run a few rows at a time passes all its rows here)."""
    report_cfg = report_cfg or cfg
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in cfg.rows if r not in ROWS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; expected some of {list(ROWS)}")
    if BASELINE not in cfg.rows:
        raise ValueError(f"rows must include {BASELINE!r}, the baseline every row is compared with")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    # seed-major order: the first seed of every row is finished before the second of any
    todo = [(r, s) for k in range(max(len(v) for v in cfg.seeds.values()))
            for r in cfg.rows for s in cfg.seeds.get(r, [])[k:k + 1]]
    fashion_mnist_c(out / "fashion-mnist-c", cfg.corruptions, SEVERITIES, num_images=cfg.corrupt_images,
                    fmnist_root=fmnist_path)  # once, before runs start in parallel
    t0 = time.time()
    lock = threading.Lock()

    def job(item):
        r, s = item
        done = (_run_dir(out, r, s) / "eval.json").is_file()
        if not done:
            log(f"[{time.time() - t0:8.0f}s] start {r} seed {s}")
        res = one_run(cfg, r, s, out, threads, fmnist_path)
        if not done:
            log(f"[{time.time() - t0:8.0f}s] done  {r} seed {s}: clean {res['clean_acc']:.2f}%")
            with lock:  # the report of the runs finished so far (once the baseline has one)
                if (_run_dir(out, BASELINE, cfg.seeds[BASELINE][0]) / "eval.json").is_file():
                    write_report(report_cfg, summarize(report_cfg, out), out)
        return res

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(job, todo))
    summary = summarize(report_cfg, out)
    write_report(report_cfg, summary, out)
    return summary


def run_swaps(cfg: StudyConfig, out, swaps, threads: int | None = None, fmnist_path=None, log=print,
              report_cfg: StudyConfig | None = None) -> dict:
    """For every ``(trained, solver)`` of ``swaps`` (rows, or ``"TRAINED:SOLVER"`` strings), evaluate each finished
    run of ``trained`` with the solver settings of ``solver`` (``eval_as_<solver>.*`` in the run's folder; one that
    exists is not repeated); then write the report of ``report_cfg`` (default ``cfg``). Trains nothing."""
    report_cfg = report_cfg or cfg
    out = Path(out)
    pairs = [parse_swap(s) if isinstance(s, str) else parse_swap(":".join(s)) for s in swaps]
    threads = threads or max(1, os.cpu_count() or 1)
    t0 = time.time()
    for trained, solver in pairs:
        seeds = [s for s in cfg.seeds.get(trained, []) if (_run_dir(out, trained, s) / "eval.json").is_file()]
        if not seeds:
            log(f"swap {trained}:{solver}: no finished run of {trained!r} in {out} yet")
        for s in seeds:
            run_dir = _run_dir(out, trained, s)
            _check_run_json(run_dir, cfg, trained, s)
            if (run_dir / f"{_eval_name(solver)}.json").is_file():
                continue
            if not (run_dir / "checkpoint.pth").is_file():
                log(f"swap {trained}:{solver}: {run_dir.name} has no checkpoint.pth (its model was not kept); skipped")
                continue
            log(f"[{time.time() - t0:8.0f}s] start {trained} seed {s} evaluated with {solver}'s solver")
            _eval_in_subprocess(cfg, trained, run_dir, threads, fmnist_path, out / "fashion-mnist-c", solver)
            res = json.loads((run_dir / f"{_eval_name(solver)}.json").read_text())
            log(f"[{time.time() - t0:8.0f}s] done  {trained} seed {s} with {solver}'s solver: clean "
                f"{res['clean_acc']:.2f}%")
    summary = summarize(report_cfg, out)
    write_report(report_cfg, summary, out)
    return summary


def _load_runs(cfg: StudyConfig, out: Path) -> dict:
    runs = {}
    for r in (r for r in ROWS if r in cfg.rows):  # reported in ROWS order
        for s in cfg.seeds.get(r, []):
            d = _run_dir(out, r, s)
            if (d / "eval.json").is_file():
                with np.load(d / "eval.npz") as z:
                    arrays = {k: z[k] for k in z.files}
                runs.setdefault(r, {})[s] = (json.loads((d / "eval.json").read_text()), arrays)
    return runs


def _load_swaps(cfg: StudyConfig, out: Path) -> dict:
    # {(trained, solver): {seed: (eval_as json, arrays)}} for the finished runs of the report's rows
    swaps = {}
    for r in (r for r in ROWS if r in cfg.rows):
        for s in cfg.seeds.get(r, []):
            d = _run_dir(out, r, s)
            if not (d / "eval.json").is_file():
                continue
            for solver in ROWS:  # in ROWS order
                f = d / f"{_eval_name(solver)}.json"
                if solver != r and f.is_file():
                    with np.load(d / f"{_eval_name(solver)}.npz") as z:
                        arrays = {k: z[k] for k in z.files}
                    swaps.setdefault((r, solver), {})[s] = (json.loads(f.read_text()), arrays)
    return swaps


METRICS = {"clean_acc": "clean", "mean_corruption_acc": "corrupt", "pgd1_acc": "pgd1", "pgd4_acc": "pgd4",
           "fgsm1_acc": "fgsm1"}


def _stat(values) -> dict:
    # mean, sample standard deviation (0 for one value) and the values, as results.json keeps them
    vals = [float(v) for v in values]
    m, sd = mean_std(vals)
    return {"mean": m, "std": sd, "values": vals}


def summarize(cfg: StudyConfig, out) -> dict:
    """Mean / std over seeds, relative corruption error and paired intervals against self-attention."""
    runs = _load_runs(cfg, Path(out))
    if BASELINE not in runs:
        raise ValueError(f"no finished {BASELINE!r} run in {out}")
    base_err = {c: np.mean([100 - np.mean(res["corruption_acc"][c]) for res, _ in runs[BASELINE].values()])
                for c in cfg.corruptions}
    rows = {}
    for r, by_seed in runs.items():
        seeds = sorted(by_seed)
        res = [by_seed[s][0] for s in seeds]
        row = {"label": ROWS[r].label, "seeds": seeds, "params_M": res[0]["params_M"]}
        for k in list(METRICS) + ["train_images_per_s", "eval_images_per_s"]:
            vals = [x[k] for x in res if x.get(k) is not None]
            row[k] = _stat(vals) if vals else None
        rce = [100 * np.mean([(100 - np.mean(x["corruption_acc"][c])) / max(base_err[c], 1e-9)
                              for c in cfg.corruptions]) for x in res]
        row["relative_ce"] = _stat(rce)
        row["severity_acc"] = {"mean": [float(np.mean([np.mean([x["corruption_acc"][c][i] for c in cfg.corruptions])
                                                      for x in res])) for i in range(len(SEVERITIES))],
                               "std": [float(np.std([np.mean([x["corruption_acc"][c][i] for c in cfg.corruptions])
                                                     for x in res], ddof=1)) if len(res) > 1 else 0.0
                                       for i in range(len(SEVERITIES))]}
        row["per_corruption_acc"] = {c: [float(np.mean([x["corruption_acc"][c][i] for x in res]))
                                         for i in range(len(SEVERITIES))] for c in cfg.corruptions}
        row["internal"] = res[0].get("internal")
        if r != BASELINE:
            row["vs_self"] = _compare(by_seed, runs[BASELINE], cfg.bootstrap)
        rows[r] = row
    swaps = []
    for (r, solver), by_seed in _load_swaps(cfg, Path(out)).items():
        seeds = sorted(by_seed)
        res = [by_seed[s][0] for s in seeds]
        item = {"trained": r, "solver": solver, "label": ROWS[r].label, "solver_label": ROWS[solver].label,
                "seeds": seeds}
        for k in list(METRICS) + ["eval_images_per_s"]:
            vals = [x[k] for x in res if x.get(k) is not None]
            item[k] = _stat(vals) if vals else None
        # the same models with their own solver (paired by seed), and self-attention as in the main table
        item["vs_own"] = _compare(by_seed, {s: runs[r][s] for s in seeds}, cfg.bootstrap)
        item["vs_self"] = _compare(by_seed, runs[BASELINE], cfg.bootstrap)
        swaps.append(item)
    return {"config": asdict(cfg), "baseline": BASELINE, "rows": rows, "swaps": swaps,
            "missing": [f"{r}-seed{s}" for r in cfg.rows for s in cfg.seeds.get(r, []) if s not in runs.get(r, {})]}


def _per_image(arrays: dict, key: str) -> np.ndarray:
    a = arrays[key].astype(np.float64)
    return a.reshape(-1, a.shape[-1]).mean(0) if key == "corrupt" else a


def _compare(row_runs: dict, base_runs: dict, n_boot: int) -> dict:
    out = {}
    paired = sorted(set(row_runs) & set(base_runs))
    for metric, key in METRICS.items():
        diffs = [row_runs[s][0][metric] - base_runs[s][0][metric] for s in paired]
        m, lo, hi = paired_seed_interval(diffs) if diffs else (None, None, None)
        img_row = np.mean([_per_image(row_runs[s][1], key) for s in row_runs], 0)
        img_base = np.mean([_per_image(base_runs[s][1], key) for s in base_runs], 0)
        bm, blo, bhi = bootstrap_interval(100 * (img_row - img_base), n_boot)
        out[metric] = {"pairs": len(paired), "diff": m, "seed_ci": [lo, hi], "image_diff": bm,
                       "image_ci": [blo, bhi]}
    return out


def _pm(d: dict | None, digits: int = 1) -> str:
    if d is None:
        return "-"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if len(d["values"]) > 1 else f"{d['mean']:.{digits}f}"


def _ci(c: dict) -> str:
    lo, hi = c["seed_ci"]
    seed = f"[{lo:+.1f}, {hi:+.1f}]" if lo is not None else "(one pair)"
    return f"{c['diff']:+.1f} {seed}; images [{c['image_ci'][0]:+.1f}, {c['image_ci'][1]:+.1f}]"


def verdict(c: dict) -> str:
    """Plain words for one paired comparison."""
    lo, hi = c["seed_ci"]
    ilo, ihi = c["image_ci"]
    if lo is None:
        return "one seed pair: no interval over seeds"
    if lo > 0 or hi < 0:
        side = "higher" if lo > 0 else "lower"
        return f"{side} than self-attention (the seed interval excludes 0)"
    if ilo > 0 or ihi < 0:
        side = "higher" if ilo > 0 else "lower"
        return (f"{side} on these test images for these models, but the seed interval includes 0: "
                f"not supported as a property of the attention")
    return "no difference supported"


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [
        f"Fashion-MNIST, {cfg['model']} ({' '.join(cfg['model_kwargs'])}), {cfg['epochs']} epochs "
        f"of {cfg['subset'] or 60000} images, batch {cfg['batch_size']}, lr {cfg['lr']} per 512; "
        f"clean top-1 on {cfg['clean_images']} test images; Fashion-MNIST-C: {len(cfg['corruptions'])} corruptions "
        f"x 5 severities of {cfg['corrupt_images']} test images; attacks on {cfg['attack_images']} test images "
        f"(PGD 5 steps of eps/2, random start). Mean ± std over seeds; rCE: corruption error relative to "
        f"self-attention's, in percent (100 = the same). Train img/s: the best epoch; eval img/s: the clean set.",
        "",
        "| Row | Seeds | Params (M) | Clean ↑ | Corrupted ↑ | rCE ↓ | PGD 1/255 ↑ | PGD 4/255 ↑ | FGSM 1/255 ↑ "
        "| Train img/s | Eval img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, row in summary["rows"].items():
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {row['params_M']:.3f} | {_pm(row['clean_acc'], 2)} | "
                     f"{_pm(row['mean_corruption_acc'])} | {_pm(row['relative_ce'])} | {_pm(row['pgd1_acc'])} | "
                     f"{_pm(row['pgd4_acc'])} | {_pm(row['fgsm1_acc'])} | {_pm(row['train_images_per_s'], 0)} | "
                     f"{_pm(row['eval_images_per_s'], 0)} |")
    lines += ["", "Paired differences against self-attention, in accuracy points: mean over seed pairs "
              "[95% t interval over seeds]; images [95% bootstrap interval over test images, each image's "
              "correctness averaged over seeds].", "",
              "| Row | Clean | Corrupted | PGD 1/255 | Verdict (corrupted) | Verdict (PGD 1/255) |", "|---|---|---|---|---|---|"]
    for r, row in summary["rows"].items():
        if "vs_self" not in row:
            continue
        v = row["vs_self"]
        lines.append(f"| {row['label']} | {_ci(v['clean_acc'])} | {_ci(v['mean_corruption_acc'])} | "
                     f"{_ci(v['pgd1_acc'])} | {verdict(v['mean_corruption_acc'])} | {verdict(v['pgd1_acc'])} |")
    if summary.get("swaps"):
        lines += ["", "Solvers swapped at test time (`--swap TRAINED:SOLVER`): a row's trained models evaluated with "
                  "another row's solver settings. Change against the same models with their own solver, in accuracy "
                  "points: mean over seeds [95% t interval over seeds]; images [95% bootstrap interval over test "
                  "images]. Last column: corrupted against self-attention, as in the table above.", "",
                  "| Trained as | Evaluated with | Seeds | Clean ↑ | Corrupted ↑ | PGD 1/255 ↑ | PGD 4/255 ↑ "
                  "| Clean change | Corrupted change | PGD 1/255 change | Corrupted vs self |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for it in summary["swaps"]:
            v, w = it["vs_own"], it["vs_self"]
            lines.append(f"| {it['label']} | {it['solver_label']} | {len(it['seeds'])} | {_pm(it['clean_acc'], 2)} | "
                         f"{_pm(it['mean_corruption_acc'])} | {_pm(it['pgd1_acc'])} | {_pm(it['pgd4_acc'])} | "
                         f"{_ci(v['clean_acc'])} | {_ci(v['mean_corruption_acc'])} | {_ci(v['pgd1_acc'])} | "
                         f"{_ci(w['mean_corruption_acc'])} |")
    inside = [(row["label"], row["internal"]) for row in summary["rows"].values()
              if row.get("internal") and row["internal"].get("clean")]
    if inside:
        lines += ["", "Inside the VARS layers (first seed; clean / corrupted at severity 3, mean over corruptions): "
                  "KKT residual (mean over problems) and fraction of zero code entries, per layer; attention-map "
                  "entropy in nats after the first and the last iteration (uniform over the patches: "
                  f"{math.log(_patches(cfg)):.2f}).", "",
                  "| Row | Layer | KKT residual | Zeros | Entropy, first → last iteration |", "|---|---|---|---|---|"]
        for label, it in inside:
            for name in it["clean"]:
                c, k = it["clean"][name], it["corrupted"][name]
                ent = (f"{c['entropy'][0]:.2f} → {c['entropy'][-1]:.2f} / {k['entropy'][0]:.2f} → {k['entropy'][-1]:.2f}"
                       if c["entropy"] and k["entropy"] else "-")
                lines.append(f"| {label} | {name} | {c['kkt_residual_mean']:.2e} / {k['kkt_residual_mean']:.2e} | "
                             f"{c['sparsity']:.2f} / {k['sparsity']:.2f} | {ent} |")
    if summary["missing"]:
        lines += ["", "Runs not finished yet: " + ", ".join(summary["missing"]) + "."]
    return "\n".join(lines) + "\n"


def _patches(cfg: dict) -> int:
    from ..robustness.cli import parse_kwargs
    p = int(parse_kwargs(cfg["model_kwargs"]).get("patch_size", 4))
    return (28 // p) ** 2


def plot_study(summary: dict, path) -> None:
    """Accuracy against corruption severity, paired differences, attention entropy per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    # one colour per row, the same in the first and the last panel (the last: clean solid, corrupted dashed)
    colour = {r: f"C{i % 10}" for i, r in enumerate(summary["rows"])}
    for r, row in summary["rows"].items():
        ys = [row["clean_acc"]["mean"]] + row["severity_acc"]["mean"]
        es = [row["clean_acc"]["std"]] + row["severity_acc"]["std"]
        ax[0].errorbar(range(6), ys, yerr=es, marker="o", ms=3, capsize=2, color=colour[r], label=row["label"])
    ax[0].set(xlabel="corruption severity (0 = clean)", ylabel="top-1 accuracy (%)",
              title="Fashion-MNIST-C, mean over corruptions")
    ax[0].legend(fontsize=7)
    comp = [(row["label"], row["vs_self"]) for row in summary["rows"].values() if "vs_self" in row]
    names = ["clean_acc", "mean_corruption_acc", "pgd1_acc", "pgd4_acc"]
    width = 0.8 / max(len(names), 1)
    for j, m in enumerate(names):
        xs = np.arange(len(comp)) + (j - (len(names) - 1) / 2) * width
        d = [c[m]["image_diff"] for _, c in comp]
        lo = [c[m]["image_diff"] - c[m]["image_ci"][0] for _, c in comp]
        hi = [c[m]["image_ci"][1] - c[m]["image_diff"] for _, c in comp]
        ax[1].bar(xs, d, width, yerr=[lo, hi], capsize=2, label=m.replace("_acc", ""))
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set_xticks(range(len(comp)), [c[0] for c in comp], rotation=30, ha="right", fontsize=7)
    ax[1].set(ylabel="accuracy - self-attention (points)", title="against self-attention (95% bootstrap over images)")
    ax[1].legend(fontsize=7)
    for r, row in summary["rows"].items():
        it = row.get("internal") or {}
        if not it.get("clean"):
            continue
        last = list(it["clean"])[-1]
        for kind, ls in (("clean", "-"), ("corrupted", "--")):
            e = it[kind][last]["entropy"]
            if e:
                ax[2].plot(range(1, len(e) + 1), e, ls, marker=".", color=colour[r], label=f"{row['label']}, {kind}")
    # log-scaled iterations: three ISTA steps and an equilibrium's hundred in one panel
    ax[2].set(xlabel="iteration (ODE: unit of time)", ylabel="entropy (nats)", xscale="log",
              title="attention-map entropy, last layer")
    if ax[2].lines:
        ax[2].legend(fontsize=6)
    else:
        ax[2].text(0.5, 0.5, "no VARS row finished yet", ha="center", va="center", transform=ax[2].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: StudyConfig, summary: dict, out) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    plot_study(summary, out / "results.png")


def _main_eval(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    evaluate_run(StudyConfig(**spec["cfg"]), spec["row"], Path(spec["run_dir"]), spec["threads"],
                 spec["fmnist_path"], Path(spec["cache_dir"]), spec.get("solver_row"))


if __name__ == "__main__":  # one run's evaluation, in its own process (see one_run)
    _main_eval(sys.argv[1])
