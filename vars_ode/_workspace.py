"""Reused scratch buffers for the fused node's temporaries on the CPU.

A fresh multi-megabyte CPU tensor comes from ``mmap`` (or from heap memory that glibc has just given
back), and its first write pays a page fault and the kernel's zero fill for every 4 KiB page: for the
``m x m`` and ``N x m`` temporaries of a VARS-SD layer's backward pass that was about 10% of the
layer's time (``benchmarks/RESULTS.md``). CUDA's caching allocator already avoids this; on the CPU,
:func:`scratch` keeps one buffer per name for each thread and hands it out again.

Only for temporaries that die before the call that asked for them returns: a buffer handed out
by :func:`scratch` is written again by the next call that asks for the same name. Never used
while autograd records (a recorded operator could keep the buffer for a later backward pass) and
kept apart for inference mode (its tensors cannot be written outside it).
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()
_enabled = True


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor; on the CPU, the buffer last handed out under ``name`` on this
    thread when its shape and dtype match (else a new one, which replaces it)."""
    shape = tuple(shape)
    if not _enabled or device.type != "cpu" or torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    key = (name, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = pool[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are made again when next needed)."""
    _local.pool = {}


def set_cpu_workspace(enabled: bool) -> bool:
    """Turn the reuse of CPU scratch buffers on or off for every thread (it is on by default); returns the
    previous setting. Off, every temporary is a fresh tensor, as elsewhere in torch."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    previous, _enabled = _enabled, enabled
    if not enabled:
        release_workspace()
    return previous
