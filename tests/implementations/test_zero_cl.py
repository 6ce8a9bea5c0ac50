"""Zero-CL: the ZCA whitening against numpy in float64, both loss terms against literal computations with loops,
the limits, the stop-gradient through the whitening matrix, gradients, the view recipe and a smoke fit."""

import math

import numpy as np
import pytest
import torch

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

zero_cl = load("zero-cl")


def correlated(m: int, k: int, seed: int) -> torch.Tensor:
    """m samples of k correlated features (float64): standard normals times a random mixing, plus a shift."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64) + 2.0


def zca_numpy(x: np.ndarray, eps: float) -> np.ndarray:
    """x U diag((s + eps)^-1/2) U^T with numpy's SVD of the uncentred moment x^T x / m (as the official code)."""
    u, s, _ = np.linalg.svd(x.T @ x / x.shape[0])
    return x @ (u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T)


def standardise_literal(rows: list[list[float]], eps: float) -> list[list[float]]:
    """Each row to (v - mean) / (unbiased std + eps), with loops."""
    out = []
    for r in rows:
        mu = sum(r) / len(r)
        sd = math.sqrt(sum((v - mu) ** 2 for v in r) / (len(r) - 1))
        out.append([(v - mu) / (sd + eps) for v in r])
    return out


def whiten_literal(x: np.ndarray, eps: float) -> np.ndarray:
    """ZCA of the rows of x (m, k): moment by loops, numpy's eigen-decomposition."""
    m, k = x.shape
    mom = np.array([[sum(x[t, a] * x[t, b] for t in range(m)) / m for b in range(k)] for a in range(k)])
    s, u = np.linalg.eigh(mom)
    w = u @ np.diag(1.0 / np.sqrt(np.maximum(s, 0) + eps)) @ u.T
    return x @ w


def fea_literal(z1: torch.Tensor, z2: torch.Tensor, w_eps: float, s_eps: float) -> float:
    n, d = z1.shape
    f = []
    for z in (z1.numpy(), z2.numpy()):
        cols = standardise_literal([[z[t, k] for t in range(n)] for k in range(d)], s_eps)  # per feature
        f.append(whiten_literal(np.array(cols).T, w_eps))  # (N, d)
    return sum((sum(f[0][t, k] * f[1][t, k] for t in range(n)) / n - 1) ** 2 for k in range(d))


def ins_literal(z1: torch.Tensor, z2: torch.Tensor, w_eps: float, s_eps: float) -> float:
    n, d = z1.shape
    f = []
    for z in (z1.numpy(), z2.numpy()):
        rows = np.array(standardise_literal(z.tolist(), s_eps))  # (N, d), per instance
        f.append(whiten_literal(rows.T, w_eps).T)  # whitened over the (N, N) Gram matrix
    return sum((sum(f[0][t, k] * f[1][t, k] for k in range(d)) / d - 1) ** 2 for t in range(n))


# --- whitening -------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k", [(6, 3), (20, 8), (40, 12)])
def test_whitened_moment_is_identity(m, k):
    x = correlated(m, k, seed=m)
    z = zero_cl.zca(x, eps=0.0)
    torch.testing.assert_close(z.T @ z / m, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("m,k,eps", [(6, 4, 0.0), (20, 5, 0.01), (5, 8, 0.01), (30, 6, 0.5)])
def test_whitening_matches_numpy_svd(m, k, eps):
    x = correlated(m, k, seed=10 * m + k)
    np.testing.assert_allclose(zero_cl.zca(x, eps).numpy(), zca_numpy(x.numpy(), eps), rtol=1e-8, atol=1e-8)


def test_whitening_is_zca_symmetric_and_shrinks_with_eps():
    x = correlated(20, 5, seed=3)
    w = zero_cl.whitening_matrix(x, 0.01)
    torch.testing.assert_close(w, w.T, rtol=0, atol=1e-12)  # ZCA, not a triangular (Cholesky) factor
    assert torch.linalg.eigvalsh(w).min() > 0
    z = zero_cl.zca(x, 0.01)
    s = torch.linalg.eigvalsh(x.T @ x / 20)
    torch.testing.assert_close(torch.linalg.eigvalsh(z.T @ z / 20), s / (s + 0.01), rtol=0, atol=1e-10)


def test_whitening_matrix_gets_no_gradient():
    """The official code detaches W: d zca(x) / dx is W itself, not the derivative of the decomposition."""
    x = correlated(10, 4, seed=1).requires_grad_()
    g = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (zero_cl.zca(x, 0.01) * g).sum().backward()
    w = zero_cl.whitening_matrix(x.detach(), 0.01)
    torch.testing.assert_close(x.grad, g @ w.T, rtol=1e-12, atol=1e-12)
    assert not zero_cl.whitening_matrix(x, 0.01).requires_grad


# --- loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,w_eps,s_eps", [(8, 5, 0.01, 1e-4), (6, 10, 0.01, 1e-4), (12, 4, 0.2, 0.0), (5, 5, 0.05, 1e-2)])
def test_losses_match_literal_computation(n, d, w_eps, s_eps):
    z1, z2 = correlated(n, d, seed=n * d), correlated(n, d, seed=n * d + 1)
    fea = zero_cl.feature_loss(z1, z2, w_eps, s_eps).item()
    ins = zero_cl.instance_loss(z1, z2, w_eps, s_eps).item()
    assert fea == pytest.approx(fea_literal(z1, z2, w_eps, s_eps), rel=1e-9, abs=1e-9)
    assert ins == pytest.approx(ins_literal(z1, z2, w_eps, s_eps), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("wi,wf", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_zero_cl_is_the_weighted_sum(wi, wf):
    z1, z2 = correlated(8, 6, seed=5), correlated(8, 6, seed=6)
    out = zero_cl.zero_cl_loss(z1, z2, wi, wf)
    ins, fea = zero_cl.instance_loss(z1, z2), zero_cl.feature_loss(z1, z2)
    torch.testing.assert_close(out["loss"], wi * ins + wf * fea, rtol=1e-12, atol=1e-12)
    assert out["loss"].dtype == torch.float64  # float64 in, float64 out


def test_limits_collapse_scores_n_plus_d_and_aligned_beats_random():
    n, d = 16, 6
    const = torch.ones(n, d, dtype=torch.float64)
    out = zero_cl.zero_cl_loss(const, const)  # standardised to 0: both correlations vanish
    assert out["ins"].item() == pytest.approx(n) and out["fea"].item() == pytest.approx(d)
    z, other = correlated(n, d, seed=7), correlated(n, d, seed=8)
    assert zero_cl.zero_cl_loss(z, z)["loss"] < zero_cl.zero_cl_loss(z, other)["loss"]
    # identical views at eps 0 reach the minimum 0 of the term whose moment is full rank
    assert zero_cl.feature_loss(z, z, whiten_eps=0.0).item() == pytest.approx(0, abs=1e-9)  # N > d
    wide = correlated(5, 12, seed=9)
    assert zero_cl.instance_loss(wide, wide, whiten_eps=0.0).item() == pytest.approx(0, abs=1e-9)  # N < d


def test_loss_runs_in_float64_and_returns_float32_under_autocast():
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = zero_cl.zero_cl_loss(z1, z2)
    assert out["loss"].dtype == torch.float32
    expect = zero_cl.zero_cl_loss(z1.double(), z2.double())["loss"]
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-6)


# --- model -----------------------------------------------------------------------------------------


def small_cfg(**kw):
    return methods.make_config(zero_cl, preset="small", overrides={k: str(v) for k, v in kw.items()})


def test_model_loss_is_zero_cl_of_its_projections():
    cfg = small_cfg(proj_hidden_dim=32, proj_dim=8)
    model = tiny_model(zero_cl, cfg)
    batch = fixed_batch(zero_cl, cfg, n=16)
    out = model(batch)
    x1, x2 = batch["views"]
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    expect = zero_cl.zero_cl_loss(z1, z2)
    for key in ("loss", "ins", "fea"):
        assert out[key].item() == pytest.approx(expect[key].item(), rel=1e-6)


def test_gradients_reach_backbone_and_head():
    cfg = small_cfg(proj_hidden_dim=32, proj_dim=8)
    model = tiny_model(zero_cl, cfg)
    loss = model(fixed_batch(zero_cl, cfg, n=16))["loss"]
    assert backbone_grad_norm(model, loss, model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_both_weights_zero_is_refused():
    with pytest.raises(ValueError, match="both 0"):
        tiny_model(zero_cl, zero_cl.Config(ins_weight=0.0, fea_weight=0.0, proj_hidden_dim=8, proj_dim=8))


def test_augmentations_two_asymmetric_views_on_device():
    cfg = zero_cl.Config()
    pipes = zero_cl.augmentations(cfg, 32)
    assert len(pipes) == 2
    assert views.plan_views(pipes, True).mode == "device"
    names = [[type(t).__name__ for t in p.transforms] for p in pipes]
    assert "GaussianBlur" not in str(names)  # no blur below 64 px
    sol = [next(t for t in p.transforms if type(t).__name__ == "RandomSolarize").p for p in pipes]
    assert sol == [0.0, 0.2]


def test_small_preset_names_config_fields():
    assert set(zero_cl.PRESETS["small"]) <= set(zero_cl.Config.__dataclass_fields__)
    cfg = methods.make_config(zero_cl, preset="small")
    assert cfg.proj_dim < 64  # the digits batch of 64 gives a full-rank feature-wise moment


def test_smoke_fit_lowers_the_loss():
    cfg = small_cfg(proj_hidden_dim=64, proj_dim=8)
    losses, _ = smoke_fit(zero_cl, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_embed_is_backbone_features():
    cfg = small_cfg(proj_hidden_dim=32, proj_dim=8)
    model = tiny_model(zero_cl, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
