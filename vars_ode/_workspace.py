"""Reused scratch buffers for the fused node's temporaries on the CPU.

A fresh multi-megabyte CPU tensor comes from ``mmap`` (or from heap memory that glibc has just given
back), and its first write pays a page fault and the kernel's zero fill for every 4 KiB page: for the
``m x m`` and ``N x m`` temporaries of a VARS-SD layer's backward pass that was about 10% of the
layer's time (``benchmarks/RESULTS.md``). CUDA's caching allocator already avoids this; on the CPU,
:func:`scratch` keeps, for each thread and name, the buffers of the last ``SHAPES_PER_NAME`` shapes asked
for (layers of several sizes in one process, as in the benchmarks) and hands them out again.

Only for temporaries that die before the call that asked for them returns: a buffer handed out
by :func:`scratch` is written again by the next call that asks for the same name. Never used
while autograd records (a recorded operator could keep the buffer for a later backward pass) or while
torch.compile traces, and kept apart for inference mode (its tensors cannot be written outside it).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

SHAPES_PER_NAME = 4
_local = threading.local()
_enabled = True


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor; on the CPU, the buffer handed out before under ``name`` with this
    shape and dtype on this thread (else a new one, which takes the place of the least recently used)."""
    shape = tuple(shape)
    if not _enabled or device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    bufs = pool.get(name)
    if bufs is None:
        bufs = pool[name] = OrderedDict()
    key = (shape, dtype, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        if type(buf) is not torch.Tensor:  # a tracing mode's tensor (fake, functional): never kept
            return buf
        bufs[key] = buf
        if len(bufs) > SHAPES_PER_NAME:
            bufs.popitem(last=False)
    else:
        bufs.move_to_end(key)
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
