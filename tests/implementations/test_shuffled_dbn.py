"""Shuffled-DBN: the group ZCA whitening against an SVD computation with loops in float64 (identity covariance
per group, the permutation undone), the closed-form backward of Sigma^{-1/2}, the loss against a literal
computation, its limits (complete and dimensional collapse are no minimum), the global RNG, the model, the view
recipe and a smoke fit."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import methods

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

sdbn = load("hua-2021-decorrelation")


def correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """n samples of d correlated features (float64): standard normals times a random mixing, plus a shift."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 2.0


def cov(y: torch.Tensor) -> torch.Tensor:
    yc = y - y.mean(0)
    return yc.T @ yc / y.shape[0]


def groups_literal(perm: torch.Tensor, num_groups: int) -> list[list[int]]:
    """The features of each group, by hand: consecutive runs of the order perm, the first D mod G one longer."""
    order, d = perm.tolist(), perm.numel()
    sizes = [d // num_groups + (1 if g < d % num_groups else 0) for g in range(num_groups)]
    out, start = [], 0
    for size in sizes:
        out.append(order[start : start + size])
        start += size
    assert sorted(sum(out, [])) == list(range(d))
    return out


def whiten_literal(z: torch.Tensor, perm: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each group's centred columns X = U S V^T (SVD) give the ZCA output sqrt(N) U V^T (X Sigma^{-1/2} with
    Sigma = X^T X / N = V S^2 V^T / N), written back column by column to each feature's own place."""
    n = z.shape[0]
    out = torch.full_like(z, float("nan"))
    for members in groups_literal(perm, num_groups):
        x = torch.stack([z[:, f] - sum(z[i, f] for i in range(n)) / n for f in members], dim=1)  # (N, k)
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        y = math.sqrt(n) * u @ vh
        for col, f in enumerate(members):
            out[:, f] = y[:, col]
    assert not out.isnan().any()
    return out


def loss_literal(z1, z2, perm1, perm2, num_groups) -> float:
    y1, y2 = whiten_literal(z1, perm1, num_groups), whiten_literal(z2, perm2, num_groups)
    n, d = z1.shape
    return sum(sum((float(y1[i, k]) - float(y2[i, k])) ** 2 for k in range(d)) for i in range(n)) / n


# --- whitening -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,groups", [(16, 6, 1), (32, 12, 3), (40, 10, 4), (24, 7, 2), (64, 9, 9)])
def test_group_whitening_matches_svd_computation(n, d, groups):
    z = correlated(n, d, seed=n + d)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(groups))
    torch.testing.assert_close(sdbn.group_whiten(z, perm, groups), whiten_literal(z, perm, groups), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,d,groups", [(32, 12, 3), (40, 10, 4), (50, 9, 2)])
def test_each_group_has_identity_covariance_and_the_others_do_not(n, d, groups):
    z = correlated(n, d, seed=3 * n + d)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    y = sdbn.group_whiten(z, perm, groups)
    torch.testing.assert_close(y.mean(0), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-10)
    c = cov(y)
    members = groups_literal(perm, groups)
    for g in members:
        torch.testing.assert_close(c[g][:, g], torch.eye(len(g), dtype=torch.float64), rtol=0, atol=1e-9)
    # across groups the correlations are left: the whole covariance is not the identity
    assert (c - torch.eye(d, dtype=torch.float64)).abs().max() > 0.05


def test_permutation_is_undone_each_feature_keeps_its_place():
    """Centred columns that are already orthogonal: ZCA is the identity on them up to scale, so every
    feature comes back standardised in its own column, whatever the grouping."""
    n, d = 20, 6
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal columns, centred (combinations of centred columns)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0, 11.0], dtype=torch.float64)
    z = q * scales + torch.arange(d, dtype=torch.float64)  # orthogonal centred columns, shifted
    expected = (z - z.mean(0)) / (z - z.mean(0)).pow(2).mean(0).sqrt()  # biased std, as the whitening
    g = torch.Generator().manual_seed(2)
    for groups in (1, 2, 3, 6):
        perm = torch.randperm(d, generator=g)
        torch.testing.assert_close(sdbn.group_whiten(z, perm, groups), expected, rtol=1e-9, atol=1e-9)


def test_relabelling_the_features_relabels_the_output():
    z = correlated(30, 8, seed=4)
    g = torch.Generator().manual_seed(3)
    perm, relabel = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    y = sdbn.group_whiten(z, perm, 3)
    # in z' = z[:, relabel], feature i of z is feature relabel^{-1}(i): the same grouping is relabel^{-1}[perm]
    y_relabelled = sdbn.group_whiten(z[:, relabel], relabel.argsort()[perm], 3)
    torch.testing.assert_close(y_relabelled, y[:, relabel])


def test_whitening_is_zca_symmetric_and_not_cholesky():
    """W = Sigma^{-1/2} is symmetric: no feature is privileged (Cholesky would leave the first one a pure
    standardisation); the first feature's output depends on all of its group."""
    z = correlated(40, 4, seed=5)
    y = sdbn.zca_whiten(z)
    xc = z - z.mean(0)
    w = torch.linalg.lstsq(xc, y).solution  # the linear map the whitening applied
    torch.testing.assert_close(w, w.T, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(y[:, 0], xc[:, 0] / xc[:, 0].pow(2).mean().sqrt())


@pytest.mark.parametrize("k", [2, 5])
def test_inverse_sqrt_backward_matches_finite_differences(k):
    a = torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    a = (a @ a.T + 0.5 * torch.eye(k, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: sdbn._InverseSqrt.apply((m + m.T) / 2, 0.0), (a,))
    assert torch.autograd.gradcheck(lambda m: sdbn._InverseSqrt.apply((m + m.T) / 2, 0.3), (a,))


def test_inverse_sqrt_backward_is_finite_for_equal_eigenvalues():
    """At Sigma = c I every eigenvalue is equal (autograd of eigh divides by their differences there); the
    derivative of Sigma^{-1/2} is -c^{-3/2} / 2 times the symmetric part of the incoming gradient."""
    c = 4.0
    cov_ = (c * torch.eye(3, dtype=torch.float64)).requires_grad_()
    g = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = sdbn._InverseSqrt.apply(cov_, 0.0)
    torch.testing.assert_close(out, torch.eye(3, dtype=torch.float64) / 2)
    (grad,) = torch.autograd.grad(out, cov_, g)
    torch.testing.assert_close(grad, -0.5 * c ** -1.5 * (g + g.T) / 2)


def test_whitening_gradient_matches_autograd_of_eigh():
    """Through the whole group whitening, the closed-form backward agrees with autograd through eigh (distinct
    eigenvalues)."""
    z = correlated(24, 6, seed=7).requires_grad_()
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(8))
    w = torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (ours,) = torch.autograd.grad((sdbn.group_whiten(z, perm, 2) * w).sum(), z)

    def reference(x):
        out = torch.empty_like(x)
        for members in groups_literal(perm, 2):
            xc = x[:, members] - x[:, members].mean(0)
            lam, u = torch.linalg.eigh(xc.T @ xc / x.shape[0])
            out[:, members] = xc @ (u @ torch.diag(lam.rsqrt()) @ u.T)
        return out

    (theirs,) = torch.autograd.grad((reference(z) * w).sum(), z)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


# --- groups and the loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("d,n,groups", [(512, 64, 16), (2048, 256, 16), (64, 64, 2), (8, 8, 2), (4, 1000, 1), (8, 2, 8)])
def test_automatic_groups_hold_about_half_the_batch(d, n, groups):
    assert sdbn.auto_groups(d, n) == groups


@pytest.mark.parametrize("n,d,groups", [(12, 4, 1), (16, 6, 2), (20, 7, 3)])
def test_loss_matches_literal_computation(n, d, groups):
    z1 = correlated(n, d, seed=n)
    z2 = z1 + 0.5 * correlated(n, d, seed=n + 1)
    g = torch.Generator().manual_seed(d)
    perm1, perm2 = torch.randperm(d, generator=g), torch.randperm(d, generator=g)
    got = sdbn.shuffled_dbn(z1, z2, perm1, perm2, groups).item()
    assert got == pytest.approx(loss_literal(z1, z2, perm1, perm2, groups), rel=1e-9)


def test_loss_draws_one_grouping_per_view_from_the_global_rng():
    z1, z2 = correlated(40, 8, seed=10), correlated(40, 8, seed=11)
    torch.manual_seed(3)
    got = sdbn.shuffled_dbn_loss(z1, z2)  # automatic: ceil(2 * 8 / 40) = 1 group
    torch.manual_seed(3)
    got2 = sdbn.shuffled_dbn_loss(z1, z2, num_groups=2)["loss"]
    torch.manual_seed(3)
    perm1, perm2 = torch.randperm(8), torch.randperm(8)
    assert got["loss"].item() == pytest.approx(sdbn.shuffled_dbn(z1, z2, perm1, perm2, 1).item(), rel=1e-12)
    assert got2.item() == pytest.approx(sdbn.shuffled_dbn(z1, z2, perm1, perm2, 2).item(), rel=1e-12)
    # shuffle off: the consecutive groups of plain group DBN, no randomness drawn
    torch.manual_seed(3)
    fixed = sdbn.shuffled_dbn_loss(z1, z2, num_groups=2, shuffle=False)["loss"]
    assert torch.randperm(8).tolist() == perm1.tolist()
    ident = torch.arange(8)
    assert fixed.item() == pytest.approx(sdbn.shuffled_dbn(z1, z2, ident, ident, 2).item(), rel=1e-12)


def test_limits_aligned_bounded_and_invariant_to_shift_and_scale():
    n, d = 64, 8
    g = torch.Generator().manual_seed(12)
    perm1, perm2 = torch.randperm(d, generator=g), torch.randperm(d, generator=g)
    z = correlated(n, d, seed=13)
    # identical views grouped alike (or one group): the minimum, 0
    assert sdbn.shuffled_dbn(z, z, perm1, perm1, 2).item() == pytest.approx(0.0, abs=1e-9)
    assert sdbn.shuffled_dbn(z, z, perm1, perm2, 1).item() == pytest.approx(0.0, abs=1e-9)
    # identical but correlated views grouped differently score above 0: shuffling penalises the correlation
    # across groups; identical white views (every group already white) still score 0
    assert sdbn.shuffled_dbn(z, z, perm1, perm2, 2).item() > 0.5
    white = sdbn.zca_whiten(z)
    assert sdbn.shuffled_dbn(white, white, perm1, perm2, 2).item() == pytest.approx(0.0, abs=1e-9)
    # unrelated views: about 2 D; any views: between 0 and 4 D
    other = correlated(n, d, seed=14)
    rand = sdbn.shuffled_dbn(z, other, perm1, perm2, 2).item()
    assert 0 < rand < 4 * d and abs(rand - 2 * d) < 0.3 * 2 * d
    # shift and scale of every embedding change nothing (the whitening undoes them)
    z2 = z + 0.3 * other
    base = sdbn.shuffled_dbn(z, z2, perm1, perm2, 2).item()
    assert sdbn.shuffled_dbn(5.0 + 1e-3 * z, -2.0 + 1e-3 * z2, perm1, perm2, 2).item() == pytest.approx(base, rel=1e-7)


@pytest.mark.parametrize("groups", [1, 2])
def test_complete_and_dimensional_collapse_are_no_minimum(groups):
    """A near-constant embedding, or one in an r-dimensional subspace, plus tiny noise that the views do not
    share: the whitening scales the noise back to unit variance, so each dead direction scores ~2 (what
    unrelated features score), while the same embedding spread over all D directions scores ~0."""
    n, d, r = 512, 8, 2
    g = torch.Generator().manual_seed(15)
    perm1, perm2 = torch.randperm(d, generator=g), torch.randperm(d, generator=g)
    noise = [1e-6 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    constant = torch.full((n, d), 3.0, dtype=torch.float64)
    complete = sdbn.shuffled_dbn(constant + noise[0], constant + noise[1], perm1, perm2, groups).item()
    assert abs(complete - 2 * d) < 1.5
    signal = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)
    dimensional = sdbn.shuffled_dbn(signal + noise[0], signal + noise[1], perm1, perm2, 1).item()
    assert abs(dimensional - 2 * (d - r)) < 1.5
    full = sdbn.zca_whiten(correlated(n, d, seed=16))  # full rank, decorrelated, shared by both views
    aligned = sdbn.shuffled_dbn(full + noise[0], full + noise[1], perm1, perm2, groups).item()
    assert aligned < 1e-6 < 2 * (d - r) - 1.5


def test_too_large_groups_are_refused_unless_shrunk():
    z = correlated(8, 8, seed=17)
    perm = torch.arange(8)
    with pytest.raises(ValueError, match="whiten_eps"):
        sdbn.shuffled_dbn(z, z, perm, perm, 1)  # 8 features from 8 samples: rank 7
    assert math.isfinite(sdbn.shuffled_dbn(z, correlated(8, 8, seed=18), perm, perm, 1, eps=0.1).item())
    assert math.isfinite(sdbn.shuffled_dbn(z, correlated(8, 8, seed=18), perm, perm, 2).item())


def test_float32_projections_are_whitened_in_float64():
    z1, z2 = correlated(40, 6, seed=19).float(), correlated(40, 6, seed=20).float()
    torch.manual_seed(0)
    got = sdbn.shuffled_dbn_loss(z1, z2, num_groups=2)["loss"]
    torch.manual_seed(0)
    perm1, perm2 = torch.randperm(6), torch.randperm(6)
    exact = sdbn.shuffled_dbn(z1.double(), z2.double(), perm1, perm2, 2)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(exact.item(), rel=1e-7)


# --- the model -----------------------------------------------------------------------------------


def small_cfg(**kw):
    return sdbn.Config(**{"proj_hidden_dim": 32, "proj_dim": 16, **kw})


def test_model_loss_is_the_loss_of_its_projections_and_reaches_the_backbone():
    cfg = small_cfg()
    model = tiny_model(sdbn, cfg)
    batch = fixed_batch(sdbn, cfg, n=32)
    torch.manual_seed(5)
    out = model(batch)
    with torch.no_grad():
        z1, z2 = (model.projector(model.backbone(x)) for x in batch["views"])
    torch.manual_seed(5)
    perm1, perm2 = torch.randperm(16), torch.randperm(16)
    exact = sdbn.shuffled_dbn(z1.double(), z2.double(), perm1, perm2, sdbn.auto_groups(16, 32))  # 1 group
    assert out["loss"].item() == pytest.approx(exact.item(), rel=1e-5)
    assert set(out) == {"loss", "corr", "pos_sim"} and 0 <= out["corr"].item() <= 1
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert model.projector[-1].bias is None


def test_bad_group_counts_are_refused():
    for groups in (-1, 17):
        with pytest.raises(ValueError, match="num_groups"):
            tiny_model(sdbn, small_cfg(num_groups=groups))


def test_augmentations_give_two_distinct_views():
    cfg = sdbn.Config()
    views = fixed_batch(sdbn, cfg, n=4)["views"]
    assert len(views) == 2 and all(x.shape == (4, 3, 32, 32) for x in views)
    assert not torch.allclose(views[0], views[1])
    assert len(sdbn.augmentations(cfg, 64, (0.5,) * 3, (0.2,) * 3)[0].transforms) == 8  # blur above 32 px
    assert len(sdbn.augmentations(cfg, 32, (0.5,) * 3, (0.2,) * 3)[0].transforms) == 7


def test_small_preset_names_config_fields_and_fits_digits():
    assert set(sdbn.PRESETS["small"]) <= set(sdbn.Config.__dataclass_fields__)
    cfg = methods.make_config(sdbn, preset="small")
    groups = sdbn.auto_groups(cfg.proj_dim, 64)
    assert math.ceil(cfg.proj_dim / groups) <= 32  # at most N/2 features per group for the digits batch of 64


def test_smoke_fit_lowers_the_loss():
    cfg = small_cfg(proj_hidden_dim=64, optimizer="adamw", weight_decay=1e-6)
    losses, _ = smoke_fit(sdbn, cfg, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_embed_is_backbone_features():
    model = tiny_model(sdbn, small_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert F.normalize(model.embed(x), dim=1).shape == (3, model.backbone.feature_dim)
