"""SwAV: Sinkhorn-Knopp against the closed form of Eq. 3's solution and a literal loop, the swapped
prediction against a literal computation, limits, the queue, the prototypes' normalisation and freeze,
gradients, the view recipe, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

swav = load("swav")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sinkhorn_literal(scores, eps: float, iterations: int) -> list[list[float]]:
    """Sinkhorn-Knopp on Q = exp(C^T Z / eps) (K x B) with plain loops: rows to 1/K, columns to 1/B."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[j][i] / eps) for j in range(b)] for i in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[i][j] for i in range(k)) for j in range(b)]
        q = [[q[i][j] / cols[j] / b for j in range(b)] for i in range(k)]
    return [[b * q[i][j] for i in range(k)] for j in range(b)]  # B x K


@pytest.mark.parametrize("b,k,iters", [(6, 4, 3), (5, 7, 1), (9, 3, 10)])
def test_sinkhorn_matches_the_literal_iterations(b, k, iters):
    s = torch.rand(b, k, dtype=torch.float64, generator=torch.Generator().manual_seed(b * k)) * 2 - 1
    got = swav.sinkhorn(s, 0.3, iters).double()
    want = torch.tensor(sinkhorn_literal(s.tolist(), 0.3, iters), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # sinkhorn works in float32


def test_sinkhorn_converges_to_the_solution_of_eq_3():
    """Many iterations: B Q lies in the polytope (columns sum to 1, each prototype gets B/K) and has the form
    Diag(u) exp(C^T Z / eps) Diag(v), i.e. log Q - S / eps is a row term plus a column term."""
    b, k, eps = 12, 4, 0.5
    s = torch.rand(b, k, dtype=torch.float64) * 2 - 1
    q = swav.sinkhorn(s, eps, 500).double()  # (B, K)
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    r = q.log() - s / eps
    r = r - r[:, :1] - r[:1, :] + r[0, 0]  # zero when r_jk = a_j + c_k
    assert r.abs().max() < 1e-4


def test_sinkhorn_limits_and_invariances():
    s = torch.randn(8, 5, dtype=torch.float64)
    q = swav.sinkhorn(s, 0.05, 3)
    torch.testing.assert_close(swav.sinkhorn(s + 3.0, 0.05, 3), q)  # a constant changes nothing
    perm = torch.randperm(8)
    torch.testing.assert_close(swav.sinkhorn(s[perm], 0.05, 3), q[perm])  # samples are unordered columns
    # a collapsed batch (every sample scores the prototypes alike) gets uniform codes: equipartition
    same = torch.randn(1, 5).expand(8, 5)
    torch.testing.assert_close(swav.sinkhorn(same, 0.05, 3), torch.full((8, 5), 0.2))
    # well separated samples keep their own prototype: codes near one-hot at a small eps
    sharp = torch.eye(5).repeat(2, 1) * 0.9
    assert (swav.sinkhorn(sharp, 0.05, 3).argmax(1) == torch.arange(5).repeat(2)).all()


def swav_literal(scores, codes, assigned, tau: float) -> float:
    """Eq. 1-2 with loops: for each assigned view i and each other view v, - sum_k q_i log p_v, mean over n."""
    total = 0.0
    for i, q_view in zip(assigned, codes.tolist()):
        sub = 0.0
        for v, s_view in enumerate(scores.tolist()):
            if v == i:
                continue
            h = 0.0
            for q_row, s_row in zip(q_view, s_view):
                logits = [a / tau for a in s_row]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(a - top) for a in logits))
                h += -sum(q * (a - log_z) for q, a in zip(q_row, logits))
            sub += h / len(q_view)
        total += sub / (len(scores) - 1)
    return total / len(codes)


@pytest.mark.parametrize("v,n,k,assigned", [(2, 3, 4, (0, 1)), (4, 5, 3, (0, 1)), (3, 2, 6, (1,))])
def test_loss_matches_equation(v, n, k, assigned):
    g = torch.Generator().manual_seed(v * n * k)
    scores = torch.randn(v, n, k, generator=g, dtype=torch.float64)
    codes = torch.softmax(torch.randn(len(assigned), n, k, generator=g, dtype=torch.float64), -1)
    got = swav.swav_loss(list(scores), list(codes), assigned, 0.1).item()
    assert got == pytest.approx(swav_literal(scores, codes, assigned, 0.1), rel=1e-10)


def test_loss_limits():
    n, k = 6, 8
    uniform = torch.full((n, k), 1 / k, dtype=torch.float64)
    # a constant embedding: uniform predictions, and (by equipartition) uniform codes: log K
    flat = [torch.zeros(n, k, dtype=torch.float64)] * 3
    assert swav.swav_loss(flat, [uniform, uniform], (0, 1), 0.1).item() == pytest.approx(math.log(k), rel=1e-12)
    # one-hot codes predicted confidently by every other view: near 0; the wrong prototype: large
    target = torch.arange(n) % k
    onehot = F.one_hot(target, k).double()
    right = [onehot * 10.0] * 3  # scores of 10 / tau = 100 on the right prototype
    assert swav.swav_loss(right, [onehot, onehot], (0, 1), 0.1).item() < 1e-10
    wrong = [F.one_hot((target + 1) % k, k).double() * 10.0] * 3
    assert swav.swav_loss(wrong, [onehot, onehot], (0, 1), 0.1).item() > 99


def test_codes_get_no_gradient():
    s = torch.randn(3, 4, 5, requires_grad=True)
    q = torch.softmax(torch.randn(2, 4, 5), -1).requires_grad_()
    swav.swav_loss(list(s), list(q), (0, 1), 0.1).backward()
    assert s.grad is not None and q.grad is None


def _cfg(**kw):
    base = dict(num_prototypes=16, proj_hidden_dim=32, proj_dim=16, n_local_crops=2, epochs=10)
    return swav.Config(**{**base, **kw})


def test_forward_groups_views_and_gradients_reach_the_backbone():
    cfg = _cfg(freeze_prototypes_epochs=0)
    model = tiny_model(swav, cfg)
    batch = fixed_batch(swav, cfg, n=8)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(32, 32)] * 2 + [(16, 16)] * 2
    shapes = []
    model.backbone.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    out = model(batch)
    assert shapes == [(16, 3, 32, 32), (16, 3, 16, 16)]  # one call per resolution
    assert torch.isfinite(out["loss"]) and 0 < out["code_entropy"] <= math.log(16) + 1e-5
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.prototypes.weight.grad.abs().sum() > 0


def test_prototypes_frozen_in_the_first_epoch_and_renormalised():
    cfg = _cfg(weight_decay=1e-3)
    model = tiny_model(swav, cfg)
    opt = train.build_optimizer(model, cfg, 0.5)  # LARS
    batch = fixed_batch(swav, cfg, n=8)
    w0 = model.prototypes.weight.detach().clone()
    torch.testing.assert_close(w0.norm(dim=1), torch.ones(16))  # unit rows from the start
    for step in range(2):  # the first epoch: 10 epochs of 2 steps
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        assert torch.count_nonzero(model.prototypes.weight.grad) == 0
        opt.step()
        model.on_step_end(step + 1, 20)
    torch.testing.assert_close(model.prototypes.weight, w0, rtol=1e-5, atol=1e-6)  # directions unchanged
    assert not bool(model.prototypes_frozen)
    loss = model(batch)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.on_step_end(3, 20)
    w = model.prototypes.weight
    assert not torch.allclose(w, w0, atol=1e-5)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(16))


def test_queue_fills_from_its_epoch_and_joins_the_problem_once_full():
    cfg = _cfg(queue_length=16, epoch_queue_starts=1, freeze_prototypes_epochs=0)
    model = tiny_model(swav, cfg)
    batch = fixed_batch(swav, cfg, n=8)
    assert model.queue.shape == (16, 2, 16) and not bool(model.queue_on)
    model(batch)
    assert int(model.queue_filled) == 0 and model.queue.abs().sum() == 0  # epoch 0: no queue yet
    model.on_step_end(2, 20)  # epoch 1 starts at step 2 of 20
    assert bool(model.queue_on)
    for filled in (8, 16):
        out = model(batch)
        assert int(model.queue_filled) == filled and float(out["queue_used"]) == 0
    out = model(batch)
    assert float(out["queue_used"]) == 1
    # the queue holds the normalised embeddings of the assigned (global) views, newest last written
    model.eval()  # BN in eval mode, so that the embeddings can be recomputed
    with torch.no_grad():
        queue = model.queue.clone()
        z = [F.normalize(model.projector(model.backbone(v)), dim=1) for v in batch["views"][:2]]
        scores = [model.prototypes(zv) for zv in z]
        codes = [swav.sinkhorn(torch.cat([queue[:, j] @ model.prototypes.weight.T, scores[j]]), cfg.epsilon, 3)[-8:]
                 for j in range(2)]
        want = swav.swav_loss([model.prototypes(F.normalize(model.projector(model.backbone(v)), dim=1))
                               for v in batch["views"]], codes, (0, 1), cfg.temperature)
    got = model(batch)["loss"]
    torch.testing.assert_close(got, want)
    # the four forwards with the queue on wrote slots 0-7, 8-15, 0-7 and now 8-15 (a ring of 16)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue[8:, 0], z[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue[8:, 1], z[1], rtol=1e-5, atol=1e-6)


def test_sinkhorn_with_a_queue_is_the_problem_over_queue_and_batch():
    q_scores, b_scores = torch.randn(10, 4), torch.randn(6, 4)
    whole = swav.sinkhorn(torch.cat([q_scores, b_scores]), 0.05, 3)
    torch.testing.assert_close(whole[-6:].sum(1), torch.ones(6))
    assert not torch.allclose(whole[-6:], swav.sinkhorn(b_scores, 0.05, 3))  # the queue changes the codes


def test_view_recipe():
    cfg = swav.Config()
    pipes = swav.augmentations(cfg, 224)
    assert len(pipes) == 8
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert [tuple(c.scale) for c in crops] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    jitter = [t.transforms[0] for t in pipes[0].transforms if type(t).__name__ == "RandomApply"][0]
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))  # s = 1
    blur = [t for p in pipes for t in p.transforms
            if type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == "GaussianBlur"]
    assert [b.p for b in blur] == [0.5] * 8
    small = swav.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert views.plan_views(small, in_memory=True).mode == "device"
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in pipes[1:3]] == [(3, 224, 224), (3, 96, 96)]


def test_config_checks_and_preset():
    with pytest.raises(ValueError, match="crops_for_assign"):
        tiny_model(swav, _cfg(crops_for_assign=(0, 4)))  # 4 views: indices 0-3
    fields = {f.name for f in dataclasses.fields(swav.Config)}
    assert set(swav.PRESETS["small"]) <= fields


def test_assign_and_embed():
    cfg = _cfg()
    model = tiny_model(swav, cfg).eval()
    x = fixed_batch(swav, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (4,) and a.dtype == torch.long and bool(((0 <= a) & (a < 16)).all())


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(freeze_prototypes_epochs=0, epsilon=0.05)
    losses, model = smoke_fit(swav, cfg, steps=20, lr=0.3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(16))
