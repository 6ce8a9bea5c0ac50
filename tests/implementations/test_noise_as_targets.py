"""NAT: the Hungarian solver against scipy and brute force, the batch reassignment (never a higher batch cost,
P stays a permutation), the targets (on the sphere, fixed), the square loss against a literal computation,
the reassignment schedule, the forward's use of the new assignment, gradients, smoke fit."""

import dataclasses
import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

nat = load("noise-as-targets")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cost(c, sigma) -> float:
    return float(sum(c[i, j] for i, j in enumerate(sigma.tolist())))


def _matrices(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    yield torch.rand(n, n, generator=g, dtype=torch.float64)  # continuous: a unique optimum
    yield torch.randint(0, 3, (n, n), generator=g).double()  # many ties
    yield torch.zeros(n, n, dtype=torch.float64)  # every permutation optimal
    yield -100 * torch.randn(n, n, generator=g, dtype=torch.float64)  # negative, wide range
    yield torch.randint(0, 4, (n, 1), generator=g).double().expand(n, n).clone()  # constant rows


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16, 48])
def test_solver_matches_scipy(n):
    for seed in range(1 if n > 16 else 3):
        for c in _matrices(n, seed):
            sigma = nat.linear_assignment(c)
            assert sorted(sigma.tolist()) == list(range(n))  # a permutation
            rows, cols = linear_sum_assignment(c.numpy())
            assert _cost(c, sigma) == pytest.approx(float(c.numpy()[rows, cols].sum()), abs=1e-9, rel=1e-12)


def test_solver_is_optimal_by_brute_force():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        c = torch.randint(0, 5, (5, 5), generator=g).double() + torch.rand(5, 5, generator=g, dtype=torch.float64) * (seed % 2)
        best = min(sum(float(c[i, p[i]]) for i in range(5)) for p in itertools.permutations(range(5)))
        assert _cost(c, nat.linear_assignment(c)) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="square"):
        nat.linear_assignment(torch.zeros(2, 3))


def test_solver_keeps_the_device_and_dtype_of_its_result():
    c = torch.rand(6, 6)  # float32 in, solved in float64
    sigma = nat.linear_assignment(c)
    assert sigma.dtype == torch.long and sigma.device == c.device
    assert torch.equal(nat.linear_assignment(torch.eye(6).flip(1) * -1), torch.arange(6).flip(0))


def test_sphere_targets_are_unit_and_spread():
    t = nat.sphere_targets(4000, 3, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(t.norm(dim=1), torch.ones(4000, dtype=torch.float64))
    # uniform on S^2: mean 0, second moment I/3 (each coordinate's variance 1/d)
    assert float(t.mean(0).abs().max()) < 0.05
    torch.testing.assert_close(t.T @ t / 4000, torch.eye(3, dtype=torch.float64) / 3, atol=0.03, rtol=0)


def test_loss_is_half_the_mean_squared_distance():
    z = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    want = sum(0.5 * sum((z[i, k] - c[i, k]) ** 2 for k in range(4)) for i in range(5)) / 5
    assert nat.nat_loss(z, c).item() == pytest.approx(float(want), rel=1e-6)
    assert nat.nat_loss(z, z).item() == 0.0  # the minimum: every feature on its target
    assert nat.nat_loss(z, -z).item() == pytest.approx(2.0)  # the maximum on the sphere: antipodes


def test_reassignment_lowers_the_batch_cost_and_permutes_the_held_targets():
    targets = nat.sphere_targets(50, 6, torch.Generator().manual_seed(1))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        held = torch.randperm(50, generator=g)[:12]  # the targets 12 images hold
        z = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
        new = nat.reassign(z, held, targets)
        assert sorted(new.tolist()) == sorted(held.tolist())  # the same targets, exchanged
        before = float(((z - targets[held]) ** 2).sum())
        after = float(((z - targets[new]) ** 2).sum())
        assert after <= before + 1e-6
        # optimal among all exchanges: the scipy solution of the squared distances
        d = ((z[:, None, :] - targets[held][None, :, :]) ** 2).sum(-1).double().numpy()
        rows, cols = linear_sum_assignment(d)
        assert after == pytest.approx(float(d[rows, cols].sum()), abs=1e-4)
    # features already on their targets keep them
    assert torch.equal(nat.reassign(targets[held], held, targets), held)


def _cfg(**kw):
    return nat.Config(**{**dict(proj_dim=8, proj_hidden_dim=16, dropout=0.0), **kw})


def test_setup_draws_fixed_targets_and_a_random_permutation():
    model = tiny_model(nat, _cfg())
    model.setup(40, 10)
    assert model.targets.shape == (40, 8) and not model.targets.requires_grad
    torch.testing.assert_close(model.targets.norm(dim=1), torch.ones(40))
    assert sorted(model.assignment.tolist()) == list(range(40))
    assert not torch.equal(model.assignment, torch.arange(40))
    assert all(b is not model.targets for b in model.parameters())
    again = tiny_model(nat, _cfg(), seed=5)
    again.setup(40, 10)  # the same on every rank, whatever the global RNG
    assert torch.equal(again.targets, model.targets) and torch.equal(again.assignment, model.assignment)
    with pytest.raises(RuntimeError, match="no targets yet"):
        tiny_model(nat, _cfg())(fixed_batch(nat, _cfg(), n=4))


def test_epoch_hook_follows_the_reassignment_period():
    model = tiny_model(nat, _cfg())
    assert bool(model.reassigning)  # epoch 0 reassigns (official ``epoch % permute == 0``)
    got = []
    for epoch in range(7):
        model.on_epoch_start(epoch, 7, lambda: pytest.fail("NAT needs no features of the training set"))
        got.append(bool(model.reassigning))
    assert got == [True, False, False, True, False, False, True]


def test_forward_reassigns_the_batch_and_trains_on_the_new_targets():
    cfg = _cfg()
    model = tiny_model(nat, cfg)
    model.setup(64, 10)
    batch = fixed_batch(nat, cfg, n=16)
    batch["index"] = torch.arange(20, 36)  # the batch's images among the 64
    before = model.assignment.clone()
    out = model(batch)
    after = model.assignment
    outside = torch.ones(64, dtype=torch.bool)
    outside[20:36] = False
    assert torch.equal(after[outside], before[outside])  # only the batch's images exchange targets
    assert sorted(after[20:36].tolist()) == sorted(before[20:36].tolist())
    assert not torch.equal(after[20:36], before[20:36])
    assert sorted(after.tolist()) == list(range(64))  # P stays a permutation
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.projector(model.features(batch["views"][0])), dim=1)
    torch.testing.assert_close(out["loss"], nat.nat_loss(z, model.targets[after[20:36]]))
    assert out["loss"] <= nat.nat_loss(z, model.targets[before[20:36]]) + 1e-6
    assert 0 < float(out["reassigned"]) <= 1
    # outside the reassignment epochs, and in eval mode, P is left alone
    model.on_epoch_start(1, 10, None)
    kept = model.assignment.clone()
    model(batch)
    assert torch.equal(model.assignment, kept)
    model.on_epoch_start(0, 10, None)
    model.eval()
    model(batch)
    assert torch.equal(model.assignment, kept)


def test_gradients_reach_the_backbone_and_not_the_targets():
    cfg = _cfg()
    model = tiny_model(nat, cfg)
    model.setup(32, 10)
    batch = fixed_batch(nat, cfg, n=8)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert model.targets.grad is None


def test_view_recipe_sobel_and_preset():
    cfg = nat.Config()
    (pipe,) = nat.augmentations(cfg, 224)
    crop = pipe.transforms[1]
    assert type(crop).__name__ == "RandomResizedCrop"
    assert crop.scale == cfg.crop_scale and crop.ratio == (1.0, 1.0)
    assert cfg.crop_scale[0] == cfg.crop_scale[1] and math.isclose(math.sqrt(cfg.crop_scale[0]) * 256, 224)
    assert views.plan_views(nat.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(nat.PRESETS["small"]) <= {f.name for f in dataclasses.fields(nat.Config)}
    x = torch.zeros(1, 3, 5, 5)
    x[..., 3:] = 1.0  # a vertical edge: only the horizontal derivative responds inside the image
    s = nat.sobel(x)
    assert s.shape == (1, 2, 5, 5)
    assert float(s[0, 0, 1:-1, 1:-1].abs().sum()) > 0 and float(s[0, 1, 1:-1, 1:-1].abs().sum()) == 0


def test_embed_is_the_backbone_features_and_there_is_no_assign():
    cfg = _cfg()
    model = tiny_model(nat, cfg).eval()
    x = fixed_batch(nat, cfg, n=4)["views"][0]
    e = model.embed(x)
    assert e.shape == (4, model.backbone.feature_dim)
    torch.testing.assert_close(e, model.backbone(nat.sobel(x)))
    assert not hasattr(model, "assign")


def test_param_group_is_constant_rate_without_decay():
    model = tiny_model(nat, _cfg())
    (group,) = model.param_groups()
    assert group["fixed_lr"] and group["weight_decay"] == 0.0
    assert len(group["params"]) == len(list(model.parameters()))


def test_smoke_fit_lowers_the_loss_and_keeps_the_targets():
    cfg = _cfg()
    model = tiny_model(nat, cfg)
    model.setup(32, 10)
    targets = model.targets.clone()
    batch = train.prepare_batch(fixed_batch(nat, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, cfg.base_lr * 32 / 256)
    losses = []
    for step in range(24):
        model.on_epoch_start(step, 24, None)  # a reassignment every third step
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert torch.equal(model.targets, targets)  # fixed
    assert sorted(model.assignment.tolist()) == list(range(32))
