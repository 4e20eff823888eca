"""Execute the notebooks of this folder from their sources and store them with their outputs.

    python notebooks/run_notebooks.py               # execute every notebook, write NN_name.ipynb
    python notebooks/run_notebooks.py 01 06         # only the notebooks whose name starts so
    python notebooks/run_notebooks.py --check       # execute, compare with the stored outputs, write nothing
    python notebooks/run_notebooks.py --out DIR 03  # write the executed notebook to DIR instead

The sources are the jupytext percent-format scripts ``NN_name.py`` (edit those; ``jupytext --sync``
or this script brings the ``.ipynb`` up to date). Each ``NN_name.ipynb`` is stored executed at the
notebook's default size (``SIZE = "small"`` in its parameters cell), figures included, so that it
reads on a code host. ``tests/test_notebooks.py`` executes every source and fails when the stored
outputs are stale: a different cell, a different number of figures, or a text output that no longer
matches (numbers within one unit of their last printed digit; cells tagged ``volatile``, such as
timings, only by their number of lines). The first figure of a cell tagged ``figure:NAME`` is also
written to ``notebooks/figures/NAME.png`` (the figures shown in the README).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PATTERN = "[0-9][0-9]_*.py"
KERNEL = "vars-ode-notebooks"
TIMEOUT = 600   # seconds per cell
VOLATILE = "volatile"
FIGURE_TAG = "figure:"
FIGURES = HERE / "figures"


def sources() -> list[Path]:
    return sorted(HERE.glob(PATTERN))


def read_source(py: Path) -> nbformat.NotebookNode:
    """The notebook of a percent-format source, with stable cell ids and this project's metadata."""
    nb = jupytext.read(py)
    stem = py.name.split("_")[0]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"nb{stem}-{i:02d}"
        cell.metadata.pop("lines_to_next_cell", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    for k in ("text_representation",):
        nb.metadata["jupytext"].pop(k, None)
    return nb


@contextlib.contextmanager
def kernel():
    """A kernelspec that runs this interpreter with the repository on its path and the inline backend."""
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "vars_ode notebooks", "language": "python",
            "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONPATH": str(ROOT),
                    "PYTHONHASHSEED": "0"},
        }))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = root + (os.pathsep + old if old else "")
        try:
            yield KERNEL
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def execute(nb: nbformat.NotebookNode, kernel_name: str, timeout: int = TIMEOUT) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel (in notebooks/); raises ``CellExecutionError`` on an error."""
    import nbclient

    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, record_timing=False,
                                     resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return canonical(nb)


def canonical(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge consecutive stream outputs (their split depends on timing) and drop run-time metadata."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        merged = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        cell.outputs = merged
    nb.metadata.get("language_info", {}).pop("version", None)
    return nb


# ----------------------------------------------------------------------------------------------
# comparing outputs
# ----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")


def _unit(s: str) -> float:
    """One unit of the last printed digit of a number as printed (1 for an integer)."""
    m = re.fullmatch(r"[-+]?(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?", s)
    if not m:
        return 0.0
    decimals = len(m.group(2) or "")
    return 10.0 ** (int(m.group(3) or 0) - decimals)


def numbers_match(a: str, b: str) -> bool:
    """Two printed numbers agree: equal text, both nan, within one unit of the last printed digit (plus
    1e-6 relative), or both below 1e-8 in magnitude (rounding-level quantities)."""
    if a == b:
        return True
    x, y = float(a), float(b)
    if x != x or y != y:
        return x != x and y != y
    if abs(x) < 1e-8 and abs(y) < 1e-8:
        return True
    return abs(x - y) <= 1.01 * max(_unit(a), _unit(b)) + 1e-6 * max(abs(x), abs(y))


def texts_match(a: str, b: str) -> str | None:
    """None if two printed texts match (same words, numbers as :func:`numbers_match`), else a reason."""
    na, nb_ = _NUMBER.findall(a), _NUMBER.findall(b)
    wa, wb = _NUMBER.sub("#", a), _NUMBER.sub("#", b)
    if wa != wb or len(na) != len(nb_):
        la, lb = wa.splitlines(), wb.splitlines()
        for i, (x, y) in enumerate(zip(la, lb)):
            if x != y:
                return f"line {i + 1} differs: {x!r} vs {y!r}"
        return f"{len(la)} lines vs {len(lb)}"
    for x, y in zip(na, nb_):
        if not numbers_match(x, y):
            return f"number {x} vs {y}"
    return None


def text_outputs(cell) -> list[tuple[str, str]]:
    """The compared text of a code cell: standard output and the plain text of results, in order."""
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream" and o.name == "stdout":
            out.append(("stdout", o.text))
        elif o.output_type == "execute_result" and "text/plain" in o.get("data", {}):
            out.append(("result", o.data["text/plain"]))
    return out


def images(cell) -> int:
    return sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))


def differences(stored: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> list[str]:
    """What differs between a stored notebook and a fresh execution of its source (empty: up to date)."""
    diffs = []
    if len(stored.cells) != len(fresh.cells):
        return [f"{len(stored.cells)} stored cells, {len(fresh.cells)} in the source"]
    for i, (s, f) in enumerate(zip(stored.cells, fresh.cells)):
        where = f"cell {i}"
        if s.cell_type != f.cell_type or s.source != f.source:
            diffs.append(f"{where}: the source differs from the stored notebook's")
            continue
        if s.cell_type != "code":
            continue
        if images(s) != images(f):
            diffs.append(f"{where}: {images(s)} stored figures, {images(f)} now")
        ts, tf = text_outputs(s), text_outputs(f)
        if [k for k, _ in ts] != [k for k, _ in tf]:
            diffs.append(f"{where}: stored outputs {[k for k, _ in ts]}, now {[k for k, _ in tf]}")
            continue
        volatile = VOLATILE in s.metadata.get("tags", [])
        for (_, a), (_, b) in zip(ts, tf):
            if volatile:
                if len(a.splitlines()) != len(b.splitlines()):
                    diffs.append(f"{where} (volatile): {len(a.splitlines())} stored lines, {len(b.splitlines())} now")
            else:
                why = texts_match(a, b)
                if why:
                    diffs.append(f"{where}: {why}")
    return diffs


def set_size(nb: nbformat.NotebookNode, size: str) -> None:
    """Replace ``SIZE = "small"`` in the parameters cell."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    if 'SIZE = "small"' not in cell.source:
        raise ValueError("the parameters cell does not set SIZE = \"small\"")
    cell.source = cell.source.replace('SIZE = "small"', f"SIZE = {size!r}")


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n")


def figures(nb: nbformat.NotebookNode) -> dict[str, bytes]:
    """``{name: PNG bytes}``: the first figure of each code cell tagged ``figure:NAME`` (the README's)."""
    import base64

    out = {}
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith(FIGURE_TAG):
                png = next((o.data["image/png"] for o in cell.get("outputs", [])
                            if "image/png" in o.get("data", {})), None)
                if png is None:
                    raise ValueError(f"cell tagged {tag} has no figure")
                out[tag[len(FIGURE_TAG):]] = base64.b64decode(png)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="prefixes of the notebooks to run (default: all)")
    ap.add_argument("--check", action="store_true", help="compare with the stored outputs, write nothing")
    ap.add_argument("--out", type=Path, default=None, help="write the executed notebooks to this folder instead")
    ap.add_argument("--size", default=None, help="run at this SIZE instead of the notebook's default (with --out)")
    args = ap.parse_args(argv)
    if args.size is not None and args.out is None:
        ap.error("--size needs --out: the stored notebooks are executed at their default size")
    chosen = [p for p in sources() if not args.names or any(p.name.startswith(n) for n in args.names)]
    if not chosen:
        print("no notebook matches", args.names)
        return 1
    stale = 0
    with kernel() as name:
        for py in chosen:
            nb = read_source(py)
            if args.size is not None:
                set_size(nb, args.size)
            nb = execute(nb, name)
            target = py.with_suffix(".ipynb")
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                write(nb, args.out / target.name)
            elif args.check:
                diffs = differences(nbformat.read(target, as_version=4), nb) if target.is_file() else ["not stored"]
                stale += bool(diffs)
                print(py.name, "up to date" if not diffs else "STALE:\n  " + "\n  ".join(diffs))
            else:
                write(nb, target)
                print("wrote", target.relative_to(ROOT), f"({target.stat().st_size / 1e6:.2f} MB)")
                for fig_name, png in figures(nb).items():
                    FIGURES.mkdir(exist_ok=True)
                    (FIGURES / f"{fig_name}.png").write_bytes(png)
                    print("wrote", (FIGURES / f"{fig_name}.png").relative_to(ROOT))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
