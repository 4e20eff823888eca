#!/usr/bin/env python
"""Train or evaluate a (VARS) vision transformer on ImageNet, or offline on Fashion-MNIST / digits.

Read top to bottom: arguments, distributed setup, data (validated before anything else), model,
optimiser / schedule / EMA / mixup, resume, evaluation-only path, training loop.

The defaults are the paper's recipe (official repository bfshi/VARS, main.py): AdamW with lr 5e-4 per
512 images (scaled by the global batch / 512), weight decay 0.05, cosine schedule with 5 warm-up
epochs, 300 epochs, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, label smoothing 0.1,
random erasing 0.25, drop path 0.1, EMA 0.99996. With ``--data-set fashion-mnist|digits`` the
augmentation defaults switch to small-image ones (random crop with padding, flip for Fashion-MNIST,
no RandAugment / mixup / cutmix / erasing, 1 warm-up epoch); any explicit flag wins.

Examples:
    # the paper's setting, 8 GPUs
    torchrun --nproc_per_node 8 scripts/train_imagenet.py --data-path /data/imagenet \\
        --model vars_rvt_tiny --attention vars_sd --batch-size 64 --amp --output_dir runs/rvt_sd
    # evaluate a checkpoint on the robustness benchmarks
    python scripts/train_imagenet.py --eval --resume runs/rvt_sd/checkpoint.pth --data-path /data/imagenet \\
        --model vars_rvt_tiny --attention vars_sd --inc_path /data/imagenet-c --ina_path /data/imagenet-a \\
        --inr_path /data/imagenet-r --insk_path /data/imagenet-sketch --pgd_test --fgsm_test
    # offline, CPU
    python scripts/train_imagenet.py --data-set fashion-mnist --device cpu --model deit_tiny_patch16_224 \\
        --model-kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --epochs 5 --batch-size 128

Checkpoints (``<output_dir>/checkpoint.pth``) are written atomically after every epoch and hold the
model, optimiser, scheduler, EMA, grad scaler, every RNG state and the arguments; ``--resume`` continues
bit-for-bit (CPU, fixed seed): the data order and all augmentation randomness of an epoch are a function
of (seed, epoch, rank) only. ``--resume auto`` continues from ``<output_dir>/checkpoint.pth`` when there is one
and starts afresh otherwise, so that one command serves the first launch and every restart
(``torchrun --max-restarts``, a requeued cluster job).
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

from vars_ode.robustness.cli import parse_kwargs, run_cli  # noqa: E402
from vars_ode.robustness import (ALEXNET_ERRORS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError,  # noqa: E402
                                 NormalizedModel, TensorImageDataset, autocast, check_image_folder,
                                 check_train_val_root, create_model, evaluate, fashion_mnist_c, fgsm_attack,
                                 find_fashion_mnist, imagenet_c_folders, imagenet_subset_indices,
                                 load_digits_arrays, load_fashion_mnist, mean_corruption_error, pgd_attack)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# small-image defaults for the offline data sets; the recipe's values (None in argparse) otherwise
SMALL_DATA_DEFAULTS = dict(aa="none", mixup=0.0, cutmix=0.0, reprob=0.0, warmup_epochs=1, drop_path=0.0)
RECIPE_DEFAULTS = dict(aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25, warmup_epochs=5,
                       drop_path=0.1)
DEFAULT_INPUT_SIZE = {"imagenet": 224, "fashion-mnist": 28, "digits": 8}


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("VARS training and robustness evaluation", add_help=True)
    # data
    p.add_argument("--data-path", "--data_path", default=None, help="ImageFolder root with train/ and val/")
    p.add_argument("--data-set", "--data_set", default="imagenet", choices=["imagenet", "fashion-mnist", "digits"],
                   help="imagenet: ImageFolder at --data-path; fashion-mnist / digits: offline data")
    p.add_argument("--fmnist-path", default=None, help="folder of the Fashion-MNIST IDX files "
                   "(default: $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--input-size", "--input_size", type=int, default=None,
                   help="image side (default 224 / 28 / 8 for imagenet / fashion-mnist / digits)")
    p.add_argument("--subset", type=int, default=None, help="train on a fixed random subset of N images")
    p.add_argument("--eval-subset", type=int, default=None, help="evaluate on at most N images of each set")
    p.add_argument("--num_workers", "--num-workers", type=int, default=8)
    p.add_argument("--pin-mem", action="store_true")
    # model
    p.add_argument("--model", default="vars_rvt_tiny", help="any timm-registered model")
    p.add_argument("--attention", default=None, help="self | performer | vars_s | vars_d | vars_sd (| gfnet)")
    p.add_argument("--lam", type=float, default=None, help="VARS sparsity weight (model default if unset)")
    p.add_argument("--num_step", "--num-step", type=int, default=None, help="VARS solver steps")
    p.add_argument("--rand_feat_dim_ratio", "--rand-feat-dim-ratio", type=float, default=None)
    p.add_argument("--solver", default=None, help="VARS solver name (ista, fista, an ODE method, ...)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords, values as Python literals (patch_size=4)")
    p.add_argument("--drop-path", type=float, default=None, help="drop path rate (recipe 0.1)")
    # optimisation (the paper's recipe)
    p.add_argument("--batch-size", "--batch_size", type=int, default=64, help="per process")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate per 512 images (scaled by global batch)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=None, help="recipe 5")
    p.add_argument("--warmup-lr", type=float, default=1e-6)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--aa", default=None, help="auto-augment policy (recipe rand-m9-mstd0.5-inc1; 'none' off)")
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=None, help="recipe 0.8")
    p.add_argument("--cutmix", type=float, default=None, help="recipe 1.0")
    p.add_argument("--reprob", type=float, default=None, help="random erasing probability (recipe 0.25)")
    p.add_argument("--model-ema-decay", type=float, default=0.99996)
    p.add_argument("--no-model-ema", action="store_true")
    p.add_argument("--eval-ema", action="store_true", help="--eval uses the checkpoint's EMA weights")
    # run
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 unless --amp-dtype float16)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output_dir", "--output-dir", default="output", help="checkpoint, log.csv, results.json")
    p.add_argument("--resume", default="",
                   help="checkpoint to continue from (or to evaluate with --eval); 'auto': <output_dir>/checkpoint.pth "
                        "when it exists, else a fresh start (for torchrun --max-restarts and job requeues)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap the optimiser steps per epoch")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: never during training)")
    p.add_argument("--print-freq", type=int, default=50)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # evaluation (the official flags)
    p.add_argument("--eval", action="store_true", help="evaluate only, write <output_dir>/results.json")
    p.add_argument("--inc_path", default=None, help="ImageNet-C root (<corruption>/<severity>/<class>/img); "
                   "with --data-set fashion-mnist: the Fashion-MNIST-C cache folder (generated if absent)")
    p.add_argument("--ina_path", default=None, help="ImageNet-A ImageFolder root (200 wnid folders)")
    p.add_argument("--inr_path", default=None, help="ImageNet-R ImageFolder root (200 wnid folders)")
    p.add_argument("--insk_path", default=None, help="ImageNet-Sketch ImageFolder root (1000 wnid folders)")
    p.add_argument("--pgd_test", action="store_true", help="accuracy under PGD (eps 1/255, 5 steps of 0.5/255)")
    p.add_argument("--fgsm_test", action="store_true", help="accuracy under FGSM (eps 1/255)")
    p.add_argument("--ce-baseline", default=None, choices=["alexnet", "none"],
                   help="mCE normalisation (default: alexnet for ImageNet-C, none for Fashion-MNIST-C)")
    p.add_argument("--corruptions", nargs="*", default=None, help="corruptions to evaluate (default all found)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the dataset-dependent defaults (None in the parser) and parse --model-kwargs."""
    table = RECIPE_DEFAULTS if args.data_set == "imagenet" else SMALL_DATA_DEFAULTS
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.input_size is None:
        args.input_size = DEFAULT_INPUT_SIZE[args.data_set]
    args.model_kwargs_dict = parse_kwargs(args.model_kwargs)
    if args.ce_baseline is None:
        args.ce_baseline = "alexnet" if args.data_set == "imagenet" else "none"
    return args


# ------------------------------------------------------------------------------------------------
# small helpers: distributed, seeding, checkpoints, logging
# ------------------------------------------------------------------------------------------------
def init_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; init env:// when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return rank, world, device


def seed_all(seed: int) -> None:
    seed = seed % (2 ** 31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of every random draw in an epoch: a function of (seed, epoch, rank) only."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2 ** 31)


def rng_state(loader_gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": loader_gen.get_state()}


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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


LOG_FIELDS = ["epoch", "train_loss", "lr", "val_acc1", "ema_acc1", "images_per_s", "epoch_time_s"]


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
                          crop_pct=1.0 if args.input_size < 64 else 0.875, normalize=False)
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
                                       num_workers=args.num_workers, pin_memory=args.pin_mem)


def run_evaluation(model, val_set, info, args, device, rank, world, amp_dtype) -> dict:
    """Every evaluation asked for; returns the results dict (percentages)."""
    from torchvision.datasets import ImageFolder
    net = NormalizedModel(model, info["mean"], info["std"]).to(device).eval()
    res = {"model": args.model, "attention": args.attention,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    res["acc1"] = evaluate(net, make_loader(val_set, args, rank, world), device, amp_dtype)["acc1"]
    if args.inc_path:
        errors = {}
        if args.data_set == "fashion-mnist":
            sets = fashion_mnist_c(args.inc_path, args.corruptions, num_images=args.eval_subset,
                                   fmnist_root=args.fmnist_path, verbose=rank == 0)
            tf = val_set.dataset.transform if isinstance(val_set, torch.utils.data.Subset) else val_set.transform
            items = [(c, s, TensorImageDataset(x, y, tf)) for (c, s), (x, y) in sets.items()]
        else:
            tf = imagefolder_transforms(args, False)
            items = [(c, s, maybe_subset(ImageFolder(str(f), transform=tf), args.eval_subset))
                     for c, s, f in imagenet_c_folders(args.inc_path, args.corruptions,
                                                       expected_classes=info["classes"])]
        for c, s, ds in items:
            acc = evaluate(net, make_loader(ds, args, rank, world), device, amp_dtype)["acc1"]
            errors.setdefault(c, []).append(1.0 - acc / 100.0)
        baseline = ALEXNET_ERRORS if args.ce_baseline == "alexnet" else None
        res["mCE"], res["CE"] = mean_corruption_error(errors, baseline)
        res["mCE_normalization"] = args.ce_baseline
        res["corruption_errors"] = errors
    for key, flag, subset in (("imagenet_a_acc1", "ina_path", "a"), ("imagenet_r_acc1", "inr_path", "r"),
                              ("imagenet_sketch_acc1", "insk_path", None)):
        path = getattr(args, flag)
        if not path:
            continue
        ds = maybe_subset(ImageFolder(path, transform=imagefolder_transforms(args, False)), args.eval_subset)
        n_folders = len(check_image_folder(path, f"--{flag}"))
        indices = None
        if subset is not None and info["num_classes"] == 1000:
            indices = imagenet_subset_indices(subset)  # 200-class protocol: keep those logits only
            if n_folders != 200:
                raise DatasetError(f"--{flag} {path} must have 200 class folders, found {n_folders}")
        elif n_folders != info["num_classes"]:
            raise DatasetError(f"--{flag} {path} has {n_folders} classes but the model has {info['num_classes']}")
        res[key] = evaluate(net, make_loader(ds, args, rank, world), device, amp_dtype, class_indices=indices)["acc1"]
    if args.pgd_test:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        attack = lambda m, x, y: pgd_attack(m, x, y, generator=gen)  # noqa: E731  eps 1/255, 5 x 0.5/255
        res["pgd_acc1"] = evaluate(net, make_loader(val_set, args, rank, world), device, None, attack=attack)["acc1"]
    if args.fgsm_test:
        res["fgsm_acc1"] = evaluate(net, make_loader(val_set, args, rank, world), device, None,
                                    attack=lambda m, x, y: fgsm_attack(m, x, y))["acc1"]
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
def main(argv=None) -> int:
    args = resolve_args(get_args_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args)
    master = rank == 0
    out_dir = Path(args.output_dir) if args.output_dir else None
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
    seed_all(args.seed + rank)

    # ---- data: validated before any model is built -------------------------------------------
    train_set, val_set, info = build_data(args)
    if args.resume == "auto":
        last = out_dir / "checkpoint.pth" if out_dir else None
        args.resume = str(last) if last is not None and last.is_file() else ""
        if world > 1:  # rank 0 decides for all (every rank must load the same checkpoint, or none)
            import torch.distributed as dist
            choice = [args.resume]
            dist.broadcast_object_list(choice, src=0)
            args.resume = choice[0]
        if master and not args.resume:
            print(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
    if args.resume and not Path(args.resume).is_file():
        raise DatasetError(f"--resume {args.resume}: no such checkpoint file")
    if master and out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model --------------------------------------------------------------------------------
    layer_kwargs = dict(lam=args.lam, num_step=args.num_step, rand_feat_dim_ratio=args.rand_feat_dim_ratio,
                        solver=args.solver)
    model = create_model(args.model, num_classes=info["num_classes"], in_chans=info["in_chans"],
                         img_size=args.input_size, attention=args.attention, drop_path_rate=args.drop_path,
                         layer_kwargs=layer_kwargs, **args.model_kwargs_dict).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"model {args.model} (attention={args.attention}): {n_params / 1e6:.3f} M parameters, "
              f"{len(train_set)} training / {len(val_set)} validation images, device {device}, world {world}")

    # ---- evaluation only ------------------------------------------------------------------------
    if args.eval:
        if args.resume:
            ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
            key = "model_ema" if args.eval_ema and ckpt.get("model_ema") else "model"
            state = ckpt[key]
            if key == "model_ema":  # ModelEmaV3 state: keys prefixed with "module."
                state = {k.removeprefix("module."): v for k, v in state.items()}
            model.load_state_dict(state)
        elif master:
            print("warning: --eval without --resume evaluates a randomly initialised model", file=sys.stderr)
        res = run_evaluation(model, val_set, info, args, device, rank, world, amp_dtype)
        res["checkpoint"] = args.resume or None
        if master:
            print(markdown_row(res))
            if out_dir:
                (out_dir / "results.json").write_text(json.dumps(res, indent=2))
                print(f"wrote {out_dir / 'results.json'}")
        return 0

    # ---- loaders: data order per epoch = f(seed, epoch) ----------------------------------------
    from torch.utils.data.distributed import DistributedSampler
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader_gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               num_workers=args.num_workers, pin_memory=args.pin_mem,
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
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=args.weight_decay)
    lr_scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                          warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
                                          updates_per_epoch=steps_per_epoch)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                         label_smoothing=args.smoothing, num_classes=info["num_classes"])
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    model_ema = None if args.no_model_ema else ModelEmaV3(model, decay=args.model_ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume -----------------------------------------------------------------------------------
    start_epoch, global_step, resume_rng = 0, 0, None
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if model_ema is not None and ckpt.get("model_ema") is not None:
            model_ema.load_state_dict(ckpt["model_ema"])
        start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        resume_rng = ckpt["rng"][rank] if isinstance(ckpt["rng"], list) and rank < len(ckpt["rng"]) else None
        if master:
            print(f"resumed from {args.resume}: epoch {ckpt['epoch']} done, step {global_step}")
    if resume_rng is not None:
        set_rng_state(resume_rng, loader_gen)
    if master and out_dir:
        truncate_log(out_dir / "log.csv", start_epoch)

    # ---- wrappers: compile, DDP --------------------------------------------------------------
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if master and out_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    # ---- training loop ------------------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        # every random draw of this epoch (order, augmentation, mixup, drop path) follows from
        # (seed, epoch, rank), so a resumed run repeats the uninterrupted run exactly
        seed_all(epoch_seed(args.seed, epoch, rank))
        loader_gen.manual_seed(epoch_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch)
        train_model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not master or args.no_progress,
                   leave=False) if tqdm else None
        for step, (images, targets) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
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
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                bar.update(1)
            elif master and not args.no_progress and step % args.print_freq == 0:
                print(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss_value:.4f}", flush=True)
        if bar is not None:
            bar.close()
        lr_scheduler.step(epoch + 1)
        elapsed = time.time() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
               "images_per_s": seen * world / max(elapsed, 1e-9), "epoch_time_s": elapsed}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            rng = rng_state(loader_gen)  # evaluation must not change the random stream
            row["val_acc1"] = evaluate(NormalizedModel(model, info["mean"], info["std"]).to(device),
                                       make_loader(val_set, args, rank, world), device, amp_dtype)["acc1"]
            if model_ema is not None:
                row["ema_acc1"] = evaluate(NormalizedModel(model_ema.module, info["mean"], info["std"]).to(device),
                                           make_loader(val_set, args, rank, world), device, amp_dtype)["acc1"]
            set_rng_state(rng, loader_gen)
        if master:
            print(f"epoch {epoch}: loss {row['train_loss']:.4f}, val acc1 {row.get('val_acc1', float('nan')):.2f}, "
                  f"{row['images_per_s']:.1f} img/s", flush=True)
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
                         "rng": states, "args": vars(args), "classes": info["classes"]},
                        out_dir / "checkpoint.pth")
    if writer is not None:
        writer.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)
