"""Unit tests of vars_ode.robustness against hand-computed cases."""
from __future__ import annotations

import gzip
import math
import random
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from vars_ode.robustness import (ALEXNET_ERRORS, DatasetError, NormalizedModel, SegmentationMeter, TensorImageDataset,
                                 accuracy, attention_maps, check_image_folder, check_train_val_root,
                                 corruption_error, create_model, evaluate, fgsm_attack, imagenet_c_folders,
                                 imagenet_subset_indices, imagenet_subset_mask, load_fashion_mnist, mask_logits,
                                 mean_corruption_error, mean_std, normalize_map, nss, pgd_attack, read_idx)


# ------------------------------------------------------------------------------------------------
# mCE
# ------------------------------------------------------------------------------------------------
def test_mce_by_hand():
    errors = {"gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9], "fog": [0.2, 0.2, 0.2, 0.2, 0.2]}
    # by hand: CE_gauss = 0.7 / 0.886428, CE_fog = 0.2 / 0.819324
    ce_g, ce_f = 0.7 / 0.886428, 0.2 / 0.819324
    mce, ces = mean_corruption_error(errors)
    assert ces["gaussian_noise"] == pytest.approx(100 * ce_g, rel=1e-12)
    assert ces["fog"] == pytest.approx(100 * ce_f, rel=1e-12)
    assert mce == pytest.approx(100 * (ce_g + ce_f) / 2, rel=1e-12)
    assert mce == pytest.approx(51.6895, abs=1e-4)  # 100 * (0.789686 + 0.244104) / 2


def test_mce_pairs_by_name_not_order():
    a = mean_corruption_error({"fog": [0.4] * 5, "snow": [0.6] * 5})
    b = mean_corruption_error({"snow": [0.6] * 5, "fog": [0.4] * 5})
    assert a[0] == pytest.approx(b[0])
    assert a[1]["snow"] == pytest.approx(100 * 0.6 / ALEXNET_ERRORS["snow"])


def test_mce_per_severity_baseline_and_unnormalised():
    # CE = sum_s E_s / sum_s B_s
    assert corruption_error([0.1, 0.3], [0.2, 0.6]) == pytest.approx(0.5)
    mce, ces = mean_corruption_error({"x": [0.1, 0.3], "y": [0.5, 0.5]}, baseline=None)
    assert ces == {"x": pytest.approx(20.0), "y": pytest.approx(50.0)} and mce == pytest.approx(35.0)
    mce, _ = mean_corruption_error({"x": [0.1, 0.3]}, baseline={"x": [0.2, 0.6]})
    assert mce == pytest.approx(50.0)


def test_mce_errors():
    with pytest.raises(ValueError, match="no baseline"):
        mean_corruption_error({"speckle_noise": [0.5] * 5})
    with pytest.raises(ValueError):
        mean_corruption_error({})
    with pytest.raises(ValueError):
        corruption_error([0.1, 0.2], [0.3])


def test_alexnet_table_is_the_published_one():
    assert len(ALEXNET_ERRORS) == 15
    assert ALEXNET_ERRORS["gaussian_noise"] == 0.886428 and ALEXNET_ERRORS["jpeg_compression"] == 0.606500
    assert ALEXNET_ERRORS["brightness"] == 0.564592 and ALEXNET_ERRORS["elastic_transform"] == 0.646056


# ------------------------------------------------------------------------------------------------
# 200-class masks and accuracy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "r"])
def test_subset_indices_match_timm_files(name):
    text = resources.files("timm.data").joinpath("_info", f"imagenet_{name}_indices.txt").read_text()
    expected = [int(t) for t in text.split()]
    idx = imagenet_subset_indices(name)
    assert idx == expected and len(idx) == 200
    mask = imagenet_subset_mask(name)
    assert mask.shape == (1000,) and mask.sum() == 200 and mask[idx].all()


def test_known_members_of_the_subsets():
    a, r = imagenet_subset_indices("a"), imagenet_subset_indices("r")
    assert a[:3] == [6, 11, 13]  # stingray, goldfinch, junco
    assert 1 in r and 0 not in r  # goldfish in ImageNet-R, tench not
    with pytest.raises(ValueError):
        imagenet_subset_indices("c")


def test_mask_logits_changes_prediction():
    idx = imagenet_subset_indices("r")
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 10.0           # best overall class 0 is not in ImageNet-R
    logits[0, idx[5]] = 5.0       # best among the 200: position 5
    logits[1, idx[7]] = 5.0
    targets = torch.tensor([5, 7])
    assert accuracy(logits.index_select(1, torch.tensor(idx)), targets)[0] == 100.0
    assert torch.equal(mask_logits(logits, idx), logits[:, idx])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[: x.shape[0]]

    loader = [(torch.zeros(2, 3, 4, 4), targets)]
    assert evaluate(Fixed(), loader, class_indices=idx)["acc1"] == 100.0
    assert evaluate(Fixed(), loader)["acc1"] == 0.0


def test_accuracy_topk_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.2, 0.35, 0.45]])
    targets = torch.tensor([2, 0, 1, 0])
    top1, top2 = accuracy(logits, targets, (1, 2))
    assert top1 == pytest.approx(25.0)    # only sample 1
    assert top2 == pytest.approx(75.0)    # samples 0, 1, 2


# ------------------------------------------------------------------------------------------------
# PGD / FGSM
# ------------------------------------------------------------------------------------------------
def _linear_binary(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, d, generator=g))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin), lin


def test_pgd_on_linear_model_is_sign_of_weight_difference():
    # For a binary linear classifier the CE gradient w.r.t. x is p_other (w_other - w_true): its sign
    # does not depend on x, so the optimal L-inf attack is x + eps sign(w_other - w_true). From any
    # start in the ball, 5 steps of eps/2 saturate the projection at exactly that point.
    model, lin = _linear_binary()
    x = 0.1 + 0.8 * torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0])
    w = lin.weight.detach()
    direction = torch.sign(w[1 - y] - w[y]).view(4, 1, 3, 4)
    eps = 1 / 255
    expected = x + eps * direction
    adv = pgd_attack(model, x, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(fgsm_attack(model, x, y), expected, rtol=0, atol=1e-7)
    # without random start, one step of eps is FGSM too
    torch.testing.assert_close(pgd_attack(model, x, y, step_size=eps, steps=1, random_start=False), expected,
                               rtol=0, atol=1e-7)
    # and the loss went up for every sample
    ce = nn.functional.cross_entropy
    assert (ce(model(adv), y, reduction="none") > ce(model(x), y, reduction="none")).all()


def test_pgd_projection_and_clamp():
    model, lin = _linear_binary(d=6, seed=5)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.3]]).view(1, 1, 2, 3)
    y = torch.tensor([0])
    eps = 8 / 255
    adv = pgd_attack(model, x, y, eps=eps, step_size=2 / 255, steps=10)
    assert (adv - x).abs().max() <= eps + 1e-7
    assert adv.min() >= 0 and adv.max() <= 1
    w = lin.weight.detach()
    expected = (x + eps * torch.sign(w[1] - w[0]).view_as(x)).clamp(0, 1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_pgd_defaults_and_input_checks():
    model, _ = _linear_binary()
    x = torch.rand(2, 1, 3, 4)
    adv = pgd_attack(model, x, torch.tensor([0, 1]))
    assert (adv - x).abs().max() <= 1 / 255 + 1e-7
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd_attack(model, x * 3 - 1, torch.tensor([0, 1]))
    params_before = [p.clone() for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))


def test_normalized_model_attack_in_pixel_space():
    model, lin = _linear_binary()
    mean, std = (0.5,), (0.25,)
    net = NormalizedModel(model, mean, std)
    x = 0.1 + 0.8 * torch.rand(3, 1, 3, 4)
    torch.testing.assert_close(net(x), model((x - 0.5) / 0.25))
    y = torch.tensor([1, 0, 1])
    w = lin.weight.detach()
    expected = x + (1 / 255) * torch.sign(w[1 - y] - w[y]).view(3, 1, 3, 4)  # std > 0 keeps the sign
    torch.testing.assert_close(pgd_attack(net, x, y), expected, rtol=0, atol=1e-7)


def _official_attack(model, x_n, y, steps, alpha, random_init=False):
    """The official evaluation's attack (bfshi/VARS engine.py), rewritten here: signed-gradient steps
    in normalised space with per-channel eps / std and step / std, clamped to the ball and to the
    normalised images of [0, 1]."""
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    eps, alpha = (1 / 255) / std, alpha / std
    lo, hi = (0 - mean) / std, (1 - mean) / std
    adv = torch.max(torch.min(x_n.clone(), hi), lo)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(adv), y), adv)
        adv = adv.detach() + alpha * g.sign()
        adv = torch.max(torch.min(adv, x_n + eps), x_n - eps)
        adv = torch.max(torch.min(adv, hi), lo)
    return adv


def test_attacks_match_the_official_normalised_space_formulation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5)).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net = NormalizedModel(model, mean, std)
    x = torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))
    to_n = lambda p: (p - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # noqa: E731
    ours_pgd = pgd_attack(net, x, y, random_start=False)  # eps 1/255, 5 steps of 0.5/255
    torch.testing.assert_close(to_n(ours_pgd), _official_attack(model, to_n(x), y, 5, 0.5 / 255), rtol=0, atol=1e-5)
    ours_fgsm = fgsm_attack(net, x, y)  # eps 1/255, one step of 1/255
    torch.testing.assert_close(to_n(ours_fgsm), _official_attack(model, to_n(x), y, 1, 1 / 255), rtol=0, atol=1e-5)
    assert (ours_pgd - x).abs().max() > 0.9 / 255  # the attack moved the images


def test_attack_lowers_accuracy_of_evaluate():
    model, lin = _linear_binary(d=4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.5]))
    # class 0 iff x0 > 0.5; samples at 0.501 flip under eps 1/255, samples at 0.9 do not
    x = torch.tensor([[0.501, 0, 0, 0], [0.9, 0, 0, 0]]).view(2, 1, 2, 2)
    y = torch.tensor([0, 0])
    loader = [(x, y)]
    assert evaluate(model, loader)["acc1"] == 100.0
    assert evaluate(model, loader, attack=lambda m, a, b: pgd_attack(m, a, b))["acc1"] == 50.0


# ------------------------------------------------------------------------------------------------
# NSS
# ------------------------------------------------------------------------------------------------
def test_nss_by_hand():
    s = np.array([[0.0, 1.0], [2.0, 3.0]])
    # mean 1.5, population std sqrt(1.25); fixation on the 3 -> (3 - 1.5) / sqrt(1.25)
    fix = np.array([[0, 0], [0, 1]])
    assert nss(s, fix) == pytest.approx(1.5 / math.sqrt(1.25))
    # two fixations, on 1 and 3: mean of (-0.5, 1.5) / sqrt(1.25)
    fix2 = np.array([[0, 1], [0, 1]])
    assert nss(s, fix2) == pytest.approx(0.5 / math.sqrt(1.25))
    assert nss(s, np.array([[0, 1], [1, 1]])) == pytest.approx(0.5 / math.sqrt(1.25))  # coordinates
    assert nss(s, fix, ddof=1) == pytest.approx(1.5 / math.sqrt(5 / 3))
    assert nss(torch.tensor(s), torch.tensor(fix)) == pytest.approx(1.5 / math.sqrt(1.25))
    assert nss(np.ones((3, 3)), np.eye(3)) == 0.0
    assert math.isnan(nss(s, np.zeros((2, 2))))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10), st.floats(-5, 5), st.integers(0, 2**31 - 1))
def test_nss_invariant_to_affine_rescaling(a, b, seed):
    rng = np.random.default_rng(seed)
    s = rng.random((5, 6))
    fix = rng.random((5, 6)) > 0.7
    if fix.any():
        assert nss(a * s + b, fix) == pytest.approx(nss(s, fix), abs=1e-9)


# ------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------
def test_segmentation_meter_by_hand():
    att = torch.tensor([[0.0, 10.0, 2.0], [5.0, 3.0, 1.0]])
    # normalised: [[0, 1, .2], [.5, .3, .1]] -> foreground >= 0.3: [[0, 1, 0], [1, 1, 0]]
    target = torch.tensor([[0, 7, 7], [255, 0, 0]])
    # valid pixels: (0,0) bg pred bg -> TN; (0,1) fg pred fg -> TP; (0,2) fg pred bg -> FN;
    # (1,0) void; (1,1) bg pred fg -> FP; (1,2) bg pred bg -> TN
    m = SegmentationMeter()
    m.update(att, target)
    assert (m.tp, m.fp, m.fn, m.tn) == (1, 1, 1, 2)
    r = m.compute()
    assert r["IoU_fg"] == pytest.approx(100 / 3) and r["IoU_bg"] == pytest.approx(50.0)
    assert r["mIoU"] == pytest.approx((100 / 3 + 50) / 2)
    assert r["FP"] == pytest.approx(100 / 3) and r["FN"] == pytest.approx(50.0)
    # accumulation over images: the counts add up
    m.update(att[None], target[None])
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 2, 2, 4)
    with pytest.raises(ValueError):
        m.update(att, target[:1])


def test_normalize_map():
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    n = normalize_map(m)
    torch.testing.assert_close(n[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


# ------------------------------------------------------------------------------------------------
# dataset readers
# ------------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.idx" + (".gz" if gz else ""))
    _write_idx(p, arr, gz)
    assert np.array_equal(read_idx(p), arr)
    lab = np.array([3, 1, 4], dtype=np.uint8)
    _write_idx(tmp_path / "l", lab, False)
    assert np.array_equal(read_idx(tmp_path / "l"), lab)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DatasetError, match="bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_any_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), True)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n), False)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")


def test_real_fashion_mnist_installed():
    """Needs the Debian package dataset-fashion-mnist (fails, not skips, when it is missing)."""
    try:
        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
    except DatasetError as e:
        pytest.fail(f"Fashion-MNIST is not installed: {e}")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10


def _img_tree(root: Path, classes, n=1):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / c / f"{i}.png")


def test_check_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        check_image_folder(tmp_path / "empty")
    _img_tree(tmp_path / "ok", ["a", "b"])
    (tmp_path / "ok" / "c").mkdir()
    (tmp_path / "ok" / "c" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="contain no image"):
        check_image_folder(tmp_path / "ok")
    _img_tree(tmp_path / "ok", ["c"])
    assert check_image_folder(tmp_path / "ok") == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="differ"):
        check_image_folder(tmp_path / "ok", expected_classes=["a", "b"])


def test_check_train_val_and_imagenet_c(tmp_path):
    _img_tree(tmp_path / "d" / "train", ["a", "b"])
    with pytest.raises(DatasetError, match="val/"):
        check_train_val_root(tmp_path / "d")
    _img_tree(tmp_path / "d" / "val", ["a"])
    with pytest.raises(DatasetError, match="missing"):
        check_train_val_root(tmp_path / "d")
    _img_tree(tmp_path / "d" / "val", ["b"])
    assert check_train_val_root(tmp_path / "d") == ["a", "b"]
    for s in (1, 2, 3, 4):
        _img_tree(tmp_path / "c" / "fog" / str(s), ["a", "b"])
    with pytest.raises(DatasetError, match="severity folder"):
        imagenet_c_folders(tmp_path / "c")
    _img_tree(tmp_path / "c" / "fog" / "5", ["a", "b"])
    found = imagenet_c_folders(tmp_path / "c")
    assert [(c, s) for c, s, _ in found] == [("fog", s) for s in range(1, 6)]
    with pytest.raises(DatasetError, match="missing"):
        imagenet_c_folders(tmp_path / "c", corruptions=["snow"])


def test_tensor_image_dataset():
    ds = TensorImageDataset(np.full((2, 3, 3), 255, np.uint8), np.array([1, 2]))
    x, y = ds[1]
    assert x.shape == (1, 3, 3) and float(x.max()) == 1.0 and int(y) == 2


def test_corrupt_images_needs_imagecorruptions_and_is_reproducible():
    """Needs `pip install imagecorruptions-imaug` (fails, not skips, when it is missing)."""
    from vars_ode.robustness import corrupt_images, require_imagecorruptions
    try:
        require_imagecorruptions()
    except ImportError as e:
        pytest.fail(str(e))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = corrupt_images(imgs, "gaussian_noise", 3, seed=7)
    assert np.array_equal(np.random.get_state()[1], state)  # global RNG untouched
    b = corrupt_images(imgs, "gaussian_noise", 3, seed=7)
    assert a.shape == imgs.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, imgs)
    # brightness raises the mean
    assert corrupt_images(imgs, "brightness", 5).mean() > imgs.mean()


# ------------------------------------------------------------------------------------------------
# models and attention maps
# ------------------------------------------------------------------------------------------------
def _tiny_vit(**kw):
    return create_model("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, embed_dim=16, depth=2,
                        num_heads=2, **kw)


def test_create_model_rejects_vars_options_on_plain_timm():
    with pytest.raises(ValueError, match="does not accept attention"):
        _tiny_vit(attention="vars_sd")
    with pytest.raises(ValueError, match="not registered"):
        create_model("no_such_model_xyz")


def test_attention_map_fallback_matches_explicit_softmax():
    # a model without VARS layers: vars_ode.attention_maps refuses it, and the hooks take over
    torch.manual_seed(0)
    model = _tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    # reference: timm's non-fused path exposes the softmax matrix to attn_drop
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    model(x)
    h.remove()
    ref = seen["a"].mean(dim=(1, 2))[:, 1:].reshape(2, 4, 4)
    got = attention_maps(model, x, size=(4, 4), normalize=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    full = attention_maps(model, x)
    assert full.shape == (2, 16, 16) and full.min() == 0 and full.max() == 1


def test_attention_maps_use_library_function_when_present(monkeypatch):
    import vars_ode.layer
    monkeypatch.setattr(vars_ode.layer, "attention_maps",
                        lambda m, x: torch.arange(4.0).view(1, 2, 2).repeat(len(x), 1, 1))
    out = attention_maps(nn.Identity(), torch.zeros(3, 3, 2, 2), normalize=False)
    torch.testing.assert_close(out, torch.arange(4.0).view(1, 2, 2).repeat(3, 1, 1))


def test_seeded_python_random_untouched_by_readers(tmp_path):
    random.seed(5)
    before = random.getstate()
    _img_tree(tmp_path / "x", ["a"])
    check_image_folder(tmp_path / "x")
    assert random.getstate() == before


def test_attention_maps_reduce_library_dict_output(monkeypatch):
    """vars_ode.attention_maps returns {layer: (B, T, N)}: last layer, last iteration, prefix dropped."""
    import vars_ode.layer
    per_layer = {"blocks.0.attn": torch.zeros(2, 3, 5), "blocks.1.attn": torch.rand(2, 3, 5)}
    monkeypatch.setattr(vars_ode.layer, "attention_maps", lambda m, x: per_layer)
    model = nn.Identity()
    model.num_prefix_tokens = 1
    out = attention_maps(model, torch.zeros(2, 3, 2, 2), normalize=False)
    torch.testing.assert_close(out, per_layer["blocks.1.attn"][:, -1, 1:].reshape(2, 2, 2))


# ----------------------------------------------------------------------------------------------
# the study's statistics
# ----------------------------------------------------------------------------------------------
def test_paired_seed_interval_is_the_t_interval_from_the_table():
    from vars_ode.robustness.study import paired_seed_interval
    d = [1.0, 2.5, 0.4]
    m, s = np.mean(d), np.std(d, ddof=1)
    t975_2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile (printed tables)
    mean, lo, hi = paired_seed_interval(d)
    assert mean == pytest.approx(m)
    assert (lo, hi) == pytest.approx((m - t975_2 * s / np.sqrt(3), m + t975_2 * s / np.sqrt(3)), rel=1e-9)
    assert paired_seed_interval([0.7]) == (0.7, None, None)
    assert paired_seed_interval([2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="empty"):
        paired_seed_interval([])


@settings(max_examples=20, deadline=None)
@given(p=st.floats(0.05, 0.95), n=st.integers(2_000, 6_000), seed=st.integers(0, 2**16))
def test_bootstrap_interval_matches_the_normal_interval_for_large_samples(p, n, seed):
    """For a mean of n independent {-1, 0, 1} differences the bootstrap interval is close to
    mean +- 1.96 sd / sqrt(n), and it contains the sample mean."""
    from vars_ode.robustness.study import bootstrap_interval
    rng = np.random.default_rng(seed)
    d = (rng.random(n) < p).astype(float) - (rng.random(n) < 0.5).astype(float)
    mean, lo, hi = bootstrap_interval(d, n_resamples=2000, seed=seed)
    half = 1.959964 * d.std(ddof=1) / np.sqrt(n)
    assert lo <= mean <= hi and mean == pytest.approx(d.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.12)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.15 * half)


def test_attention_entropy_uniform_one_hot_and_prefix():
    from vars_ode.robustness.study import attention_entropy
    maps = torch.zeros(2, 3, 1 + 16)
    maps[:, 0, 1:] = 1.0                  # uniform over the 16 patches
    maps[:, 1, 5] = 3.0                   # all on one patch
    maps[:, 2, 1:9] = 2.0                 # uniform over half of them
    maps[:, :, 0] = 100.0                 # the class token is dropped
    h = attention_entropy(maps)
    assert h.tolist() == pytest.approx([np.log(16), 0.0, np.log(8)], abs=1e-12)


def test_verdict_reads_the_intervals():
    from vars_ode.robustness.study import verdict
    c = lambda lo, hi, ilo, ihi: {"seed_ci": [lo, hi], "image_ci": [ilo, ihi]}  # noqa: E731
    assert verdict(c(0.2, 1.0, 0.1, 0.9)).startswith("higher than self-attention")
    assert verdict(c(-2.0, -0.1, -1.0, -0.5)).startswith("lower than self-attention")
    assert "not supported" in verdict(c(-0.5, 1.0, 0.1, 0.9))
    assert verdict(c(-0.5, 1.0, -0.1, 0.9)) == "no difference supported"
    assert verdict(c(None, None, 0.1, 0.9)).startswith("one seed pair")


def test_batch_augment_is_a_per_image_crop_and_flip():
    """Each image is its own zero-padded crop (offsets 0..2p) and flip, then normalised; checked against
    slicing each image by hand with the same random draws."""
    from vars_ode.robustness import BatchAugment
    x = torch.rand(64, 2, 9, 7)
    aug = BatchAugment(2, True, (0.3, 0.5), (0.2, 0.4))
    torch.manual_seed(3)
    out = aug(x)
    torch.manual_seed(3)
    i, j, f = torch.randint(0, 5, (64, 1, 1, 1)), torch.randint(0, 5, (64, 1, 1, 1)), torch.rand(64) < 0.5
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(64):
        ref = xp[k, :, int(i[k]):int(i[k]) + 9, int(j[k]):int(j[k]) + 7]
        ref = ref.flip(-1) if f[k] else ref
        ref = (ref - torch.tensor([0.3, 0.5]).view(2, 1, 1)) / torch.tensor([0.2, 0.4]).view(2, 1, 1)
        assert torch.equal(out[k], ref), k
    assert set(i.flatten().tolist()) == set(range(5)) and 10 < int(f.sum()) < 54
    assert aug(x[0]).shape == (2, 9, 7)


def test_tensor_dataset_applies_a_batched_transform_once_per_batch():
    from vars_ode.robustness import BatchAugment
    imgs = np.random.default_rng(0).integers(0, 256, (10, 6, 6)).astype(np.uint8)
    ds = TensorImageDataset(imgs, np.arange(10), BatchAugment(0, False, (0.5,), (0.25,)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=10)))
    ref = torch.stack([ds[k][0] for k in range(10)])
    assert torch.allclose(batch[0], ref) and batch[1].tolist() == list(range(10))
    assert torch.allclose(ref, (torch.from_numpy(imgs).float()[:, None] / 255 - 0.5) / 0.25)
