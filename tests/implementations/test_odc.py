"""ODC: the samples-memory update and label re-assignment, the centroids, the loss re-weighting, the
small-cluster fix, the initial clustering, the rotation, gradients and the memories' isolation from them,
smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

odc = load("odc")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    return odc.Config(**{**dict(num_clusters=4, min_cluster_size=2, neck_hidden_dim=16, neck_dim=8,
                                centroids_update_interval=3, epochs=10), **kw})


def _initialised(cfg, n=32):
    """A model whose memories come from the initial clustering of n fixed images (the 'training set')."""
    model = tiny_model(odc, cfg)
    model.setup(n, 10)
    batch = fixed_batch(odc, cfg, n=n)
    images = batch["views"][0]

    def features(encode=None):  # the harness's features(): the whole set, the model in eval mode
        model.eval()
        out = (encode or model.embed)(images).detach()
        model.train()
        return out

    model.on_epoch_start(0, cfg.epochs, features)
    return model, batch


def _nearest(f, c):
    """Index of the nearest centroid by a loop over them, float64."""
    f, c = f.double(), c.double()
    return min(range(len(c)), key=lambda j: float(((f - c[j]) ** 2).sum()))


# --- the memory's rules against direct computations -----------------------------------------------


def test_memory_update_is_the_momentum_rule():
    old = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    z = torch.randn(5, 3, dtype=torch.float64) * 4
    got = odc.memory_update(old, z, 0.3)
    for i in range(5):
        zn = z[i] / math.sqrt(float((z[i] ** 2).sum()))
        f = [0.7 * float(old[i, d]) + 0.3 * float(zn[d]) for d in range(3)]
        norm = math.sqrt(sum(v * v for v in f))
        assert got[i].tolist() == pytest.approx([v / norm for v in f], abs=1e-12)


def test_cluster_means_are_the_mean_memory_feature_per_label_and_keep_empty_ones():
    feats = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 0, 0, 3, 2, 3, 3])  # cluster 1 empty
    old = torch.randn(4, 4, dtype=torch.float64)
    got = odc.cluster_means(feats, labels, old)
    for k in range(4):
        rows = [feats[i] for i in range(9) if int(labels[i]) == k]
        want = sum(rows) / len(rows) if rows else old[k]
        torch.testing.assert_close(got[k], want)


def test_reweighting_weights_and_the_weighted_loss():
    labels = torch.tensor([0, 0, 0, 0, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3])  # sizes 4, 1, 0, 9
    w = odc.cluster_weights(labels, 4, 0.5).double()
    raw = [(1 / (s + 1e-5)) ** 0.5 for s in (4, 1, 0, 9)]
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-6)
    assert odc.cluster_weights(labels, 4, 0.0).tolist() == pytest.approx([0.25] * 4)  # power 0: plain CE
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 0, 3])
    num = den = 0.0
    for row, c in zip(logits.tolist(), y.tolist()):
        ce = math.log(sum(math.exp(v) for v in row)) - row[c]
        num, den = num + float(w[c]) * ce, den + float(w[c])
    assert odc.odc_loss(logits, y, w).item() == pytest.approx(num / den, rel=1e-9)
    torch.testing.assert_close(odc.odc_loss(logits, y, w), F.cross_entropy(logits, y, weight=w))
    # a given denominator (the global batch's weight sum over the ranks, under DDP)
    assert odc.odc_loss(logits, y, w, torch.tensor(2.0, dtype=torch.float64)).item() == pytest.approx(num / 2, rel=1e-9)
    # uniform weights: the plain cross-entropy
    torch.testing.assert_close(odc.odc_loss(logits, y, torch.full((4,), 0.25, dtype=torch.float64)),
                               F.cross_entropy(logits, y))


def test_nearest_centroid_is_the_argmin_distance():
    x, c = torch.randn(23, 5), torch.randn(6, 5)
    assert odc.nearest_centroid(x, c, chunk=7).tolist() == [_nearest(xi, c) for xi in x]


def test_small_clusters_are_dissolved_and_empty_ones_refilled_by_splitting_the_largest():
    g = torch.Generator().manual_seed(0)
    # cluster 0: two well-separated blobs of 20 (the largest), cluster 1: 30 points, cluster 2: one point
    # near cluster 1, cluster 3: empty
    blob_a = torch.randn(20, 2, generator=g) * 0.1 + torch.tensor([5.0, 0.0])
    blob_b = torch.randn(20, 2, generator=g) * 0.1 + torch.tensor([-5.0, 0.0])
    other = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([0.0, 5.0])
    lone = torch.tensor([[0.0, 4.0]])  # nearer cluster 1's centroid (0, 5) than cluster 0's (0, 0)
    feats = torch.cat([blob_a, blob_b, other, lone])  # (71, 2)
    labels = torch.tensor([0] * 40 + [1] * 30 + [2])
    cents = odc.cluster_means(feats, labels, torch.zeros(4, 2))
    new_labels, new_cents = odc.fix_small_clusters(feats, labels, cents, 3, 20, torch.Generator().manual_seed(1))
    sizes = torch.bincount(new_labels, minlength=4).tolist()
    assert min(sizes) > 0, sizes  # every cluster has members again
    # cluster 2 (small) is refilled by the largest, cluster 0, split into its blobs; then cluster 3 (empty)
    # by the largest left, cluster 1 with the lone point (31 > 20), split in two
    a, b, c = (set(new_labels[s].tolist()) for s in (slice(0, 20), slice(20, 40), slice(40, 71)))
    assert a | b == {0, 2} and len(a) == len(b) == 1
    assert c == {1, 3}
    for k in range(4):  # the centroids of the changed clusters are their members' mean
        torch.testing.assert_close(new_cents[k], feats[new_labels == k].mean(0))
    # the inputs are untouched; nothing to do when every cluster is big enough
    assert torch.bincount(labels, minlength=4).tolist() == [40, 30, 1, 0]
    same, _ = odc.fix_small_clusters(feats, new_labels, new_cents, 3, 20, torch.Generator())
    assert torch.equal(same, new_labels)


def test_split_falls_back_to_a_random_half_on_identical_points():
    x = torch.ones(6, 3)
    second = odc.split_cluster(x, 5, torch.Generator().manual_seed(0))
    assert int(second.sum()) == 3


def test_rotation_matches_torchvision_and_fills_with_black():
    x = torch.rand(2, 3, 9, 9)
    for deg in (90.0, 2.0, -30.0):
        got = odc.rotate(x, torch.full((2,), math.radians(deg)), torch.zeros(3))
        want = TF.rotate(x, deg, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    fill = torch.tensor([-2.0, -1.5, -1.0])
    torch.testing.assert_close(odc.rotate(x, torch.zeros(2), fill), x, atol=1e-6, rtol=0)
    turned = odc.rotate(x, torch.full((2,), math.pi / 4), fill)  # the corners come from outside the image
    for i, j in ((0, 0), (0, 8), (8, 0), (8, 8)):
        torch.testing.assert_close(turned[:, :, i, j], fill.expand(2, 3))
    assert odc.random_rotation(x, 0.0, fill) is x
    model = tiny_model(odc, _cfg())
    model.set_normalization((0.5, 0.25, 0.0), (0.25, 0.5, 1.0))
    assert model.fill.tolist() == [-2.0, -0.5, 0.0]


# --- the module's state ---------------------------------------------------------------------------


def test_initial_clustering_fills_both_memories():
    cfg = _cfg()
    model, batch = _initialised(cfg)
    images = batch["views"][0]
    model.eval()  # what features(project) returns
    z = F.normalize(model.project(images).detach(), dim=1)
    want, _ = odc.kmeans(z, 4, cfg.kmeans_iterations, torch.Generator().manual_seed(17))
    torch.testing.assert_close(model.memory_features, z)
    assert torch.equal(model.memory_labels, want)
    torch.testing.assert_close(model.centroids, odc.cluster_means(z, want, torch.zeros(4, 8)))
    torch.testing.assert_close(model.weights, odc.cluster_weights(want, 4, 0.5))
    kept = model.memory_labels.clone()
    model.on_epoch_start(1, cfg.epochs, lambda encode=None: pytest.fail("no clustering after epoch 0"))
    assert torch.equal(model.memory_labels, kept)


def test_no_step_before_the_initial_clustering():
    cfg = _cfg()
    model = tiny_model(odc, cfg)
    model.setup(32, 10)
    with pytest.raises(RuntimeError, match="no memory yet"):
        model(fixed_batch(odc, cfg, n=8))
    with pytest.raises(ValueError, match="above the 3 training images"):
        model.setup(3, 10)


def test_forward_updates_the_batch_rows_and_reassigns_them_to_the_nearest_centroid():
    cfg = _cfg()
    model, batch = _initialised(cfg)
    batch = {**batch, "views": [batch["views"][0][:8]], "index": torch.tensor([3, 9, 0, 17, 30, 5, 22, 11])}
    feats, labels, cents = model.memory_features.clone(), model.memory_labels.clone(), model.centroids.clone()
    torch.manual_seed(5)
    out = model(batch)
    torch.manual_seed(5)  # the same rotation and dropout: the projections the forward saw
    z = model.project(odc.random_rotation(batch["views"][0], cfg.rotation_degrees, model.fill)).detach()
    idx = batch["index"]
    want = odc.memory_update(feats[idx], z, cfg.memory_momentum)
    torch.testing.assert_close(model.memory_features[idx], want)
    rest = torch.ones(32, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(model.memory_features[rest], feats[rest]) and torch.equal(model.memory_labels[rest], labels[rest])
    assert model.memory_labels[idx].tolist() == [_nearest(f, cents) for f in want]
    assert torch.equal(model.centroids, cents)  # centroids change only in on_step_end
    changed = (model.memory_labels[idx] != labels[idx]).float().mean()
    assert float(out["change_ratio"]) == pytest.approx(float(changed))
    # the loss is on the labels before the update
    torch.manual_seed(5)
    logits = model.head(model.project(odc.random_rotation(batch["views"][0], cfg.rotation_degrees, model.fill)))
    torch.testing.assert_close(out["loss"], odc.odc_loss(logits, labels[idx], model.weights))


def test_step_end_recomputes_centroids_on_schedule_fixes_small_clusters_and_reweights():
    cfg = _cfg(centroids_update_interval=3)
    model, _ = _initialised(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # stands for memory updates of past steps: new features, labels of sizes 14, 10, 8, 0
        model.memory_features.copy_(F.normalize(torch.randn(32, 8, generator=g), dim=1))
        model.memory_labels.copy_(torch.tensor([0] * 14 + [1] * 10 + [2] * 8))
    cents = model.centroids.clone()
    model.on_step_end(2, 10)  # not a centroid step; cluster 3 is empty: refilled from cluster 0
    sizes = torch.bincount(model.memory_labels, minlength=4)
    assert sizes[1:3].tolist() == [10, 8] and int(sizes[0]) + int(sizes[3]) == 14 and int(sizes[3]) > 0
    for k in (1, 2):
        assert torch.equal(model.centroids[k], cents[k])
    for k in (0, 3):
        torch.testing.assert_close(model.centroids[k], model.memory_features[model.memory_labels == k].mean(0))
    torch.testing.assert_close(model.weights, odc.cluster_weights(model.memory_labels, 4, 0.5))
    model.on_step_end(3, 10)  # a centroid step
    torch.testing.assert_close(model.centroids, odc.cluster_means(model.memory_features, model.memory_labels, cents))


def test_memories_take_no_gradient_and_gradients_reach_the_backbone():
    cfg = _cfg()
    model, batch = _initialised(cfg)
    assert not any(b.requires_grad for b in model.buffers())
    out = model(batch)
    assert torch.isfinite(out["loss"]) and 0 <= float(out["pseudo_label_acc"]) <= 1
    assert out["loss"].item() == pytest.approx(math.log(4), abs=0.2)  # a fresh N(0, 0.01) head: near uniform
    assert not any(b.requires_grad for b in model.buffers())
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.head.weight.grad.abs().sum() > 0 and model.neck.net[0].weight.grad.abs().sum() > 0


def test_head_group_has_no_momentum():
    cfg = _cfg()
    model = tiny_model(odc, cfg)
    opt = train.build_optimizer(model, cfg, 0.1)
    head = {id(p) for p in model.head.parameters()}
    groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} == head]
    assert len(groups) == 1 and groups[0]["momentum"] == 0.0 and groups[0]["weight_decay"] == cfg.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in model.parameters() if p.requires_grad])


def test_view_recipe_and_preset():
    cfg = odc.Config()
    (pipe,) = odc.augmentations(cfg, 224)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale",
                     "ToDtype", "Normalize"]
    jitter = pipe.transforms[3]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.0, 2.0), (-0.5, 0.5))
    assert tuple(pipe.transforms[1].scale) == (0.08, 1.0) and pipe.transforms[4].p == 0.2
    assert views.plan_views(odc.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(odc.PRESETS["small"]) <= {f.name for f in dataclasses.fields(odc.Config)}
    assert (cfg.num_clusters, cfg.memory_momentum, cfg.min_cluster_size, cfg.reweight_power) == (10000, 0.5, 20, 0.5)


def test_assign_and_embed():
    cfg = _cfg()
    model, batch = _initialised(cfg)
    x = batch["views"][0][:4]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and bool(((0 <= a) & (a < 4)).all())


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(rotation_degrees=0.0)
    model, batch = _initialised(cfg)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 0.3)
    losses = []
    for step in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 30)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert torch.bincount(model.memory_labels, minlength=4).min() >= cfg.min_cluster_size
