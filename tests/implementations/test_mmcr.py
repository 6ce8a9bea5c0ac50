"""MMCR: the loss against an independent numpy computation, its limits, gradients through the SVD, the
momentum encoder, the view recipe, the presets and a smoke fit."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

mmcr = load("mmcr")


def mmcr_literal(z: np.ndarray, lmbda: float, z_mom: np.ndarray | None = None) -> float:
    """-||C||_* + lambda/N sum_i ||Z_i||_*, with loops over images and views and numpy's SVD, float64.
    z: (N, V, D)."""
    n, v, d = z.shape
    unit = lambda x: x / math.sqrt(sum(float(t) ** 2 for t in x))  # noqa: E731
    cents, local = [], 0.0
    for i in range(n):
        views = [unit(z[i, k]) for k in range(v)]
        c = sum(views) / v
        if z_mom is not None:
            c = 0.5 * (c + sum(unit(z_mom[i, k]) for k in range(v)) / v)
        cents.append(c)
        local += np.linalg.svd(np.stack(views, axis=1), compute_uv=False).sum()  # Z_i (D, V)
    nuc = np.linalg.svd(np.stack(cents), compute_uv=False).sum()  # C (N, D)
    return float(-nuc + lmbda * local / n)


SHAPES = [(4, 2, 8, 0.0), (7, 3, 5, 0.5), (16, 4, 32, 1.0), (6, 8, 3, 0.1)]  # N > D, N < D, V > D


@pytest.mark.parametrize("n,v,d,lmbda", SHAPES)
def test_loss_matches_numpy(n, v, d, lmbda):
    g = torch.Generator().manual_seed(n * v + d)
    z = torch.randn(n, v, d, generator=g, dtype=torch.float64)
    assert mmcr.mmcr_loss(z, lmbda).item() == pytest.approx(mmcr_literal(z.numpy(), lmbda), rel=1e-10)


@pytest.mark.parametrize("n,v,d,lmbda", SHAPES[:2])
def test_momentum_loss_matches_numpy(n, v, d, lmbda):
    g = torch.Generator().manual_seed(7 + n)
    z, zm = (torch.randn(n, v, d, generator=g, dtype=torch.float64) for _ in range(2))
    got = mmcr.mmcr_loss(z, lmbda, z_mom=zm).item()
    assert got == pytest.approx(mmcr_literal(z.numpy(), lmbda, zm.numpy()), rel=1e-10)


def test_float32_close_to_float64():
    z = torch.randn(32, 4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert mmcr.mmcr_loss(z.float(), 0.3).item() == pytest.approx(mmcr.mmcr_loss(z, 0.3).item(), rel=1e-5)


def test_limits_collapsed_orthogonal_and_scale():
    n, v, d = 8, 3, 12
    # every view of every image on one direction: C has rank 1, ||C||_* = sqrt(N) ||c|| = sqrt(N)
    collapsed = torch.ones(n, v, d, dtype=torch.float64)
    assert mmcr.mmcr_loss(collapsed).item() == pytest.approx(-math.sqrt(n), rel=1e-12)
    # identical centroids of norm r < 1 (two opposite-ish views): sqrt(N) r
    a, b = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    a[0], b[0], b[1] = 1.0, 0.0, 1.0  # two orthogonal unit views, centroid norm 1/sqrt(2)
    pair = torch.stack([a, b]).expand(n, 2, d)
    assert mmcr.mmcr_loss(pair).item() == pytest.approx(-math.sqrt(n) / math.sqrt(2), rel=1e-12)
    # N orthogonal unit centroids (views coincide, images on distinct axes): the maximum, ||C||_* = N
    eye = torch.eye(d, dtype=torch.float64)[:n, None, :].expand(n, v, d)
    assert mmcr.mmcr_loss(eye).item() == pytest.approx(-n, rel=1e-12)
    # and that is the bound: random embeddings stay above -N
    rand = torch.randn(n, v, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert mmcr.mmcr_loss(rand).item() > -n
    # invariant to the scale of each embedding (they are normalised)
    scale = torch.rand(n, v, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    assert mmcr.mmcr_loss(scale * rand, 0.5).item() == pytest.approx(mmcr.mmcr_loss(rand, 0.5).item(), rel=1e-12)
    # per-manifold term: coinciding views give ||Z_i||_* = sqrt(V), its minimum on the sphere
    assert mmcr.mmcr_terms(eye, local=True)[1].item() == pytest.approx(math.sqrt(v), rel=1e-12)


def test_gradcheck_through_the_svd():
    # a well-conditioned case: distinct singular values, away from zero (N = 4 < D = 6)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 3, 6, generator=g, dtype=torch.float64) + 2 * torch.eye(4, 6, dtype=torch.float64)[:, None])
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mmcr.mmcr_loss(t, 0.3), (z,), eps=1e-6, atol=1e-7)
    zm = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: mmcr.mmcr_loss(t, 0.0, z_mom=zm), (z,), eps=1e-6, atol=1e-7)


def test_views_of_one_image_are_pulled_together():
    # a gradient step on the loss moves each view towards its centroid: the centroid norms grow
    z = torch.randn(8, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    before = F.normalize(z, dim=-1).mean(1).norm(dim=-1)
    mmcr.mmcr_loss(z).backward()
    with torch.no_grad():
        after = F.normalize(z - 0.05 * z.grad, dim=-1).mean(1).norm(dim=-1)
    assert after.mean() > before.mean()


def test_forward_stacks_views_per_image():
    # the model's loss equals mmcr_loss of its own embeddings, view k of image i at [i, k]
    cfg = mmcr.Config(num_views=3, proj_hidden_dim=32, proj_dim=16, momentum_encoder=False, lmbda=0.2)
    model = tiny_model(mmcr, cfg).eval()  # eval: BN by running statistics, per-row embeddings
    views = [torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    out = model({"views": views})
    with torch.no_grad():
        z = torch.stack([model.online(x) for x in views], dim=1)  # (N, V, D)
    assert out["loss"].item() == pytest.approx(mmcr.mmcr_loss(z, 0.2).item(), rel=1e-5)


def test_gradients_reach_backbone_not_momentum():
    cfg = mmcr.Config(num_views=4, proj_hidden_dim=32, proj_dim=16)
    model = tiny_model(mmcr, cfg)
    out = model(fixed_batch(mmcr, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(not p.requires_grad and p.grad is None for p in model.momentum.parameters())


def test_momentum_encoder_follows_its_ema_rule():
    cfg = mmcr.Config(num_views=2, proj_hidden_dim=32, proj_dim=16, tau=0.9)
    model = tiny_model(mmcr, cfg)
    for p in model.momentum.parameters():
        p.data.zero_()
    online = [p.detach().clone() for p in model.online.parameters()]
    model.on_step_end(1, 10)
    for t, o in zip(model.momentum.parameters(), online):
        assert torch.allclose(t, 0.1 * o)
    assert mmcr.Config().momentum_encoder and mmcr.Config().tau == 0.99
    assert tiny_model(mmcr, dataclasses.replace(cfg, momentum_encoder=False)).momentum is None


def test_augmentations_give_v_views_of_two_distributions():
    cfg = mmcr.Config(num_views=4)
    pipes = mmcr.augmentations(cfg, 32)
    assert len(pipes) == 4 and repr(pipes[0]) == repr(pipes[2]) and repr(pipes[1]) == repr(pipes[3])
    assert repr(pipes[0]) != repr(pipes[1])  # blur p / solarisation differ
    views = fixed_batch(mmcr, cfg, n=4)["views"]
    assert len(views) == 4 and views[0].shape == (4, 3, 32, 32)
    assert not torch.allclose(views[0], views[2])
    with pytest.raises(ValueError):
        mmcr.augmentations(mmcr.Config(num_views=1), 32)


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(mmcr.Config)}
    assert set(mmcr.PRESETS["small"]) <= fields
    mmcr.Config(**mmcr.PRESETS["small"])


def test_smoke_fit_lowers_the_loss():
    cfg = mmcr.Config(num_views=4, proj_hidden_dim=64, proj_dim=32, optimizer="sgd", tau=0.9)
    losses, _ = smoke_fit(mmcr, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses


def test_embed_is_online_backbone_features():
    cfg = mmcr.Config(proj_hidden_dim=32, proj_dim=16)
    model = tiny_model(mmcr, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
