"""A Runge-Kutta integration of the VARS field as one autograd node, its reverse pass written by hand: on a Gram
operator, and on any operator that can be rebuilt from its roots.

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

(``K`` symmetric). The step sizes and the accept decisions are constants, as in the unrolled integrators. Steps
that the adaptive loop took on some groups of problems alone (its tail, :meth:`Tape.tail`) are reversed on those
groups, their gradients put back into the whole batch's. For
large CPU states the temporaries and each stage's ``(gW, gU)`` go into reused scratch buffers, as the forward
integration's do (:data:`vars_ode.solvers.native.SCRATCH_MIN_BYTES`).
The gradients equal autograd's through the same steps up to rounding (``tests/test_native.py``).

The same node serves operators without a Gram matrix (:func:`integrate_operator`: the convolutional templates and
their union with the dynamic atoms, any number of code blocks, a per-problem ``scale`` on ``K g(u)``): ``K`` and
its transpose are ``op.gram_apply`` (``K`` is symmetric), and instead of ``dK`` the reverse pass takes, at every
stage, the gradient of ``<K(s gKs), a>`` with respect to the tensors the operator is built from (``op.roots()``,
by autograd through ``gram_apply`` on the operator rebuilt from them). Against autograd through the steps that
keeps about 0.57x the memory on VARS-S and makes ``grad="adjoint"`` native there (benchmarks/RESULTS.md,
thirteenth session).
"""
from __future__ import annotations

import torch

from .._workspace import scratch, scratch_like
from ..lasso import GramOperator, put_groups, take_groups
from ..ops import _soft
from .native import _buffers, _combine, _evaluate, _inplace


@torch.library.custom_op(f"{__package__.split('.')[0]}::accumulate_outer_", mutates_args=("Q",))
def _accumulate_outer(Q: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> None:
    """``Q += g a^T`` in place (batched), as one operation that Inductor keeps: it lowers ``Q.baddbmm_`` on a
    buffer of the compiled reverse pass as a ``baddbmm`` into a new buffer after a copy of the sum so far (a copy of
    ``Q`` per stage: 3.5 MB each on dense VARS-SD at DeiT-Ti's width). A custom operation that mutates ``Q`` runs
    in place there. Bit for bit the same values; dense VARS-SD's compiled dopri5 about 1.05x faster, its compiled
    adjoint about 1.04x (benchmarks/RESULTS.md, forty-second session). The namespace is the package's name, so that a
    second copy of the library in one process (``benchmarks/ab_layer.py``) registers its own."""
    Q.baddbmm_(g, a.transpose(-1, -2))


class Tape:
    """What the reverse pass keeps of an integration: per step ``(stages, h, acc, A, b)``, ``stages`` the ``U``
    blocks of each stage (a tuple per stage), or with ``checkpoint=True`` the state ``(W..., U...)`` at the step's
    start, from which the reverse pass evaluates the stages again (one state a step instead of the ``U`` blocks of
    every stage, for about one more evaluation a stage); ``h`` the step (a float, or a tuple with one per-problem
    tensor per entry of the state) and ``acc`` which problems accepted it (a tuple like ``h``, or ``None``).

    ``layout``: the operator whose ``num_blocks`` and ``expand`` map the state onto the problems (default: the Gram
    form, one block). The integrators of :mod:`vars_ode.solvers.native` call :meth:`add` once per step (attempt)."""

    def __init__(self, checkpoint: bool = False, layout=None):
        self.steps = []
        self.checkpoint = checkpoint
        self.layout = layout if layout is not None else GramOperator(None)

    def kept_entries(self) -> tuple:
        """The entries of a stage's state tuple that :meth:`add` keeps beyond the step (the ``U`` blocks; none
        with ``checkpoint``, which keeps the step's start instead): an integrator must not write them into reused
        buffers."""
        n = self.layout.num_blocks
        return () if self.checkpoint else tuple(range(n, 2 * n))

    def tail(self, index: torch.Tensor, lead: tuple) -> "Tape":
        """A tape for the rest of the integration on the groups ``index`` of the state's leading dimensions ``lead``
        alone (:meth:`vars_ode.solvers.native.AdaptiveRK._tail`), recorded here as one entry: the reverse pass
        takes those groups' gradients, reverses the steps of that tape on them, and puts the results back."""
        sub = Tape(self.checkpoint)
        self.steps.append(_Tail(index, tuple(lead), sub))
        return sub

    def add(self, stage_states, h, accept, A, b):
        """``stage_states``: the state tuple at which each stage was evaluated; ``h``: the step (a float, or a
        tuple with one per-problem tensor per entry of the state); ``accept``: per-problem booleans or ``None``;
        ``A``, ``b``: the tableau's stage rows and weights."""
        n = self.layout.num_blocks
        dtype = stage_states[0][n].dtype
        acc = None if accept is None else tuple(self.layout.expand(j % n, accept).to(dtype) for j in range(2 * n))
        kept = stage_states[0] if self.checkpoint else [tuple(st[n:]) for st in stage_states]
        self.steps.append((kept, h, acc, A, b))


class _Tail:
    # a Tape entry: the steps taken on the groups `index` of the leading dimensions `lead` alone (Tape.tail)
    def __init__(self, index, lead, tape):
        self.index, self.lead, self.tape = index, lead, tape


def _stage_inputs(field, y0, h, A, inplace=False):
    # the U blocks of every stage of one step from its start y0, evaluating the field again (with `inplace`, into
    # scratch buffers that live until the step's reverse pass is done)
    n = len(y0) // 2
    ks, Us = [], []
    for i, row in enumerate(A):
        # the W half of a stage is dead once its slope is evaluated, the U half is kept for the reverse pass
        out = ((*_buffers("rev.stageW", y0[:n]), *_buffers(f"rev.stageU{i}", y0[n:])) if inplace else None)
        y = _combine(y0, h, ks, row, out) if row else y0
        Us.append(tuple(y[n:]))
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
    ref = (gU if gU is not None else gW) if not steps else steps[0][0][0]
    ref = ref[0] if isinstance(ref, tuple) else ref  # a stage's U blocks, or a checkpointed state's W
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

    def buf(name, j=0):  # a scratch buffer shaped like the state, or None (a new tensor) outside `inplace`
        return scratch(name, shape, ref.dtype, ref.device) if inplace else None

    def vjp(i, Us, gk):
        # the stage's (gW, gU) contributions, in buffers of their own (they live until the step is reversed)
        (U,), (gdW, gdU) = Us, gk
        if active is not None:
            gdW, gdU = torch.mul(gdW, active, out=buf("rev.gdW")), torch.mul(gdU, active, out=buf("rev.gdU"))
        a = _soft(U, thr, out=buf("rev.a"))
        gKs = torch.sub(gdW, gdU, alpha=gamma, out=buf("rev.gKs"))
        if Q is not None:
            Q3, g3, a3 = Q.view(-1, *Q.shape[-2:]), gKs.reshape(-1, *shape[-2:]), a.reshape(-1, *shape[-2:])
            if torch.compiler.is_compiling():
                _accumulate_outer(Q3, g3, a3)
            else:
                Q3.baddbmm_(g3, a3.transpose(-1, -2))
        # times [a != 0] = [|U| > thr]: softshrink's own backward kernel for a float threshold, else |sign(a)| (a
        # boolean mask costs several float passes on the CPU: benchmarks/RESULTS.md, eighth session)
        floating = isinstance(thr, float)
        ga = buf("rev.ga" if floating else f"rev.gU{i}")
        ga = torch.bmm(K3, gKs.reshape(-1, *shape[-2:]),
                       out=None if ga is None else ga.view(-1, *shape[-2:])).view(*lead, *shape[-2:])
        ga.add_(gdU, alpha=gamma)
        if floating and torch.compiler.is_compiling():
            # Inductor has no lowering of softshrink_backward (it would call the kernel, one more pass); its mask as
            # a select, which fuses with the sums around it
            ga = torch.where((U >= -thr) & (U <= thr), 0.0, ga)
        elif floating:
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

    def tail(entry, g):
        # the steps taken on some groups alone: their part of g through those steps, the gradients of K, b and the
        # threshold added into those groups' entries
        lead, index = entry.lead, entry.index

        def take(x):
            return take_groups(x, lead, index)

        sub_field = field.select_groups(lead, index) if tape.checkpoint else None
        q, gb, gt, gw, gu = reverse(entry.tape, sub_field, take(Kx), take(thr), coeffs, take(g[0]), take(g[1]),
                                    None if active is None else take(active), want_K, want_B, want_thr)
        for full, part in ((Q, q), (gB, gb), (gT, gt)):
            if full is not None:
                full.view(-1, *full.shape[-2:]).index_add_(0, index, part)
        return tuple(put_groups(x, lead, index, part) for x, part in zip(g, (gw, gu)))

    gW, gU = _reverse(steps, tape.checkpoint, field, (gW, gU), vjp, buf, inplace, tail)
    return Q, gB, gT, gW, gU


def _reverse(steps, checkpoint, field, g, vjp, buf, inplace, tail=None, owned=False):
    # the steps of a tape in reverse (module docstring); `g` the gradient of the end, a tuple like the state;
    # returns that of the integration's start. vjp(i, Us, gk): the contributions (a tuple like the state) of stage
    # i with inputs Us (its U blocks) and slope gradient gk; buf(name, j): a scratch buffer shaped like entry j of
    # the state (None where not `inplace`); tail(entry, g): g through a Tape.tail entry (the Gram form's); owned:
    # whether the tensors of g are the caller's own (written into in place; else copied first)
    m = len(g)
    for entry in reversed(steps):
        if isinstance(entry, _Tail):
            if tail is None:
                raise NotImplementedError("a tape with steps on some groups alone is reversed in the Gram form only")
            g, owned = tail(entry, g), True  # new tensors
            continue
        kept, h, acc, A, b = entry
        Us = _stage_inputs(field, kept, h, A, inplace) if checkpoint else kept
        gs = g if acc is None else tuple(torch.mul(x, c, out=buf(f"rev.gs{j}", j)) for j, (x, c) in enumerate(zip(g, acc)))
        n = len(Us)
        gY = [None] * n
        hf = h if isinstance(h, float) else 1.0  # a float step goes into the coefficients
        for i in range(n - 1, -1, -1):
            terms = [[(b[i] * hf, x)] if b[i] != 0.0 else [] for x in gs]
            for k in range(i + 1, n):
                if A[k][i] != 0.0 and gY[k] is not None:
                    for j in range(m):
                        terms[j].append((A[k][i] * hf, gY[k][j]))
            if not terms[0]:
                continue
            gk = tuple(_lin(t, buf(f"rev.gk{j}", j)) for j, t in enumerate(terms))
            if not isinstance(h, float):
                gk = tuple(x.mul_(hj) for x, hj in zip(gk, h))
            gY[i] = vjp(i, Us[i], gk)
        if not owned:  # autograd's incoming gradients are not ours to write into
            g, owned = tuple(x.clone() for x in g), True
        for y in gY:
            if y is not None:
                for x, yj in zip(g, y):
                    x.add_(yj)
    return g


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


class _OperatorODENode(torch.autograd.Function):
    # inputs: integrate, field, checkpoint, the number of roots, then the operator's roots, the field's b blocks,
    # its threshold blocks and the start state (W..., U...)
    @staticmethod
    def forward(ctx, integrate, field, checkpoint, nr, *tensors):
        n = field.op.num_blocks
        tape = Tape(checkpoint, field.op)
        y = integrate(tuple(tensors[nr + 2 * n:]), tape)
        ctx.tape, ctx.field, ctx.nr, ctx.n = tape, field, nr, n
        ctx.active = field.active
        ctx.save_for_backward(*tensors[:nr + 2 * n])
        return tuple(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *g):
        nr, n, field = ctx.nr, ctx.n, ctx.field
        saved = ctx.saved_tensors
        roots, thr = saved[:nr], saved[nr + n:nr + 2 * n]
        need = ctx.needs_input_grad[4:]
        active_after, nfe = field.active, field.nfe
        field.active = ctx.active  # the window's frozen problems, for the evaluations of a checkpointed tape
        try:
            gR, gB, gT, gy = reverse_operator(ctx.tape, field, roots, need[:nr], thr, any(need[nr:nr + n]),
                                              any(need[nr + n:nr + 2 * n]), g)
        finally:
            field.active, field.nfe = active_after, nfe
        gB = (None,) * n if gB is None else tuple(x.sum_to_size(b.shape) for x, b in zip(gB, saved[nr:nr + n]))
        gT = (None,) * n if gT is None else tuple(x.sum_to_size(t.shape) for x, t in zip(gT, thr))
        return (None, None, None, None, *gR, *gB, *gT, *gy)


def reverse_operator(tape, field, roots, want_roots, thr, want_B, want_thr, g):
    """The reverse pass of a taped integration of ``field`` (a :class:`vars_ode.dynamics.VARSField` on any operator,
    ``K`` applied by ``field.op.gram_apply``, with its ``scale``) from the gradients ``g`` of its end (a tuple like
    the state, ``None`` entries zero). The operator's gradient: for every stage, ``d <K(s gKs), a> / d roots`` by
    autograd through ``gram_apply`` on the operator rebuilt from ``roots`` (``K`` is symmetric and ``s`` per
    problem, so that is the stage's ``d <s gKs, K a>``), for the roots where ``want_roots`` holds. Returns
    ``(d roots, d b, d threshold, d start)`` (``d b`` and ``d threshold`` per block at the state's shapes, or
    ``None`` where not wanted)."""
    op = field.op
    n = op.num_blocks
    alpha, beta, gamma = float(field.alpha), float(field.beta), float(field.gamma)
    steps = tape.steps
    gR = [None] * len(roots)
    if not steps:
        return gR, None, None, tuple(g)
    kept = steps[0][0]
    blocks = tuple(kept[n:]) if tape.checkpoint else kept[0]  # one tensor per block, shaped like it
    like = tuple(blocks[j % n] for j in range(2 * n))
    # the incoming gradients in the state's memory layout (autograd's may be contiguous where the state is not, as
    # the convolutional templates' channels-last code): every sum of the pass then runs over matching memory, where
    # one over two layouts costs several times as much
    fresh = tuple(x is None or x.stride() != t.stride() for x, t in zip(g, like))
    g = tuple(torch.zeros_like(t) if x is None else torch.empty_like(t).copy_(x) if new else x
              for x, t, new in zip(g, like, fresh))
    inplace = _inplace(blocks[0])

    def buf(name, j=0):  # a scratch buffer shaped like entry j of the state, or None (a new tensor)
        t = like[j]
        return scratch_like(name, t) if inplace else None

    act = field.active
    act = None if act is None else ((act,) * n if isinstance(act, torch.Tensor) else tuple(act))
    scale = field.scale
    gB = [torch.zeros_like(t) for t in blocks] if want_B else None
    gT = [torch.zeros_like(t) for t in blocks] if want_thr else None
    wanted = [k for k, w in enumerate(want_roots) if w]
    if wanted:
        with torch.enable_grad():
            proxies = tuple(r.detach().requires_grad_(k in wanted) for k, r in enumerate(roots))
            op_p = op.with_roots(proxies)  # built once: its graph serves every stage (retain_graph)

    def vjp(i, Us, gk):
        gdW, gdU = gk[:n], gk[n:]
        if act is not None:
            gdW = tuple(torch.mul(x, m, out=buf(f"rev.gdW{j}", j)) for j, (x, m) in enumerate(zip(gdW, act)))
            gdU = tuple(torch.mul(x, m, out=buf(f"rev.gdU{j}", n + j)) for j, (x, m) in enumerate(zip(gdU, act)))
        a = tuple(_soft(u, t, out=buf(f"rev.a{j}", j)) for j, (u, t) in enumerate(zip(Us, thr)))
        gKs = tuple(torch.sub(w, u, alpha=gamma, out=buf(f"rev.gKs{j}", j)) for j, (w, u) in enumerate(zip(gdW, gdU)))
        if scale is not None:  # the field's K a is scaled per problem: its transpose scales the cotangent
            gKs = tuple(x.mul_(s) for x, s in zip(gKs, scale))
        if wanted:
            with torch.enable_grad():
                Kg = op_p.gram_apply(gKs)
                pairs = [(k, x) for k, x in zip(Kg, a) if k.requires_grad]
                got = torch.autograd.grad([k for k, _ in pairs], [proxies[k] for k in wanted], [x for _, x in pairs],
                                          retain_graph=True, allow_unused=True)
            for k, x in zip(wanted, got):
                if x is not None:
                    gR[k] = x if gR[k] is None else gR[k].add_(x)
            Kg = tuple(x.detach() for x in Kg)
        else:
            Kg = op.gram_apply_into(gKs, tuple(buf(f"rev.Kg{j}", j) for j in range(n)))
        ga = []
        for j in range(n):
            # (K s gKs + gamma gdU) [a != 0], with [a != 0] = |sign(a)|
            x = torch.add(Kg[j], gdU[j], alpha=gamma, out=buf(f"rev.gU{i}.{j}", n + j))
            sgn = torch.sign(a[j], out=buf(f"rev.sign{j}", j))
            if gT is not None:
                x.mul_(sgn.abs())
                gT[j].addcmul_(sgn, x, value=-1.0)
            else:
                x.mul_(sgn.abs_())
            if gB is not None:
                gB[j].add_(gdW[j])
            ga.append(x)
        return (tuple(torch.add(u, w, alpha=-alpha, out=buf(f"rev.gW{i}.{j}", j)) for j, (w, u) in enumerate(zip(gdW, gdU)))
                + tuple(x.add_(u, alpha=-beta) for x, u in zip(ga, gdU)))

    gy = _reverse(steps, tape.checkpoint, field, g, vjp, buf, inplace, owned=all(fresh))
    return gR, gB, gT, gy


def integrate_operator(integrate, field, state, checkpoint: bool = False):
    """:func:`integrate_gram` for a field on any operator (a :class:`vars_ode.dynamics.VARSField` whose operator
    has ``roots`` and ``with_roots``, any number of blocks, with a ``scale``): ``integrate(state, tape)`` as one
    autograd node, its reverse pass :func:`reverse_operator`. Returns the state at the interval's end."""
    roots = tuple(field.op.roots())
    thr = tuple(t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=state[0].dtype, device=state[0].device)
                for t in field.thr)
    return _OperatorODENode.apply(integrate, field, bool(checkpoint), len(roots), *roots, *field.Bs, *thr, *state)
