"""Count the points where host code waits for a tensor's value (a device synchronisation on a GPU).

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``, ``if t > 0:``)
or an operator whose output size depends on the data (``nonzero``, ``masked_select``) makes the
host wait until the device has finished all queued work. These reads are dispatched to the same
ATen operators on every device, so they can be counted on the CPU::

    with vars_ode.sync.count_host_syncs() as syncs:
        vars_ode.solve(P, x, 0.1, "rk4", t_end=20.0)
    print(syncs.count, syncs.by_op)

``torch.cuda.set_sync_debug_mode("warn")`` reports the same on a GPU, but only on a GPU. Reads that
bypass the dispatcher (``Tensor.tolist()``, ``Tensor.numpy()``) are not seen.
"""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

#: ATen operators that read a value back to the host or size their output by the data.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "equal")


class count_host_syncs(TorchDispatchMode):
    """Context manager; ``count`` is the number of host reads seen, ``by_op`` a Counter by operator."""

    def __init__(self):
        super().__init__()
        self.by_op = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))
