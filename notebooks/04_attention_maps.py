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
# # 04 - Attention maps across iterations on real photographs
#
# A VARS-D-like head without training: tokens are 16x16 patches of scikit-image photographs, queries a fixed random projection of the flattened patches (L2-normalised), the dynamic dictionary their positive random features, values another fixed projection. ISTA runs step by step from `u = Phi^T x` (step 0 decodes to `Phi Phi^T X`, the self-attention output of Eq. 14). The attention map of a step is the share of each token in the reconstruction, `a_i = mean_mu |(Phi U)_i^mu|`, normalised to sum to one (the definition of `vars_ode.attention_maps`, computed here by hand so the notebook needs no model). Do the maps sharpen (entropy per step)? How stable are they under gaussian noise, blur and contrast loss (correlation with the clean map)?

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(side=128, patch=16, h=32, m=64, C=32, steps=8, lam=0.3,
                     images=("astronaut", "chelsea", "rocket")),
       "large": dict(side=224, patch=16, h=64, m=128, C=64, steps=30, lam=0.3,
                     images=("astronaut", "chelsea", "coffee", "rocket"))}
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm.auto outside a widget frontend

import matplotlib.pyplot as plt
import numpy as np
import torch

import vars_ode
import vars_ode.plot as vp

torch.set_num_threads(1)   # small problems: a second thread only adds synchronisation
DT = torch.float64
assert SIZE in CFG, f"SIZE must be one of {list(CFG)}"
cfg = CFG[SIZE]
print("SIZE =", SIZE, cfg)

from vars_ode.dictionaries import positive_random_features

from _vars_d_head import ista_path  # notebooks/_vars_d_head.py

import scipy.ndimage as ndi
from skimage import data
from skimage.transform import resize

S, p = cfg["side"], cfg["patch"]
n_side = S // p
gen = torch.Generator().manual_seed(0)
R_q = torch.randn(3 * p * p, cfg["h"], generator=gen, dtype=DT) / math.sqrt(3 * p * p)   # query map
R_v = torch.randn(3 * p * p, cfg["C"], generator=gen, dtype=DT) / math.sqrt(3 * p * p)   # value map
W_rf = torch.randn(cfg["h"], cfg["m"], generator=gen, dtype=DT)                            # random features

def load(name):
    img = getattr(data, name)()
    return resize(img, (S, S), anti_aliasing=True).astype(np.float64)     # in [0, 1]

def tokens(img):
    t = torch.from_numpy(img).reshape(n_side, p, n_side, p, 3).permute(0, 2, 1, 3, 4).reshape(n_side**2, -1)
    return t - t.mean()                                                      # centred patch features

def maps(img, steps=cfg["steps"], lam=cfg["lam"]):
    T = tokens(img)
    Q = torch.nn.functional.normalize(T @ R_q, dim=-1)
    Phi = positive_random_features(Q, W_rf)                # atoms of unit norm over the tokens
    X = T @ R_v
    out = []
    for U in ista_path(Phi, X, lam, steps):
        a = (Phi @ U).abs().mean(dim=1)                  # as vars_ode.attention_maps: mean over channels of |P u|
        out.append((a / a.sum().clamp_min(1e-300)).reshape(n_side, n_side))
    return torch.stack(out)

def entropy(mp):
    q = mp.reshape(mp.shape[0], -1).clamp_min(1e-300)
    return -(q * q.log()).sum(-1) / math.log(q.shape[-1])       # normalised: 1 = uniform

CORRUPT = {
    "gaussian noise": lambda im: np.clip(im + np.random.default_rng(0).normal(0, 0.15, im.shape), 0, 1),
    "blur": lambda im: ndi.gaussian_filter(im, sigma=(2.5, 2.5, 0)),
    "contrast": lambda im: (im - im.mean()) * 0.35 + im.mean(),
}

# %% [markdown]
# ## Maps sharpening across iterations

# %%
images = {n: load(n) for n in cfg["images"]}
clean = {n: maps(im) for n, im in images.items()}
show = [0, 1, 2, 3, cfg["steps"]]
fig, ax = plt.subplots(len(images), len(show) + 1, figsize=(2.4 * (len(show) + 1), 2.3 * len(images)))
for r, (n, im) in enumerate(images.items()):
    ax[r, 0].imshow(im)
    ax[r, 0].set_title(n, fontsize=9)
    ax[r, 0].axis("off")
    # the maps over the photograph, one colour scale per row (vars_ode.plot.attention_overlay)
    vp.attention_overlay(im, clean[n], steps=show, ax=ax[r, 1:], alpha=0.7)
    ax[r, 1].set_title("step 0 (Eq. 14)", fontsize=9)
plt.show()
ent = {n: entropy(mp) for n, mp in clean.items()}
fig, ax = plt.subplots(figsize=(6, 3.5))
for n in images:
    ax.plot(range(cfg["steps"] + 1), ent[n], "o-", label=n)
ax.set(xlabel="ISTA step", ylabel="normalised entropy of the map", title="sharpening")
ax.legend()
plt.show()


# %% [markdown]
# ## Stability under corruptions
#
# Pearson correlation between the map of the corrupted image and the clean map, at step 0 (self-attention-like) and after each step.

# %%
def corr(a, b):
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))

stab = {c: np.array([[corr(maps(fn(images[n]))[k], clean[n][k]) for k in range(cfg["steps"] + 1)]
                     for n in images]) for c, fn in CORRUPT.items()}
fig, ax = plt.subplots(1, len(CORRUPT) + 1, figsize=(4.2 * (len(CORRUPT) + 1), 3.5))
for i, (c, fn) in enumerate(CORRUPT.items()):
    ax[i].plot(range(cfg["steps"] + 1), stab[c].T, alpha=0.6)
    ax[i].plot(range(cfg["steps"] + 1), stab[c].mean(0), "k-o", lw=2, label="mean")
    ax[i].set(title=c, xlabel="ISTA step", ylabel="corr(corrupted map, clean map)")
    ax[i].legend()
ax[-1].imshow(CORRUPT["gaussian noise"](images[cfg["images"][0]]))
ax[-1].set_title("gaussian noise example")
ax[-1].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusions (computed)

# %%
K_ = cfg["steps"]
e0 = np.mean([float(ent[n][0]) for n in images])
eK = np.mean([float(ent[n][K_]) for n in images])
mono = sum(bool((ent[n].diff() <= 1e-12).all()) for n in images)
print(f"1. Mean normalised entropy of the maps: {e0:.3f} at step 0 (Eq. 14), {float(np.mean([float(ent[n][3]) for n in images])):.3f} "
      f"at step 3, {eK:.3f} at step {K_}; "
      f"{'sharper' if eK < e0 - 0.05 else 'barely sharper (drop below 0.05)' if eK < e0 else 'not sharper'} after iterating, "
      f"lowest on average at step {int(np.argmin(np.mean([ent[n].numpy() for n in images], 0)))}; "
      f"entropy non-increasing at every step for {mono}/{len(images)} images.")
for c in CORRUPT:
    m0, m3, mK = stab[c][:, 0].mean(), stab[c][:, 3].mean(), stab[c][:, K_].mean()
    verdict = "more" if mK > m0 else "less"
    print(f"2. {c}: mean correlation with the clean map {m0:.3f} at step 0, {m3:.3f} at step 3, {mK:.3f} at step {K_} "
          f"({verdict} stable after iterating).")
print("Note: untrained random projections; this probes the mechanism (sparse selection of coherent atoms), "
      "not the trained models of the paper.")
