"""DirectPred: the eigenvalue rule against numpy (float64), the predictor's spectrum, the loss against a literal
computation, the correlation's EMA, a W_p that no gradient or optimizer touches, the target's EMA, a smoke fit.
(F and W_p identical on every rank is checked in test_distributed.)"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

directpred = load("tian-2021-understanding")


def random_correlation(d: int, rank: int, seed: int = 0) -> torch.Tensor:
    """E[f f^T] of 3d random vectors confined to a rank-dimensional subspace: (d, d), float64."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(3 * d, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return f.T @ f / len(f)


def predictor_literal(corr: torch.Tensor, eps: float) -> np.ndarray:
    """Eqs. 18-19 with numpy: eigh, p_j = sqrt(max(s_j, 0) / max s) + eps (at least 1e-4), U diag(p) U^T."""
    s, u = np.linalg.eigh(corr.numpy().astype(np.float64))
    p = np.array([max(math.sqrt(max(sj, 0.0) / s.max()) + eps, 1e-4) for sj in s])
    return sum(p[j] * np.outer(u[:, j], u[:, j]) for j in range(len(s)))


# --- the predictor from the correlation -------------------------------------------------------------


@pytest.mark.parametrize("d,rank,eps", [(4, 4, 0.01), (8, 8, 0.1), (16, 5, 0.01), (6, 6, 0.0), (6, 3, -0.05)])
def test_predictor_matches_numpy(d, rank, eps):
    corr = random_correlation(d, rank)
    w = directpred.predictor_from_correlation(corr, eps)
    # a rank-deficient F has eigenvalues at rounding level (~1e-16 s_max), whose square roots (~1e-8) differ
    atol = 1e-9 if rank == d else 1e-6
    np.testing.assert_allclose(w.numpy(), predictor_literal(corr, eps), rtol=1e-9, atol=atol)


@pytest.mark.parametrize("d,rank", [(8, 8), (12, 4)])
def test_predictor_is_symmetric_psd_with_the_eigenvectors_of_f(d, rank):
    eps = 0.01
    corr = random_correlation(d, rank, seed=1)
    w = directpred.predictor_from_correlation(corr, eps)
    assert torch.equal(w, w.T)
    ev = torch.linalg.eigvalsh(w)
    assert ev.min() >= eps - 1e-9 and ev.max() == pytest.approx(1 + eps, abs=1e-9)  # top direction: 1 + eps
    # a rank-deficient F: the missing directions get exactly eps
    assert int((ev - eps).abs().lt(1e-6).sum()) == d - rank
    torch.testing.assert_close(w @ corr, corr @ w, rtol=0, atol=1e-9)  # commute: shared eigenvectors


def test_predictor_is_the_normalised_square_root():
    corr = random_correlation(6, 6, seed=2)
    w0 = directpred.predictor_from_correlation(corr, 0.0)
    top = torch.linalg.eigvalsh(corr).max()
    torch.testing.assert_close(w0 @ w0, corr / top, rtol=0, atol=1e-10)  # W_p^2 = F / max s at eps = 0
    torch.testing.assert_close(directpred.predictor_from_correlation(7.5 * corr, 0.1),
                               directpred.predictor_from_correlation(corr, 0.1), rtol=0, atol=1e-10)


def test_predictor_of_zero_correlation_is_eps_identity():
    w = directpred.predictor_from_correlation(torch.zeros(5, 5), 0.01)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, 0.01 * torch.eye(5))


def test_batch_correlation_matches_loop():
    f = torch.randn(10, 4, dtype=torch.float64)
    want = sum(torch.outer(row, row) for row in f) / len(f)
    torch.testing.assert_close(directpred.batch_correlation(f).double(), want, rtol=1e-6, atol=1e-6)


# --- the loss -------------------------------------------------------------------------------------


def regression_literal(p: torch.Tensor, z: torch.Tensor) -> float:
    """|| p/||p|| - z/||z|| ||^2 per row, averaged."""
    total = 0.0
    for pi, zi in zip(p.double(), z.double()):
        total += float(((pi / pi.norm() - zi / zi.norm()) ** 2).sum())
    return total / len(p)


@pytest.mark.parametrize("n,d", [(3, 4), (10, 16)])
def test_loss_matches_equation(n, d):
    p1, p2, z1, z2 = (torch.randn(n, d, dtype=torch.float64) for _ in range(4))
    assert directpred.regression_loss(p1, z2).item() == pytest.approx(regression_literal(p1, z2), rel=1e-10)
    want = regression_literal(p1, z2) + regression_literal(p2, z1)
    assert directpred.directpred_loss(p1, p2, z1, z2).item() == pytest.approx(want, rel=1e-10)


def test_limits():
    z = torch.randn(6, 8, dtype=torch.float64)
    assert directpred.regression_loss(2.5 * z, z).item() == pytest.approx(0.0, abs=1e-12)  # aligned
    assert directpred.regression_loss(-z, z).item() == pytest.approx(4.0, rel=1e-12)  # opposite
    # the loss sees W_p only up to scale
    w = directpred.predictor_from_correlation(random_correlation(8, 8), 0.01)
    assert directpred.regression_loss(z @ (3 * w), z).item() == pytest.approx(directpred.regression_loss(z @ w, z).item())


# --- the model ------------------------------------------------------------------------------------


def _cfg(**kw):
    return directpred.Config(proj_hidden_dim=32, proj_dim=16, **kw)


def _step(model, batch, opt=None, step=1, total=10):
    loss = model(batch)["loss"]
    if opt is not None:
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.on_step_end(step, total)
    return loss


def test_gradients_reach_backbone_not_predictor_or_target():
    cfg = _cfg()
    model = tiny_model(directpred, cfg)
    out = model(fixed_batch(directpred, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert not any("predictor" in n or "corr" in n for n in names)  # W_p and F are buffers
    assert {"predictor_weight", "corr", "corr_updates"} <= {n for n, _ in model.named_buffers()}
    group_ids = {id(p) for g in model.param_groups() for p in g["params"]}
    assert group_ids == {id(p) for p in model.online.parameters()}


def test_correlation_follows_its_ema_and_predictor_is_set_from_it():
    cfg = _cfg(rho=0.3)
    model = tiny_model(directpred, cfg)
    batches = [fixed_batch(directpred, cfg, n=8, seed=s) for s in (0, 1)]

    def stat(batch):  # E_B[f f^T] of both views, recomputed (same weights, same BN batch statistics)
        with torch.no_grad():
            f = torch.cat([model.online(v) for v in batch["views"][:2]]).double()
        return f.T @ f / len(f)

    w_init = model.predictor_weight.clone()
    model(batches[0])
    assert torch.equal(model.corr, torch.zeros_like(model.corr))  # nothing applied before the step ends
    first = stat(batches[0])
    model.on_step_end(1, 10)
    torch.testing.assert_close(model.corr.double(), first, rtol=1e-5, atol=1e-6)  # first update: the batch's
    assert not torch.equal(model.predictor_weight, w_init)
    torch.testing.assert_close(model.predictor_weight, directpred.predictor_from_correlation(model.corr, cfg.eps))

    model(batches[1])
    second = stat(batches[1])
    model.on_step_end(2, 10)
    torch.testing.assert_close(model.corr.double(), 0.3 * first + 0.7 * second, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.predictor_weight, directpred.predictor_from_correlation(model.corr, cfg.eps))
    assert int(model.corr_updates) == 2


def test_predictor_is_not_trained_and_freq_spaces_its_updates():
    cfg = _cfg(freq=3)
    model = tiny_model(directpred, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fixed_batch(directpred, cfg, n=8)
    changed = []
    for step in range(1, 8):
        w, corr = model.predictor_weight.clone(), model.corr.clone()
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.equal(model.predictor_weight, w)  # the optimizer step leaves W_p alone
        model.on_step_end(step, 10)
        assert not torch.equal(model.corr, corr)  # F moves every step
        changed.append(not torch.equal(model.predictor_weight, w))
    assert changed == [True, False, False, True, False, False, True]  # after steps 1, 4, 7


def test_forward_is_exact_for_the_current_predictor():
    cfg = _cfg()
    model = tiny_model(directpred, cfg)
    batch = fixed_batch(directpred, cfg, n=8)
    _step(model, batch)
    x1, x2 = batch["views"][:2]
    with torch.no_grad():
        z1, z2 = model.online(x1), model.online(x2)
        w = model.predictor_weight
        want = directpred.directpred_loss(z1 @ w.T, z2 @ w.T, model.target(x1), model.target(x2))
        got = model(batch)["loss"]
    torch.testing.assert_close(got, want)


def test_target_changes_only_through_constant_ema():
    cfg = _cfg(tau=0.9)
    model = tiny_model(directpred, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = [p.clone() for p in model.target.parameters()]
    loss = model(fixed_batch(directpred, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters()))
    online = [p.detach().clone() for p in model.online.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, online))
    model.on_step_end(7, 10)  # constant tau: the step does not matter
    for old, new, o in zip(before, model.target.parameters(), online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)


def test_predictor_keeps_a_constant_rate_under_the_harness_schedule():
    from selfsup import train

    model = tiny_model(directpred, _cfg())
    (group,) = model.param_groups()
    assert group["fixed_lr"] and group["weight_decay"] == 4e-4
    assert train.group_lr(group, 0.01, 0.5, 90, 10) == 0.5
    (group,) = tiny_model(directpred, _cfg(constant_lr=False)).param_groups()
    assert train.group_lr(group, 0.01, 0.5, 90, 10) == 0.01


def test_freq_must_be_positive():
    with pytest.raises(ValueError, match="freq"):
        tiny_model(directpred, _cfg(freq=0))


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(tau=0.99)
    losses, model = smoke_fit(directpred, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert int(model.corr_updates) == 30
    ev = torch.linalg.eigvalsh(model.predictor_weight.double())
    assert ev.min() >= cfg.eps - 1e-5 and ev.max() == pytest.approx(1 + cfg.eps, abs=1e-5)


# --- views, preset, embed -------------------------------------------------------------------------


def test_view_recipe():
    cfg = directpred.Config()
    pipelines = directpred.augmentations(cfg, 96, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 2
    types = [type(t) for t in pipelines[0].transforms]
    assert v2.GaussianBlur in types  # always applied at STL-10's 96 px
    blur = next(t for t in pipelines[0].transforms if isinstance(t, v2.GaussianBlur))
    assert tuple(blur.kernel_size) == (9, 9)
    jitter = next(t for t in pipelines[0].transforms if isinstance(t, v2.RandomApply)).transforms[0]
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))
    small = directpred.augmentations(cfg, 32)
    assert not any(isinstance(t, v2.GaussianBlur) for t in small[0].transforms)
    assert views.plan_views(small, in_memory=True).mode == "device"


def test_small_preset_names_config_fields_and_embed_is_the_backbone():
    fields = {f.name for f in dataclasses.fields(directpred.Config)}
    for preset in directpred.PRESETS.values():
        assert set(preset) <= fields
    cfg = methods.make_config(directpred, preset="small")
    model = tiny_model(directpred, dataclasses.replace(cfg, proj_hidden_dim=32, proj_dim=16)).eval()
    x = torch.randn(3, 3, 32, 32)
    e = model.embed(x)
    assert e.shape == (3, model.backbone.feature_dim)
    torch.testing.assert_close(e, model.backbone(x))
