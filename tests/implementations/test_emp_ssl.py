"""EMP-SSL: the total coding rate against an eigenvalue computation, the whole loss against a loop over patches
and images, the known limits, gradients, the patch recipe, the bag-of-features embedding and a smoke fit."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup import views as harness_views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

emp = load("emp-ssl")


def tcr_literal(z: np.ndarray, eps_sq: float) -> float:
    """1/2 sum_k log(1 + d / (b eps^2) lambda_k), lambda_k the eigenvalues of Z^T Z (d, d), float64."""
    b, d = z.shape
    lam = np.linalg.eigvalsh(z.T @ z)
    return 0.5 * sum(math.log(1 + d / (b * eps_sq) * float(v)) for v in lam)


def loss_literal(z: np.ndarray, lambd: float, eps_sq: float) -> float:
    """-(1/n) sum_i [R(Z_i) + lambda (1/b) sum_j cos(z_ij, zbar_j)] with loops; z: (b, n, d) raw embeddings."""
    b, n, d = z.shape
    unit = [[z[j, i] / math.sqrt(sum(float(t) ** 2 for t in z[j, i])) for i in range(n)] for j in range(b)]
    total = 0.0
    for i in range(n):
        zi = np.stack([unit[j][i] for j in range(b)])  # (b, d)
        cos = 0.0
        for j in range(b):
            mean = sum(unit[j]) / n
            cos += float(unit[j][i] @ mean) / (math.sqrt(float(mean @ mean)) * math.sqrt(float(unit[j][i] @ unit[j][i])))
        total += tcr_literal(zi, eps_sq) + lambd * cos / b
    return -total / n


SHAPES = [(8, 16, 0.2), (16, 4, 0.2), (5, 5, 0.5), (12, 32, 0.05)]  # b < d, b > d, b = d


@pytest.mark.parametrize("b,d,eps_sq", SHAPES)
def test_coding_rate_matches_eigenvalues(b, d, eps_sq):
    z = torch.randn(b, d, generator=torch.Generator().manual_seed(b * d), dtype=torch.float64)
    got = emp.total_coding_rate(z, eps_sq).item()
    assert got == pytest.approx(tcr_literal(z.numpy(), eps_sq), rel=1e-10)


def test_coding_rate_is_batched_over_leading_dims():
    z = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = emp.total_coding_rate(z, 0.2)
    assert got.shape == (3,)
    for k in range(3):
        assert got[k].item() == pytest.approx(tcr_literal(z[k].numpy(), 0.2), rel=1e-10)


@pytest.mark.parametrize("b,n,d,lambd,eps_sq", [(6, 3, 8, 200.0, 0.2), (10, 2, 4, 1.0, 0.5), (4, 5, 12, 20.0, 0.1)])
def test_loss_matches_literal(b, n, d, lambd, eps_sq):
    z = torch.randn(b, n, d, generator=torch.Generator().manual_seed(n + d), dtype=torch.float64)
    got = emp.emp_ssl_loss(z, lambd, eps_sq).item()
    assert got == pytest.approx(loss_literal(z.numpy(), lambd, eps_sq), rel=1e-10)


def test_float32_close_to_float64():
    z = torch.randn(32, 4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert emp.emp_ssl_loss(z.float()).item() == pytest.approx(emp.emp_ssl_loss(z).item(), rel=1e-5)


def test_limits_collapsed_orthogonal_and_invariance():
    b, d, eps_sq = 8, 16, 0.2
    # collapsed: every row the same unit vector, Z^T Z of rank one with eigenvalue b: the minimum for unit rows
    collapsed = F.normalize(torch.ones(b, d, dtype=torch.float64), dim=-1)
    r_min = 0.5 * math.log(1 + d / eps_sq)
    assert emp.total_coding_rate(collapsed, eps_sq).item() == pytest.approx(r_min, rel=1e-12)
    # b orthonormal rows: b equal eigenvalues 1, the maximum for unit rows
    ortho = torch.eye(d, dtype=torch.float64)[:b]
    r_max = 0.5 * b * math.log(1 + d / (b * eps_sq))
    assert emp.total_coding_rate(ortho, eps_sq).item() == pytest.approx(r_max, rel=1e-12)
    # random unit rows lie strictly between
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        r = emp.total_coding_rate(F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1), eps_sq)
        assert r_min < r.item() < r_max
    # invariance: patches equal to each other give cos 1, the loss -R - lambda; noisy patches a higher loss
    base = torch.randn(b, 1, d, generator=g, dtype=torch.float64)
    tcr, sim = emp.emp_ssl_terms(base.expand(b, 4, d), eps_sq)
    assert sim.item() == pytest.approx(1.0, abs=1e-12)
    assert tcr.item() == pytest.approx(emp.total_coding_rate(F.normalize(base[:, 0], dim=-1), eps_sq).item(), rel=1e-12)
    noisy = base + 0.5 * torch.randn(b, 4, d, generator=g, dtype=torch.float64)
    assert emp.emp_ssl_terms(noisy, eps_sq)[1].item() < 1.0
    # a collapsed, perfectly invariant embedding scores worse than an orthogonal, invariant one
    assert emp.emp_ssl_loss(torch.ones(b, 4, d, dtype=torch.float64)).item() == pytest.approx(-r_min - 200.0, rel=1e-12)
    assert emp.emp_ssl_loss(ortho[:, None].expand(b, 4, d)).item() == pytest.approx(-r_max - 200.0, rel=1e-12)
    # embeddings are normalised: the loss ignores each row's scale
    scale = torch.rand(b, 4, 1, generator=g, dtype=torch.float64) + 0.1
    assert emp.emp_ssl_loss(scale * noisy).item() == pytest.approx(emp.emp_ssl_loss(noisy).item(), rel=1e-12)


def test_gradcheck_and_invariance_pulls_patches_together():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: emp.emp_ssl_loss(t, 2.0, 0.2), (z,), eps=1e-6, atol=1e-6)
    # a small step on the invariance term alone raises the mean cosine to the image's mean patch
    z = torch.randn(8, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    _, sim = emp.emp_ssl_terms(z, 0.2)
    (-sim).backward()
    with torch.no_grad():
        after = emp.emp_ssl_terms(z - 0.5 * z.grad, 0.2)[1]
    assert after.item() > sim.item()


SMALL = dict(proj_hidden_dim=32, proj_dim=16)


def test_forward_is_the_loss_of_its_own_patch_embeddings():
    cfg = emp.Config(num_patches=3, lambd=5.0, **SMALL)
    model = tiny_model(emp, cfg).eval()  # eval: BN by running statistics, per-row embeddings
    views = [torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    out = model({"views": views})
    with torch.no_grad():
        z = torch.stack([model.projector(model.backbone(x)) for x in views], dim=1)  # (B, n, d), patch i at [:, i]
    assert out["loss"].item() == pytest.approx(emp.emp_ssl_loss(z, 5.0, 0.2).item(), rel=1e-5)
    assert out["cos_sim"].item() <= 1.0 and out["tcr"].item() > 0


def test_gradients_reach_backbone_and_param_groups_cover_everything():
    cfg = emp.Config(num_patches=4, **SMALL)
    model = tiny_model(emp, cfg)
    out = model(fixed_batch(emp, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    groups = model.param_groups()
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[0]["eta"] == 0.005 and groups[1]["lars"] is False and groups[1]["weight_decay"] == 0.0


def test_augmentations_give_n_fixed_scale_patches():
    cfg = emp.Config(num_patches=5, patch_size=16)
    pipes = emp.augmentations(cfg, 32)
    assert len(pipes) == 5 and len({repr(p) for p in pipes}) == 1
    crop = pipes[0].transforms[1]
    assert tuple(crop.size) == (16, 16) and tuple(crop.scale) == (0.25, 0.25) and tuple(crop.ratio) == (1.0, 1.0)
    plan = harness_views.plan_views(emp.augmentations(emp.Config(), 32, (0.5,) * 3, (0.25,) * 3), in_memory=True)
    assert plan.mode == "device"
    patches = fixed_batch(emp, cfg, n=4)["views"]
    assert len(patches) == 5 and patches[0].shape == (4, 3, 16, 16)
    assert not torch.allclose(patches[0], patches[1])
    assert tuple(emp.augmentations(emp.Config(), 32)[0].transforms[1].size) == (32, 32)  # paper: resized to the image
    with pytest.raises(ValueError):
        emp.augmentations(emp.Config(num_patches=1), 32)


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(emp.Config)}
    assert set(emp.PRESETS["small"]) <= fields
    emp.Config(**emp.PRESETS["small"])
    paper = emp.Config()
    assert (paper.lambd, paper.eps_sq, paper.patch_scale, paper.num_patches) == (200.0, 0.2, 0.25, 20)


def test_smoke_fit_lowers_the_loss():
    cfg = emp.Config(num_patches=4, patch_size=16, lambd=20.0, optimizer="sgd", **SMALL)
    losses, _ = smoke_fit(emp, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_embed_is_the_mean_over_the_patch_grid():
    cfg = emp.Config(eval_grid=2, patch_size=16, **SMALL)
    model = tiny_model(emp, cfg).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got = model.embed(x)
    assert got.shape == (3, 32)
    # side round(32 sqrt(0.25)) = 16 at offsets 0 and 16: the four quadrants, already 16 px
    quads = [x[..., t:t + 16, s:s + 16] for t in (0, 16) for s in (0, 16)]
    with torch.no_grad():
        want = torch.stack([model.projector[0](model.backbone(q)) for q in quads]).mean(0)
    assert torch.allclose(got, want, atol=1e-6)
    # grid 3 at scale 0.4: 20-px crops at offsets 0, 6, 12, resized to 16
    crops = dataclasses.replace(cfg, eval_grid=3, patch_scale=0.4)
    model.cfg = crops
    grid = model.patches(x)
    assert grid.shape == (9, 3, 3, 16, 16)
    want = F.interpolate(x[..., 6:26, 12:32], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(grid[5], want)
    # the whole image and the backbone's features
    model.cfg = dataclasses.replace(cfg, eval_grid=0, eval_features="backbone")
    assert torch.equal(model.embed(x), model.backbone(x))
    with pytest.raises(ValueError):
        tiny_model(emp, dataclasses.replace(cfg, eval_features="z"))
