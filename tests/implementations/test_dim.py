"""DIM: the JSD (Eq. 4) and InfoNCE (Eq. 5) estimators averaged over locations (Eq. 6) against literal
computations, their limits, the feature map read inside the backbone, the heads, gradients and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

from selfsup import backbones

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

dim = load("dim")


def sp(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


# --- literal computations of the paper's equations (loops, float64) ----------------------------------


def scores_literal(g, c):
    """T(C^(l)(x_j), Y_i) = phi(Y_i) . psi(C^(l)(x_j)) for every i, j, l."""
    n, k, locs = len(g), len(c), c.shape[2]
    return [[[float(g[i] @ c[j, :, loc]) for loc in range(locs)] for j in range(k)] for i in range(n)]


def jsd_literal(s, rows):
    """-(E_P[-sp(-T)] - E_PxP~[sp(T)]) over the listed rows; the positive of row i is column i."""
    locs = len(s[0][0])
    joint = [-sp(-s[i][i][loc]) for i in rows for loc in range(locs)]
    marg = [sp(s[i][j][loc]) for i in rows for j in range(len(s[0])) if j != i for loc in range(locs)]
    return -(sum(joint) / len(joint) - sum(marg) / len(marg))


def infonce_literal(s, rows):
    """-1/(|rows| L) sum_{i, l} log e^T(i,i,l) / (e^T(i,i,l) + sum_{j != i} sum_l' e^T(i,j,l'))."""
    locs, total = len(s[0][0]), 0.0
    for i in rows:
        neg = sum(math.exp(s[i][j][m]) for j in range(len(s[0])) if j != i for m in range(locs))
        for loc in range(locs):
            pos = math.exp(s[i][i][loc])
            total += -math.log(pos / (pos + neg))
    return total / (len(rows) * locs)


def _embeddings(n, u, locs, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, u, generator=g, dtype=torch.float64),
            scale * torch.randn(n, u, locs, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("n,u,locs", [(3, 4, 1), (5, 6, 4), (4, 8, 9)])
def test_scores_are_all_pairwise_dot_products(n, u, locs):
    g, c = _embeddings(n, u, locs, seed=n)
    got = dim.dim_scores(g, c)
    assert got.shape == (n, n, locs)
    torch.testing.assert_close(got, torch.tensor(scores_literal(g, c), dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,literal", [("jsd", jsd_literal), ("infonce", infonce_literal)])
@pytest.mark.parametrize("n,u,locs,scale", [(3, 4, 1, 0.5), (5, 6, 4, 0.5), (4, 8, 9, 1.5)])
def test_estimators_match_equations(name, literal, n, u, locs, scale):
    g, c = _embeddings(n, u, locs, seed=10 * n + locs, scale=scale)
    s = scores_literal(g, c)
    loss = dim.ESTIMATORS[name]
    assert loss(dim.dim_scores(g, c)).item() == pytest.approx(literal(s, range(n)), rel=1e-10)
    # a rank's rows against the whole batch (offset = its first row): the same rows of the equation, and the
    # mean over two equal shards is the loss of the whole batch
    half = n // 2 if n % 2 == 0 else None
    if half:
        parts = [loss(dim.dim_scores(g[r * half:(r + 1) * half], c), r * half).item() for r in range(2)]
        assert parts[1] == pytest.approx(literal(s, range(half, n)), rel=1e-10)
        assert sum(parts) / 2 == pytest.approx(loss(dim.dim_scores(g, c)).item(), rel=1e-10)


def test_limits():
    n, locs = 6, 4
    # no information: every pair scored alike
    zero = torch.zeros(n, n, locs, dtype=torch.float64)
    assert dim.jsd_loss(zero).item() == pytest.approx(2 * math.log(2), rel=1e-12)
    for c in (-3.0, 0.7):
        assert dim.jsd_loss(zero + c).item() == pytest.approx(sp(c) + sp(-c), rel=1e-12)
        assert dim.infonce_loss(zero + c).item() == pytest.approx(math.log(1 + (n - 1) * locs), rel=1e-12)
    # the discriminator separates matched from mismatched pairs: both losses fall towards 0
    eye = torch.eye(n, dtype=torch.float64)[:, :, None].expand(n, n, locs)
    perfect = 20 * (2 * eye - 1)  # +20 on matched pairs, -20 elsewhere
    assert dim.jsd_loss(perfect).item() < 1e-8 and dim.infonce_loss(perfect).item() < 1e-6
    rand = torch.randn(n, n, locs, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert dim.jsd_loss(perfect).item() < dim.jsd_loss(rand).item()
    assert dim.infonce_loss(perfect).item() < dim.infonce_loss(rand).item()
    # a collapsed encoder (the same global and local features for every image) is at the no-information value
    g, c = torch.ones(n, 5, dtype=torch.float64), 0.1 * torch.ones(n, 5, locs, dtype=torch.float64)
    assert dim.infonce_loss(dim.dim_scores(g, c)).item() == pytest.approx(math.log(1 + (n - 1) * locs), rel=1e-12)
    assert dim.jsd_loss(dim.dim_scores(g, c)).item() >= 2 * math.log(2)


# --- the feature map inside the backbone ---------------------------------------------------------------


def test_feature_map_of_the_harness_backbones():
    small = backbones.SmallCNN(width=8)
    red, channels, final = dim.find_feature_maps(small)
    assert red == "features.11" and channels == 32 and final == 64  # the third block's 8 x 8 map
    x = torch.randn(2, 3, 32, 32)
    small.eval()
    y, c, _ = dim.forward_with_maps(small, x, red)
    torch.testing.assert_close(y, small(x))
    torch.testing.assert_close(c, small.features[:11](x))  # (N, 32, 8, 8): conv-BN-ReLU of block 3
    assert c.shape == (2, 32, 8, 8)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())  # hooks removed
    resnet = backbones.build_backbone("resnet18_cifar")
    red, channels, final = dim.find_feature_maps(resnet)
    assert red == "layer4.0.downsample.0" and channels == 256 and final == 512  # layer3's output
    with pytest.raises(ValueError, match="convolutional backbone"):
        dim.find_feature_maps(backbones.build_backbone("vit_tiny"))


def test_mi_head_starts_near_identity_and_normalises():
    torch.manual_seed(0)
    head = dim.MIHead(4, 16)
    w = head.shortcut.weight[:, :, 0, 0]
    assert torch.equal(w[:4, :4].diagonal(), torch.ones(4)) and w[4:].abs().max() <= 0.01
    out = head(torch.randn(3, 4, 5, 5))  # (N, U, H, W), LayerNorm over U
    assert out.shape == (3, 16, 5, 5)
    torch.testing.assert_close(out.mean(1), torch.zeros(3, 5, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(3, 5, 5), atol=1e-3, rtol=0)


# --- the model ----------------------------------------------------------------------------------------


def _cfg(**kw):
    return dim.Config(**{"mi_units": 32, **kw})


@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (1.0, 0.0), (0.5, 1.0)])
def test_gradients_reach_backbone_and_every_head(estimator, alpha, beta):
    cfg = _cfg(estimator=estimator, alpha=alpha, beta=beta)
    model = tiny_model(dim, cfg)
    heads = ({"local_y", "local_c"} if beta > 0 else set()) | ({"global_y", "global_c"} if alpha > 0 else set())
    assert {name for name, _ in model.named_children()} == {"backbone"} | heads  # the hooked layer is no child
    out = model(fixed_batch(dim, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert ("local_mi" in out) == (beta > 0) and ("global_mi" in out) == (alpha > 0)
    want = beta * -out.get("local_mi", torch.tensor(0.0)) + alpha * -out.get("global_mi", torch.tensor(0.0))
    torch.testing.assert_close(out["loss"].detach(), want)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter in the loss


def test_local_loss_is_the_estimator_on_the_heads():
    cfg = _cfg()
    model = tiny_model(dim, cfg).eval()  # BN in eval mode: the same features in both computations
    x = fixed_batch(dim, cfg, n=6)["views"][0]
    with torch.no_grad():
        y, c = model.backbone(x), model.backbone.features[:11](x)
        phi = model.local_y(y[:, :, None, None]).flatten(1)
        psi = model.local_c(c).flatten(2)  # (N, U, 64)
        want = infonce_literal(scores_literal(phi.double(), psi.double()), range(6))
        assert model({"views": [x]})["loss"].item() == pytest.approx(want, rel=1e-4)


def test_bad_configs_are_refused():
    backbone = backbones.SmallCNN(width=8)
    with pytest.raises(ValueError, match="estimator"):
        dim.MODEL(backbone, 64, _cfg(estimator="dv"))
    with pytest.raises(ValueError, match="alpha"):
        dim.MODEL(backbone, 64, _cfg(alpha=0.0, beta=0.0))
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no feature map"):
        dim.MODEL(tiny, 4, _cfg())


def test_view_recipe():
    (view,) = dim.augmentations(dim.Config(), 32)  # the paper's CIFAR setting: no augmentation
    assert [type(t) for t in view.transforms] == [v2.ToImage, v2.RandomResizedCrop, v2.ToDtype, v2.Normalize]
    assert view.transforms[1].scale == (1.0, 1.0)
    (stl,) = dim.augmentations(dim.Config(min_scale=0.5, flip=True), 64)
    assert [type(t) for t in stl.transforms][2] is v2.RandomHorizontalFlip and stl.transforms[1].scale == (0.5, 1.0)
    batch = fixed_batch(dim, dim.Config(), n=4)
    (x,) = batch["views"]
    assert x.shape == (4, 3, 32, 32)
    # the whole image, only normalised
    from selfsup import data

    ds = data.load_digits()
    want = (ds.train.pixels[batch["index"]].float() / 255 - torch.tensor(ds.mean)[:, None, None]) / torch.tensor(ds.std)[:, None, None]
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)


def test_small_preset_names_config_fields():
    assert set(dim.PRESETS["small"]) <= set(dim.Config.__dataclass_fields__)


def test_embed_is_the_global_vector():
    model = tiny_model(dim, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x)) and model.embed(x).shape == (3, 64)


@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_smoke_fit_lowers_the_loss(estimator):
    cfg = _cfg(estimator=estimator)
    losses, _ = smoke_fit(dim, cfg, steps=30, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
