#!/usr/bin/env python
"""Domain generalisation on PACS, leave one domain out (paper Table 3).

For each target domain the (ImageNet-pretrained) model is fine-tuned on the three other domains and
tested on the held-out one. The classifier head is re-initialised for the 7 PACS classes (tensors of
the checkpoint whose shape differs are skipped). Optimisation: AdamW, cosine schedule, label
smoothing 0.1, RandomResizedCrop + flip; accuracy in percent on the whole target domain.

Layout (``--data-path``): <domain>/<class>/<image>, all domains with the same classes, e.g.
photo/, art_painting/, cartoon/, sketch/ (PACS's kfold folder).

    python scripts/eval_pacs.py --data-path PACS/kfold --model vars_rvt_tiny --attention vars_sd \\
        --checkpoint runs/rvt_sd/checkpoint.pth --epochs 10 --output_dir runs/rvt_sd/pacs
"""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vars_ode.robustness import DatasetError, NormalizedModel, check_image_folder, evaluate  # noqa: E402
from vars_ode.robustness.cli import (IMAGENET_MEAN, IMAGENET_STD, ArgumentParser, add_model_args,  # noqa: E402
                                     model_from_args, non_negative_int, positive_int, run_cli)


def check_pacs(root: Path) -> tuple[list[str], list[str]]:
    """(domains, classes); every domain must hold the same class folders."""
    if not root.is_dir():
        raise DatasetError(f"--data-path {root} does not exist")
    domains = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(domains) < 2:
        raise DatasetError(f"PACS: {root} must hold at least two domain folders (<domain>/<class>/<image>), "
                           f"found {domains}")
    classes = check_image_folder(root / domains[0], f"PACS domain {domains[0]}")
    for d in domains[1:]:
        check_image_folder(root / d, f"PACS domain {d}", expected_classes=classes)
    return domains, classes


def transforms(size: int, train: bool):
    from torchvision.transforms import v2 as T
    if train:
        return T.Compose([T.RGB(), T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                          T.RandomHorizontalFlip(), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return T.Compose([T.RGB(), T.Resize((size, size), antialias=True), T.ToImage(),
                      T.ToDtype(torch.float32, scale=True), ClampPixels()])


class ClampPixels(torch.nn.Module):
    def forward(self, x):
        return x.clamp(0, 1)


def finetune_and_test(args, root: Path, domains: list[str], classes: list[str], target: str) -> float:
    from timm.loss import LabelSmoothingCrossEntropy
    from torchvision.datasets import ImageFolder
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    sources = [d for d in domains if d != target]
    train = torch.utils.data.ConcatDataset([ImageFolder(str(root / d), transform=transforms(args.input_size, True))
                                            for d in sources])
    test = ImageFolder(str(root / target), transform=transforms(args.input_size, False))
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g,
                                         num_workers=args.num_workers, drop_last=len(train) > args.batch_size)
    model = model_from_args(args, num_classes=len(classes))
    steps = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    total = max(1, steps * args.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    crit = LabelSmoothingCrossEntropy(0.1)
    model.train()
    for epoch in range(args.epochs):
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            x, y = x.to(args.device), y.to(args.device)
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"target {target} epoch {epoch}: loss {loss.item():.4f}", flush=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=args.batch_size, num_workers=args.num_workers)
    net = NormalizedModel(model, IMAGENET_MEAN, IMAGENET_STD).to(args.device)
    return evaluate(net, test_loader, args.device)["acc1"]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", "--data_path", required=True, help="PACS root: <domain>/<class>/<image>")
    p.add_argument("--target", nargs="*", default=None, help="held-out domain(s) (default: each in turn)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", "--batch_size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    p.add_argument("--num_workers", "--num-workers", type=non_negative_int, default=4)
    p.add_argument("--output_dir", "--output-dir", default="")
    add_model_args(p)
    args = p.parse_args(argv)
    root = Path(args.data_path)
    domains, classes = check_pacs(root)
    targets = args.target or domains
    for t in targets:
        if t not in domains:
            raise DatasetError(f"--target {t!r} is not a domain of {root}: {domains}")
    res = {t: finetune_and_test(args, root, domains, classes, t) for t in targets}
    dropped = getattr(args, "dropped_tensors", [])
    if dropped:
        print(f"note: {len(dropped)} tensors of the checkpoint did not fit and were initialised afresh: "
              f"{dropped[:5]}", file=sys.stderr)
    print("| Model | " + " | ".join(targets) + " | mean |\n|---|" + "---|" * (len(targets) + 1))
    print(f"| {args.model} ({args.attention}) | " + " | ".join(f"{res[t]:.2f}" for t in targets) +
          f" | {sum(res.values()) / len(res):.2f} |")
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "pacs_results.json").write_text(json.dumps(
            {"model": args.model, "attention": args.attention, "checkpoint": args.checkpoint or None,
             "accuracy": res, "classes": classes, "reinitialised_tensors": dropped}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
