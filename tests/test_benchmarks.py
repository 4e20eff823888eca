"""The benchmark scripts run end to end at toy sizes (their numbers are not asserted: speed is
measured in benchmarks/, never in tests), and their correctness gates work."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# toy sizes: one intra-op thread (beside the other test worker, two threads made the CPU path of gpu.py
# take 221-267 s instead of 31 s alone)
pytestmark = pytest.mark.usefixtures("one_thread")


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_script_cpu_path(capsys, tmp_path):
    gpu = load("gpu")
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--json", str(tmp_path / "r.json"),
                     "--train-graphs"]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs need a CUDA device: no +graph rows" in out
    assert "| VARS-D layer fp32 forward |" in out and "| VARS-SD dense layer fp32 gradients" in out
    assert "| VARS-D triton layer fp32 gradients" in out and "| vars_d_triton |" in out
    assert "| VARS-SD dense triton layer bf16 autocast gradients" in out
    assert "NO |" not in out and "| vars_rvt_tiny train step" in out
    assert "| dopri5@native |" in out and "| rk4@torchdiffeq |" in out
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert {"checks", "blocks", "train", "ode", "train_graphs", "seconds"} <= set(saved) and saved["blocks"]


def test_gpu_script_ab_variants_run_the_other_node(capsys, tmp_path):
    # NAME@ab blocks call the fused node of --ab-file, the others the installed one: a copy of fused.py
    # that doubles the reconstruction changes the @ab block's output only
    import torch

    other = tmp_path / "fused_other.py"
    source = (ROOT / "vars_ode" / "fused.py").read_text()
    marker = "        return (out, *stats)\n"
    assert marker in source
    other.write_text(source.replace(marker, "        out = out * 2\n" + marker))
    gpu = load("gpu")
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--skip-training", "--skip-ode",
                     "--ab-file", str(other), "--ab-variants", "vars_d"]) == 0
    assert "| vars_d@ab |" in capsys.readouterr().out
    torch.manual_seed(0)
    cur = gpu.make_block(24, 3, "vars_d", torch.device("cpu"))
    ab = gpu.make_block(24, 3, "vars_d@ab", torch.device("cpu"))
    ab.load_state_dict(cur.state_dict())
    x = torch.randn(2, 5, 24)
    attn_cur, attn_ab = cur.attn(cur.norm1(x)), ab.attn(ab.norm1(x))
    assert not torch.allclose(attn_cur, attn_ab)
    # the swap lasts only for the @ab call: the installed node is back, and the plain block (built with
    # no other node in reach) gives its own output again
    import vars_ode.fused
    import vars_ode.layer

    assert vars_ode.layer.fused_attention_core is vars_ode.fused.fused_attention_core
    gpu.OTHER_CORE = None
    assert torch.equal(cur.attn(cur.norm1(x)), attn_cur)
    assert torch.equal(ab.attn(ab.norm1(x)), attn_ab)  # bound to the other node when it was built


def test_gpu_script_compiled_blocks(capsys):
    # --compile adds NAME+compile blocks: the block through torch.compile(fullgraph=True), timed and
    # reported beside the eager one. Inductor's code generation takes a minute on two cores: this test of the
    # script's plumbing captures the same full graph with aot_eager (Inductor's output for the layers is checked
    # in test_fused, test_layer and test_workspace)
    import torch

    gpu = load("gpu")
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--skip-training", "--skip-ode",
                     "--blocks", "vars_d", "--compile", "vars_d", "--compile-backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "| vars_d+compile |" in out and "| vars_d |" in out
    block = gpu.make_block(24, 3, "vars_d+compile", torch.device("cpu"))
    assert isinstance(block, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(SystemExit, match="--compile-backend: unknown backend 'nope'"):
        gpu.main(["--device", "cpu", "--quick", "--compile", "vars_d", "--compile-backend", "nope"])


def test_gpu_check_fails_on_a_nan_or_a_wrong_device_gradient(monkeypatch):
    # the third run of each layer is the "device" one (float64 reference, CPU fp32, device fp32, device
    # float64): a NaN
    # in one of its gradients, or an error 100x the CPU's, must fail its row even where the bound comes
    # from the CPU's own fp32 error
    import torch

    gpu = load("gpu")
    original = gpu._layer_run

    for poison in (lambda t: t * float("nan"), lambda t: t + 1e-2 * t.abs().max() * torch.randn_like(t)):
        calls = []

        def run(layer, x, poison=poison, calls=calls):
            y, grads = original(layer, x)
            calls.append(1)
            if len(calls) % 4 == 3:
                name = list(grads)[-1]
                grads[name] = poison(grads[name])
            return y, grads

        monkeypatch.setattr(gpu, "_layer_run", run)
        ok, rows = gpu.check_correctness(torch.device("cpu"), True)
        assert not ok
        assert all(not err <= bound for name, err, bound in rows if "fp32 gradients" in name)


def test_gpu_script_solver_table(capsys, monkeypatch):
    # the layer's solvers on a card (issue 18's table): each solver variant is checked as a layer against float64
    # on the CPU before it is timed, and its block is compared with its own dictionary's ISTA 3 beside timm's
    gpu = load("gpu")
    assert {"vars_d", "vars_sd_dense", "vars_sd", "vars_s"} <= set(gpu.SOLVER_BLOCKS)
    for name, (base, opts) in gpu.SOLVER_VARIANTS.items():
        assert gpu.VARIANTS[name] == {**gpu.VARIANTS[base], **opts}
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--skip-training", "--skip-ode",
                     "--blocks", "vars_d,vars_d_rk4,vars_d_eq_1e-3,vars_d_dopri5_fixed6"]) == 0
    out = capsys.readouterr().out
    assert "| vars_d_rk4 layer fp32 gradients" in out and "| vars_d_eq_1e-3 layer fp32 forward" in out
    for name in ("vars_d_rk4", "vars_d_dopri5_fixed6"):  # dopri5 with a budget of attempts reads nothing either
        rows = [line.split(" | ") for line in out.splitlines() if line.startswith(f"| {name} | ")]
        assert len(rows) == 2 and all(r[-2] == "0" and r[-1].count("x") == 3 for r in rows)  # no host read; 3 ratios
    eq = [line for line in out.splitlines() if line.startswith("| vars_d_eq_1e-3 | ")]
    assert len(eq) == 2 and all(int(line.split(" | ")[-2]) > 0 for line in eq)  # a tolerance reads back
    # each variant's second call is printed as it is made (a run stopped by a time limit says how far it came)
    assert out.count("block vars_d_rk4, B ") == 2 and "0 host reads" in out
    with pytest.raises(SystemExit, match="--shapes: expected B x N pairs"):
        gpu.main(["--device", "cpu", "--shapes", "256x196,4"])
    # a wrong gradient in a solver layer on the "device" (20% in its fp32 run, 1e-6 in its float64 run) fails the gate
    original = gpu._layer_run
    for run_index in (3, 0):
        calls = []

        def run(layer, x, calls=calls, run_index=run_index):
            y, grads = original(layer, x)
            calls.append(1)
            if len(calls) % 4 == run_index:
                grads["x"] = grads["x"] * (1 + 0.2 * (x.dtype == gpu.torch.float32) + 1e-6)
            return y, grads

        monkeypatch.setattr(gpu, "_layer_run", run)
        ok, rows = gpu.check_solver_layers(gpu.torch.device("cpu"), True, ["timm", "vars_d_rk4"])
        failed = [name for name, err, bound in rows if not err <= bound]
        assert not ok and len(failed) == 1
        assert ("fp32 gradients" if run_index == 3 else "float64 forward and gradients") in failed[0]


def test_gpu_script_refuses_to_time_when_a_check_fails(monkeypatch, capsys):
    gpu = load("gpu")
    monkeypatch.setattr(gpu, "check_correctness", lambda device, quick: (False, []))
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1"]) == 1


def test_lasso_and_solver_benchmarks_run(capsys):
    load("lasso_cpu").main(["--problems", "6", "--d", "20", "--m", "12", "--repeats", "1"])
    load("lasso_cpu").main(["--problems", "3", "--d", "20", "--m", "12", "--repeats", "1", "--per-problem",
                            "--lipschitz", "power"])
    load("solvers_cpu").main(["--d", "16", "--m", "8", "--tols", "1e-4", "--solvers",
                              "ista,fista,dopri5,dopri5@native,rkc", "--problems", "3", "--max-iter", "50000",
                              "--threads", "2"])
    out = capsys.readouterr().out
    assert "float64, 2 threads" in out  # (the workers run on one; the fixture puts it back)
    with pytest.raises(SystemExit, match="--threads must be a positive integer, got 0"):
        load("solvers_cpu").main(["--threads", "0"])
    assert out.count("| vars_ode") == 16 and "default check_every" in out and "| vars_ode cd (tol 1e-09) |" in out
    assert "per problem, lam 0.1, float64, L by power" in out and "| vars_ode admm" in out
    assert "| 0.0001 | dopri5 |" in out and "| 0.0001 | dopri5@native |" in out and "| 0.0001 | rkc |" in out
    load("lasso_cpu").main(["--problems", "3", "--d", "20", "--m", "12", "--repeats", "1", "--per-problem",
                            "--atoms", "positive"])
    out = capsys.readouterr().out
    assert "P 20x12 positive per problem" in out and out.count(", metric none) |") == 3
    load("lasso_cpu").main(["--problems", "3", "--d", "20", "--m", "12", "--repeats", "1", "--per-problem",
                            "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "per problem, lam 0.1, float32" in out and "| vars_ode fista (tol 1e-05" in out
    errs = [float(line.split("|")[4]) for line in out.splitlines() if line.startswith("| vars_ode")]
    assert len(errs) == 8 and max(errs) < 1e-3  # every float32 solve near scikit-learn's float64 answer
    load("solvers_cpu").main(["--d", "16", "--m", "8", "--tols", "1e-4", "--solvers", "fista,fista:metric=none",
                              "--atoms", "positive"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.0001 | fista")]
    assert [r[1] for r in rows] == ["fista", "fista:metric=none"]
    assert int(rows[0][2]) < int(rows[1][2])  # a positive dictionary's metric saves iterations


def test_memory_benchmark_counts_bytes(capsys):
    rows, model_rows = load("memory_cpu").main(["--batch", "2", "--tokens", "16", "--model-batch", "1", "--threads", "1"])
    # the fused path with recomputation keeps less than the generic path at any size
    assert rows["VARS-D fused (recompute)"] < rows["VARS-D generic"]
    assert set(model_rows) == {"self", "vars_d"} and all(v > 0 for v in model_rows.values())
    assert "| VARS-D fused (recompute) |" in capsys.readouterr().out


def test_fused_ab_script_against_itself(capsys):
    rows = load("ab_fused").main(["--file", str(ROOT / "vars_ode" / "fused.py"), "--layers", "d,sd-dense",
                                  "--batch", "2", "--tokens", "17", "--dim", "24", "--image-size", "4",
                                  "--repeats", "2", "--threads", "1"])
    # the same code behind both layers: the same outputs and gradients, bit for bit
    assert set(rows) == {"d", "sd-dense"} and all(r["diff"] == 0 and r["paired"] > 0 for r in rows.values())
    assert "| sd-dense | 0.0e+00 |" in capsys.readouterr().out


def test_fused_ab_script_runs_the_other_version(tmp_path):
    # a changed copy (threshold 0.5 instead of 1 in the scaled shrinkage) must give other numbers
    source = (ROOT / "vars_ode" / "fused.py").read_text()
    assert "nnf.softshrink(p, 1.0)" in source
    other = tmp_path / "fused.py"
    other.write_text(source.replace("nnf.softshrink(p, 1.0)", "nnf.softshrink(p, 0.5)"))
    rows = load("ab_fused").main(["--file", str(other), "--layers", "d", "--batch", "2", "--tokens", "17",
                                  "--dim", "24", "--image-size", "4", "--repeats", "1", "--threads", "1"])
    assert rows["d"]["diff"] > 1e-3


def test_layer_ab_script_loads_the_other_revision(capsys):
    # the library at HEAD unpacked and its layer imported beside the installed one: its own classes, from a temporary
    # folder, timm's entrypoints left to the installed package; with the working tree's vars_ode unchanged from
    # HEAD, the same outputs and gradients bit for bit
    import subprocess
    import sys
    ab = load("ab_layer")
    rows = ab.main(["--rev", "HEAD", "--dicts", "d,sd", "--rows", "ista,fista-eq,admm-eq", "--batch", "2",
                    "--tokens", "17", "--dim", "24", "--repeats", "2", "--threads", "1"])
    other = sys.modules[ab.OTHER + ".layer"]
    import timm
    import vars_ode
    assert other.VARSLayer is not vars_ode.VARSLayer and ROOT not in pathlib.Path(other.__file__).parents
    assert timm.models.model_entrypoint("vars_deit_tiny").__module__ == "vars_ode.models.deit"
    assert set(rows) == {("d", "ista"), ("d", "fista-eq"), ("d", "admm-eq"), ("sd", "ista"), ("sd", "fista-eq")}
    assert all(r["paired"] > 0 and r["current"] > 0 and max(r["diff"]) < 1e-3 for r in rows.values())
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "vars_ode"], cwd=ROOT).returncode == 0
    if clean:
        assert all(r["diff"] == [0.0, 0.0] for r in rows.values())
    out = capsys.readouterr().out
    assert out.count("| sd | fista-eq |") == 1 and "| sd | admm-eq | - |" in out  # the templates form no Gram matrix
    with pytest.raises(subprocess.CalledProcessError):
        ab.load_other("no-such-revision")


def test_layer_benchmark_runs(capsys):
    res = load("layer_cpu").main(["--layers", "d", "--unfused", "--batch", "2", "--tokens", "17", "--dim", "24",
                                  "--repeats", "2", "--threads", "1"])
    assert set(res) == {"timm Attention", "VARS-D ista 3", "VARS-D ista 3 unfused"} and min(res.values()) > 0
    out = capsys.readouterr().out
    assert "paired" in out and out.count("\n") == 5  # the title, the header and three rows


def test_turn_order_puts_each_layer_in_each_position():
    turn_order = load("layer_cpu").turn_order
    for names in (["a", "b"], ["timm", "cur", "oth"], list("abcde")):
        n = len(names)
        orders = [turn_order(names, i) for i in range(2 * n)]
        assert all(sorted(o) == sorted(names) for o in orders)
        for name in names:  # every position equally often over 2 n turns
            positions = [o.index(name) for o in orders]
            assert sorted(positions) == sorted(list(range(n)) * 2)
        if n > 2:  # and not always after the same layer
            assert len({o[o.index(names[0]) - 1] for o in orders if o.index(names[0]) > 0}) > 1


def test_gpu_script_core_table_with_a_triton_sweep(capsys):
    # --core times the attention cores alone (SDPA, the PyTorch node, the Triton node at each launch
    # setting of --triton-sweep); the settings are restored after each call, and a setting the kernels
    # cannot run (24 tokens per tile: Triton's tiles are powers of two) is left out with the reason
    from vars_ode import triton_gram

    gpu = load("gpu")
    assert gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--skip-training", "--skip-ode", "--blocks",
                     "identity", "--core", "--triton-sweep", "16/4/4,24/4/4"]) == 0
    out = capsys.readouterr().out
    assert "| sdpa |" in out and "| torch node |" in out and "| triton node 16/4/4 |" in out
    assert "DeiT-Ti VARS-D heads, triton node 24/4/4: left out" in out and "| triton node 24/4/4 |" not in out
    # vars_rvt_tiny's heads, with static atoms too: the node with and without Triton
    table = out.split("attention core alone, vars_rvt_tiny VARS-SD dense heads")[1]
    assert "| torch node |" in table and "| triton node |" in table
    assert triton_gram.CONFIG["block_n"] is None and triton_gram.CONFIG["warps_solve"] is None


def test_gpu_training_table_leaves_out_a_variant_that_fails(capsys, monkeypatch):
    # a training variant that raises on the device (here: a solver the layer refuses) is left out with
    # its reason; the others are timed
    import torch

    gpu = load("gpu")
    monkeypatch.setitem(gpu.TRAIN_VARIANTS, "broken", dict(attention="vars_d", solver="no-such-solver"))
    out = gpu.training_table(torch.device("cpu"), True, 1, ["self", "broken", "vars_d"])
    assert set(out) == {"self", "vars_d"}
    assert "training variant broken: left out, ValueError" in capsys.readouterr().out
    assert gpu.graph_training_table(torch.device("cpu"), True, 1, ["vars_d"]) == {}
    assert "CUDA graphs need a CUDA device: no +graph rows" in capsys.readouterr().out


def test_gpu_graphed_training_step_is_the_eager_step():
    # the step that the +graph rows capture (capture=False on the CPU: the same step uncaptured, after its
    # warm-up) trains a model as a plain training step does: equal weights after four steps, which moved
    import timm
    import torch

    gpu = load("gpu")
    torch.manual_seed(0)
    a = timm.create_model("vars_rvt_tiny", num_classes=10, img_size=32, attention="vars_d")
    b = timm.create_model("vars_rvt_tiny", num_classes=10, img_size=32, attention="vars_d")
    start = {k: v.clone() for k, v in a.state_dict().items()}
    b.load_state_dict(start)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    opt = torch.optim.AdamW(a.parameters(), lr=1e-4)
    for _ in range(4):  # the step written out here, independently of gpu.train_step, which both tables use
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(a(images), labels)
        loss.backward()
        opt.step()
    gpu.graphed_train_step(b, images, labels, capture=False, warmup=3)()
    after_a, after_b = a.state_dict(), b.state_dict()
    for k in start:
        torch.testing.assert_close(after_b[k], after_a[k], rtol=0, atol=0, msg=k)
    assert sum(not torch.equal(after_a[k], start[k]) for k in start) > 10


def test_gpu_block_table_leaves_out_a_variant_that_fails(capsys, monkeypatch):
    # a block variant that raises on the device is left out of the timings with its reason (NaN in its
    # row); the others are timed
    import math

    import torch

    gpu = load("gpu")
    monkeypatch.setitem(gpu.VARIANTS, "broken", dict(dictionary="d", solver="ista", steps=3, lam=-1.0))
    rows = gpu.block_table(torch.device("cpu"), True, 1, ["timm", "broken", "vars_d"])
    assert "block variant broken, B 2 x N 16: left out" in capsys.readouterr().out
    for row in rows:
        assert math.isnan(row["broken"][0]) and row["vars_d"][0] > 0 and row["timm"][0] > 0


def test_gpu_by_template_block_switches_the_templates_for_its_forward_only(monkeypatch):
    # vars_sd_by_template runs the convolutional templates template by template on its device (here the CPU,
    # taken out of BY_TEMPLATE_DEVICES first), the same block as vars_sd otherwise, and restores the setting
    import torch

    import vars_ode as vo

    gpu = load("gpu")
    monkeypatch.setattr(vo.dictionaries, "BY_TEMPLATE_DEVICES", set())
    torch.manual_seed(0)
    block = gpu.make_block(24, 3, "vars_sd_by_template", torch.device("cpu"))
    plain = gpu.make_block(24, 3, "vars_sd", torch.device("cpu"))
    plain.load_state_dict(block.block.state_dict())
    x = torch.randn(2, 17, 24, requires_grad=True)

    def names(out):
        seen, stack = set(), [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                stack += [f for f, _ in fn.next_functions]
        return {type(f).__name__ for f in seen}

    out, ref = block(x), plain(x)
    assert vo.dictionaries.BY_TEMPLATE_DEVICES == set()
    assert "_TemplateConvBackward" in names(out) and "_TemplateConvBackward" not in names(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g, gr = torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


def test_ode_memory_benchmark_counts_what_the_graph_keeps(capsys):
    # toy size: the ODE node keeps less for its backward pass than autograd through the same rk4 steps, the
    # discrete adjoint less than the unrolled dopri5, and an unknown row is named
    bench = load("ode_memory_cpu")
    res = bench.main(["--batch", "2", "--tokens", "17", "--dim", "24", "--heads", "2",
                      "--rows", "ista 3,rk4,rk4 torchdiffeq-unroll,dopri5,dopri5 adjoint,eq 1e-3 implicit,"
                      "eq 1e-3 implicit recompute"])
    assert min(res.values()) > 0  # (the equilibrium layer's memory at two tolerances: tests/test_layer.py)
    assert res["rk4"] < res["rk4 torchdiffeq-unroll"] and res["dopri5 adjoint"] < res["dopri5"]
    # the equilibrium with its dictionary built again in the backward pass keeps less
    assert res["eq 1e-3 implicit recompute"] < 0.9 * res["eq 1e-3 implicit"]
    assert capsys.readouterr().out.count("| dopri5 adjoint |") == 1
    with pytest.raises(SystemExit, match="unknown row"):
        bench.main(["--rows", "rk5"])



def test_layer_solvers_benchmark_runs(capsys):
    bench = load("layer_solvers_cpu")
    shape = ["--dim", "16", "--heads", "2", "--batch", "2", "--tokens", "17", "--repeats", "1", "--threads", "1"]
    res = bench.main(["--dicts", "d,s", "--rows", "ista,euler,fista-eq,admm-eq,admm-eq:form=correction,timm",
                      "--tol", "1e-3"] + shape)
    out = capsys.readouterr().out
    # both equilibrium rows reach the tolerance; ADMM is refused for the convolutional atoms (no Gram matrix), with
    # the reason in the table
    for row in ("fista-eq", "admm-eq", "admm-eq:form=correction"):
        assert res[("d", row)]["residual"] <= 1e-3 and res[("d", row)]["ratio"] > 0
    assert res[("d", "euler")]["work"] == 6 and ("d", "timm") in res
    # ista<N> rows take N steps
    res = bench.main(["--dicts", "d", "--rows", "ista,ista1,ista7"] + shape)
    assert res[("d", "ista1")]["work"] == 1 and res[("d", "ista7")]["work"] == 7 and res[("d", "ista")]["work"] == 3
    assert "| s | admm-eq | - |" in out and "Gram matrix" in out
    # a row's solver options reach the solver: an unknown one is refused by name, a malformed one by the parser
    bench.main(["--dicts", "d", "--rows", "ista,admm-eq:colour=red"] + shape)
    assert "colour" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="key=value"):
        bench.main(["--dicts", "d", "--rows", "admm-eq:form"] + shape)
    # options.NAME sets an integrator option: a budget of attempts spends exactly that many (1 + 6 evaluations each)
    # and reads nothing from the device
    res = bench.main(["--dicts", "d", "--rows", "ista,dopri5,dopri5:options.fixed_attempts=7"] + shape)
    assert res[("d", "dopri5:options.fixed_attempts=7")]["work"] == 1 + 6 * 7
    assert res[("d", "dopri5:options.fixed_attempts=7")]["reads"] == 0 < res[("d", "dopri5")]["reads"]


def test_study_rows_benchmark_runs(capsys):
    # real Fashion-MNIST images (the package the study needs), a tiny batch, one repeat; the equilibrium row
    # reports its layers' iterations
    bench = load("study_rows_cpu")
    bench.main(["vars_d", "vars_d_eq", "--images", "4", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| vars_d")]
    assert len(rows) == 2 and rows[0].endswith("| 3, 3, 3, 3 |")
    eq_iters = [int(v) for v in rows[1].split("|")[3].split(",")]
    assert len(eq_iters) == 4 and min(eq_iters) > 3


def test_ode_tail_benchmark_compares_the_tail_with_the_whole_batch(capsys):
    # notebook 07's trained models on a few test images: the same evaluations both ways, the same logits
    rows = load("ode_tail_cpu").main(["--images", "6", "--repeats", "1", "--threads", "1", "--method", "bosh3",
                                      "--horizon", "2"])
    assert [r["model"] for r in rows] == ["VARS-D", "VARS-SD"]
    for r in rows:
        assert len(r["evaluations"]) == 4 and min(r["evaluations"]) > 1 and r["diff"] <= 1e-5
        assert r["tail"] > 0 and r["whole"] > 0
    assert "| VARS-SD |" in capsys.readouterr().out
    rows = load("ode_tail_cpu").main(["--images", "4", "--repeats", "1", "--threads", "1", "--models", "VARS-D",
                                      "--backward"])
    assert rows[0]["diff"] <= 1e-5 and len(rows[0]["evaluations"]) == 4


def test_ode_budget_benchmark_reports_what_each_budget_forced(capsys):
    # notebook 07's trained models on a few test images: the loop first (nothing to force), then budgets; a budget of
    # one attempt forces every problem of every layer, a large one none and gives the loop's logits
    rows = load("ode_budget_cpu").main(["--images", "4", "--threads", "1", "--budgets", "1,12", "--models", "VARS-D"])
    assert [r["budget"] for r in rows] == [None, 1, 12]
    loop, one, many = rows
    assert loop["forced"] == [None] * 4 and loop["diff"] == 0.0
    assert one["forced"] == [1.0] * 4 and one["evaluations"] == [7] * 4 and one["diff"] > 1e-3
    assert many["forced"] == [0.0] * 4 and many["diff"] <= 1e-6 and many["evaluations"] == [73] * 4
    assert "| VARS-D | 12 |" in capsys.readouterr().out
    # the calibration table: budgets from the first batch, the other batches against the loop
    rows = load("ode_budget_cpu").main(["--images", "6", "--threads", "1", "--budgets", "", "--models", "VARS-SD",
                                        "--calibrate", "0,3", "--batch", "2"])
    loop, none, roomy = rows
    assert loop["budget"] is None and none["spare"] == 0 and roomy["spare"] == 3
    assert [b + 3 for b in none["budgets"]] == roomy["budgets"] and len(roomy["forced"]) == 2
    assert roomy["forced"] == [0.0, 0.0] and roomy["diff"] <= 1e-6


def test_unrolled_steady_benchmark_runs(capsys):
    bench = load("unrolled_steady_cpu")
    assert bench.main(["--dim", "8", "--heads", "1", "--tokens", "10", "--max-iters", "150", "--caps", "none,0.05",
                       "--signals", "3", "--tols", "1e-3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| dopri5 |", "| bosh3 |"))]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
        ("dopri5", "none", "150"), ("dopri5", "0.05", "150"), ("bosh3", "none", "150")]
    assert "| 0.001 |" in out
    # the cap reaches the layer's integration: with steps of at most 0.05 the same budget gets less far
    residual = {r[2].strip(): float(r[5]) for r in rows if r[1].strip() == "dopri5"}
    assert residual["0.05"] > residual["none"]


def test_compiled_steady_benchmark_runs(capsys):
    bench = load("compiled_steady_cpu")
    assert bench.main(["--signals", "4", "--tols", "1e-3", "--methods", "bosh3", "--repeats", "1",
                       "--backend", "aot_eager", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines() if line.startswith("| 0.001 |")}
    assert set(rows) == {"fista", "bosh3", "bosh3+compile"}
    # aot_eager runs the traced operations as they are: the compiled row is the eager one
    assert rows["bosh3+compile"][4] == rows["bosh3"][4] and float(rows["bosh3+compile"][6]) < 1e-12


def test_steady_stalls_benchmark_runs(capsys):
    # a named draw that stalls without the remedy (tests/test_native.py) shows as one unconverged signal without it
    # and none with it
    bench = load("steady_stalls_cpu")
    assert bench.main(["--draws", "1", "--methods", "bosh3", "--also", "1294:0.0625", "--max-iter", "6000"]) == 0
    out = capsys.readouterr().out
    row = next(line.split("|") for line in out.splitlines() if line.startswith("| bosh3 |"))
    assert [c.strip() for c in row[2:5]] == ["14", "1", "0"]
    assert "- seed 1294, lam 0.0625, bosh3: without: 1 unconverged" in out


def test_continuous_adjoint_benchmark_runs(capsys):
    # the refusal's measure and the gradient's distance, for a horizon it allows and one it refuses
    bench = load("continuous_adjoint_cpu")
    assert bench.main(["--methods", "dopri5", "--horizons", "3,8"]) == 0
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:6]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| dopri5 |")}
    assert rows["3"][1] == "no" and float(rows["3"][0]) < 1 and float(rows["3"][2]) < 0.05
    assert rows["8"][1] == "yes" and float(rows["8"][0]) > 5 and float(rows["8"][2]) > 1


def test_float32_rtol_benchmark_runs(capsys):
    # in float32 dopri8's default rtol to tol 1e-6 is its floor, 1e-5 (ode.FLOAT32_RTOL_FLOOR): the two rows agree
    bench = load("float32_rtol_cpu")
    assert bench.main(["--methods", "dopri8", "--tols", "1e-6", "--rtols", "default,1e-5,1e-7", "--dictionaries",
                       "gaussian", "--seeds", "1", "--signals", "2", "--max-iter", "6000"]) == 0
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[4:7]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| dopri8 |")}
    assert list(rows) == ["default", "1e-5", "1e-7"]
    assert rows["default"] == rows["1e-5"] and rows["default"][0] == "2 of 2"
    assert rows["1e-7"][0] != "2 of 2"
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.main(["--dictionaries", "gausian"])


def test_the_ab_scripts_remove_the_other_version_at_exit(tmp_path):
    # each load of another revision unpacks it into a temporary folder; the process removes it when it exits
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import ab_fused, ab_layer; "
            "print(ab_layer.load_other('HEAD').__file__); print(ab_fused.load_other('HEAD', None).__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [pathlib.Path(line) for line in r.stdout.split()]
    assert len(files) == 2 and all(f.name in ("layer.py", "fused_other.py") for f in files)
    assert not any(f.exists() or f.parent.exists() for f in files)


def test_swap_solvers_benchmark_runs(capsys, tmp_path):
    # notebook 07's trained VARS-D with cd swapped in (no unrolled gradient: set_solver takes grad="implicit") beside
    # FISTA: the two equilibria give the same predictions; a rerun reads its rows back from --out
    import json

    bench = load("swap_solvers_cpu")
    out = tmp_path / "rows.jsonl"
    args = ["--solvers", "fista,cd", "--kinds", "VARS-D", "--images", "8", "--tols", "1e-3", "--reference-tol", "1e-3",
            "--out", str(out)]
    assert bench.main(args) == 0
    first = capsys.readouterr().out
    rows = {(r["solver"], r["steps"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {("fista", 3), ("fista", None), ("cd", 3), ("cd", None)}
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert rows[("cd", None)]["clean_pred"] == rows[("fista", None)]["clean_pred"]
    # (within float32's rounding of tol: cd solves in float64 and hands back a float32 code)
    assert rows[("cd", None)]["residual"] < 1.01e-3 and rows[("cd", None)]["work"] > 3
    assert bench.main(args) == 0
    assert capsys.readouterr().out == first and len(out.read_text().splitlines()) == 4  # nothing solved again
    with pytest.raises(ValueError, match=r"--solvers: unknown \['newton'\]"):
        bench.main(["--solvers", "newton"])
