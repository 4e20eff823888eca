#!/usr/bin/env python
"""The robustness study on Fashion-MNIST: self-attention, Performer, VARS-S / -D / -SD, and VARS-D solved
with FISTA, dopri5 and at the equilibrium, one small ViT and one recipe for all (vars_ode.robustness.study).

    python scripts/robustness_study.py                   # the committed study -> results/fmnist/
    python scripts/robustness_study.py --preset quick    # self vs VARS-D, one seed, about 10 minutes on 2 cores
    python scripts/robustness_study.py --rows self vars_d --jobs 2   # some rows, two runs at a time
    python scripts/robustness_study.py --swap vars_d_eq:vars_d       # the equilibrium's models with 3 ISTA steps

Every (row, seed) is a folder under <output>/runs/; a finished run is not repeated, an interrupted one
resumes from its last epoch; results.json, results.md and results.png are rebuilt from the finished
runs at the end (``--report`` only rebuilds them). Runs not finished yet are listed in results.md.
``--swap TRAINED:SOLVER`` trains nothing: it evaluates the finished runs of one row with the solver settings of
another row of the same attention (each once; files ``eval_as_<SOLVER>.*`` in the run's folder) and adds them to
the report.

Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist`` or --fmnist-path) and
``pip install imagecorruptions-imaug`` (Fashion-MNIST-C is generated once and cached).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vars_ode.robustness import DatasetError, find_fashion_mnist, missing_vars_models, require_imagecorruptions  # noqa: E402
from vars_ode.robustness.cli import ArgumentParser, parse_kwargs, positive_int  # noqa: E402
from vars_ode.robustness.study import PRESETS, ROWS, parse_swap, run_study, run_swaps, summarize, write_report  # noqa: E402


def swap_arg(text: str) -> tuple[str, str]:
    try:
        return parse_swap(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--swap ").removeprefix("--swap: ")) from None


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="study settings (default full)")
    p.add_argument("--output-dir", "--output_dir", default=None, help="default results/fmnist (full) or "
                   "runs/study-<preset>")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="default: the preset's rows")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds per row (default: the preset's; full: 3 for self and vars_d, 2 for the others)")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--subset", type=positive_int, default=None, help="training images")
    p.add_argument("--model", default=None, help="timm host (default vars_deit_tiny)")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="the host's shape")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (each with cores / jobs threads)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per run")
    p.add_argument("--fmnist-path", default=None)
    p.add_argument("--report", action="store_true", help="only rebuild results.* from the finished runs")
    p.add_argument("--swap", nargs="+", type=swap_arg, default=None, metavar="TRAINED:SOLVER",
                   help="evaluate the finished runs of row TRAINED with the solver of row SOLVER (same attention), "
                        "e.g. vars_d_eq:vars_d; trains nothing")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(PRESETS[a.preset])
    if a.seeds:
        cfg.seeds = {r: list(range(a.seeds)) for r in ROWS}
    for name in ("epochs", "batch_size", "subset", "model", "model_kwargs"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    # the report covers the preset's rows and any asked for (or swapped), so that running some rows keeps the others
    # in results.*; the runs are those of --rows (default: all of the report's)
    asked = list(a.rows or []) + [t for t, _ in (a.swap or [])]
    report_rows = list(dict.fromkeys(list(cfg.rows) + asked))
    a.report_cfg = dataclasses.replace(cfg, rows=report_rows,
                                       seeds={r: cfg.seeds.get(r, [0]) for r in report_rows})
    run_rows = report_rows if not a.rows else (list(a.rows) if "self" in a.rows else ["self", *a.rows])
    a.cfg = dataclasses.replace(cfg, rows=run_rows, seeds={r: cfg.seeds.get(r, [0]) for r in run_rows})
    a.output_dir = Path(a.output_dir or (ROOT / "results" / "fmnist" if a.preset == "full" else f"runs/study-{a.preset}"))
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
    try:
        kw = parse_kwargs(a.cfg.model_kwargs)
    except ValueError as e:
        return problems + [str(e)]
    atts = sorted({ROWS[r].attention for r in a.cfg.rows} - {"self", "performer"})
    problems += missing_vars_models(atts or ["vars_d"], a.cfg.model, num_classes=10, in_chans=1, img_size=28, **kw)
    return problems


def main(argv=None) -> int:
    a = get_args(argv)
    if a.report:
        try:
            s = summarize(a.report_cfg, a.output_dir)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_report(a.report_cfg, s, a.output_dir)
        print((a.output_dir / "results.md").read_text())
        return 0
    problems = preflight(a)
    if problems:
        print("robustness_study: cannot run, missing:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    t0 = time.time()
    if a.swap:
        try:
            run_swaps(a.report_cfg, a.output_dir, a.swap, threads=a.threads, fmnist_path=a.fmnist_path,
                      log=lambda m: print(m, flush=True), report_cfg=a.report_cfg)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print((a.output_dir / "results.md").read_text())
        print(f"swaps: {time.time() - t0:.0f} s; {a.output_dir}/results.json, results.md, results.png")
        return 0
    try:
        run_study(a.cfg, a.output_dir, jobs=a.jobs, threads=a.threads, fmnist_path=a.fmnist_path,
                  log=lambda m: print(m, flush=True), report_cfg=a.report_cfg)
    except ValueError as e:  # settings that do not match the runs already in the folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((a.output_dir / "results.md").read_text())
    print(f"study: {time.time() - t0:.0f} s; {a.output_dir}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
