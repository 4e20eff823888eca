"""Checkpoint files: one weights-only loading function, explicit trust, and one-line errors in the scripts."""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from vars_ode.models import (SAFE_GLOBALS, CheckpointError, load_checkpoint_file, load_official_checkpoint,
                             save_safetensors)
from vars_ode.robustness.cli import load_weights

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1",
        "num_heads=2", "--input-size", "16", "--device", "cpu", "--num_workers", "0", "--no-progress",
        "--batch-size", "4", "--no-repeated-aug"]


class Touch:
    """Unpickling this opens (creates) a file: code run by the checkpoint file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# ------------------------------------------------------------------------------------------------
# the loading function
# ------------------------------------------------------------------------------------------------
def test_a_file_that_runs_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": _net().state_dict(), "payload": Touch(marker)}, path)
    for load in (lambda: load_checkpoint_file(path), lambda: load_official_checkpoint(_net(), path)):
        with pytest.raises(CheckpointError, match="--trust-checkpoint") as e:
            load()
        assert str(path) in str(e.value) and "bytes" in str(e.value) and "open" in str(e.value)
        assert not marker.exists()
    with pytest.warns(UserWarning, match="can run code"):
        load_checkpoint_file(path, trusted=True)  # the named opt-in does what it says
    assert marker.exists()


def test_official_and_legacy_contents_load_weights_only(tmp_path):
    # the official main.py stores an argparse Namespace; older checkpoints of ours a NumPy random state
    path = tmp_path / "legacy.pth"
    state = _net().state_dict()
    torch.save({"model": state, "args": argparse.Namespace(model="rvt_tiny", lr=5e-4),
                "rng": [{"numpy": np.random.get_state(), "python": random.getstate()}]}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # torch alone refuses these types ...
    ckpt = load_checkpoint_file(path)  # ... the short allow-list takes them
    assert ckpt["args"].model == "rvt_tiny" and torch.equal(ckpt["model"]["0.weight"], state["0.weight"])
    assert argparse.Namespace in SAFE_GLOBALS and os.system not in SAFE_GLOBALS


@pytest.mark.parametrize("case", ["truncated", "random", "empty", "folder", "missing"])
def test_unreadable_files_are_named_with_their_size(tmp_path, case):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _net().state_dict()}, path)
    data = path.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(999))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    expect = {"truncated": f"({len(data) // 2:,} bytes) is truncated or corrupt", "random": "(999 bytes) is corrupt",
              "empty": "empty (0 bytes)", "folder": "is a folder", "missing": "no such file"}[case]
    assert expect in msg, msg


def test_safetensors_round_trip(tmp_path):
    net = _net()
    save_safetensors(net.state_dict(), tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    load_official_checkpoint(other, tmp_path / "w.safetensors")
    x = torch.randn(5, 4)
    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


def test_drop_mismatched_reports_and_refuses_a_different_model(tmp_path):
    src = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 10))
    torch.save({"model": src.state_dict()}, tmp_path / "a.pth")
    head_only = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    dropped = load_weights(head_only, tmp_path / "a.pth", drop_mismatched=True, max_dropped_fraction=0.5)
    assert dropped == ["2.bias", "2.weight"]
    assert torch.equal(head_only[0].weight, src[0].weight)
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))  # every tensor differs
    with pytest.raises(CheckpointError, match="fits only 0 of the model's 4 tensors"):
        load_weights(other, tmp_path / "a.pth", drop_mismatched=True)


# ------------------------------------------------------------------------------------------------
# the scripts: one line, status 2, no traceback
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ti():
    spec = importlib.util.spec_from_file_location("_script_train_imagenet_ckpt", SCRIPTS / "train_imagenet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _one_line_error(ti, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        ti.run_cli(lambda: ti.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["truncated", "other_model", "weights_only", "code", "bad_kwarg", "pretrained"])
def test_script_turns_bad_input_into_one_line(ti, folder, tmp_path, capsys, case):
    path = tmp_path / "ckpt.pth"
    argv = [*TINY, "--data-path", str(folder), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    if case == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:700])
        msg = _one_line_error(ti, [*argv, "--eval", "--resume", str(path)], capsys)
        assert f"--resume {path} (700 bytes) is truncated or corrupt" in msg
    elif case == "other_model":
        import timm
        other = timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                  img_size=16, num_classes=2)
        torch.save({"model": other.state_dict(), "args": {"model": "wider_vit", "attention": None}}, path)
        msg = _one_line_error(ti, [*argv, "--eval", "--resume", str(path)], capsys)
        assert "does not match the model" in msg and "shape mismatches" in msg
        assert "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 16)" in msg and "--model wider_vit" in msg
    elif case == "weights_only":
        import timm
        net = timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                img_size=16, num_classes=2)
        torch.save(net.state_dict(), path)
        msg = _one_line_error(ti, [*argv, "--resume", str(path)], capsys)
        assert "holds weights only" in msg and f"--finetune {path}" in msg
        assert not (tmp_path / "out" / "checkpoint.pth").exists()
    elif case == "code":
        marker = tmp_path / "ran"
        torch.save({"model": {}, "x": Touch(marker)}, path)
        msg = _one_line_error(ti, [*argv, "--eval", "--resume", str(path)], capsys)
        assert "--trust-checkpoint" in msg and not marker.exists()
    elif case == "pretrained":
        msg = _one_line_error(ti, [*argv, "--model", "vars_deit_tiny", "--pretrained"], capsys)
        assert "--pretrained: vars_deit_tiny has no released weights" in msg and "--finetune FILE" in msg
    else:
        argv[argv.index("patch_size=4")] = "patch_size=four"
        msg = _one_line_error(ti, argv, capsys)
        assert "patch_size='four' (expected int, like the default 16)" in msg


def test_finetune_loads_weights_and_reinitialises_another_head(ti, folder, tmp_path):
    import timm
    src = timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            img_size=16, num_classes=7)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    out = tmp_path / "out"
    assert ti.main([*TINY, "--data-path", str(folder), "--output_dir", str(out), "--epochs", "1",
                    "--finetune", str(tmp_path / "w.pth"), "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
                    "--eval-every", "0", "--no-model-ema"]) == 0
    got = load_checkpoint_file(out / "checkpoint.pth")["model"]
    assert got["head.weight"].shape == (2, 16)
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])


def test_error_exit_in_a_real_process(folder, tmp_path):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"\x80\x02not a checkpoint")
    r = subprocess.run([sys.executable, str(SCRIPTS / "train_imagenet.py"), *TINY, "--data-path", str(folder),
                        "--eval", "--resume", str(path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("error: --resume") and r.stderr.count("\n") == 1, r.stderr


def test_resume_continues_an_official_format_training_checkpoint(ti, folder, tmp_path, capsys):
    """The official main.py's checkpoint (no RNG states or step count, an argparse Namespace, an EMA
    state without the wrapper prefix, a per-epoch scheduler state) continues with --resume."""
    base = [*TINY, "--data-path", str(folder), "--eval-every", "0"]
    assert ti.main([*base, "--output_dir", str(tmp_path / "a"), "--epochs", "1"]) == 0
    ours = load_checkpoint_file(tmp_path / "a" / "checkpoint.pth")
    official = {"model": ours["model"], "optimizer": ours["optimizer"], "lr_scheduler": {"t_initial": 300},
                "epoch": 0, "scaler": {}, "args": argparse.Namespace(model="vit", epochs=300),
                "model_ema": {k.removeprefix("module."): v for k, v in ours["model_ema"].items()}}
    torch.save(official, tmp_path / "official.pth")
    capsys.readouterr()
    assert ti.main([*base, "--output_dir", str(tmp_path / "b"), "--epochs", "2",
                    "--resume", str(tmp_path / "official.pth")]) == 0
    assert "epoch 0 done, step 2 (official checkpoint)" in capsys.readouterr().out
    after = load_checkpoint_file(tmp_path / "b" / "checkpoint.pth")
    assert after["epoch"] == 1 and after["global_step"] == 4
    assert any(not torch.equal(after["model"][k], ours["model"][k]) for k in ours["model"])


def test_one_loading_function_for_the_whole_project():
    """Every torch.load of the scripts, hosts and robustness code goes through load_checkpoint_file; the notebooks and
    benchmarks, which read the files they wrote themselves, load weights only."""
    import re
    offenders = []
    for folder in (REPO / "benchmarks", REPO / "notebooks"):
        for f in sorted(folder.glob("*.py")):
            text = f.read_text()
            calls = re.findall(r"torch\.load\([^)]*\)", text)
            if len(calls) != text.count("torch.load(") or any("weights_only=True" not in c for c in calls) or \
                    "weights_only=False" in text or "allow_pickle=True" in text:
                offenders.append(f.name)
    for folder in (REPO / "scripts", REPO / "vars_ode", REPO / "vars_ode" / "models", REPO / "vars_ode" / "robustness",
                   REPO / "vars_ode" / "solvers"):
        for f in sorted(folder.glob("*.py")):
            text = f.read_text()
            if f.name == "checkpoint.py":
                # the one function: weights-only, full unpickling only behind trusted=True
                calls = re.findall(r"torch\.load\([^)]*\)", text)
                assert sorted(c.split("weights_only=")[1] for c in calls) == ["False)", "True)"], calls
                assert re.search(r"if trusted:\s+warnings\.warn\(.*?\)\s+return torch\.load\([^)]*weights_only=False\)",
                                 text, re.S)
                continue
            if "torch.load(" in text or "weights_only=False" in text:
                offenders.append(f.name)
    assert not offenders, offenders
