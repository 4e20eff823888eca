"""Run the executable checks of theory/*.md (small sizes): every derivation's claims hold numerically."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

THEORY = Path(__file__).resolve().parent.parent / "theory"
CHECKS = {
    "derivation.md": "check_derivation.py",
    "energy_and_stability.md": "check_energy.py",
    "attention_and_dictionaries.md": "check_attention.py",
}


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"theory_{Path(script).stem}", THEORY / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc,script", sorted(CHECKS.items()))
def test_theory_checks_pass(doc, script, capsys):
    assert (THEORY / doc).is_file(), doc
    results = _load(script).main("small")
    out = capsys.readouterr().out
    assert "passed" in out
    assert results and all(isinstance(v, dict) for v in results.values())


@pytest.mark.parametrize("doc,script", sorted(CHECKS.items()))
def test_every_named_check_exists(doc, script):
    """Each check the Markdown cites in brackets is a function of its script."""
    import re

    text = (THEORY / doc).read_text()
    cited = set(re.findall(r"\[`(check_[a-z0-9_]+)`", text))
    assert cited, f"{doc} cites no checks"
    module = _load(script)
    missing = sorted(name for name in cited if not callable(getattr(module, name, None)))
    assert not missing, f"{doc} cites checks missing from {script}: {missing}"
    called = set(re.findall(r"(check_[a-z0-9_]+)\(", (THEORY / script).read_text().split("def main")[1]))
    assert cited <= called, f"checks cited in {doc} but not run by main(): {sorted(cited - called)}"
