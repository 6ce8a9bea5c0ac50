"""Barlow Twins: Eq. 1-2 against a literal computation, its limits, the lambda scaling, gradients, the
optimizer groups, the view recipe, the presets and a smoke fit."""

import math

import pytest
import torch
from torchvision.transforms import v2

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

bt = load("barlow-twins")


def standardise_literal(z: list[list[float]], eps: float) -> list[list[float]]:
    """Columns of z (N rows, D columns), each to mean 0 and variance 1 with the biased variance, as BN in
    training mode: returns cols[i][b]."""
    n, d = len(z), len(z[0])
    cols = []
    for i in range(d):
        col = [z[b][i] for b in range(n)]
        mean = sum(col) / n
        var = sum((x - mean) ** 2 for x in col) / n
        cols.append([(x - mean) / math.sqrt(var + eps) for x in col])
    return cols


def bt_literal(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float) -> float:
    """Eq. 1 with C_ij = (1/N) sum_b za_bi zb_bj of the batch-standardised embeddings, with loops."""
    n, d = z1.shape
    a, b = standardise_literal(z1.double().tolist(), eps), standardise_literal(z2.double().tolist(), eps)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def bt_eq2_literal(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> float:
    """Eq. 1 with C as Eq. 2 writes it: sum_b za_bi zb_bj / sqrt(sum_b za_bi^2 sum_b zb_bj^2) of the
    mean-centred embeddings (no eps)."""
    n, d = z1.shape
    a = [[float(v) for v in col - col.mean()] for col in z1.double().T]
    b = [[float(v) for v in col - col.mean()] for col in z2.double().T]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(a[i][k] * b[j][k] for k in range(n))
            c = num / math.sqrt(sum(x * x for x in a[i]) * sum(x * x for x in b[j]))
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


SHAPES = [(4, 3, 0.0051), (7, 5, 0.1), (16, 12, 1.0), (5, 20, 0.02)]  # the last: D > N, as 8192 > 2048


@pytest.mark.parametrize("n,d,lambd", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.3])
def test_loss_matches_equation(n, d, lambd, eps):
    g = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 - 2
    want = bt_literal(z1, z2, lambd, eps)
    assert bt.barlow_twins_loss(z1, z2, lambd, eps).item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("n,d,lambd", SHAPES)
def test_loss_matches_eq2_without_eps(n, d, lambd):
    g = torch.Generator().manual_seed(n + d)
    z1, z2 = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
    assert bt.barlow_twins_loss(z1, z2, lambd, 0.0).item() == pytest.approx(bt_eq2_literal(z1, z2, lambd), rel=1e-10)


def test_cross_correlation_and_its_terms():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    c = bt.cross_correlation(z1, z2, 0.0)
    assert c.shape == (6, 6) and bool((c.abs() <= 1 + 1e-12).all())  # correlations lie in [-1, 1]
    a = (z1 - z1.mean(0)) / z1.std(0, correction=0)
    b = (z2 - z2.mean(0)) / z2.std(0, correction=0)
    torch.testing.assert_close(c, a.T @ b / 9)
    on, off = bt.loss_terms(c)
    assert on.item() == pytest.approx(float(((1 - c.diagonal()) ** 2).sum()), rel=1e-12)
    assert off.item() == pytest.approx(float((c**2).sum() - (c.diagonal() ** 2).sum()), rel=1e-12)
    m = torch.arange(16.0).view(4, 4)
    assert bt.off_diagonal(m).tolist() == [v for k, v in enumerate(range(16)) if k % 5]  # row-major, no diagonal


def test_standardisation_is_affine_free_batchnorm():
    z = torch.randn(10, 4, dtype=torch.float64) * 2 + 3
    bn = torch.nn.BatchNorm1d(4, affine=False).double().train()
    torch.testing.assert_close(bt.batch_standardise(z, 1e-5), bn(z))


# Four samples, three mean-zero, mutually orthogonal columns of unit (biased) variance.
DECORRELATED = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)


def test_limits():
    z, lambd = DECORRELATED, 0.0051
    # identical, decorrelated views of unit variance: C = I, the minimum 0 (any per-dimension affine map too)
    assert bt.barlow_twins_loss(z, z, lambd, 0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert bt.barlow_twins_loss(z, 3 * z + 5, lambd, 0.0).item() == pytest.approx(0.0, abs=1e-12)
    # with BN's eps, C = I / (1 + eps)
    assert bt.barlow_twins_loss(z, z, lambd, 1e-5).item() == pytest.approx(3 * (1e-5 / (1 + 1e-5)) ** 2, rel=1e-8)
    # opposite views: C = -I, the invariance term at its maximum 4 per dimension
    assert bt.barlow_twins_loss(z, -z, lambd, 0.0).item() == pytest.approx(12.0, rel=1e-12)
    # a collapsed batch (a constant embedding) standardises to 0 (eps keeps it finite): C = 0, L = D
    same = torch.ones(6, 5, dtype=torch.float64)
    assert bt.barlow_twins_loss(same, same, lambd).item() == pytest.approx(5.0, rel=1e-12)
    assert bt.barlow_twins_loss(torch.randn(6, 5, dtype=torch.float64), same, lambd).item() == pytest.approx(5.0, rel=1e-12)
    # redundant dimensions: a copied column correlates with its copy, C_01 = C_10 = 1
    redundant = z[:, [0, 0, 1]]
    assert bt.barlow_twins_loss(redundant, redundant, lambd, 0.0).item() == pytest.approx(2 * lambd, rel=1e-12)
    # dimensional collapse: every dimension carries the same signal, C = all ones, L = lambda D (D - 1)
    line = z[:, [0] * 4]
    assert bt.barlow_twins_loss(line, line, lambd, 0.0).item() == pytest.approx(lambd * 12, rel=1e-12)
    rand = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert bt.barlow_twins_loss(z, z, lambd).item() < bt.barlow_twins_loss(rand, rand.roll(1, 0), lambd).item()


def test_lambda_scales_only_the_redundancy_term():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    on, off = bt.loss_terms(bt.cross_correlation(z1, z2))
    assert bt.barlow_twins_loss(z1, z2, 0.0).item() == pytest.approx(on.item(), rel=1e-12)
    for lambd in (0.0051, 0.5, 3.0):
        assert bt.barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(on.item() + lambd * off.item(), rel=1e-12)
    assert off.item() > 0


def test_symmetric_in_the_views():
    z1, z2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert bt.barlow_twins_loss(z1, z2, 0.1).item() == pytest.approx(bt.barlow_twins_loss(z2, z1, 0.1).item(), rel=1e-12)


def test_gradients_of_the_loss_match_finite_differences():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bt.barlow_twins_loss(a, b, 0.1, 1e-5), (z1, z2))
    bt.barlow_twins_loss(z1, z2, 0.1).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0  # both branches learn: no stop-gradient


def _small_cfg(**kw):
    return bt.Config(**{"proj_hidden_dim": 32, "proj_dim": 16, **kw})


def test_gradients_reach_the_backbone_and_every_head_parameter():
    cfg = _small_cfg()
    model = tiny_model(bt, cfg)
    out = model(fixed_batch(bt, cfg, n=8))
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.parameters())
    # no state of the method's own: the only buffers are BN running statistics
    assert all(name.split(".")[-1] in {"running_mean", "running_var", "num_batches_tracked"} for name, _ in model.named_buffers())


def test_forward_is_the_loss_of_the_projected_views():
    cfg = _small_cfg(lambd=0.2)
    model = tiny_model(bt, cfg)
    batch = fixed_batch(bt, cfg, n=8)
    out = model(batch)
    x1, x2 = batch["views"]
    want = bt.barlow_twins_loss(model.projector(model.backbone(x1)), model.projector(model.backbone(x2)), 0.2, cfg.bn_eps)
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["on_diag"] + 0.2 * out["off_diag"], want)
    assert -1 <= out["diag_mean"].item() <= 1 and out["off_rms"].item() > 0


def test_loss_is_float32_under_autocast():
    cfg = _small_cfg()
    model = tiny_model(bt, cfg)
    batch = fixed_batch(bt, cfg, n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_projector_is_three_linear_layers_with_bn_relu_between():
    head = bt.projector(256, 64, 32, 3)
    kinds = [type(m) for m in head]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 64), (64, 64), (64, 32)]
    assert all(m.bias is None for m in linears)  # official projector: bias=False


def test_param_groups_give_biases_and_bn_their_own_rate():
    cfg = _small_cfg()
    model = tiny_model(bt, cfg)
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    opt = train.build_optimizer(model, cfg, 0.2 * 64 / 256)
    assert isinstance(opt, train.LARS)
    weights, biases = opt.param_groups
    assert weights["weight_decay"] == cfg.weight_decay and weights["lars"]
    assert biases["weight_decay"] == 0.0 and not biases["lars"]  # excluded from decay and LARS (Sec. 2.2)
    peak = cfg.base_lr * 2048 / 256
    lr = train.lr_at(5000, 10000, 100, peak)
    rates = [train.group_lr(g, lr, peak, 5000, 100) for g in opt.param_groups]
    assert rates[0] == pytest.approx(lr) and rates[1] == pytest.approx(lr * 0.0048 / 0.2)
    assert train.group_lr(biases, peak, peak, 200, 100) == pytest.approx(0.0048 * 2048 / 256)  # the paper's rate


def test_two_asymmetric_views_of_standard_transforms():
    cfg = bt.Config()
    first, second = bt.augmentations(cfg, 64)
    for view in (first, second):
        kinds = [type(t) for t in view.transforms]
        assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomApply, v2.RandomGrayscale,
                         v2.RandomApply, v2.RandomSolarize, v2.ToDtype, v2.Normalize]
        jitter = view.transforms[3]
        assert jitter.p == 0.8 and view.transforms[4].p == 0.2 and view.transforms[1].scale == (0.08, 1.0)
        cj = jitter.transforms[0]
        assert cj.brightness == (0.6, 1.4) and cj.contrast == (0.6, 1.4) and cj.saturation == (0.8, 1.2)
        assert cj.hue == (-0.1, 0.1)
        assert view.transforms[6].threshold == 128
    assert (first.transforms[5].p, first.transforms[6].p) == (1.0, 0.0)  # T: always blurred, never solarised
    assert (second.transforms[5].p, second.transforms[6].p) == (0.1, 0.2)  # T'
    small = bt.augmentations(cfg, 32)
    assert all(v2.RandomApply not in [type(t) for t in v.transforms][5:] for v in small)  # no blur below 64 px
    assert views.plan_views(small, in_memory=True).mode == "device"
    batch = fixed_batch(bt, cfg, n=4)["views"]
    assert len(batch) == 2 and batch[0].shape == (4, 3, 32, 32) and not torch.allclose(batch[0], batch[1])


def test_paper_defaults_and_small_preset():
    cfg = bt.Config()
    assert (cfg.lambd, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.bn_eps) == (0.0051, 8192, 8192, 3, 1e-5)
    assert (cfg.optimizer, cfg.base_lr, cfg.bias_lr, cfg.weight_decay) == ("lars", 0.2, 0.0048, 1.5e-6)
    assert (cfg.warmup_epochs, cfg.epochs, cfg.batch_size, cfg.sync_batchnorm) == (10, 1000, 2048, True)
    assert set(bt.PRESETS["small"]) <= set(bt.Config.__dataclass_fields__)


def test_embed_is_backbone_features():
    model = tiny_model(bt, _small_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


def test_smoke_fit_lowers_the_loss():
    cfg = _small_cfg(proj_hidden_dim=64, proj_dim=32, optimizer="sgd")
    losses, _ = smoke_fit(bt, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
