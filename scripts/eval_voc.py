#!/usr/bin/env python
"""Class-agnostic segmentation of PASCAL VOC 2012 from attention maps (paper Table 4).

For each image of ``ImageSets/Segmentation/<split>.txt`` the model's attention map (the global
average over tokens) is resized to the mask's size, normalised to [0, 1] and thresholded at 0.3:
foreground where the map is >= 0.3. Against the ground truth (any of the 20 classes = foreground,
0 = background, 255 = void, ignored) it reports, over all pixels of the split, mIoU (mean of the
foreground and background IoU), FP = FP / (FP + TN) and FN = FN / (FN + TP), in percent.

Attention maps: ``vars_ode.attention_maps(model, images)`` when the library provides it, else the
fallback of :func:`vars_ode.robustness.attention_maps` (a forward hook on the last attention module:
the softmax attention averaged over heads and queries for timm attention, the token-wise output norm
for other modules).

Layout (``--data-path``, e.g. VOCdevkit/VOC2012): JPEGImages/<id>.jpg, SegmentationClass/<id>.png
(palette PNG), ImageSets/Segmentation/<split>.txt.

    python scripts/eval_voc.py --data-path VOCdevkit/VOC2012 --model vars_rvt_tiny --attention vars_sd \\
        --checkpoint runs/rvt_sd/checkpoint.pth --output_dir runs/rvt_sd
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vars_ode.robustness import DatasetError, SegmentationMeter, attention_maps  # noqa: E402
from vars_ode.robustness.cli import (ArgumentParser, add_model_args, load_image, model_from_args,  # noqa: E402
                                     positive_int, run_cli)


def check_voc(root: Path, split: str) -> list[str]:
    """Validate the VOC layout and return the image ids of the split."""
    if not root.is_dir():
        raise DatasetError(f"--data-path {root} does not exist")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        if not (root / sub).is_dir():
            raise DatasetError(f"VOC: {root / sub} is missing (expected JPEGImages/, SegmentationClass/, "
                               "ImageSets/Segmentation/)")
    lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not lst.is_file():
        raise DatasetError(f"VOC: image list {lst} is missing")
    ids = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"VOC: {lst} lists no image")
    for i in ids:
        if not (root / "JPEGImages" / f"{i}.jpg").is_file():
            raise DatasetError(f"VOC: image {root / 'JPEGImages' / (i + '.jpg')} listed in {lst.name} is missing")
        if not (root / "SegmentationClass" / f"{i}.png").is_file():
            raise DatasetError(f"VOC: mask {root / 'SegmentationClass' / (i + '.png')} is missing")
    return ids


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", "--data_path", required=True, help="VOC2012 root")
    p.add_argument("--split", default="val")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--output_dir", "--output-dir", default="")
    add_model_args(p)
    args = p.parse_args(argv)
    root = Path(args.data_path)
    ids = check_voc(root, args.split)[: args.max_images]
    model = model_from_args(args).eval()
    meter = SegmentationMeter(threshold=args.threshold)
    from PIL import Image
    for i in ids:
        target = torch.from_numpy(np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))).long()
        if target.ndim != 2:
            raise DatasetError(f"VOC: mask {i}.png must be a single-channel (palette) PNG, got shape "
                               f"{tuple(target.shape)}")
        x = load_image(root / "JPEGImages" / f"{i}.jpg", args.input_size).to(args.device)
        amap = attention_maps(model, x, size=tuple(target.shape))[0].cpu()
        meter.update(amap, target)
    res = {"model": args.model, "attention": args.attention, "checkpoint": args.checkpoint or None,
           "split": args.split, "images": len(ids), "threshold": args.threshold, **meter.compute()}
    print("| Model | mIoU | FP | FN |\n|---|---|---|---|")
    print(f"| {args.model} ({args.attention}) | {res['mIoU']:.2f} | {res['FP']:.2f} | {res['FN']:.2f} |")
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "voc_results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
