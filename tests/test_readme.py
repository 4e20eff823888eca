"""The README's Quick start runs as printed, and what it says of its results holds."""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Quick start has no python block"
    return match.group(1)


def test_quick_start_runs_as_printed():
    ns: dict = {}
    exec(compile(quick_start_code(), str(README) + ":Quick start", "exec"), ns)  # noqa: S102 (our own README)
    sol, ode, stiff, cheb, g = ns["sol"], ns["ode"], ns["stiff"], ns["cheb"], ns["g"]
    # every solver of the block reaches its KKT tolerance at the same LASSO minimiser (1e-6 in the residual is up to
    # about 1e-4 in the code here: the smallest eigenvalue of K / L on the support is about 1 / 166)
    for other in (ode, stiff, cheb):
        assert bool(other.stats.converged.all()) and (other.code - sol.code).abs().max() < 1e-3
    assert torch.allclose(sol.output, sol.code @ ns["P"].detach().T + ns["x"], atol=1e-10)  # Eq. 11
    assert g.code.requires_grad
    # the coupled energy does not increase along the trajectory it printed
    energy = ns["f"].energy((ns["z"], ns["u"]))
    assert bool((energy[1:] <= energy[:-1] + 1e-9).all())
    # the layers and models it builds run, and the attention maps have one row per image and iteration
    x = torch.randn(2, 197, 192)
    for name in ("layer", "fast", "eq"):
        assert ns[name](x).shape == x.shape
    maps = ns["maps"]
    assert maps and all(m.shape[0] == 2 and m.dim() == 3 for m in maps.values())
    assert ns["vit"](torch.randn(1, 3, 224, 224)).shape == (1, 1000)
