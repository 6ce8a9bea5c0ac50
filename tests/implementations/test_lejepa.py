"""LeJEPA: the Epps-Pulley statistic against a literal quadrature and the exact integral, SIGReg's limits
(Gaussian, collapsed, uniform), the prediction term, the directions, gradients and a smoke fit."""

import cmath
import dataclasses
import math

import pytest
import torch

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

lejepa = load("lejepa")


def epps_pulley_literal(x: list[float], t_max: float, num_knots: int) -> float:
    """N int_{-t_max}^{t_max} |phi_N(t) - e^{-t^2/2}|^2 e^{-t^2/2} dt with the complex ECF and the trapezoidal
    rule on the full symmetric grid (2 num_knots - 1 knots, the same spacing), in Python floats."""
    n = len(x)
    ts = [-t_max + i * t_max / (num_knots - 1) for i in range(2 * num_knots - 1)]
    vals = []
    for t in ts:
        ecf = sum(cmath.exp(1j * t * xi) for xi in x) / n
        vals.append(abs(ecf - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2))
    dt = ts[1] - ts[0]
    return n * dt * (sum(vals) - (vals[0] + vals[-1]) / 2)


def epps_pulley_exact(x: torch.Tensor) -> float:
    """The integral over all of R in closed form (a Gaussian-kernel MMD, Sec. 5.2):
    N [sqrt(2 pi)/N^2 sum_jk e^{-(x_j - x_k)^2/2} - 2 sqrt(pi)/N sum_j e^{-x_j^2/4} + sqrt(2 pi/3)]."""
    x = x.double()
    n = len(x)
    d = x[:, None] - x[None, :]
    val = (math.sqrt(2 * math.pi) / n**2 * torch.exp(-d.square() / 2).sum()
           - 2 * math.sqrt(math.pi) / n * torch.exp(-x.square() / 4).sum() + math.sqrt(2 * math.pi / 3))
    return n * float(val)


COLLAPSED = math.sqrt(2 * math.pi) - 2 * math.sqrt(math.pi) + math.sqrt(2 * math.pi / 3)  # 0.409, per sample
GAUSSIAN_MEAN = math.sqrt(2 * math.pi) - math.sqrt(2 * math.pi / 3)  # 1.059, E[EP] under H0 (any N)


@pytest.mark.parametrize("n,m,t_max,knots", [(5, 3, 5.0, 17), (12, 2, 3.0, 9), (7, 4, 1.0, 5)])
def test_epps_pulley_matches_literal_quadrature(n, m, t_max, knots):
    g = torch.Generator().manual_seed(n * m)
    x = 1.5 * torch.randn(n, m, generator=g, dtype=torch.float64) + 0.3
    got = lejepa.epps_pulley(x, t_max, knots)
    assert got.shape == (m,)
    for j in range(m):
        assert got[j].item() == pytest.approx(epps_pulley_literal(x[:, j].tolist(), t_max, knots), rel=1e-10)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 0.5), (2, 1.3)])
def test_epps_pulley_matches_exact_integral(seed, scale):
    """The paper's 17 knots on [-5, 5] already give the integral over R for samples of unit scale."""
    x = scale * torch.randn(64, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = epps_pulley_exact(x[:, 0])
    assert lejepa.epps_pulley(x, 5.0, 17).item() == pytest.approx(exact, rel=1e-4)
    assert lejepa.epps_pulley(x, 10.0, 401).item() == pytest.approx(exact, rel=1e-10)


def test_sigreg_gaussian_is_small_collapsed_and_uniform_are_large():
    g = torch.Generator().manual_seed(0)
    n, k = 1000, 16
    a = lejepa.slice_directions(k, 256, seed=3).double()
    gauss = lejepa.sigreg(torch.randn(n, k, generator=g, dtype=torch.float64), a).item()
    # the statistic's noise under H0 is O(1) whatever N: 1.06 in expectation
    assert 0.7 < gauss < 1.5
    collapsed = lejepa.sigreg(torch.full((n, k), 0.7, dtype=torch.float64), a).item()
    point = lejepa.sigreg(torch.zeros(n, k, dtype=torch.float64), a).item()
    assert point == pytest.approx(n * COLLAPSED, rel=1e-5)  # phi_N = 1 on every slice
    assert collapsed > 100 * gauss
    assert lejepa.sigreg(3 * torch.randn(n, k, generator=g, dtype=torch.float64), a).item() > 100 * gauss
    # one-dimensional uniform samples of mean 0 and variance 1: the first two moments of N(0, 1), not its law
    # (in K dimensions random slices of a product of uniforms are nearly Gaussian, so the test is per slice)
    uniform = (torch.rand(n, 64, generator=g, dtype=torch.float64) - 0.5) * math.sqrt(12)  # 64 samples of N
    full = lejepa.epps_pulley(uniform).mean().item()
    assert full > 10 * GAUSSIAN_MEAN
    # grows with N for a wrong distribution, not for the right one
    assert full > 1.5 * lejepa.epps_pulley(uniform[: n // 2]).mean().item()


def test_gaussian_expectation():
    """Averaged over many slices and draws the statistic of N(0, 1) samples tends to its H0 mean."""
    x = torch.randn(200, 4096, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert lejepa.epps_pulley(x).mean().item() == pytest.approx(GAUSSIAN_MEAN, rel=0.05)


def test_sigreg_is_the_mean_over_slices_of_each_view():
    z = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (V, N, K)
    a = lejepa.slice_directions(6, 5, seed=0).double()
    got = lejepa.sigreg(z, a, 4.0, 9)
    assert got.shape == (3,)
    for v in range(3):
        proj = z[v] @ a
        want = sum(epps_pulley_literal(proj[:, j].tolist(), 4.0, 9) for j in range(5)) / 5
        assert got[v].item() == pytest.approx(want, rel=1e-10)


def test_slice_directions_unit_reproducible_and_resampled():
    a = lejepa.slice_directions(8, 32, seed=4)
    assert a.shape == (8, 32)
    assert torch.allclose(a.norm(dim=0), torch.ones(32), atol=1e-6)
    assert torch.equal(a, lejepa.slice_directions(8, 32, seed=4))
    assert not torch.allclose(a, lejepa.slice_directions(8, 32, seed=5))


def prediction_literal(z: torch.Tensor, n_global: int) -> float:
    v_all, n, k = z.shape
    total = 0.0
    for i in range(n):
        mu = [sum(float(z[v, i, d]) for v in range(n_global)) / n_global for d in range(k)]
        for v in range(v_all):
            total += sum((mu[d] - float(z[v, i, d])) ** 2 for d in range(k))
    return total / (v_all * n * k)


@pytest.mark.parametrize("v,n_global,n,k,lambd", [(2, 2, 5, 3, 0.05), (6, 2, 4, 5, 0.3), (4, 1, 3, 2, 0.9)])
def test_lejepa_loss_matches_equation(v, n_global, n, k, lambd):
    z = torch.randn(v, n, k, generator=torch.Generator().manual_seed(v * n), dtype=torch.float64)
    a = lejepa.slice_directions(k, 7, seed=v).double()
    loss, pred, reg = lejepa.lejepa_loss(z, n_global, a, lambd, 5.0, 17)
    want_pred = prediction_literal(z, n_global)
    want_reg = sum(epps_pulley_literal((z[i] @ a)[:, j].tolist(), 5.0, 17) for i in range(v) for j in range(7)) / (v * 7)
    assert pred.item() == pytest.approx(want_pred, rel=1e-10)
    assert reg.item() == pytest.approx(want_reg, rel=1e-10)
    assert loss.item() == pytest.approx((1 - lambd) * want_pred + lambd * want_reg, rel=1e-10)


def test_prediction_limits():
    z = torch.randn(1, 6, 4, dtype=torch.float64).expand(5, 6, 4)  # identical views
    assert lejepa.prediction_loss(z, 2).item() == pytest.approx(0.0, abs=1e-15)
    z = torch.randn(5, 6, 4, dtype=torch.float64)
    assert lejepa.prediction_loss(z, 2).item() > 0.1
    # the centre gets gradient (no stop-gradient): moving a global view moves every view's target
    z.requires_grad_(True)
    lejepa.prediction_loss(z, 2).backward()
    assert z.grad[:2].abs().sum() > 0 and z.grad[2:].abs().sum() > 0


def test_model_directions_follow_the_step():
    cfg = lejepa.Config(proj_hidden_dim=32, proj_dim=8, num_slices=16)
    model = tiny_model(lejepa, cfg)
    a0 = model.directions()
    assert torch.equal(a0, model.directions())  # fixed within a step
    model.on_step_end(1, 10)
    assert int(model.step) == 1 and not torch.allclose(a0, model.directions())
    assert "step" in dict(model.named_buffers())


def test_gradients_reach_backbone():
    cfg = dataclasses.replace(lejepa.Config(proj_hidden_dim=32, proj_dim=16, num_slices=64), n_local_views=2)
    model = tiny_model(lejepa, cfg)
    out = model(fixed_batch(lejepa, cfg, n=8))
    assert torch.isfinite(out["loss"]) and out["sigreg"] > 0
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0


def test_augmentations_multi_crop():
    cfg = lejepa.Config()
    views = fixed_batch(lejepa, cfg, n=4)["views"]
    assert len(views) == 8
    assert all(v.shape == (4, 3, 32, 32) for v in views[:2])
    assert all(v.shape == (4, 3, 16, 16) for v in views[2:])
    assert not torch.allclose(views[0], views[1])


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(lejepa.Config)}
    assert set(lejepa.PRESETS["small"]) <= fields
    lejepa.Config(**lejepa.PRESETS["small"])


def test_smoke_fit_lowers_the_loss():
    cfg = lejepa.Config(**{**lejepa.PRESETS["small"], "n_local_views": 2, "proj_hidden_dim": 64, "proj_dim": 16,
                           "num_slices": 128})
    losses, _ = smoke_fit(lejepa, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_embed_is_backbone_features():
    cfg = lejepa.Config(proj_hidden_dim=32, proj_dim=16)
    model = tiny_model(lejepa, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
