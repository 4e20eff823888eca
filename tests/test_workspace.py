"""The CPU scratch buffers of the fused node (vars_ode._workspace): when a buffer is handed out again, and
that reusing them changes no output or gradient, across stacked layers, shapes, inference mode and
threads (each result is compared with a run whose temporaries are all fresh tensors)."""
import sys
import threading
from unittest import mock

import pytest
import torch
from torch import nn

import vars_ode as vo
from vars_ode import VARSLayer
from vars_ode import _workspace as workspace
from vars_ode._workspace import scratch
from vars_ode.solvers import native

D64 = torch.float64
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workspace_on():
    previous = vo.set_cpu_workspace(True)
    yield
    vo.set_cpu_workspace(previous)


def test_scratch_reuse_rules(workspace_on):
    vo.release_workspace()
    with torch.no_grad():
        a = scratch("t", (3, 4), torch.float32, CPU)
        assert scratch("t", (3, 4), torch.float32, CPU) is a  # same name, shape, dtype: handed out again
        assert scratch("u", (3, 4), torch.float32, CPU) is not a  # another name
        b = scratch("t", (2, 4), torch.float32, CPU)  # another shape: another buffer, both kept
        assert b is not a and b.shape == (2, 4) and scratch("t", (2, 4), torch.float32, CPU) is b
        assert scratch("t", (3, 4), torch.float32, CPU) is a
        assert vo.workspace_bytes() == (12 + 12 + 8) * 4
        assert scratch("t", (2, 4), D64, CPU).dtype == D64
        with torch.inference_mode():
            c = scratch("t", (2, 4), D64, CPU)
            assert c.is_inference()
        d = scratch("t", (2, 4), D64, CPU)
        assert d is not c and not d.is_inference()
    assert scratch("t", (2, 4), D64, CPU) is not d  # autograd recording: always a fresh tensor
    vo.set_cpu_workspace(False)
    assert vo.workspace_bytes() == 0
    with torch.no_grad():
        assert scratch("t", (2, 4), D64, CPU) is not scratch("t", (2, 4), D64, CPU)


def test_least_recently_used_buffers_go_first(workspace_on):
    vo.release_workspace()
    with torch.no_grad():
        with mock.patch.object(workspace, "MAX_BUFFERS", 3):
            a, b, c = (scratch(n, (4,), torch.float32, CPU) for n in "abc")
            assert scratch("a", (4,), torch.float32, CPU) is a  # a is now the most recent
            scratch("d", (4,), torch.float32, CPU)  # a fourth: b, the least recently used, goes
            assert scratch("a", (4,), torch.float32, CPU) is a and scratch("c", (4,), torch.float32, CPU) is c
            assert scratch("b", (4,), torch.float32, CPU) is not b
        vo.release_workspace()
        with mock.patch.object(workspace, "MAX_BYTES", 1000):
            a = scratch("a", (100,), torch.float32, CPU)  # 400 bytes
            b = scratch("b", (100,), torch.float32, CPU)
            big = scratch("c", (200,), torch.float32, CPU)  # 1,600 bytes in all: a and b go
            assert vo.workspace_bytes() == 800 and scratch("c", (200,), torch.float32, CPU) is big
            assert scratch("a", (100,), torch.float32, CPU) is not a  # (and now big goes: 1,200 > 1,000)
            huge = scratch("h", (1000,), torch.float32, CPU)  # alone above the cap: kept, the rest go
            assert vo.workspace_bytes() == 4000 and scratch("h", (1000,), torch.float32, CPU) is huge


def test_set_cpu_workspace_checks_its_argument():
    with pytest.raises(ValueError, match="enabled must be True or False"):
        vo.set_cpu_workspace("yes")


def stack(seed, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(*[VARSLayer(24, 3, qkv_bias=True, image_size=3, num_prefix_tokens=1, **kw)
                           for _ in range(3)]).to(D64)


def fwd_bwd(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x)
    grads = torch.autograd.grad((y * torch.sin(y)).sum(), [x, *model.parameters()])
    return [y.detach(), *grads]


def same(a, b):
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("kw", [
    dict(dictionary="sd", static="dense", num_static_atoms=5, solver="ista", steps=3),
    dict(dictionary="sd", static="dense", num_static_atoms=5, solver="fista", steps=4, init="encode", recompute=True),
    dict(dictionary="d", solver="ista", steps=2, recompute=False),
    # the ODE integrators and their reverse pass write stages, slopes and stage gradients into scratch buffers
    dict(dictionary="d", solver="rk4", steps=2.0),
    dict(dictionary="d", solver="bosh3", steps=2.0, grad="adjoint"),
    dict(dictionary="sd", static="dense", num_static_atoms=5, solver="dopri5", steps=2.0),
])
def test_reused_buffers_change_nothing(workspace_on, kw, monkeypatch):
    # the ODE integrators reuse buffers for large states only; here for every state
    monkeypatch.setattr(native, "SCRATCH_MIN_BYTES", 0)
    model = stack(0, **kw)
    xs = [torch.randn(2, 10, 24, dtype=D64), torch.randn(3, 10, 24, dtype=D64), torch.randn(2, 10, 24, dtype=D64)]
    vo.set_cpu_workspace(False)
    fresh = [fwd_bwd(model, x) for x in xs]
    vo.set_cpu_workspace(True)
    reused = [fwd_bwd(model, x) for x in xs]  # three stacked layers share the buffers; the batch size changes
    assert all(same(a, b) for a, b in zip(fresh, reused))
    with torch.inference_mode():
        y = model(xs[0])
    assert torch.equal(y, fresh[0][0])
    assert same(fwd_bwd(model, xs[0]), fresh[0])  # training again after inference mode


def test_threads_keep_their_own_buffers(workspace_on):
    model = stack(1, dictionary="sd", static="dense", num_static_atoms=5, solver="ista", steps=3)
    xs = [torch.randn(3, 10, 24, dtype=D64) for _ in range(4)]  # one shape: the same buffers if shared
    expected = [fwd_bwd(model, x) for x in xs]
    results, errors = {}, []

    def worker(i):
        try:
            for _ in range(5):
                results.setdefault(i, []).append(fwd_bwd(model, xs[i]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the node's backward too
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert all(same(r, expected[i]) for i in range(4) for r in results[i])


def test_compiled_layer_matches_eager_and_keeps_no_traced_tensors(workspace_on):
    torch._dynamo.reset()
    model = stack(2, dictionary="sd", static="dense", num_static_atoms=5, solver="ista", steps=3)
    x = torch.randn(2, 10, 24, dtype=D64)
    vo.release_workspace()
    compiled = torch.compile(model, backend="aot_eager")  # traces with fake tensors, no C++ compiler
    # the fused node is traced into the graph (no graph break), where AOT autograd decomposes some of its
    # operations: float64 rounding, not bitwise equality (measured 1.0e-15)
    for a, b in zip(fwd_bwd(compiled, x), fwd_bwd(model, x), strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    assert all(type(t) is torch.Tensor for t in workspace._local.pool.values())
