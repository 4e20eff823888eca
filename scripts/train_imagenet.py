#!/usr/bin/env python
"""Train or evaluate a (VARS) vision transformer on ImageNet, or offline on Fashion-MNIST / digits.

Read top to bottom: arguments, distributed setup, data (validated before anything else), model,
optimiser / schedule / EMA / mixup, resume, evaluation-only path, training loop.

The defaults are the paper's recipe and every flag of the official main.py (bfshi/VARS) is accepted with
its official spelling and default: AdamW with lr 5e-4 per 512 images (scaled by the global batch / 512),
weight decay 0.05, cosine schedule with 5 warm-up epochs, 300 epochs, RandAugment rand-m9-mstd0.5-inc1,
mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25, drop path 0.1, repeated augmentation,
EMA 0.99996, and mixed precision on CUDA (bfloat16 where the card has it, else the official float16;
``--no-amp`` for float32). The official model names (rvt_tiny, rvt_small, rvt_base, their RVT+ ``_plus``
variants with learned position masks) and attention names
(self-att, perf) are aliases; with an official model name, vars_d / vars_sd use the official-compatible
layers (``compat="official"``), so a released checkpoint loads with ``--resume`` as it is. Official flags
whose feature is not built here (distillation, patch augmentation, tar data, CIFAR / iNat) stop with a
one-line error naming the flag. With ``--data-set fashion-mnist|digits`` the
augmentation defaults switch to small-image ones (random crop with padding, flip for Fashion-MNIST, no
RandAugment / mixup / cutmix / erasing / repeated augmentation, 1 warm-up epoch); any explicit flag wins.
``-c config.yaml`` sets defaults from a file, as timm's train.py.

Evaluation follows the official protocols: clean, ImageNet-A / -R (their 200 classes' logits) /
-Sketch, PGD and FGSM on the validation transform (resize to 256/224 of the side, centre crop);
ImageNet-C images centre-cropped only (no resampling). The mCE is over the 15 benchmark corruptions,
normalised by AlexNet's errors; other corruption folders are reported apart. Each set's result is
printed and saved in ``<output_dir>/eval_progress.json`` as it finishes, and a rerun of the same command
continues where an interrupted evaluation stopped.

Examples:
    # the official README commands (main.py -> scripts/train_imagenet.py)
    python -m torch.distributed.launch --nproc_per_node=8 --master_port 12345 scripts/train_imagenet.py \
        --model rvt_tiny --data-path /data/imagenet --output_dir runs/rvt_d --num_workers 8 --batch-size 128 \
        --attention vars_d
    python scripts/train_imagenet.py --model rvt_tiny --data-path /data/imagenet --eval \
        --resume runs/rvt_d/checkpoint.pth --attention vars_d --inc_path /data/imagenet-c \
        --ina_path /data/imagenet-a --inr_path /data/imagenet-r --insk_path /data/imagenet-sketch \
        --pgd_test --fgsm_test --output_dir runs/rvt_d/eval
    # the same with torchrun and our names
    torchrun --nproc_per_node 8 scripts/train_imagenet.py --data-path /data/imagenet \
        --model vars_rvt_tiny --attention vars_sd --batch-size 64 --output_dir runs/rvt_sd --resume auto
    # offline, CPU
    python scripts/train_imagenet.py --data-set fashion-mnist --device cpu --model deit_tiny_patch16_224 \
        --model-kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --epochs 5 --batch-size 128 \
        --output_dir runs/fmnist

Checkpoints (``<output_dir>/checkpoint.pth``) are written atomically after every epoch and hold the
model, optimiser, scheduler, EMA, grad scaler, every RNG state and the arguments, as tensors and plain
Python values: every checkpoint is read with weights-only loading (``--trust-checkpoint`` opts in to
full unpickling for a trusted file that needs it). ``--resume`` continues bit-for-bit (CPU, fixed seed):
the data order and all augmentation randomness of an epoch are a function of (seed, epoch, rank) only;
a checkpoint of the official main.py continues from its epoch. ``--resume auto`` continues from
``<output_dir>/checkpoint.pth`` when there is one and starts afresh otherwise, so that one command serves
the first launch and every restart (``torchrun --max-restarts``, a requeued cluster job). ``--finetune
FILE`` starts a new run from a file's weights (a classifier of another size is re-initialised). Bad
input (a dataset layout, a checkpoint that is unreadable, of another model or weights-only for
``--resume``, a flag value) ends with one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vars_ode import GRAD_MODES, VARSLayer, calibrate_budget  # noqa: E402
from vars_ode.models._factory import EVAL_CROP_PCT  # noqa: E402  (the hosts' pretrained_cfg crop_pct)
from vars_ode.models.checkpoint import (CheckpointError, check_state_dict, load_checkpoint_file,  # noqa: E402
                                       official_state_dict)
from vars_ode.robustness.cli import (ArgumentParser, non_negative_float, non_negative_int, parse_kwargs,  # noqa: E402
                                     positive_int, probability, run_cli)
from vars_ode.robustness import (ALEXNET_ERRORS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError,  # noqa: E402
                                 BatchAugment, NormalizedModel, TensorImageDataset, autocast, check_image_folder,
                                 check_train_val_root, create_model, evaluate, fashion_mnist_c, fgsm_attack,
                                 find_fashion_mnist, imagenet_c_folders, imagenet_subset_indices,
                                 load_digits_arrays, load_fashion_mnist, mean_corruption_error, pgd_attack)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# small-image defaults for the offline data sets; the recipe's values (None in argparse) otherwise
SMALL_DATA_DEFAULTS = dict(aa="none", mixup=0.0, cutmix=0.0, reprob=0.0, warmup_epochs=1, drop_path=0.0,
                           repeated_aug=False)
RECIPE_DEFAULTS = dict(aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25, warmup_epochs=5,
                       drop_path=0.1, repeated_aug=True)
DEFAULT_INPUT_SIZE = {"imagenet": 224, "fashion-mnist": 28, "digits": 8}


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
#: official model names (bfshi/VARS robust_models.py) -> ours; with a VARS attention the official names
#: also select the official-compatible layers (compat="official"), so released checkpoints load as they are
OFFICIAL_MODELS = {"rvt_tiny": "vars_rvt_tiny", "rvt_small": "vars_rvt_small", "rvt_base": "vars_rvt_base"}
#: the official RVT+ variants: the RVT model whose first blocks (10 / 5 / 5) have learned position masks
#: (softmax attention only, ``masked_blocks``)
OFFICIAL_PLUS_MODELS = {"rvt_tiny_plus": ("rvt_tiny", 10), "rvt_small_plus": ("rvt_small", 5),
                        "rvt_base_plus": ("rvt_base", 5)}
#: official --attention values -> ours
OFFICIAL_ATTENTIONS = {"self-att": "self", "perf": "performer"}
ATTENTION_CHOICES = ("self", "performer", "vars_s", "vars_d", "vars_sd", "gfnet", *OFFICIAL_ATTENTIONS)
#: official --data-set values: IMNET is ImageNet; the others are not supported here
DATA_SETS = ("imagenet", "IMNET", "fashion-mnist", "digits")
UNSUPPORTED_DATA_SETS = ("CIFAR", "INAT", "INAT19")


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of the official main.py (same spelling, same default) plus ours.

    Official flags whose feature is not built here are accepted with their official default and refused
    with a one-line error when set to anything else (see :data:`UNSUPPORTED`)."""
    p = ArgumentParser("VARS training and robustness evaluation", add_help=True)
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML file of argument defaults (keys are the flags' names with '_'); the command line wins")
    # data
    p.add_argument("--data-path", "--data_path", default=None, help="ImageFolder root with train/ and val/")
    p.add_argument("--data-set", "--data_set", default="imagenet", choices=DATA_SETS + UNSUPPORTED_DATA_SETS,
                   help="imagenet (official name IMNET): ImageFolder at --data-path; fashion-mnist / digits: offline data")
    p.add_argument("--data_type", default="folder", choices=["folder", "tar"], help="official; only 'folder'")
    p.add_argument("--inat-category", default="name", help="official (iNaturalist only; unused here)")
    p.add_argument("--fmnist-path", default=None, help="folder of the Fashion-MNIST IDX files "
                   "(default: $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--input-size", "--input_size", type=positive_int, default=None,
                   help="image side (default 224 / 28 / 8 for imagenet / fashion-mnist / digits)")
    p.add_argument("--subset", type=positive_int, default=None, help="train on a fixed random subset of N images")
    p.add_argument("--eval-subset", type=positive_int, default=None, help="evaluate on at most N images of each set")
    p.add_argument("--num_workers", "--num-workers", type=non_negative_int, default=10)
    p.add_argument("--pin-mem", dest="pin_mem", action="store_true", default=True,
                   help="pin host memory (default on; used on CUDA only)")
    p.add_argument("--no-pin-mem", dest="pin_mem", action="store_false")
    # model
    p.add_argument("--model", default="vars_rvt_tiny",
                   help="any timm-registered model; official names rvt_tiny / rvt_small / rvt_base (and _plus) are aliases")
    p.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                   help="self | performer | vars_s | vars_d | vars_sd (| gfnet); official self-att / perf too")
    p.add_argument("--lam", type=float, default=None, help="VARS sparsity weight (model default: 0.3)")
    p.add_argument("--num_step", "--num-step", type=positive_int, default=None,
                   help="VARS solver steps (model default: 5 official-compatible, 3 paper)")
    p.add_argument("--rand_feat_dim_ratio", "--rand-feat-dim-ratio", type=float, default=None,
                   help="random features per head dimension (model default: 2)")
    p.add_argument("--solver", default=None, help="VARS solver name (ista, fista, an ODE method, ...)")
    p.add_argument("--grad", default=None, choices=sorted(GRAD_MODES),
                   help="VARS gradient mode (layer default: unroll; the solvers that do not unroll, e.g. "
                        "scipy_solver, need implicit)")
    p.add_argument("--calibrate-budget", type=non_negative_int, nargs="?", const=1, default=None, metavar="SPARE",
                   help="dopri5 / bosh3 over a horizon: at each epoch's first step, give every such layer a budget "
                        "of attempts of what its adaptive loop takes on that batch plus SPARE (default 1), the "
                        "largest over the processes (vars_ode.calibrate_budget)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords, values as Python literals (patch_size=4)")
    p.add_argument("--drop", type=probability, default=0.0, help="dropout rate (official; default 0)")
    p.add_argument("--drop-path", type=probability, default=None, help="drop path rate (recipe 0.1)")
    p.add_argument("--finetune", default="", help="start training from these weights (model only; a head of "
                   "another size is re-initialised)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm pretrained weights (the VARS hosts have none to download: use --finetune FILE)")
    p.add_argument("--use_patch_aug", action="store_true", help="official RVT patch augmentation (not supported)")
    # optimisation (the paper's recipe)
    p.add_argument("--batch-size", "--batch_size", type=positive_int, default=64, help="per process")
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--start_epoch", type=non_negative_int, default=0, help="first epoch of a run without --resume")
    p.add_argument("--opt", default="adamw", help="timm optimizer name")
    p.add_argument("--opt-eps", type=float, default=1e-8)
    p.add_argument("--opt-betas", type=float, nargs="+", default=None)
    p.add_argument("--momentum", type=float, default=0.9, help="for SGD-like optimizers")
    p.add_argument("--lr", type=non_negative_float, default=5e-4, help="learning rate per 512 images (scaled by global batch)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--sched", default="cosine", help="timm scheduler name")
    p.add_argument("--lr-noise", type=float, nargs="+", default=None)
    p.add_argument("--lr-noise-pct", type=float, default=0.67)
    p.add_argument("--lr-noise-std", type=float, default=1.0)
    p.add_argument("--warmup-epochs", type=non_negative_int, default=None, help="recipe 5")
    p.add_argument("--warmup-lr", type=non_negative_float, default=1e-6)
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--decay-epochs", type=float, default=30)
    p.add_argument("--cooldown-epochs", type=non_negative_int, default=10,
                   help="official; as there, the run still ends after --epochs")
    p.add_argument("--patience-epochs", type=non_negative_int, default=10)
    p.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--aa", default=None, help="auto-augment policy (recipe rand-m9-mstd0.5-inc1; 'none' off)")
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--smoothing", type=probability, default=0.1)
    p.add_argument("--train-interpolation", default="bicubic")
    p.add_argument("--repeated-aug", dest="repeated_aug", action="store_true", default=None,
                   help="repeated augmentation sampler (recipe on; off for the offline data sets)")
    p.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false")
    p.add_argument("--mixup", type=non_negative_float, default=None, help="recipe 0.8")
    p.add_argument("--cutmix", type=non_negative_float, default=None, help="recipe 1.0")
    p.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    p.add_argument("--mixup-prob", type=probability, default=1.0)
    p.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    p.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"])
    p.add_argument("--reprob", type=probability, default=None, help="random erasing probability (recipe 0.25)")
    p.add_argument("--remode", default="pixel")
    p.add_argument("--recount", type=positive_int, default=1)
    p.add_argument("--resplit", action="store_true")
    p.add_argument("--teacher-model", default="regnety_160", help="official distillation (not supported)")
    p.add_argument("--teacher-path", default="")
    p.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    p.add_argument("--distillation-alpha", type=float, default=0.5)
    p.add_argument("--distillation-tau", type=float, default=1.0)
    p.add_argument("--model-ema", dest="model_ema", action="store_true", default=True)
    p.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    p.add_argument("--model-ema-decay", type=float, default=0.99996)
    p.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA weights on the CPU")
    p.add_argument("--eval-ema", action="store_true", help="--eval uses the checkpoint's EMA weights")
    # run
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="autocast (default on CUDA: bfloat16 where the card has it, else float16 as the official code)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="full precision")
    p.add_argument("--amp-dtype", default=None, choices=["bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--output_dir", "--output-dir", default="",
                   help="checkpoint, log.csv, results.json (official default '': nothing is saved)")
    p.add_argument("--resume", default="",
                   help="checkpoint to continue from (or to evaluate with --eval); 'auto': <output_dir>/checkpoint.pth "
                        "when it exists, else a fresh start (for torchrun --max-restarts and job requeues)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints that weights-only loading refuses (full pickle: the file can run code)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None, help="cap the optimiser steps per epoch")
    p.add_argument("--eval-every", type=non_negative_int, default=1,
                   help="evaluate every N epochs (0: never during training)")
    p.add_argument("--print-freq", type=positive_int, default=50,
                   help="when stderr is not a terminal (a log file): a loss line every N steps instead of a bar")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-step lines")
    p.add_argument("--log-wandb", action="store_true", help="log to Weights & Biases (when wandb is installed)")
    p.add_argument("--experiment", default="", help="W&B run name")
    # distributed (torchrun sets the environment; torch.distributed.launch also passes --local_rank)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by python -m torch.distributed.launch; LOCAL_RANK from the environment wins")
    p.add_argument("--world_size", type=positive_int, default=1, help="official; the environment's WORLD_SIZE is used")
    p.add_argument("--dist_url", default="env://", help="torch.distributed init method")
    p.add_argument("--dist-eval", action="store_true",
                   help="official; evaluation is always sharded over the processes here (exactly, no padding)")
    # evaluation (the official flags)
    p.add_argument("--eval", action="store_true", help="evaluate only, write <output_dir>/results.json")
    p.add_argument("--inc_path", default=None, help="ImageNet-C root (<corruption>/<severity>/<class>/img); "
                   "with --data-set fashion-mnist: the Fashion-MNIST-C cache folder (generated if absent)")
    p.add_argument("--ina_path", default=None, help="ImageNet-A ImageFolder root (200 wnid folders)")
    p.add_argument("--inr_path", default=None, help="ImageNet-R ImageFolder root (200 wnid folders)")
    p.add_argument("--insk_path", default=None, help="ImageNet-Sketch ImageFolder root (1000 wnid folders)")
    p.add_argument("--pgd_test", action="store_true", help="accuracy under PGD (eps 1/255, 5 steps of 0.5/255)")
    p.add_argument("--fgsm_test", action="store_true", help="accuracy under FGSM (eps 1/255)")
    p.add_argument("--save-logits", action="store_true",
                   help="--eval also writes the clean set's logits and labels to <output_dir>/logits.pt")
    p.add_argument("--ce-baseline", default=None, choices=["alexnet", "none"],
                   help="mCE normalisation (default: alexnet for ImageNet-C, none for Fashion-MNIST-C)")
    p.add_argument("--corruptions", nargs="*", default=None,
                   help="corruptions to evaluate (default: every folder found; the mCE uses the 15 benchmark "
                        "ones, the others are reported apart)")
    return p


#: official flags accepted for the command lines to run, but whose feature is not built here:
#: (flag, dest, official default, why)
UNSUPPORTED = (
    ("--use_patch_aug", "use_patch_aug", False, "RVT's patch-wise augmentation is not part of the VARS recipe"),
    ("--distillation-type", "distillation_type", "none", "knowledge distillation is not supported"),
    ("--teacher-path", "teacher_path", "", "knowledge distillation is not supported"),
    ("--data_type", "data_type", "folder", "only ImageFolder trees are read (no tar archives)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse (``-c config.yaml`` first, as timm's train.py), refuse what is not supported, resolve."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml
        try:
            with open(pre.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"-c {pre.config}: {' '.join(str(e).split())}")
        if not isinstance(cfg, dict):
            parser.error(f"-c {pre.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k.replace("-", "_") not in known)
        if unknown:
            parser.error(f"-c {pre.config}: unknown keys {unknown}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
    args = parser.parse_args(argv)
    for flag, dest, default, why in UNSUPPORTED:
        if getattr(args, dest) != default:
            parser.error(f"{flag} {getattr(args, dest)!r} is not supported: {why}")
    if args.data_set in UNSUPPORTED_DATA_SETS:
        parser.error(f"--data-set {args.data_set} is not supported (IMNET / imagenet, fashion-mnist, digits)")
    if args.model in OFFICIAL_PLUS_MODELS and args.attention not in (None, "self", "self-att"):
        parser.error(f"--model {args.model} (RVT+: learned position masks in softmax attention) runs with "
                     f"--attention self-att only; the official VARS / Performer blocks ignore the masks: use "
                     f"--model {OFFICIAL_PLUS_MODELS[args.model][0]}")
    return resolve_args(args)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Official names -> ours, the dataset-dependent defaults (None in the parser), --model-kwargs."""
    if args.data_set == "IMNET":
        args.data_set = "imagenet"
    args.attention = OFFICIAL_ATTENTIONS.get(args.attention, args.attention)
    masked_blocks = 0
    if args.model in OFFICIAL_PLUS_MODELS:
        args.model, masked_blocks = OFFICIAL_PLUS_MODELS[args.model]
    args.official_model = args.model in OFFICIAL_MODELS
    args.model = OFFICIAL_MODELS.get(args.model, args.model)
    if args.official_model and args.attention is None:
        args.attention = "self"  # the official default (self-att) goes with the official model names
    table = RECIPE_DEFAULTS if args.data_set == "imagenet" else SMALL_DATA_DEFAULTS
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.input_size is None:
        args.input_size = DEFAULT_INPUT_SIZE[args.data_set]
    args.model_kwargs_dict = parse_kwargs(args.model_kwargs)
    if masked_blocks:
        args.model_kwargs_dict.setdefault("masked_blocks", masked_blocks)
    if args.official_model and args.attention in ("vars_d", "vars_sd"):
        args.model_kwargs_dict.setdefault("compat", "official")
    if args.ce_baseline is None:
        args.ce_baseline = "alexnet" if args.data_set == "imagenet" else "none"
    if args.eval and args.finetune:
        raise ValueError("--finetune trains from weights; to evaluate a checkpoint use --eval --resume FILE")
    if args.save_logits and not args.output_dir:
        raise ValueError("--save-logits writes <output_dir>/logits.pt: give --output_dir")
    for flag in ("resume", "finetune"):
        if str(getattr(args, flag)).startswith(("http://", "https://")):
            raise ValueError(f"--{flag} {getattr(args, flag)}: download the file first and pass its path "
                             "(checkpoints are read from local files only)")
    return args


# ------------------------------------------------------------------------------------------------
# small helpers: distributed, seeding, checkpoints, logging
# ------------------------------------------------------------------------------------------------
def init_distributed(args):
    """torchrun / torch.distributed.launch set RANK / WORLD_SIZE / LOCAL_RANK; init when WORLD_SIZE > 1.

    The local rank is LOCAL_RANK from the environment, else the official --local_rank flag."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else 0))
    args.local_rank = local_rank
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available (use --device cpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=args.dist_url)
    return rank, world, device


def amp_setting(args, device) -> torch.dtype | None:
    """The autocast dtype: on by default on CUDA (bfloat16 where the card has it, else the official
    float16), off on other devices unless --amp; --no-amp turns it off."""
    enabled = args.amp if args.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if args.amp_dtype is not None:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def seed_all(seed: int) -> None:
    seed = seed % (2 ** 31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of every random draw in an epoch: a function of (seed, epoch, rank) only."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2 ** 31)


def rng_state(loader_gen: torch.Generator) -> dict:
    """Every random state, as tensors and plain Python values (weights-only loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": loader_gen.get_state()}


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_gen.set_state(state["loader"])


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


LOG_FIELDS = ["epoch", "train_loss", "lr", "val_acc1", "ema_acc1", "images_per_s", "epoch_time_s", "solver_work",
              "budget_forced"]


def solver_report(model: nn.Module) -> dict:
    """What the VARS layers' solvers did in the last training step (read once an epoch, before any evaluation):
    ``solver_work``, the most iterations (ODE solvers: function evaluations) a layer spent, and, for dopri5 / bosh3
    with a budget of attempts, ``budget_forced``, the largest fraction of a layer's problems that the budget ended on
    a step their tolerance rejected (``LayerStats.forced``: a budget too small for the trained layers). Empty for a
    model without VARS layers."""
    stats = [m.last_stats for m in model.modules() if isinstance(m, VARSLayer) and m.last_stats is not None]
    if not stats:
        return {}
    report = {"solver_work": max(int(s.iterations.max()) for s in stats)}
    forced = [float((s.forced > 0).float().mean()) for s in stats if s.forced is not None]
    if forced:
        report["budget_forced"] = max(forced)
    return report


def calibrate(model: nn.Module, images: torch.Tensor, spare: int, device, amp_dtype, world: int) -> dict:
    """vars_ode.calibrate_budget on one batch, as the training step sees it (train mode, autocast), without changing
    the random stream; with several processes every layer takes the largest budget over them."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(device, amp_dtype):
        budgets = calibrate_budget(model, images, spare=spare)
    if world > 1:
        import torch.distributed as dist
        names = sorted(budgets)
        most = torch.tensor([budgets[n] for n in names], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        layers = dict(model.named_modules())
        for n, b in zip(names, most.tolist()):
            budgets[n] = int(b)
            layers[n].set_budget(budgets[n])
    return budgets


def truncate_log(path: Path, start_epoch: int) -> None:
    """Drop rows of epochs >= start_epoch (written by a run killed before its checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < start_epoch]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in LOG_FIELDS})


def fixed_subset(n_total: int, n: int | None, seed: int = 0) -> list[int] | None:
    """A fixed random subset of indices (sorted); None when no subset is asked for."""
    if n is None or n >= n_total:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


def maybe_subset(ds, n, seed=0):
    idx = fixed_subset(len(ds), n, seed)
    return ds if idx is None else torch.utils.data.Subset(ds, idx)


def shard(ds, rank, world):
    """Each rank evaluates every world-th image (no padding, no duplicates)."""
    return ds if world == 1 else torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def small_transforms(train: bool, size: int, native: int, mean, std, flip: bool, reprob: float):
    """Transforms for in-memory (C, H, W) float pixels. Training output is normalised; evaluation
    output stays in [0, 1] pixels (the model is wrapped in NormalizedModel for evaluation)."""
    from torchvision.transforms import v2 as T
    if train and size == native and reprob == 0:  # the common case, one batch at a time
        return BatchAugment(max(1, size // 14), flip, mean, std)
    ops = []
    if size != native:
        ops += [T.Resize((size, size), antialias=True), Clamp01()]
    if train:
        ops.append(T.RandomCrop(size, padding=max(1, size // 14)))
        if flip:
            ops.append(T.RandomHorizontalFlip())
        ops.append(T.Normalize(mean, std))
        if reprob > 0:
            ops.append(T.RandomErasing(p=reprob, value="random"))
    return T.Compose(ops) if ops else None


def imagefolder_transforms(args, train: bool):
    from timm.data import create_transform
    if train:
        return create_transform(args.input_size, is_training=True, auto_augment=None if args.aa == "none" else args.aa,
                                color_jitter=args.color_jitter, re_prob=args.reprob, re_mode="pixel",
                                re_count=1, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    # evaluation: resize + centre crop, pixels in [0, 1] (no normalisation: NormalizedModel does it;
    # the clamp removes bicubic overshoot so that attacks start from valid pixels)
    from torchvision.transforms import v2 as T
    tf = create_transform(args.input_size, is_training=False, interpolation="bicubic",
                          crop_pct=1.0 if args.input_size < 64 else EVAL_CROP_PCT, normalize=False)
    return T.Compose([tf, Clamp01()])


class Clamp01(nn.Module):
    def forward(self, x):
        return x.clamp(0.0, 1.0)


def build_data(args):
    """Validate and build (train_set, val_set, info). Raises DatasetError on a bad layout."""
    if args.data_set == "imagenet":
        if not args.data_path:
            raise DatasetError("--data-path is required with --data-set imagenet (ImageFolder root with "
                               "train/ and val/), or use --data-set fashion-mnist|digits")
        classes = check_train_val_root(args.data_path)
        from torchvision.datasets import ImageFolder
        root = Path(args.data_path)
        train = ImageFolder(str(root / "train"), transform=imagefolder_transforms(args, True))
        val = ImageFolder(str(root / "val"), transform=imagefolder_transforms(args, False))
        info = dict(num_classes=len(classes), in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=classes)
    elif args.data_set == "fashion-mnist":
        find_fashion_mnist(args.fmnist_path)  # clear error if missing
        xtr, ytr = load_fashion_mnist("train", args.fmnist_path)
        xte, yte = load_fashion_mnist("test", args.fmnist_path)
        mk = lambda tr: small_transforms(tr, args.input_size, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD,  # noqa: E731
                                         flip=True, reprob=args.reprob)
        train, val = TensorImageDataset(xtr, ytr, mk(True)), TensorImageDataset(xte, yte, mk(False))
        info = dict(num_classes=10, in_chans=1, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                    classes=[str(i) for i in range(10)])
    else:  # digits
        xtr, ytr = load_digits_arrays("train")
        xte, yte = load_digits_arrays("test")
        mean, std = (float(xtr.mean() / 255),), (float(xtr.std() / 255),)
        mk = lambda tr: small_transforms(tr, args.input_size, 8, mean, std, flip=False, reprob=args.reprob)  # noqa: E731
        train, val = TensorImageDataset(xtr, ytr, mk(True)), TensorImageDataset(xte, yte, mk(False))
        info = dict(num_classes=10, in_chans=1, mean=mean, std=std, classes=[str(i) for i in range(10)])
    # the robustness sets are validated now too, so a bad path fails before training
    if args.eval or args.inc_path or args.ina_path or args.inr_path or args.insk_path:
        validate_eval_paths(args, info)
    return maybe_subset(train, args.subset, args.seed), maybe_subset(val, args.eval_subset), info


def validate_eval_paths(args, info):
    if args.data_set != "imagenet":
        for flag in ("ina_path", "inr_path", "insk_path"):
            if getattr(args, flag):
                raise DatasetError(f"--{flag} needs --data-set imagenet")
        if args.inc_path and args.data_set != "fashion-mnist":
            raise DatasetError("--inc_path with an offline data set is only supported for fashion-mnist "
                               "(Fashion-MNIST-C cache folder)")
        return
    if args.inc_path:
        imagenet_c_folders(args.inc_path, args.corruptions)
    for flag in ("ina_path", "inr_path", "insk_path"):
        if getattr(args, flag):
            check_image_folder(getattr(args, flag), f"--{flag}")


# ------------------------------------------------------------------------------------------------
# evaluation (clean, ImageNet-C, -A, -R, -Sketch, PGD, FGSM)
# ------------------------------------------------------------------------------------------------
def make_loader(ds, args, rank, world):
    return torch.utils.data.DataLoader(shard(ds, rank, world), batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.num_workers, pin_memory=args.pin_mem and torch.cuda.is_available())


def imagenet_c_transform(size: int):
    """The official ImageNet-C protocol: the stored 224 x 224 images are only centre-cropped (a no-op at
    224) and turned into [0, 1] pixels; the model wrapper then normalises with ImageNet's mean and std.
    No resize: resampling would smooth the noise corruptions and change the mCE."""
    from torchvision import transforms as T
    return T.Compose([T.CenterCrop(size), T.ToTensor()])


class EvalProgress:
    """Results of the finished evaluation sets, kept in ``<output_dir>/eval_progress.json`` and rewritten
    (atomically, by rank 0) as each set finishes, so an interrupted evaluation resumes where it stopped.

    The file holds a fingerprint of what is evaluated (checkpoint file, model, options, subset); a file
    with another fingerprint is started afresh. Rank 0 reads the file and sends it to every rank."""

    def __init__(self, path: Path | None, fingerprint: dict, master: bool, world: int):
        self.path, self.fingerprint, self.master = path, fingerprint, master
        done: dict = {}
        if master and path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                done = saved.get("results", {})
                if done:
                    print(f"resuming the evaluation: {len(done)} sets already done ({path})", flush=True)
            elif saved:
                print(f"note: {path} is of another evaluation (checkpoint, model or options differ); "
                      "starting afresh", flush=True)
        if world > 1:
            import torch.distributed as dist
            box = [done]
            dist.broadcast_object_list(box, src=0)
            done = box[0]
        self.results = done

    def get(self, key: str):
        return self.results.get(key)

    def put(self, key: str, value) -> None:
        self.results[key] = value
        if self.master and self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "results": self.results}, indent=1))
            os.replace(tmp, self.path)


def eval_fingerprint(args, amp_dtype) -> dict:
    ckpt = Path(args.resume) if args.resume else None
    stat = ckpt.stat() if ckpt is not None and ckpt.is_file() else None
    return {"checkpoint": str(ckpt.resolve()) if ckpt else None,
            "checkpoint_bytes": stat.st_size if stat else None,
            "checkpoint_mtime_ns": stat.st_mtime_ns if stat else None,
            "model": args.model, "attention": args.attention, "model_kwargs": sorted(args.model_kwargs_dict.items(), key=str),
            # (--grad only where given: the fingerprints of earlier runs stay valid)
            "layer": [args.lam, args.num_step, args.rand_feat_dim_ratio, args.solver,
                      *([args.grad] if args.grad else [])],
            "input_size": args.input_size,
            "eval_subset": args.eval_subset, "eval_ema": args.eval_ema, "seed": args.seed,
            "amp": str(amp_dtype), "data_set": args.data_set, "corruptions": args.corruptions}


def gather_shards(tensors: list, rank: int, world: int) -> list:
    """Undo :func:`shard`: rank r holds items r, r + world, ...; returns the full tensors (on every rank)."""
    if world == 1:
        return tensors
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, tensors)
    out = []
    for i in range(len(tensors)):
        pieces = [p[i] for p in parts]
        n = sum(len(x) for x in pieces)
        full = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
        for r, x in enumerate(pieces):
            full[r::world] = x
        out.append(full)
    return out


def corruption_summary(errors: dict, ce_baseline: str) -> dict:
    """mCE as in the paper (Table 2) and the official code: over the 15 benchmark corruptions, each
    normalised by AlexNet's error; any other corruption (ImageNet-C's extra ones, which have no
    AlexNet error) is reported apart with its unnormalised mean error. With ``ce_baseline="none"``
    (Fashion-MNIST-C) every corruption counts, unnormalised."""
    out = {"corruption_errors": errors, "mCE_normalization": ce_baseline}
    if ce_baseline != "alexnet":
        out["mCE"], out["CE"] = mean_corruption_error(errors, None)
        return out
    bench = {c: e for c, e in errors.items() if c in ALEXNET_ERRORS}
    extra = {c: e for c, e in errors.items() if c not in ALEXNET_ERRORS}
    if bench:
        out["mCE"], out["CE"] = mean_corruption_error(bench, ALEXNET_ERRORS)
        out["corruption_acc1"] = 100.0 * (1.0 - float(np.mean([np.mean(e) for e in bench.values()])))
    out["mCE_corruptions"] = sorted(bench)
    out["mCE_complete"] = len(bench) == len(ALEXNET_ERRORS)
    if extra:
        out["extra_corruption_errors"] = {c: 100.0 * float(np.mean(e)) for c, e in extra.items()}
    return out


def run_evaluation(model, val_set, info, args, device, rank, world, amp_dtype, out_dir: Path | None = None) -> dict:
    """Every evaluation asked for, with the official protocols; returns the results dict (percentages).

    Clean / -A / -R / -Sketch / PGD / FGSM images go through the validation transform (resize to
    256/224 of the input size, centre crop), ImageNet-C images through :func:`imagenet_c_transform`
    (centre crop only); -A / -R keep the logits of their 200 classes. Each set's accuracy is printed
    and recorded in :class:`EvalProgress` as soon as it is known."""
    from torchvision.datasets import ImageFolder
    master = rank == 0
    net = NormalizedModel(model, info["mean"], info["std"]).to(device).eval()
    res = {"model": args.model, "attention": args.attention,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "none"}
    progress = EvalProgress(out_dir / "eval_progress.json" if out_dir else None, eval_fingerprint(args, amp_dtype),
                            master, world)
    show = master and not args.no_progress and sys.stderr.isatty()  # bars on a terminal; a log gets the per-set lines

    def run_set(key: str, label: str, ds, **kw) -> float:
        done = progress.get(key)
        if done is not None:
            if master:
                print(f"{label}: acc1 {done:.2f}% (done before)", flush=True)
            return done
        acc = evaluate(net, make_loader(ds, args, rank, world), device, amp_dtype,
                       progress=label if show else None, **kw)["acc1"]
        progress.put(key, acc)
        if master:
            print(f"{label}: acc1 {acc:.2f}%", flush=True)
        return acc

    if args.save_logits and out_dir is not None:
        r = evaluate(net, make_loader(val_set, args, rank, world), device, amp_dtype, keep_logits=True,
                     progress="clean" if show else None)
        logits, targets = gather_shards([r["logits"], r["targets"]], rank, world)
        if master:
            torch.save({"logits": logits, "targets": targets}, out_dir / "logits.pt")
        progress.put("clean", r["acc1"])
    res["acc1"] = run_set("clean", "clean", val_set)
    if args.inc_path:
        if args.data_set == "fashion-mnist":
            sets = fashion_mnist_c(args.inc_path, args.corruptions, num_images=args.eval_subset,
                                   fmnist_root=args.fmnist_path, verbose=master)
            tf = val_set.dataset.transform if isinstance(val_set, torch.utils.data.Subset) else val_set.transform
            items = [(c, s, lambda x=x, y=y: TensorImageDataset(x, y, tf)) for (c, s), (x, y) in sets.items()]
        else:
            tf = imagenet_c_transform(args.input_size)
            folders = imagenet_c_folders(args.inc_path, args.corruptions, expected_classes=info["classes"])
            order = {c: i for i, c in enumerate(ALEXNET_ERRORS)}  # the 15 benchmark corruptions first
            folders.sort(key=lambda t: (order.get(t[0], len(order)), t[0], t[1]))
            items = [(c, s, lambda f=f: maybe_subset(ImageFolder(str(f), transform=tf), args.eval_subset))
                     for c, s, f in folders]
        errors = {}
        for i, (c, s, make) in enumerate(items):
            key = f"imagenet_c/{c}/{s}"
            ds = None if progress.get(key) is not None else make()
            acc = run_set(key, f"corruption {c} severity {s} [{i + 1}/{len(items)}]", ds)
            errors.setdefault(c, []).append(1.0 - acc / 100.0)
        res.update(corruption_summary(errors, args.ce_baseline))
        if master and args.ce_baseline == "alexnet" and not res["mCE_complete"]:
            print(f"note: mCE over {len(res['mCE_corruptions'])} of the 15 benchmark corruptions: not comparable "
                  "with Table 2", flush=True)
    for key, flag, subset, label in (("imagenet_a_acc1", "ina_path", "a", "ImageNet-A"),
                                     ("imagenet_r_acc1", "inr_path", "r", "ImageNet-R"),
                                     ("imagenet_sketch_acc1", "insk_path", None, "ImageNet-Sketch")):
        path = getattr(args, flag)
        if not path:
            continue
        n_folders = len(check_image_folder(path, f"--{flag}"))
        indices = None
        if subset is not None and info["num_classes"] == 1000:
            indices = imagenet_subset_indices(subset)  # 200-class protocol: keep those logits only
            if n_folders != 200:
                raise DatasetError(f"--{flag} {path} must have 200 class folders, found {n_folders}")
        elif n_folders != info["num_classes"]:
            raise DatasetError(f"--{flag} {path} has {n_folders} classes but the model has {info['num_classes']}")
        ds = maybe_subset(ImageFolder(path, transform=imagefolder_transforms(args, False)), args.eval_subset)
        res[key] = run_set(key.removesuffix("_acc1"), label, ds, class_indices=indices)
    # attacks: the gradient in full precision, the final forward under the run's autocast (as the official code)
    if args.pgd_test:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        attack = lambda m, x, y: pgd_attack(m, x, y, generator=gen)  # noqa: E731  eps 1/255, 5 x 0.5/255
        res["pgd_acc1"] = run_set("pgd", "PGD (eps 1/255, 5 steps)", val_set, attack=attack)
    if args.fgsm_test:
        res["fgsm_acc1"] = run_set("fgsm", "FGSM (eps 1/255)", val_set,
                                   attack=lambda m, x, y: fgsm_attack(m, x, y))
    return res


def markdown_row(res: dict) -> str:
    """A Table-2 style row: Model | Params (M) | Clean | IN-C | IN-R | IN-SK | PGD | IN-A (| FGSM)."""
    f = lambda k: "-" if res.get(k) is None else f"{res[k]:.1f}"  # noqa: E731
    name = res["model"] + (f" ({res['attention']})" if res.get("attention") else "")
    head = "| Model | Params (M) | Clean | IN-C | IN-R | IN-SK | PGD | IN-A | FGSM |\n|---|---|---|---|---|---|---|---|---|\n"
    return head + (f"| {name} | {res['params_M']:.2f} | {f('acc1')} | {f('mCE')} | {f('imagenet_r_acc1')} | "
                   f"{f('imagenet_sketch_acc1')} | {f('pgd_acc1')} | {f('imagenet_a_acc1')} | {f('fgsm_acc1')} |")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def read_checkpoint(path, args, what: str = "--resume") -> dict:
    """A checkpoint file as a dict (a bare state dict becomes {"model": ...}); one-line errors."""
    ckpt = load_checkpoint_file(path, trusted=args.trust_checkpoint, what=what)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")
    if not any(k in ckpt for k in ("model", "model_ema", "state_dict")):
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return {"model": ckpt}
        raise CheckpointError(f"{what} {path} has no 'model' entry (keys: {sorted(map(str, ckpt))[:8]})")
    if "model" not in ckpt and "state_dict" in ckpt:
        ckpt = dict(ckpt, model=ckpt["state_dict"])
    return ckpt


def load_model_weights(model: nn.Module, ckpt: dict, path, key: str = "model", what: str = "--resume") -> None:
    """Strict names-and-shapes load of ``ckpt[key]`` (DDP / compile prefixes stripped); the error
    names the first mismatched keys and shapes and the model options that may explain them."""
    state = official_state_dict(ckpt, key=key)
    try:
        check_state_dict(model, state, limit=5, what=f"{what} {path}")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (is it a checkpoint of --model {ckpt_arg(ckpt, 'model')} --attention "
                              f"{ckpt_arg(ckpt, 'attention')}?)") from None
    model.load_state_dict(state, strict=True)


def ckpt_arg(ckpt: dict, name: str):
    a = ckpt.get("args")
    a = vars(a) if isinstance(a, argparse.Namespace) else a
    return a.get(name, "?") if isinstance(a, dict) else "?"


def finetune_weights(model: nn.Module, ckpt: dict, path) -> list:
    """--finetune: the model's weights from a file (ours or official), a classifier of another size left
    at its initialisation, every other tensor strict; returns the re-initialised keys."""
    state = official_state_dict(ckpt, key="model")
    own = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    dropped = [k for k in list(state) if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    missing_head = {k: own[k] for k in own if k.startswith(head + ".") and k not in state}
    check_state_dict(model, {**state, **missing_head}, limit=5, what=f"--finetune {path}")
    model.load_state_dict(state, strict=False)
    return dropped


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args)
    master = rank == 0
    out_dir = Path(args.output_dir) if args.output_dir else None
    amp_dtype = amp_setting(args, device)
    seed_all(args.seed + rank)

    # ---- data: validated before any model is built -------------------------------------------
    train_set, val_set, info = build_data(args)
    if args.resume == "auto":
        if out_dir is None:
            raise ValueError("--resume auto needs --output_dir (it continues from <output_dir>/checkpoint.pth)")
        last = out_dir / "checkpoint.pth"
        args.resume = str(last) if last.is_file() else ""
        if world > 1:  # rank 0 decides for all (every rank must load the same checkpoint, or none)
            import torch.distributed as dist
            choice = [args.resume]
            dist.broadcast_object_list(choice, src=0)
            args.resume = choice[0]
        if master and not args.resume:
            print(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
    ckpt = read_checkpoint(args.resume, args) if args.resume else None  # read (and checked) before the model
    if ckpt is not None and not args.eval and not ("optimizer" in ckpt and "epoch" in ckpt):
        raise CheckpointError(f"--resume {args.resume} holds weights only (no optimizer state or epoch): it cannot "
                              f"continue a run; to start training from these weights use --finetune {args.resume}")
    finetune = read_checkpoint(args.finetune, args, what="--finetune") if args.finetune else None
    if master and out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model --------------------------------------------------------------------------------
    layer_kwargs = dict(lam=args.lam, num_step=args.num_step, rand_feat_dim_ratio=args.rand_feat_dim_ratio,
                        solver=args.solver, grad=args.grad)
    if args.pretrained and args.model.startswith("vars_"):
        raise ValueError(f"--pretrained: {args.model} has no released weights to download; start from a weight "
                         f"file with --finetune FILE (or evaluate one with --eval --resume FILE)")
    extra = dict(args.model_kwargs_dict)
    if args.drop:
        extra.setdefault("drop_rate", args.drop)
    model = create_model(args.model, num_classes=info["num_classes"], in_chans=info["in_chans"],
                         img_size=args.input_size, attention=args.attention, drop_path_rate=args.drop_path,
                         layer_kwargs=layer_kwargs, pretrained=args.pretrained, **extra).to(device)
    if args.calibrate_budget is not None and not any(isinstance(m, VARSLayer) and m.takes_budget
                                                     for m in model.modules()):
        raise ValueError("--calibrate-budget: the model has no VARS layer integrating a horizon with dopri5 or bosh3 "
                         "(e.g. --attention vars_d --solver dopri5)")
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        precision = (f"mixed precision ({str(amp_dtype).removeprefix('torch.')} autocast)" if amp_dtype is not None
                     else "full precision (float32)")
        print(f"model {args.model} (attention={args.attention}): {n_params / 1e6:.3f} M parameters, "
              f"{len(train_set)} training / {len(val_set)} validation images, device {device}, world {world}, "
              f"{precision}", flush=True)
        stem = getattr(model, "patch_embed", None)
        grid, patch = getattr(stem, "grid_size", None), getattr(stem, "patch_size", None)
        if grid is not None and min(grid) < 4:  # e.g. Fashion-MNIST's 28 px in DeiT's patches of 16
            hint = " (--model-kwargs patch_size=4 gives 7 x 7 at 28 px)" if args.data_set == "fashion-mnist" else ""
            print(f"note: {args.input_size} px images in patches of {patch[0]} x {patch[1]} give a {grid[0]} x {grid[1]} token grid: "
                  f"attention has little to attend to{hint}", flush=True)

    # ---- evaluation only ------------------------------------------------------------------------
    if args.eval:
        if ckpt is not None:
            key = "model"
            if args.eval_ema:
                if ckpt.get("model_ema") is None:
                    raise CheckpointError(f"--eval-ema: {args.resume} has no EMA weights (model_ema)")
                key = "model_ema"
            load_model_weights(model, ckpt, args.resume, key=key)
        elif master:
            print("warning: --eval without --resume evaluates a randomly initialised model", file=sys.stderr)
        res = run_evaluation(model, val_set, info, args, device, rank, world, amp_dtype, out_dir)
        res["checkpoint"] = args.resume or None
        if master:
            print(markdown_row(res))
            if out_dir:
                (out_dir / "results.json").write_text(json.dumps(res, indent=2))
                print(f"wrote {out_dir / 'results.json'}")
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
        return 0

    if finetune is not None:
        dropped = finetune_weights(model, finetune, args.finetune)
        if master:
            print(f"finetuning from {args.finetune}" + (f" ({', '.join(dropped)} re-initialised)" if dropped else ""))

    # ---- loaders: data order per epoch = f(seed, epoch) ----------------------------------------
    from torch.utils.data.distributed import DistributedSampler
    if args.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
    loader_gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               num_workers=args.num_workers,
                                               pin_memory=args.pin_mem and device.type == "cuda",
                                               drop_last=True, generator=loader_gen,
                                               persistent_workers=False)
    steps_per_epoch = len(train_loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError(f"--batch-size must be even with mixup/cutmix (got {args.batch_size}); "
                         "or pass --mixup 0 --cutmix 0")
    if steps_per_epoch == 0:
        raise DatasetError(f"training set has {len(train_set)} images: fewer than one batch of "
                           f"{args.batch_size} per process")

    # ---- optimiser, schedule, loss, mixup, EMA, AMP -------------------------------------------
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    lr = args.lr * args.batch_size * world / 512.0
    opt_kw = {"eps": args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kw["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(model, args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **opt_kw)
        lr_scheduler, _ = create_scheduler_v2(
            optimizer, args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except (AssertionError, KeyError, TypeError) as e:
        raise ValueError(f"--opt {args.opt} / --sched {args.sched}: {type(e).__name__}: {e}") from None
    if lr_scheduler is None:
        raise ValueError(f"--sched {args.sched!r} is not a timm scheduler")
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=info["num_classes"])
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume -----------------------------------------------------------------------------------
    start_epoch, global_step, resume_rng = args.start_epoch, args.start_epoch * steps_per_epoch, None
    if ckpt is not None:
        load_model_weights(model, ckpt, args.resume)
        ours = "global_step" in ckpt  # written by this script; else the official main.py's format
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"--resume {args.resume}: its optimizer state does not fit --opt {args.opt} "
                                  f"({' '.join(str(e).split())})") from None
        start_epoch = int(ckpt["epoch"]) + 1
        if ours:
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            global_step = int(ckpt["global_step"])
        else:  # official: per-epoch scheduler state; our per-step schedule follows from the step count
            global_step = start_epoch * steps_per_epoch
            lr_scheduler.step_update(num_updates=global_step)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if model_ema is not None and ckpt.get("model_ema") is not None:
            ema_state = {"module." + k: v for k, v in official_state_dict(ckpt, key="model_ema").items()}
            model_ema.load_state_dict(ema_state)
        rngs = ckpt.get("rng")
        resume_rng = rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else None
        if master:
            print(f"resumed from {args.resume}: epoch {ckpt['epoch']} done, step {global_step}"
                  + ("" if ours else " (official checkpoint)"))
    if resume_rng is not None:
        set_rng_state(resume_rng, loader_gen)
    if master and out_dir:
        truncate_log(out_dir / "log.csv", start_epoch)

    # ---- wrappers: compile, DDP --------------------------------------------------------------
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = wandb_run = None
    if master and out_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass
    if master and args.log_wandb:
        try:
            import wandb
            wandb_run = wandb.init(project="vars_ode", name=args.experiment or None, config=vars(args),
                                   dir=str(out_dir) if out_dir else None)
        except ImportError:
            print("warning: --log-wandb: wandb is not installed (pip install wandb); not logging to W&B",
                  file=sys.stderr)
    from tqdm import tqdm

    # ---- training loop ------------------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        # every random draw of this epoch (order, augmentation, mixup, drop path) follows from
        # (seed, epoch, rank), so a resumed run repeats the uninterrupted run exactly
        seed_all(epoch_seed(args.seed, epoch, rank))
        loader_gen.manual_seed(epoch_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch_seed(args.seed, epoch, 0) if args.repeated_aug else epoch)
        train_model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        lines = master and not args.no_progress and not sys.stderr.isatty()  # a log file: plain lines
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not master or args.no_progress or lines,
                   leave=False, dynamic_ncols=True)
        for step, (images, targets) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            if step == 0 and args.calibrate_budget is not None:
                budgets = calibrate(model, images, args.calibrate_budget, device, amp_dtype, world)
                if master:
                    print(f"epoch {epoch}: budgets of attempts {sorted(set(budgets.values()))} "
                          f"({len(budgets)} layers)", flush=True)
            with autocast(device, amp_dtype):
                loss = criterion(train_model(images), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}; stopping")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            lr_scheduler.step_update(num_updates=global_step)
            if model_ema is not None:
                model_ema.update(model, step=global_step)
            seen += images.shape[0]
            loss_sum += loss_value
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
            if lines and (step % args.print_freq == 0 or step + 1 == steps_per_epoch):
                print(f"epoch {epoch} step {step + 1}/{steps_per_epoch} loss {loss_value:.4f} "
                      f"lr {optimizer.param_groups[0]['lr']:.3e}", flush=True)
        bar.close()
        lr_scheduler.step(epoch + 1)
        elapsed = time.time() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
               "images_per_s": seen * world / max(elapsed, 1e-9), "epoch_time_s": elapsed, **solver_report(model)}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            rng = rng_state(loader_gen)  # evaluation must not change the random stream
            row["val_acc1"] = evaluate(NormalizedModel(model, info["mean"], info["std"]).to(device),
                                       make_loader(val_set, args, rank, world), device, amp_dtype)["acc1"]
            if model_ema is not None:
                ema_net = NormalizedModel(model_ema.module, info["mean"], info["std"])
                ema_dev = next(model_ema.module.parameters()).device
                row["ema_acc1"] = evaluate(ema_net.to(ema_dev), make_loader(val_set, args, rank, world), ema_dev,
                                           amp_dtype if ema_dev.type == device.type else None)["acc1"]
            set_rng_state(rng, loader_gen)
        if master:
            solver = "" if "solver_work" not in row else f", solver work {row['solver_work']}"
            if "budget_forced" in row:
                solver += f", budget forced {100 * row['budget_forced']:.2f}% of a layer's problems"
            print(f"epoch {epoch}: loss {row['train_loss']:.4f}, val acc1 {row.get('val_acc1', float('nan')):.2f}, "
                  f"{row['images_per_s']:.1f} img/s{solver}", flush=True)
        # ---- checkpoint (rank 0 writes; RNG states gathered from every rank) ----------------
        states = [rng_state(loader_gen)]
        if world > 1:
            import torch.distributed as dist
            states = [None] * world
            dist.all_gather_object(states, rng_state(loader_gen))
        if master and out_dir:
            append_log(out_dir / "log.csv", row)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch" and v != "":
                        writer.add_scalar(k, v, epoch)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(),
                         "model_ema": model_ema.state_dict() if model_ema is not None else None,
                         "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step,
                         "rng": states, "args": plain_args(args), "classes": info["classes"]},
                        out_dir / "checkpoint.pth")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in row.items() if v != ""}, step=epoch)
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def plain_args(args) -> dict:
    """The arguments as plain Python values (a checkpoint stays weights-only loadable)."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


if __name__ == "__main__":
    run_cli(main)
