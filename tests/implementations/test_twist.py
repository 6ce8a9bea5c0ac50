"""TWIST: the loss against a literal float64 computation of its three terms, its limits (sharp and diverse
at the minimum, collapse penalised by one term or the other), the sparse multi-crop pairs, gradients,
the head's non-affine logit BN, the view recipe, assign/embed, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

twist = load("twist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _softmax(row, tau=1.0):
    top = max(row)
    e = [math.exp((a - top) / tau) for a in row]
    z = sum(e)
    return [v / z for v in e]


def twist_literal(logits, pairs, tau, lam1, lam2, eps) -> float:
    """The official EntLoss with loops, once per pair (a, b), then the mean over the pairs:
    1/2 (KL(a||b) + KL(b||a)) + (1 + lam1) 1/2 (EH(a) + EH(b)) - lam2 1/2 (HE(a) + HE(b))."""
    p = [[_softmax(row) for row in view] for view in logits.tolist()]
    q = [[_softmax(row, tau) for row in view] for view in logits.tolist()]
    n, c = len(p[0]), len(p[0][0])

    def kl(x, y):
        return sum(sum(xi[k] * (math.log(xi[k] + eps) - math.log(yi[k] + eps)) for k in range(c))
                   for xi, yi in zip(x, y)) / n

    def eh(x):
        return -sum(sum(v * math.log(v + eps) for v in row) for row in x) / n

    def he(x):
        mean = [sum(row[k] for row in x) / n for k in range(c)]
        return -sum(m * math.log(m + eps) for m in mean)

    total = 0.0
    for a, b in pairs:
        total += (0.5 * (kl(p[a], p[b]) + kl(p[b], p[a])) + (1 + lam1) * 0.5 * (eh(q[a]) + eh(q[b]))
                  - lam2 * 0.5 * (he(q[a]) + he(q[b])))
    return total / len(pairs)


@pytest.mark.parametrize("v,n,c,tau,lam1,lam2", [(2, 5, 4, 1.0, 0.0, 1.0), (4, 3, 6, 0.5, -0.6, 1.0),
                                                  (5, 6, 3, 2.0, 0.3, 0.7)])
def test_loss_matches_equation(v, n, c, tau, lam1, lam2):
    g = torch.Generator().manual_seed(v * n * c)
    logits = torch.randn(v, n, c, generator=g, dtype=torch.float64) * 2
    got = twist.twist_loss(list(logits), tau, lam1, lam2, eps=1e-5)["loss"].item()
    want = twist_literal(logits, twist.sparse_pairs(v), tau, lam1, lam2, 1e-5)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_terms_match_their_definitions():
    logits = torch.randn(2, 7, 5, dtype=torch.float64)
    out = twist.twist_loss(list(logits), eps=0.0)
    p1, p2 = (F.softmax(s, dim=1) for s in logits)
    kl12 = (p1 * (p1.log() - p2.log())).sum(1).mean()
    kl21 = (p2 * (p2.log() - p1.log())).sum(1).mean()
    torch.testing.assert_close(out["kl"], 0.5 * (kl12 + kl21))
    ent = [-(p * p.log()).sum(1).mean() for p in (p1, p2)]
    torch.testing.assert_close(out["eh"], 0.5 * (ent[0] + ent[1]))
    he = [-(p.mean(0) * p.mean(0).log()).sum() for p in (p1, p2)]
    torch.testing.assert_close(out["he"], 0.5 * (he[0] + he[1]))
    torch.testing.assert_close(out["loss"], out["kl"] + out["eh"] - out["he"])


def test_sparse_pairs():
    assert twist.sparse_pairs(2) == [(0, 1)]
    pairs = twist.sparse_pairs(14)  # 2 global + 12 local crops: 13 + 12 pairs
    assert len(pairs) == 25 and pairs[:2] == [(0, 1), (0, 2)] and (1, 13) in pairs
    assert all(a in (0, 1) and b > a for a, b in pairs) and (2, 3) not in pairs  # local crops never meet


def test_loss_limits():
    c, scale = 6, 60.0  # logits of 60: softmax one-hot to exp(-60)
    eps = 1e-5
    # identical one-hot views spread evenly over the classes: KL 0, EH 0, HE log C: the minimum -log C
    onehot = F.one_hot(torch.arange(2 * c) % c, c).double() * scale
    best = twist.twist_loss([onehot, onehot.clone(), onehot.clone()], eps=eps)
    assert best["kl"].item() == pytest.approx(0, abs=1e-12) and best["eh"].item() == pytest.approx(0, abs=1e-3)
    assert best["loss"].item() == pytest.approx(-math.log(c), abs=1e-3)
    # a collapsed constant one-hot distribution: sharp and consistent, but HE = 0: it pays log C
    same = F.one_hot(torch.zeros(2 * c, dtype=torch.long), c).double() * scale
    collapsed = twist.twist_loss([same, same.clone()], eps=eps)
    assert collapsed["he"].item() == pytest.approx(0, abs=1e-3)
    assert collapsed["loss"].item() - best["loss"].item() == pytest.approx(math.log(c), abs=1e-3)
    # uniform per-sample distributions: diverse on average, but EH = log C cancels HE
    flat = torch.zeros(2 * c, c, dtype=torch.float64)
    uniform = twist.twist_loss([flat, flat.clone()], eps=eps)
    assert uniform["eh"].item() == pytest.approx(math.log(c), abs=1e-3)
    assert uniform["he"].item() == pytest.approx(math.log(c), abs=1e-3)
    assert uniform["loss"].item() == pytest.approx(0, abs=1e-3)
    # views that disagree pay the consistency term; random logits lie above the minimum
    shifted = F.one_hot((torch.arange(2 * c) + 1) % c, c).double() * scale
    assert twist.twist_loss([onehot, shifted], eps=eps)["kl"].item() > 10
    for seed in range(5):
        r = torch.randn(3, 2 * c, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
        assert twist.twist_loss(list(r), eps=eps)["loss"].item() > -math.log(c)


def test_every_view_gets_gradients():
    s = torch.randn(4, 6, 5, requires_grad=True)
    twist.twist_loss(list(s))["loss"].backward()
    assert all(s.grad[v].abs().sum() > 0 for v in range(4))  # no stop-gradient on either side of a pair


def _cfg(**kw):
    base = dict(num_classes=12, proj_hidden_dim=32, n_local_crops=2)
    return twist.Config(**{**base, **kw})


def test_forward_groups_views_and_gradients_reach_the_backbone():
    cfg = _cfg()
    model = tiny_model(twist, cfg)
    batch = fixed_batch(twist, cfg, n=8)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(32, 32)] * 2 + [(16, 16)] * 2
    shapes, heads = [], []
    model.backbone.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    model.logit_norm.register_forward_hook(lambda m, i, o: heads.append(tuple(i[0].shape)))
    out = model(batch)
    assert shapes == [(16, 3, 32, 32), (16, 3, 16, 16)]  # one call per resolution
    assert heads == [(32, 12)]  # the head once, on every view together
    assert torch.isfinite(out["loss"]) and 0 <= out["he"] <= math.log(12) + 1e-5
    assert 0 < float(out["used_classes"]) <= 1
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.last_linear.weight.grad.abs().sum() > 0


def test_logit_batchnorm_is_non_affine_and_optional():
    model = tiny_model(twist, _cfg())
    assert isinstance(model.logit_norm, torch.nn.BatchNorm1d) and not model.logit_norm.affine
    x = fixed_batch(twist, _cfg(), n=8)["views"][0]
    logits = model.head(model.backbone(x))  # training mode: batch statistics
    torch.testing.assert_close(logits.mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.var(0, unbiased=False), torch.ones(12), atol=1e-3, rtol=0)
    assert isinstance(tiny_model(twist, _cfg(logit_bn=False)).logit_norm, torch.nn.Identity)


def test_view_recipe():
    cfg = twist.Config()
    pipes = twist.augmentations(cfg, 224)
    assert len(pipes) == 14
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 12
    assert [tuple(c.scale) for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 12
    jitter = [t.transforms[0] for t in pipes[0].transforms if type(t).__name__ == "RandomApply"][0]
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.saturation == pytest.approx((0.8, 1.2))
    assert jitter.hue == pytest.approx((-0.1, 0.1))

    def prob(p, name):
        hits = [t.p for t in p.transforms if type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name]
        hits += [t.p for t in p.transforms if type(t).__name__ == name]
        return hits[0] if hits else 0.0

    assert [prob(p, "GaussianBlur") for p in pipes[:3]] == [1.0, 0.1, 0.5]
    assert [prob(p, "RandomSolarize") for p in pipes[:3]] == [0.0, 0.2, 0.0]
    small = twist.augmentations(twist.Config(n_local_crops=4), 32, (0.5,) * 3, (0.25,) * 3)
    assert len(small) == 6 and all(prob(p, "GaussianBlur") == 0 for p in small)  # no blur below 64 px
    assert views.plan_views(small, in_memory=True).mode == "device"
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in pipes[1:3]] == [(3, 224, 224), (3, 96, 96)]
    assert len(twist.augmentations(twist.Config(n_local_crops=0), 32)) == 2  # the two-crop setting


def test_config_and_preset():
    cfg = twist.Config()
    assert (cfg.num_classes, cfg.proj_hidden_dim, cfg.lam1, cfg.lam2, cfg.tau, cfg.eps) == (4096, 4096, 0.0, 1.0, 1.0, 1e-5)
    fields = {f.name for f in dataclasses.fields(twist.Config)}
    assert set(twist.PRESETS["small"]) <= fields


def test_assign_and_embed():
    cfg = _cfg()
    model = tiny_model(twist, cfg)
    batch = fixed_batch(twist, cfg, n=8)
    model(batch)  # one training forward: BN running statistics
    model.eval()
    x = batch["views"][0][:4]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and a.dtype == torch.long and bool(((0 <= a) & (a < 12)).all())
    torch.testing.assert_close(a, F.softmax(model.head(model.backbone(x)), dim=1).argmax(1))


def test_smoke_fit_lowers_the_loss():
    losses, _ = smoke_fit(twist, _cfg(), steps=25, lr=0.5)  # LARS
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
