"""Deep CCA: the total correlation against numpy CCA in float64, its limits and invariances, the gradient
against finite differences and the paper's closed form, the model's gradients, views and a smoke fit."""

import math

import numpy as np
import pytest
import torch

from selfsup import methods

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

dcca = load("deep-cca")


def correlated_pair(n: int, o: int, shared: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, o) float64 views that share `shared` latent signals, each mixed and shifted at random, plus noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, shared, generator=g, dtype=torch.float64)
    views = []
    for _ in range(2):
        own = torch.randn(n, o, generator=g, dtype=torch.float64)
        mix = torch.randn(shared, o, generator=g, dtype=torch.float64)
        views.append(z @ mix + 0.5 * own + torch.randn(o, generator=g, dtype=torch.float64))
    return views[0], views[1]


def corr_numpy(h1: np.ndarray, h2: np.ndarray, r1: float, r2: float, k: int = 0) -> float:
    """CCA the textbook way, independent of the file: covariances by loops over samples, S^{-1/2} from
    numpy's SVD of S (S = W diag(s) W^T), T's singular values from numpy's SVD."""
    n, o = h1.shape
    mu1 = [sum(h1[i, a] for i in range(n)) / n for a in range(o)]
    mu2 = [sum(h2[i, a] for i in range(n)) / n for a in range(o)]

    def cov(x, mx, y, my):
        return np.array([[sum((x[i, a] - mx[a]) * (y[i, b] - my[b]) for i in range(n)) / (n - 1) for b in range(o)]
                         for a in range(o)])

    def inv_sqrt(s):
        w, sv, _ = np.linalg.svd(s)
        return w @ np.diag(sv ** -0.5) @ w.T

    s11 = cov(h1, mu1, h1, mu1) + r1 * np.eye(o)
    s22 = cov(h2, mu2, h2, mu2) + r2 * np.eye(o)
    s12 = cov(h1, mu1, h2, mu2)
    d = np.linalg.svd(inv_sqrt(s11) @ s12 @ inv_sqrt(s22), compute_uv=False)
    return float(d[:k].sum() if 0 < k < o else d.sum())


def closed_form_grad(h1: torch.Tensor, h2: torch.Tensor, r1: float, r2: float):
    """The paper's gradient of corr (Sec. 2), written for (N, o) rows: with T = U D V^T,
    dcorr/dH1 = (2 H1c D11 + H2c D12^T) / (N - 1), D12 = S11^{-1/2} U V^T S22^{-1/2},
    D11 = -1/2 S11^{-1/2} U D U^T S11^{-1/2}; symmetrically for H2. numpy, float64."""
    x1, x2 = h1.numpy(), h2.numpy()
    n, o = x1.shape
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    s11 = c1.T @ c1 / (n - 1) + r1 * np.eye(o)
    s22 = c2.T @ c2 / (n - 1) + r2 * np.eye(o)
    s12 = c1.T @ c2 / (n - 1)

    def inv_sqrt(s):
        lam, w = np.linalg.eigh(s)
        return w @ np.diag(lam ** -0.5) @ w.T

    k11, k22 = inv_sqrt(s11), inv_sqrt(s22)
    u, d, vt = np.linalg.svd(k11 @ s12 @ k22)
    d12 = k11 @ u @ vt @ k22
    d11 = -0.5 * k11 @ u @ np.diag(d) @ u.T @ k11
    d22 = -0.5 * k22 @ vt.T @ np.diag(d) @ vt @ k22
    return (2 * c1 @ d11 + c2 @ d12.T) / (n - 1), (c1 @ d12 + 2 * c2 @ d22) / (n - 1)


@pytest.mark.parametrize("n,o,r,k", [(12, 3, 1e-4, 0), (20, 5, 1e-2, 0), (9, 4, 0.0, 0), (30, 6, 1e-3, 2)])
def test_total_correlation_matches_numpy(n, o, r, k):
    h1, h2 = correlated_pair(n, o, shared=2, seed=n + o)
    got = dcca.total_correlation(h1, h2, r, 2 * r, k).item()
    assert got == pytest.approx(corr_numpy(h1.numpy(), h2.numpy(), r, 2 * r, k), rel=1e-9)


def test_limits_identical_independent_collapsed():
    n, o = 64, 4
    h, _ = correlated_pair(n, o, shared=2, seed=1)
    # identical views of a full-rank batch, no ridge: every canonical correlation is 1, corr = o, the maximum
    assert dcca.total_correlation(h, h, 0.0, 0.0).item() == pytest.approx(o, rel=1e-9)
    # independent views: small sample correlations only (o^2 / N on average)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4096, o, generator=g, dtype=torch.float64), torch.randn(4096, o, generator=g, dtype=torch.float64)
    assert dcca.total_correlation(a, b, 1e-4, 1e-4).item() < 0.15
    # a constant output has covariance r I and no cross-covariance: corr = 0, the worst value
    const = torch.ones(n, o, dtype=torch.float64)
    assert dcca.total_correlation(const, h, 1e-4, 1e-4).item() == pytest.approx(0.0, abs=1e-12)
    # the loss is -corr, and correlated pairs score between the two
    h1, h2 = correlated_pair(n, o, shared=2, seed=3)
    assert -o < dcca.deep_cca_loss(h1, h2, 1e-4, 1e-4).item() < -dcca.total_correlation(a[:n], b[:n], 1e-4, 1e-4).item()


def test_invariant_to_invertible_linear_maps_and_symmetric():
    h1, h2 = correlated_pair(40, 4, shared=3, seed=4)
    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    base = dcca.total_correlation(h1, h2, 0.0, 0.0).item()
    assert dcca.total_correlation(h1 @ m1 + 7, h2 @ m2 - 3, 0.0, 0.0).item() == pytest.approx(base, rel=1e-8)
    assert dcca.total_correlation(h2, h1, 0.0, 0.0).item() == pytest.approx(base, rel=1e-10)


def test_inv_sqrtm_and_its_gradient():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s = a @ a.T + 0.5 * torch.eye(5, dtype=torch.float64)
    r = dcca.inv_sqrtm(s)
    torch.testing.assert_close(r @ s @ r, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    # through a symmetric construction (eigh reads one triangle), with a repeated eigenvalue as well
    assert torch.autograd.gradcheck(lambda x: dcca.inv_sqrtm(x @ x.T + 0.5 * torch.eye(5, dtype=x.dtype)),
                                    (a.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: dcca.inv_sqrtm(x + x.T + 4 * torch.eye(5, dtype=x.dtype)),
                                    (torch.zeros(5, 5, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("n,o,r,k", [(10, 3, 1e-3, 0), (16, 4, 1e-2, 0), (16, 4, 1e-2, 2)])
def test_gradient_matches_finite_differences(n, o, r, k):
    h1, h2 = correlated_pair(n, o, shared=2, seed=7 + n)
    assert torch.autograd.gradcheck(lambda a, b: dcca.total_correlation(a, b, r, r, k),
                                    (h1.requires_grad_(), h2.requires_grad_()))


@pytest.mark.parametrize("n,o,r", [(12, 3, 1e-4), (25, 5, 1e-2)])
def test_gradient_matches_the_paper_closed_form(n, o, r):
    h1, h2 = correlated_pair(n, o, shared=2, seed=n * o)
    a, b = h1.clone().requires_grad_(), h2.clone().requires_grad_()
    dcca.total_correlation(a, b, r, r).backward()
    g1, g2 = closed_form_grad(h1, h2, r, r)
    np.testing.assert_allclose(a.grad.numpy(), g1, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.grad.numpy(), g2, rtol=1e-8, atol=1e-10)


def test_loss_is_float64_inside_and_returns_float32():
    h1, h2 = correlated_pair(16, 3, shared=2, seed=8)
    out = dcca.deep_cca_loss(h1.float(), h2.float(), 1e-4, 1e-4)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-dcca.total_correlation(h1, h2, 1e-4, 1e-4).item(), rel=1e-5)


def test_gradients_reach_backbone_and_both_heads():
    cfg = dcca.Config(proj_hidden_dim=32, proj_dim=4)
    model = tiny_model(dcca, cfg)
    out = model(fixed_batch(dcca, cfg, n=16))
    assert torch.isfinite(out["loss"]) and 0 <= out["corr_per_dim"].item() <= 1
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    for head in (model.head1, model.head2):
        assert sum(float(p.grad.abs().sum()) for p in head.parameters()) > 0
    assert model.backbone2 is None


def test_separate_backbones_option():
    cfg = dcca.Config(proj_hidden_dim=32, proj_dim=4, separate_backbones=True)
    model = tiny_model(dcca, cfg)
    assert model.backbone2 is not None and model.backbone2 is not model.backbone
    out = model(fixed_batch(dcca, cfg, n=16))
    assert backbone_grad_norm(model, out["loss"], model.backbone2) > 0
    assert backbone_grad_norm(model, model(fixed_batch(dcca, cfg, n=16))["loss"], model.backbone) > 0


def test_top_k_is_checked():
    with pytest.raises(ValueError, match="top_k"):
        tiny_model(dcca, dcca.Config(proj_hidden_dim=8, proj_dim=4, top_k=5))


def test_augmentations_give_two_distinct_views():
    views = fixed_batch(dcca, dcca.Config(), n=4)["views"]
    assert len(views) == 2 and views[0].shape == (4, 3, 32, 32)
    assert not torch.allclose(views[0], views[1])


def test_small_preset_names_config_fields():
    fields = set(dcca.Config.__dataclass_fields__)
    assert set(dcca.PRESETS["small"]) <= fields
    methods.make_config(dcca, preset="small")


def test_smoke_fit_raises_the_correlation():
    cfg = dcca.Config(proj_hidden_dim=64, proj_dim=4, r1=1e-3, r2=1e-3)
    losses, _ = smoke_fit(dcca, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_embed_is_backbone_features():
    cfg = dcca.Config(proj_hidden_dim=32, proj_dim=4)
    model = tiny_model(dcca, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
