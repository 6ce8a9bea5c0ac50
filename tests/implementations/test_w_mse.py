"""W-MSE: the Cholesky whitening against numpy in float64, the loss against a literal computation with loops,
its invariances and limits, the global-batch permutation, gradients, the view recipe and a smoke fit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup import methods

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

w_mse = load("w-mse")


def correlated(m: int, d: int, seed: int, views: int | None = None) -> torch.Tensor:
    """m samples of D correlated features (float64): standard normals times a random mixing, plus a shift."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, d) if views is None else (m, views, d)
    return torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 3.0


def whiten_numpy(x: np.ndarray, eps: float) -> np.ndarray:
    """z = L^{-1} (x - mu) with L = numpy's Cholesky factor of the shrunk unbiased covariance."""
    mu = x.mean(axis=0)
    cov = (1 - eps) * np.cov(x, rowvar=False) + eps * np.eye(x.shape[1])
    inv_l = np.linalg.inv(np.linalg.cholesky(cov))
    return (x - mu) @ inv_l.T


def w_mse_literal(v: torch.Tensor, perms: list[torch.Tensor], w_size: int, eps: float) -> float:
    """The loss with loops: for each order, k = N // w_size sub-batches of consecutive images (the first
    N mod k one image larger), each view whitened on its own (mean and covariance by loops, numpy's
    Cholesky and inverse), then the squared distance of the normalised vectors of every view pair, averaged."""
    x = v.numpy()
    n, nv, d = x.shape
    k = max(1, n // w_size)
    sizes = [n // k + (1 if g < n % k else 0) for g in range(k)]
    total, terms = 0.0, 0
    for perm in perms:
        order, start = perm.tolist(), 0
        for size in sizes:
            members = order[start : start + size]
            start += size
            z = []
            for view in range(nv):
                rows = [x[s, view] for s in members]
                mu = [sum(r[c] for r in rows) / size for c in range(d)]
                cov = np.array([[sum((r[a] - mu[a]) * (r[b] - mu[b]) for r in rows) / (size - 1) for b in range(d)]
                                for a in range(d)])
                inv_l = np.linalg.inv(np.linalg.cholesky((1 - eps) * cov + eps * np.eye(d)))
                zs = [inv_l @ (r - np.array(mu)) for r in rows]
                z.append([zi / math.sqrt(sum(c * c for c in zi)) for zi in zs])
            for i in range(nv):
                for j in range(i + 1, nv):
                    for s in range(size):
                        total += sum((a - b) ** 2 for a, b in zip(z[i][s], z[j][s]))
                        terms += 1
    assert terms == len(perms) * n * nv * (nv - 1) // 2
    return total / terms


# --- whitening -------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,d", [(5, 3), (16, 8), (40, 12)])
def test_whitened_sub_batch_has_identity_covariance(m, d):
    x = correlated(m, d, seed=m)
    z = w_mse.whiten(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(z.T @ z / (m - 1), torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("m,d,eps", [(6, 4, 0.0), (20, 5, 0.0), (20, 5, 0.3), (4, 6, 0.5)])
def test_whitening_is_the_inverse_cholesky_factor(m, d, eps):
    x = correlated(m, d, seed=10 * m + d)
    z = w_mse.whiten(x, eps).numpy()
    np.testing.assert_allclose(z, whiten_numpy(x.numpy(), eps), rtol=1e-9, atol=1e-9)
    # the Cholesky factor itself: torch's and numpy's agree on the shrunk covariance, and L L^T rebuilds it
    xc = x - x.mean(0)
    cov = (1 - eps) * (xc.T @ xc) / (m - 1) + eps * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    np.testing.assert_allclose(chol.numpy(), np.linalg.cholesky(cov.numpy()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chol @ chol.T, cov)


def test_whitening_is_triangular_not_zca():
    """W = L^{-1} is lower triangular: z_k depends on x_1..x_k only, z_1 is x_1 standardised."""
    x = correlated(12, 4, seed=3)
    z = w_mse.whiten(x)
    torch.testing.assert_close(z[:, 0], (x[:, 0] - x[:, 0].mean()) / x[:, 0].std())
    y = x.clone()
    y[:, -1] = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(w_mse.whiten(y)[:, :-1], z[:, :-1])


def test_whitening_batches_over_leading_dims():
    x = correlated(10, 3, seed=4, views=2).transpose(0, 1)  # (V, m, D)
    z = w_mse.whiten(x, 0.1)
    for view in range(2):
        torch.testing.assert_close(z[view], w_mse.whiten(x[view], 0.1))


# --- sub-batches and the loss ------------------------------------------------------------------------


@pytest.mark.parametrize("n,w_size,sizes", [(16, 8, [8, 8]), (70, 32, [35, 35]), (10, 3, [4, 3, 3]), (10, 4, [5, 5]), (6, 8, [6])])
def test_sub_batches_cover_every_image_once(n, w_size, sizes):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    groups = w_mse.sub_batches(perm, w_size)
    assert [len(g) for g in groups] == sizes
    assert torch.equal(torch.cat(groups), perm)


@pytest.mark.parametrize("n,v,d,w_size,w_iter,eps", [
    (8, 2, 3, 8, 1, 0.0),  # one sub-batch
    (12, 2, 2, 4, 2, 0.0),  # three sub-batches, two iterations
    (10, 4, 3, 5, 1, 0.0),  # W-MSE 4: six view pairs
    (11, 3, 4, 5, 3, 0.2),  # uneven split, shrinkage
])
def test_loss_matches_literal_computation(n, v, d, w_size, w_iter, eps):
    x = correlated(n, d, seed=n * v * d, views=v) + 0.3 * torch.randn(n, v, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    perms = [torch.randperm(n, generator=g) for _ in range(w_iter)]
    got = w_mse.w_mse(x, perms, w_size, eps).item()
    assert got == pytest.approx(w_mse_literal(x, perms, w_size, eps), rel=1e-9)


def test_loss_draws_its_orders_from_the_global_rng():
    """In one process, w_mse_loss is w_mse with w_iter permutations drawn from the seeded global RNG."""
    x = correlated(24, 3, seed=5, views=2)
    torch.manual_seed(11)
    got = w_mse.w_mse_loss(x, 8, 2)
    torch.manual_seed(11)
    perms = [torch.randperm(24) for _ in range(2)]
    assert got.item() == pytest.approx(w_mse.w_mse(x, perms, 8).item(), rel=1e-12)


def test_limits_aligned_bounded_and_collapse_is_no_minimum():
    n, d = 64, 8
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    a = correlated(n, d, seed=1)
    # identical views: the minimum, 0
    assert w_mse.w_mse(torch.stack([a, a], 1), perms, 32).item() == pytest.approx(0.0, abs=1e-12)
    # any views: between 0 and 4 (squared distance of unit vectors)
    rand = correlated(n, d, seed=2, views=3)
    assert 0.0 < w_mse.w_mse(rand, perms, 32).item() < 4.0
    # near-collapse: a constant embedding plus tiny independent noise per view is whitened back to unit
    # variance, so it scores like unrelated views (2 in expectation), not like aligned ones
    g = torch.Generator().manual_seed(3)
    collapsed = torch.full((n, 2, d), 5.0, dtype=torch.float64) + 1e-6 * torch.randn(n, 2, d, generator=g, dtype=torch.float64)
    assert abs(w_mse.w_mse(collapsed, perms, 32).item() - 2.0) < 0.3
    # shrinking every embedding towards one point changes nothing: whitening undoes scale and shift
    v = correlated(n, d, seed=4, views=2)
    assert w_mse.w_mse(7.0 + 1e-4 * v, perms, 32).item() == pytest.approx(w_mse.w_mse(v, perms, 32).item(), rel=1e-7)


def test_loss_is_invariant_to_lower_triangular_maps():
    """v -> A v + b with A lower triangular, positive diagonal (different per view) leaves z unchanged:
    the Cholesky factor of the new covariance is A L."""
    n, d = 20, 4
    v = correlated(n, d, seed=6, views=2) + torch.randn(n, 2, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    mapped = torch.empty_like(v)
    for view in range(2):
        a = torch.randn(d, d, generator=g, dtype=torch.float64).tril()
        a.diagonal().copy_(a.diagonal().abs() + 0.5)
        mapped[:, view] = v[:, view] @ a.T + torch.randn(d, generator=g, dtype=torch.float64)
    perms = [torch.randperm(n, generator=g) for _ in range(2)]
    assert w_mse.w_mse(mapped, perms, 10).item() == pytest.approx(w_mse.w_mse(v, perms, 10).item(), rel=1e-9)


def test_too_small_sub_batches_are_refused_unless_shrunk():
    v = correlated(8, 8, seed=9, views=2)
    perms = [torch.arange(8)]
    with pytest.raises(ValueError, match="w_eps"):
        w_mse.w_mse(v, perms, 8)
    assert math.isfinite(w_mse.w_mse(v, perms, 8, eps=0.1).item())


# --- the model -----------------------------------------------------------------------------------


def small_cfg(**kw):
    return w_mse.Config(**{"proj_hidden_dim": 32, "proj_dim": 8, "w_size": 16, **kw})


def test_model_loss_is_w_mse_of_its_projections():
    cfg = small_cfg(w_iter=2)
    model = tiny_model(w_mse, cfg)
    batch = fixed_batch(w_mse, cfg, n=32)
    torch.manual_seed(5)
    loss = model(batch)["loss"]
    with torch.no_grad():
        h = torch.cat([model.backbone(x) for x in batch["views"]])
        v = model.projector(h).view(2, 32, cfg.proj_dim).transpose(0, 1)
    torch.manual_seed(5)
    perms = [torch.randperm(32) for _ in range(2)]
    assert loss.item() == pytest.approx(w_mse.w_mse(v, perms, 16).item(), rel=1e-5)


def test_gradients_reach_backbone_and_head():
    cfg = small_cfg()
    model = tiny_model(w_mse, cfg)
    out = model(fixed_batch(w_mse, cfg, n=32))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_loss_runs_in_float64_and_returns_float32_under_autocast():
    cfg = small_cfg()
    model = tiny_model(w_mse, cfg)
    batch = fixed_batch(w_mse, cfg, n=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # float32 projections are whitened in float64: the value of the float64 computation, rounded once
    x = correlated(40, 6, seed=12, views=2).float()
    torch.manual_seed(0)
    got = w_mse.w_mse_loss(x, 20, 1)
    torch.manual_seed(0)
    exact = w_mse.w_mse(x.double(), [torch.randperm(40)], 20)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(exact.item(), rel=1e-7)


def test_augmentations_give_num_views_distinct_views():
    for d in (2, 4):
        cfg = w_mse.Config(num_views=d)
        views = fixed_batch(w_mse, cfg, n=4)["views"]
        assert len(views) == d and all(x.shape == (4, 3, 32, 32) for x in views)
        assert not torch.allclose(views[0], views[1])


def test_four_views_give_six_pairs_in_the_model():
    cfg = small_cfg(num_views=4)
    model = tiny_model(w_mse, cfg)
    out = model(fixed_batch(w_mse, cfg, n=32))
    assert torch.isfinite(out["loss"]) and 0 < out["loss"].item() < 4


def test_small_preset_names_config_fields_and_fits_digits():
    cfg = methods.make_config(w_mse, preset="small")
    assert set(w_mse.PRESETS["small"]) <= {f for f in w_mse.Config.__dataclass_fields__}
    assert cfg.w_size > cfg.proj_dim  # the digits batch of 64 is whitened as one full-rank sub-batch
    with pytest.raises(ValueError, match="at least 2 views"):
        tiny_model(w_mse, w_mse.Config(num_views=1))


def test_smoke_fit_lowers_the_loss():
    cfg = small_cfg(proj_hidden_dim=64)
    losses, _ = smoke_fit(w_mse, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_embed_is_backbone_features():
    cfg = small_cfg()
    model = tiny_model(w_mse, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert F.normalize(model.embed(x), dim=1).shape == (3, model.backbone.feature_dim)
