"""VIbCReg: each loss term against a literal computation, the normalised covariance's limits and scale
invariance, IterNorm against an eigen-decomposition ZCA whitening, its running statistics and gradients, the
projector, the view recipe and a smoke fit."""

import dataclasses
import math

import pytest
import torch

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

vibcreg = load("vibcreg")


# --- literal computations (loops, float64) -------------------------------------------------------


def invariance_literal(z1, z2) -> float:
    n, d = z1.shape
    return sum(float(z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)


def columns(z) -> tuple[int, int, list[list[float]]]:
    n, d = z.shape
    mean = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
    return n, d, [[float(z[i, j]) - mean[j] for i in range(n)] for j in range(d)]  # centred columns


def variance_literal(z, gamma: float, eps: float) -> float:
    n, d, cols = columns(z)
    return sum(max(0.0, gamma - math.sqrt(sum(v * v for v in c) / (n - 1) + eps)) for c in cols) / d


def normalized_covariance_literal(z) -> float:
    """(1/d^2) sum_{a != b} corr(z^a, z^b)^2 with corr the cosine of the centred columns."""
    _, d, cols = columns(z)
    norms = [math.sqrt(sum(v * v for v in c)) for c in cols]
    total = 0.0
    for a in range(d):
        for b in range(d):
            if a != b:
                total += (sum(x * y for x, y in zip(cols[a], cols[b])) / (norms[a] * norms[b])) ** 2
    return total / (d * d)


def vibcreg_literal(z1, z2, lambd, mu, nu, gamma, eps) -> float:
    var = variance_literal(z1, gamma, eps) + variance_literal(z2, gamma, eps)  # summed, as the official code
    cov = normalized_covariance_literal(z1) + normalized_covariance_literal(z2)
    return lambd * invariance_literal(z1, z2) + mu * var + nu * cov


def spread(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated float64 embeddings whose column stds span ~0.2-3 (the hinge on in some dimensions)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    return z * torch.logspace(-0.7, 0.5, d, dtype=torch.float64) + torch.randn(d, generator=g, dtype=torch.float64)


SHAPES = [(4, 3, 1.0, 1e-4), (9, 8, 1.0, 1e-4), (16, 5, 2.0, 0.0), (7, 6, 0.5, 1e-2)]


@pytest.mark.parametrize("n,d,gamma,eps", SHAPES)
def test_each_term_matches_literal(n, d, gamma, eps):
    z1, z2 = spread(n, d, n * d), spread(n, d, n * d + 1)
    assert vibcreg.invariance_loss(z1, z2).item() == pytest.approx(invariance_literal(z1, z2), rel=1e-10)
    for z in (z1, z2):
        want = variance_literal(z, gamma, eps)
        assert 0 < want < gamma
        assert vibcreg.variance_loss(z, gamma, eps).item() == pytest.approx(want, rel=1e-10)
        assert vibcreg.normalized_covariance_loss(z).item() == pytest.approx(normalized_covariance_literal(z), rel=1e-10)


@pytest.mark.parametrize("n,d,gamma,eps", SHAPES)
def test_loss_matches_literal(n, d, gamma, eps):
    z1, z2 = spread(n, d, 3 * n), spread(n, d, 3 * n + 1)
    for lambd, mu, nu in [(25.0, 25.0, 200.0), (5.0, 10.0, 0.5)]:
        loss, terms = vibcreg.vibcreg_loss(z1, z2, lambd, mu, nu, gamma, eps)
        assert loss.item() == pytest.approx(vibcreg_literal(z1, z2, lambd, mu, nu, gamma, eps), rel=1e-10)
        assert set(terms) == {"invariance", "variance", "covariance"}
    default, t = vibcreg.vibcreg_loss(z1, z2)  # lambda = mu = 25, nu = 200 (official config)
    want = 25 * t["invariance"] + 25 * t["variance"] + 200 * t["covariance"]
    assert default.item() == pytest.approx(want.item(), rel=1e-12)


def test_normalized_covariance_is_scale_free_unlike_vicregs():
    """The correlation matrix does not change when a column is rescaled or shifted; VICReg's covariance does."""
    z = spread(12, 6, 0)
    scale = torch.logspace(-2, 2, 6, dtype=torch.float64)
    base = vibcreg.normalized_covariance_loss(z).item()
    assert vibcreg.normalized_covariance_loss(z * scale + 3.0).item() == pytest.approx(base, rel=1e-10)
    assert vibcreg.normalized_covariance_loss(10 * z).item() == pytest.approx(base, rel=1e-10)
    def raw(z):  # VICReg's term: squared off-diagonal covariances, which grow with the fourth power of scale
        c = torch.cov(z.T)
        return (c - torch.diag(c.diagonal())).pow(2).sum().item()

    assert raw(10 * z) == pytest.approx(1e4 * raw(z), rel=1e-10)
    # bounded: every squared correlation is at most 1, so c <= (d - 1) / d, reached by identical columns
    same = z[:, :1].repeat(1, 6)
    assert vibcreg.normalized_covariance_loss(same).item() == pytest.approx(5 / 6, rel=1e-10)
    assert 0 < base < 5 / 6


def test_limits_collapsed_and_whitened():
    n, d = 12, 5
    g = torch.Generator().manual_seed(5)
    same = torch.randn(d, generator=g, dtype=torch.float64).repeat(n, 1)  # a collapsed batch
    assert vibcreg.variance_loss(same).item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-12)
    assert vibcreg.normalized_covariance_loss(same).item() == pytest.approx(0.0, abs=1e-12)  # ~zero columns
    loss, t = vibcreg.vibcreg_loss(same, same)
    assert t["invariance"].item() == 0 and loss.item() == pytest.approx(25 * 2 * (1 - math.sqrt(1e-4)), rel=1e-12)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(dim=0))
    white = q * math.sqrt(n - 1) + torch.randn(d, generator=g, dtype=torch.float64)  # unbiased cov = I
    loss, t = vibcreg.vibcreg_loss(white, white)
    assert t["variance"].item() == 0 and t["invariance"].item() == 0
    assert t["covariance"].item() == pytest.approx(0.0, abs=1e-24) and loss.item() == pytest.approx(0.0, abs=1e-20)
    rand = vibcreg.vibcreg_loss(white, torch.randn(n, d, generator=g, dtype=torch.float64))[0].item()
    assert loss.item() < rand and loss.item() < vibcreg.vibcreg_loss(same, same)[0].item()


# --- IterNorm ---------------------------------------------------------------------------------------


def zca_literal(x: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """Each block of `group` columns whitened by Sigma^{-1/2} from an eigen-decomposition (float64)."""
    outs = []
    for b in x.double().split(group, dim=1):
        bc = b - b.mean(dim=0)
        sigma = bc.T @ bc / b.shape[0] + eps * torch.eye(group, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(sigma)
        outs.append(bc @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T))  # Sigma^{-1/2} is symmetric
    return torch.cat(outs, dim=1)


def correlated(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 5.0).to(dtype)


def test_iternorm_approaches_zca_whitening_as_iterations_grow():
    n, d, groups, eps = 64, 8, 2, 1e-5
    x = correlated(n, d, 0)
    want = zca_literal(x, d // groups, eps)
    errors, cov_errors = [], []
    for iters in (1, 2, 3, 5, 10):
        layer = vibcreg.IterNorm(d, groups, iters, eps, affine=False).double().train()
        out = layer(x).double()
        errors.append((out - want).abs().max().item())
        cov = torch.stack([torch.cov(b.T, correction=0) for b in out.split(d // groups, dim=1)])
        cov_errors.append((cov - torch.eye(d // groups, dtype=torch.float64)).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors  # monotone towards ZCA
    assert all(b <= a + 1e-12 for a, b in zip(cov_errors, cov_errors[1:])), cov_errors
    assert errors[0] > 0.1 and errors[-1] < 1e-8, errors  # one step is far from it, many reach it
    assert cov_errors[-1] < 1e-4 and cov_errors[3] < cov_errors[0]  # T = 5 between; eps keeps it off I by ~eps/a_min
    # past convergence the uncoupled iteration amplifies rounding errors when the covariance's condition
    # number exceeds ~2.4 (see whitening_matrix): a well-conditioned one stays at ZCA for any T
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    x = torch.randn(256, 4, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T, correction=0))).T  # white
    x = x @ torch.diag(torch.tensor([1.0, 1.1, 1.2, 1.3], dtype=torch.float64)) @ q.T  # eigenvalues 1-1.69
    for iters in (10, 100):
        out = vibcreg.IterNorm(4, 1, iters, eps, affine=False).double().train()(x)
        torch.testing.assert_close(out, zca_literal(x, 4, eps), rtol=0, atol=1e-10)
    # the float32 layer at the defaults: within-group covariance near I (not exact at T = 5)
    x32 = correlated(256, 64, 1, torch.float32)
    out = vibcreg.IterNorm(64, 4).train()(x32)
    cov = torch.stack([torch.cov(b.T, correction=0) for b in out.double().split(16, dim=1)])
    assert (cov - torch.eye(16, dtype=torch.float64)).abs().max() < 0.5
    assert out.mean(dim=0).abs().max() < 1e-4


def test_iternorm_groups_follow_the_official_rule():
    assert [vibcreg.iternorm_group_size(d, 64) for d in (4096, 1024, 8, 100, 65)] == [64, 16, 1, 2, 1]
    layer = vibcreg.IterNorm(8, 64)
    assert (layer.num_groups, layer.group_size) == (8, 1)
    x = correlated(32, 8, 2, torch.float32)
    standardised = (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, correction=0) + 1e-5)
    torch.testing.assert_close(layer.train()(x), standardised, rtol=1e-4, atol=1e-4)  # groups of 1 = BN


def test_iternorm_running_statistics_and_eval():
    d, groups, m = 6, 2, 0.1
    layer = vibcreg.IterNorm(d, groups, 5, 1e-5, momentum=m).double().train()
    x1, x2 = correlated(40, d, 3), correlated(40, d, 4)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(layer.running_wm, eye)

    def stats(x):
        xg = x.T.reshape(groups, 3, -1)
        mean = xg.mean(-1, keepdim=True)
        return mean, vibcreg.whitening_matrix(xg - mean, 5, 1e-5)

    layer(x1)
    layer(x2)
    (mu1, w1), (mu2, w2) = stats(x1), stats(x2)
    torch.testing.assert_close(layer.running_mean, (1 - m) * m * mu1 + m * mu2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_wm, (1 - m) ** 2 * eye + (1 - m) * m * w1 + m * w2, rtol=1e-12, atol=1e-12)
    assert not any(b.requires_grad for b in layer.buffers())
    layer.eval()
    before = [b.clone() for b in layer.buffers()]
    y = layer(x1[:3])  # eval: the running statistics, no update, works on any batch size
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))
    want = (layer.running_wm @ (x1[:3].T.reshape(2, 3, 3) - layer.running_mean)).reshape(d, 3).T
    torch.testing.assert_close(y, want)


def test_iternorm_gradient_is_exact():
    layer = vibcreg.IterNorm(4, 2, 5, 1e-3).double().train()
    x = correlated(7, 4, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-6)
    # the gradient flows through the batch statistics: a sample's output depends on the others' inputs
    out = layer(x)
    (g,) = torch.autograd.grad(out[0].sum(), x)
    assert g[1:].abs().sum() > 0


def test_iternorm_runs_in_float32_under_autocast():
    layer = vibcreg.IterNorm(16, 4).train()
    x = correlated(32, 16, 6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- model ---------------------------------------------------------------------------------------


def _cfg(**kw):
    return vibcreg.Config(proj_hidden_dim=32, proj_dim=16, iternorm_groups=4, **kw)


def test_projector_architecture_and_defaults():
    h = vibcreg.projector(32, 64, 16, _cfg())
    kinds = [type(m).__name__ for m in h]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "IterNorm"]
    assert [(m.in_features, m.out_features) for m in h if isinstance(m, torch.nn.Linear)] == [(32, 64), (64, 64), (64, 16)]
    assert all(m.bias is None for m in h if isinstance(m, torch.nn.Linear)) and h[7].bias is None
    assert h[7].weight is not None and (h[7].num_groups, h[7].group_size, h[7].iters) == (4, 4, 5)
    cfg = vibcreg.Config()
    assert (cfg.proj_hidden_dim, cfg.proj_dim, cfg.iternorm_groups, cfg.iternorm_iters) == (4096, 4096, 64, 5)
    assert (cfg.lambd, cfg.mu, cfg.nu, cfg.gamma, cfg.eps) == (25.0, 25.0, 200.0, 1.0, 1e-4)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 1e-3, 1e-5, 0)


def test_forward_logs_the_terms_and_gradients_reach_backbone():
    cfg = _cfg()
    model = tiny_model(vibcreg, cfg)
    out = model(fixed_batch(vibcreg, cfg, n=16))
    assert torch.isfinite(out["loss"])
    recombined = 25 * out["invariance"] + 25 * out["variance"] + 200 * out["covariance"]
    torch.testing.assert_close(out["loss"].detach(), recombined)
    assert out["std"] > 0.5  # IterNorm hands the loss (nearly) unit-variance dimensions
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_view_recipe():
    cfg = vibcreg.Config()
    small = vibcreg.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(small) == 2 and views.plan_views(small, in_memory=True).mode == "device"
    big = vibcreg.augmentations(cfg, 224)

    def probs(p, name):
        return [t.p for t in p.transforms if type(t).__name__ == name or
                (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]

    assert [probs(p, "GaussianBlur") for p in big] == [[0.5], [0.5]]
    assert [probs(p, "RandomSolarize") for p in big] == [[0.1], [0.1]]
    assert [probs(p, "ColorJitter") for p in big] == [[0.8], [0.8]]
    assert all(probs(p, "GaussianBlur") == [] for p in small)  # no blur below 64 px
    views_ = fixed_batch(vibcreg, cfg, n=4)["views"]
    assert len(views_) == 2 and views_[0].shape == (4, 3, 32, 32) and not torch.allclose(views_[0], views_[1])


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(vibcreg.Config)}
    assert set(vibcreg.PRESETS["small"]) <= fields
    cfg = dataclasses.replace(vibcreg.Config(), **vibcreg.PRESETS["small"])
    assert cfg.proj_dim < vibcreg.Config().proj_dim and (cfg.lambd, cfg.mu, cfg.nu) == (25.0, 25.0, 200.0)


def test_embed_is_backbone_features():
    model = tiny_model(vibcreg, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)


def test_smoke_fit_lowers_the_loss():
    cfg = vibcreg.Config(proj_hidden_dim=64, proj_dim=64, iternorm_groups=8)
    losses, _ = smoke_fit(vibcreg, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
