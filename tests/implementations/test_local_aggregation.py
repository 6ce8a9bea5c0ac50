"""Local Aggregation: Eq. 3 against a direct computation with explicit sets, its limits (C = B, C = {i}),
background neighbours as brute-force top-k, close neighbours as a union over k-means runs, the bank update,
the IR warm start and the clustering schedule, gradients, the view recipe and preset, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

la = load("local-aggregation")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def direct_la(v, bank, labels, index, k, t):
    """Eq. 1-3 with explicit Python sets: B_i the k nearest bank entries, C_i the union over runs of i's
    cluster, P over the whole bank (the normaliser included)."""
    total = 0.0
    n = len(bank)
    for row, i in enumerate(index.tolist()):
        scores = [float(v[row] @ bank[j]) for j in range(n)]
        z = sum(math.exp(s / t) for s in scores)
        p = [math.exp(s / t) / z for s in scores]  # Eq. 1
        b = set(sorted(range(n), key=lambda j: -scores[j])[:k])
        c = {j for j in range(n) if any(labels[r][j] == labels[r][i] for r in range(len(labels)))}
        p_b, p_cb = sum(p[j] for j in b), sum(p[j] for j in b & c)  # Eq. 2
        total += -math.log(p_cb / p_b)  # Eq. 3
    return total / len(index)


def la_through_the_file(v, bank, labels, index, k, t):
    sim = v @ bank.T
    back_sim, back_idx = la.background_neighbours(sim, k)
    close = la.close_neighbours(labels, index, back_idx)
    return la.local_aggregation_loss(back_sim, close, t)


def test_loss_matches_explicit_sets_in_float64():
    n, k, t = 20, 7, 0.1
    bank, v = _unit(n, 5, seed=1), _unit(4, 5, seed=2)
    index = torch.tensor([3, 0, 11, 19])
    v = F.normalize(v + 2 * bank[index], dim=1)  # near their own entries, so that i is in B_i
    g = torch.Generator().manual_seed(3)
    labels = torch.stack([torch.randint(4, (n,), generator=g), torch.randint(5, (n,), generator=g)])  # 2 runs
    got = la_through_the_file(v, bank, labels, index, k, t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(direct_la(v, bank, labels.tolist(), index, k, t), rel=1e-10)


def test_close_equal_background_gives_zero_and_singleton_gives_ir_ratio():
    n, k, t = 16, 6, 0.07
    bank, v = _unit(n, 4, seed=4), _unit(3, 4, seed=5)
    index = torch.tensor([2, 5, 9])
    sim = v @ bank.T
    back_sim, back_idx = la.background_neighbours(sim, k)
    # C_i = B_i: every background neighbour is close, the ratio is 1
    assert la.local_aggregation_loss(back_sim, torch.ones_like(back_sim, dtype=torch.bool), t).item() == 0.0
    # C_i = {i} with i in B_i: -log of i's softmax among B_i, an IR-style ratio restricted to B_i
    back_idx[:, 0] = index  # i among its neighbours
    back_sim[:, 0] = sim[torch.arange(3), index]
    single = back_idx == index[:, None]
    want = -(back_sim / t).log_softmax(dim=1)[:, 0].mean()
    torch.testing.assert_close(la.local_aggregation_loss(back_sim, single, t), want)
    # C_i = {i}, B_i = the whole bank: exactly IR, -log P(i | v_i) of Eq. 1
    full = torch.arange(n).expand(3, n) == index[:, None]
    ir = sum(-math.log(math.exp(sim[r, i] / t) / sum(math.exp(s / t) for s in sim[r].tolist()))
             for r, i in enumerate(index.tolist())) / 3
    assert la.local_aggregation_loss(sim, full, t).item() == pytest.approx(ir, rel=1e-10)
    assert la.instance_recognition_loss(sim, index, t).item() == pytest.approx(ir, rel=1e-10)


def test_empty_intersection_adds_zero_without_gradient():
    sim = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    close = torch.tensor([[False] * 5, [True, False, True, False, False]])
    loss = la.local_aggregation_loss(sim, close, 0.1)
    only = -(sim[1] / 0.1).log_softmax(0)[[0, 2]].logsumexp(0) / 2
    torch.testing.assert_close(loss, only)
    loss.backward()
    assert torch.isfinite(sim.grad).all() and float(sim.grad[0].abs().sum()) == 0.0


def test_background_neighbours_are_the_brute_force_top_k():
    sim = torch.randn(5, 30)
    values, idx = la.background_neighbours(sim, 8)
    for r in range(5):
        want = sorted(range(30), key=lambda j: -float(sim[r, j]))[:8]
        assert set(idx[r].tolist()) == set(want)
        torch.testing.assert_close(values[r], sim[r, idx[r]])


def test_close_neighbours_are_the_union_over_runs():
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(3, (4, 25), generator=g)  # 4 runs of 3 clusters
    index = torch.tensor([0, 7, 24])
    nb = torch.randint(25, (3, 10), generator=g)
    got = la.close_neighbours(labels, index, nb)
    for r, i in enumerate(index.tolist()):
        c = set()
        for run in labels.tolist():
            c |= {j for j in range(25) if run[j] == run[i]}
        assert got[r].tolist() == [j in c for j in nb[r].tolist()]
    # identity labels (before the first clustering): C_i = {i}
    ident = torch.arange(25).repeat(2, 1)
    assert torch.equal(la.close_neighbours(ident, index, nb), nb == index[:, None])


def test_cluster_bank_is_seeded_kmeans_per_run():
    bank = _unit(60, 8, seed=7).float()
    labels = la.cluster_bank(bank, 3, 5, 10)
    assert labels.shape == (3, 60) and labels.dtype == torch.long
    for r in range(3):
        want, _ = la.kmeans(bank, 5, 10, torch.Generator().manual_seed(1234 + r))
        assert torch.equal(labels[r], want)
    assert not torch.equal(labels[0], labels[1])  # different seeds, different partitions


def _cfg(**kw):
    return la.Config(**{**dict(background_k=16, num_kmeans=3, kmeans_k=4, kmeans_iterations=5, ir_epochs=2), **kw})


def _model(cfg, n=32):
    model = tiny_model(la, cfg)
    model.setup(n, 10)
    return model, fixed_batch(la, cfg, n=n)


def test_bank_update_rule_and_no_gradient():
    cfg = _cfg()
    model, batch = _model(cfg)
    assert model.bank.shape == (32, 128) and not model.bank.requires_grad
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(32))
    batch = {**batch, "index": torch.arange(8, 40) % 32}
    before = model.bank.clone()
    out = model(batch)
    with torch.no_grad():
        v = F.normalize(model.projector(model.backbone(batch["views"][0])), dim=1)
    idx = batch["index"]
    want = F.normalize(0.5 * before[idx] + 0.5 * v, dim=1)
    torch.testing.assert_close(model.bank[idx], want, atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    assert model.bank.grad is None and model.cluster_labels.grad is None
    assert model.projector.weight.grad is not None


def test_ir_warm_start_then_clustering_on_schedule():
    cfg = _cfg(kmeans_every=2)
    model, batch = _model(cfg)
    assert torch.equal(model.cluster_labels, torch.arange(32).repeat(3, 1))  # identity until the first clustering
    fail = lambda: pytest.fail("LA clusters the bank, not features()")  # noqa: E731
    for epoch in range(2):  # IR epochs: nothing changes, the loss is IR over the whole bank
        model.on_epoch_start(epoch, 10, fail)
        assert not bool(model.aggregating)
        sim = F.normalize(model.projector(model.backbone(batch["views"][0])), dim=1) @ model.bank.T
        want = la.instance_recognition_loss(sim, batch["index"], cfg.temperature)
        torch.testing.assert_close(model(batch)["loss"], want)
    bank = model.bank.clone()
    model.on_epoch_start(2, 10, fail)
    assert bool(model.aggregating) and model._aggregating
    assert torch.equal(model.cluster_labels, la.cluster_bank(bank, 3, 4, 5))
    labels = model.cluster_labels.clone()
    model.bank.copy_(_unit(32, 128, seed=9).float())
    model.on_epoch_start(3, 10, fail)  # kmeans_every 2: no clustering in epoch 3
    assert torch.equal(model.cluster_labels, labels)
    model.on_epoch_start(4, 10, fail)
    assert not torch.equal(model.cluster_labels, labels)
    # LA's loss in forward is Eq. 3 on the bank and labels
    v = F.normalize(model.projector(model.backbone(batch["views"][0])), dim=1)
    want = la_through_the_file(v.detach().double(), model.bank.double(), model.cluster_labels, batch["index"], 16,
                               cfg.temperature)
    out = model(batch)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-4)
    assert 0 < float(out["close_frac"]) < 1
    # the flag is a buffer: a fresh model restored from the state dict is in the LA stage too
    fresh, _ = _model(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh(batch)["close_frac"] > 0


def test_gradients_reach_the_backbone_in_both_stages():
    cfg = _cfg(ir_epochs=0)
    model, batch = _model(cfg)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0  # IR
    model.on_epoch_start(0, 10, None)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0  # LA


def test_view_recipe_and_preset():
    cfg = la.Config()
    (pipe,) = la.augmentations(cfg, 224)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "RandomGrayscale", "ColorJitter",
                     "ToDtype", "Normalize"]
    assert tuple(pipe.transforms[1].scale) == (0.2, 1.0) and pipe.transforms[3].p == 0.2
    assert views.plan_views(la.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert (cfg.background_k, cfg.num_kmeans, cfg.kmeans_k, cfg.temperature, cfg.bank_momentum, cfg.ir_epochs) == (
        4096, 10, 30000, 0.07, 0.5, 10)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(0.03)
    assert set(la.PRESETS["small"]) <= {f.name for f in dataclasses.fields(la.Config)}


def test_embed_shape_and_setup_required():
    model = tiny_model(la, _cfg())
    with pytest.raises(RuntimeError, match="setup"):
        model(fixed_batch(la, _cfg(), n=4))
    model.setup(32, 10)
    assert model.embed(torch.randn(3, 3, 32, 32)).shape == (3, model.backbone.feature_dim)


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(ir_epochs=0)
    losses, model = smoke_fit(la, cfg, steps=30)  # IR on the fixed batch
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    model.on_epoch_start(0, 10, None)  # then LA on the bank it leaves behind
    batch = train.prepare_batch(fixed_batch(la, cfg), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 0.03)
    la_losses = []
    for _ in range(20):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        la_losses.append(loss.item())
    assert all(math.isfinite(v) for v in la_losses)
    assert sum(la_losses[-5:]) / 5 < sum(la_losses[:5]) / 5, la_losses
