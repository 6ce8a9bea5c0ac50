"""Contrastive Clustering: the instance loss, the cluster-level loss over columns and the entropy term
against literal computations, limits (identical views, collapse into one cluster), the cluster count from
setup, gradients into the backbone and both heads, the view recipe, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

cc = load("li-2021-contrastive-clustering")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cos(u, v) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def nt_xent_literal(a, b, tau: float) -> float:
    """Eq. 3 / Eq. 6 with loops: for each vector of a (then of b), -log of its positive (the same index in the
    other list) over every other vector of both lists; the mean over the 2K vectors."""
    k = len(a)
    vecs = list(a) + list(b)
    total = 0.0
    for i in range(2 * k):
        pos = (i + k) % (2 * k)
        denom = sum(math.exp(_cos(vecs[i], vecs[j]) / tau) for j in range(2 * k) if j != i)
        total += -math.log(math.exp(_cos(vecs[i], vecs[pos]) / tau) / denom)
    return total / (2 * k)


def entropy_literal(c) -> float:
    """- sum_j P_j log P_j with P_j = sum_t c_tj / sum_tj c_tj."""
    m = len(c[0])
    col = [sum(row[j] for row in c) for j in range(m)]
    total = sum(col)
    return -sum(s / total * math.log(s / total) for s in col if s > 0)


@pytest.mark.parametrize("n,d,tau", [(3, 4, 0.5), (5, 2, 0.1), (4, 7, 1.0)])
def test_instance_loss_matches_equation(n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    got = cc.instance_loss(z1, z2, tau).item()
    assert got == pytest.approx(nt_xent_literal(z1.tolist(), z2.tolist(), tau), rel=1e-10)


@pytest.mark.parametrize("n,m,tau", [(6, 3, 1.0), (4, 5, 0.5), (9, 2, 1.0)])
def test_cluster_loss_over_columns_and_entropy_match_equation(n, m, tau):
    g = torch.Generator().manual_seed(n * m)
    c1 = torch.softmax(torch.randn(n, m, generator=g, dtype=torch.float64) * 2, 1)
    c2 = torch.softmax(torch.randn(n, m, generator=g, dtype=torch.float64) * 2, 1)
    cols1 = [[c1[t, j].item() for t in range(n)] for j in range(m)]  # the M columns, N entries each
    cols2 = [[c2[t, j].item() for t in range(n)] for j in range(m)]
    want_con = nt_xent_literal(cols1, cols2, tau)
    want_h = entropy_literal(c1.tolist()) + entropy_literal(c2.tolist())  # H(Y), Eq. 7
    assert cc.cluster_contrastive_loss(c1, c2, tau).item() == pytest.approx(want_con, rel=1e-10)
    assert cc.cluster_entropy(c1).item() == pytest.approx(entropy_literal(c1.tolist()), rel=1e-10)
    total, con, h = cc.cluster_loss(c1, c2, tau)
    assert con.item() == pytest.approx(want_con, rel=1e-10) and h.item() == pytest.approx(want_h, rel=1e-10)
    # the official form: contrastive + sum over views of (log M + sum_j P_j log P_j) = L_clu + 2 log M
    assert total.item() == pytest.approx(want_con - want_h + 2 * math.log(m), rel=1e-10)


def test_columns_not_rows():
    """The cluster loss contrasts columns (clusters): permuting the images of both views alike changes
    nothing; swapping two clusters in one view only breaks the positive pairs and raises it."""
    c1 = torch.softmax(torch.randn(8, 4, dtype=torch.float64) * 3, 1)
    c2 = torch.softmax(c1.log() + 0.1 * torch.randn(8, 4, dtype=torch.float64), 1)
    base = cc.cluster_contrastive_loss(c1, c2, 1.0)
    perm = torch.randperm(8)
    torch.testing.assert_close(cc.cluster_contrastive_loss(c1[perm], c2[perm], 1.0), base)
    assert cc.cluster_contrastive_loss(c1, c2[:, [1, 0, 2, 3]], 1.0) > base + 0.1


def test_identical_views_lower_the_instance_loss():
    z1, z2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    same = cc.instance_loss(z1, z1, 0.5)
    assert same < cc.instance_loss(z1, z2, 0.5) - 0.1
    # orthogonal unit rows, identical views: positive cos 1, the 2N - 2 other negatives cos 0
    e = torch.eye(8, dtype=torch.float64)
    want = -math.log(math.exp(2) / (math.exp(2) + 14))
    assert cc.instance_loss(e, e, 0.5).item() == pytest.approx(want, rel=1e-12)
    # a constant embedding: log(2N - 1)
    flat = torch.ones(8, 16, dtype=torch.float64)
    assert cc.instance_loss(flat, flat, 0.5).item() == pytest.approx(math.log(15), rel=1e-12)


def test_collapse_into_one_cluster_is_penalised():
    n, m = 12, 4
    balanced = F.one_hot(torch.arange(n) % m, m).double()  # 3 images per cluster, same in both views
    total_b, con_b, h_b = cc.cluster_loss(balanced, balanced, 1.0)
    assert h_b.item() == pytest.approx(2 * math.log(m), rel=1e-12)  # uniform marginals: no entropy penalty
    # orthogonal columns: positive cos 1, the 2M - 2 other clusters cos 0
    assert con_b.item() == pytest.approx(-math.log(math.e / (math.e + 2 * m - 2)), rel=1e-12)
    assert total_b.item() == pytest.approx(con_b.item(), rel=1e-12)
    # every image in cluster 0 (up to a softmax's tails): the marginal is one-hot, log M - H = log M per view
    collapsed = torch.softmax(torch.tensor([12.0, 0, 0, 0], dtype=torch.float64).expand(n, m), 1)
    total_c, con_c, h_c = cc.cluster_loss(collapsed, collapsed, 1.0)
    assert h_c.item() < 1e-3
    assert total_c.item() == pytest.approx(con_c.item() + 2 * math.log(m) - h_c.item(), rel=1e-12)
    # every image with the same row: all columns alike, the contrastive part is log(2M - 1)
    assert con_c.item() == pytest.approx(math.log(2 * m - 1), rel=1e-9)
    assert total_c > total_b + 2 * math.log(m)
    # the entropy term alone separates a collapsed batch from a balanced one with equal contrastive parts
    uneven = F.one_hot(torch.tensor([0] * 9 + [1, 2, 3]), m).double()
    _, con_u, h_u = cc.cluster_loss(uneven, uneven, 1.0)
    torch.testing.assert_close(con_u, con_b)  # one-hot columns stay orthogonal whatever their sizes
    assert h_u < h_b - 0.5


def test_setup_sets_the_number_of_clusters():
    model = tiny_model(cc, cc.Config())
    assert model.num_clusters == 10  # before setup: CIFAR-10's 10
    model.setup(100, 7)
    assert model.num_clusters == 7 and model.cluster_head[-1].in_features == model.backbone.feature_dim
    fixed = tiny_model(cc, cc.Config(num_clusters=5))
    fixed.setup(100, 7)
    assert fixed.num_clusters == 5  # the Config wins
    with pytest.raises(ValueError, match="at least 2 clusters"):
        tiny_model(cc, cc.Config()).setup(100, 1)
    w = tiny_model(cc, cc.Config())
    before = w.cluster_head[-1].weight.clone()
    w.setup(100, 10)  # same width: the head is kept
    torch.testing.assert_close(w.cluster_head[-1].weight, before)


def _cfg(**kw):
    return cc.Config(**{"proj_dim": 16, **kw})


def test_forward_and_gradients_reach_backbone_and_both_heads():
    cfg = _cfg()
    model = tiny_model(cc, cfg)
    model.setup(64, 10)
    batch = fixed_batch(cc, cfg, n=8)
    calls = []
    model.backbone.register_forward_hook(lambda mod, i, o: calls.append(tuple(i[0].shape)))
    out = model(batch)
    assert calls == [(8, 3, 32, 32)] * 2  # one backbone call per view
    torch.testing.assert_close(out["loss"], out["instance_loss"] + out["cluster_loss"])
    assert 0 < out["cluster_entropy"] <= math.log(10) + 1e-6 and 0 < out["used_clusters"] <= 1
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    for head in (model.instance_head, model.cluster_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # each loss reaches its own head only (and both the backbone)
    x1, x2 = batch["views"]
    model.zero_grad()
    cc.instance_loss(model.instance_head(model.backbone(x1)), model.instance_head(model.backbone(x2)), 0.5).backward()
    assert all(p.grad is None for p in model.cluster_head.parameters())
    model.zero_grad(set_to_none=True)
    c1, c2 = (torch.softmax(model.cluster_head(model.backbone(x)), 1) for x in (x1, x2))
    cc.cluster_loss(c1, c2, 1.0)[0].backward()
    assert all(p.grad is None for p in model.instance_head.parameters())
    assert all(p.grad is not None for p in model.cluster_head.parameters())


def test_param_groups_constant_rate():
    model = tiny_model(cc, _cfg())
    (group,) = model.param_groups()
    assert group["fixed_lr"] is True and group["weight_decay"] == 0.0
    assert len(group["params"]) == len(list(model.parameters()))
    assert tiny_model(cc, _cfg(constant_lr=False)).param_groups()[0]["fixed_lr"] is False


def test_view_recipe():
    cfg = cc.Config()
    pipes = cc.augmentations(cfg, 224)
    assert len(pipes) == 2
    names = [type(t).__name__ for t in pipes[0].transforms]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale",
                     "ToDtype", "Normalize"]  # no blur for CIFAR-10 (official)
    crop = pipes[0].transforms[1]
    assert tuple(crop.size) == (224, 224) and tuple(crop.scale) == (0.08, 1.0)
    jitter = pipes[0].transforms[3]
    assert jitter.p == 0.8
    assert jitter.transforms[0].brightness == pytest.approx((0.6, 1.4)) and jitter.transforms[0].hue == pytest.approx((-0.1, 0.1))
    assert pipes[0].transforms[4].p == 0.2
    blurred = cc.augmentations(dataclasses.replace(cfg, blur=True, jitter_strength=1.0), 224)[0]
    blur = [t for t in blurred.transforms if type(t).__name__ == "RandomApply"][1]
    assert blur.p == 0.5 and tuple(blur.transforms[0].kernel_size) == (23, 23)
    small = cc.augmentations(dataclasses.replace(cfg, blur=True), 32, (0.5,) * 3, (0.25,) * 3)
    assert not any(type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == "GaussianBlur"
                   for t in small[0].transforms)  # no blur below 64 px
    assert views.plan_views(small, in_memory=True).mode == "device"
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert tuple(pipes[1](x).shape) == (3, 224, 224)


def test_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(cc.Config)}
    assert set(cc.PRESETS["small"]) <= fields


def test_assign_and_embed():
    model = tiny_model(cc, _cfg()).eval()
    model.setup(64, 6)
    x = fixed_batch(cc, _cfg(), n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and a.dtype == torch.long and bool(((0 <= a) & (a < 6)).all())
    with torch.no_grad():
        torch.testing.assert_close(a, torch.softmax(model.cluster_head(model.backbone(x)), 1).argmax(1))


def test_smoke_fit_lowers_the_loss():
    losses, model = smoke_fit(cc, _cfg(), steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
