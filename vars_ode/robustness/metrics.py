"""Evaluation metrics of the VARS paper (Shi et al., ICML 2022, Section 4).

* top-1 accuracy, with an optional class subset (the 200-class ImageNet-A / ImageNet-R protocol);
* mean Corruption Error (mCE, Hendrycks & Dietterich 2019): per corruption the error summed over the
  five severities divided by the baseline's (AlexNet's) error, paired by corruption name;
* normalised scanpath saliency (NSS, Peters et al. 2005) for eye fixations (MIT1003);
* class-agnostic foreground segmentation from an attention map (PASCAL VOC): the map is normalised to
  [0, 1], thresholded at 0.3, and scored with mIoU (mean of background and foreground IoU), the false
  positive rate FP = FP / (FP + TN) and the false negative rate FN = FN / (FN + TP), all in percent and
  accumulated over pixels of the whole dataset (VOC's 255 "void" label is ignored).
"""
from __future__ import annotations

import math
from importlib import resources
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "ALEXNET_ERRORS", "IMAGENET_C_CORRUPTIONS", "accuracy", "top1_accuracy", "corruption_error",
    "mean_corruption_error", "imagenet_subset_indices", "imagenet_subset_mask", "mask_logits",
    "nss", "normalize_map", "SegmentationMeter", "mean_std",
]

#: AlexNet top-1 error on ImageNet-C, averaged over severities 1-5 (Hendrycks & Dietterich, 2019).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
#: The 15 benchmark corruptions of ImageNet-C, in the usual order.
IMAGENET_C_CORRUPTIONS: tuple[str, ...] = tuple(ALEXNET_ERRORS)


# ----------------------------------------------------------------------------------------------
# accuracy and the 200-class subsets
# ----------------------------------------------------------------------------------------------
def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent.

    Arguments:
        logits: (B, C) scores.
        targets: (B,) integer labels in [0, C).
        topk: which k to report.
    Returns:
        one float per k, in percent (0 for an empty batch).
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits must be (B, C) and targets (B,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    n = targets.shape[0]
    if n == 0:
        return [0.0 for _ in topk]
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    correct = pred.eq(targets[:, None])
    return [100.0 * correct[:, :min(k, maxk)].any(dim=1).float().sum().item() / n for k in topk]


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return accuracy(logits, targets, (1,))[0]


def imagenet_subset_indices(name: str) -> list[int]:
    """The 200 ImageNet-1k class indices covered by ImageNet-A (``"a"``) or ImageNet-R (``"r"``).

    Read from the lists that timm ships (``timm/data/_info/imagenet_{a,r}_indices.txt``), sorted
    ascending, which is also the order of the WordNet ids, so the i-th ImageFolder class of
    ImageNet-A/R (folders named by wnid, sorted) corresponds to ImageNet-1k class ``indices[i]``.
    """
    key = str(name).lower().replace("imagenet-", "").replace("imagenet_", "")
    if key not in ("a", "r"):
        raise ValueError(f"name must be 'a' or 'r' (ImageNet-A / ImageNet-R), got {name!r}")
    text = resources.files("timm.data").joinpath("_info", f"imagenet_{key}_indices.txt").read_text()
    idx = [int(line) for line in text.split() if line.strip()]
    if len(idx) != 200 or sorted(idx) != idx or len(set(idx)) != 200:
        raise RuntimeError(f"timm's imagenet_{key}_indices.txt is not 200 sorted unique indices")
    return idx


def imagenet_subset_mask(name: str, num_classes: int = 1000) -> torch.Tensor:
    """Boolean (num_classes,) mask, True on the 200 classes of ImageNet-A or ImageNet-R."""
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[imagenet_subset_indices(name)] = True
    return mask


def mask_logits(logits: torch.Tensor, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Keep only the given classes: (B, C) -> (B, len(indices)), column i is class indices[i].

    With ImageNet-A/R the targets are then the position in the 200-class list (the ImageFolder
    label), and the argmax over the kept columns is the prediction restricted to those classes.
    """
    idx = torch.as_tensor(indices, dtype=torch.long, device=logits.device)
    if idx.numel() and (idx.min() < 0 or idx.max() >= logits.shape[-1]):
        raise ValueError(f"indices must lie in [0, {logits.shape[-1]}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return logits.index_select(-1, idx)


# ----------------------------------------------------------------------------------------------
# ImageNet-C
# ----------------------------------------------------------------------------------------------
def corruption_error(errors: Sequence[float], baseline_errors: Sequence[float] | float | None = None) -> float:
    """Corruption error CE_c of one corruption.

    Arguments:
        errors: the model's top-1 error (fraction in [0, 1]) at each severity (usually 5).
        baseline_errors: the baseline's errors at the same severities, or their mean (one float, as in
            :data:`ALEXNET_ERRORS`), or None for the unnormalised mean error.
    Returns:
        sum_s E_s / sum_s E_s^base (equivalently mean / mean); the mean error when unnormalised.
    """
    errors = [float(e) for e in errors]
    if not errors:
        raise ValueError("errors must hold at least one severity")
    mean = sum(errors) / len(errors)
    if baseline_errors is None:
        return mean
    if isinstance(baseline_errors, (int, float)):
        base = float(baseline_errors)
    else:
        base_list = [float(b) for b in baseline_errors]
        if len(base_list) != len(errors):
            raise ValueError(f"baseline_errors has {len(base_list)} severities, errors {len(errors)}")
        base = sum(base_list) / len(base_list)
    if base <= 0:
        raise ValueError(f"baseline error must be positive, got {base}")
    return mean / base


def mean_corruption_error(errors: Mapping[str, Sequence[float]],
                          baseline: Mapping[str, float | Sequence[float]] | None = ALEXNET_ERRORS,
                          ) -> tuple[float, dict[str, float]]:
    """mCE in percent and each corruption's CE in percent.

    Arguments:
        errors: corruption name -> the model's top-1 errors (fractions) at each severity.
        baseline: corruption name -> the baseline's mean error or per-severity errors; AlexNet's by
            default. Corruptions are paired by name: a corruption missing from the baseline raises
            ValueError. None gives the unnormalised mean corruption error (100 x mean error), the
            convention of small benchmarks without an AlexNet reference (e.g. Fashion-MNIST-C).
    Returns:
        (mCE, {name: CE}), both 100 x the ratio (or 100 x the mean error when unnormalised).
    """
    if not errors:
        raise ValueError("errors is empty: no corruption was evaluated")
    ces = {}
    for name, errs in errors.items():
        if baseline is None:
            ces[name] = 100.0 * corruption_error(errs, None)
            continue
        if name not in baseline:
            raise ValueError(f"corruption {name!r} has no baseline error; baseline has {sorted(baseline)}")
        ces[name] = 100.0 * corruption_error(errs, baseline[name])
    return sum(ces.values()) / len(ces), ces


# ----------------------------------------------------------------------------------------------
# saliency: NSS
# ----------------------------------------------------------------------------------------------
def nss(saliency, fixations, ddof: int = 0) -> float:
    """Normalised scanpath saliency of one map.

    Arguments:
        saliency: (H, W) map (tensor or array).
        fixations: (H, W) boolean/binary fixation map (nonzero = fixated pixel), or an (F, 2) integer
            array of (row, col) fixation coordinates.
        ddof: degrees of freedom of the standard deviation (0: population std; MATLAB's std uses 1).
    Returns:
        mean over fixations of (S(y, x) - mean S) / std S. NaN if there is no fixation; 0 for a
        constant map.
    """
    s = np.asarray(saliency.detach().cpu() if torch.is_tensor(saliency) else saliency, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"saliency must be (H, W), got shape {s.shape}")
    f = np.asarray(fixations.detach().cpu() if torch.is_tensor(fixations) else fixations)
    if f.shape == s.shape:
        rows, cols = np.nonzero(f)
    elif f.ndim == 2 and f.shape[1] == 2:
        rows, cols = f[:, 0].astype(np.int64), f[:, 1].astype(np.int64)
        if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= s.shape[0] or cols.max() >= s.shape[1]):
            raise ValueError("fixation coordinates fall outside the saliency map")
    else:
        raise ValueError(f"fixations must be a {s.shape} map or (F, 2) coordinates, got shape {f.shape}")
    if rows.size == 0:
        return float("nan")
    std = s.std(ddof=ddof)
    if not np.isfinite(std) or std == 0:
        return 0.0
    z = (s - s.mean()) / std
    return float(z[rows, cols].mean())


# ----------------------------------------------------------------------------------------------
# class-agnostic segmentation
# ----------------------------------------------------------------------------------------------
def normalize_map(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each map to [0, 1] over its last two dims; a constant map becomes 0."""
    flat = m.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    return out.view_as(m)


class SegmentationMeter:
    """Accumulates a class-agnostic foreground/background confusion over a dataset.

    ``update(attention, target)`` normalises ``attention`` (H, W) or (B, H, W) to [0, 1], predicts
    foreground where it is >= ``threshold`` (0.3, as in the paper), and counts pixels against
    ``target`` (0 background, 1..254 foreground, ``ignore_index`` skipped). ``compute()`` returns
    percentages: ``mIoU`` (mean of background and foreground IoU), ``FP`` = FP / (FP + TN) and ``FN``
    = FN / (FN + TP), plus ``IoU_fg`` and ``IoU_bg``.
    """

    def __init__(self, threshold: float = 0.3, ignore_index: int = 255, normalize: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold, self.ignore_index, self.normalize = float(threshold), ignore_index, normalize
        self.tp = self.fp = self.fn = self.tn = 0

    def update(self, attention: torch.Tensor, target: torch.Tensor) -> None:
        attention, target = torch.as_tensor(attention), torch.as_tensor(target)
        if attention.shape != target.shape:
            raise ValueError(f"attention {tuple(attention.shape)} and target {tuple(target.shape)} must "
                             "have the same shape (resize the map to the mask first)")
        a = normalize_map(attention.double()) if self.normalize else attention.double()
        pred = a >= self.threshold
        valid = target != self.ignore_index
        gt = (target > 0) & valid
        pred = pred & valid
        self.tp += int((pred & gt).sum())
        self.fp += int((pred & ~gt & valid).sum())
        self.fn += int((~pred & gt).sum())
        self.tn += int((~pred & ~gt & valid).sum())

    def compute(self) -> dict[str, float]:
        def ratio(a, b):
            return 100.0 * a / b if b else float("nan")
        iou_fg = ratio(self.tp, self.tp + self.fp + self.fn)
        iou_bg = ratio(self.tn, self.tn + self.fp + self.fn)
        return {"mIoU": (iou_fg + iou_bg) / 2, "IoU_fg": iou_fg, "IoU_bg": iou_bg,
                "FP": ratio(self.fp, self.fp + self.tn), "FN": ratio(self.fn, self.fn + self.tp)}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values is empty")
    m = sum(v) / len(v)
    if len(v) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
