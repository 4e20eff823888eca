"""End-to-end tests of the scripts on small generated replicas of each dataset layout.

Every script runs on the CPU with a tiny timm ViT (4x4 patches, width 16): in the test process through its
``main(argv)`` (``tests/script_runner.py``: a started interpreter costs more than a tiny script's work), and in
a started interpreter where a test is about the process itself (SIGKILL, torchrun, the exit status of a
script's ``__main__`` block).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from script_runner import run_script  # noqa: E402  (tests/)
from vars_ode.models import load_checkpoint_file as load_ckpt  # weights-only: our checkpoints must load so

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1",
        "num_heads=2", "--input-size", "16", "--device", "cpu"]
CLASSES = ["cat", "dog", "eel"]


def run(script: str, *args, timeout: float = 300, check: bool = True, process: bool = False
        ) -> subprocess.CompletedProcess:
    """``python scripts/<script> *args``: in this process (``tests/script_runner.py``), or with ``process`` in a
    started interpreter, as a user's shell runs it."""
    if process:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
        r = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=REPO)
    else:
        r = run_script(script, args)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-3000:]}")
    return r


def train(*args, **kw):
    return run("train_imagenet.py", *TINY, "--num_workers", "0", "--no-progress", "--batch-size", "4", *args, **kw)


def write_images(folder: Path, n: int, rng, size=(20, 20), ext="png"):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.{ext}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder (train/val), an ImageNet-C tree and ImageNet-A/R/Sketch style folders."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        write_images(root / "imagenet" / "train" / c, 8, rng)
        write_images(root / "imagenet" / "val" / c, 3, rng)
        for corr in ("gaussian_noise", "fog"):
            for s in range(1, 6):
                write_images(root / "imagenet-c" / corr / str(s) / c, 1, rng)
        for name in ("imagenet-a", "imagenet-r", "imagenet-sketch"):
            write_images(root / name / c, 1, rng, ext="jpg")
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train("--data-path", data / "imagenet", "--epochs", "2", "--max-steps-per-epoch", "3", "--output_dir", out)
    return out


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# training, checkpointing, resumption
# ------------------------------------------------------------------------------------------------
def test_train_two_epochs_then_resume(trained, data):
    ckpt = load_ckpt(trained / "checkpoint.pth")
    for key in ("model", "optimizer", "epoch", "lr_scheduler", "model_ema", "scaler", "rng", "args", "global_step"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6
    assert set(ckpt["rng"][0]) >= {"torch", "numpy", "python", "loader"}
    assert [int(r["epoch"]) for r in read_log(trained / "log.csv")] == [0, 1]
    assert not list(trained.glob("*.tmp"))
    # resume in a copy of the folder and train one more epoch
    out = trained.parent / "resumed"
    out.mkdir()
    (out / "log.csv").write_text((trained / "log.csv").read_text())
    r = train("--data-path", data / "imagenet", "--epochs", "3", "--max-steps-per-epoch", "3", "--output_dir", out,
              "--resume", trained / "checkpoint.pth")
    assert "resumed from" in r.stdout
    ckpt2 = load_ckpt(out / "checkpoint.pth")
    assert ckpt2["epoch"] == 2 and ckpt2["global_step"] == 9
    assert [int(r["epoch"]) for r in read_log(out / "log.csv")] == [0, 1, 2]
    assert any(not torch.equal(ckpt["model"][k], ckpt2["model"][k]) for k in ckpt["model"])


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}"
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def test_sigkill_and_resume_is_bitwise_identical(data, tmp_path):
    # the full recipe (RandAugment, mixup/cutmix, random erasing, drop path, EMA) so that every RNG matters
    # one thread in every run, this process's and the killed subprocess's: bitwise equality needs the same splits
    args = ["--data-path", data / "imagenet", "--epochs", "4", "--max-steps-per-epoch", "6", "--seed", "3",
            "--threads", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(*args, "--output_dir", full)

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, str(SCRIPTS / "train_imagenet.py"), *map(str, TINY), "--num_workers", "0", "--no-progress",
           "--batch-size", "4", *map(str, args), "--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    ckpt_path = killed / "checkpoint.pth"
    deadline = time.time() + 240
    while not ckpt_path.exists():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert still_running, "training finished before the kill; the test needs longer epochs"
    at_kill = load_ckpt(ckpt_path)["epoch"]
    assert at_kill < 3

    r = train(*args, "--output_dir", killed, "--resume", ckpt_path)
    assert "resumed from" in r.stdout
    a = load_ckpt(full / "checkpoint.pth")
    b = load_ckpt(ckpt_path)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 24
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["model_ema"], b["model_ema"], "model_ema")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    la, lb = read_log(full / "log.csv"), read_log(killed / "log.csv")
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb] == ["0", "1", "2", "3"]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["val_acc1"] for r in la] == [r["val_acc1"] for r in lb]


def torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """train_imagenet.py in two processes on the CPU (torchrun, gloo), as for several GPUs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPTS / "train_imagenet.py"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-3000:]}")
    return r


@pytest.mark.long
def test_torchrun_two_processes_resume_and_evaluate(data, tmp_path):
    # VARS-SD with convolutional templates under DistributedDataParallel: training, a checkpoint with both
    # ranks' random states, a resumed run that repeats the uninterrupted one bit for bit, and the evaluation at
    # the end of the last epoch, whose shards (5 and 4 of the 9 images) add up to the single-process accuracy
    # of the checkpoint (the same evaluate() and sharded loader as --eval under torchrun)
    model = ["--model", "vars_deit_tiny", "--attention", "vars_sd", "--model-kwargs", "patch_size=4", "embed_dim=16",
             "depth=1", "num_heads=2", "--input-size", "16", "--device", "cpu", "--num_workers", "0",
             "--no-progress", "--batch-size", "4", "--data-path", data / "imagenet"]
    args = [*model, "--max-steps-per-epoch", "2", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    # the interrupted run is launched twice with the same --resume auto, as torchrun --max-restarts would
    runs = [torchrun(*args, "--epochs", "3", "--output_dir", full),
            torchrun(*args, "--epochs", "2", "--output_dir", part, "--resume", "auto")]
    runs.append(torchrun(*args, "--epochs", "3", "--output_dir", part, "--resume", "auto"))
    assert "world 2" in runs[0].stdout and "starting from scratch" in runs[1].stdout
    assert "resumed from" not in runs[1].stdout and "resumed from" in runs[2].stdout
    for r in runs:  # the templates' gradient comes back in the parameter's layout (no bucket copy)
        assert "Grad strides do not match" not in r.stderr, r.stderr[-2000:]
    a = load_ckpt(full / "checkpoint.pth")
    b = load_ckpt(part / "checkpoint.pth")
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 6
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["model_ema"], b["model_ema"], "model_ema")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert [r["train_loss"] for r in read_log(full / "log.csv")] == [r["train_loss"] for r in read_log(part / "log.csv")]
    run("train_imagenet.py", *model, "--eval", "--resume", full / "checkpoint.pth", "--output_dir", tmp_path / "eval1")
    acc2 = float(read_log(full / "log.csv")[-1]["val_acc1"])
    acc1 = json.loads((tmp_path / "eval1" / "results.json").read_text())["acc1"]
    assert acc2 == pytest.approx(acc1, abs=1e-9)


def test_torchrun_calibrates_one_budget_for_both_processes(data, tmp_path):
    # --calibrate-budget under DistributedDataParallel: each process runs the loop on its own first batch, and every
    # layer takes the largest budget over the two (all_reduce); with no spare the first step then forces nothing on
    # rank 0, whose batch needed at most that budget, and its work is 1 + 6 evaluations an attempt
    r = torchrun("--model", "vars_deit_tiny", "--attention", "vars_d", "--solver", "dopri5", "--num_step", "2",
                 "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2", "--input-size", "16",
                 "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "4", "--data-path",
                 data / "imagenet", "--epochs", "1", "--max-steps-per-epoch", "1", "--eval-every", "0",
                 "--calibrate-budget", "0", "--output_dir", tmp_path)
    assert "world 2" in r.stdout
    budgets = [int(b) for b in r.stdout.split("budgets of attempts [")[1].split("]")[0].split(",")]
    row = read_log(tmp_path / "log.csv")[0]
    assert len(budgets) == 1 and int(row["solver_work"]) == 1 + 6 * budgets[0]
    assert float(row["budget_forced"]) == 0.0


def test_different_seed_gives_different_weights(data, tmp_path):
    """Guards the equality test above against a run that ignores its randomness."""
    args = ["--data-path", data / "imagenet", "--epochs", "1", "--max-steps-per-epoch", "2"]
    train(*args, "--seed", "0", "--output_dir", tmp_path / "s0")
    train(*args, "--seed", "1", "--output_dir", tmp_path / "s1")
    a = load_ckpt(tmp_path / "s0" / "checkpoint.pth")["model"]
    b = load_ckpt(tmp_path / "s1" / "checkpoint.pth")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def test_eval_writes_results_json(trained, data, tmp_path):
    r = train("--data-path", data / "imagenet", "--eval", "--resume", trained / "checkpoint.pth", "--output_dir",
              tmp_path, "--inc_path", data / "imagenet-c", "--ina_path", data / "imagenet-a", "--inr_path",
              data / "imagenet-r", "--insk_path", data / "imagenet-sketch", "--pgd_test", "--fgsm_test")
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("acc1", "mCE", "CE", "imagenet_a_acc1", "imagenet_r_acc1", "imagenet_sketch_acc1", "pgd_acc1",
                "fgsm_acc1"):
        assert key in res, key
    for key in ("acc1", "imagenet_a_acc1", "imagenet_r_acc1", "imagenet_sketch_acc1", "pgd_acc1", "fgsm_acc1"):
        assert 0.0 <= res[key] <= 100.0
    assert res["pgd_acc1"] <= res["acc1"] + 1e-9 or res["acc1"] == 0
    assert set(res["CE"]) == {"gaussian_noise", "fog"}
    assert all(len(v) == 5 for v in res["corruption_errors"].values())
    # the reported mCE follows from the reported per-severity errors and AlexNet's
    alex = {"gaussian_noise": 0.886428, "fog": 0.819324}
    ces = [100 * np.mean(res["corruption_errors"][c]) / alex[c] for c in alex]
    assert res["mCE"] == pytest.approx(np.mean(ces))
    assert "| Clean | IN-C | IN-R | IN-SK | PGD | IN-A |" in r.stdout


@pytest.mark.parametrize("case", ["no_path", "missing_val", "empty_class", "val_classes", "not_images", "inc_severity"])
def test_malformed_dataset_gives_clear_error(case, data, tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "ds"
    extra = []
    if case != "no_path":
        for c in ("a", "b"):
            write_images(root / "train" / c, 2, rng)
            if case != "missing_val":
                write_images(root / "val" / (c if case != "val_classes" else c + "x"), 1, rng)
    if case == "empty_class":
        (root / "train" / "c").mkdir()
        write_images(root / "val" / "c", 1, rng)
    if case == "not_images":
        (root / "val" / "b" / "0.png").unlink()
        (root / "val" / "b" / "readme.txt").write_text("not an image")
    if case == "inc_severity":
        for s in (1, 2, 3):
            write_images(tmp_path / "inc" / "fog" / str(s) / "a", 1, rng)
        extra = ["--eval", "--inc_path", tmp_path / "inc"]
    expected = {"no_path": "does not exist", "missing_val": "val/", "empty_class": "contain no image",
                "val_classes": "differ", "not_images": "contain no image", "inc_severity": "severity folder"}[case]
    out = tmp_path / "out"
    t0 = time.time()
    r = train("--data-path", root, "--epochs", "1", "--output_dir", out, *extra, check=False)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "parameters" not in r.stdout  # failed before the model was built
    assert not (out / "checkpoint.pth").exists()
    assert time.time() - t0 < 120


def test_vars_options_on_plain_timm_model_give_clear_error(data, tmp_path):
    r = train("--data-path", data / "imagenet", "--attention", "vars_sd", "--lam", "0.3", "--output_dir", tmp_path,
              check=False)
    assert r.returncode == 2 and "does not accept attention" in r.stderr and "Traceback" not in r.stderr


def test_registered_vars_model_trains(data, tmp_path):
    import timm
    import vars_ode  # noqa: F401  registers the VARS hosts
    assert timm.is_model("vars_deit_tiny"), "import vars_ode must register vars_deit_tiny"
    r = run("train_imagenet.py", "--model", "vars_deit_tiny", "--attention", "vars_sd", "--lam", "0.3", "--num_step", "2",
            "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2", "--input-size", "16",
            "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "4", "--data-path",
            data / "imagenet", "--epochs", "1", "--max-steps-per-epoch", "2", "--output_dir", tmp_path)
    assert "attention=vars_sd" in r.stdout
    assert load_ckpt(tmp_path / "checkpoint.pth")["epoch"] == 0
    # the solvers' work in the epoch's last step: 2 ISTA steps; no budget of attempts, nothing forced
    row = read_log(tmp_path / "log.csv")[0]
    assert row["solver_work"] == "2" and row["budget_forced"] == ""
    assert "solver work 2" in r.stdout and "budget forced" not in r.stdout


@pytest.mark.filterwarnings("ignore:grad=.implicit. with a fixed budget:RuntimeWarning")
def test_grad_reaches_the_layers(data, tmp_path):
    # scipy_solver cannot be differentiated through its iterations: without --grad the run ends with the layer's error
    # (exit status 2), with --grad implicit it trains
    common = ["--model", "vars_deit_tiny", "--attention", "vars_d", "--solver", "scipy_solver", "--num_step", "2",
              "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2", "--input-size", "16",
              "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "4", "--data-path",
              data / "imagenet", "--epochs", "1", "--max-steps-per-epoch", "1", "--eval-every", "0"]
    r = run("train_imagenet.py", *common, "--output_dir", tmp_path / "unroll", check=False)
    assert r.returncode == 2 and "grad='implicit'" in r.stderr and "Traceback" not in r.stderr
    r = run("train_imagenet.py", *common, "--grad", "implicit", "--output_dir", tmp_path / "implicit")
    assert load_ckpt(tmp_path / "implicit" / "checkpoint.pth")["args"]["grad"] == "implicit"
    r = run("train_imagenet.py", *common, "--grad", "implicitly", "--output_dir", tmp_path / "bad", check=False)
    assert r.returncode == 2 and "--grad" in r.stderr


@pytest.mark.parametrize("attempts,rtol", [(1, 1e-9), (12, 1e-2)])
def test_a_budget_of_attempts_is_reported_in_the_log(data, tmp_path, attempts, rtol):
    # dopri5 with options={"fixed_attempts": n} over a horizon of 2: log.csv and the epoch line say which fraction of a
    # layer's problems the budget forced (LayerStats.forced); one attempt at a tolerance of 1e-9 forces all of them, 12
    # at the layer's default tolerance (the loop needs 3-4 there) none, and the work is 1 + 6 evaluations an attempt
    r = run("train_imagenet.py", "--model", "vars_deit_tiny", "--attention", "vars_d", "--solver", "dopri5",
            "--num_step", "2", "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2",
            f"solver_options={{'rtol': {rtol}, 'options': {{'fixed_attempts': {attempts}}}}}", "--input-size", "16",
            "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "4", "--data-path",
            data / "imagenet", "--epochs", "1", "--max-steps-per-epoch", "1", "--eval-every", "0", "--output_dir",
            tmp_path)
    row = read_log(tmp_path / "log.csv")[0]
    assert int(row["solver_work"]) == 1 + 6 * attempts
    assert float(row["budget_forced"]) == (1.0 if attempts == 1 else 0.0)
    assert f"budget forced {100.0 if attempts == 1 else 0.0:.2f}% of a layer's problems" in r.stdout


def test_calibrated_budget_trains_as_the_loop_does(data, tmp_path):
    # --calibrate-budget: at each epoch's first step every dopri5 layer gets the attempts its loop takes on that batch
    # plus a spare; the training (drop path on: the calibration must not move the random stream) then follows the
    # loop's steps, so its losses are the loop's, with no forced step
    common = ["--model", "vars_deit_tiny", "--attention", "vars_d", "--solver", "dopri5", "--num_step", "2",
              "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=2", "num_heads=2", "--drop-path", "0.1",
              "--input-size", "16", "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "4",
              "--data-path", data / "imagenet", "--epochs", "2", "--max-steps-per-epoch", "2", "--eval-every", "0"]
    run("train_imagenet.py", *common, "--output_dir", tmp_path / "loop")
    r = run("train_imagenet.py", *common, "--calibrate-budget", "2", "--output_dir", tmp_path / "budget")
    assert r.stdout.count("budgets of attempts") == 2
    loop, budget = read_log(tmp_path / "loop" / "log.csv"), read_log(tmp_path / "budget" / "log.csv")
    for a, b in zip(loop, budget):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-6)
        assert a["budget_forced"] == "" and float(b["budget_forced"]) == 0.0
        assert (int(b["solver_work"]) - 1) % 6 == 0 and int(b["solver_work"]) >= int(a["solver_work"])
    # a model with nothing to calibrate is refused before any training, by name
    r = run("train_imagenet.py", *[c for c in common if c not in ("--solver", "dopri5")], "--calibrate-budget",
            "--output_dir", tmp_path / "ista", check=False)
    assert r.returncode == 2 and "--calibrate-budget: the model has no VARS layer" in r.stderr
    assert not (tmp_path / "ista" / "log.csv").exists()


# ------------------------------------------------------------------------------------------------
# offline data sets
# ------------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """A Fashion-MNIST replica (IDX, gzipped): 40 training and 16 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 16)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _require_imagecorruptions():
    try:
        import imagecorruptions  # noqa: F401
    except ImportError:
        pytest.fail("this test needs `pip install imagecorruptions-imaug` (Fashion-MNIST-C generation)")


def test_fashion_mnist_train_and_fashion_mnist_c_eval(fake_fmnist, tmp_path):
    _require_imagecorruptions()
    common = ["--data-set", "fashion-mnist", "--fmnist-path", fake_fmnist, "--model", "vit_tiny_patch16_224",
              "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2", "--device", "cpu",
              "--num_workers", "0", "--no-progress", "--batch-size", "8", "--output_dir", tmp_path]
    run("train_imagenet.py", *common, "--epochs", "1", "--max-steps-per-epoch", "2")
    run("train_imagenet.py", *common, "--eval", "--resume", tmp_path / "checkpoint.pth", "--eval-subset", "8",
        "--inc_path", tmp_path / "fmc", "--corruptions", "gaussian_noise", "contrast", "--pgd_test")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["mCE_normalization"] == "none" and set(res["CE"]) == {"gaussian_noise", "contrast"}
    assert res["mCE"] == pytest.approx(100 * np.mean([np.mean(v) for v in res["corruption_errors"].values()]))
    assert len(list((tmp_path / "fmc").glob("*.npz"))) == 10  # 2 corruptions x 5 severities, cached
    assert 0 <= res["pgd_acc1"] <= 100


def test_fashion_mnist_in_deits_default_patches_trains_and_says_so(fake_fmnist, tmp_path):
    # 28 px in patches of 16: the convolutional stem gives a 2 x 2 grid (it used to crash in the position embedding)
    r = run("train_imagenet.py", "--data-set", "fashion-mnist", "--fmnist-path", fake_fmnist, "--model",
            "vars_deit_tiny", "--attention", "vars_sd", "--model-kwargs", "embed_dim=16", "depth=1", "num_heads=2",
            "--device", "cpu", "--num_workers", "0", "--no-progress", "--batch-size", "8", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--output_dir", tmp_path)
    assert "patches of 16 x 16 give a 2 x 2 token grid" in r.stdout and "patch_size=4" in r.stdout
    assert 0 <= float(read_log(tmp_path / "log.csv")[0]["val_acc1"]) <= 100


def test_missing_fashion_mnist_gives_install_hint(tmp_path):
    r = run("train_imagenet.py", "--data-set", "fashion-mnist", "--fmnist-path", tmp_path, *TINY[:-4],
            "--output_dir", tmp_path / "o", check=False)
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr


def test_digits_training(tmp_path):
    run("train_imagenet.py", "--data-set", "digits", "--model", "vit_tiny_patch16_224", "--model-kwargs",
        "patch_size=2", "embed_dim=16", "depth=1", "num_heads=2", "--device", "cpu", "--num_workers", "0",
        "--no-progress", "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "3", "--output_dir", tmp_path)
    row = read_log(tmp_path / "log.csv")[0]
    assert 0 <= float(row["val_acc1"]) <= 100 and float(row["images_per_s"]) > 0


# ------------------------------------------------------------------------------------------------
# PACS, VOC, MIT1003
# ------------------------------------------------------------------------------------------------
def test_eval_pacs(tmp_path):
    rng = np.random.default_rng(2)
    for dom in ("photo", "sketch", "cartoon"):
        for c in ("dog", "house"):
            write_images(tmp_path / "pacs" / dom / c, 2, rng, ext="jpg")
    run("eval_pacs.py", "--data-path", tmp_path / "pacs", *TINY, "--epochs", "1", "--batch-size", "4",
        "--num_workers", "0", "--target", "sketch", "--output_dir", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "pacs_results.json").read_text())
    assert list(res["accuracy"]) == ["sketch"] and 0 <= res["accuracy"]["sketch"] <= 100
    # a domain with other classes is rejected
    write_images(tmp_path / "pacs" / "art" / "cat", 1, rng)
    r = run("eval_pacs.py", "--data-path", tmp_path / "pacs", *TINY, check=False)
    assert r.returncode == 2 and "differ" in r.stderr


def _voc(root: Path, rng, ids=("2007_000032", "2007_000039")):
    from PIL import Image
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray((rng.random((24, 30, 3)) * 255).astype(np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        m = np.zeros((24, 30), np.uint8)
        m[5:15, 8:20] = 12
        m[4, :] = 255
        im = Image.fromarray(m, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0] * 128)
        im.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")


def test_eval_voc(tmp_path):
    _voc(tmp_path / "voc", np.random.default_rng(3))
    r = run("eval_voc.py", "--data-path", tmp_path / "voc", *TINY, "--output_dir", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "voc_results.json").read_text())
    assert res["images"] == 2 and res["threshold"] == 0.3
    for k in ("mIoU", "FP", "FN"):
        assert 0 <= res[k] <= 100
    assert "| mIoU | FP | FN |" in r.stdout
    (tmp_path / "voc" / "SegmentationClass" / "2007_000039.png").unlink()
    r = run("eval_voc.py", "--data-path", tmp_path / "voc", *TINY, check=False)
    assert r.returncode == 2 and "2007_000039.png is missing" in r.stderr


def test_eval_mit1003(tmp_path):
    from PIL import Image
    root = tmp_path / "mit"
    rng = np.random.default_rng(4)
    (root / "ALLSTIMULI").mkdir(parents=True)
    (root / "ALLFIXATIONMAPS").mkdir()
    for i in range(2):
        Image.fromarray((rng.random((22, 26, 3)) * 255).astype(np.uint8)).save(root / "ALLSTIMULI" / f"i{i}.jpeg")
    fix = np.zeros((22, 26), np.uint8)
    fix[3, 4] = fix[10, 12] = 255
    Image.fromarray(fix).save(root / "ALLFIXATIONMAPS" / "i0_fixPts.png")
    np.save(root / "ALLFIXATIONMAPS" / "i1_fixPts.npy", np.array([[5, 6], [20, 25]]))
    run("eval_mit1003.py", "--data-path", root, *TINY, "--output_dir", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "mit1003_results.json").read_text())
    assert res["images"] == 2 and np.isfinite(res["NSS"])
    (root / "ALLFIXATIONMAPS" / "i1_fixPts.npy").unlink()
    r = run("eval_mit1003.py", "--data-path", root, *TINY, check=False)
    assert r.returncode == 2 and "no fixation points for i1.jpeg" in r.stderr


# ------------------------------------------------------------------------------------------------
# the offline study
# ------------------------------------------------------------------------------------------------
def test_robustness_study_reports_what_is_missing(tmp_path):
    r = run("robustness_study.py", "--model", "vars_no_such_host", "--fmnist-path", tmp_path / "none", "--preset", "toy",
            "--output-dir", tmp_path, check=False)
    assert r.returncode == 2
    assert "vars_no_such_host" in r.stderr and "dataset-fashion-mnist" in r.stderr


@pytest.mark.long
def test_robustness_study_toy_end_to_end_and_resumes(fake_fmnist, tmp_path):
    """The whole study at a toy size: two rows, one seed, two optimiser steps; a second call trains nothing."""
    _require_imagecorruptions()
    out = tmp_path / "study"
    args = ["--preset", "toy", "--subset", "32", "--fmnist-path", fake_fmnist, "--output-dir", out]
    r = run("robustness_study.py", *args)
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == ["self", "vars_d"] and res["missing"] == []
    d = res["rows"]["vars_d"]
    assert set(d["vs_self"]) == {"clean_acc", "mean_corruption_acc", "pgd1_acc", "pgd4_acc", "fgsm1_acc"}
    assert res["rows"]["self"]["relative_ce"]["mean"] == pytest.approx(100.0)
    layer = d["internal"]["clean"]["blocks.0.attn"]
    assert layer["kkt_residual_mean"] > 0 and 0 <= layer["sparsity"] <= 1 and len(layer["entropy"]) == 3
    assert res["rows"]["self"]["internal"]["clean"] is None
    run_dir = out / "runs" / "vars_d-seed0"
    npz = np.load(run_dir / "eval.npz")
    assert npz["clean"].shape == (16,) and npz["corrupt"].shape == (2, 5, 16) and npz["pgd1"].shape == (16,)
    assert "| VARS-D (ISTA 3) | 1 |" in r.stdout
    # a second invocation reuses every finished run: no training, no evaluation
    logs = {p: p.read_text() for p in out.glob("runs/*/*.log")}
    stamp = (run_dir / "checkpoint.pth").stat().st_mtime_ns
    run("robustness_study.py", *args)
    assert {p: p.read_text() for p in out.glob("runs/*/*.log")} == logs
    assert (run_dir / "checkpoint.pth").stat().st_mtime_ns == stamp
    # running some rows (here only the finished baseline) keeps the other rows in the report
    run("robustness_study.py", *args, "--rows", "self")
    assert list(json.loads((out / "results.json").read_text())["rows"]) == ["self", "vars_d"]
    # the trained VARS-D model evaluated with the FISTA row's solver: a second evaluation beside the first
    r = run("robustness_study.py", *args, "--swap", "vars_d:vars_d_fista")
    swapped = run_dir / "eval_as_vars_d_fista.json"
    res = json.loads((out / "results.json").read_text())
    (item,) = res["swaps"]
    assert (item["trained"], item["solver"], item["seeds"]) == ("vars_d", "vars_d_fista", [0])
    assert set(item["vs_own"]) == set(item["vs_self"]) == set(d["vs_self"])
    assert "| VARS-D (ISTA 3) | VARS-D, FISTA 3 | 1 |" in r.stdout
    assert np.load(run_dir / "eval_as_vars_d_fista.npz")["corrupt"].shape == (2, 5, 16)
    # what it evaluated is the checkpoint with FISTA set in every layer by hand: the layers' KKT residuals agree
    from vars_ode.models.checkpoint import load_checkpoint_file
    from vars_ode.robustness import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from vars_ode import VARSLayer
    from vars_ode.robustness.study import PRESETS, _internals, _pixels, build_model
    net = build_model(PRESETS["toy"], "vars_d")
    net.load_state_dict(load_checkpoint_file(run_dir / "checkpoint.pth")["model"])
    for m in net.modules():
        if isinstance(m, VARSLayer):
            m.set_solver("fista")
    x = _pixels(load_fashion_mnist("test", fake_fmnist)[0][:8])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (FASHION_MNIST_MEAN, FASHION_MNIST_STD))
    by_hand = _internals(net.eval(), (x - mean) / std)["blocks.0.attn"]["kkt_residual_mean"]
    own = json.loads((run_dir / "eval.json").read_text())["internal"]["clean"]["blocks.0.attn"]["kkt_residual_mean"]
    got = json.loads(swapped.read_text())["internal"]["clean"]["blocks.0.attn"]["kkt_residual_mean"]
    assert got == pytest.approx(by_hand, rel=1e-5) and got != pytest.approx(own, rel=1e-3)
    # a swap already evaluated is not repeated; one across attentions is refused with the argument's name
    stamp = swapped.stat().st_mtime_ns
    run("robustness_study.py", *args, "--swap", "vars_d:vars_d_fista")
    assert swapped.stat().st_mtime_ns == stamp
    r = run("robustness_study.py", *args, "--swap", "vars_d:performer", check=False)
    assert r.returncode == 2 and "--swap" in r.stderr and "same attention" in r.stderr
    # a finished run whose model was not kept is skipped, and said so
    (run_dir / "checkpoint.pth").unlink()
    r = run("robustness_study.py", *args, "--swap", "vars_d:vars_d_dopri5")
    assert "vars_d-seed0 has no checkpoint.pth" in r.stdout and not (run_dir / "eval_as_vars_d_dopri5.json").exists()
    # other settings are refused, not mixed into the same folder (the script prints this as "error: ...")
    import dataclasses

    from vars_ode.robustness.study import PRESETS, run_study
    cfg = dataclasses.replace(PRESETS["toy"], subset=32, epochs=2)
    with pytest.raises(ValueError, match=r"other settings \(epochs\)"):
        run_study(cfg, out, fmnist_path=fake_fmnist)
