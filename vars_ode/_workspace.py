"""Reused scratch buffers for the fused node's temporaries on the CPU.

A fresh multi-megabyte CPU tensor comes from ``mmap`` (or from heap memory that glibc has just given
back), and its first write pays a page fault and the kernel's zero fill for every 4 KiB page: for the
``m x m`` and ``N x m`` temporaries of a VARS-SD layer's backward pass that was about 10% of the
layer's time (``benchmarks/RESULTS.md``). CUDA's caching allocator already avoids this; on the CPU,
:func:`scratch` keeps the buffers it handed out, per thread and keyed by name, shape and dtype, and hands
them out again. The least recently used go first once a thread's buffers exceed ``MAX_BYTES`` or
``MAX_BUFFERS`` (layers of several sizes in one process, as in the benchmarks, or a last smaller batch,
each have their own).

Only for temporaries that die before the call that asked for them returns: a buffer handed out
by :func:`scratch` is written again by the next call that asks for the same name and shape. Never used
while autograd records (a recorded operator could keep the buffer for a later backward pass) or while
torch.compile traces, and kept apart for inference mode (its tensors cannot be written outside it).
Dropping a buffer from the pool never frees one that a running call still holds.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

MAX_BYTES = 1 << 30  # per thread
MAX_BUFFERS = 128  # per thread (an adaptive ODE layer with its adjoint uses about 50)
_local = threading.local()
_enabled = True


def _pool() -> OrderedDict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = OrderedDict()
        _local.nbytes = 0
    return pool


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """An uninitialised ``shape`` tensor (contiguous, or with ``stride``); on the CPU, the buffer handed out before
    under ``name`` with this shape, strides and dtype on this thread, else a new one that is kept for the next
    call."""
    shape = tuple(shape)
    stride = None if stride is None else tuple(stride)

    def new():
        if stride is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)

    if not _enabled or device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return new()
    pool = _pool()
    key = (name, shape, stride, dtype, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is not None:
        pool.move_to_end(key)
        return buf
    buf = new()
    if type(buf) is not torch.Tensor:  # a tracing mode's tensor (fake, functional): never kept
        return buf
    pool[key] = buf
    _local.nbytes += buf.nbytes
    while len(pool) > 1 and (_local.nbytes > MAX_BYTES or len(pool) > MAX_BUFFERS):
        _, old = pool.popitem(last=False)
        _local.nbytes -= old.nbytes
    return buf


def dense_strides(t: torch.Tensor):
    """``t``'s strides where its elements fill their memory densely in some order of its dimensions (a contiguous
    tensor, or a permuted one such as a channels-last convolution's output), else ``None``."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return None if t.is_contiguous() else t.stride()


def scratch_like(name: str, t: torch.Tensor) -> torch.Tensor:
    """:func:`scratch` shaped like ``t`` and laid out like it where it is dense (:func:`dense_strides`; otherwise
    contiguous): operators that pick their kernels by layout (convolutions) then see the same inputs as in
    fresh tensors, and compute the same values."""
    return scratch(name, t.shape, t.dtype, t.device, dense_strides(t))


def workspace_bytes() -> int:
    """Bytes of the scratch buffers this thread keeps."""
    return getattr(_local, "nbytes", 0)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are made again when next needed)."""
    _local.pool = OrderedDict()
    _local.nbytes = 0


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
