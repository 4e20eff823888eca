#!/usr/bin/env python
"""Alignment of attention maps with human eye fixations on MIT1003: NSS (paper Table 5).

NSS of one image: the attention map (resized to the image, see eval_voc.py for how maps are obtained)
is standardised, (S - mean S) / std S, and averaged over the fixated pixels; the score is the mean
over images.

Layout (``--data-path``): ALLSTIMULI/<name>.jpeg (or .jpg/.png) and, for each stimulus, fixation
points in ALLFIXATIONMAPS/ as either ``<name>_fixPts.jpg``/``.png`` (the MIT1003 binary fixation
image: pixels > 127 are fixations) or ``<name>_fixPts.npy``/``.txt`` with one "row col" pair per
fixation. The continuous ``<name>_fixMap.jpg`` maps are not used by NSS.

    python scripts/eval_mit1003.py --data-path MIT1003 --model vars_rvt_tiny --attention vars_sd \\
        --checkpoint runs/rvt_sd/checkpoint.pth
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vars_ode.robustness import DatasetError, attention_maps, nss  # noqa: E402
from vars_ode.robustness.cli import (ArgumentParser, add_model_args, load_image, model_from_args,  # noqa: E402
                                     positive_int, run_cli)

STIMULUS_EXT = (".jpeg", ".jpg", ".png")


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(stimulus, fixation file) pairs; DatasetError when the layout is wrong."""
    stim_dir, fix_dir = root / "ALLSTIMULI", root / "ALLFIXATIONMAPS"
    for d in (stim_dir, fix_dir):
        if not d.is_dir():
            raise DatasetError(f"MIT1003: {d} is missing (expected ALLSTIMULI/ and ALLFIXATIONMAPS/)")
    stimuli = sorted(f for f in stim_dir.iterdir() if f.suffix.lower() in STIMULUS_EXT)
    if not stimuli:
        raise DatasetError(f"MIT1003: {stim_dir} holds no image")
    pairs = []
    for s in stimuli:
        cands = [fix_dir / f"{s.stem}_fixPts{ext}" for ext in (".jpg", ".png", ".npy", ".txt")]
        fix = next((c for c in cands if c.is_file()), None)
        if fix is None:
            raise DatasetError(f"MIT1003: no fixation points for {s.name} (looked for {s.stem}_fixPts.jpg/"
                               f".png/.npy/.txt in {fix_dir})")
        pairs.append((s, fix))
    return pairs


def load_fixations(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Fixations as a boolean (H, W) map or (F, 2) (row, col) coordinates."""
    if path.suffix in (".npy", ".txt"):
        pts = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
        return np.asarray(pts, dtype=np.int64).reshape(-1, 2)
    from PIL import Image
    m = np.asarray(Image.open(path).convert("L"))
    if m.shape != shape:
        raise DatasetError(f"MIT1003: fixation map {path.name} is {m.shape}, stimulus is {shape}")
    return m > 127


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", "--data_path", required=True, help="MIT1003 root")
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--output_dir", "--output-dir", default="")
    add_model_args(p)
    args = p.parse_args(argv)
    pairs = find_pairs(Path(args.data_path))[: args.max_images]
    model = model_from_args(args).eval()
    from PIL import Image
    scores = []
    for stim, fix in pairs:
        w, h = Image.open(stim).size
        x = load_image(stim, args.input_size).to(args.device)
        amap = attention_maps(model, x, size=(h, w))[0].cpu()
        score = nss(amap, load_fixations(fix, (h, w)))
        if not math.isnan(score):
            scores.append(score)
    if not scores:
        raise DatasetError("MIT1003: no image had any fixation")
    res = {"model": args.model, "attention": args.attention, "checkpoint": args.checkpoint or None,
           "images": len(scores), "NSS": float(np.mean(scores))}
    print(f"| Model | NSS |\n|---|---|\n| {args.model} ({args.attention}) | {res['NSS']:.3f} |")
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "mit1003_results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
