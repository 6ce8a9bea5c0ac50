"""FastSiam: the averaged targets and the loss against a literal computation, SimSiam as its two-view case,
the stop-gradient on every target, the model's loss from its own heads, the four-view recipe, a smoke fit."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from selfsup import methods, train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

fastsiam = load("fastsiam")
simsiam = methods.load_method_module(str(Path(fastsiam.__file__).with_name("simsiam.py")))  # its two-view case


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def loss_literal(p: torch.Tensor, z: torch.Tensor, online: int) -> float:
    """1/V' sum_{i < V'} mean_n -cos(p_i[n], 1/K sum_{j != i} z_j[n]), with loops. p: (V', N, D), z: (V, N, D)."""
    v, n, d = z.shape
    total = 0.0
    for i in range(online):
        for s in range(n):
            target = [sum(float(z[j, s, k]) for j in range(v) if j != i) / (v - 1) for k in range(d)]
            total += -cos([float(x) for x in p[i, s]], target)
    return total / (online * n)


def test_mean_targets_leave_each_view_out():
    z = torch.randn(4, 3, 5, dtype=torch.float64)
    t = fastsiam.mean_targets(z)
    for i in range(4):
        torch.testing.assert_close(t[i], torch.stack([z[j] for j in range(4) if j != i]).mean(0))


@pytest.mark.parametrize("v,n,d", [(2, 3, 4), (3, 5, 6), (4, 4, 8), (6, 2, 3)])
def test_loss_matches_equation(v, n, d):
    g = torch.Generator().manual_seed(v * n * d)
    p, z = torch.randn(v, n, d, generator=g, dtype=torch.float64), torch.randn(v, n, d, generator=g, dtype=torch.float64)
    assert fastsiam.fastsiam_loss(p, z).item() == pytest.approx(loss_literal(p, z, v), rel=1e-12)
    assert fastsiam.fastsiam_loss(p[:1], z).item() == pytest.approx(loss_literal(p, z, 1), rel=1e-12)  # view 1 only


def test_two_views_are_simsiam():
    """V = 2: the target of each view is the other view, and the symmetric loss is SimSiam's Eq. 4."""
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    eq4 = 0.5 * -sum(cos(p[0, s].tolist(), z[1, s].tolist()) for s in range(6)) / 6 \
        + 0.5 * -sum(cos(p[1, s].tolist(), z[0, s].tolist()) for s in range(6)) / 6
    assert fastsiam.fastsiam_loss(p, z).item() == pytest.approx(eq4, rel=1e-12)
    assert fastsiam.fastsiam_loss(p, z).item() == pytest.approx(simsiam.simsiam_loss(p[0], p[1], z[0], z[1]).item(), rel=1e-12)


def test_limits():
    z = torch.randn(4, 5, 8, dtype=torch.float64)
    t = fastsiam.mean_targets(z)
    assert fastsiam.fastsiam_loss(2 * t, z).item() == pytest.approx(-1.0, abs=1e-12)  # p on its target: minimum
    assert fastsiam.fastsiam_loss(-t, z).item() == pytest.approx(1.0, abs=1e-12)  # opposite: maximum
    same = z[:1].expand(4, -1, -1)  # four identical views: every target is that view
    assert fastsiam.fastsiam_loss(same, same).item() == pytest.approx(-1.0, abs=1e-12)
    # predicting the mean of the others beats predicting any single one of them
    assert fastsiam.fastsiam_loss(t, z).item() < fastsiam.fastsiam_loss(z.roll(1, 0), z).item()


def test_targets_get_no_gradient():
    p = torch.randn(4, 3, 6, requires_grad=True)
    z = torch.randn(4, 3, 6, requires_grad=True)
    fastsiam.fastsiam_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None


def _small_cfg(**kw):
    return fastsiam.Config(**{"proj_hidden_dim": 32, "proj_dim": 32, "pred_hidden_dim": 8, **kw})


@pytest.mark.parametrize("symmetric", [True, False])
def test_model_loss_is_the_equation_on_its_own_heads(symmetric):
    cfg = _small_cfg(symmetric=symmetric)
    model = tiny_model(fastsiam, cfg)
    batch = fixed_batch(fastsiam, cfg, n=8)
    assert len(batch["views"]) == 4
    out = model(batch)
    with torch.no_grad():  # train mode: BN on each view's batch, as in forward
        z = torch.stack([model.projector(model.backbone(x)) for x in batch["views"]])
        p = torch.stack([model.predictor(zi) for zi in z])
    want = loss_literal(p, z, 4 if symmetric else 1)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(q.grad is not None for q in model.predictor.parameters())


def test_heads_and_param_groups():
    model = fastsiam.FastSiam(nn.Flatten(), 256, fastsiam.Config())
    assert [(m.in_features, m.out_features) for m in model.projector if isinstance(m, nn.Linear)] == [
        (256, 2048), (2048, 2048), (2048, 2048)]
    assert not model.projector[-1].affine
    assert [(m.in_features, m.out_features) for m in model.predictor if isinstance(m, nn.Linear)] == [(2048, 512), (512, 2048)]
    assert not hasattr(model, "on_step_end")  # no EMA: one shared encoder
    groups = model.param_groups()
    assert {id(q) for q in groups[1]["params"]} == {id(q) for q in model.predictor.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert train.group_lr(groups[1], 0.01, 0.1, 50, 10) == 0.1 and train.group_lr(groups[0], 0.01, 0.1, 50, 10) == 0.01
    with pytest.raises(ValueError, match="at least 2 views"):
        fastsiam.FastSiam(nn.Flatten(), 8, fastsiam.Config(num_views=1))


def test_smoke_fit_lowers_the_loss():
    cfg = _small_cfg()
    losses, _ = smoke_fit(fastsiam, cfg, steps=25, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_view_recipe_and_preset():
    cfg = fastsiam.Config()
    pipelines = fastsiam.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 4 and len(fastsiam.augmentations(fastsiam.Config(num_views=6), 32)) == 6
    assert views.plan_views(pipelines, in_memory=True).mode == "device"
    assert repr(pipelines[0]) == repr(simsiam.augmentations(simsiam.Config(), 32, (0.5,) * 3, (0.25,) * 3)[0])
    fields = set(fastsiam.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in fastsiam.PRESETS.values())
    small = methods.make_config(fastsiam, preset="small")
    model = tiny_model(fastsiam, _small_cfg()).eval()
    x = fixed_batch(fastsiam, small, n=4)["views"][0]
    torch.testing.assert_close(model.embed(x), model.backbone(x))
