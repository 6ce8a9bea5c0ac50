"""VICReg: each term of Eq. 6 against a literal computation, its limits, the coefficients, the std hinge's
gradient, the expander, the view recipe and a smoke fit."""

import dataclasses
import math

import pytest
import torch

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

vicreg = load("vicreg")


# --- literal computations of Eqs. 1-6 (loops, float64) --------------------------------------------


def invariance_literal(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean over the n d entries of (z_ij - z'_ij)^2 (Eq. 5 averaged over dimensions, as Alg. 1)."""
    n, d = z1.shape
    return sum(float(z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)


def column_stats(z: torch.Tensor) -> tuple[list[float], list[list[float]]]:
    n, d = z.shape
    mean = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
    cov = [[sum((float(z[i, a]) - mean[a]) * (float(z[i, b]) - mean[b]) for i in range(n)) / (n - 1)
            for b in range(d)] for a in range(d)]  # Eq. 3
    return mean, cov


def variance_literal(z: torch.Tensor, gamma: float, eps: float) -> float:
    """Eqs. 1-2: (1/d) sum_j max(0, gamma - sqrt(Var(z^j) + eps)), Var with 1/(n - 1)."""
    _, cov = column_stats(z)
    d = len(cov)
    return sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d


def covariance_literal(z: torch.Tensor) -> float:
    """Eq. 4: (1/d) sum_{a != b} C(Z)_ab^2."""
    _, cov = column_stats(z)
    d = len(cov)
    return sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d


def vicreg_literal(z1, z2, lambd, mu, nu, gamma, eps) -> float:
    """Eq. 6 as main_vicreg.py weighs it: the variance terms of the two branches averaged."""
    var = (variance_literal(z1, gamma, eps) + variance_literal(z2, gamma, eps)) / 2
    return lambd * invariance_literal(z1, z2) + mu * var + nu * (covariance_literal(z1) + covariance_literal(z2))


def spread(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated float64 embeddings whose column stds span ~0.2-3, so the hinge is on for some, off for others."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    return z * torch.logspace(-0.7, 0.5, d, dtype=torch.float64) + torch.randn(d, generator=g, dtype=torch.float64)


SHAPES = [(4, 3, 1.0, 1e-4), (9, 8, 1.0, 1e-4), (16, 5, 2.0, 0.0), (7, 6, 0.5, 1e-2)]


@pytest.mark.parametrize("n,d,gamma,eps", SHAPES)
def test_each_term_matches_equation(n, d, gamma, eps):
    z1, z2 = spread(n, d, n * d), spread(n, d, n * d + 1)
    assert vicreg.invariance_loss(z1, z2).item() == pytest.approx(invariance_literal(z1, z2), rel=1e-10)
    for z in (z1, z2):
        want = variance_literal(z, gamma, eps)
        assert 0 < want < gamma  # the hinge is active in some dimensions, not in all
        assert vicreg.variance_loss(z, gamma, eps).item() == pytest.approx(want, rel=1e-10)
        assert vicreg.covariance_loss(z).item() == pytest.approx(covariance_literal(z), rel=1e-10)


@pytest.mark.parametrize("n,d,gamma,eps", SHAPES)
def test_loss_matches_equation_6(n, d, gamma, eps):
    z1, z2 = spread(n, d, 3 * n), spread(n, d, 3 * n + 1)
    for lambd, mu, nu in [(25.0, 25.0, 1.0), (5.0, 10.0, 0.5)]:
        loss, terms = vicreg.vicreg_loss(z1, z2, lambd, mu, nu, gamma, eps)
        assert loss.item() == pytest.approx(vicreg_literal(z1, z2, lambd, mu, nu, gamma, eps), rel=1e-10)
        assert set(terms) == {"invariance", "variance", "covariance"}


def test_coefficients_scale_their_own_term():
    z1, z2 = spread(10, 6, 0), spread(10, 6, 1)
    _, t = vicreg.vicreg_loss(z1, z2)
    for (lambd, mu, nu), name in [((1, 0, 0), "invariance"), ((0, 1, 0), "variance"), ((0, 0, 1), "covariance")]:
        alone, _ = vicreg.vicreg_loss(z1, z2, lambd, mu, nu)
        assert alone.item() == pytest.approx(t[name].item(), rel=1e-12)
        doubled, _ = vicreg.vicreg_loss(z1, z2, 3.0 * lambd, 3.0 * mu, 3.0 * nu)
        assert doubled.item() == pytest.approx(3 * t[name].item(), rel=1e-12)
    default, _ = vicreg.vicreg_loss(z1, z2)  # lambda = mu = 25, nu = 1 (Sec. 4.2)
    want = 25 * t["invariance"] + 25 * t["variance"] + t["covariance"]
    assert default.item() == pytest.approx(want.item(), rel=1e-12)


def test_symmetric_in_the_views_and_invariant_to_a_shift():
    z1, z2 = spread(8, 5, 2), spread(8, 5, 3)
    loss = vicreg.vicreg_loss(z1, z2)[0].item()
    assert vicreg.vicreg_loss(z2, z1)[0].item() == pytest.approx(loss, rel=1e-12)
    shift = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for term in (vicreg.variance_loss, vicreg.covariance_loss):  # batch statistics: a common offset is invisible
        assert term(z1 + shift).item() == pytest.approx(term(z1).item(), rel=1e-9)


def test_limits_collapsed_and_whitened():
    n, d = 12, 5
    gamma, eps = 1.0, 1e-4
    g = torch.Generator().manual_seed(5)
    # collapsed: every sample has the same embedding; the std is 0, each dimension pays gamma - sqrt(eps)
    same = torch.randn(d, generator=g, dtype=torch.float64).repeat(n, 1)
    assert vicreg.variance_loss(same, gamma, eps).item() == pytest.approx(gamma - math.sqrt(eps), rel=1e-12)
    assert vicreg.variance_loss(same, 2.0, 0.0).item() == pytest.approx(2.0, rel=1e-12)  # = gamma when eps = 0
    assert vicreg.covariance_loss(same).item() == pytest.approx(0.0, abs=1e-20)
    loss, t = vicreg.vicreg_loss(same, same)
    assert t["invariance"].item() == 0 and loss.item() == pytest.approx(25 * (gamma - math.sqrt(eps)), rel=1e-12)
    # whitened: C(Z) = I exactly (centred orthonormal columns times sqrt(n - 1)), identical views: all three are 0
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(dim=0))
    white = q * math.sqrt(n - 1) + torch.randn(d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(white.T), torch.eye(d, dtype=torch.float64))
    loss, t = vicreg.vicreg_loss(white, white)
    assert t["variance"].item() == 0 and t["invariance"].item() == 0
    assert t["covariance"].item() == pytest.approx(0.0, abs=1e-20)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    # the whitened, aligned batch is the minimum (every term >= 0); random views and the collapse cost more
    rand = vicreg.vicreg_loss(white, torch.randn(n, d, generator=g, dtype=torch.float64))[0].item()
    assert loss.item() < rand and loss.item() < vicreg.vicreg_loss(same, same)[0].item()


def test_std_hinge_gradient_does_not_vanish_near_collapse():
    """Sec. 4.1: with S the std, the gradient of v does not shrink with the spread of the batch (with
    eps = 0 it is exactly scale-free); a hinge on the variance would shrink with it."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(6, generator=g, dtype=torch.float64)
    noise = torch.randn(10, 6, generator=g, dtype=torch.float64)
    grads = []
    for delta in (1e-1, 1e-3):
        z = (base + delta * noise).requires_grad_(True)
        vicreg.variance_loss(z, 1.0, 0.0).backward()
        grads.append(z.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=0)
    assert grads[0].abs().sum() > 0
    var_grads = []
    for delta in (1e-1, 1e-3):
        z = (base + delta * noise).requires_grad_(True)
        torch.relu(1.0 - z.var(dim=0)).mean().backward()
        var_grads.append(z.grad.norm().item())
    assert var_grads[1] < 0.02 * var_grads[0]


def test_expander_architecture():
    h = vicreg.expander(32, 64, 16, layers=3)
    kinds = [type(m).__name__ for m in h]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in h if isinstance(m, torch.nn.Linear)] == [(32, 64), (64, 64), (64, 16)]
    assert h[-1].bias is None  # the last layer is linear, without bias (official Projector)
    cfg = vicreg.Config()
    assert (cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers) == (8192, 8192, 3)
    assert (cfg.lambd, cfg.mu, cfg.nu, cfg.gamma, cfg.eps) == (25.0, 25.0, 1.0, 1.0, 1e-4)


def _cfg(**kw):
    return vicreg.Config(proj_hidden_dim=32, proj_dim=16, **kw)


def test_forward_logs_the_terms_and_gradients_reach_backbone():
    cfg = _cfg()
    model = tiny_model(vicreg, cfg)
    out = model(fixed_batch(vicreg, cfg, n=8))
    assert torch.isfinite(out["loss"])
    recombined = 25 * out["invariance"] + 25 * out["variance"] + out["covariance"]
    torch.testing.assert_close(out["loss"].detach(), recombined)
    assert out["std"] > 0
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.expander.parameters())


def test_view_recipe():
    cfg = vicreg.Config()
    small = vicreg.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(small) == 2 and views.plan_views(small, in_memory=True).mode == "device"
    big = vicreg.augmentations(cfg, 224)

    def probs(p, name):
        return [t.p for t in p.transforms if type(t).__name__ == name or
                (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]

    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in big]
    assert [tuple(c.scale) for c in crops] == [(0.08, 1.0)] * 2
    assert [probs(p, "GaussianBlur") for p in big] == [[0.5], [0.5]]  # App. C.1, symmetrised
    assert [probs(p, "RandomSolarize") for p in big] == [[0.1], [0.1]]
    assert [probs(p, "ColorJitter") for p in big] == [[0.8], [0.8]]
    blur = next(t.transforms[0] for t in big[0].transforms if type(t).__name__ == "RandomApply"
                and type(t.transforms[0]).__name__ == "GaussianBlur")
    assert list(blur.kernel_size) == [23, 23]
    assert all(probs(p, "GaussianBlur") == [] for p in small)  # no blur below 64 px
    official = vicreg.augmentations(dataclasses.replace(cfg, blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2)), 224)
    assert [probs(p, "GaussianBlur") for p in official] == [[1.0], [0.1]]
    assert [probs(p, "RandomSolarize") for p in official] == [[0.0], [0.2]]
    views_ = fixed_batch(vicreg, cfg, n=4)["views"]
    assert len(views_) == 2 and views_[0].shape == (4, 3, 32, 32) and not torch.allclose(views_[0], views_[1])


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(vicreg.Config)}
    assert set(vicreg.PRESETS["small"]) <= fields
    cfg = dataclasses.replace(vicreg.Config(), **vicreg.PRESETS["small"])
    assert cfg.proj_dim < vicreg.Config().proj_dim and (cfg.lambd, cfg.mu, cfg.nu) == (25.0, 25.0, 1.0)


def test_embed_is_backbone_features():
    model = tiny_model(vicreg, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)


def test_smoke_fit_lowers_the_loss():
    cfg = vicreg.Config(proj_hidden_dim=64, proj_dim=64, optimizer="sgd")
    losses, _ = smoke_fit(vicreg, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
