"""Invariant Spreading: J (Sec. 3.2) against a literal computation, its limits, the gradient rule, views, smoke fit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

isp = load("invariant-spreading")


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def loss_literal(f: torch.Tensor, f_hat: torch.Tensor, t: float) -> float:
    """Sec. 3.2 term by term, with unit vectors: P(i|x̂_i) = e^(f_i.f̂_i/t) / sum_k e^(f_k.f̂_i/t),
    P(i|x_j) = e^(f_i.f_j/t) / sum_k e^(f_k.f_j/t); J = -sum_i log P(i|x̂_i) - sum_i sum_{j!=i} log(1 - P(i|x_j)),
    divided by the batch size m."""
    unit_ = lambda v: v / v.norm()  # noqa: E731
    f = [unit_(v) for v in f.double()]
    f_hat = [unit_(v) for v in f_hat.double()]
    m = len(f)

    def p_hat(i):
        return math.exp(float(f[i] @ f_hat[i]) / t) / sum(math.exp(float(f[k] @ f_hat[i]) / t) for k in range(m))

    def p(i, j):
        return math.exp(float(f[i] @ f[j]) / t) / sum(math.exp(float(f[k] @ f[j]) / t) for k in range(m))

    total = 0.0
    for i in range(m):
        total += -math.log(p_hat(i))
        for j in range(m):
            if j != i:
                total += -math.log(1.0 - p(i, j))
    return total / m


@pytest.mark.parametrize("m,d,t", [(4, 8, 0.1), (7, 3, 0.05), (12, 16, 0.5), (2, 5, 1.0)])
def test_loss_matches_equation(m, d, t):
    g = torch.Generator().manual_seed(m * d)
    f, f_hat = (torch.randn(m, d, generator=g, dtype=torch.float64) for _ in range(2))
    want = loss_literal(f, f_hat, t)
    for detach in (True, False):  # the gradient rule does not change the value
        assert isp.invariant_spreading_loss(f, f_hat, t, detach).item() == pytest.approx(want, rel=1e-10)


def test_scale_invariance():
    f, f_hat = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    want = isp.invariant_spreading_loss(f, f_hat, 0.2).item()
    assert isp.invariant_spreading_loss(3 * f, 0.5 * f_hat, 0.2).item() == pytest.approx(want, rel=1e-12)


def test_limits_collapsed_and_spread():
    m, t = 8, 0.1
    same = torch.ones(m, 4, dtype=torch.float64)
    # a constant embedding: every P is 1/m
    collapsed = math.log(m) - (m - 1) * math.log(1 - 1 / m)
    assert isp.invariant_spreading_loss(same, same, t).item() == pytest.approx(collapsed, rel=1e-10)
    # orthogonal instances with exact copies: the closed form, e = e^(1/t)
    eye = torch.eye(m, dtype=torch.float64)
    e = math.exp(1 / t)
    spread = math.log((e + m - 1) / e) - (m - 1) * math.log(1 - 1 / (e + m - 1))
    assert isp.invariant_spreading_loss(eye, eye, t).item() == pytest.approx(spread, rel=1e-10)
    assert spread < collapsed
    # copies that match another instance (f̂_i = f_{i+1}) are worse than matching their own
    assert isp.invariant_spreading_loss(eye, eye.roll(1, 0), t).item() > spread
    rand = unit(m, m, seed=1)
    assert isp.invariant_spreading_loss(eye, eye, t).item() < isp.invariant_spreading_loss(rand, unit(m, m, seed=2), t).item()


def test_spreading_term_is_bounded():
    # P(i|x_j) <= 1/2 for unit vectors (the k = j term e^(1/t) is in its denominator): finite even when
    # two instances coincide
    f = unit(6, 4, seed=3)
    f[1] = f[0]
    loss = isp.invariant_spreading_loss(f, f, 0.05)
    assert torch.isfinite(loss)


def test_gradient_rule_of_detach_weights():
    """detach_weights: the weights f_k are constants, as the official code's .data; the gradient then
    reaches f only through the spreading term (f as the samples x_j) and f̂ through the invariance term."""
    f0, fh0 = unit(5, 6, seed=4), unit(5, 6, seed=5)
    grads = {}
    for detach in (True, False):
        f, f_hat = f0.clone().requires_grad_(), fh0.clone().requires_grad_()
        isp.invariant_spreading_loss(f, f_hat, 0.3, detach).backward()
        grads[detach] = (f.grad, f_hat.grad)
    # the augmented copies are only ever samples: the same gradient with and without
    torch.testing.assert_close(grads[True][1], grads[False][1])
    assert grads[True][0].abs().sum() > 0 and grads[True][1].abs().sum() > 0
    assert not torch.allclose(grads[True][0], grads[False][0])
    # with detached weights, f's gradient is that of the spreading term alone with f as samples
    f = f0.clone().requires_grad_()
    w = f0.clone()
    p = F.softmax(F.normalize(f, dim=1) @ w.T / 0.3, dim=1) * (1 - torch.eye(5, dtype=torch.float64))
    (-torch.log1p(-p).sum(1).mean()).backward()
    torch.testing.assert_close(grads[True][0], f.grad)


def _small_cfg(**kw):
    return isp.Config(**{"dim": 16, **kw})


def test_gradients_reach_backbone_and_projector():
    cfg = _small_cfg()
    model = tiny_model(isp, cfg)
    out = model(fixed_batch(isp, cfg, n=8))
    assert torch.isfinite(out["loss"]) and -1 <= out["pos_sim"].item() <= 1
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert model.projector.weight.grad.abs().sum() > 0


def test_smoke_fit_lowers_the_loss():
    cfg = _small_cfg(min_scale=0.4)
    losses, _ = smoke_fit(isp, cfg, steps=30, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def _steps(pipeline: v2.Compose) -> list:
    return list(pipeline.transforms)


def test_view_recipe():
    cfg = isp.Config()
    plain, augmented = isp.augmentations(cfg, 32)
    crop, flip, jitter, gray = (_steps(augmented)[i] for i in (1, 2, 3, 4))
    assert crop.scale == (0.2, 1.0) and crop.antialias and isinstance(flip, v2.RandomHorizontalFlip)
    assert isinstance(jitter, v2.ColorJitter) and jitter.hue == (-0.4, 0.4)  # always applied (official code)
    assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2
    # the instance view is the image itself: a full-area, ratio-1 crop (deterministic)
    assert [type(t) for t in _steps(plain)] == [v2.ToImage, v2.RandomResizedCrop, v2.ToDtype, v2.Normalize]
    assert _steps(plain)[1].scale == (1.0, 1.0) and _steps(plain)[1].ratio == (1.0, 1.0)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(plain(x), plain(x))
    torch.testing.assert_close(plain(x), v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                                     v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(x))
    both = isp.augmentations(isp.Config(augment_instance_view=True), 32)
    assert both[0] is both[1]  # the official code: two draws from T
    for pipelines in ((plain, augmented), both):
        assert views.plan_views(pipelines, in_memory=True).mode == "device"
    batch = fixed_batch(isp, cfg, n=4)["views"]
    assert len(batch) == 2 and batch[0].shape == (4, 3, 32, 32) and not torch.allclose(batch[0], batch[1])


def test_presets_and_paper_defaults():
    cfg = isp.Config()
    assert (cfg.dim, cfg.temperature, cfg.detach_weights, cfg.augment_instance_view) == (128, 0.1, True, False)
    assert (cfg.optimizer, cfg.base_lr * cfg.batch_size / 256, cfg.momentum, cfg.weight_decay) == ("sgd", 0.03, 0.9, 5e-4)
    fields = set(isp.Config.__dataclass_fields__)
    for preset in isp.PRESETS.values():
        assert set(preset) <= fields
    methods.make_config(isp, preset="small")


def test_embed_is_backbone_features_and_features_are_unit():
    cfg = _small_cfg()
    model = tiny_model(isp, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    torch.testing.assert_close(model.features(x).norm(dim=1), torch.ones(3))
    assert model.features(x).shape == (3, 16)
