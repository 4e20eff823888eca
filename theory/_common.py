"""Shared helpers for the executable checks in theory/ (float64 throughout)."""
from __future__ import annotations

import numpy as np
import torch

DTYPE = torch.float64


def random_problem(d: int, m: int, seed: int = 0, lam_ratio: float = 0.3):
    """A random LASSO instance ``(P, x, lam)``: ``P`` has N(0, 1/d) entries, ``x`` is N(0, 1), and
    ``lam = lam_ratio * ||P^T x||_inf`` (so the solution is neither zero nor dense)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=DTYPE) / d**0.5
    x = torch.randn(d, generator=g, dtype=DTYPE)
    lam = lam_ratio * float((P.T @ x).abs().max())
    return P, x, lam


def sklearn_lasso(P: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    """Independent reference: scikit-learn minimises ``(1/(2d))||x - P u||^2 + alpha ||u||_1``,
    so ``alpha = weight / d`` gives ``argmin 0.5||P u - x||^2 + weight ||u||_1``."""
    from sklearn.linear_model import Lasso

    d = P.shape[0]
    model = Lasso(alpha=weight / d, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
    model.fit(P.numpy(), x.numpy())
    return torch.from_numpy(np.asarray(model.coef_, dtype=np.float64))


class Counted(torch.nn.Module):
    """Wraps a vector field and counts its evaluations."""

    def __init__(self, f):
        super().__init__()
        self.f, self.nfe = f, 0

    def forward(self, t, y):
        self.nfe += 1
        return self.f(t, y)


def report(name: str, **values) -> dict:
    parts = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items())
    print(f"  [ok] {name}: {parts}")
    return {name: values}


def cli(main, sizes, doc: str) -> None:
    """``python check_*.py [--size small|...]``: run ``main(size)``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--size", choices=sorted(sizes), default="small")
    main(ap.parse_args().size)
