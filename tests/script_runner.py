"""Run a script of ``scripts/`` inside the test process, as its command line would.

A started Python pays about 7 CPU-seconds to import torch, timm and the library before a tiny script's
work begins; the end-to-end tests start dozens, which was most of the suite's time on two cores. Here a script
is loaded once per worker and its ``main(argv)`` called the way its ``if __name__ == "__main__"`` block
calls it (through ``run_cli`` where the script uses it: a ValueError becomes one ``error:`` line and status
2), with stdout and stderr captured, and the process state the scripts touch (torch's thread count, the
random generators of torch, numpy and ``random``) restored afterwards. The result is a
``subprocess.CompletedProcess``, so a test reads it as it would read a started process.

What only a real process shows (signals, ``torchrun``, the interpreter's exit status from the
``__main__`` block, imports in a fresh interpreter) keeps its subprocess tests.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import random
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
_modules: dict = {}


def script_module(name: str):
    """``scripts/<name>`` as a module, loaded once per process (its ``__main__`` block does not run)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"_script_{Path(name).stem}", SCRIPTS / name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[name] = mod
    return _modules[name]


def _exit_status(code) -> tuple[int, str]:
    # what the interpreter does with SystemExit(code): None -> 0, an int as it is, anything else printed -> 1
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, f"{code}\n"


def run_script(name: str, argv) -> subprocess.CompletedProcess:
    """``python scripts/<name> *argv`` in this process: the script's exit status, stdout and stderr."""
    mod = script_module(name)
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if hasattr(mod, "run_cli"):
                    mod.run_cli(lambda: mod.main(argv))
                else:
                    sys.exit(mod.main(argv))
                code, extra = 0, ""
            except SystemExit as e:
                code, extra = _exit_status(e.code)
            except Exception:  # an uncaught exception: the interpreter prints the traceback, status 1
                code, extra = 1, traceback.format_exc()
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    return subprocess.CompletedProcess([str(SCRIPTS / name), *argv], code, out.getvalue(), err.getvalue() + extra)
