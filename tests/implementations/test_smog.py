"""SMoG: the group-level loss against a literal computation, its limits, the assignment, the momentum
grouping and the k-means by their rules, the step's state (groups, memory, target), the re-grouping trigger,
the swap of the crop sets, the view recipe, embed, a smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

smog = load("smog")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def unit(*shape, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def smog_literal(p, groups, targets, tau: float) -> float:
    """-log softmax_k(p . c_k / tau)[positive] with loops and math.exp, averaged over every (head, target
    crop, online crop, sample)."""
    total, count = 0.0, 0
    for h, head in enumerate(groups.tolist()):
        for t_crop in targets[h].tolist():
            for v_crop in p.tolist():
                for n, row in enumerate(v_crop):
                    scores = [sum(a * b for a, b in zip(row, c)) / tau for c in head]
                    top = max(scores)
                    log_z = top + math.log(sum(math.exp(s - top) for s in scores))
                    total += log_z - scores[t_crop[n]]
                    count += 1
    return total / count


@pytest.mark.parametrize("h,t,v,n,k,d,tau", [(1, 1, 1, 3, 4, 5, 0.1), (3, 2, 4, 2, 6, 3, 0.1), (2, 2, 3, 4, 5, 8, 0.5)])
def test_loss_matches_equation(h, t, v, n, k, d, tau):
    p, groups = unit(v, n, d, seed=1), unit(h, k, d, seed=2)
    targets = torch.randint(k, (h, t, n), generator=torch.Generator().manual_seed(3))
    got = smog.smog_loss(p, groups, targets, tau).item()
    assert got == pytest.approx(smog_literal(p, groups, targets, tau), rel=1e-10)


def test_limits():
    v, n, k, d, tau = 3, 6, 8, 8, 0.1
    targets = torch.randint(k, (2, 2, n))
    # coinciding group features: every group scores alike, the loss is log K whatever the prediction
    same = F.normalize(torch.ones(2, k, d, dtype=torch.float64), dim=-1)
    assert smog.smog_loss(unit(v, n, d), same, targets, tau).item() == pytest.approx(math.log(k), rel=1e-12)
    # orthonormal groups: a prediction on its positive group beats random ones, and the loss is known
    groups = torch.eye(k, d, dtype=torch.float64).expand(2, k, d)
    one_target = torch.randint(k, (n,)).expand(2, 2, n)
    perfect = groups[0][one_target[0, 0]].expand(v, n, d)
    best = smog.smog_loss(perfect, groups, one_target, tau).item()
    assert best == pytest.approx(math.log(1 + (k - 1) * math.exp(-1 / tau)), rel=1e-12)
    for seed in range(3):
        assert smog.smog_loss(unit(v, n, d, seed=seed), groups, one_target, tau).item() > best


def test_no_gradient_into_group_features():
    p = unit(2, 4, 5).requires_grad_(True)
    groups = unit(2, 6, 5).requires_grad_(True)
    smog.smog_loss(p, groups, torch.randint(6, (2, 2, 4)), 0.1).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and groups.grad is None


def test_assignment_is_the_nearest_group():
    z, groups = unit(50, 6), unit(7, 6, seed=1)
    want = [max(range(7), key=lambda j: sum(a * b for a, b in zip(row, groups[j].tolist()))) for row in z.tolist()]
    assert smog.assign(z, groups).tolist() == want
    assert smog.assign(z, groups, chunk=7).tolist() == want  # chunked scoring gives the same


def test_momentum_grouping_rule():
    k, d, beta = 6, 4, 0.7
    z = unit(20, d, seed=1).abs()  # in the positive orthant, so that the last group, all negative, stays empty
    groups = torch.cat([unit(k - 1, d).abs(), -torch.ones(1, d, dtype=torch.float64) / d**0.5])
    got = smog.momentum_grouping(groups, z, beta)
    a = smog.assign(z, groups).tolist()
    for j in range(k):
        members = [z[i] for i in range(len(z)) if a[i] == j]
        if members:
            want = beta * groups[j] + (1 - beta) * torch.stack(members).mean(0)
            want = want / want.norm()
        else:
            want = groups[j]  # a group that received nothing keeps its feature
        torch.testing.assert_close(got[j], want, rtol=1e-12, atol=1e-12)
    assert k - 1 not in a and len(set(a)) > 1  # an empty group and groups with members are covered
    torch.testing.assert_close(smog.momentum_grouping(groups, z, 1.0), groups)  # beta = 1 holds them still


def test_kmeans_recovers_separated_clusters_and_is_a_fixed_point():
    centres = torch.eye(3, 5, dtype=torch.float64)
    x = F.normalize(centres.repeat_interleave(10, 0) + 0.05 * torch.randn(30, 5, dtype=torch.float64), dim=1)
    out = smog.group_kmeans(x, x[[0, 10, 20]], iters=10)
    torch.testing.assert_close(out, centres, atol=0.05, rtol=0)
    # after convergence every centre is the normalised mean of the rows nearest to it (Lloyd's fixed point)
    a = smog.assign(x, out)
    for j in range(3):
        torch.testing.assert_close(out[j], F.normalize(x[a == j].mean(0), dim=0))
    empty = torch.cat([x[[0, 10, 20]], -torch.ones(1, 5, dtype=torch.float64) / 5 ** 0.5])  # nobody's nearest
    torch.testing.assert_close(smog.group_kmeans(x, empty, iters=3)[3], empty[3])


def test_group_momentum_schedule():
    cfg = smog.Config()
    assert smog.group_momentum_at(0, 100, cfg) == pytest.approx(1.0)
    assert smog.group_momentum_at(50, 100, cfg) == pytest.approx(0.995)
    assert smog.group_momentum_at(100, 100, cfg) == pytest.approx(0.99)
    assert smog.group_momentum_at(200, 100, cfg) == pytest.approx(0.99)


def _cfg(**kw):
    base = dict(num_groups=8, num_heads=3, proj_hidden_dim=32, proj_dim=16, n_local_crops=1, group_momentum=0.8,
                group_momentum_final=0.8)
    return smog.Config(**{**base, **kw})


def online_globals(model, online_views, n: int) -> torch.Tensor:
    """(2, N, D) unit online embeddings of the two global crops, computed as the forward does: one projector
    (BN) batch with the local crops."""
    with torch.no_grad():
        proj = model.online[1](smog.encode_views(model.online[0], online_views))
    return F.normalize(proj[: 2 * n], dim=1).view(2, n, -1)


def _model(cfg, num_samples: int = 32):
    model = tiny_model(smog, cfg)
    model.setup(num_samples, 10)
    return model


def test_view_recipe():
    cfg = smog.Config()
    pipes = smog.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipes) == 4 + 2 * cfg.n_local_crops
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(32, 32)] * 4 + [(16, 16)] * 8
    assert [tuple(c.scale) for c in crops] == [(0.2, 1.0)] * 4 + [(0.05, 0.2)] * 8
    assert views.plan_views(pipes, in_memory=True).mode == "device"
    big = smog.augmentations(cfg, 224)

    def probs(p, name):
        return [t.p for t in p.transforms if type(t).__name__ == name or
                (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]

    assert [probs(p, "GaussianBlur") for p in big] == [[1.0]] * 2 + [[0.1]] * 2 + [[1.0]] * 4 + [[0.1]] * 4
    assert [probs(p, "RandomSolarize") for p in big] == [[]] * 2 + [[0.2]] * 2 + [[]] * 4 + [[0.2]] * 4
    assert [probs(p, "ColorJitter") for p in big] == [[0.8]] * 12
    assert all(probs(p, "GaussianBlur") == [] for p in pipes)  # no blur below 64 px
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in big[3:5]] == [(3, 224, 224), (3, 96, 96)]


def test_sets_of_crops_swap_every_step():
    cfg = _cfg()
    model = _model(cfg)
    batch = fixed_batch(smog, cfg, n=8)
    seen = {"online": [], "target": []}
    model.online[0].register_forward_hook(lambda m, i, o: seen["online"].append(i[0]))
    model.target[0].register_forward_hook(lambda m, i, o: seen["target"].append(i[0]))
    t, t_prime, local_t, local_t_prime = batch["views"][:2], batch["views"][2:4], batch["views"][4], batch["views"][5]
    model(batch)  # step 0: the online network sees T (and T's local crop), the target T'
    assert torch.equal(seen["online"][0], torch.cat(t)) and torch.equal(seen["online"][1], local_t)
    assert torch.equal(seen["target"][0], torch.cat(t_prime))
    model.on_step_end(1, 10)
    seen["online"].clear()
    seen["target"].clear()
    model(batch)  # step 1: swapped
    assert torch.equal(seen["online"][0], torch.cat(t_prime)) and torch.equal(seen["online"][1], local_t_prime)
    assert torch.equal(seen["target"][0], torch.cat(t))


def test_gradients_reach_online_not_target_groups_or_memory():
    cfg = _cfg()
    model = _model(cfg)
    batch = fixed_batch(smog, cfg, n=8)
    out = model(batch)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert model.predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert all(not b.requires_grad for b in model.buffers())
    assert {"groups", "memory", "filled", "seen", "iteration", "beta", "groups_ready"} <= set(dict(model.named_buffers()))
    assert 0 < float(out["groups_used"]) <= 1 and -1 <= float(out["group_sim"]) <= 1


def test_first_groups_are_kmeans_on_the_batch():
    cfg = _cfg(kmeans_iters=30, group_momentum=1.0)  # beta = 1: the stored groups are the first grouping
    model = _model(cfg)
    batch = fixed_batch(smog, cfg, n=16)
    assert not bool(model.groups_ready)
    model(batch)
    model.on_step_end(1, 10)
    assert bool(model.groups_ready)
    z = online_globals(model, [*batch["views"][:2], batch["views"][4]], 16)  # step 0: T online
    for h in range(cfg.num_heads):
        groups, x = model.groups[h], z[h % 2]
        a = smog.assign(x, groups)
        for j in a.unique():  # converged: each used group is the normalised mean of its members
            torch.testing.assert_close(groups[j], F.normalize(x[a == j].mean(0), dim=0), rtol=1e-4, atol=1e-5)


def test_one_step_changes_the_state_by_its_rules():
    cfg = _cfg(key_momentum=0.9, group_momentum=0.8)
    model = _model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fixed_batch(smog, cfg, n=8)
    model(batch)
    model.on_step_end(1, 10)  # the first grouping is stored; the next step moves it
    g0, target0 = model.groups.clone(), [p.clone() for p in model.target.parameters()]
    batch = {**batch, "index": batch["index"] + 8}  # other rows of the memory
    z = online_globals(model, [*batch["views"][2:4], batch["views"][5]], 8)  # step 1 puts T' online
    with torch.no_grad():
        z_t = F.normalize(model.target(torch.cat(batch["views"][:2])), dim=1).view(2, 8, -1)
    out = model(batch)
    torch.testing.assert_close(model.groups, g0)  # nothing is stored in the forward
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    online = [p.detach().clone() for p in model.online.parameters()]
    model.on_step_end(2, 10)
    for h in range(cfg.num_heads):  # the momentum grouping, with head h on online global crop h mod 2
        torch.testing.assert_close(model.groups[h], smog.momentum_grouping(g0[h], z[h % 2], 0.8))
    for old, new, o in zip(target0, model.target.parameters(), online):  # EMA after the optimizer step
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)
    torch.testing.assert_close(model.memory[:, 8:16], z)
    assert model.filled.tolist() == [True] * 16 + [False] * 16
    assert int(model.seen) == 16 and int(model.iteration) == 2
    assert float(model.beta) == pytest.approx(0.8)
    # the loss's targets were the target's embeddings' nearest groups before the move
    assert out["group_sim"].item() == pytest.approx((z_t[0] * g0[0][smog.assign(z_t[0], g0[0])]).sum(-1).mean().item(),
                                                    rel=1e-5)


def test_regrouping_every_epoch_of_samples_resets_the_target():
    cfg = _cfg(regroup_epochs=1.0, kmeans_iters=30)
    model = _model(cfg, num_samples=20)  # a period of 20 samples: batches of 8 trigger after steps 3, 5, 8
    calls = []
    regroup = model.regroup
    model.regroup = lambda: (calls.append(int(model.iteration)), regroup())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fixed_batch(smog, cfg, n=8)
    for step in range(8):
        batch["index"] = (torch.arange(8) + 8 * step) % 20
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 8)
        if calls and calls[-1] == step + 1:  # just re-grouped: the target is the online network
            assert all(torch.equal(t, o) for t, o in zip(model.target.parameters(), model.online.parameters()))
            for h in range(cfg.num_heads):  # the groups are a k-means of the memory (converged)
                x = model.memory[h % 2]
                a = smog.assign(x, model.groups[h])
                for j in a.unique():
                    torch.testing.assert_close(model.groups[h][j], F.normalize(x[a == j].mean(0), dim=0),
                                               rtol=1e-4, atol=1e-5)
        else:
            assert not all(torch.equal(t, o) for t, o in zip(model.target.parameters(), model.online.parameters()))
    assert calls == [3, 5, 8] and int(model.seen) == 64 - 60


def test_setup_and_views_are_checked():
    cfg = _cfg()
    model = tiny_model(smog, cfg)
    batch = fixed_batch(smog, cfg, n=4)
    with pytest.raises(RuntimeError, match="setup"):
        model(batch)
    with pytest.raises(ValueError, match="num_groups"):
        model.setup(4, 10)
    model.setup(16, 10)
    with pytest.raises(ValueError, match="views"):
        model({**batch, "views": batch["views"][:2]})


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(smog.Config)}
    assert set(smog.PRESETS["small"]) <= fields
    cfg = dataclasses.replace(smog.Config(), **smog.PRESETS["small"])
    assert cfg.num_groups < 1437 / 10 and cfg.n_local_crops < smog.Config().n_local_crops


def test_embed_is_the_online_backbone():
    cfg = _cfg()
    model = _model(cfg)
    x = fixed_batch(smog, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    torch.testing.assert_close(model.embed(x), model.backbone(x))


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(group_momentum=0.99, group_momentum_final=0.99, base_lr=2.0)
    losses, model = smoke_fit(smog, cfg, steps=20, lr=0.5)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert bool(model.groups_ready) and int(model.filled.sum()) == 32
