"""PCL: ProtoNCE's two terms and the concentration phi (Eq. 12 with the official small-cluster rule,
percentile clipping and mean tau) against direct loops in float64, the negative prototypes, the warm-up,
the E-step hook, the momentum encoder and queue, gradients, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

pcl = load("pcl")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def info_nce_loop(q, k, queue, t):
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        pos = math.exp(sum(a * b for a, b in zip(qi, ki)) / t)
        neg = sum(math.exp(sum(a * b for a, b in zip(qi, kj)) / t) for kj in queue.tolist())
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def proto_loop(q, c, phi, labels, columns):
    """-log exp(v.c_s/phi_s) / sum_{j in columns} exp(v.c_j/phi_j), averaged over the samples."""
    total = 0.0
    cols = [j for j in range(len(c)) if columns[j]]
    for qi, s in zip(q.tolist(), labels.tolist()):
        score = {j: math.exp(sum(a * b for a, b in zip(qi, c[j].tolist())) / float(phi[j])) for j in cols}
        total += -math.log(score[s] / sum(score.values()))
    return total / len(q)


def test_info_nce_matches_the_loop():
    q, k, queue = _unit(5, 4, seed=1), _unit(5, 4, seed=2), _unit(7, 4, seed=3)
    assert pcl.info_nce(3 * q, k, queue, 0.2).item() == pytest.approx(info_nce_loop(q, k, queue, 0.2), rel=1e-10)


def test_prototype_term_matches_the_loop_over_the_selected_columns():
    q, c = _unit(6, 4, seed=1), _unit(9, 4, seed=2)
    phi = torch.linspace(0.05, 0.4, 9, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 5, 8, 0])
    columns = torch.zeros(9, dtype=torch.bool)
    columns[[0, 2, 3, 5, 6, 8]] = True  # the labels' prototypes and two others
    got = pcl.prototype_nce(2 * q, c, phi, labels, columns).item()
    assert got == pytest.approx(proto_loop(q, c, phi, labels, columns), rel=1e-10)
    everything = torch.ones(9, dtype=torch.bool)
    assert pcl.prototype_nce(q, c, phi, labels, everything).item() == pytest.approx(proto_loop(q, c, phi, labels, everything), rel=1e-10)


def test_protonce_is_info_nce_plus_the_mean_over_granularities():
    q, k, queue = _unit(4, 3, seed=1), _unit(4, 3, seed=2), _unit(5, 3, seed=3)
    grans = []
    for m, kk in enumerate((3, 6)):
        c, phi = _unit(kk, 3, seed=10 + m), torch.rand(kk, dtype=torch.float64) + 0.1
        grans.append((c, phi, torch.tensor([0, 1, 2, 1]), torch.ones(kk, dtype=torch.bool)))
    loss, proto = pcl.protonce_loss(q, k, queue, 0.2, grans)
    want_proto = sum(proto_loop(q, c, phi, y, cols) for c, phi, y, cols in grans) / 2
    assert proto.item() == pytest.approx(want_proto, rel=1e-10)
    assert loss.item() == pytest.approx(info_nce_loop(q, k, queue, 0.2) + want_proto, rel=1e-10)
    alone, zero = pcl.protonce_loss(q, k, queue, 0.2, [])  # before the first E-step
    assert alone.item() == pytest.approx(info_nce_loop(q, k, queue, 0.2), rel=1e-10) and zero.item() == 0


def test_known_limits():
    c = _unit(5, 8, seed=4)
    phi = torch.full((5,), 0.1, dtype=torch.float64)
    cols, labels = torch.ones(5, dtype=torch.bool), torch.arange(5)
    at_own = pcl.prototype_nce(c, c, phi, labels, cols)
    at_other = pcl.prototype_nce(c.roll(1, 0), c, phi, labels, cols)
    assert at_own < at_other
    # a tighter phi of the own prototype sharpens the pull: lower loss when the sample sits on it
    assert pcl.prototype_nce(c, c, phi / 2, labels, cols) < at_own
    # a constant embedding against r keys equal to it: log(r + 1)
    z = _unit(1, 8, seed=5).repeat(4, 1)
    assert pcl.info_nce(z, z, z[:1].repeat(7, 1), 0.2).item() == pytest.approx(math.log(8), rel=1e-10)


def percentile(values, p):
    """numpy's linear-interpolation percentile, by hand."""
    s = sorted(values)
    pos = (len(s) - 1) * p / 100
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def phi_loop(points, centroids, labels, k, tau, alpha):
    members = [[i for i in range(len(points)) if labels[i] == j] for j in range(k)]
    dist = lambda i, j: math.sqrt(sum((a - b) ** 2 for a, b in zip(points[i], centroids[j])))  # noqa: E731
    phi = [sum(dist(i, j) for i in mem) / (len(mem) * math.log(len(mem) + alpha)) if len(mem) > 1 else None
           for j, mem in enumerate(members)]
    top = max(p for p in phi if p is not None)
    phi = [top if p is None else p for p in phi]  # a cluster of at most one image: the largest phi
    lo, hi = percentile(phi, 10), percentile(phi, 90)
    phi = [min(max(p, lo), hi) for p in phi]
    mean = sum(phi) / k
    return [tau * p / mean for p in phi]


def test_concentration_matches_the_official_estimate():
    g = torch.Generator().manual_seed(0)
    k = 12
    labels = torch.cat([torch.arange(k - 2).repeat_interleave(torch.arange(2, k)), torch.tensor([k - 2])])  # sizes 2..11, 1, 0
    centroids = torch.randn(k, 4, generator=g, dtype=torch.float64)
    spread = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    points = centroids[labels] + spread[labels, None] * torch.randn(len(labels), 4, generator=g, dtype=torch.float64)
    distances = (points - centroids[labels]).norm(dim=1)
    got = pcl.concentration(distances, labels, k, 0.2, 10.0)
    want = phi_loop(points.tolist(), centroids.tolist(), labels.tolist(), k, 0.2, 10.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert got.mean().item() == pytest.approx(0.2, rel=1e-12)
    assert int((got == got.max()).sum()) >= 2  # clipped at the 90th percentile


def test_prototype_columns_keep_the_batch_and_draw_r_others():
    labels = torch.tensor([1, 4, 4, 7])
    cols = pcl.prototype_columns(labels, 20, 5)
    assert cols[[1, 4, 7]].all() and int(cols.sum()) == 3 + 5
    assert pcl.prototype_columns(labels, 20, 17).all() and pcl.prototype_columns(labels, 20, 100).all()
    draws = {tuple(pcl.prototype_columns(labels, 20, 5).nonzero().flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1  # drawn afresh each time


def _cfg(**kw):
    base = dict(num_clusters=(3, 6), proto_warmup_epochs=2, queue_size=16, num_negative_prototypes=2,
                proj_hidden_dim=16, proj_dim=8, kmeans_restarts=2)
    return pcl.Config(**{**base, **kw})


def test_warm_up_is_info_nce_alone_then_the_e_step_adds_the_prototype_term():
    cfg = _cfg()
    model = tiny_model(pcl, cfg)
    model.setup(16, 10)
    batch = fixed_batch(pcl, cfg, n=16)
    model.on_epoch_start(1, 10, lambda encode=None: pytest.fail("no clustering during the warm-up"))
    torch.manual_seed(3)
    out = model(batch)
    q = F.normalize(model.encoder_q(batch["views"][0]), dim=1)
    k = model.momentum_features(batch["views"][1])
    torch.testing.assert_close(out["loss"], pcl.info_nce(q, k, model.queue, cfg.temperature))
    assert out["proto_loss"].item() == 0
    model.on_epoch_start(2, 10, lambda encode: encode(batch["views"][0]))
    assert bool(model.clustered)
    out = model(batch)
    assert out["proto_loss"].item() > 0
    torch.testing.assert_close(out["loss"] - out["proto_loss"], pcl.info_nce(q, k, model.queue, cfg.temperature))


def test_e_step_clusters_the_momentum_features_at_every_granularity():
    cfg = _cfg()
    model = tiny_model(pcl, cfg)
    model.setup(16, 10)
    x = fixed_batch(pcl, cfg, n=16)["views"][0]
    with torch.no_grad():  # the momentum encoder apart from the query encoder, so that the features tell them apart
        for p in model.encoder_k.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seen = []
    model.on_epoch_start(2, 10, lambda encode: seen.append(encode) or encode(x))
    assert seen == [model.momentum_features]
    v = F.normalize(model.encoder_k(x), dim=1)
    for m, kk in enumerate(cfg.num_clusters):
        c, phi = model.prototypes(m)
        assert c.shape == (kk, 8) and phi.shape == (kk,)
        torch.testing.assert_close(c.norm(dim=1), torch.ones(kk))
        assert phi.mean().item() == pytest.approx(cfg.temperature, rel=1e-5)
        labels = model.assignments[m]
        assert labels.shape == (16,) and int(labels.min()) >= 0 and int(labels.max()) < kk
        want_labels, want_c, want_phi = pcl.cluster(v, kk, cfg, torch.Generator().manual_seed(m))
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(c, want_c)
        torch.testing.assert_close(phi, want_phi)
        # every image sits in the cluster of its nearest unnormalised centroid: Lloyd's fixed point
        raw = torch.stack([v[labels == j].mean(0) for j in range(kk)])
        assert torch.equal(pcl.nearest_centroid(v, raw), labels)
    assert not torch.equal(model.prototypes(0)[0][:3], model.prototypes(1)[0][:3])


def test_best_kmeans_keeps_the_lowest_objective():
    x = torch.randn(60, 3)
    obj = lambda lab, c: float(((x - c[lab]) ** 2).sum())  # noqa: E731
    runs = [pcl.kmeans(x, 5, 20, g) for g in [torch.Generator().manual_seed(0)] for _ in range(4)]
    best = pcl.best_kmeans(x, 5, 20, 4, torch.Generator().manual_seed(0))
    assert obj(*best) == pytest.approx(min(obj(*r) for r in runs))


def test_momentum_encoder_and_queue_update_without_gradients():
    cfg = _cfg(key_momentum=0.9)
    model = tiny_model(pcl, cfg)
    model.setup(16, 10)
    model.set_clusters([torch.arange(16) % 3, torch.arange(16) % 6], [_unit(3, 8).float(), _unit(6, 8, seed=1).float()],
                       [torch.full((3,), 0.2), torch.linspace(0.1, 0.3, 6)])
    batch = fixed_batch(pcl, cfg, n=8)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    out = model(batch)
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert not model.queue.requires_grad and all(not model.prototypes(m)[0].requires_grad for m in range(2))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    queue_before = model.queue.clone()
    keys = model.pending_keys.clone()
    model.on_step_end(1, 10)
    for pk, pk0, pq in zip(model.encoder_k.parameters(), before_k, model.encoder_q.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    torch.testing.assert_close(model.queue[:8], keys)
    torch.testing.assert_close(model.queue[8:], queue_before[8:])
    assert int(model.queue_ptr) == 8 and model.pending_keys is None


def test_gradients_reach_the_backbone_through_both_terms():
    cfg = _cfg()
    model = tiny_model(pcl, cfg)
    model.setup(16, 10)
    model.set_clusters([torch.arange(16) % 3, torch.arange(16) % 6], [_unit(3, 8).float(), _unit(6, 8, seed=1).float()],
                       [torch.full((3,), 0.2), torch.linspace(0.1, 0.3, 6)])
    batch = fixed_batch(pcl, cfg, n=8)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    q = model.encoder_q(batch["views"][0])
    labels = model.assignments[1, batch["index"]]
    c, phi = model.prototypes(1)
    proto = pcl.prototype_nce(q, c, phi, labels, torch.ones(6, dtype=torch.bool))
    assert backbone_grad_norm(model, proto, model.backbone) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.backbone.parameters())


def test_view_recipe_and_presets():
    cfg = pcl.Config()
    q, k = pcl.augmentations(cfg, 224)
    names = [type(t).__name__ for t in q.transforms]
    assert names[1] == "RandomResizedCrop" and names[-3] == "RandomHorizontalFlip"
    assert [type(t.transforms[0]).__name__ for t in q.transforms if type(t).__name__ == "RandomApply"] == ["ColorJitter", "GaussianBlur"]
    v1 = [type(t).__name__ for t in pcl.augmentations(dataclasses.replace(cfg, **pcl.PRESETS["v1"]), 224)[0].transforms]
    assert v1.index("RandomGrayscale") < v1.index("ColorJitter") and "RandomApply" not in v1
    assert "RandomApply" in names and all("GaussianBlur" not in repr(t) for t in pcl.augmentations(cfg, 32)[0].transforms)
    assert views.plan_views(pcl.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    fields = {f.name for f in dataclasses.fields(pcl.Config)}
    assert set(pcl.PRESETS["small"]) <= fields and set(pcl.PRESETS["v1"]) <= fields
    assert cfg.num_clusters == (25000, 50000, 100000) and cfg.key_momentum == 0.999 and cfg.alpha == 10


def test_setup_embed_and_assign():
    cfg = _cfg()
    model = tiny_model(pcl, cfg)
    with pytest.raises(ValueError, match="more clusters than the 4"):
        model.setup(4, 10)
    model.setup(16, 10)
    assert model.assignments.shape == (2, 16)
    x = fixed_batch(pcl, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    want = (F.normalize(model.encoder_k(x), dim=1) @ model.prototypes(0)[0].T).argmax(1)
    assert a.shape == (4,) and torch.equal(a, want) and bool(((0 <= a) & (a < 3)).all())


def test_smoke_fit_lowers_the_loss():
    # One fixed batch of 32 and a queue of 32: from step 1 on the queue holds this batch's keys of the step
    # before (step 0 contrasts against the random initial queue, an easier task), as in moco's smoke fit;
    # the prototypes of one E-step on the batch are fixed throughout.
    cfg = _cfg(num_clusters=(4, 8), key_momentum=0.99, queue_size=32)
    model = tiny_model(pcl, cfg)
    model.setup(32, 10)
    batch = train.prepare_batch(fixed_batch(pcl, cfg, n=32), torch.device("cpu"), False, False)
    model.on_epoch_start(2, 10, lambda encode: encode(batch["views"][0]))
    opt = train.build_optimizer(model, cfg, 0.05)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.on_step_end(step + 1, 30)
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[1:6]) / 5 - 0.3, losses
