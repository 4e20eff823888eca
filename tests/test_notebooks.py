"""The notebooks: percent-format sources ``notebooks/NN_name.py`` paired with ``NN_name.ipynb``, stored
executed at their small size with their figures.

Every source is executed afresh by its own test (in its own kernel, through ``notebooks/run_notebooks.py
--out``; xdist spreads the tests over its workers, so each notebook runs once) and compared with the stored
notebook: a different cell, a different number of figures or a text output that no longer matches fails
(regenerate with ``python notebooks/run_notebooks.py``).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nbformat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run_notebooks.py")
rn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rn)

SOURCES = rn.sources()
NAMES = [p.stem for p in SOURCES]
MAX_BYTES = 2_000_000
NEEDS_FASHION_MNIST = {"07_inside_a_trained_model"}
LONGEST = ("07_inside_a_trained_model", "02_convergence", "06_attractor_in_two_dimensions")


def fashion_mnist_missing() -> str | None:
    from vars_ode.robustness import DatasetError, find_fashion_mnist

    try:
        find_fashion_mnist()
    except DatasetError as e:
        return str(e)
    return None


def stored(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


TINY = "07_inside_a_trained_model@tiny"     # notebook 07 at its tiny size: trains into a temporary folder


def execute(key, tmp_path):
    """Execute one source (``name`` or ``name@size``) into ``tmp_path`` through ``run_notebooks.py --out``, in
    its own kernel. Returns ``(completed process, executed notebook path, checkpoint folder)``; skips when
    Fashion-MNIST is missing for notebook 07."""
    name, _, size = key.partition("@")
    if name in NEEDS_FASHION_MNIST and (missing := fashion_mnist_missing()):
        pytest.skip(f"{name} needs Fashion-MNIST (Debian package dataset-fashion-mnist): {missing}")
    args = ["--out", str(tmp_path)] + (["--size", size] if size else [])
    env = dict(os.environ, VARS_ODE_CHECKPOINTS=str(tmp_path / "checkpoints")) if size else None
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / "run_notebooks.py"), *args, name],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    return proc, tmp_path / f"{name}.ipynb", tmp_path / "checkpoints"


def test_sources_and_notebooks_are_paired():
    assert len(NAMES) >= 7, NAMES
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert ipynbs == NAMES, "every NN_name.py needs its NN_name.ipynb and the other way round"
    assert not (NOTEBOOKS / "build_notebooks.py").exists()
    for name in NAMES:
        assert stored(name).metadata["jupytext"]["formats"] == "ipynb,py:percent", name
        assert "formats: ipynb,py:percent" in (NOTEBOOKS / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_has_the_cells_of_its_source(name):
    src, nb = rn.read_source(NOTEBOOKS / f"{name}.py"), stored(name)
    assert [c.cell_type for c in nb.cells] == [c.cell_type for c in src.cells]
    for i, (a, b) in enumerate(zip(nb.cells, src.cells)):
        assert a.source == b.source, f"cell {i} differs from the source: run notebooks/run_notebooks.py {name[:2]}"


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_is_executed_with_its_figures(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size / 1e6:.2f} MB"
    nb = stored(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.strip().endswith('SIZE = "small"') and "parameters" in code[0].metadata.get("tags", [])
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "store the notebook executed, in order"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(rn.images(c) for c in code) >= 1, "no figure stored"
    heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "conclusion" in c.source.lower()]
    assert heads, "no conclusions section"
    after = next(c for c in nb.cells[heads[-1]:] if c.cell_type == "code")
    assert "".join(t for _, t in rn.text_outputs(after)).strip(), "the conclusions cell printed nothing"


def test_readme_figures_are_the_stored_notebook_figures():
    exported = {}
    for name in NAMES:
        exported.update(rn.figures(stored(name)))
    assert len(exported) >= 3, sorted(exported)
    for fig_name, png in exported.items():
        path = rn.FIGURES / f"{fig_name}.png"
        assert path.is_file(), f"{path} missing: run notebooks/run_notebooks.py"
        assert path.read_bytes() == png, f"{path.name} differs from its notebook's figure: run run_notebooks.py"
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


# the longest first (tests/conftest.py), so that xdist does not start one of them last
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in LONGEST else n for n in NAMES])
def test_notebook_executes_and_its_stored_outputs_are_current(name, tmp_path):
    proc, path, _ = execute(name, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    fresh = nbformat.read(path, as_version=4)
    assert not [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    diffs = rn.differences(stored(name), fresh)
    assert not diffs, f"stored outputs of {name} are stale (python notebooks/run_notebooks.py {name[:2]}):\n" + \
        "\n".join(diffs)


def test_trained_model_checkpoints_are_stored():
    """Notebook 07 loads its models: the test suite never trains them at the small size."""
    for kind in ("vars_d", "vars_sd"):
        path = NOTEBOOKS / "checkpoints" / f"fmnist_{kind}_small.pt"
        assert path.is_file() and path.stat().st_size < 1_000_000, path


def test_trained_model_notebook_trains_at_tiny_size(tmp_path):
    """The training path of notebook 07, at its tiny size, into a temporary checkpoint folder."""
    proc, path, checkpoints = execute(TINY, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["fmnist_vars_d_tiny.pt", "fmnist_vars_sd_tiny.pt"]
    nb = nbformat.read(path, as_version=4)
    printed = "".join(t for c in nb.cells if c.cell_type == "code" for _, t in rn.text_outputs(c))
    assert "training VARS-D" in printed and "SIZE = tiny" in printed and "4. VARS-SD" in printed


# ----------------------------------------------------------------------------------------------
# the comparison itself
# ----------------------------------------------------------------------------------------------
def test_numbers_match_within_their_last_printed_digit():
    assert rn.numbers_match("0.125", "0.126") and rn.numbers_match("12", "13")
    assert rn.numbers_match("1.4e-07", "1.5e-07")
    assert not rn.numbers_match("0.125", "0.128") and not rn.numbers_match("12", "14")
    assert not rn.numbers_match("1.4e-07", "1.6e-07") and not rn.numbers_match("1.0", "nan")
    assert rn.numbers_match("3.1e-13", "8.9e-14")          # rounding-level quantities
    assert rn.texts_match("k = 3: 0.41, nnz [4, 5]", "k = 3: 0.42, nnz [4, 5]") is None
    assert rn.texts_match("k = 3: 0.41, nnz [4, 5]", "k = 3: 0.44, nnz [4, 5]") == "number 0.41 vs 0.44"
    assert rn.texts_match("fastest: ista", "fastest: fista") is not None
    assert rn.texts_match("a 1\nb 2", "a 1") is not None


def _stdout_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and any(k == "stdout" for k, _ in rn.text_outputs(c)))


def test_differences_detects_stale_outputs():
    nb = stored(NAMES[0])
    assert rn.differences(nb, copy.deepcopy(nb)) == []
    fewer = copy.deepcopy(nb)
    fewer.cells.pop()
    assert rn.differences(nb, fewer)
    edited = copy.deepcopy(nb)
    next(c for c in edited.cells if c.cell_type == "code").source += "\n# edited"
    assert rn.differences(nb, edited)
    changed = copy.deepcopy(nb)
    out = next(o for o in _stdout_cell(changed).outputs if o.output_type == "stream" and o.name == "stdout")
    out.text = out.text + "an extra line\n"
    assert rn.differences(nb, changed)
    no_figure = copy.deepcopy(nb)
    cell = next(c for c in no_figure.cells if c.cell_type == "code" and rn.images(c))
    cell.outputs = [o for o in cell.outputs if "image/png" not in o.get("data", {})]
    assert rn.differences(nb, no_figure)
    # a number moved well beyond its last digit
    shifted = copy.deepcopy(nb)
    for c in shifted.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream" and o.name == "stdout" and rn._NUMBER.search(o.text):
                o.text = rn._NUMBER.sub(lambda m: "12345.5", o.text, count=1)
                break
        else:
            continue
        break
    assert rn.differences(nb, shifted)
    # a volatile cell: numbers may change, the number of lines may not
    vol = copy.deepcopy(nb)
    cell = _stdout_cell(vol)
    cell.metadata["tags"] = [rn.VOLATILE]
    base = copy.deepcopy(vol)
    out = next(o for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    out.text = rn._NUMBER.sub("999", out.text)
    assert rn.differences(base, vol) == []
    out.text += "one more line\n"
    assert rn.differences(base, vol)
