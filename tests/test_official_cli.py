"""The official evaluation protocols, the official command lines, safe checkpoint loading and one-line errors.

Most checks call the functions of scripts/train_imagenet.py in this process (fast); the official README
commands run as subprocesses through torch.distributed.launch / torchrun on the CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from script_runner import run_script  # noqa: E402  (tests/)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ALEX_GAUSSIAN = 0.886428


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ti():
    return load_script("train_imagenet")


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def inc_data(tmp_path_factory):
    """Train/val ImageFolder (2 classes) and an ImageNet-C tree of 224 x 224 noise images: one benchmark
    corruption (gaussian_noise) and one of ImageNet-C's extra corruptions (speckle_noise)."""
    root = tmp_path_factory.mktemp("inc")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(2):
            write_png(root / "imagenet" / "train" / c / f"{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        write_png(root / "imagenet" / "val" / c / "0.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        for corr in ("gaussian_noise", "speckle_noise"):
            for s in range(1, 6):
                write_png(root / "inc" / corr / str(s) / c / "0.png",
                          rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    return root


class Recorder(nn.Module):
    """A parameter-free 2-class 'model' that records every input batch it sees."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.seen.append(x.detach().clone())
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


def eval_args(ti, root: Path, out: Path, *extra):
    return ti.parse_args(["--data-path", str(root / "imagenet"), "--eval", "--inc_path", str(root / "inc"),
                          "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "2",
                          "--input-size", "224", "--output_dir", str(out), *extra])


def run_eval(ti, args, model):
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set, info = ti.build_data(args)
    return ti.run_evaluation(model, val_set, info, args, torch.device("cpu"), 0, 1, None, out)


def expected_input(png: Path) -> torch.Tensor:
    from PIL import Image
    x = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------
# evaluation protocols
# ------------------------------------------------------------------------------------------------
def test_imagenet_c_sees_the_stored_pixels_and_mce_uses_the_15_benchmark_corruptions(ti, inc_data, tmp_path):
    model = Recorder()
    res = run_eval(ti, eval_args(ti, inc_data, tmp_path / "out"), model)
    # batch 0: the clean validation set (resized); then 10 ImageNet-C sets, the benchmark corruption first
    assert len(model.seen) == 1 + 10
    order = [("gaussian_noise", s) for s in range(1, 6)] + [("speckle_noise", s) for s in range(1, 6)]
    for batch, (corr, s) in zip(model.seen[1:], order):
        assert batch.shape == (2, 3, 224, 224)
        want = torch.stack([expected_input(inc_data / "inc" / corr / str(s) / c / "0.png") for c in ("a", "b")])
        torch.testing.assert_close(batch, want, rtol=0, atol=1e-6)  # no resampling: the stored pixels
    # the mCE is the paper's: the benchmark corruption normalised by AlexNet; the extra one apart
    assert res["mCE_corruptions"] == ["gaussian_noise"] and res["mCE_complete"] is False
    errs = res["corruption_errors"]["gaussian_noise"]
    assert len(errs) == 5
    assert res["mCE"] == pytest.approx(100 * np.mean(errs) / ALEX_GAUSSIAN)
    assert set(res["CE"]) == {"gaussian_noise"}
    assert res["extra_corruption_errors"] == pytest.approx(
        {"speckle_noise": 100 * np.mean(res["corruption_errors"]["speckle_noise"])})
    assert set(json.loads((tmp_path / "out" / "eval_progress.json").read_text())["results"]) == \
        {"clean"} | {f"imagenet_c/{c}/{s}" for c, s in order}


def test_corruption_summary_over_all_19_corruptions():
    ti = load_script("train_imagenet")
    rng = np.random.default_rng(1)
    from vars_ode.robustness import ALEXNET_ERRORS
    extras = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    errors = {c: list(rng.uniform(0.2, 0.9, 5)) for c in [*ALEXNET_ERRORS, *extras]}
    out = ti.corruption_summary(errors, "alexnet")
    assert out["mCE_complete"] and out["mCE_corruptions"] == sorted(ALEXNET_ERRORS)
    want = np.mean([100 * np.mean(errors[c]) / ALEXNET_ERRORS[c] for c in ALEXNET_ERRORS])
    assert out["mCE"] == pytest.approx(want)
    assert sorted(out["extra_corruption_errors"]) == sorted(extras)
    assert out["corruption_acc1"] == pytest.approx(100 * (1 - np.mean([np.mean(errors[c]) for c in ALEXNET_ERRORS])))
    # unnormalised (Fashion-MNIST-C): every corruption counts
    plain = ti.corruption_summary(errors, "none")
    assert plain["mCE"] == pytest.approx(100 * np.mean([np.mean(v) for v in errors.values()]))


def test_interrupted_evaluation_resumes_where_it_stopped(ti, inc_data, tmp_path):
    out = tmp_path / "out"
    args = eval_args(ti, inc_data, out)
    with pytest.raises(KeyboardInterrupt):
        run_eval(ti, args, Recorder(fail_after=4))  # clean + 3 ImageNet-C sets, then killed
    saved = json.loads((out / "eval_progress.json").read_text())["results"]
    assert sorted(saved) == ["clean", "imagenet_c/gaussian_noise/1", "imagenet_c/gaussian_noise/2",
                             "imagenet_c/gaussian_noise/3"]
    again = Recorder()
    res = run_eval(ti, eval_args(ti, inc_data, out), again)
    assert len(again.seen) == 7  # only the 7 sets left
    full = run_eval(ti, eval_args(ti, inc_data, tmp_path / "full"), Recorder())
    for k in ("acc1", "mCE", "corruption_errors", "extra_corruption_errors"):
        assert res[k] == full[k], k
    # another evaluation (other options) in the same folder starts afresh instead of mixing results
    other = Recorder()
    run_eval(ti, eval_args(ti, inc_data, out, "--corruptions", "gaussian_noise"), other)
    assert len(other.seen) == 1 + 5


# ------------------------------------------------------------------------------------------------
# the official command lines
# ------------------------------------------------------------------------------------------------
def test_official_flags_parse_with_official_meanings(ti):
    base = ["--data-path", "x"]
    a = ti.parse_args(base + ["--drop", "0.0"])  # no abbreviation: --drop is dropout, not --drop-path
    assert a.drop == 0.0 and a.drop_path == 0.1
    a = ti.parse_args(base + ["--model-ema", "--model", "rvt_tiny", "--attention", "vars_d", "--data-set", "IMNET",
                              "--local_rank", "3", "--opt", "adamw", "--sched", "cosine", "--repeated-aug",
                              "--dist-eval", "--mixup-prob", "0.5", "--mixup-mode", "elem", "--remode", "const",
                              "--recount", "2", "--finetune", "", "--pretrained", "--dr", "0.2"])
    assert (a.model_ema, a.model, a.attention, a.data_set, a.local_rank) == \
        (True, "vars_rvt_tiny", "vars_d", "imagenet", 3)
    assert a.model_kwargs_dict == {"compat": "official"}  # the official layers: released checkpoints load
    assert (a.mixup_prob, a.mixup_mode, a.remode, a.recount, a.decay_rate) == (0.5, "elem", "const", 2, 0.2)
    assert ti.parse_args(base + ["--local-rank=1"]).local_rank == 1
    assert ti.parse_args(base + ["--attention", "self-att"]).attention == "self"
    assert ti.parse_args(base + ["--attention", "perf"]).attention == "performer"
    assert ti.parse_args(base + ["--model", "rvt_base"]).model == "vars_rvt_base"
    # the official model names come with the official default attention (self-att); ours keep the host's
    assert ti.parse_args(base + ["--model", "rvt_tiny"]).attention == "self"
    assert ti.parse_args(base + ["--model", "vars_rvt_tiny"]).attention is None
    plus = ti.parse_args(base + ["--model", "rvt_small_plus"])  # RVT+: position masks in the first 5 blocks
    assert (plus.model, plus.attention, plus.model_kwargs_dict) == ("vars_rvt_small", "self", {"masked_blocks": 5})
    d = ti.parse_args(base)  # official defaults
    assert (d.num_workers, d.pin_mem, d.repeated_aug, d.model_ema, d.opt, d.sched, d.output_dir, d.cooldown_epochs) \
        == (10, True, True, True, "adamw", "cosine", "", 10)
    assert ti.parse_args(["--data-set", "fashion-mnist"]).repeated_aug is False


@pytest.mark.parametrize("argv, flag", [
    (["--drop-p", "0.3"], "--drop-p"),  # abbreviations are refused
    (["--epochs", "0"], "--epochs"),
    (["--distillation-type", "soft"], "--distillation-type"),
    (["--use_patch_aug"], "--use_patch_aug"),
    (["--data-set", "CIFAR"], "--data-set CIFAR"),
    (["--model", "rvt_tiny_plus", "--attention", "vars_d"], "--model rvt_tiny"),
    (["--attention", "softmax"], "--attention"),
    (["--resume", "https://example.org/vars_d.pth"], "download the file first"),
    (["--eval", "--save-logits"], "--output_dir"),
    (["--lr", "-0.001"], "--lr: must be a finite non-negative number, got -0.001"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--smoothing", "1.5"], "--smoothing: must be a probability in [0, 1], got 1.5"),
    (["--drop-path", "-0.1"], "--drop-path"),
    (["--reprob", "2"], "--reprob"),
])
def test_unsupported_or_bad_flags_give_one_line_errors(ti, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        ti.run_cli(lambda: ti.parse_args(["--data-path", "x", *argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err, err


def test_amp_is_the_default_on_cuda_only(ti):
    base = ["--data-path", "x"]
    cpu = torch.device("cpu")
    assert ti.amp_setting(ti.parse_args(base), cpu) is None
    assert ti.amp_setting(ti.parse_args(base + ["--amp"]), cpu) == torch.bfloat16
    assert ti.amp_setting(ti.parse_args(base + ["--amp", "--amp-dtype", "float16"]), cpu) == torch.float16
    assert ti.amp_setting(ti.parse_args(base + ["--no-amp"]), torch.device("cuda")) is None
    on_cuda = ti.amp_setting(ti.parse_args(base), torch.device("cuda"))
    assert on_cuda in (torch.bfloat16, torch.float16)
    if torch.cuda.is_available():
        assert on_cuda == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("name", ["eval_pacs", "eval_voc", "eval_mit1003", "robustness_study", "train_imagenet"])
def test_every_script_refuses_abbreviations(name, capsys, monkeypatch):
    import runpy
    # --outp would abbreviate --output_dir if abbreviations were allowed
    data = [] if name == "robustness_study" else ["--data-path", "x"]
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *data, "--outp", "y"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unrecognized arguments: --outp y") and err.count("\n") == 1, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_imagefolder(root: Path, n_per_class: int, size: int, rng) -> None:
    for c in ("n01440764", "n01443537", "n01484850"):
        for split, n in (("train", n_per_class), ("val", 2)):
            for i in range(n):
                write_png(root / split / c / f"{i}.JPEG.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_official_readme_commands_run_verbatim(tmp_path):
    """The two commands of the official README, with scripts/train_imagenet.py for main.py and only the
    sizes shrunk (processes, workers, batch, image side, steps) for a CPU: training through
    torch.distributed.launch (which passes --local-rank), then the evaluation with --resume."""
    rng = np.random.default_rng(3)
    data, out = tmp_path / "imagenet", tmp_path / "output"
    _write_imagefolder(data, 4, 40, rng)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    small = ["--input-size", "32", "--epochs", "1", "--max-steps-per-epoch", "1", "--device", "cpu", "--no-progress"]
    train = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_port",
             str(_free_port()), str(SCRIPTS / "train_imagenet.py"), "--model", "rvt_tiny", "--data-path", str(data),
             "--output_dir", str(out), "--num_workers", "0", "--batch-size", "2", "--attention", "vars_d", *small]
    r = subprocess.run(train, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world 2" in r.stdout and "full precision" in r.stdout
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)  # plain weights-only
    assert ckpt["args"]["model"] == "vars_rvt_tiny" and ckpt["args"]["model_kwargs_dict"] == {"compat": "official"}
    assert any(".attn.learned_L" in k or ".attn.W" in k or "learned" in k for k in ckpt["model"])
    # the official evaluation command is a single process (sharded evaluation is covered in test_pipeline.py): its
    # arguments run here through the script's main (tests/script_runner.py), without a second interpreter's imports
    evaluation = ["--model", "rvt_tiny", "--data-path", data, "--eval", "--resume", out / "checkpoint.pth",
                  "--attention", "vars_d", "--input-size", "32", "--device", "cpu", "--num_workers", "0",
                  "--no-progress", "--output_dir", tmp_path / "eval"]
    r = run_script("train_imagenet.py", evaluation)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["model"] == "vars_rvt_tiny" and 0 <= res["acc1"] <= 100


def test_official_format_checkpoint_gives_the_in_memory_logits(ti, inc_data, tmp_path):
    """A checkpoint as the official main.py writes it (its key names, an argparse Namespace under
    "args", no RNG states) read through --eval --resume, weights-only, gives the model's logits."""
    import timm
    import vars_ode  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official", num_classes=2, img_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    path = tmp_path / "vars_d_official.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "epoch": 299, "model_ema": model.state_dict(), "scaler": {},
                "args": argparse.Namespace(model="rvt_tiny", attention="vars_d", lam=0.3, num_step=5)}, path)
    out = tmp_path / "eval"
    assert ti.main(["--model", "rvt_tiny", "--data-path", str(inc_data / "imagenet"), "--eval", "--resume", str(path),
                    "--attention", "vars_d", "--input-size", "32", "--device", "cpu", "--num_workers", "0",
                    "--no-progress", "--output_dir", str(out), "--save-logits"]) == 0
    got = torch.load(out / "logits.pt", weights_only=True)
    args = ti.parse_args(["--data-path", str(inc_data / "imagenet"), "--input-size", "32"])
    from torchvision.datasets import ImageFolder
    val = ImageFolder(str(inc_data / "imagenet" / "val"), transform=ti.imagefolder_transforms(args, False))
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        want = model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
    assert got["targets"].tolist() == [val[i][1] for i in range(len(val))]


def test_hubconf_entry_points_build_the_hosts():
    names = ("vars_deit_tiny", "vars_rvt_tiny", "vars_gfnet_tiny", "vars_rvt_small", "vars_rvt_base")
    spec = importlib.util.spec_from_file_location("_hubconf", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all(callable(getattr(hub, n)) for n in names) and "timm" in hub.dependencies
    model = torch.hub.load(str(REPO), "vars_rvt_tiny", source="local", attention="vars_d", img_size=32,
                           num_classes=3, depth=(1, 1))
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        torch.hub.load(str(REPO), "vars_deit_tiny", source="local", pretrained=True)


def test_citation_and_license_files():
    import yaml
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    ref = cff["preferred-citation"]
    assert ref["title"] == "Visual Attention Emerges from Recurrent Sparse Reconstruction" and ref["year"] == 2022
    assert [a["family-names"] for a in ref["authors"]] == ["Shi", "Song", "Joshi", "Darrell", "Wang"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_config_file_sets_defaults_and_the_command_line_wins(ti, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: rvt_tiny\nattention: vars_sd\nbatch_size: 32\nlr: 0.001\n")
    a = ti.parse_args(["-c", str(cfg), "--data-path", "x", "--batch-size", "16"])
    assert (a.model, a.attention, a.batch_size, a.lr) == ("vars_rvt_tiny", "vars_sd", 16, 0.001)
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit):
        ti.parse_args(["-c", str(cfg), "--data-path", "x"])


@pytest.mark.parametrize("name, argv, flag", [
    ("eval_pacs", ["--data-path", "x", "--epochs", "0"], "--epochs"),
    ("eval_voc", ["--data-path", "x", "--max-images", "-1"], "--max-images"),
    ("eval_mit1003", ["--data-path", "x", "--input-size", "0"], "--input-size"),
    ("robustness_study", ["--batch-size", "0"], "--batch-size"),
])
def test_every_script_refuses_non_positive_sizes(name, argv, flag, capsys, monkeypatch):
    import runpy
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: argument {flag}") and err.count("\n") == 1, err


def test_official_optimiser_schedule_and_ema_flags_reach_the_run(ti, inc_data, tmp_path):
    out = tmp_path / "out"
    assert ti.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1",
                    "num_heads=2", "--input-size", "16", "--device", "cpu", "--num_workers", "0", "--no-progress",
                    "--data-path", str(inc_data / "imagenet"), "--batch-size", "2", "--epochs", "1",
                    "--opt", "sgd", "--momentum", "0.8", "--sched", "step", "--decay-epochs", "1", "--dr", "0.5",
                    "--model-ema-force-cpu", "--mixup-mode", "pair", "--drop", "0.1", "--output_dir", str(out)]) == 0
    from vars_ode.models import load_checkpoint_file
    ckpt = load_checkpoint_file(out / "checkpoint.pth")
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.8  # timm's SGD, not AdamW
    assert ckpt["lr_scheduler"]["decay_rate"] == 0.5 and "decay_t" in ckpt["lr_scheduler"]  # StepLRScheduler
    assert ckpt["args"]["drop"] == 0.1 and ckpt["args"]["mixup_mode"] == "pair"
