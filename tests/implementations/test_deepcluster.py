"""DeepCluster: PCA whitening, k-means and its empty-cluster split against direct computations, the
uniform-sampling weights, the weighted loss, Sobel input, the epoch hook, the top layer's optimizer group,
gradients, smoke fit."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

dc = load("deepcluster")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_pca_whiten_decorrelates_and_normalises():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = (torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])) @ mix
    x = x + 4.0  # an offset, removed by the centring
    y = dc.pca_whiten(x.float(), 3).double()
    assert y.shape == (500, 3)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(500, dtype=torch.float64))
    # before the row normalisation the whitened coordinates have identity covariance: recompute them
    xc = x - x.mean(0)
    val, vec = torch.linalg.eigh(xc.T @ xc / len(x))
    w = xc @ vec[:, -3:].flip(1) / val[-3:].flip(0).sqrt()
    torch.testing.assert_close(w.T @ w / len(x), torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
    # the same directions up to sign, hence the same normalised rows up to per-column sign
    signs = torch.sign((F.normalize(w, dim=1) * y).sum(0))
    torch.testing.assert_close(y * signs, F.normalize(w, dim=1), atol=1e-4, rtol=0)


def test_nearest_centroid_is_the_argmin_distance():
    x, c = torch.randn(37, 5), torch.randn(6, 5)
    want = torch.tensor([min(range(6), key=lambda j: float(((xi - c[j]) ** 2).sum())) for xi in x])
    assert torch.equal(dc.nearest_centroid(x, c, chunk=8), want)


def kmeans_objective(x, labels, centroids) -> float:
    return float(((x - centroids[labels]) ** 2).sum())


def test_kmeans_finds_separated_clusters_and_is_lloyd():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    truth = torch.arange(4).repeat_interleave(40)
    x = centres[truth] + 0.3 * torch.randn(160, 2, generator=g)
    labels, centroids = dc.kmeans(x, 4, 20, torch.Generator().manual_seed(0))
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 4  # a one-to-one match of clusters and blobs
    for j in range(4):  # a fixed point of Lloyd's iteration: each centroid is its members' mean
        torch.testing.assert_close(centroids[j], x[labels == j].mean(0))
    # no better 4-partition among those reached from other initialisations
    best = kmeans_objective(x, labels, centroids)
    for seed in range(5):
        lab, cen = dc.kmeans(x, 4, 20, torch.Generator().manual_seed(seed + 10))
        assert kmeans_objective(x, lab, cen) >= best - 1e-3


def test_kmeans_splits_empty_clusters():
    """Three distinct points, of which the initialisation picks duplicates: with k = 3 on a set where two
    coordinates repeat, a naive Lloyd step leaves clusters empty; the split refills every one."""
    x = torch.tensor([[0.0, 0.0]] * 10 + [[1.0, 1.0]] * 10 + [[5.0, 5.0]] * 10)
    for seed in range(10):
        labels, _ = dc.kmeans(x, 3, 10, torch.Generator().manual_seed(seed))
        assert torch.bincount(labels, minlength=3).min() > 0, seed
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        dc.kmeans(x, 31, 1, torch.Generator())


def test_uniform_sampling_weights_are_its_expectation():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3, 3, 3, 3, 3])  # cluster 2 empty
    w = dc.cluster_weights(labels, 4).double()
    losses = torch.rand(12, dtype=torch.float64)
    # uniform over the 3 non-empty clusters, then uniform within one
    want = sum(float(losses[labels == c].mean()) for c in (0, 1, 3)) / 3
    assert float((w[labels] * losses).mean()) == pytest.approx(want, rel=1e-6)  # float32 weights
    assert float(w[2]) == 0


def test_loss_matches_the_weighted_cross_entropy():
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 1, 0])
    w = torch.tensor([0.5, 2.0, 1.0, 1.5])
    want = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        want += w[y].item() * (log_z - row[y])
    assert dc.deepcluster_loss(logits, labels, w).item() == pytest.approx(want / 5, rel=1e-6)
    plain = F.cross_entropy(logits, labels).item()
    assert dc.deepcluster_loss(logits, labels, None).item() == pytest.approx(plain, rel=1e-6)


def test_sobel_matches_a_direct_convolution():
    x = torch.randn(2, 3, 6, 7)
    grey = x.mean(1)
    kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    out = dc.sobel(x)
    assert out.shape == (2, 2, 6, 7)
    for n, i, j in itertools.product(range(2), range(6), range(7)):
        gx = gy = 0.0
        for a, b in itertools.product(range(3), range(3)):
            r, c = i + a - 1, j + b - 1
            v = float(grey[n, r, c]) if 0 <= r < 6 and 0 <= c < 7 else 0.0
            gx += kx[a][b] * v  # cross-correlation, as conv2d computes it
            gy += kx[b][a] * v
        assert (float(out[n, 0, i, j]), float(out[n, 1, i, j])) == pytest.approx((gx, gy), abs=1e-5)


def _cfg(**kw):
    return dc.Config(**{**dict(num_clusters=8, pca_dim=16, kmeans_iterations=10, epochs=10), **kw})


def _clustered(cfg, n=32):
    model = tiny_model(dc, cfg)
    model.setup(n, 10)
    batch = fixed_batch(dc, cfg, n=n)
    feats = lambda: model.embed(batch["views"][0]).detach()  # noqa: E731  stands for the whole training set
    model.on_epoch_start(0, cfg.epochs, feats)
    return model, batch


def test_sobel_rebuilds_the_first_convolution_for_two_channels():
    model = tiny_model(dc, _cfg())
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 2
    assert tiny_model(dc, _cfg(sobel=False)).backbone.features[0].in_channels == 3


def test_no_step_before_the_first_clustering():
    model = tiny_model(dc, _cfg())
    model.setup(32, 10)
    with pytest.raises(RuntimeError, match="no pseudo-labels yet"):
        model(fixed_batch(dc, _cfg(), n=8))
    with pytest.raises(ValueError, match="above the 4 training images"):
        model.setup(4, 10)


def test_epoch_hook_clusters_weights_and_redraws_the_top_layer():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    labels = model.assignments.clone()
    assert labels.shape == (32,) and int(labels.min()) >= 0 and int(labels.max()) < 8
    assert torch.bincount(labels, minlength=8).min() > 0  # no empty cluster
    torch.testing.assert_close(model.weights, dc.cluster_weights(labels, 8))
    # the assignments are k-means on the whitened features, with the epoch's generator
    x = dc.pca_whiten(model.embed(batch["views"][0]), 16)
    want, _ = dc.kmeans(x, 8, 10, torch.Generator().manual_seed(17))
    assert torch.equal(labels, want)
    w = model.top_layer.weight
    assert float(w.detach().std()) == pytest.approx(0.01, rel=0.2) and float(model.top_layer.bias.detach().abs().sum()) == 0
    with torch.no_grad():
        w.add_(1.0)
    model.on_epoch_start(1, cfg.epochs, lambda: model.embed(batch["views"][0]))
    assert float(w.detach().abs().mean()) < 0.1  # drawn afresh
    before = model.assignments.clone()
    model2 = tiny_model(dc, _cfg(reassign_epochs=2))
    model2.setup(32, 10)
    model2.assignments.copy_(before)
    model2.on_epoch_start(1, cfg.epochs, lambda: pytest.fail("no clustering in an odd epoch"))


def test_gradients_reach_the_backbone_and_labels_are_the_assignments():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and 0 <= float(out["pseudo_label_acc"]) <= 1
    assert out["loss"].item() == pytest.approx(math.log(8), abs=0.2)  # a fresh N(0, 0.01) head: near uniform
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.top_layer.weight.grad.abs().sum() > 0


def test_top_layer_group_has_no_momentum():
    cfg = _cfg()
    model = tiny_model(dc, cfg)
    opt = train.build_optimizer(model, cfg, 0.1)
    top = {id(p) for p in model.top_layer.parameters()}
    for g in opt.param_groups:
        if {id(p) for p in g["params"]} == top:
            assert g["momentum"] == 0.0 and g["weight_decay"] == cfg.weight_decay
            break
    else:
        pytest.fail("no optimizer group holds exactly the top layer")
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])


def test_view_recipe_and_preset():
    cfg = dc.Config()
    (pipe,) = dc.augmentations(cfg, 224)
    crop = next(t for t in pipe.transforms if type(t).__name__ == "RandomResizedCrop")
    assert tuple(crop.size) == (224, 224) and tuple(crop.scale) == (0.08, 1.0)
    assert views.plan_views(dc.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    fields = {f.name for f in dataclasses.fields(dc.Config)}
    assert set(dc.PRESETS["small"]) <= fields


def test_assign_and_embed():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    x = batch["views"][0][:4]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and bool(((0 <= a) & (a < 8)).all())


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(sobel=False)
    model, batch = _clustered(cfg)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 0.3)
    losses = []
    for _ in range(25):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
