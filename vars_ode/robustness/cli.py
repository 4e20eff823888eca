"""Argument and checkpoint helpers shared by the evaluation scripts in scripts/."""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .engine import create_model

__all__ = ["add_model_args", "model_from_args", "load_weights", "parse_kwargs", "run_cli", "load_image"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_model_args(p: argparse.ArgumentParser, default_classes: int = 1000) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vars_rvt_tiny", help="any timm-registered model")
    g.add_argument("--attention", default=None, help="self | performer | vars_s | vars_d | vars_sd (| gfnet)")
    g.add_argument("--lam", type=float, default=None)
    g.add_argument("--num_step", "--num-step", type=int, default=None)
    g.add_argument("--rand_feat_dim_ratio", "--rand-feat-dim-ratio", type=float, default=None)
    g.add_argument("--solver", default=None)
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords (Python literals)")
    g.add_argument("--num-classes", type=int, default=default_classes, help="classes of the checkpoint's head")
    g.add_argument("--input-size", "--input_size", type=int, default=224)
    g.add_argument("--checkpoint", "--resume", dest="checkpoint", default="",
                   help="weights: a train_imagenet.py checkpoint ({'model': ...}) or a plain state dict")
    g.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    g.add_argument("--device", default=None, help="cuda | cpu (default cuda when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None)


def parse_kwargs(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def load_weights(model: nn.Module, path, ema: bool = False, drop_mismatched: bool = False) -> list[str]:
    """Load weights from ``path`` into ``model``; returns the keys left at their initial value.

    ``drop_mismatched`` skips tensors whose shape differs (e.g. a 1000-class head when fine-tuning on
    7 PACS classes) instead of failing.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt
    if isinstance(ckpt, dict):
        if ema and ckpt.get("model_ema") is not None:
            state = {k.removeprefix("module."): v for k, v in ckpt["model_ema"].items()}
        elif "model" in ckpt:
            state = ckpt["model"]
        elif "state_dict" in ckpt:
            state = ckpt["state_dict"]
    own = model.state_dict()
    if drop_mismatched:
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(state, strict=not drop_mismatched)
    if unexpected:
        raise ValueError(f"checkpoint {path} has keys the model lacks: {unexpected[:5]}")
    return list(missing)


def model_from_args(args, num_classes: int | None = None, in_chans: int = 3) -> nn.Module:
    """Build ``args.model`` and load ``args.checkpoint`` (if given) onto ``args.device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = dict(lam=args.lam, num_step=args.num_step, rand_feat_dim_ratio=args.rand_feat_dim_ratio,
                 solver=args.solver)
    model = create_model(args.model, num_classes=num_classes or args.num_classes, in_chans=in_chans,
                         img_size=args.input_size, attention=args.attention, layer_kwargs=layer,
                         **parse_kwargs(args.model_kwargs))
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
        missing = load_weights(model, args.checkpoint, ema=args.ema,
                               drop_mismatched=num_classes is not None and num_classes != args.num_classes)
        if missing:
            print(f"note: {len(missing)} tensors not in the checkpoint keep their initialisation "
                  f"(e.g. {missing[:3]})", file=sys.stderr)
    else:
        print("warning: no --checkpoint: using randomly initialised weights", file=sys.stderr)
    return model.to(args.device)


def run_cli(main) -> None:
    """Run ``main()``; dataset / argument errors print ``error: ...`` and exit with status 2."""
    from .datasets import DatasetError
    try:
        sys.exit(main())
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_image(path, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB image resized (bicubic) to size x size and normalised: (1, 3, size, size)."""
    import numpy as np
    from PIL import Image
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((x.clamp(0, 1) - m) / s)[None]
