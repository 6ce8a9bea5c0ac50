"""TiCo: the loss against a literal computation of Eq. 4 / Algorithm 1 over consecutive steps with the running
covariance, its gradient, the update rule of C, limits, gradients and a smoke fit."""

import math

import pytest
import torch

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

tico = load("tico")


def unit(v: list[float]) -> list[float]:
    s = math.sqrt(sum(x * x for x in v))
    return [x / s for x in v]


def literal_steps(batches, beta: float, rho: float):
    """Eq. 4 with the running C_t, Python loops in float64: the loss of every step and the final C."""
    d = len(batches[0][0][0])
    c_prev = [[0.0] * d for _ in range(d)]
    losses = []
    for z1, z2 in batches:
        a = [unit(r) for r in z1.tolist()]
        b = [unit(r) for r in z2.tolist()]
        n = len(a)
        bt = [[sum(a[i][j] * a[i][k] for i in range(n)) / n for k in range(d)] for j in range(d)]
        c = [[beta * c_prev[j][k] + (1 - beta) * bt[j][k] for k in range(d)] for j in range(d)]
        inv = -sum(sum(x * y for x, y in zip(a[i], b[i])) for i in range(n)) / n
        con = rho / n * sum(sum(a[i][j] * c[j][k] * a[i][k] for j in range(d) for k in range(d)) for i in range(n))
        losses.append(inv + con)
        c_prev = c
    return losses, c_prev


def random_steps(steps: int, n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64))
            for _ in range(steps)]


@pytest.mark.parametrize("n,d,beta,rho", [(4, 3, 0.9, 8.0), (7, 5, 0.5, 20.0), (16, 8, 0.0, 1.0)])
def test_loss_matches_equation_over_steps(n, d, beta, rho):
    batches = random_steps(3, n, d, seed=n * d)
    want, want_c = literal_steps(batches, beta, rho)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for (z1, z2), w in zip(batches, want):
        loss, cov, _ = tico.tico_loss(z1, z2, cov, beta, rho)
        assert loss.item() == pytest.approx(w, rel=1e-10, abs=1e-12)
    assert torch.allclose(cov, torch.tensor(want_c, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("cov_grad", [True, False])
def test_gradient_follows_algorithm_1(cov_grad):
    """d/dZ of rho/N sum_i z_i^T C_t z_i (before the normalisation) is 2 rho/N Z C_t, plus, when the current
    batch's part of C_t carries gradient, 2 rho (1 - beta)/N^2 Z Z^T Z; the invariance gives -Z'/N."""
    n, d, beta, rho = 6, 4, 0.7, 3.0
    g = torch.Generator().manual_seed(0)
    u1, u2 = (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for _ in "ab")
    prev = torch.randn(d, d, generator=g, dtype=torch.float64)
    prev = prev @ prev.T / d
    z1 = u1.clone().requires_grad_(True)
    loss, cov, _ = tico.tico_loss(z1, u2, prev, beta, rho, cov_grad)
    loss.backward()
    grad_unit = -u2 / n + 2 * rho / n * u1 @ cov
    if cov_grad:
        grad_unit = grad_unit + 2 * rho * (1 - beta) / n**2 * u1 @ (u1.T @ u1)
    # through the normalisation at unit norm: project out the radial part
    want = grad_unit - (grad_unit * u1).sum(dim=1, keepdim=True) * u1
    assert torch.allclose(z1.grad, want, atol=1e-12)


def test_running_covariance_update_rule_and_no_gradient():
    cfg = tico.Config(proj_hidden_dim=32, proj_dim=8, beta=0.6)
    model = tiny_model(tico, cfg)
    batch = fixed_batch(tico, cfg, n=8)
    assert torch.equal(model.cov, torch.zeros(8, 8))  # C_0 = 0
    assert "cov" in dict(model.named_buffers()) and not model.cov.requires_grad
    for _ in range(2):
        prev = model.cov.clone()
        with torch.no_grad():
            z1 = torch.nn.functional.normalize(model.projector(model.backbone(batch["views"][0])), dim=1)
        out = model(batch)
        want = 0.6 * prev + 0.4 * z1.T @ z1 / 8
        assert torch.allclose(model.cov, want, atol=1e-6)
        out["loss"].backward()
        assert model.cov.grad is None
    assert torch.allclose(model.cov, model.cov.T) and torch.trace(model.cov).item() == pytest.approx(
        1 - 0.6**2, rel=1e-5)  # unit embeddings: trace B_t = 1, so trace C_t = 1 - beta^t


def test_eval_forward_leaves_the_buffer():
    cfg = tico.Config(proj_hidden_dim=32, proj_dim=8)
    model = tiny_model(tico, cfg).eval()
    model(fixed_batch(tico, cfg, n=8))
    assert torch.equal(model.cov, torch.zeros(8, 8))


def test_limits():
    n, d, rho, beta = 8, 8, 8.0, 0.9
    eye = torch.eye(n, d, dtype=torch.float64)
    zero = torch.zeros(d, d, dtype=torch.float64)
    # identical views: the invariance term is -1
    _, _, terms = tico.tico_loss(eye, eye, zero, beta, rho)
    assert terms["invariance"].item() == pytest.approx(-1.0, abs=1e-12)
    # orthonormal embeddings spread over all D directions: C_1 = (1 - beta) I / D, contrast rho (1 - beta) / D
    assert terms["contrast"].item() == pytest.approx(rho * (1 - beta) / d, rel=1e-12)
    # a collapsed embedding: C_1 = (1 - beta) u u^T and the contrast is rho (1 - beta), D times larger;
    # with C_{t-1} = u u^T already (a long collapse) it is rho, the maximum for unit vectors
    ones = torch.ones(n, d, dtype=torch.float64)
    assert tico.tico_loss(ones, ones, zero, beta, rho)[2]["contrast"].item() == pytest.approx(rho * (1 - beta))
    uu = torch.full((d, d), 1.0 / d, dtype=torch.float64)
    assert tico.tico_loss(ones, ones, uu, beta, rho)[2]["contrast"].item() == pytest.approx(rho)
    # aligned, spread views beat random pairs
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert tico.tico_loss(eye, eye, zero, beta, rho)[0] < tico.tico_loss(r1, r2, zero, beta, rho)[0]


def test_scale_invariance():
    z1, z2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    zero = torch.zeros(6, 6, dtype=torch.float64)
    a = tico.tico_loss(3 * z1, 0.5 * z2, zero)[0].item()
    assert a == pytest.approx(tico.tico_loss(z1, z2, zero)[0].item(), rel=1e-12)


def test_gradients_reach_backbone():
    cfg = tico.Config(proj_hidden_dim=32, proj_dim=16)
    model = tiny_model(tico, cfg)
    out = model(fixed_batch(tico, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0


def test_augmentations_give_two_distinct_views():
    cfg = tico.Config()
    views = fixed_batch(tico, cfg, n=4)["views"]
    assert len(views) == 2 and views[0].shape == (4, 3, 32, 32)
    assert not torch.allclose(views[0], views[1])


def test_small_preset_names_config_fields():
    fields = set(tico.Config.__dataclass_fields__)
    assert set(tico.PRESETS["small"]) <= fields
    tico.Config(**tico.PRESETS["small"])


def test_smoke_fit_lowers_the_loss():
    # beta = 0: the loss is a function of the batch alone. With beta = 0.9 the loss of the first steps rises
    # while C_t fills up from C_0 = 0 (trace 1 - beta^t), and on one fixed batch the lagging C makes it
    # oscillate, so a first-versus-last comparison says nothing there; it must stay finite.
    cfg = tico.Config(proj_hidden_dim=64, proj_dim=32, optimizer="sgd", beta=0.0)
    losses, model = smoke_fit(tico, cfg, steps=30, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    losses, model = smoke_fit(tico, tico.Config(proj_hidden_dim=64, proj_dim=32, optimizer="sgd"), steps=10, lr=0.1)
    assert all(math.isfinite(v) for v in losses) and model.cov.abs().sum() > 0


def test_embed_is_backbone_features():
    cfg = tico.Config(proj_hidden_dim=32, proj_dim=16)
    model = tiny_model(tico, cfg)
    x = fixed_batch(tico, cfg, n=4)["views"][0]
    assert torch.equal(model.embed(x), model.backbone(x))
