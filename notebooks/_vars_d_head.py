"""A VARS-D head in isolation, shared by notebooks 03-05 (run from this folder, as Jupyter does)."""
from __future__ import annotations

import torch

import vars_ode
from vars_ode.dictionaries import positive_random_features


def vars_d_problem(N, h, m, C, seed=0, dtype=torch.float64):
    """L2-normalised random queries ``(N, h)``, their ``m`` positive random features (the library's map:
    atoms normalised over tokens, as the official code) and ``C`` value channels. Returns Phi ``(N, m)``,
    X ``(N, C)``."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.nn.functional.normalize(torch.randn(N, h, generator=g, dtype=dtype), dim=-1)
    Phi = positive_random_features(Q, torch.randn(h, m, generator=g, dtype=dtype))
    X = torch.randn(N, C, generator=g, dtype=dtype)
    return Phi, X


def ista_path(Phi, X, lam, steps, init="encode"):
    """Codes after 0..steps ISTA iterations (Eq. 12) for every channel, written out; a list of ``(m, C)`` tensors."""
    K, B = Phi.T @ Phi, Phi.T @ X
    L = float(torch.linalg.eigvalsh(K)[-1])
    U = B.clone() if init == "encode" else torch.zeros_like(B)
    out = [U]
    for _ in range(steps):
        U = vars_ode.soft_threshold(U - (K @ U - B) / L, lam / L)
        out.append(U)
    return out
