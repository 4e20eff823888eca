"""Runge-Kutta integrators for the VARS dynamics that do not wait on the device inside their loop.

torchdiffeq decides every step on the host: its fixed-grid loop compares the step's end with the
output times, and its adaptive methods read the error ratio to accept or reject a step. On a GPU
each of these reads waits for the device to finish. The integrators here keep every decision on the
device:

* fixed step (``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``): the grid is built on the host
  from Python floats, exactly as torchdiffeq builds it (points ``t0 + i h``, the last one moved to
  ``t1``), and each step is a fixed sequence of tensor operations. Same tableaux as torchdiffeq
  (``rk4`` is its 3/8 rule), so the result is torchdiffeq's up to rounding.
* adaptive (``dopri5``, ``bosh3``, ``dopri8``, ``fehlberg2``, ``adaptive_heun``: torchdiffeq's embedded pairs, the
  last two with a stage added at the new point, see :data:`ADAPTIVE_TABLEAUX`): the step size, the time and the
  accept / reject decision are kept *per problem* (per column of the Gram system), as tensors. A rejected column
  keeps its state; a column at the end of the interval takes steps of length zero. The host looks at the device once
  at most every ``check_every`` attempts (is every column at ``t1``, and how many steps does the slowest still
  need?): on a GPU every 2, 4, 8, ... up to 16 attempts, on the CPU, where a look costs a reduction and no wait,
  after every attempt. The step-size rule is torchdiffeq's
  (safety 0.9, growth at most 10, shrink at least 0.2 after a rejection, exponent ``1 / order``), as
  is the first step (Hairer, Norsett and Wanner, II.4), both evaluated per column, except at the end of an
  interval: a remainder up to ``stretch`` (1.1) times the step size is one step, not a step and a sliver
  (a layer's horizon of 3 took 6 dopri5 attempts, the last for 1% of the horizon, and takes 5). To a steady state
  (:meth:`AdaptiveRK.advance`) there is no common end at all: each column keeps its own clock, and the step size
  follows Hairer and Wanner's stabilised rule (``beta``). Because the
  columns no longer share one step size, the evaluations differ from torchdiffeq's, whose error norm
  spans the whole batch; the solution agrees to the tolerance. Where the field can select groups of problems
  (:meth:`VARSField.select_groups <vars_ode.dynamics.VARSField.select_groups>`: a layer's images and heads, the
  leading dimensions of the state), the loop takes its tail on the groups still short of the end once they are at
  most :data:`TAIL_FRACTION` of all: the same steps for every column, fewer products (a tape records the tail as
  one entry, :meth:`vars_ode.solvers.gram_ode.Tape.tail`, which the reverse pass takes on those groups).

The state is a tuple of tensors mapped onto the problems by a :class:`vars_ode.lasso.Operator` (by default the
Gram form: tensors ``(..., m, k)`` whose columns are problems); the error norm of a problem is the largest
root-mean-square over the tuple's tensors, taken over its atoms (for the Gram form, the
``m`` rows. Gradients flow through the stages (unrolled); step-size control is detached.

Where autograd does not record (inside the fused node and the ``gram_ode`` node, or without a graph) and the state's
tensors are large CPU ones (:data:`SCRATCH_MIN_BYTES`), the stages, the slopes (:meth:`VARSField.forward_into
<vars_ode.dynamics.VARSField.forward_into>`) and the error estimate are written into reused scratch buffers
(:func:`vars_ode._workspace.scratch`) instead of fresh tensors, whose pages fault on their first write; the stage
inputs a tape keeps and the new state stay fresh tensors. Same operations in the same order, so the same values.
"""
from __future__ import annotations

import math

import torch

from .._workspace import scratch, scratch_like
from ..lasso import GramOperator, put_groups, take_groups

# (c, A, b): nodes, lower-triangular stage coefficients (row i has i entries), weights.
FIXED_TABLEAUX = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun2": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "heun3": ((0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75)),
    "rk4": ((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (0.125, 0.375, 0.375, 0.125)),
}

# the weights of dopri8's 8th-order solution (the 14th stage, at the new point, weighs 0)
_DOPRI8_B = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
             561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
             -528747749 / 2220607170, 1 / 4, 0.0)

# (c, A, b, b_low, order): embedded pairs whose last stage is evaluated at the new point (FSAL), so that stage is the
# next step's first; ``b`` gives the solution carried on, ``b - b_low`` the error estimate, ``order`` the exponent of
# the step-size rule (torchdiffeq's). A pair whose last stage is elsewhere gets one more stage, at the new point (row
# ``b``, weight 0): what torchdiffeq evaluates after such a step, so the evaluations an attempt are its own.
ADAPTIVE_TABLEAUX = {
    "dopri5": (
        (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
        5,
    ),
    "bosh3": (
        (0.0, 0.5, 0.75, 1.0),
        ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        (7 / 24, 0.25, 1 / 3, 0.125),
        3,
    ),
    # Prince and Dormand's RK8(7)13M (J. Comput. Appl. Math. 7, 1981), torchdiffeq's dopri8: 13 stages (the 13th at
    # c = 1, not at the new point) and a 14th at the new point; the 8th-order solution is carried on
    "dopri8": (
        (0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
         1201146811 / 1299019798, 1.0, 1.0, 1.0),
        ((),
         (1 / 18,),
         (1 / 48, 1 / 16),
         (1 / 32, 0.0, 3 / 32),
         (5 / 16, 0.0, -75 / 64, 75 / 64),
         (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
         (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
         (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229,
          -180193667 / 1043307555),
         (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059,
          790204164 / 839813087, 800635310 / 3783071287),
         (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803,
          -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789),
         (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
          -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
          -45442868181 / 3398467696, 3065993473 / 597172653),
         (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
          -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563, -4093664535 / 808688257,
          3962137247 / 1805957418, 65686358 / 487910083),
         (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604,
          11173962825 / 925320556, -13158990841 / 6184727034, 3936647629 / 1978049680, -160528059 / 685178525,
          248638103 / 1413531060, 0.0),
         _DOPRI8_B[:-1]),
        _DOPRI8_B,
        (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321,
         656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0.0,
         0.0),
        8,
    ),
    # Fehlberg's RK1(2) (NASA TR R-315, 1969), as torchdiffeq's fehlberg2 uses it: the second-order solution is
    # propagated, so a stage at the new point is added (c = 1, row = b); three evaluations an attempt
    "fehlberg2": (
        (0.0, 0.5, 1.0, 1.0),
        ((), (0.5,), (1 / 256, 255 / 256), (1 / 512, 255 / 256, 1 / 512)),
        (1 / 512, 255 / 256, 1 / 512, 0.0),
        (1 / 256, 255 / 256, 0.0, 0.0),
        2,
    ),
    # Heun's method with Euler's embedded (torchdiffeq's adaptive_heun), with a stage at the new point: two
    # evaluations an attempt
    "adaptive_heun": (
        (0.0, 1.0, 1.0),
        ((), (1.0,), (0.5, 0.5)),
        (0.5, 0.5, 0.0),
        (1.0, 0.0, 0.0),
        2,
    ),
}

for _name, (_c, _A, _b, _bl, _o) in ADAPTIVE_TABLEAUX.items():
    assert tuple(_A[-1]) == tuple(_b[:-1]) and _b[-1] == 0.0 and _c[-1] == 1.0, _name  # FSAL

NATIVE_METHODS = tuple(FIXED_TABLEAUX) + tuple(ADAPTIVE_TABLEAUX)
ADAPTIVE_OPTIONS = ("safety", "ifactor", "dfactor", "first_step", "check_every", "max_num_steps", "stretch",
                    "fixed_attempts", "beta", "max_step")
#: the adaptive loop's last attempts run on the groups of problems still short of the interval's end (the state's
#: leading dimensions: a layer's images and heads) once at most this fraction of the groups is, where the field can
#: select groups (:meth:`vars_ode.dynamics.VARSField.select_groups`) and the tape, if any, records a tail (the Gram
#: form's :class:`vars_ode.solvers.gram_ode.Tape`; an unrolled graph records through the selection). 0 turns it
#: off. In trained models a horizon's last one to three attempts are taken for 0.1% of the problems
#: (benchmarks/RESULTS.md, twenty-third session; ``benchmarks/ode_tail_cpu.py``)
TAIL_FRACTION = 0.25
#: the adaptive options that torchdiffeq's methods do not have (torchdiffeq only warns about them and ignores them)
NATIVE_ONLY_OPTIONS = ("check_every", "stretch", "fixed_attempts", "beta", "max_step")


#: the smallest state tensor (bytes) whose stages and slopes go into reused buffers: glibc's default threshold for
#: serving an allocation by ``mmap``, whose pages fault on their first write; smaller ones come from the heap, where
#: the buffers' bookkeeping would cost more than it saves (benchmarks/RESULTS.md, eleventh session)
SCRATCH_MIN_BYTES = 128 * 1024


def _inplace(like: torch.Tensor) -> bool:
    """Whether the integrators write stages and slopes into reused CPU scratch buffers (``out=`` forms) for a
    state like ``like``: only where autograd does not record (the fused node, the ``gram_ode`` node, steady state
    without a graph), nothing traces, and the tensors are large CPU ones. Same operations in the same order either
    way, so the same values."""
    return (like.device.type == "cpu" and like.numel() * like.element_size() >= SCRATCH_MIN_BYTES
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _buffers(name: str, like: tuple, fresh=()) -> tuple:
    """Scratch tensors shaped like the tuple ``like``, one per entry (``None`` for the entries in ``fresh``: a
    new tensor, for what outlives the step, such as the stage inputs a tape keeps)."""
    return tuple(None if j in fresh else scratch_like(f"{name}.{j}", t) for j, t in enumerate(like))


def _evaluate(f, t, y, out):
    # f(t, y), into the tuple of tensors `out` where the field can write into them (VARSField.forward_into)
    if out is not None and hasattr(f, "forward_into"):
        return f.forward_into(y, out)
    return f(t, y)


def _combine(y, dt, ks, coeffs, out=None):
    """``y + dt * sum_j coeffs[j] ks[j]`` for every tensor of the tuple state, skipping zero weights; ``dt`` a
    float or a tuple with one step (broadcastable) per tensor of the state. ``out`` (only where
    :func:`_inplace`): a tuple of tensors to write into, ``None`` entries for new tensors."""
    res = []
    for i, yi in enumerate(y):
        h = dt[i] if isinstance(dt, tuple) else dt
        o = None if out is None else out[i]
        terms = [(c, k[i]) for c, k in zip(coeffs, ks) if c != 0.0]
        if not terms:
            res.append(yi)
        elif isinstance(h, torch.Tensor):  # y + h * sum_j c_j k_j, the sum accumulated in place
            acc = (terms[0][1] * terms[0][0] if out is None else
                   torch.mul(terms[0][1], terms[0][0], out=scratch_like("ode.acc", yi)))
            for c, k in terms[1:]:
                acc.add_(k, alpha=c)
            res.append(torch.addcmul(yi, h, acc, out=o))
        else:  # y + sum_j (h c_j) k_j: one kernel a term
            acc = torch.add(yi, terms[0][1], alpha=h * terms[0][0], out=o)
            for c, k in terms[1:]:
                acc.add_(k, alpha=h * c)
            res.append(acc)
    return tuple(res)


def _stage_buffers(y, tape) -> tuple:
    # where a stage input is written: scratch, except the entries the tape keeps (Tape.kept_entries)
    return _buffers("ode.stage", y, fresh=tape.kept_entries() if tape is not None else ())


def fixed_grid(t0: float, t1: float, step_size: float) -> list[float]:
    """torchdiffeq's grid for a fixed step: ``t0, t0 + h, ...``, its last point moved to ``t1``."""
    if not step_size > 0:
        raise ValueError(f"options['step_size'] must be positive, got {step_size!r}")
    n = max(2, math.ceil((t1 - t0) / step_size + 1))
    grid = [t0 + i * step_size for i in range(n)]
    grid[-1] = t1
    return grid


def equal_step_marks(T: float, n: int) -> dict:
    """Where ``n`` equal steps over ``[0, T]`` pass each unit of time ``j < T`` and ``T``: ``{step: [theta, ...]}``,
    step ``i`` (from 1) covering ``[(i - 1) T / n, i T / n]`` and ``theta`` in ``(0, 1]`` the fraction of it at which
    the unit falls (1 for ``T``, and for a unit on the grid)."""
    marks: dict = {}
    if n <= 0:
        return marks
    h = T / n
    for j in range(1, math.ceil(T)):
        i = min(n, max(1, math.ceil(j / h - 1e-9)))
        theta = min(1.0, (j - (i - 1) * h) / h)
        marks.setdefault(i, []).append(1.0 if theta > 1 - 1e-9 else theta)
    marks.setdefault(n, []).append(1.0)
    return marks


def hermite(y0: tuple, F0: tuple, y1: tuple, F1: tuple, h: float, theta: float) -> tuple:
    """The cubic Hermite interpolant at ``t0 + theta h`` of a step of length ``h`` from ``y0`` (slope ``F0``) to
    ``y1`` (slope ``F1``), entry by entry of the state: fourth order in ``h`` locally, for the code at a unit of time
    that an equal-step integration steps over. ``theta = 1`` gives ``y1`` itself."""
    if theta == 1.0:
        return tuple(y1)
    t2, t3 = theta * theta, theta * theta * theta
    a0, a1 = 2 * t3 - 3 * t2 + 1, -2 * t3 + 3 * t2
    d0, d1 = (t3 - 2 * t2 + theta) * h, (t3 - t2) * h
    return tuple(a0 * p + d0 * fp + a1 * q + d1 * fq for p, fp, q, fq in zip(y0, F0, y1, F1))


def fixed_step_size(method: str, options: dict) -> float:
    """The step of a fixed-step ``method`` from torchdiffeq-style ``options`` (only ``step_size`` is valid)."""
    unknown = sorted(set(options) - {"step_size"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in options for integrator='native' with method "
                         f"{method!r}; valid options: ['step_size']")
    return options["step_size"]


def integrate_fixed(f, y, t0: float, t1: float, method: str, step_size: float, tape=None):
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with a fixed-step method; returns ``y(t1)``.
    ``tape`` (:class:`vars_ode.solvers.gram_ode.Tape`) receives every step's stage inputs."""
    c, A, b = FIXED_TABLEAUX[method]
    grid = fixed_grid(t0, t1, step_size)
    inplace = _inplace(y[0])
    for ta, tb in zip(grid[:-1], grid[1:]):
        dt = tb - ta
        ks, stages = [], []
        for i, (ci, row) in enumerate(zip(c, A)):
            yi = _combine(y, dt, ks, row, _stage_buffers(y, tape) if inplace else None) if row else y
            stages.append(yi)
            ks.append(_evaluate(f, ta + ci * dt, yi, _buffers(f"ode.k{i}", y) if inplace else None))
        if tape is not None:
            tape.add(stages, dt, None, A, b)
        y = _combine(y, dt, ks, b, (None,) * len(y) if inplace else None)
    return y


class AdaptiveRK:
    """A per-column embedded Runge-Kutta integrator (a pair of :data:`ADAPTIVE_TABLEAUX`) that keeps its step
    sizes between calls of :meth:`integrate` (one call per time window).

    Arguments:
        f: the vector field, ``f(t, state) -> tuple`` like ``state``; ``t`` is passed as a float.
        method: a key of :data:`ADAPTIVE_TABLEAUX` (``"dopri5"``, ``"bosh3"``, ...).
        rtol, atol: tolerances of the local error per column.
        cols: the problems' shape (``(..., k)`` for one problem per column).
        layout: the :class:`vars_ode.lasso.Operator` whose ``norm`` and ``expand`` map the state onto the
            problems (default: the Gram form, one problem per column of every tensor of the state).
        options: ``safety`` (0.9), ``ifactor`` (10), ``dfactor`` (0.2), ``first_step`` (per-column
            Hairer estimate), ``check_every`` (the most attempts between two looks at the device: 16, 1 for CPU
            tensors; each look also estimates the steps still needed, and the next look comes after that many),
            ``max_num_steps`` (attempts per call, 2**31 - 1), ``stretch`` (1.1: a remainder of the interval up to
            this many step sizes is taken as one step; 1 turns it off), ``fixed_attempts`` (None; an integer: exactly
            this many attempts per call and no look at the device at all, where the last attempt takes every
            column still short of the interval's end to it and accepts that step whatever its error
            (:attr:`forced` counts the columns whose tolerance rejected it). With a budget that no column
            exhausts, the result is the unbudgeted one: a column at the end takes steps of length zero, which
            leave its state as it is. A budget makes an integration one fixed sequence of operations, which CUDA
            graphs capture and torch.compile traces; ``check_every`` and ``max_num_steps`` then have no effect),
            ``beta`` (0: torchdiffeq's rule; above 0, Hairer's stabilised step-size control, the steady state's
            default, :meth:`advance`: an accepted step's factor is ``safety ratio^-(1/order - 0.75 beta)
            previous^beta``, ``previous`` the error ratio of the problem's last accepted step (at least 1e-4), so a
            step that passed with little margin shrinks the next; clipped to ``[dfactor, ifactor]``), ``max_step``
            (None: a step size at most the interval, in :meth:`advance` its ``max_step``; a positive number: at most
            that too, the first step included, and a remainder is stretched into one step only up to it; only the
            last attempt of a ``fixed_attempts`` budget, which ends every column at the interval's end, may be longer).

    ``attempts`` counts attempted steps; ``evaluations`` (a long tensor of the problems' shape) counts, per
    column, the evaluations spent while that column was still short of the window's end; ``forced`` (same shape)
    how many times a column's last attempt of a ``fixed_attempts`` budget ended it on a step its tolerance rejected.
    """

    def __init__(self, f, method: str, rtol: float, atol: float, cols, dtype, device, options=None, layout=None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(ADAPTIVE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for integrator='native' with method {method!r}; "
                             f"valid options: {list(ADAPTIVE_OPTIONS)}")
        self.f, self.method = f, method
        self.layout = layout if layout is not None else GramOperator(None)
        self.c, self.A, self.b, b_low, self.order = ADAPTIVE_TABLEAUX[method]
        self.e = tuple(hi - lo for hi, lo in zip(self.b, b_low))
        # atol: a float, or a tensor broadcastable to the state (one per problem: a problem solved in its own units)
        self.rtol, self.atol = float(rtol), atol if isinstance(atol, torch.Tensor) else float(atol)
        self.safety = float(options.get("safety", 0.9))
        self.ifactor = float(options.get("ifactor", 10.0))
        self.dfactor = float(options.get("dfactor", 0.2))
        self.check_every = int(options.get("check_every", 1 if torch.device(device).type == "cpu" else 16))
        self.max_num_steps = int(options.get("max_num_steps", 2 ** 31 - 1))
        self.stretch = float(options.get("stretch", 1.1))
        if not self.stretch >= 1.0:
            raise ValueError(f"options['stretch'] must be a number >= 1, got {options.get('stretch')!r}")
        if self.check_every < 1:
            raise ValueError(f"options['check_every'] must be a positive integer, got {self.check_every!r}")
        budget = options.get("fixed_attempts")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"options['fixed_attempts'] must be a positive integer or None, got {budget!r}")
        self.fixed_attempts = budget
        self.beta = float(options.get("beta", 0.0))
        if not 0.0 <= self.beta < 4.0 / (3.0 * self.order):  # (the error's exponent 1 / order - 0.75 beta > 0)
            raise ValueError(f"options['beta'] must be a number in [0, {4.0 / (3.0 * self.order):.3g}) for {method} "
                             f"(4 / (3 order)), got {options.get('beta')!r}")
        self.previous = None  # the error ratio of every column's last accepted step (beta > 0), from 1e-4
        #: None, or per column a factor (at least 1) by which its tolerances are tightened: its error ratio is
        #: multiplied by it (a steady state's remedy for a problem that stalls,
        #: :data:`vars_ode.solvers.ode.STALL_TIGHTEN`)
        self.tighten = None
        #: each column's own time in :meth:`advance` (the steady state's windows); None before its first call
        self.time = None
        cap = options.get("max_step")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf):
            raise ValueError(f"options['max_step'] must be a positive number or None, got {cap!r}")
        #: the longest step (None: the interval's length), options["max_step"]; :meth:`advance` lowers it to its own
        self.step_cap = None if cap is None else float(cap)
        self.max_step = self.step_cap
        first = options.get("first_step")
        if first is not None and self.step_cap is not None:
            first = min(float(first), self.step_cap)
        self.dt = None if first is None else torch.full(cols, float(first), dtype=dtype, device=device)
        self.evaluations = torch.zeros(cols, dtype=torch.long, device=device)
        self.forced = torch.zeros(cols, dtype=torch.long, device=device)
        self.attempts = 0
        self._burst = 1  # attempts between two host reads: 2, 4, 8, ... up to check_every
        self.k1 = None
        #: a :class:`vars_ode.solvers.gram_ode.Tape` that receives every attempt's stage inputs, or None
        self.tape = None
        #: None, or ``fn(rk, y, t, end) -> (y, t)`` that :meth:`advance` calls in place of an eager attempt (the same
        #: attempt compiled: :func:`vars_ode.solvers.compiled_ode.steady_attempt`)
        self.attempt = None
        #: None, or the field's evaluation count (``f.nfe``) at which :meth:`advance` and :meth:`integrate` stop early,
        #: at their next look at the device (at most one burst of ``check_every`` attempts later): a steady state's
        #: ``max_iter``, so that one long window cannot spend it several times over. The state returned is then short
        #: of the interval's end, which only a steady state, where the time does not matter, may ask for
        self.budget = None

    def _first_step(self, y, f0):
        # Hairer, Norsett and Wanner's estimate, per column: a step that changes y by about 1% of its scale.
        with torch.no_grad():
            yd, fd = tuple(t.detach() for t in y), tuple(t.detach() for t in f0)
            scale = tuple(self.atol + self.rtol * t.abs() for t in yd)
            d0 = self._norm(tuple(a / s for a, s in zip(yd, scale)))
            d1 = self._norm(tuple(a / s for a, s in zip(fd, scale)))
            tiny = (d0 < 1e-5) | (d1 < 1e-5)
            h0 = torch.where(tiny, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
            f1 = self.f(0.0, tuple(a + self._x(j, h0) * b for j, (a, b) in enumerate(zip(yd, fd))))
            d2 = self._norm(tuple((a - b) / s for a, b, s in zip(f1, fd, scale))) / h0
            dmax = torch.maximum(d1, d2)
            h1 = torch.where(dmax <= 1e-15, torch.clamp_min(h0 * 1e-3, 1e-6),
                             (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / (self.order + 1)))
            h = torch.minimum(100 * h0, h1)
            return h if self.step_cap is None else h.clamp(max=self.step_cap)

    def _reach(self):
        # per column, the longest remainder of an interval taken as one step: stretch step sizes, at most max_step
        reach = self.stretch * self.dt
        return reach if self.max_step is None else reach.clamp(max=self.max_step)

    def _norm(self, ts):
        return self.layout.norm(ts)

    def _x(self, j, t):
        # a per-problem tensor, broadcastable to entry j of the state
        return self.layout.expand(j % self.layout.num_blocks, t)

    def integrate(self, y, t0: float, t1: float):
        """Advance every column from ``t0`` to ``t1``; returns the state at ``t1``."""
        # the first stage is evaluated afresh in every call: the field may have changed in between
        # (the steady-state mode freezes converged columns by zeroing their field)
        self.k1 = self.f(t0, y)
        self.evaluations += 1
        if self.dt is None:
            self.dt = self._first_step(y, self.k1)
            self.evaluations += 1
        span = t1 - t0
        t = torch.zeros_like(self.dt)  # time since t0, per column
        if self.fixed_attempts is not None:  # a budget: no look at the device
            for i in range(self.fixed_attempts):
                y, t = self._attempt(y, t, t0, span, last=i == self.fixed_attempts - 1)
            return y
        return self._loop(y, t, t0, span, 0)[0]

    def advance(self, y, duration: float, live, end: float = math.inf, max_step: float = 32.0):
        """One window of a steady state: every column steps at its own size and none waits for another (no step is
        cut to land on a common time, as :meth:`integrate` does at ``t1``), until the median of the ``live`` columns
        (a boolean tensor of the problems' shape) has advanced by ``duration``; a column's own clock (:attr:`time`,
        kept from call to call) stops at ``end``, and no step is longer than ``max_step``. Returns the state.

        To a steady state the time at which a column is looked at does not matter, only its residual: with a
        common end per window the batch took as many attempts as its slowest column needed in each window, and
        every column cut a step short at each end (Quick start, 100 problems, dopri5 to 1e-6: 1,757 attempts where
        the slowest column needed 1,573; benchmarks/RESULTS.md, thirty-fourth session). The host reads the median
        column's progress once per burst of attempts (bursts as in :meth:`integrate`, up to ``check_every``)."""
        self.k1 = self.f(0.0, y)
        self.evaluations += 1
        if self.dt is None:
            self.dt = self._first_step(y, self.k1)
            self.evaluations += 1
        if self.time is None:
            self.time = torch.zeros_like(self.dt)
        self.max_step = float(max_step) if self.step_cap is None else min(float(max_step), self.step_cap)
        start, t, n = self.time, self.time, 0
        nan = torch.full((), math.nan, dtype=self.dt.dtype, device=self.dt.device)
        while n < self.max_num_steps:
            with torch.no_grad():  # the median live column's attempts still to go at its step size (NaN: none live)
                on = live & (t < end)
                done = torch.where(on, t - start, nan).nanmedian()
                need = ((duration - done) / torch.where(on, self.dt, nan).nanmedian()).nan_to_num(0.0)
                need = float(torch.ceil(need - 1e-9).clamp(0, self.max_num_steps))
            if need == 0 or self._spent():
                break
            self._burst = min(2 * self._burst, self.check_every)
            for _ in range(min(self._burst, int(need), self.max_num_steps - n)):
                y, t = self._attempt(y, t, 0.0, end) if self.attempt is None else self.attempt(self, y, t, end)
                n += 1
        self.time = t
        return y

    def _loop(self, y, t, t0, span, n):
        # the attempts of integrate() from time t0 + t (per column), n attempts already made; returns (y, t)
        groups = self._groups(y)
        while True:
            # the only host read: how many steps of its current size the slowest problem still needs (zero: all
            # are at t1); that many attempts run before the next read, at most 2, 4, 8, ... from the first call
            # (the first steps may grow tenfold an attempt; the step sizes then carry over to later windows) and
            # at most check_every; with it, where the tail can be taken on its own, how many groups still need any
            with torch.no_grad():  # a column whose step size is not finite (a NaN problem) needs nothing more
                rest = span - t
                need = torch.where(rest <= self._reach(), (rest > 0).to(rest.dtype), rest / self.dt)
                need = need.nan_to_num(nan=0.0, posinf=float(self.max_num_steps)).clamp_min(0)
                if not need.numel():
                    need, busy = 0.0, 0
                elif groups > 1:  # still one read: the attempts (at most check_every) and the groups in one number
                    per = need.reshape(groups, -1).amax(-1)
                    top = per.amax()
                    todo = torch.where(top > 0, torch.ceil(top - 1e-9).clamp(1, self.check_every), 0.0)
                    todo, busy = divmod(int(todo.double() * (groups + 1) + (per > 0).sum()), groups + 1)
                    need = float(todo)
                else:
                    need, busy = float(need.amax()), None
            if need == 0 or self._spent():
                return y, t
            if busy is not None and busy < groups and busy <= TAIL_FRACTION * groups:
                return self._tail(y, t, t0, span, n, groups)
            if n >= self.max_num_steps:
                raise RuntimeError(f"{self.method}: options['max_num_steps'] = {self.max_num_steps} attempts were "
                                   f"not enough to reach t = {t0 + span} (at t = {t0 + float(t.amin())} for the "
                                   "slowest problem)")
            self._burst = min(2 * self._burst, self.check_every)
            for _ in range(min(self._burst, max(1, math.ceil(need - 1e-9)), self.max_num_steps - n)):
                y, t = self._attempt(y, t, t0, span)
                n += 1

    def _spent(self) -> bool:
        return self.budget is not None and self.f.nfe >= self.budget

    def _groups(self, y) -> int:
        # how many groups of problems (the product of the state's leading dimensions) the loop may split its tail
        # into: 1 (never) unless the state is one Gram block, the field can select groups and the tape, if any, can
        # record a tail (gram_ode.Tape.tail)
        if (type(self.layout) is not GramOperator or len(y) != 2 or not getattr(self.f, "selects_groups", False)
                or (self.tape is not None and not hasattr(self.tape, "tail"))):
            return 1
        return math.prod(y[0].shape[:-2])

    def _tail(self, y, t, t0, span, n, groups):
        # the rest of the interval for the groups with a column short of its end, as a smaller integration of their
        # own (a field on those groups only); the others are at the end already. Every column takes the same steps
        # as in the whole batch: per-column step sizes, errors and decisions.
        lead = y[0].shape[:-2]
        live = ((t < span).reshape(groups, -1).any(-1)).nonzero().squeeze(-1)

        def take(x):  # the live groups' part of a per-column tensor (lead + (k,)) or a state-like one
            return x.reshape(groups, *x.shape[len(lead):])[live]

        def put(x, part):
            return put_groups(x, lead, live, part)

        sub = AdaptiveRK.__new__(AdaptiveRK)
        sub.__dict__.update(self.__dict__)
        sub.f = self.f.select_groups(lead, live)
        sub.atol = take_groups(self.atol, lead, live)
        sub.dt, sub.k1 = take(self.dt), tuple(take(k) for k in self.k1)
        sub.previous = None if self.previous is None else take(self.previous)
        sub.tighten = None if self.tighten is None else take(self.tighten)
        sub.evaluations, sub.forced = torch.zeros_like(take(self.evaluations)), torch.zeros_like(take(self.forced))
        sub.attempts = 0
        sub.budget = None if self.budget is None else self.budget - self.f.nfe  # (the sub-field counts from zero)
        sub.tape = None if self.tape is None else self.tape.tail(live, lead)
        ys, ts = sub._loop(tuple(take(x) for x in y), take(t), t0, span, n)
        self.f.nfe += sub.f.nfe
        self.attempts += sub.attempts
        self._burst = sub._burst
        self.dt = put(self.dt, sub.dt)
        if sub.previous is not None:
            self.previous = put(torch.full_like(self.dt, 1e-4) if self.previous is None else self.previous,
                                sub.previous)
        self.k1 = tuple(put(k, part) for k, part in zip(self.k1, sub.k1))
        self.evaluations = put(self.evaluations, take(self.evaluations) + sub.evaluations)
        self.forced = put(self.forced, take(self.forced) + sub.forced)
        return tuple(put(x, part) for x, part in zip(y, ys)), put(t, ts)

    def _attempt(self, y, t, t0, span, last=False):
        # last: the final attempt of a fixed_attempts budget, which ends every column at the interval's end
        live = t < span
        rest = span - t
        # a remainder within `stretch` step sizes (and max_step) is one step, not a step and a sliver
        # (zero for the columns at the end)
        h = (rest if last else torch.where(rest <= self._reach(), rest, self.dt)).clamp_min(0.0)
        hs = tuple(self._x(j, h) for j in range(len(y)))
        ks, stages = [self.k1], [y]
        inplace = _inplace(y[0])
        for i, row in enumerate(self.A[1:], 1):
            # one stage buffer for all stages: a stage's input is dead once its slope is evaluated, and the
            # last one (the new point) is the last written
            y_new = _combine(y, hs, ks, row, _stage_buffers(y, self.tape) if inplace else None)
            stages.append(y_new)
            ks.append(_evaluate(self.f, t0, y_new, _buffers(f"ode.k{i}", y) if inplace else None))
        # FSAL: the last row of A is b, so the last stage was evaluated at the new point y_new
        self.evaluations += live.long() * (len(self.c) - 1)
        self.attempts += 1
        with torch.no_grad():
            # the local error h sum_j e_j k_j relative to atol + rtol max(|y|, |y_new|), per column: the sum and
            # the quotient accumulated in place, and h (>= 0, one per column) applied to the norm, not to the state
            ratio = h * self._norm(tuple(self._error_over_scale(i, ks, y, y_new) for i in range(len(y))))
            if self.tighten is not None:
                ratio = ratio * self.tighten
            # a non-finite error (a diverging column) ends that column: its state becomes non-finite
            # and is reported so by the caller's residual, instead of shrinking the step for ever
            broken = ~torch.isfinite(ratio)
            accept = (ratio <= 1.0) | broken
            if last:
                self.forced += (live & ~accept).long()
                accept = torch.ones_like(accept)
            r = ratio.clamp_min(1e-300)
            grow = torch.where(ratio == 0, torch.full_like(ratio, self.ifactor),
                               torch.clamp(self.safety * r ** (-1.0 / self.order), max=self.ifactor))
            if self.beta > 0:
                # Hairer and Wanner's stabilised control (Solving ODEs II, IV.2; their DOPRI5's beta): where the step
                # sits at the stability limit it keeps the step from overshooting and being rejected
                if self.previous is None:
                    self.previous = torch.full_like(ratio, 1e-4)
                pi = self.safety * r ** (0.75 * self.beta - 1.0 / self.order) * self.previous ** self.beta
                ok = accept & ~broken
                factor = torch.where(ok, pi, grow).clamp(self.dfactor, self.ifactor).nan_to_num(1.0)
                self.previous = torch.where(ok & live, ratio.clamp_min(1e-4), self.previous)
            else:
                # torchdiffeq's rule: no shrinking after an error below one, at most by dfactor otherwise
                factor = torch.where(ratio < 1.0, grow.clamp_min(1.0), grow.clamp_min(self.dfactor)).nan_to_num(1.0)
            proposal = h * factor
            # a step shortened to land on the window's end says nothing against the step size; a rejected step that
            # was stretched to the end is followed by one below rest / stretch (with stretch * safety >= 1 it would
            # be proposed, stretched and rejected for ever; below that the cap never binds)
            stretched_out = ~accept & (h > self.dt)
            new_dt = torch.where(accept & (h < self.dt), torch.maximum(self.dt, proposal),
                                 torch.where(stretched_out, torch.minimum(proposal, rest * (0.999 / self.stretch)),
                                             proposal))
            cap = span if self.max_step is None else min(span, self.max_step)
            self.dt = torch.where(live, new_dt, self.dt).clamp(min=1e-12, max=max(cap, 1e-12))
            t = torch.where(broken, torch.full_like(t, span), torch.where(accept, t + h, t))
        if self.tape is not None:
            self.tape.add(stages, hs, accept, self.A, self.b)
        # the accepted columns take the new state: a lerp with weight 0 or 1 (exact for finite values; a column
        # with a non-finite state is broken, hence accepted, and stays non-finite), one pass where torch.where on
        # a boolean mask costs several on the CPU (benchmarks/RESULTS.md, eighth session)
        w = accept.to(h.dtype)
        y = tuple(torch.lerp(a, b, self._x(j, w)) for j, (a, b) in enumerate(zip(y, y_new)))
        self.k1 = tuple(torch.lerp(a, b, self._x(j, w)) for j, (a, b) in enumerate(zip(self.k1, ks[-1])))
        return y, t

    def _error_over_scale(self, i, ks, y, y_new):
        # entry i of (sum_j e_j k_j) / (atol + rtol max(|y|, |y_new|)), without a graph
        terms = [(e, k[i].detach()) for k, e in zip(ks, self.e) if e != 0.0]
        like = y[i]
        err = (torch.mul(terms[0][1], terms[0][0], out=scratch_like(f"ode.err{i}", like))
               if _inplace(like) else terms[0][1] * terms[0][0])  # (called without a graph)
        for e, k in terms[1:]:
            err.add_(k, alpha=e)
        scale = torch.maximum(y[i].detach().abs(), y_new[i].detach().abs()).mul_(self.rtol)
        scale.add_(self.atol)
        return err.div_(scale)


def integrate_adaptive(f, y, t0: float, t1: float, method: str, rtol: float, atol, options=None, tape=None):
    """One-shot :class:`AdaptiveRK` integration of ``y`` from ``t0`` to ``t1`` (Gram layout: problems are the
    columns); returns ``(y(t1), integrator)``. ``tape`` as in :func:`integrate_fixed`."""
    ref = y[0]
    cols = ref.shape[:-2] + (ref.shape[-1],)
    rk = AdaptiveRK(f, method, rtol, atol, cols, ref.dtype, ref.device, options)
    rk.tape = tape
    return rk.integrate(y, t0, t1), rk


def integrate(f, y, t0: float, t1: float, method: str, rtol: float, atol, options=None, tape=None, forced=None):
    """``y(t1)`` by any native method in the Gram layout: fixed steps (``options["step_size"]``) or adaptive
    (``rtol``, ``atol``, ``options``). ``forced`` (a list): receives :attr:`AdaptiveRK.forced` of an adaptive
    integration with a budget (``options["fixed_attempts"]``), per problem."""
    if method in ADAPTIVE_TABLEAUX:
        out, rk = integrate_adaptive(f, y, t0, t1, method, rtol, atol, options, tape)
        if forced is not None and rk.fixed_attempts is not None:
            forced.append(rk.forced)
        return out
    return integrate_fixed(f, y, t0, t1, method, fixed_step_size(method, options or {}), tape=tape)
