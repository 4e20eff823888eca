# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 - Inside a trained model
#
# Two small vision transformers trained on Fashion-MNIST with VARS attention (`vars_ode.VARSLayer`):
# VARS-D (dynamic dictionary) and VARS-SD (dynamic and learned static atoms over the token grid), both
# trained with the paper's 3 unrolled ISTA steps. Once trained, what do the dynamics do?
#
# 1. How do the attention maps evolve across iterations on test images, clean and under gaussian noise?
# 2. How far from the LASSO equilibrium is each layer after k steps (KKT residual, sparsity)?
# 3. What happens to accuracy, clean and corrupted, when the solver is swapped at test time
#    (`layer.set_solver`): ISTA with other step counts, FISTA, dopri5 over several horizons, the equilibrium?
#
# Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (or `$FASHION_MNIST_DIR`). The models
# are trained once (a few CPU minutes) and cached in `notebooks/checkpoints/`; later runs load them.

# %% tags=["parameters"]
# Parameters: "small" runs in seconds once the checkpoints exist (the test suite uses it); "large" for closer study;
# "tiny" trains in seconds (the test suite checks the training path with it).
SIZE = "small"

# %%
CFG = {"tiny": dict(dim=16, depth=1, heads=2, train_images=256, epochs=1, batch=128, lr=2e-3, seed=0,
                    eval_images=16, map_images=1, noise=0.3, max_steps=3),
       "small": dict(dim=64, depth=4, heads=4, train_images=60_000, epochs=1, batch=128, lr=2e-3, seed=0,
                     eval_images=64, map_images=1, noise=0.3, max_steps=8),
       "large": dict(dim=96, depth=6, heads=4, train_images=60_000, epochs=5, batch=128, lr=2e-3, seed=0,
                     eval_images=5000, map_images=4, noise=0.3, max_steps=12)}
import math
import os
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm.auto outside a widget frontend

import matplotlib.pyplot as plt
import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

import vars_ode
import vars_ode.plot as vp
from vars_ode.robustness import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

torch.set_num_threads(1)   # small models: a second thread only adds synchronisation
assert SIZE in CFG, f"SIZE must be one of {list(CFG)}"
cfg = CFG[SIZE]
print("SIZE =", SIZE, cfg)
CKPT = Path(os.environ.get("VARS_ODE_CHECKPOINTS", "checkpoints"))
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
KINDS = {"VARS-D": dict(dictionary="d"), "VARS-SD": dict(dictionary="sd", static="dense", grid_size=(7, 7))}


def build(kind):
    """A ViT for 28x28 images: 4x4 patches (a 7x7 token grid and a class token), VARS attention with lam 0.3
    and 3 ISTA steps from the encoding P^T v, as in the paper."""
    layer = vars_ode.VARSLayer.configure(lam=0.3, steps=3, solver="ista", init="encode", **KINDS[kind])
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=cfg["dim"],
                             depth=cfg["depth"], num_heads=cfg["heads"], mlp_ratio=2.0, attn_layer=layer)


def vars_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, vars_ode.VARSLayer)}


def set_solver(model, solver, solver_options=None, **kw):
    """The same solver in every VARS layer (options not given are reset)."""
    for layer in vars_layers(model).values():
        layer.set_solver(solver, solver_options=solver_options or {}, **kw)


def normalise(x):
    return (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def train(kind, path):
    """AdamW with a one-cycle schedule, random crops with 2-pixel padding and flips; saves fp16 weights."""
    imgs, labels = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(cfg["seed"])
    idx = torch.randperm(len(imgs), generator=g)[:cfg["train_images"]]
    X = torch.from_numpy(imgs[idx.numpy()]).float().div(255).unsqueeze(1)
    Y = torch.from_numpy(labels[idx.numpy()])
    torch.manual_seed(cfg["seed"])
    model = build(kind)
    steps = cfg["epochs"] * (len(X) // cfg["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.1)
    losses, t0 = [], time.perf_counter()
    model.train()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(X), generator=g)
        for i in range(len(X) // cfg["batch"]):
            b = order[i * cfg["batch"]:(i + 1) * cfg["batch"]]
            xb = torch.nn.functional.pad(X[b], (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
            xb = xb[..., dy:dy + 28, dx:dx + 28]
            if bool(torch.rand((), generator=g) < 0.5):
                xb = xb.flip(-1)
            loss = torch.nn.functional.cross_entropy(model(normalise(xb)), Y[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(dict(state=state, losses=losses, seconds=time.perf_counter() - t0, cfg=cfg), path)


def load(kind):
    path = CKPT / f"fmnist_{kind.lower().replace('-', '_')}_{SIZE}.pt"
    if not path.exists():
        print(f"training {kind} ({cfg['train_images']} images x {cfg['epochs']} epochs) -> {path}")
        train(kind, path)
    ck = torch.load(path, weights_only=True)  # tensors, numbers, strings: nothing in the file runs
    model = build(kind)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()})
    return model.eval(), ck


models, info = {}, {}
for kind in KINDS:
    models[kind], ck = load(kind)
    last = np.mean(ck["losses"][-20:])
    info[kind] = dict(loss=last, seconds=ck["seconds"], params=sum(p.numel() for p in models[kind].parameters()))
    print(f"{kind}: {info[kind]['params']:,} parameters, trained on {cfg['train_images']} images x {cfg['epochs']} "
          f"epoch(s), final training loss {last:.3f}")

# %% [markdown]
# Test images (the first `eval_images` of the test split) and their corrupted copies: gaussian noise of
# standard deviation `noise` on pixels in [0, 1], clipped.

# %%
test_imgs, test_labels = load_fashion_mnist("test")
Xte = torch.from_numpy(test_imgs[:cfg["eval_images"]]).float().div(255).unsqueeze(1)
Yte = torch.from_numpy(test_labels[:cfg["eval_images"]])
noise = torch.randn(Xte.shape, generator=torch.Generator().manual_seed(1)) * cfg["noise"]
Xnoisy = (Xte + noise).clamp(0, 1)
SETS = {"clean": normalise(Xte), "noisy": normalise(Xnoisy)}


@torch.no_grad()
def evaluate(model, X, batch=256):
    """Accuracy, and the mean work per layer and forward pass (iterations or function evaluations)."""
    correct, work = 0, []
    for i in range(0, len(X), batch):
        correct += int((model(X[i:i + batch]).argmax(-1) == Yte[i:i + batch]).sum())
        work.append(np.mean([float(l.last_stats.iterations.double().mean()) for l in vars_layers(model).values()]))
    return correct / len(X), float(np.mean(work))


for kind, model in models.items():
    set_solver(model, "ista", steps=3)
    acc = {name: evaluate(model, X)[0] for name, X in SETS.items()}
    info[kind].update(acc_clean=acc["clean"], acc_noisy=acc["noisy"])
    print(f"{kind} as trained (ISTA, 3 steps): accuracy {acc['clean']:.3f} clean, {acc['noisy']:.3f} noisy")

# %% [markdown]
# ## 1. Attention maps across iterations
#
# `vars_ode.attention_maps` records, for every VARS layer, the map of each iterate: the mean over heads and
# channels of `|P u_t|` at each token. Here the last block, with the solver set to `max_steps` ISTA steps
# (3 in training), drawn by `vars_ode.plot.attention_overlay` over the image; each row a model and an input.

# %% tags=["figure:trained_attention_maps"]
set_steps = cfg["max_steps"]
last_block = None
fig, axs = plt.subplots(2 * len(models) * cfg["map_images"], set_steps,
                        figsize=(1.9 * set_steps + 0.8, 2.0 * 2 * len(models) * cfg["map_images"]))
row, map_stats = 0, {}
for kind, model in models.items():
    set_solver(model, "ista", steps=set_steps)
    for name, X in SETS.items():
        maps = vars_ode.attention_maps(model, X[:cfg["map_images"]])
        last_block = list(maps)[-1]
        m = maps[last_block]
        map_stats[(kind, name)] = m
        for j in range(cfg["map_images"]):
            raw = Xte if name == "clean" else Xnoisy
            vp.attention_overlay(raw[j, 0], m[j], ax=axs[row], alpha=0.65, first_step=1)
            axs[row, 0].set_ylabel(f"{kind}\n{name}: {CLASSES[int(Yte[j])]}", fontsize=8)
            row += 1
plt.show()


def map_entropy(m):
    q = m / m.sum(-1, keepdim=True)
    return (-(q * q.clamp_min(1e-30).log()).sum(-1) / math.log(m.shape[-1]))


def map_corr(a, b):
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


T = map_stats[(next(iter(models)), "clean")].shape[1]
print(f"{last_block}: {T} recorded iterates per forward pass")
for kind in models:
    ent = map_entropy(map_stats[(kind, "clean")]).mean(0)
    corr = map_corr(map_stats[(kind, "clean")], map_stats[(kind, "noisy")]).mean(0)
    print(f"{kind}: normalised map entropy (1 = uniform) by iterate {[round(v, 3) for v in ent.tolist()]}; "
          f"correlation of the noisy map with the clean one {[round(v, 3) for v in corr.tolist()]}")

# %% [markdown]
# ## 2. Distance to the equilibrium, per layer and step
#
# ISTA with k = 1 .. `max_steps` steps on the clean test images: the KKT residual of each layer's LASSO
# (`layer.last_stats.residual`, mean over problems) and the sparsity and active-set size of its codes
# (`vars_ode.plot.code_statistics`). Step 3 is the trained setting.

# %%
ks = list(range(1, cfg["max_steps"] + 1))
X0 = SETS["clean"][:128]
per_layer = {}
for kind, model in models.items():
    stats = {name: [] for name in vars_layers(model)}
    for k in ks:
        set_solver(model, "ista", steps=k)
        with torch.no_grad():
            model(X0)
        for name, layer in vars_layers(model).items():
            st = layer.last_stats
            stats[name].append(dict(residual=float(st.residual.double().mean()), stats=st,
                                    sparsity=float(st.sparsity), nnz=float(st.nnz.double().mean())))
    per_layer[kind] = stats
fig, axs = plt.subplots(len(models), 3, figsize=(17, 3.6 * len(models)), squeeze=False)
for r, (kind, stats) in enumerate(per_layer.items()):
    for i, (name, rows_) in enumerate(stats.items()):
        axs[r, 0].semilogy(ks, [x["residual"] for x in rows_], "o-", ms=4, color=f"C{i}", label=name)
    axs[r, 0].axvline(3, color="grey", lw=0.5)
    axs[r, 0].set(xlabel="ISTA steps k", ylabel="mean KKT residual", title=f"{kind}: distance to the equilibrium")
    axs[r, 0].legend(fontsize=7)
    vp.code_statistics({name: [x["stats"] for x in rows_] for name, rows_ in stats.items()}, steps=ks, ax=axs[r, 1:])
    axs[r, 1].set_title(f"{kind}: sparsity")
    axs[r, 2].set_title(f"{kind}: active-set size")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Swapping the solver at test time
#
# Every VARS layer of a trained model gets the same solver (`layer.set_solver`); accuracy on the clean and on
# the noisy test images against the work per layer and forward pass (ISTA / FISTA iterations; dopri5 function
# evaluations over a horizon in ISTA-step units, rtol 1e-2; FISTA to a KKT residual of 1e-2 for the equilibrium).

# %% tags=["figure:test_time_solvers"]
VARIANTS = ([("ista", dict(steps=k)) for k in (1, 2, 3, 4, 6, 8)] + [("fista", dict(steps=k)) for k in (3, 8)]
            + [("dopri5", dict(steps=float(h), solver_options=dict(rtol=1e-2))) for h in (1, 3, 8)]
            + [("equilibrium", dict(steps=None, tol=1e-2))])
swap = {}
for kind, model in models.items():
    for solver, kw in VARIANTS:
        set_solver(model, "fista" if solver == "equilibrium" else solver, **kw)
        res = {name: evaluate(model, X) for name, X in SETS.items()}
        swap[(kind, solver, kw.get("steps"))] = dict(clean=res["clean"][0], noisy=res["noisy"][0],
                                                     work=res["clean"][1], work_noisy=res["noisy"][1])
    set_solver(model, "ista", steps=3)
fig, axs = plt.subplots(1, len(models), figsize=(7 * len(models), 4.2), squeeze=False)
marker = {"ista": "o-", "fista": "s-", "dopri5": "^-", "equilibrium": "*"}
for a, kind in zip(axs[0], models):
    for i, cond in enumerate(("clean", "noisy")):
        for solver in marker:
            pts = [(v["work"], v[cond]) for (k_, s_, _), v in swap.items() if k_ == kind and s_ == solver]
            w, acc = zip(*pts)
            a.plot(w, acc, marker[solver], color=f"C{i}", ms=9 if solver == "equilibrium" else 5,
                   alpha=1.0 if solver == "ista" else 0.8, label=f"{solver}, {cond}")
    t = swap[(kind, "ista", 3)]
    a.plot([t["work"]], [t["clean"]], "ko", mfc="none", ms=13, label="as trained (ISTA, 3)")
    a.set(xscale="log", xlabel="work per layer (iterations or function evaluations)", ylabel="accuracy",
          title=f"{kind}: test-time solver")
    a.legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
print(f"{'model':>8} {'solver':>12} {'steps':>6} {'work':>8} {'clean':>6} {'noisy':>6}")
for (kind, solver, steps), v in swap.items():
    print(f"{kind:>8} {solver:>12} {str(steps):>6} {v['work']:8.1f} {v['clean']:6.3f} {v['noisy']:6.3f}")

# %% [markdown]
# ## Conclusions (computed)

# %%
for kind in models:
    t, eq = swap[(kind, "ista", 3)], swap[(kind, "equilibrium", None)]
    best = max((v["clean"], s, st) for (k_, s, st), v in swap.items() if k_ == kind)
    worst = min((v["clean"], s, st) for (k_, s, st), v in swap.items() if k_ == kind)
    res = per_layer[kind]
    r3 = [rows_[2]["residual"] for rows_ in res.values()]
    r8 = [rows_[-1]["residual"] for rows_ in res.values()]
    print(f"1. {kind}: accuracy {t['clean']:.3f} clean and {t['noisy']:.3f} under gaussian noise ({cfg['noise']:g}) as "
          f"trained (3 ISTA steps); at the equilibrium (FISTA, {eq['work']:.0f} iterations per layer on average) "
          f"{eq['clean']:.3f} and {eq['noisy']:.3f}.")
    print(f"2. {kind}: across the {len(VARIANTS)} test-time solvers, clean accuracy from {worst[0]:.3f} "
          f"({worst[1]}, {worst[2]}) to {best[0]:.3f} ({best[1]}, {best[2]}); dopri5 over 3 units "
          f"{swap[(kind, 'dopri5', 3.0)]['clean']:.3f} with {swap[(kind, 'dopri5', 3.0)]['work']:.0f} evaluations.")
    print(f"3. {kind}: mean KKT residual per layer after 3 steps {[round(v, 3) for v in r3]}, after "
          f"{cfg['max_steps']} {[round(v, 3) for v in r8]} (the equilibrium: 0).")
    ent = map_entropy(map_stats[(kind, "clean")]).mean(0)
    corr = map_corr(map_stats[(kind, "clean")], map_stats[(kind, "noisy")]).mean(0)
    print(f"4. {kind}: map entropy {float(ent[0]):.3f} at the first iterate, {float(ent[-1]):.3f} at the last; "
          f"correlation of noisy and clean maps {float(corr[0]):.3f} then {float(corr[-1]):.3f}.")
