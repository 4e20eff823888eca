"""Argument and checkpoint helpers shared by the evaluation scripts in scripts/."""
from __future__ import annotations

import argparse
import ast
import sys

import torch
import torch.nn as nn

from .engine import create_model

__all__ = ["ArgumentParser", "MAX_DROPPED_FRACTION", "add_model_args", "load_image", "load_weights", "model_from_args",
           "non_negative_float", "non_negative_int", "parse_kwargs", "positive_int", "probability", "run_cli"]

#: ``load_weights(drop_mismatched=True)`` refuses a checkpoint when more than this fraction of the
#: model's tensors would keep their initial values (a different model, not a different head)
MAX_DROPPED_FRACTION = 0.25


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (the error names the value)."""
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a rate, a weight decay)."""
    v = float(text)
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text}")
    return v


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return v


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--drop`` never means ``--drop-path``) whose errors are one
    line, ``error: ...``, with exit status 2 (no usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see --help)\n")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_model_args(p: argparse.ArgumentParser, default_classes: int = 1000) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vars_rvt_tiny", help="any timm-registered model")
    g.add_argument("--attention", default=None, help="self | performer | vars_s | vars_d | vars_sd (| gfnet)")
    g.add_argument("--lam", type=float, default=None)
    g.add_argument("--num_step", "--num-step", type=positive_int, default=None)
    g.add_argument("--rand_feat_dim_ratio", "--rand-feat-dim-ratio", type=float, default=None)
    g.add_argument("--solver", default=None)
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords (Python literals)")
    g.add_argument("--num-classes", type=positive_int, default=default_classes, help="classes of the checkpoint's head")
    g.add_argument("--input-size", "--input_size", type=positive_int, default=224)
    g.add_argument("--checkpoint", "--resume", dest="checkpoint", default="",
                   help="weights: a train_imagenet.py checkpoint ({'model': ...}) or a plain state dict")
    g.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that weights-only loading refuses (full pickle: it can run code)")
    g.add_argument("--device", default=None, help="cuda | cpu (default cuda when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=positive_int, default=None)


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


def load_weights(model: nn.Module, path, ema: bool = False, drop_mismatched: bool = False,
                 trusted: bool = False, max_dropped_fraction: float = MAX_DROPPED_FRACTION) -> list[str]:
    """Load weights from ``path`` into ``model``; returns the keys left at their initial value.

    The file is read by :func:`vars_ode.models.load_checkpoint_file` (weights only unless
    ``trusted``). Without ``drop_mismatched`` names and shapes must match exactly (a
    :class:`~vars_ode.models.CheckpointError` names the first differences). ``drop_mismatched`` skips
    tensors whose shape differs or that the checkpoint lacks (e.g. a 1000-class head when fine-tuning
    on 7 PACS classes), but refuses when more than ``max_dropped_fraction`` of the model's tensors
    would be skipped: that is a different model, not a different head.
    """
    from ..models.checkpoint import CheckpointError, check_state_dict, load_checkpoint_file, official_state_dict
    ckpt = load_checkpoint_file(path, trusted=trusted)
    if isinstance(ckpt, dict) and ema and ckpt.get("model_ema") is None:
        raise CheckpointError(f"checkpoint {path} has no EMA weights (model_ema); drop --ema")
    key = "model_ema" if ema else ("model" if isinstance(ckpt, dict) and "model" in ckpt else "state_dict")
    state = official_state_dict(ckpt, key=key) if isinstance(ckpt, dict) and key in ckpt else official_state_dict(ckpt)
    own = model.state_dict()
    if not drop_mismatched:
        check_state_dict(model, state, limit=5, what=f"checkpoint {path}")
        model.load_state_dict(state, strict=True)
        return []
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has keys the model lacks: {unexpected[:5]}")
    kept = {k: v for k, v in state.items() if tuple(own[k].shape) == tuple(v.shape)}
    dropped = sorted(k for k in own if k not in kept)
    if len(dropped) > max_dropped_fraction * len(own):
        raise CheckpointError(f"checkpoint {path} fits only {len(kept)} of the model's {len(own)} tensors "
                              f"({len(dropped)} would keep their initial values, more than "
                              f"{max_dropped_fraction:.0%}; first: {dropped[:5]}): wrong --model or options?")
    model.load_state_dict(kept, strict=False)
    return dropped


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
        missing = load_weights(model, args.checkpoint, ema=args.ema,
                               drop_mismatched=num_classes is not None and num_classes != args.num_classes,
                               trusted=getattr(args, "trust_checkpoint", False))
        args.dropped_tensors = missing
        if missing:
            print(f"note: {len(missing)} tensors not in the checkpoint keep their initialisation "
                  f"(e.g. {missing[:3]})", file=sys.stderr)
    else:
        print("warning: no --checkpoint: using randomly initialised weights", file=sys.stderr)
    return model.to(args.device)


def run_cli(main) -> None:
    """Run ``main()``; bad input (a ValueError: dataset, checkpoint or argument errors) prints one line
    ``error: ...`` on stderr and exits with status 2, without a traceback."""
    try:
        sys.exit(main())
    except ValueError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def load_image(path, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB image resized (bicubic) to size x size and normalised: (1, 3, size, size)."""
    import numpy as np
    from PIL import Image
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((x.clamp(0, 1) - m) / s)[None]
