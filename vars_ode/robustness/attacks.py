"""White-box L-infinity attacks in pixel space, as in the RVT / VARS evaluations.

Images are attacked in [0, 1] pixel space. Models normally expect normalised inputs, so wrap them
with :class:`NormalizedModel` (it applies ``(x - mean) / std`` inside), then attack the wrapper.

Defaults follow the papers: PGD with eps 1/255, step 0.5/255, 5 steps and a uniform random start;
FGSM with eps 1/255 and one signed-gradient step. Both maximise the cross-entropy loss, clamp each
iterate to the eps-ball around the clean image and to [0, 1], and leave the model's mode and
parameter gradients untouched.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NormalizedModel", "pgd_attack", "fgsm_attack"]


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for pixel inputs x in [0, 1], shape (B, C, H, W)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _check(images: torch.Tensor, eps: float) -> None:
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must be pixels in [0, 1] (attack the NormalizedModel wrapper, not "
                         "normalised tensors)")


def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), targets)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd_attack(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float = 1 / 255,
               step_size: float = 0.5 / 255, steps: int = 5, random_start: bool = True,
               loss_fn: Callable | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the loss within the L-inf ball of radius eps (Madry et al.).

    Arguments:
        model: maps (B, C, H, W) pixels in [0, 1] to (B, K) logits.
        images: (B, C, H, W) clean pixels in [0, 1].
        targets: (B,) labels.
        eps, step_size, steps: ball radius, step length (signed gradient), number of steps.
        random_start: start from a uniform sample of the ball (clamped to [0, 1]).
        loss_fn: loss to maximise, (logits, targets) -> scalar; cross-entropy by default.
        generator: random generator for the start (on the images' device).
    Returns:
        (B, C, H, W) adversarial pixels, detached, with ||x_adv - images||_inf <= eps, in [0, 1].
    """
    _check(images, eps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    loss_fn = loss_fn or F.cross_entropy
    images = images.detach()
    x = images.clone()
    if random_start and eps > 0:
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        x = (x + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        grad = _input_grad(model, x, targets, loss_fn)
        x = x.detach() + step_size * grad.sign()
        x = torch.min(torch.max(x, images - eps), images + eps).clamp(0, 1)
    return x.detach()


def fgsm_attack(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float = 1 / 255,
                loss_fn: Callable | None = None) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(images + eps * sign(grad), 0, 1)`` (Goodfellow et al.)."""
    _check(images, eps)
    grad = _input_grad(model, images.detach(), targets, loss_fn or F.cross_entropy)
    return (images.detach() + eps * grad.sign()).clamp(0, 1).detach()
