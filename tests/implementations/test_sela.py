"""SeLa: the label step against a brute-force equal-partition transport and a literal Sinkhorn-Knopp, the
schedule of label optimisations, the multi-head cross-entropy, the epoch hook, gradients, smoke fit."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

sela = load("sela")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def best_equal_partition(log_p) -> tuple[int, ...]:
    """The labels of N images into K labels of N/K each that maximise sum_i log p(y_i | x_i), by brute force."""
    n, k = len(log_p), len(log_p[0])
    best, arg = -math.inf, None
    for labels in itertools.product(range(k), repeat=n):
        if all(labels.count(y) == n // k for y in range(k)):
            score = sum(log_p[i][y] for i, y in enumerate(labels))
            if score > best:
                best, arg = score, labels
    return arg


@pytest.mark.parametrize("seed", range(4))
def test_labels_solve_the_equal_partition_transport(seed):
    g = torch.Generator().manual_seed(seed)
    log_p = F.log_softmax(torch.randn(6, 3, generator=g, dtype=torch.float64) * 2, dim=1)
    got = sela.sinkhorn_labels(log_p, lamb=50.0, tolerance=1e-9)
    assert tuple(got.tolist()) == best_equal_partition(log_p.tolist())
    assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]


def sinkhorn_literal(log_p, lamb, iterations):
    """r = (1/K) / (P c), c = (1/N) / (r^T P) with loops on P = p^lambda (K x N), then argmax of diag(r) P diag(c)."""
    n, k = len(log_p), len(log_p[0])
    p = [[math.exp(lamb * log_p[i][y]) for i in range(n)] for y in range(k)]
    c = [1.0 / n] * n
    for _ in range(iterations):
        r = [(1.0 / k) / sum(p[y][i] * c[i] for i in range(n)) for y in range(k)]
        c = [(1.0 / n) / sum(r[y] * p[y][i] for y in range(k)) for i in range(n)]
    return [max(range(k), key=lambda y: r[y] * p[y][i] * c[i]) for i in range(n)]


def test_labels_match_the_literal_iterations():
    log_p = F.log_softmax(torch.randn(20, 4, dtype=torch.float64), dim=1)
    want = sinkhorn_literal(log_p.tolist(), 5.0, 101)
    got = sela.sinkhorn_labels(log_p, 5.0, tolerance=0.0, max_iterations=101)  # no early stop
    assert got.tolist() == want


def test_labels_spread_even_for_a_nearly_collapsed_network():
    """Every image predicts nearly the same, very uneven distribution: its argmax would give one label to
    all; the transport spreads them over every label (the argmax of the scaled columns follows the small
    differences between images)."""
    common = torch.log(torch.tensor([0.9, 0.04, 0.03, 0.02, 0.01]))
    log_p = F.log_softmax(common + 0.01 * torch.randn(400, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    assert (log_p.argmax(1) == 0).all()
    counts = torch.bincount(sela.sinkhorn_labels(log_p, 25.0), minlength=5)
    assert int(counts.min()) > 40 and int(counts.max()) < 120, counts.tolist()  # 80 each on average
    confident = F.log_softmax(torch.eye(5).repeat(8, 1) * 10, dim=1)  # separated classes keep their own label
    assert torch.equal(sela.sinkhorn_labels(confident, 25.0), torch.arange(5).repeat(8))


def test_label_schedule_is_quadratic():
    times = sela.label_times(400, 1000, 100)
    assert times[0] == 0 and times[-1] == pytest.approx(401.01 * 1000)
    assert times[1] == pytest.approx(401.01 * 1000 / 99**2)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))  # sparser later
    assert sela.label_epochs(15, 15) == {0, 1, 2, 3, 5, 6, 7, 9, 10, 12, 14}  # ceil(16.01 (i / 14)^2)


def test_loss_is_the_mean_cross_entropy_of_the_heads():
    logits = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1]])
    want = 0.0
    for s, y in zip(logits, labels):
        for row, t in zip(s.tolist(), y.tolist()):
            want += (math.log(sum(math.exp(v) for v in row)) - row[t]) / 4
    assert sela.sela_loss(logits, labels).item() == pytest.approx(want / 2, rel=1e-6)


def _cfg(**kw):
    return sela.Config(**{**dict(num_clusters=8, num_heads=2, num_label_opts=10, epochs=10), **kw})


def test_setup_draws_an_equal_random_partition_per_head():
    model = tiny_model(sela, _cfg())
    model.setup(32, 10)
    assert model.labels.shape == (2, 32)
    for head in model.labels:
        assert torch.bincount(head, minlength=8).tolist() == [4] * 8
    assert not torch.equal(model.labels[0], model.labels[1])
    again = tiny_model(sela, _cfg())
    again.setup(32, 10)
    assert torch.equal(again.labels, model.labels)  # the same on every rank
    with pytest.raises(ValueError, match="above the 4 training images"):
        model.setup(4, 10)


def test_epoch_hook_relabels_on_schedule():
    cfg = _cfg(num_label_opts=4)  # at epochs 0, 2 and 5 of 10
    model = tiny_model(sela, cfg)
    model.setup(32, 10)
    x = fixed_batch(sela, cfg, n=32)["views"][0]
    feats = lambda: model.embed(x)  # noqa: E731  stands for the whole training set
    first = model.labels.clone()
    model.on_epoch_start(0, 10, feats)  # time 0: the random labels are replaced at once
    assert not torch.equal(model.labels, first)
    h = model.embed(x)
    for j, head in enumerate(model.heads):
        want = sela.sinkhorn_labels(F.log_softmax(head(h), 1), cfg.lamb, cfg.sinkhorn_tolerance)
        assert torch.equal(model.labels[j], want)
    assert sela.label_epochs(10, 4) == {0, 2, 5}
    kept = model.labels.clone()
    model.on_epoch_start(4, 10, lambda: pytest.fail("no relabelling at epoch 4"))
    assert torch.equal(model.labels, kept)


def test_forward_uses_each_heads_labels_and_gradients_reach_the_backbone():
    cfg = _cfg()
    model = tiny_model(sela, cfg)
    model.setup(32, 10)
    batch = fixed_batch(sela, cfg, n=8)
    out = model(batch)
    h = model.backbone(batch["views"][0])
    want = sela.sela_loss([head(h) for head in model.heads], model.labels[:, batch["index"]])
    torch.testing.assert_close(out["loss"], want)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in model.heads)
    with pytest.raises(RuntimeError, match="no labels yet"):
        tiny_model(sela, cfg)(batch)


def test_view_recipe_and_preset():
    cfg = sela.Config()
    (pipe,) = sela.augmentations(cfg, 224)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names.index("RandomGrayscale") < names.index("ColorJitter") < names.index("RandomHorizontalFlip")
    assert views.plan_views(sela.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(sela.PRESETS["small"]) <= {f.name for f in dataclasses.fields(sela.Config)}


def test_assign_and_embed():
    cfg = _cfg()
    model = tiny_model(sela, cfg)
    x = fixed_batch(sela, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and bool(((0 <= a) & (a < 8)).all())


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg()
    model = tiny_model(sela, cfg)
    model.setup(32, 10)
    batch = train.prepare_batch(fixed_batch(sela, cfg, n=32), torch.device("cpu"), False, False)
    model.on_epoch_start(0, 10, lambda: model.embed(batch["views"][0]))
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
