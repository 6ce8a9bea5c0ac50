"""SimSiam: Eqs. 1 and 4 against a literal computation, the stop-gradient (and the collapse without it), the
heads, the predictor's fixed rate through the harness's schedule, the view recipe and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

from selfsup import methods, train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

simsiam = load("simsiam")


def d_literal(p: torch.Tensor, z: torch.Tensor) -> float:
    """Eq. 1 per row, -(p/||p||) . (z/||z||), averaged, with explicit loops."""
    total = 0.0
    for pi, zi in zip(p.double().tolist(), z.double().tolist()):
        dot = sum(a * b for a, b in zip(pi, zi))
        total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


@pytest.mark.parametrize("n,d", [(3, 4), (10, 16), (1, 7)])
def test_negative_cosine_matches_equation(n, d):
    g = torch.Generator().manual_seed(n * d)
    p, z = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert simsiam.negative_cosine(p, z).item() == pytest.approx(d_literal(p, z), rel=1e-12)


def test_symmetrised_loss_is_eq_4():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(4))
    want = 0.5 * d_literal(p1, z2) + 0.5 * d_literal(p2, z1)
    assert simsiam.simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(want, rel=1e-12)
    # swapping the views leaves it unchanged; without the stop-gradient the value is the same
    assert simsiam.simsiam_loss(p2, p1, z2, z1).item() == pytest.approx(want, rel=1e-12)
    assert simsiam.simsiam_loss(p1, p2, z1, z2, stop_gradient=False).item() == pytest.approx(want, rel=1e-12)


def test_limits():
    z = torch.randn(5, 8, dtype=torch.float64)
    assert simsiam.simsiam_loss(3 * z, 0.5 * z, z, z).item() == pytest.approx(-1.0, abs=1e-12)  # aligned: minimum
    assert simsiam.simsiam_loss(-z, -z, z, z).item() == pytest.approx(1.0, abs=1e-12)  # opposite: maximum
    eye = torch.eye(4, dtype=torch.float64)
    assert simsiam.negative_cosine(eye, eye.roll(1, 1)).item() == pytest.approx(0.0, abs=1e-12)  # orthogonal
    rand = torch.randn(5, 8, dtype=torch.float64)
    assert simsiam.simsiam_loss(z, z, z, z).item() < simsiam.simsiam_loss(rand, rand, z, z).item()


def test_stop_gradient_blocks_the_target_branch():
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    simsiam.simsiam_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None and z1.grad is None and z2.grad is None
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    simsiam.simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()  # the Sec. 4.1 ablation
    assert z1.grad is not None and z1.grad.abs().sum() > 0


def test_heads_follow_the_paper():
    model = simsiam.SimSiam(nn.Flatten(), 256, simsiam.Config())
    proj, pred = model.projector, model.predictor
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 2048), (2048, 2048), (2048, 2048)]
    assert [type(m) for m in proj][1::3] == [nn.BatchNorm1d] * 3  # BN after every fc, the output fc too
    assert not proj[-1].affine and proj[-2].bias is None  # output BN without affine (official builder)
    assert not any(isinstance(m, nn.ReLU) for m in list(proj)[-2:])  # no ReLU on the output
    assert [(m.in_features, m.out_features) for m in pred if isinstance(m, nn.Linear)] == [(2048, 512), (512, 2048)]
    assert isinstance(pred[1], nn.BatchNorm1d) and isinstance(pred[-1], nn.Linear)  # no BN on h's output
    # one shared encoder, no EMA copy: the only buffers are BN statistics, and there is no step hook
    assert not hasattr(model, "on_step_end")
    assert all(name.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked") for name, _ in model.named_buffers())


def _small_cfg(**kw):
    return simsiam.Config(**{"proj_hidden_dim": 32, "proj_dim": 32, "pred_hidden_dim": 8, **kw})


def test_gradients_reach_backbone_projector_and_predictor():
    cfg = _small_cfg()
    model = tiny_model(simsiam, cfg)
    out = model(fixed_batch(simsiam, cfg, n=8))
    assert torch.isfinite(out["loss"]) and -1.0 <= out["loss"].item() <= 1.0
    assert 0 < out["z_std"].item() <= 1.0
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_predictor_keeps_the_peak_rate_under_the_harness_schedule():
    cfg = _small_cfg()
    model = tiny_model(simsiam, cfg)
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.predictor.parameters()}
    peak, total, spe = 0.1, 100, 10
    opt = train.build_optimizer(model, cfg, peak)
    assert all(g["weight_decay"] == cfg.weight_decay for g in opt.param_groups)  # official: decay everything
    step = 80
    lr = train.lr_at(step, total, 0, peak)
    rates = [train.group_lr(g, lr, peak, step, spe) for g in opt.param_groups]
    assert rates[0] == pytest.approx(lr) and lr < 0.2 * peak  # the encoder follows the cosine
    assert rates[1] == peak  # the predictor does not decay (Sec. 4.2, --fix-pred-lr)
    unfixed = tiny_model(simsiam, _small_cfg(fix_pred_lr=False)).param_groups()
    assert train.group_lr(unfixed[1], lr, peak, step, spe) == pytest.approx(lr)


def _noisy_views(x: torch.Tensor, step: int, noise: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [x + noise * torch.randn(x.shape, generator=g), x + noise * torch.randn(x.shape, generator=g)]


def _train_on_fixed_images(stop_gradient: bool, steps: int = 60) -> tuple[list[float], float, float]:
    """SGD on a fixed set of 256 random 8x8 images, two noisy views of it per step (seeded): the views share
    little, so agreeing is hard and collapsing is the easy way down. Returns (losses, std of z/||z||, std
    of p/||p||) at the end."""
    cfg = _small_cfg(stop_gradient=stop_gradient)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    model = simsiam.SimSiam(backbone, 32, cfg)
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = model({"views": _noisy_views(x, step)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        z = model.projector(model.backbone(_noisy_views(x, steps)[0]))
        p = model.predictor(z)
    return losses, simsiam.output_std(z).item(), simsiam.output_std(p).item()


def test_without_stop_gradient_it_collapses_and_with_it_it_does_not():
    """Sec. 4.1: the stop-gradient removed (Config ``stop_gradient=False``), the loss heads for its minimum -1
    within a few dozen steps and the outputs collapse; with it, the same training keeps them spread. The
    projector ends in an affine-free BN, so in training mode every channel of z has zero mean and unit
    variance over the batch and z cannot be exactly constant: the collapse shows as p constant (std ~0)
    and z crowding into p's direction (its std falling far below the 1/sqrt(D) of spread outputs)."""
    spread = 1 / math.sqrt(32)  # ~0.177: the std of z/||z|| at initialisation
    losses, z_std, p_std = _train_on_fixed_images(stop_gradient=False)
    assert sum(losses[-5:]) / 5 < -0.8, losses  # seeds 0-3: -0.87 to -0.89
    assert p_std < 0.1 * spread and z_std < 0.6 * spread, (z_std, p_std)  # seeds 0-3: p 0.004-0.008, z 0.06-0.08
    losses_sg, z_std_sg, p_std_sg = _train_on_fixed_images(stop_gradient=True)
    assert sum(losses_sg[-5:]) / 5 > -0.4, losses_sg  # seeds 0-3: -0.17 to -0.21
    assert z_std_sg > 0.9 * spread and p_std_sg > 0.3 * spread, (z_std_sg, p_std_sg)  # z 0.173-0.175, p >= 0.08
    assert all(math.isfinite(v) for v in losses + losses_sg)


def test_smoke_fit_lowers_the_loss():
    cfg = _small_cfg()
    losses, model = smoke_fit(simsiam, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_view_recipe():
    cfg = simsiam.Config()
    pipelines = simsiam.augmentations(cfg, 224, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 2
    kinds = [type(t) for t in pipelines[0].transforms]
    assert kinds == [type(t) for t in pipelines[1].transforms]  # both views from the same distribution
    crop = pipelines[0].transforms[1]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.2, 1.0)
    jitter = pipelines[0].transforms[3]
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    assert jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    blur = pipelines[0].transforms[5]
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.5 and blur.transforms[0].kernel_size == (23, 23)
    small = simsiam.augmentations(cfg, 32)
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
                   for t in small[0].transforms)
    assert views.plan_views(small, in_memory=True).mode == "device"


def test_small_preset_names_config_fields_and_embed_is_the_backbone():
    fields = set(simsiam.Config.__dataclass_fields__)
    for preset in simsiam.PRESETS.values():
        assert set(preset) <= fields
    cfg = methods.make_config(simsiam, preset="small")
    model = tiny_model(simsiam, _small_cfg()).eval()
    x = fixed_batch(simsiam, cfg, n=4)["views"][0]
    torch.testing.assert_close(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
