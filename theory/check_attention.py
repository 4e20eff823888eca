"""Executable checks for theory/attention_and_dictionaries.md (self-attention as one Euler step,
convolutional dictionaries, positive random features, the Gram form).

Run ``python theory/check_attention.py [--size small|full]``; every function asserts its claim in
float64 and prints the numbers it measured. ``main()`` returns them as a dict.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vars_ode  # noqa: E402
from _common import DTYPE, cli, report  # noqa: E402
from vars_ode import GramVARSDynamics, VARSDynamics  # noqa: E402

SIZES = {"small": dict(N=64, C=8, head=16, m=32, mc_features=2**16, img=12),
         "full": dict(N=196, C=64, head=64, m=128, mc_features=2**20, img=24)}


def positive_random_features(Q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Performer's positive features: ``phi(q) = exp(W^T q - ||q||^2 / 2) / sqrt(m)`` row-wise.

    Q: ``(N, h)`` queries; W: ``(h, m)`` with N(0, 1) entries. Returns ``(N, m)``, all entries > 0."""
    m = W.shape[1]
    return torch.exp(Q @ W - 0.5 * Q.pow(2).sum(-1, keepdim=True)) / math.sqrt(m)


def _tokens(N, C, head, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, C, generator=g, dtype=DTYPE)
    Wq = torch.randn(C, head, generator=g, dtype=DTYPE) / C**0.5
    Q = F.normalize(X @ Wq, dim=-1)                  # L2-normalised queries, as in the official code
    Wrf = torch.randn(head, m, generator=g, dtype=DTYPE)
    return X, Q, Wrf


def check_self_attention_is_one_euler_step(N, C, head, m, seed=0):
    """Eq. 15 from Z = X with one Euler step of size 1 gives Phi Phi^T X + X (Eq. 14); the same number
    is VARS with no threshold and zero iterations from the paper's initialisation u = Phi^T x, and two
    Euler steps of the encoder/decoder pair Eq. 6-7 from (x, 0)."""
    X, Q, Wrf = _tokens(N, C, head, m, seed)
    Phi = positive_random_features(Q, Wrf)
    eq14 = Phi @ (Phi.T @ X) + X
    field = lambda t, Z: -Z + Phi @ (Phi.T @ Z) + X  # noqa: E731   (Eq. 15, all channels at once)
    Z1 = odeint(field, X.clone(), torch.tensor([0.0, 1.0], dtype=DTYPE), method="euler",
                options={"step_size": 1.0})[-1]
    e_euler = float((Z1 - eq14).abs().max())
    U0 = Phi.T @ X                                   # VARS initialisation (Fig. 2), decoded at once
    e_vars0 = float((Phi @ U0 + X - eq14).abs().max())

    def eq67(t, s):
        z, u = s
        return -z + Phi @ u + X, -u + Phi.T @ z

    z2, _ = (s[-1] for s in odeint(eq67, (X.clone(), torch.zeros(m, C, dtype=DTYPE)),
                                   torch.tensor([0.0, 2.0], dtype=DTYPE), method="euler", options={"step_size": 1.0}))
    e_67 = float((z2 - eq14).abs().max())
    assert max(e_euler, e_vars0, e_67) < 1e-12
    return report("self-attention = one Euler step of Eq. 15", euler_err=e_euler, vars_zero_steps_err=e_vars0,
                  eq67_two_steps_err=e_67)


def check_random_feature_kernel(head, mc_features, seed=0):
    """E[phi(q)^T phi(k)] = exp(q^T k): the Monte-Carlo estimate lies within 4 standard errors (the
    variance is exp(2||q + k||^2 - ||q||^2 - ||k||^2) - exp(2 q^T k), computed exactly)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    worst = 0.0
    for i in range(4):
        q = F.normalize(torch.randn(head, generator=g, dtype=DTYPE), dim=0) * (0.5 + 0.25 * i)
        k = F.normalize(torch.randn(head, generator=g, dtype=DTYPE), dim=0) * 0.8
        W = torch.randn(head, mc_features, generator=g, dtype=DTYPE)
        fq, fk = positive_random_features(q[None], W)[0], positive_random_features(k[None], W)[0]
        est = float(fq @ fk)
        exact = math.exp(float(q @ k))
        var = math.exp(2 * float((q + k) @ (q + k)) - float(q @ q) - float(k @ k)) - math.exp(2 * float(q @ k))
        z = abs(est - exact) / math.sqrt(var / mc_features)
        assert z < 4 and bool((fq > 0).all()), (est, exact, z)
        worst = max(worst, z)
        out[f"rel_err_{i}"] = abs(est - exact) / exact
    return report("E[phi(q)^T phi(k)] = exp(q^T k)", worst_z_score=worst, features=mc_features, **out)


def check_attention_kernel_approximation(N, C, head, seed=0):
    """Phi Phi^T approaches the kernel exp(Q Q^T) of Eq. 13 (with W = W') as m grows, error ~ 1/sqrt(m)."""
    X, Q, _ = _tokens(N, C, head, 1, seed)
    exact = torch.exp(Q @ Q.T) @ X + X
    errs = {}
    g = torch.Generator().manual_seed(seed + 1)
    for m in (256, 4096):
        reps = []
        for _ in range(4):
            Phi = positive_random_features(Q, torch.randn(head, m, generator=g, dtype=DTYPE))
            reps.append(float((Phi @ (Phi.T @ X) + X - exact).norm() / exact.norm()))
        errs[m] = sum(reps) / len(reps)
    ratio = errs[256] / errs[4096]
    assert 2.0 < ratio < 8.0, ratio                   # sqrt(4096 / 256) = 4
    return report("Phi Phi^T X + X -> exp(QQ^T) X + X", rel_err_m256=errs[256], rel_err_m4096=errs[4096],
                  ratio=ratio)


def check_conv_dictionary(img, seed=0):
    """A static dictionary of translated kernels: P^T = conv2d, P = conv_transpose2d with the same kernel;
    they are adjoint, the columns of P are the translated kernels, and for circular padding
    L = max over frequencies of sum_c |w_c^(omega)|^2."""
    g = torch.Generator().manual_seed(seed)
    c_out, k = 3, 5
    w = torch.randn(c_out, 1, k, k, generator=g, dtype=DTYPE)
    x = torch.randn(1, 1, img, img, generator=g, dtype=DTYPE)
    y = torch.randn(1, c_out, img, img, generator=g, dtype=DTYPE)
    PT = lambda v: F.conv2d(v, w, padding=k // 2)  # noqa: E731
    Pm = lambda c: F.conv_transpose2d(c, w, padding=k // 2)  # noqa: E731
    adj = abs(float((PT(x) * y).sum() - (x * Pm(y)).sum()))
    # explicit matrix: column j of P is P applied to the j-th basis code
    n_code = c_out * img * img
    P = Pm(torch.eye(n_code, dtype=DTYPE).reshape(n_code, c_out, img, img)).reshape(n_code, img * img).T
    mat = float((P.T @ x.reshape(-1) - PT(x).reshape(-1)).abs().max())
    # an interior column is the kernel placed at that position (a translated template)
    c, i, j = 1, img // 2, img // 2
    col = P[:, c * img * img + i * img + j].reshape(img, img)
    tmpl = float((col[i - k // 2:i + k // 2 + 1, j - k // 2:j + k // 2 + 1] - w[c, 0]).abs().max())
    mask = torch.ones_like(col, dtype=torch.bool)
    mask[i - k // 2:i + k // 2 + 1, j - k // 2:j + k // 2 + 1] = False
    outside = float(col[mask].abs().max())
    # circular version and its Lipschitz constant from the FFT
    PTc = lambda v: F.conv2d(F.pad(v, (k // 2,) * 4, mode="circular"), w)  # noqa: E731
    Pc = torch.stack([PTc(e.reshape(1, 1, img, img)).reshape(-1)
                      for e in torch.eye(img * img, dtype=DTYPE)], dim=1).T   # d x m matrix with P^T = PTc
    L_eig = float(torch.linalg.eigvalsh(Pc.T @ Pc)[-1])
    kern = torch.zeros(c_out, img, img, dtype=DTYPE)
    kern[:, :k, :k] = w[:, 0]
    L_fft = float(torch.fft.fft2(kern).abs().pow(2).sum(0).max())
    adj_c = abs(float((PTc(x).reshape(-1) @ y.reshape(-1)) - float(x.reshape(-1) @ (Pc @ y.reshape(-1)))))
    assert adj < 1e-10 and mat < 1e-12 and tmpl < 1e-14 and outside == 0.0 and adj_c < 1e-10, (adj, mat, tmpl, outside, adj_c)
    assert abs(L_eig - L_fft) < 1e-9 * L_fft, (L_eig, L_fft)
    return report("conv / conv_transpose dictionary", adjoint_err=adj, matrix_err=mat, template_err=tmpl,
                  circular_adjoint_err=adj_c, L_eigvalsh=L_eig, L_fft=L_fft)


def check_gram_form(N, C, head, m, seed=0):
    """The solver needs only K = Phi^T Phi (m x m) and B = Phi^T X (m x C): solve_gram gives the codes of
    solve; P^T z of the coupled flow obeys the closed Gram dynamics; the iteration's FLOPs do not depend on N
    and the whole layer's grow linearly in N, where explicit attention's grow quadratically."""
    X, Q, Wrf = _tokens(N, C, head, m, seed)
    Phi = positive_random_features(Q, Wrf)
    Phi = Phi / Phi.norm(dim=0, keepdim=True)         # atoms normalised over tokens (official code)
    lam = 0.05
    full = vars_ode.solve(Phi, X.T, lam, "fista", tol=0.0, max_iter=300).code.T      # (m, C)
    K, B = vars_ode.gram(Phi), Phi.T @ X
    gram = vars_ode.solve_gram(K, B, lam, "fista", tol=0.0, max_iter=300).code
    e_codes = float((full - gram).abs().max())
    # closure of the Gram dynamics: W = Phi^T z along the coupled flow of channel 0
    f = VARSDynamics(Phi, X[:, 0], lam)
    fg = GramVARSDynamics(K, B[:, :1], lam / 2)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    z, u = odeint(f, f.initial_state(), ts, rtol=1e-10, atol=1e-12)
    Wg, Ug = odeint(fg, fg.initial_state(), ts, rtol=1e-10, atol=1e-12)
    e_closure = max(float((z @ Phi - Wg[..., 0]).abs().max()), float((u - Ug[..., 0]).abs().max()))
    assert e_codes < 1e-10 and e_closure < 1e-8, (e_codes, e_closure)

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    steps = 3
    rows = {}
    for n in (N, 2 * N, 4 * N):
        Xn, Qn, _ = _tokens(n, C, head, m, seed)
        Phin = positive_random_features(Qn, Wrf)
        Kn, Bn = Phin.T @ Phin, Phin.T @ Xn
        iteration = flops(lambda: vars_ode.solve_gram(Kn, Bn, lam, "ista", tol=0.0, max_iter=steps, L=1.0))
        layer = flops(lambda: Phin @ vars_ode.solve_gram(Phin.T @ Phin, Phin.T @ Xn, lam, "ista", tol=0.0,
                                                         max_iter=steps, L=1.0).code + Xn)
        attention = flops(lambda: torch.exp(Qn @ Qn.T) @ Xn + Xn)
        rows[n] = (iteration, layer, attention)
    it_const = len({r[0] for r in rows.values()}) == 1
    layer_ratio = rows[4 * N][1] / rows[2 * N][1]
    att_ratio = rows[4 * N][2] / rows[2 * N][2]
    assert it_const and layer_ratio <= 2.0 + 1e-9 and att_ratio > 3.9, (rows, layer_ratio, att_ratio)
    return report("Gram form: linear in the number of tokens", codes_err=e_codes, closure_err=e_closure,
                  iteration_flops=rows[N][0], layer_flops_ratio_2N_to_4N=layer_ratio,
                  attention_flops_ratio_2N_to_4N=att_ratio)


def main(size: str = "small") -> dict:
    cfg = SIZES[size]
    print(f"theory/attention_and_dictionaries.md checks (size={size}, float64)")
    out = {}
    out.update(check_self_attention_is_one_euler_step(cfg["N"], cfg["C"], cfg["head"], cfg["m"]))
    out.update(check_random_feature_kernel(cfg["head"], cfg["mc_features"]))
    out.update(check_attention_kernel_approximation(cfg["N"], cfg["C"], cfg["head"]))
    out.update(check_conv_dictionary(cfg["img"]))
    out.update(check_gram_form(cfg["N"], cfg["C"], cfg["head"], cfg["m"]))
    print("all attention and dictionary checks passed")
    return out


if __name__ == "__main__":
    cli(main, SIZES, __doc__)
