"""DeepCluster-v2: spherical k-means against a direct Lloyd loop, the loss against a direct computation,
the memory (filled, written by index, no gradient), the epoch hook (prototypes = centroids, labels),
multi-crop, gradients, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

dc2 = load("deepcluster-v2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_spherical_kmeans_is_lloyd_by_cosine():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 3, generator=g, dtype=torch.float64), dim=1)
    labels, centroids = dc2.spherical_kmeans(x, 4, 6, torch.Generator().manual_seed(5))
    # the same iterations, written out: start from the same draw, assign by the largest cosine
    c = x[torch.randperm(40, generator=torch.Generator().manual_seed(5))[:4]].clone()
    for _ in range(6):
        lab = torch.tensor([max(range(4), key=lambda j: float(xi @ c[j])) for xi in x])
        for j in range(4):
            members = x[lab == j]
            if len(members):
                c[j] = members.mean(0) / members.mean(0).norm()
    lab = torch.tensor([max(range(4), key=lambda j: float(xi @ c[j])) for xi in x])
    assert torch.equal(labels, lab)
    torch.testing.assert_close(centroids, c)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_spherical_kmeans_finds_directions_and_keeps_empty_centroids():
    g = torch.Generator().manual_seed(1)
    truth = torch.arange(3).repeat_interleave(30)
    x = F.normalize(torch.eye(3)[truth] + 0.1 * torch.randn(90, 3, generator=g), dim=1)
    labels, _ = dc2.spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    assert len({(int(a), int(b)) for a, b in zip(labels, truth)}) == 3
    # two identical rows drawn as two centroids: one of them never wins a row and keeps its place
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    for seed in range(6):
        _, c = dc2.spherical_kmeans(x, 3, 3, torch.Generator().manual_seed(seed))
        assert torch.isfinite(c).all() and torch.allclose(c.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="between 1 and the number of embeddings"):
        dc2.spherical_kmeans(x, 11, 1, torch.Generator())


def test_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    n, v, tau = 3, 4, 0.1
    scores = [torch.randn(v * n, k, generator=g, dtype=torch.float64) for k in (5, 3)]
    labels = [torch.tensor([4, 0, 2]), torch.tensor([1, 1, 0])]
    want = 0.0
    for s, y in zip(scores, labels):
        head = 0.0
        for row in range(v * n):  # crops are stacked view by view: row = view * n + image
            logits = [float(t) / tau for t in s[row]]
            log_z = math.log(sum(math.exp(t) for t in logits))
            head += log_z - logits[int(y[row % n])]
        want += head / (v * n)
    assert dc2.deepcluster_v2_loss(scores, labels, tau).item() == pytest.approx(want / 2, rel=1e-6)


def _cfg(**kw):
    return dc2.Config(**{**dict(num_prototypes=(4, 3), proj_hidden_dim=16, proj_dim=8, n_local_crops=2,
                                epochs=10, warmup_epochs=0), **kw})


def _clustered(cfg, n=32):
    model = tiny_model(dc2, cfg)
    model.setup(n, 10)
    batch = fixed_batch(dc2, cfg, n=n)
    images = batch["views"][0]  # stands for the whole training set in index order

    def features(encode=None):  # as the harness: the model in eval mode
        model.eval()
        out = (encode or model.embed)(images).detach()
        model.train()
        return out

    model.on_epoch_start(0, cfg.epochs, features)
    return model, batch


def test_no_step_before_the_first_clustering():
    model = tiny_model(dc2, _cfg())
    model.setup(32, 10)
    with pytest.raises(RuntimeError, match="no pseudo-labels yet"):
        model(fixed_batch(dc2, _cfg(), n=8))
    with pytest.raises(ValueError, match="above the 3 training images"):
        model.setup(3, 10)


def test_first_hook_fills_the_memory_and_clusters_it():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    model.eval()
    z = F.normalize(model.projector(model.backbone(batch["views"][0])), dim=1).detach()
    torch.testing.assert_close(model.memory[0], z)
    torch.testing.assert_close(model.memory[1], z)
    g = torch.Generator().manual_seed(29)  # epoch 0's generator, drawn head after head
    for h, k in enumerate(cfg.num_prototypes):
        labels, centroids = dc2.spherical_kmeans(model.memory[h % 2], k, cfg.kmeans_iterations, g)
        assert torch.equal(model.assignments[h], labels)
        torch.testing.assert_close(model.prototypes()[h], centroids)
    assert {n for n, _ in model.named_parameters() if "prototypes" in n} == set()  # buffers, not trained


def test_step_writes_the_global_crops_into_the_memory_by_index():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    sub = {"views": [v[:5] for v in batch["views"]], "index": torch.tensor([7, 3, 30, 0, 12])}
    before = model.memory.clone()
    model.train()
    out = model(sub)
    z = F.normalize(model.projector(dc2.multicrop_features(model.backbone, sub["views"])), dim=1).detach()  # BN: all crops
    for a in range(2):
        torch.testing.assert_close(model.memory[a, sub["index"]], z[a * 5 : (a + 1) * 5], atol=1e-5, rtol=0)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[sub["index"]] = False
    assert torch.equal(model.memory[:, untouched], before[:, untouched])
    assert not model.memory.requires_grad and torch.isfinite(out["loss"])


def test_later_epochs_recluster_the_memory_without_features():
    cfg = _cfg()
    model, _ = _clustered(cfg)
    with torch.no_grad():
        model.memory.copy_(F.normalize(torch.randn_like(model.memory), dim=-1))
    model.on_epoch_start(1, cfg.epochs, lambda encode=None: pytest.fail("the memory, not a features pass"))
    g = torch.Generator().manual_seed(1_000_003 + 29)
    labels, centroids = dc2.spherical_kmeans(model.memory[0], 4, cfg.kmeans_iterations, g)
    assert torch.equal(model.assignments[0], labels)
    torch.testing.assert_close(model.prototypes0, centroids)


def test_gradients_reach_the_backbone_and_not_the_prototypes():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and 0 <= float(out["pseudo_label_acc"]) <= 1
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert all(not b.requires_grad for b in model.prototypes())


def test_view_recipe_and_preset():
    cfg = dc2.Config()
    pipes = dc2.augmentations(cfg, 224)
    assert len(pipes) == 8
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert tuple(crops[0].scale) == (0.14, 1.0) and tuple(crops[2].scale) == (0.05, 0.14)
    small = dc2.augmentations(_cfg(), 32, (0.5,) * 3, (0.25,) * 3)
    assert views.plan_views(small, in_memory=True).mode == "device"
    assert set(dc2.PRESETS["small"]) <= {f.name for f in dataclasses.fields(dc2.Config)}
    with pytest.raises(ValueError, match="crops_for_assign"):
        tiny_model(dc2, _cfg(crops_for_assign=(0, 5)))


def test_assign_and_embed():
    cfg = _cfg()
    model, batch = _clustered(cfg)
    x = batch["views"][0][:4]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and bool(((0 <= a) & (a < 4)).all())


def test_smoke_fit_lowers_the_loss():
    """From prototypes of a spread memory (at init the tiny CNN embeds every image in nearly one direction,
    so the first centroids are nearly equal): the network learns to classify the fixed batch into them."""
    cfg = _cfg(optimizer="sgd")
    model, batch = _clustered(cfg)
    with torch.no_grad():
        model.memory.copy_(F.normalize(torch.randn(model.memory.shape, generator=torch.Generator().manual_seed(3)), dim=-1))
    model.on_epoch_start(1, cfg.epochs, None)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2.0)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
