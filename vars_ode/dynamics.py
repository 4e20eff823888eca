"""The recurrent attractor dynamics of VARS as torchdiffeq-ready vector fields.

Coupled system (paper Eq. 8-9), state ``(z, u)``::

    dz/dt = -alpha z + P g(u) + x
    du/dt = -beta u - gamma (P^T P - I) g(u) + P^T z,       g(u) = soft_threshold(u, theta)

With ``alpha = 1, beta = gamma = 2`` and ``theta = w / 2`` (``w`` the L1 weight, ``lam`` under the
default Eq. 10 convention) its equilibrium is ``g(u*) = argmin 0.5||P a - x||^2 + w ||a||_1`` and
``z* = P g(u*) + x`` (Eq. 10-11); see ``theory/derivation.md``.

Reduced system (paper Eq. 20; ``z`` held at its equilibrium ``(P g(u) + x) / alpha``), state ``u``::

    du/dt = -beta u - gamma (K - I) g(u) + (K g(u) + P^T x) / alpha

Energies: the coupled system is a symmetric Hopfield / Cohen-Grossberg network and has the Lyapunov
function :meth:`VARSDynamics.energy`; the reduced system decreases the LASSO objective (Eq. 22).
The LASSO objective alone is *not* monotone along the coupled flow.
"""
from __future__ import annotations

import torch
from torch import nn

from ._validation import as_lam, check_last, check_tensor
from ._workspace import scratch_like
from .lasso import GramOperator, take_groups
from .ops import _soft, penalty_weight


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


class _Dynamics(nn.Module):
    def __init__(self, P, x, lam, alpha, beta, gamma, convention, threshold):
        super().__init__()
        check_tensor("P", P, min_dim=2)
        check_tensor("x", x, min_dim=1)
        if x.dtype != P.dtype:
            raise ValueError(f"x must have P's dtype {P.dtype}, got {x.dtype}")
        check_last("x", x, P.shape[-2], "P.shape[-2]")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name} must be a positive float, got {v!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
            raise ValueError(f"gamma must be a non-negative float (0: no inhibition, Eq. 6-7), got {gamma!r}")
        self.register_buffer("P", P)
        self.register_buffer("x", x)
        lam_t = as_lam(lam, like=x)
        self.register_buffer("weight", penalty_weight(lam_t, convention))
        thr = self.weight / 2 if threshold is None else as_lam(threshold, like=x, name="threshold")
        # lam and threshold are per problem: shape them to broadcast against (..., m).
        self.register_buffer("threshold", thr.unsqueeze(-1) if thr.dim() else thr)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.convention = convention

    @property
    def is_lasso_equivalent(self) -> bool:
        """True when the equilibrium is the LASSO minimiser (``beta = gamma = 2 / alpha`` and
        ``theta = w / (alpha beta)``)."""
        a, b, g = self.alpha, self.beta, self.gamma
        ok = abs(b - g) < 1e-12 and abs(g - 2 / a) < 1e-12
        return ok and bool(torch.allclose(self.threshold.squeeze(-1) if self.threshold.dim() else self.threshold,
                                          self.weight / (a * b)))

    def code(self, state) -> torch.Tensor:
        """The gated output ``g(u)`` of the encoding neurons: the sparse code, ``(..., m)``."""
        u = state[1] if isinstance(state, tuple) else state
        return _soft(u, self.threshold)

    def reconstruction(self, state) -> torch.Tensor:
        return _mv(self.P, self.code(state))

    def lasso_energy(self, state) -> torch.Tensor:
        """Eq. 22 (or Eq. 10) at ``g(u)``: ``0.5 ||P g(u) - x||^2 + w ||g(u)||_1``, ``(...)``."""
        a = self.code(state)
        return 0.5 * (_mv(self.P, a) - self.x).pow(2).sum(-1) + self.weight * a.abs().sum(-1)

    def _u_field(self, u, a, feed):
        # -beta u - gamma (K - I) a + feed, with K a computed as P^T (P a).
        Ka = _mv(self.P.transpose(-1, -2), _mv(self.P, a))
        return -self.beta * u - self.gamma * (Ka - a) + feed, Ka


class VARSDynamics(_Dynamics):
    """Vector field of the coupled z/u network (Eq. 8-9); use it with any torchdiffeq solver::

        f = VARSDynamics(P, x, lam)
        z, u = odeint(f, f.initial_state(), t)
        code = f.code((z[-1], u[-1]))

    Arguments:
        P: ``(..., d, m)`` dictionary (columns are the templates).
        x: ``(..., d)`` feed-forward input.
        lam: float or tensor broadcastable to the leading dimensions; the L1 weight is
            ``penalty_weight(lam, convention)``.
        alpha, beta, gamma: leak of z, leak of u, strength of the inhibitory recurrence.
        convention: ``"eq10"`` (default) or ``"eq22"``; see :mod:`vars_ode.ops`.
        threshold: the threshold of ``g``; default ``w / 2``, the paper's choice.
    """

    def __init__(self, P, x, lam, alpha: float = 1.0, beta: float = 2.0, gamma: float = 2.0, *,
                 convention: str = "eq10", threshold=None):
        super().__init__(P, x, lam, alpha, beta, gamma, convention, threshold)

    def initial_state(self, encode: bool = False):
        """``(z0, u0) = (x / alpha, 0)``: the layer's feed-forward output before any recurrence.

        With ``encode=True``, ``u0 = P^T z0`` (the encoding of the input, the paper's initialisation).
        """
        lead = torch.broadcast_shapes(self.P.shape[:-2], self.x.shape[:-1], self.weight.shape)
        z0 = (self.x / self.alpha).expand(*lead, self.P.shape[-2]).clone()
        if encode:
            return z0, _mv(self.P.transpose(-1, -2), z0)
        u0 = torch.zeros(*lead, self.P.shape[-1], dtype=self.x.dtype, device=self.x.device)
        return z0, u0

    def forward(self, t, state):
        z, u = state
        a = self.code(state)
        dz = -self.alpha * z + _mv(self.P, a) + self.x
        du, _ = self._u_field(u, a, _mv(self.P.transpose(-1, -2), z))
        return dz, du

    def output(self, state) -> torch.Tensor:
        """``z``, the layer's output; at the equilibrium it equals ``P g(u) + x`` (Eq. 11)."""
        return state[0]

    def energy(self, state) -> torch.Tensor:
        """Lyapunov energy of the coupled network, non-increasing along its trajectories::

            E_H = alpha/2 ||z||^2 - z^T (P a + x) + gamma/2 a^T (K - I) a + beta/2 ||a||^2 + beta theta ||a||_1

        with ``a = g(u)``. Minimised over ``z`` it equals ``lasso_energy - ||x||^2`` when
        ``alpha = 1, beta = gamma = 2``. Returns ``(...)``.
        """
        z = state[0]
        a = self.code(state)
        Pa = _mv(self.P, a)
        return (0.5 * self.alpha * z.pow(2).sum(-1) - (z * (Pa + self.x)).sum(-1)
                + 0.5 * self.gamma * (Pa.pow(2).sum(-1) - a.pow(2).sum(-1))
                + 0.5 * self.beta * a.pow(2).sum(-1) + self.beta * (self.threshold * a.abs()).sum(-1))


class ReducedVARSDynamics(_Dynamics):
    """Vector field of the reduced dynamics (Eq. 20): ``u`` alone, with ``z`` at its equilibrium.

    Same arguments as :class:`VARSDynamics`; the state is the tensor ``u`` of shape ``(..., m)``
    and :meth:`energy` is the LASSO objective (Eq. 22), non-increasing along the flow.
    """

    def __init__(self, P, x, lam, alpha: float = 1.0, beta: float = 2.0, gamma: float = 2.0, *,
                 convention: str = "eq10", threshold=None):
        super().__init__(P, x, lam, alpha, beta, gamma, convention, threshold)

    def initial_state(self):
        lead = torch.broadcast_shapes(self.P.shape[:-2], self.x.shape[:-1], self.weight.shape)
        return torch.zeros(*lead, self.P.shape[-1], dtype=self.x.dtype, device=self.x.device)

    def forward(self, t, u):
        a = self.code(u)
        b = _mv(self.P.transpose(-1, -2), self.x)
        du, Ka = self._u_field(u, a, 0.0)
        return du + (Ka + b) / self.alpha

    def energy(self, u) -> torch.Tensor:
        return self.lasso_energy(u)

    def output(self, u) -> torch.Tensor:
        return (_mv(self.P, self.code(u)) + self.x) / self.alpha


class VARSField(nn.Module):
    """The coupled field of Eq. 8-9 projected on the atoms, for any :class:`vars_ode.lasso.Operator`.

    ``w = P^T z`` obeys ``dw/dt = -alpha w + K g(u) + b`` and ``du/dt = -beta u - gamma (K - I) g(u) + w``:
    the projection of Eq. 8-9 onto the atoms is closed, so the field never touches the signal dimension
    (nor the token count of an attention layer). Every ODE solver of the library integrates this field.

    Arguments:
        op: the operator ``K``; B: code tuple ``b``; threshold: code tuple of thresholds (each broadcastable
        to its block); scale: optional code tuple of factors applied to ``K g(u)`` (``1 / L`` for the rescaled
        problem). ``active`` (a tuple of per-block multipliers, or one tensor for a one-block code) freezes
        the problems where it is zero.

    The state is ``(W blocks..., U blocks...)``. ``nfe`` counts evaluations.
    """

    def __init__(self, op, B: tuple, threshold: tuple, alpha=1.0, beta=2.0, gamma=2.0, *, scale=None, active=None):
        super().__init__()
        self.op, self.Bs, self.thr, self.scale = op, tuple(B), tuple(threshold), scale
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.active = active
        self.nfe = 0

    @property
    def selects_groups(self) -> bool:
        """Whether :meth:`select_groups` applies: one block on a :class:`vars_ode.lasso.GramOperator`."""
        return type(self) is VARSField and type(self.op) is GramOperator and len(self.Bs) == 1

    def select_groups(self, lead: tuple, index: torch.Tensor) -> "VARSField":
        """The field of the groups ``index`` of a one-block Gram-form state ``lead + (m, k)`` (the leading
        dimensions flattened; :func:`vars_ode.lasso.take_groups`), counting its evaluations from zero: what the
        adaptive integrator's tail runs on (:data:`vars_ode.solvers.native.TAIL_FRACTION`)."""
        if not self.selects_groups:
            raise NotImplementedError("select_groups: a VARSField of one block on a GramOperator only")

        def take(x):
            return take_groups(x, lead, index)

        act = self.active[0] if isinstance(self.active, tuple) else self.active
        return VARSField(self.op.select_groups(lead, index), (take(self.Bs[0]),), (take(self.thr[0]),),
                         self.alpha, self.beta, self.gamma,
                         scale=None if self.scale is None else (take(self.scale[0]),),
                         active=None if act is None else take(act))

    def Ka(self, a: tuple) -> tuple:
        Ka = self.op.gram_apply(a)
        return Ka if self.scale is None else tuple(k * s for k, s in zip(Ka, self.scale))

    def code(self, state) -> tuple:
        """``g(u)`` of a state, block by block."""
        n = len(self.Bs)
        return tuple(_soft(u, t) for u, t in zip(state[n:], self.thr))

    def initial_state(self, code=None):
        """``(W, U)`` at ``g(u) = code`` (zero when ``None``) with ``W`` at its equilibrium for that code."""
        if code is None:
            return tuple(b / self.alpha for b in self.Bs) + tuple(torch.zeros_like(b) for b in self.Bs)
        Ka = self.Ka(tuple(code))
        W = tuple((b + k) / self.alpha for b, k in zip(self.Bs, Ka))
        # u0 with g(u0) = code: move each non-zero entry out by the threshold
        return W + tuple(c + torch.sign(c) * t for c, t in zip(code, self.thr))

    def forward(self, t, state):
        return self.forward_into(state, None)

    def forward_into(self, state, out=None) -> tuple:
        """The field at ``state``; with ``out`` (a tuple shaped like the state; not for autograd) written into
        its tensors, the temporaries in reused scratch buffers (:func:`vars_ode._workspace.scratch`): a fresh
        multi-megabyte CPU tensor pays a page fault per 4 KiB on its first write."""
        self.nfe += 1
        n = len(self.Bs)
        W, U = state[:n], state[n:]
        if out is None:
            a = tuple(_soft(u, th) for u, th in zip(U, self.thr))
            Ka = self.Ka(a)
            dW, dU = (None,) * n, (None,) * n
        else:
            a = tuple(_soft(u, th, out=scratch_like(f"field.a{i}", u))
                      for i, (u, th) in enumerate(zip(U, self.thr)))
            Ka = self.op.gram_apply_into(a, tuple(scratch_like(f"field.Ka{i}", u)
                                                  for i, u in enumerate(U)))
            if self.scale is not None:
                Ka = tuple(k.mul_(s) for k, s in zip(Ka, self.scale))
            dW, dU = out[:n], out[n:]
        al, be, ga = float(self.alpha), float(self.beta), float(self.gamma)
        # b - alpha w + K a and w - beta u - gamma (K a - a), accumulated in place (a few kernels an evaluation;
        # autograd saves none of these sums)
        dW = tuple(torch.add(b, w, alpha=-al, out=o).add_(k) for w, k, b, o in zip(W, Ka, self.Bs, dW))
        dU = tuple(torch.add(w, u, alpha=-be, out=o).add_(k, alpha=-ga).add_(aa, alpha=ga)
                   for u, k, aa, w, o in zip(U, Ka, a, W, dU))
        if self.active is not None:
            act = (self.active,) * n if isinstance(self.active, torch.Tensor) else self.active
            if out is None:
                dW = tuple(d * m for d, m in zip(dW, act))
                dU = tuple(d * m for d, m in zip(dU, act))
            else:
                dW = tuple(d.mul_(m) for d, m in zip(dW, act))
                dU = tuple(d.mul_(m) for d, m in zip(dU, act))
        return dW + dU


class GramVARSDynamics(VARSField):
    """:class:`VARSField` for many problems sharing a Gram matrix, on plain tensors.

    Arguments:
        K: ``(..., m, m)``; B: ``(..., m, k)`` (each column a problem); threshold: broadcastable
        to ``(..., 1, k)``. ``active`` (optional ``(..., 1, k)``) freezes the other columns.

    The state is ``(W, U)``, both ``(..., m, k)``. ``nfe`` counts evaluations.
    """

    def __init__(self, K, B, threshold, alpha=1.0, beta=2.0, gamma=2.0, active=None):
        super().__init__(GramOperator(K), (B,), (threshold,), alpha, beta, gamma, active=active)

    # K, B and threshold read and replace the operator, b and the threshold the field integrates
    @property
    def K(self):
        return self.op.K

    @K.setter
    def K(self, value):
        self.op = GramOperator(value)

    @property
    def B(self):
        return self.Bs[0]

    @B.setter
    def B(self, value):
        self.Bs = (value,)

    @property
    def threshold(self):
        return self.thr[0]

    @threshold.setter
    def threshold(self, value):
        self.thr = (value,)

    def initial_state(self, code=None):
        return super().initial_state(None if code is None else (code,))


def lca_field(K: torch.Tensor, b: torch.Tensor, u: torch.Tensor, threshold) -> torch.Tensor:
    """Rozell et al.'s Locally Competitive Algorithm, ``du/dt = -u - (K - I) g(u) + b``, in Gram form.

    ``K``: ``(..., m, m)``; ``b``, ``u``: ``(..., m)``. Its explicit-Euler step of size one on the
    problem scaled by ``1/L`` is exactly one ISTA step (Eq. 12).
    """
    a = _soft(u, threshold)
    return -u - (_mv(K, a) - a) + b
