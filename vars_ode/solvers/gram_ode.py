"""A Runge-Kutta integration of the VARS field on a Gram operator as one autograd node, its reverse pass
written by hand.

Unrolled through autograd, every evaluation of the field (:class:`vars_ode.dynamics.VARSField`) saves its
inputs and temporaries for the backward pass. Here the integration runs without a graph
(:func:`vars_ode.solvers.native.integrate_fixed` or :class:`vars_ode.solvers.native.AdaptiveRK`, any of their
methods), keeping per stage only the input ``U`` of that evaluation (a reference, no copy), per step its size
and, for the adaptive methods, which problems accepted it: about half the memory (benchmarks/RESULTS.md). With
a checkpointed tape it keeps one state per step and evaluates the stages again (``grad="adjoint"``: the
discrete adjoint). The fused layer node (:mod:`vars_ode.fused`) reverses its integrations with
:func:`reverse` too. The reverse pass walks the steps backwards. For ``y1 = y0 + h * acc * sum_i b_i k_i`` and
``k_i = f(Y_i)``, ``Y_i = y0 + h sum_{j<i} A_ij k_j``::

    gk_i = h (b_i acc gy1 + sum_{j>i} A_ji gY_j),   gY_i = J_f(Y_i)^T gk_i,   gy0 = gy1 + sum_i gY_i

and with ``a = g(U)`` (the soft threshold) and ``K`` the field's (already divided by ``L``), the field's
transposed Jacobian is::

    gKs = gdW - gamma gdU;   ga = [a != 0] (K gKs + gamma gdU)
    gW = -alpha gdW + gdU;   gU = -beta gdU + ga
    dK += gKs a^T,  db += gdW,  dthreshold -= sign(a) ga

(``K`` symmetric). The step sizes and the accept decisions are constants, as in the unrolled integrators. For
large CPU states the temporaries and each stage's ``(gW, gU)`` go into reused scratch buffers, as the forward
integration's do (:data:`vars_ode.solvers.native.SCRATCH_MIN_BYTES`).
The gradients equal autograd's through the same steps up to rounding (``tests/test_native.py``).
"""
from __future__ import annotations

import torch

from .._workspace import scratch
from ..ops import _soft
from .native import _buffers, _combine, _evaluate, _inplace


class Tape:
    """What the reverse pass keeps of an integration: per step ``(stages, h, acc, A, b)``, ``stages`` the ``U`` of
    each stage, or with ``checkpoint=True`` the state ``(W, U)`` at the step's start, from which the reverse pass
    evaluates the stages again (one state a step instead of one ``U`` a stage, for about one more evaluation
    a stage).

    The integrators of :mod:`vars_ode.solvers.native` call :meth:`add` once per step (attempt)."""

    def __init__(self, checkpoint: bool = False):
        self.steps = []
        self.checkpoint = checkpoint

    def kept_entries(self) -> tuple:
        """The entries of a stage's state tuple that :meth:`add` keeps beyond the step (``U``; none with
        ``checkpoint``, which keeps the step's start instead): an integrator must not write them into reused
        buffers."""
        return () if self.checkpoint else (1,)

    def add(self, stage_states, h, accept, A, b):
        """``stage_states``: the state tuple ``(W, U)`` at which each stage was evaluated; ``h``: the step (a
        float, or a tuple with one per-problem tensor per entry of the state); ``accept``: per-problem booleans
        or ``None``; ``A``, ``b``: the tableau's stage rows and weights."""
        hh = h[0] if isinstance(h, tuple) else h
        acc = None if accept is None else accept.unsqueeze(-2).to(stage_states[0][1].dtype)
        kept = stage_states[0] if self.checkpoint else [st[1] for st in stage_states]
        self.steps.append((kept, hh, acc, A, b))


def _stage_inputs(field, y0, h, A, inplace=False):
    # the U of every stage of one step from its start y0, evaluating the field again (with `inplace`, into
    # scratch buffers that live until the step's reverse pass is done)
    ks, Us = [], []
    for i, row in enumerate(A):
        # the W half of a stage is dead once its slope is evaluated, the U half is kept for the reverse pass
        y = (_combine(y0, h, ks, row, (scratch("rev.stageW", y0[0].shape, y0[0].dtype, y0[0].device),
                                       *_buffers(f"rev.stageU{i}", y0[1:])) if inplace else None) if row else y0)
        Us.append(y[1])
        if i < len(A) - 1:  # the last stage's slope enters no other stage
            ks.append(_evaluate(field, 0.0, y, _buffers(f"ode.k{i}", y0) if inplace else None))
    return Us


def _lin(terms, out=None):
    # sum of c * t over (float coefficient, tensor) pairs, in a fresh tensor or in `out`
    res = torch.mul(terms[0][1], terms[0][0], out=out)
    for c, t in terms[1:]:
        res.add_(t, alpha=c)
    return res


class _GramODENode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, integrate, field, checkpoint, K, Bs, thr, W0, U0):
        tape = Tape(checkpoint)
        W, U = integrate((W0, U0), tape)
        ctx.tape, ctx.field = tape, field
        ctx.coeffs = (float(field.alpha), float(field.beta), float(field.gamma))
        act = field.active
        ctx.active = act[0] if isinstance(act, tuple) else act
        ctx.thr_const = None if isinstance(thr, torch.Tensor) else thr
        ctx.save_for_backward(K, Bs, thr if ctx.thr_const is None else None)
        return W, U

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gW, gU):
        K, Bs, thr = ctx.saved_tensors
        want_K, want_B, want_thr = ctx.needs_input_grad[3:6]
        field, active_after, nfe = ctx.field, ctx.field.active, ctx.field.nfe
        field.active = ctx.active  # the window's frozen problems, for the evaluations of a checkpointed tape
        try:
            gK, gB, gT, gW, gU = reverse(ctx.tape, field, K, thr if ctx.thr_const is None else ctx.thr_const,
                                         ctx.coeffs, gW, gU, ctx.active, want_K, want_B, want_thr)
        finally:
            field.active, field.nfe = active_after, nfe
        gK = gK.sum_to_size(K.shape) if gK is not None else None
        gBs = gB.sum_to_size(Bs.shape) if gB is not None else None
        gthr = gT.sum_to_size(thr.shape) if gT is not None else None
        return None, None, None, gK, gBs, gthr, gW, gU


def reverse(tape, field, K, thr, coeffs, gW, gU, active=None, want_K=True, want_B=True, want_thr=False):
    """The reverse pass of a taped integration of the field ``(alpha, beta, gamma) = coeffs`` on the Gram matrix
    ``K`` (``(..., m, m)``, broadcastable) with threshold ``thr``, from the gradients ``gW``, ``gU`` of its end
    (``None``: zero). ``field`` evaluates the stages of a checkpointed tape again. Returns ``(dK, db, dthreshold,
    gW0, gU0)`` (``dK`` per problem batch, un-reduced; ``None`` where not wanted) and the gradients of the start."""
    alpha, beta, gamma = coeffs
    steps = tape.steps
    ref = steps[0][0][0] if steps else (gU if gU is not None else gW)
    shape = ref.shape
    gW = torch.zeros(shape, dtype=ref.dtype, device=ref.device) if gW is None else gW
    gU = torch.zeros(shape, dtype=ref.dtype, device=ref.device) if gU is None else gU
    Kx = K.expand(*shape[:-2], *K.shape[-2:])
    lead = Kx.shape[:-2]
    K3 = Kx.reshape(-1, *Kx.shape[-2:])
    Q = torch.zeros_like(Kx) if want_K else None
    gB = torch.zeros(shape, dtype=ref.dtype, device=ref.device) if want_B else None
    gT = torch.zeros(shape, dtype=ref.dtype, device=ref.device) if want_thr else None

    inplace = _inplace(ref)

    def buf(name):  # a scratch buffer shaped like the state, or None (a new tensor) outside `inplace`
        return scratch(name, shape, ref.dtype, ref.device) if inplace else None

    def vjp(i, U, gdW, gdU):
        # the stage's (gW, gU) contributions, in buffers of their own (they live until the step is reversed)
        if active is not None:
            gdW, gdU = torch.mul(gdW, active, out=buf("rev.gdW")), torch.mul(gdU, active, out=buf("rev.gdU"))
        a = _soft(U, thr, out=buf("rev.a"))
        gKs = torch.sub(gdW, gdU, alpha=gamma, out=buf("rev.gKs"))
        if Q is not None:
            Q.view(-1, *Q.shape[-2:]).baddbmm_(gKs.reshape(-1, *shape[-2:]), a.reshape(-1, *shape[-2:]).transpose(-1, -2))
        # times [a != 0] = [|U| > thr]: softshrink's own backward kernel for a float threshold, else |sign(a)| (a
        # boolean mask costs several float passes on the CPU: benchmarks/RESULTS.md, eighth session)
        floating = isinstance(thr, float)
        ga = buf("rev.ga" if floating else f"rev.gU{i}")
        ga = torch.bmm(K3, gKs.reshape(-1, *shape[-2:]),
                       out=None if ga is None else ga.view(-1, *shape[-2:])).view(*lead, *shape[-2:])
        ga.add_(gdU, alpha=gamma)
        if floating:
            o = buf(f"rev.gU{i}")
            ga = (torch.ops.aten.softshrink_backward(ga, U, thr) if o is None
                  else torch.ops.aten.softshrink_backward.grad_input(ga, U, thr, grad_input=o))
        else:
            ga = ga.mul_(torch.sign(a).abs_())
        if gB is not None:
            gB.add_(gdW)
        if gT is not None:
            gT.addcmul_(torch.sign(a), ga, value=-1.0)
        return torch.add(gdU, gdW, alpha=-alpha, out=buf(f"rev.gW{i}")), ga.add_(gdU, alpha=-beta)

    gW, gU = _reverse(steps, tape.checkpoint, field, gW, gU, vjp, buf, inplace)
    return Q, gB, gT, gW, gU


def _reverse(steps, checkpoint, field, gW, gU, vjp, buf, inplace):
    # the steps of a tape in reverse (module docstring); returns the gradient of the integration's start.
    # buf(name): a scratch buffer shaped like the state (None where not `inplace`)
    owned = False
    for kept, h, acc, A, b in reversed(steps):
        Us = _stage_inputs(field, kept, h, A, inplace) if checkpoint else kept
        gsW, gsU = ((gW, gU) if acc is None else
                    (torch.mul(gW, acc, out=buf("rev.gsW")), torch.mul(gU, acc, out=buf("rev.gsU"))))
        n = len(Us)
        gY = [None] * n
        hf = h if isinstance(h, float) else 1.0  # a float step goes into the coefficients
        for i in range(n - 1, -1, -1):
            tw = [(b[i] * hf, gsW)] if b[i] != 0.0 else []
            tu = [(b[i] * hf, gsU)] if b[i] != 0.0 else []
            for j in range(i + 1, n):
                if A[j][i] != 0.0 and gY[j] is not None:
                    tw.append((A[j][i] * hf, gY[j][0]))
                    tu.append((A[j][i] * hf, gY[j][1]))
            if not tw:
                continue
            gkW, gkU = _lin(tw, buf("rev.gkW")), _lin(tu, buf("rev.gkU"))
            if not isinstance(h, float):
                gkW, gkU = gkW.mul_(h), gkU.mul_(h)
            gY[i] = vjp(i, Us[i], gkW, gkU)
        if not owned:  # autograd's incoming gradients are not ours to write into
            gW, gU, owned = gW.clone(), gU.clone(), True
        for g in gY:
            if g is not None:
                gW.add_(g[0])
                gU.add_(g[1])
    return gW, gU


def integrate_gram(integrate, field, state, checkpoint: bool = False):
    """``integrate(state, tape)`` (a native integration of ``field`` over one interval) as one autograd node
    with the hand-written reverse pass of the module docstring. ``field``: a
    :class:`vars_ode.dynamics.VARSField` of one block on an operator with a Gram matrix; ``state``: ``(W, U)``;
    ``checkpoint``: keep one state per step instead of the stages (:class:`Tape`).
    Returns the state at the interval's end."""
    if field.scale is not None:
        raise ValueError("integrate_gram needs a field without scale (fold it into the operator's K)")
    K = field.op.gram()
    return _GramODENode.apply(integrate, field, bool(checkpoint), K, field.Bs[0], field.thr[0], state[0], state[1])
