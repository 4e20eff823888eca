"""Host models: timm registration, every host x attention, Table 2 parameter counts, Performer against
the official quadratic formula, and official-checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm  # noqa: E402

import vars_ode  # noqa: E402  (registers the entrypoints)
from vars_ode.models import (ATTENTIONS, MODEL_NAMES, ConvEmbedding, ConvPatchEmbed, PerformerAttention,  # noqa: E402
                             load_official_checkpoint)


HOST_ATTENTIONS = [(name, att) for name in MODEL_NAMES
                   for att in ATTENTIONS + (("gfnet",) if name == "vars_gfnet_tiny" else ())]
# shallow versions for the build / gradient test (the full depth is covered by the counts below)
SHALLOW = {"vars_deit_tiny": dict(depth=2), "vars_gfnet_tiny": dict(depth=2), "vars_rvt_tiny": dict(depth=(2, 1))}

# Paper Table 2 parameters (M); DeiT* and RVT* are the Performer rows, GFNet-Ti* the global filter
TABLE2_PARAMS = {
    ("vars_deit_tiny", "performer"): 5.7, ("vars_deit_tiny", "vars_s"): 6.8,
    ("vars_deit_tiny", "vars_d"): 5.4, ("vars_deit_tiny", "vars_sd"): 5.8,
    ("vars_gfnet_tiny", "gfnet"): 7.5, ("vars_gfnet_tiny", "vars_s"): 7.5,
    ("vars_gfnet_tiny", "vars_d"): 9.8, ("vars_gfnet_tiny", "vars_sd"): 10.4,
    ("vars_rvt_tiny", "performer"): 8.6, ("vars_rvt_tiny", "vars_s"): 9.2,
    ("vars_rvt_tiny", "vars_d"): 8.0, ("vars_rvt_tiny", "vars_sd"): 9.2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_entrypoints_registered_with_timm():
    names = set(timm.list_models("vars_*"))
    assert set(MODEL_NAMES) <= names
    for name in MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and not cfg.url


@pytest.mark.parametrize("name,attention", HOST_ATTENTIONS)
def test_every_host_and_attention_builds_and_trains(name, attention):
    torch.manual_seed(0)
    model = timm.create_model(name, attention=attention, num_classes=5, img_size=32, in_chans=2, **SHALLOW[name])
    assert model.pretrained_cfg["architecture"] == name
    x = torch.randn(2, 2, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("patch_embed"))


def _count(name, attention, **kw):
    with torch.device("meta"):
        model = timm.create_model(name, attention=attention, num_classes=1000, img_size=224, **kw)
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


@pytest.mark.parametrize("name,attention", sorted(TABLE2_PARAMS))
def test_parameter_counts_match_table2(name, attention):
    paper = TABLE2_PARAMS[(name, attention)]
    ours = _count(name, attention)
    assert abs(ours / paper - 1) <= 0.15, f"{name} {attention}: {ours:.2f}M vs paper {paper}M"


@pytest.mark.parametrize("attention", ["vars_d", "vars_sd"])
def test_official_rvt_parameter_counts_match_table2(attention):
    ours = _count("vars_rvt_tiny", attention, compat="official")
    assert abs(ours / TABLE2_PARAMS[("vars_rvt_tiny", attention)] - 1) <= 0.05, ours


def test_softmax_hosts_match_the_original_models():
    # the original DeiT-Ti has 5.7M parameters and RVT-Ti 8.6M (Table 2, non-starred rows)
    assert abs(_count("vars_deit_tiny", "self") / 5.7 - 1) < 0.05
    assert abs(_count("vars_rvt_tiny", "self") / 8.6 - 1) < 0.05


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unknown_attention_names_the_argument_and_the_choices(name):
    with pytest.raises(ValueError) as err:
        timm.create_model(name, attention="softmax", img_size=32, num_classes=3)
    msg = str(err.value)
    assert "attention" in msg and "softmax" in msg
    for choice in ATTENTIONS:
        assert repr(choice) in msg
    if name == "vars_gfnet_tiny":
        assert "'gfnet'" in msg


def test_layer_keywords_for_softmax_attention_are_rejected():
    with pytest.raises(ValueError, match="attention='self' takes no layer keyword"):
        timm.create_model("vars_deit_tiny", attention="self", lam=0.1, img_size=32, num_classes=3, depth=1)


def test_layer_keywords_reach_every_vars_layer():
    from vars_ode.layer import VARSLayer

    model = timm.create_model("vars_rvt_tiny", attention="vars_d", lam=0.1, num_step=2, img_size=32,
                              num_classes=3, depth=(1, 1))
    layers = [m for m in model.modules() if isinstance(m, VARSLayer)]
    assert len(layers) == 2
    assert all(m.lam == 0.1 and m.steps == 2 and m.dictionary_kind == "d" for m in layers)
    with pytest.raises(ValueError, match="num_step"):
        timm.create_model("vars_rvt_tiny", attention="vars_d", num_step=2, steps=3, img_size=32, depth=(1, 1))


def test_performer_matches_the_official_quadratic_formula():
    """Independent reference: the official Performer_Attention forms the N x N matrix of
    random-feature similarities of L2-normalised q and k and L1-normalises its rows."""
    torch.manual_seed(0)
    B, N, C, H = 2, 10, 12, 3
    attn = PerformerAttention(C, num_heads=H, qkv_bias=True).double()
    x = torch.randn(B, N, C, dtype=torch.float64)
    ours = attn(x)

    d = C // H
    m = attn.rand_matrix.shape[-1]
    assert m == 2 * d
    qkv = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    def feat(t):
        t = F.normalize(t * d ** -0.25, dim=-1)
        return torch.exp(t @ attn.rand_matrix - t.norm(dim=-1, keepdim=True) ** 2 / 2) / math.sqrt(m)

    a = F.normalize(feat(q) @ feat(k).transpose(-2, -1), p=1, dim=-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_performer_without_normalisation_estimates_softmax_attention():
    torch.manual_seed(0)
    B, N, C, H = 1, 16, 16, 1
    attn = PerformerAttention(C, num_heads=H, normalize_qk=False, num_random_features=20000).double()
    x = 0.3 * torch.randn(B, N, C, dtype=torch.float64)
    qkv = attn.qkv(x).reshape(B, N, 3, H, C).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    exact = attn.proj((torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C), -1) @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), exact, rtol=0, atol=0.05)


def test_conv_stems():
    stem = ConvPatchEmbed(img_size=224, patch_size=16, in_chans=3, embed_dim=192)
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 48, 96, 192, 192]  # Xiao et al. (2021), 1 GF model
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 196, 192)
    with pytest.raises(ValueError, match="patch_size"):
        ConvPatchEmbed(patch_size=12)
    assert ConvEmbedding.output_size(224) == 14
    assert ConvEmbedding(3, 192)(torch.randn(1, 3, 224, 224)).shape == (1, 192, 14, 14)


@pytest.mark.parametrize("side, patch", [(28, 16), (30, 4), (17, 8), (33, 2), (32, 16)])
def test_conv_stem_grid_is_what_its_convolutions_give(side, patch):
    # each stride-2 convolution rounds up: a side that is not a multiple of the patch keeps a partial patch, and the
    # grid the model is built for (positions, VARS's token grid) must count it
    for pad in (False, True):
        stem = ConvPatchEmbed(img_size=(side, side + 1), patch_size=patch, in_chans=1, embed_dim=8,
                              dynamic_img_pad=pad)
        maps = stem.proj(torch.randn(1, 1, side, side + 1))
        assert stem.grid_size == tuple(maps.shape[-2:]) == stem.dynamic_feat_size((side, side + 1))
        assert stem(torch.randn(2, 1, side, side + 1)).shape == (2, stem.num_patches, 8)


def test_host_at_a_size_that_is_not_a_multiple_of_its_patch():
    # Fashion-MNIST's 28 px with the default patch of 16: a 2 x 2 grid, not a crash in the position embedding
    for attention in ("vars_d", "vars_sd", "vars_s"):  # the static atoms are defined on that grid
        model = timm.create_model("vars_deit_tiny", attention=attention, num_classes=10, in_chans=1, img_size=28,
                                  embed_dim=16, depth=1, num_heads=2)
        assert model.pos_embed.shape[1] == 1 + 4
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    plain = timm.create_model("vars_deit_tiny", attention="vars_s", conv_stem=False, num_classes=10, in_chans=1,
                              img_size=28, embed_dim=16, depth=1, num_heads=2)  # timm's patchify: one patch
    assert plain.pos_embed.shape[1] == 1 + 1 and plain(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_rvt_mlp_type_is_explicit():
    model = timm.create_model("vars_rvt_tiny", attention="self", mlp_type=("conv", "linear"), img_size=32,
                              num_classes=3, depth=(1, 1))
    assert model.transformers[0].blocks[0].mlp.fc1.weight.dim() == 4
    assert model.transformers[1].blocks[0].mlp.fc1.weight.dim() == 2
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()
    with pytest.raises(ValueError, match="mlp_type"):
        timm.create_model("vars_rvt_tiny", attention="self", mlp_type="mixer", img_size=32, depth=(1, 1))


# ----------------------------------------------------------------------------------------------
# Official checkpoints


def official_rvt_tiny_shapes(attention, image_size=224, num_classes=1000):
    """Key -> shape of the official ``rvt_tiny`` state dict (bfshi/VARS ``rvt/robust_models.py`` with
    ``vars_block.py``'s ``VARS_D_Block`` / ``VARS_SD_Block``), transcribed from the official module
    structure, independently of vars_ode's code."""
    shapes = {}

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["patch_embed.proj.0.weight"] = (32, 3, 7, 7)
    shapes["patch_embed.proj.0.bias"] = (32,)
    bn("patch_embed.proj.1", 32)
    shapes["patch_embed.proj.3.weight"] = (192, 32, 4, 4)
    shapes["patch_embed.proj.3.bias"] = (192,)
    for stage, (base_dim, heads, depth) in enumerate([(32, 6, 10), (32, 12, 2)]):
        dim, hidden = base_dim * heads, 4 * base_dim * heads
        m = 2 * base_dim                                    # rand_feat_dim_ratio 2
        fmap = image_size // (16 * 2 ** stage)              # official feature_map_size
        for i in range(depth):
            p = f"transformers.{stage}.blocks.{i}."
            shapes[p + "norm1.weight"] = shapes[p + "norm1.bias"] = (dim,)
            shapes[p + "attn.qkv.weight"] = (2 * dim, dim)
            shapes[p + "attn.qkv.bias"] = (2 * dim,)
            shapes[p + "attn.proj.weight"] = (dim, dim)
            shapes[p + "attn.proj.bias"] = (dim,)
            shapes[p + "attn.rand_matrix"] = (heads, base_dim, m)
            shapes[p + "attn.L"] = (heads,)
            mm = m if attention == "vars_d" else 2 * m
            shapes[p + "attn.learned_k"] = (mm, mm)
            shapes[p + "attn.learned_lam"] = (1,)
            shapes[p + "attn.learned_L"] = (1,)
            if attention == "vars_sd":
                shapes[p + "attn.kernel"] = (1, heads, fmap ** 2, m)
            shapes[p + "norm2.weight"] = shapes[p + "norm2.bias"] = (dim,)
            shapes[p + "mlp.fc1.weight"] = (hidden, dim, 1, 1)
            shapes[p + "mlp.fc1.bias"] = (hidden,)
            bn(p + "mlp.bn1", hidden)
            shapes[p + "mlp.dwconv.weight"] = (hidden, 1, 3, 3)
            shapes[p + "mlp.dwconv.bias"] = (hidden,)
            bn(p + "mlp.bn2", hidden)
            shapes[p + "mlp.fc2.weight"] = (dim, hidden, 1, 1)
            shapes[p + "mlp.fc2.bias"] = (dim,)
            bn(p + "mlp.bn3", dim)
    shapes["pools.0.conv.weight"] = (384, 1, 3, 3)
    shapes["pools.0.conv.bias"] = (384,)
    shapes["norm.weight"] = shapes["norm.bias"] = (384,)
    shapes["head.weight"] = (num_classes, 384)
    shapes["head.bias"] = (num_classes,)
    return shapes


def _official_model(attention, seed, img_size=32, num_classes=4):
    torch.manual_seed(seed)
    return timm.create_model("vars_rvt_tiny", attention=attention, compat="official", img_size=img_size,
                             num_classes=num_classes)


def _official_checkpoint(attention, img_size=32, num_classes=4, seed=123):
    """A checkpoint laid out as the official main.py saves it under DDP, with random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_rvt_tiny_shapes(attention, img_size, num_classes).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(("learned_lam", "learned_L")):
            sd[k] = 1 + 0.1 * torch.rand(shape, generator=g)
        elif k.endswith("learned_k"):
            sd[k] = torch.eye(shape[0]) + 0.01 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 299, "args": None}


@pytest.mark.parametrize("attention", ["vars_d", "vars_sd"])
def test_official_key_names_and_shapes(attention):
    for img_size in (32, 224):
        with torch.device("meta"):
            model = timm.create_model("vars_rvt_tiny", attention=attention, compat="official", img_size=img_size)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == official_rvt_tiny_shapes(attention, img_size)


@pytest.mark.parametrize("attention", ["vars_d", "vars_sd"])
def test_official_checkpoint_round_trip(attention, tmp_path):
    ckpt = _official_checkpoint(attention)
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)

    a = load_official_checkpoint(_official_model(attention, seed=1), path).eval()
    for k, v in a.state_dict().items():
        assert torch.equal(v, ckpt["model"]["module." + k]), k
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        la = a(x)
    assert torch.isfinite(la).all()

    # the dict itself, as saved by vars_ode, into a fresh model: identical logits
    saved = {"model": {"module." + k: v for k, v in a.state_dict().items()}}
    c = load_official_checkpoint(_official_model(attention, seed=3), saved).eval()
    with torch.no_grad():
        assert torch.equal(c(x), la)

    # timm's own loading path: pretrained=True with a local file
    d = timm.create_model("vars_rvt_tiny", attention=attention, compat="official", img_size=32, num_classes=4,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    with torch.no_grad():
        assert torch.equal(d(x), la)


def test_mismatched_checkpoint_names_keys_and_shapes():
    ckpt = _official_checkpoint("vars_d")
    sd = ckpt["model"]
    sd["module.transformers.0.blocks.3.attn.learned_k"] = torch.eye(5)
    del sd["module.transformers.1.blocks.1.mlp.bn3.running_mean"]
    sd["module.transformers.0.blocks.0.attn.extra"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(_official_model("vars_d", seed=0), ckpt)
    msg = str(err.value)
    assert "transformers.0.blocks.3.attn.learned_k: checkpoint (5, 5) vs model (64, 64)" in msg
    assert "missing keys (1): transformers.1.blocks.1.mlp.bn3.running_mean" in msg
    assert "unexpected keys (1): transformers.0.blocks.0.attn.extra" in msg

    # a VARS-SD checkpoint into a VARS-D model: every static-atom key is reported
    with pytest.raises(ValueError, match=r"unexpected keys \(12\): transformers\.0\.blocks\.0\.attn\.kernel"):
        load_official_checkpoint(_official_model("vars_d", seed=0), _official_checkpoint("vars_sd"))
    with pytest.raises(ValueError, match="key must be one of"):
        load_official_checkpoint(_official_model("vars_d", seed=0), ckpt, key="ema")


def _official_rvt_forward(sd, x, attention, lam, num_step):
    """The official rvt_tiny forward in eval mode, transcribed from bfshi/VARS (robust_models.py:
    conv_embedding, Transformer, conv_head_pooling, PoolingTransformer; vars_block.py: Mlp,
    to_random_feature, VARS_D / VARS_SD at commit 651eb51) as plain functional code."""
    def bn(y, p):
        return F.batch_norm(y, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    def attn(t, p, heads):
        B, N, C = t.shape
        d = C // heads
        rand = sd[p + "rand_matrix"]
        m = rand.shape[-1]
        qkv = F.linear(t, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(B, N, 2, heads, d).permute(2, 0, 3, 1, 4)
        q, v = qkv[0], qkv[1]
        q = F.normalize(q * d ** -0.25, dim=-1)
        q = torch.exp(q @ rand - q.norm(dim=-1, keepdim=True) ** 2 / 2) / m ** 0.5
        if attention == "vars_sd":
            q = torch.cat([q, sd[p + "kernel"].repeat(B, 1, 1, 1)], dim=-1)
        q = F.normalize(q, p=2, dim=-2)
        kk = q.transpose(-2, -1) @ q
        inp = q.transpose(-2, -1) @ v
        L = kk.norm(p=1, dim=-1).max(dim=-1)[0][..., None, None] + 1
        lam_l = sd[p + "learned_lam"] * lam
        L_l = L / sd[p + "learned_L"]
        kk_l = sd[p + "learned_k"][None, None] @ kk @ sd[p + "learned_k"]
        u = torch.sign(inp) * F.gelu(inp.abs() - lam_l)
        for _ in range(num_step):
            u = u - (kk_l @ u - inp) / L_l
            u = torch.sign(u) * F.gelu(u.abs() - lam_l / L_l)
        out = (q @ u).transpose(1, 2).reshape(B, N, C)
        return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])

    def mlp(t, p, H, W):
        B, N, C = t.shape
        y = t.reshape(B, H, W, C).permute(0, 3, 1, 2)
        y = F.gelu(bn(F.conv2d(y, sd[p + "fc1.weight"], sd[p + "fc1.bias"]), p + "bn1"))
        hidden = y.shape[1]
        y = F.gelu(bn(F.conv2d(y, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=1, groups=hidden), p + "bn2"))
        y = bn(F.conv2d(y, sd[p + "fc2.weight"], sd[p + "fc2.bias"]), p + "bn3")
        return y.permute(0, 2, 3, 1).reshape(B, -1, C)

    y = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=2, padding=2)
    y = F.max_pool2d(bn(y, "patch_embed.proj.1"), 3, stride=2, padding=1)
    y = F.conv2d(y, sd["patch_embed.proj.3.weight"], sd["patch_embed.proj.3.bias"], stride=4)
    for stage, (heads, depth) in enumerate([(6, 10), (12, 2)]):
        B, C, H, W = y.shape
        t = y.flatten(2).transpose(1, 2)
        for i in range(depth):
            p = f"transformers.{stage}.blocks.{i}."
            t = t + attn(F.layer_norm(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6), p + "attn.", heads)
            t = t + mlp(F.layer_norm(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6), p + "mlp.", H, W)
        y = t.transpose(1, 2).reshape(B, C, H, W)
        if stage == 0:
            y = F.conv2d(y, sd["pools.0.conv.weight"], sd["pools.0.conv.bias"], stride=2, padding=1, groups=C)
    feat = F.layer_norm(y.mean(dim=(2, 3)), (y.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(feat, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("attention", ["vars_d", "vars_sd"])
def test_official_checkpoint_gives_the_official_logits(attention):
    ckpt = _official_checkpoint(attention, img_size=64, seed=7)
    torch.manual_seed(0)
    model = timm.create_model("vars_rvt_tiny", attention=attention, compat="official", lam=0.3, num_step=5,
                              img_size=64, num_classes=4)
    load_official_checkpoint(model, ckpt)
    model = model.double().eval()
    sd = {k[len("module."):]: v.double() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        ref = _official_rvt_forward(sd, x, attention, lam=0.3, num_step=5)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)


def test_official_static_atoms_need_a_square_grid_without_prefix_tokens():
    with pytest.raises(ValueError, match="no prefix tokens"):
        timm.create_model("vars_deit_tiny", attention="vars_sd", compat="official", img_size=32, depth=1)


def test_performer_rejects_attention_dropout_and_masks():
    with pytest.raises(ValueError, match="attn_drop"):
        PerformerAttention(8, num_heads=2, attn_drop=0.1)
    with pytest.raises(ValueError, match="attn_mask"):
        PerformerAttention(8, num_heads=2)(torch.randn(1, 3, 8), attn_mask=torch.ones(3, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# timm's conventions on every host
TIMM_HOSTS = [("vars_deit_tiny", "vars_d"), ("vars_rvt_tiny", "vars_sd"), ("vars_gfnet_tiny", "gfnet")]


@pytest.mark.parametrize("name,attention", TIMM_HOSTS)
def test_grad_checkpointing_gives_the_same_gradients(name, attention):
    def grads(ckpt):
        torch.manual_seed(0)
        model = timm.create_model(name, attention=attention, num_classes=3, img_size=32, **SHALLOW[name])
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32)).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name,attention", TIMM_HOSTS)
def test_group_matcher_gives_layer_decay_groups(name, attention):
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2
    model = timm.create_model(name, attention=attention, num_classes=3, img_size=32, **SHALLOW[name])
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = [n for names in groups.values() for n in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # every parameter placed once
    assert len(groups) >= 3  # stem, blocks, ..., head
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.3


@pytest.mark.parametrize("name,attention", TIMM_HOSTS)
def test_features_only(name, attention):
    torch.manual_seed(0)
    kw = dict(attention=attention, img_size=64, **SHALLOW[name])
    model = timm.create_model(name, num_classes=3, **kw).eval()
    feats = timm.create_model(name, features_only=True, **kw).eval()
    missing, unexpected = feats.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("head.", "norm.", "blocks.", "transformers.", "pools."))
                               for k in unexpected)  # only the pruned head / norm / later blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = feats(x)
    info = feats.feature_info
    assert len(maps) == len(info.channels()) >= 1
    for m, c, r in zip(maps, info.channels(), info.reduction()):
        assert m.shape == (2, c, 64 // r, 64 // r), (m.shape, c, r)
    if name == "vars_rvt_tiny":  # the last stage's map is what the classifier pools
        with torch.no_grad():
            torch.testing.assert_close(maps[-1], model.forward_features(x))


def test_pretrained_cfg_matches_the_evaluation_and_the_model():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "_ti_cfg", Path(__file__).resolve().parents[1] / "scripts" / "train_imagenet.py")
    ti = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ti)
    tf = ti.imagefolder_transforms(ti.parse_args(["--data-path", "x"]), False)
    resize = next(t for t in tf.transforms[0].transforms if type(t).__name__ == "Resize")
    for name in MODEL_NAMES + ("vars_rvt_small", "vars_rvt_base"):
        with torch.device("meta"):
            model = timm.create_model(name, attention="self")
        cfg = model.pretrained_cfg
        assert cfg["crop_pct"] == 0.875 and resize.size in (256, [256])  # 224 / 0.875: the official 256
        assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
        assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


def test_pretrained_without_a_file_is_an_error_and_a_file_loads_safely(tmp_path):
    import argparse
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model("vars_rvt_tiny", attention="vars_d", pretrained=True)
    src = _official_model("vars_d", seed=5).eval()
    path = tmp_path / "official.pth"  # official layout: DDP prefixes, an argparse Namespace in "args"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()},
                "args": argparse.Namespace(model="rvt_tiny")}, path)
    got = timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official", img_size=32, num_classes=4,
                            pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got(x), src(x))
    # another number of classes: the head keeps its initialisation, the rest loads
    seven = timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official", img_size=32, num_classes=7,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(seven.patch_embed.proj[0].weight, src.patch_embed.proj[0].weight)
    # a file that runs code is refused (timm's own loader would unpickle it)
    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"model": src.state_dict(), "x": Touch()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official", img_size=32, num_classes=4,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "evil.pth")))
    assert not marker.exists()


def test_rvt_plus_position_masks_follow_the_official_formula():
    """RVT+ (official rvt_tiny_plus): the first blocks' softmax logits are scaled by sigmoid(att_mask)."""
    torch.manual_seed(0)
    model = timm.create_model("vars_rvt_tiny", attention="self", masked_blocks=2, img_size=32, num_classes=3,
                              depth=(3, 1)).eval()
    masks = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("att_mask")}
    assert masks == {"transformers.0.blocks.0.attn.att_mask": (6, 4, 4), "transformers.0.blocks.1.attn.att_mask": (6, 4, 4)}
    attn = model.transformers[0].blocks[1].attn
    with torch.no_grad():
        attn.att_mask.normal_()
        x = torch.randn(2, 4, 192)  # 32 px -> a 2 x 2 token grid
        qkv = attn.qkv(x).reshape(2, 4, 3, 6, 32).permute(2, 0, 3, 1, 4)
        logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * 32 ** -0.5 * torch.sigmoid(attn.att_mask)
        want = attn.proj((logits.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(2, 4, 192))
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    with torch.device("meta"):  # the official rvt_tiny_plus: 10 masked blocks of (6, 196, 196)
        full = timm.create_model("vars_rvt_tiny", attention="self", masked_blocks=10)
    assert sum(k.endswith("att_mask") for k in full.state_dict()) == 10
    assert full.state_dict()["transformers.0.blocks.9.attn.att_mask"].shape == (6, 196, 196)
    with pytest.raises(ValueError, match="masked_blocks"):
        timm.create_model("vars_rvt_tiny", attention="vars_d", masked_blocks=10)


@pytest.mark.parametrize("kw, name", [(dict(depth=2), "depth"), (dict(heads=[6, 0]), "heads"),
                                      (dict(base_dims="32"), "base_dims")])
def test_rvt_stage_lists_are_checked_by_name(kw, name):
    # an integer where RVT takes one value per stage raised "object of type 'int' has no len()"
    with pytest.raises(ValueError, match=f"{name} must be a list with one positive integer per stage"):
        timm.create_model("vars_rvt_tiny", **kw)
