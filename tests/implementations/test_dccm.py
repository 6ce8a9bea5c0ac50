"""DCCM: the pseudo-graph, the pseudo-label mask, the graph and label losses, the triplet selection, the
discriminator and the JSD estimator against direct computations in float64; the limits (a perfect one-hot
prediction consistent across views, constant scores); the keras-style transform; the model's targets
(no gradient through the originals), gradients, setup, view recipe and preset, assign, smoke fit."""

import dataclasses
import math

import pytest
import torch

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

dccm = load("dccm")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _probs(n, k, sharp=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(n, k, generator=g, dtype=torch.float64)).softmax(dim=1)


def test_pseudo_graph_is_the_thresholded_cosine_similarity():
    p = _probs(12, 4)
    w = dccm.pseudo_graph(p, 0.95)
    rows = p.tolist()
    want = torch.tensor([[_cos(a, b) >= 0.95 for b in rows] for a in rows])
    assert torch.equal(w, want)
    assert bool(w.diagonal().all()) and torch.equal(w, w.T)
    assert 0 < float(w.double().mean()) < 1  # the test data has both links and separations


def test_pseudo_label_mask_is_the_confident_argmax():
    p = _probs(20, 5, sharp=4.0)
    labels, confident = dccm.pseudo_labels(p, 0.9)
    for i, row in enumerate(p.tolist()):
        assert int(labels[i]) == max(range(5), key=lambda k: row[k])
        assert bool(confident[i]) == (max(row) >= 0.9)
    assert 0 < int(confident.sum()) < 20


def test_graph_loss_is_the_mean_binary_cross_entropy():
    p = _probs(6, 3, seed=1)
    q = _probs(6, 3, seed=2)
    w = dccm.pseudo_graph(q, 0.8)
    rows = p.tolist()
    want = 0.0
    for i in range(6):
        for j in range(6):
            s = min(_cos(rows[i], rows[j]), 1.0)
            t = float(w[i, j])
            want += -(t * max(math.log(s), -100) + (1 - t) * max(math.log(1 - s) if s < 1 else -math.inf, -100))
    assert dccm.graph_loss(p, p, w).item() == pytest.approx(want / 36, rel=1e-6)
    # rows against all columns: the block of the rows, averaged over its entries
    part = dccm.graph_loss(p[2:4], p, w[2:4]).item()
    block = [-(float(w[i, j]) * math.log(_cos(rows[i], rows[j])) + (1 - float(w[i, j])) * math.log(1 - _cos(rows[i], rows[j])))
             for i in (2, 3) for j in range(6) if i != j]
    diag = [0.0, 0.0]  # S_ii = 1 with W_ii = 1
    assert part == pytest.approx(sum(block + diag) / 12, rel=1e-6)


def test_label_loss_is_the_official_weighted_bce():
    p = _probs(7, 4, seed=3)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    confident = torch.tensor([True, False, True, True, False, True, False])
    want = 0.0
    for i, row in enumerate(p.tolist()):
        if not confident[i]:
            continue
        per_class = [-(math.log(v + 1e-12) if k == labels[i] else math.log(1 - v + 1e-12)) for k, v in enumerate(row)]
        want += sum(per_class) / 4
    assert dccm.label_loss(p, labels, confident).item() == pytest.approx(want / 7, rel=1e-9)  # over all 7 images


def test_a_perfect_consistent_prediction_minimises_graph_and_label_terms():
    """One-hot predictions, the same for the original and its copy: S' = W and p' = the pseudo-label,
    so both cross-entropies are 0, their minimum; any softening or disagreement raises them."""
    one_hot = torch.eye(4, dtype=torch.float64).repeat(3, 1)[torch.randperm(12)]  # (12, 4)
    w = dccm.pseudo_graph(one_hot, 0.95)
    labels, confident = dccm.pseudo_labels(one_hot, 0.9)
    assert bool(confident.all())
    assert dccm.graph_loss(one_hot, one_hot, w).item() == pytest.approx(0.0, abs=1e-9)
    assert dccm.label_loss(one_hot, labels, confident).item() == pytest.approx(0.0, abs=1e-9)
    soft = 0.9 * one_hot + 0.1 / 4
    assert dccm.graph_loss(soft, soft, w).item() > 0.01
    assert dccm.label_loss(soft, labels, confident).item() > 0.01
    shuffled = one_hot[torch.randperm(12)]  # confident, but not the originals' clusters
    assert dccm.label_loss(shuffled, labels, confident).item() > 1.0
    flat = torch.full((12, 4), 0.25, dtype=torch.float64)  # collapse: every separated pair costs log(1/eps)
    assert dccm.graph_loss(flat, flat, w).item() == pytest.approx(100 * float((~w).double().mean()), rel=1e-6)


def _scan(graph):
    """Direct triplet selection: scan i+1, i+2, ... cyclically for the first neighbour and the first two
    separated images."""
    n = len(graph)
    pos, negs, valid = [], [], []
    for i in range(n):
        others = [(i + d) % n for d in range(1, n)]
        linked = [j for j in others if graph[i, j]]
        apart = [j for j in others if not graph[i, j]]
        pos.append(linked[0] if linked else i)
        negs.append([apart[k] if k < len(apart) else i for k in range(2)])
        valid.append([k < len(apart) for k in range(2)])
    return torch.tensor(pos), torch.tensor(negs), torch.tensor(valid)


def test_triplets_are_the_graph_neighbour_and_separated_images():
    for seed in range(4):
        labels = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(seed))
        graph = labels[:, None] == labels[None, :]
        graph[0] = True  # an anchor linked to every image: no negative
        graph[:, 0] = True
        got = dccm.triplet_pairs(graph)
        for a, b in zip(got, _scan(graph)):
            assert torch.equal(a, b), seed
    lone = torch.eye(5, dtype=torch.bool)  # no neighbours: the positive is the anchor itself
    pos, _, valid = dccm.triplet_pairs(lone)
    assert torch.equal(pos, torch.arange(5)) and bool(valid.all())


def test_discriminator_is_concat_and_convolve():
    torch.manual_seed(1)
    disc = dccm.LocalDiscriminator(map_channels=3, y_dim=2, hidden_dim=5).double()
    y = torch.randn(4, 2, dtype=torch.float64)
    m = torch.randn(6, 3, 7, dtype=torch.float64)  # 6 maps of 7 locations
    anchor, other = torch.tensor([0, 1, 3, 3]), torch.tensor([5, 1, 0, 2])
    got = disc(y, m, anchor, other)
    assert got.shape == (4, 7)
    for p in range(4):  # the official form: [M; Y replicated] through the three 1x1 convs
        cat = torch.cat([m[other[p]], y[anchor[p]][:, None].expand(-1, 7)])[None, :, :, None]  # (1, 5, 7, 1)
        h = torch.relu(disc.c0(cat))
        h = torch.relu(disc.c1(h))
        torch.testing.assert_close(got[p], disc.c2(h)[0, 0, :, 0])


def test_jsd_estimator_and_its_limits():
    pos = torch.randn(6, 5, dtype=torch.float64)
    neg = torch.randn(6, 5, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, False, True])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    e_joint = sum(-sp(-v) for v in pos.flatten().tolist()) / 30
    kept = [v for r, ok in zip(neg.tolist(), valid.tolist()) if ok for v in r]
    e_marg = sum(sp(v) for v in kept) / len(kept)
    assert dccm.jsd_mi_loss(pos, neg, valid).item() == pytest.approx(-(e_joint - e_marg), rel=1e-9)
    # a rank's share: scaled by the world size over the global count, so the mean over ranks is the whole
    halves = [dccm.jsd_mi_loss(pos[s], neg[s], valid[s], int(valid.sum()), world=2) for s in (slice(0, 3), slice(3, 6))]
    assert float(sum(halves) / 2) == pytest.approx(-(e_joint - e_marg), rel=1e-9)
    # no information: equal scores give at least 2 log 2, reached at 0; separated scores approach 0
    for c in (-2.0, 0.0, 1.5):
        flat = torch.full((4, 3), c, dtype=torch.float64)
        assert dccm.jsd_mi_loss(flat, flat, torch.ones(4, dtype=torch.bool)).item() >= 2 * math.log(2) - 1e-12
    zero = torch.zeros(4, 3, dtype=torch.float64)
    assert dccm.jsd_mi_loss(zero, zero, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(2 * math.log(2))
    far = torch.full((4, 3), 30.0, dtype=torch.float64)
    assert dccm.jsd_mi_loss(far, -far, torch.ones(4, dtype=torch.bool)).item() < 1e-10


def test_keras_transform_identity_shift_and_channel_shift():
    cfg = dccm.Config()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    half = torch.full((3, 8), 0.5, dtype=torch.float64)  # u = 1/2: no rotation, shift or channel shift
    ident = dataclasses.replace(cfg, zoom=(1.0, 1.0), rescale=1.0)
    torch.testing.assert_close(dccm.keras_transform(x, half, ident), x)
    # a shift of 2 pixels (a quarter of the side) along the rows: output row r reads input row r + 2
    shift = dataclasses.replace(ident, shift=0.25)
    u = half.clone()
    u[:, 1] = 1.0
    out = dccm.keras_transform(x, u, shift)
    torch.testing.assert_close(out[:, :, :6], x[:, :, 2:])
    torch.testing.assert_close(out[:, :, 6:], x[:, :, 7:8].expand(-1, -1, 2, -1))  # nearest-edge fill
    # a channel shift of +0.1 on channel 0, clipped to the image's range, then the rescale
    u = half.clone()
    u[:, 5] = 1.0
    out = dccm.keras_transform(x, u, dataclasses.replace(ident, rescale=0.95))
    hi = x.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(out[:, 0], 0.95 * torch.minimum(x[:, 0] + 0.1, hi))
    torch.testing.assert_close(out[:, 1:], 0.95 * x[:, 1:])
    # random parameters: finite, the same shape
    out = dccm.keras_transform(x, torch.rand(3, 8, dtype=torch.float64), cfg)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def _cfg(**kw):
    return dccm.Config(**{**dict(num_clusters=4, mi_hidden_dim=16, num_transformed=1), **kw})


def _sharpen(model, factor=20.0):
    """Confident predictions from the first step: the last linear layer scaled up."""
    with torch.no_grad():
        model.head.norm.weight.mul_(factor)


def test_targets_take_no_gradient_and_gradients_reach_the_backbone():
    cfg = _cfg()
    model = tiny_model(dccm, cfg)
    _sharpen(model)
    batch = fixed_batch(dccm, cfg, n=16)
    batch["views"] = [v.clone().requires_grad_() for v in batch["views"]]
    out = model(batch)
    assert torch.isfinite(out["loss"])
    assert 0 < float(out["graph_density"]) < 1 and float(out["confident"]) > 0  # every term is active
    out["loss"].backward()
    assert batch["views"][0].grad is None  # the originals only make the targets
    assert float(batch["views"][1].grad.abs().sum()) > 0
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    for part in (model.head, model.discriminator):
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in part.parameters())


def test_forward_combines_the_terms_with_the_official_weights():
    cfg = _cfg()
    model = tiny_model(dccm, cfg)
    _sharpen(model)
    batch = fixed_batch(dccm, cfg, n=16)
    torch.manual_seed(3)
    out = model(batch)
    want = out["graph_loss"] + 5 * out["label_loss"] + 0.05 * out["mi_loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    # the graph term recomputed from the outside: targets from the original, S' from the copy
    model.eval()  # BN with running statistics, so that two forwards see the same normalisation
    torch.manual_seed(3)
    out = model(batch)
    p = model.predict(batch["views"][0])
    torch.manual_seed(3)
    u = torch.rand(16, 8)
    pt = model.predict(model.transform(batch["views"][1], u))
    w = dccm.pseudo_graph(p, cfg.graph_threshold)
    assert out["graph_loss"].item() == pytest.approx(dccm.graph_loss(pt, pt, w).item(), rel=1e-5)


def test_setup_sizes_the_heads_from_the_classes():
    cfg = _cfg(num_clusters=0)
    model = tiny_model(dccm, cfg)
    model.setup(32, 7)
    assert model.head.num_clusters == 7 and model.discriminator.c0.in_channels == model.map_channels + 7
    fixed = tiny_model(dccm, _cfg(num_clusters=4))
    fixed.setup(32, 7)
    assert fixed.head.num_clusters == 4
    assert tiny_model(dccm, _cfg(mi_weight=0.0)).discriminator is None


def test_view_recipe_and_preset():
    cfg = dccm.Config()
    pipes = dccm.augmentations(cfg, 32)
    assert len(pipes) == 1 + cfg.num_transformed
    names = [[type(t).__name__ for t in p.transforms] for p in pipes]
    assert "RandomHorizontalFlip" not in names[0] and all("RandomHorizontalFlip" in n for n in names[1:])
    assert views.plan_views(dccm.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(dccm.PRESETS["small"]) <= {f.name for f in dataclasses.fields(dccm.Config)}
    assert (cfg.graph_weight, cfg.label_weight, cfg.mi_weight) == (1.0, 5.0, 0.05)
    assert (cfg.graph_threshold, cfg.label_threshold) == (0.95, 0.9)


def test_assign_is_the_argmax_of_the_prediction_and_embed():
    cfg = _cfg()
    model = tiny_model(dccm, cfg).eval()
    x = fixed_batch(dccm, cfg, n=8)["views"][0]
    assert model.embed(x).shape == (8, model.backbone.feature_dim)
    p = model.predict(x)
    assert p.shape == (8, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(8))
    assert torch.equal(model.assign(x), p.argmax(dim=1))


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg()
    model = tiny_model(dccm, cfg)
    _sharpen(model, 5.0)
    batch = train.prepare_batch(fixed_batch(dccm, cfg, n=16), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(25):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
