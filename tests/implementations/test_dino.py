"""DINO: the multi-crop cross-entropy against a literal computation, its limits, centre, schedules, the
frozen last layer, the EMA teacher, multi-crop grouping, the view recipe, ViT local crops, smoke fits."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

dino = load("dino")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def dino_literal(student, teacher, center, ts: float, tt: float) -> float:
    """Eq. 3 with loops: teacher view i against every student view v != i, H averaged over the batch,
    then over the pairs; the softmaxes of Eq. 1 written out with math.exp."""
    total, pairs = 0.0, 0
    for i, t_view in enumerate(teacher.tolist()):
        for v, s_view in enumerate(student.tolist()):
            if v == i:
                continue
            h = 0.0
            for t_row, s_row in zip(t_view, s_view):
                t_logits = [(a - c) / tt for a, c in zip(t_row, center.tolist())]
                top = max(t_logits)
                exp_t = [math.exp(a - top) for a in t_logits]
                p_t = [e / sum(exp_t) for e in exp_t]
                s_logits = [a / ts for a in s_row]
                top = max(s_logits)
                log_z = top + math.log(sum(math.exp(a - top) for a in s_logits))
                h += -sum(p * (a - log_z) for p, a in zip(p_t, s_logits))
            total += h / len(t_view)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("v,n,k,ts,tt", [(4, 3, 5, 0.1, 0.04), (2, 2, 7, 0.1, 0.07), (6, 4, 3, 0.5, 0.2)])
def test_loss_matches_equation(v, n, k, ts, tt):
    g = torch.Generator().manual_seed(v * n * k)
    student = torch.randn(v, n, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, n, k, generator=g, dtype=torch.float64)
    center = torch.randn(k, generator=g, dtype=torch.float64)
    got = dino.dino_loss(list(student), list(teacher), center, ts, tt).item()
    assert got == pytest.approx(dino_literal(student, teacher, center, ts, tt), rel=1e-10)


def test_two_views_is_algorithm_1():
    """Without local crops: H(t1, s2)/2 + H(t2, s1)/2 (Algorithm 1)."""
    s1, s2, t1, t2 = (torch.randn(5, 6, dtype=torch.float64) for _ in range(4))
    c = torch.zeros(6, dtype=torch.float64)
    def h(t, s):
        return float(-(F.softmax(t / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean())

    got = dino.dino_loss([s1, s2], [t1, t2], c, 0.1, 0.04).item()
    assert got == pytest.approx(h(t1, s2) / 2 + h(t2, s1) / 2, rel=1e-12)


def test_limits():
    n, k, ts, tt = 6, 8, 0.1, 0.04
    t = torch.randn(2, n, k, dtype=torch.float64)
    c = torch.randn(k, dtype=torch.float64)
    # a uniform student (constant scores) pays log K whatever the teacher says
    flat = [torch.zeros(n, k, dtype=torch.float64)] * 4
    assert dino.dino_loss(flat, list(t), c, ts, tt).item() == pytest.approx(math.log(k), rel=1e-12)
    # identical global views and a student that reproduces P_t: the minimum, the teacher's entropy (Gibbs)
    same = [t[0], t[0]]
    match = [(t[0] - c) / tt * ts] * 3
    p_t = F.softmax((t[0] - c) / tt, dim=-1)
    entropy = float(-(p_t * p_t.log()).sum(-1).mean())
    best = dino.dino_loss(match, same, c, ts, tt).item()
    assert best == pytest.approx(entropy, rel=1e-10)
    for seed in range(3):
        other = list(torch.randn(3, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        assert dino.dino_loss(other, same, c, ts, tt).item() > best
    # a teacher that collapsed onto its centre gives P_t uniform: then every student pays >= log K
    collapsed = [c.expand(n, k)] * 2
    student = list(torch.randn(3, n, k, dtype=torch.float64))
    assert dino.dino_loss(student, collapsed, c, ts, tt).item() >= math.log(k)


def test_centering_and_shift_invariance():
    s, t = list(torch.randn(4, 3, 5, dtype=torch.float64)), list(torch.randn(2, 3, 5, dtype=torch.float64))
    c = torch.randn(5, dtype=torch.float64)
    base = dino.dino_loss(s, t, c, 0.1, 0.05).item()
    shift = torch.randn(5, dtype=torch.float64)  # one vector added to the teacher's scores and the centre
    shifted = dino.dino_loss(s, [x + shift for x in t], c + shift, 0.1, 0.05).item()
    assert shifted == pytest.approx(base, rel=1e-10)
    row = torch.randn(3, 1, dtype=torch.float64)  # a per-sample constant changes no softmax
    per_sample = dino.dino_loss([x + row for x in s], [x + row for x in t], c, 0.1, 0.05).item()
    assert per_sample == pytest.approx(base, rel=1e-10)


def test_no_gradient_into_teacher_scores():
    s = torch.randn(3, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, requires_grad=True)
    dino.dino_loss(list(s), list(t), torch.zeros(6), 0.1, 0.04).backward()
    assert s.grad is not None and t.grad is None


def test_batch_center_and_schedules():
    x = torch.randn(10, 7, dtype=torch.float64)
    torch.testing.assert_close(dino.batch_center(x), x.float().mean(0))
    cfg = dino.Config(epochs=10, warmup_teacher_temp_epochs=3)  # warm-up: 30% of the run
    assert dino.teacher_temperature(0, 100, cfg) == pytest.approx(0.04)
    assert dino.teacher_temperature(15, 100, cfg) == pytest.approx(0.055)
    assert dino.teacher_temperature(30, 100, cfg) == pytest.approx(0.07)
    assert dino.teacher_temperature(99, 100, cfg) == pytest.approx(0.07)
    assert dino.teacher_temperature(0, 100, dataclasses.replace(cfg, warmup_teacher_temp_epochs=0)) == 0.07
    assert dino.ema_rate(0, 100, 0.996) == pytest.approx(0.996)
    assert dino.ema_rate(100, 100, 0.996) == pytest.approx(1)


def _cfg(**kw):
    base = dict(out_dim=32, proj_hidden_dim=32, proj_dim=16, n_local_crops=2, epochs=10)
    return dino.Config(**{**base, **kw})


def test_head_shape_and_fixed_norms():
    cfg = _cfg()
    head = dino.DINOHead(20, cfg)
    out = head(torch.randn(5, 20))
    assert out.shape == (5, 32)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(32, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))  # rows of unit norm
    free = dino.DINOHead(20, _cfg(norm_last_layer=False))
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_student_groups_views_by_resolution_and_teacher_sees_globals_only():
    cfg = _cfg()
    model = tiny_model(dino, cfg)
    batch = fixed_batch(dino, cfg, n=8)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(32, 32)] * 2 + [(16, 16)] * 2
    calls = {"student": [], "teacher": []}
    for name, shapes in calls.items():
        hook = lambda m, i, o, shapes=shapes: shapes.append(tuple(i[0].shape))  # noqa: E731
        getattr(model, name).backbone.register_forward_hook(hook)
    out = model(batch)
    assert calls["student"] == [(16, 3, 32, 32), (16, 3, 16, 16)]  # one call per resolution
    assert calls["teacher"] == [(16, 3, 32, 32)]  # the two global crops only
    assert torch.isfinite(out["loss"]) and 0 < out["teacher_entropy"] <= math.log(cfg.out_dim) + 1e-4


def test_gradients_reach_student_not_teacher_and_last_layer_freezes():
    cfg = _cfg()
    model = tiny_model(dino, cfg)
    batch = fixed_batch(dino, cfg, n=8)
    v = model.student.head.last_layer.parametrizations.weight.original1
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert bool(model.last_layer_frozen) and torch.count_nonzero(v.grad) == 0  # frozen in the first epoch
    assert model.student.head.mlp[0].weight.grad.abs().sum() > 0
    model.on_step_end(2, 20)  # past the first epoch (10 epochs of 2 steps)
    assert not bool(model.last_layer_frozen)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert v.grad.abs().sum() > 0


def test_frozen_last_layer_keeps_its_weights_under_adamw_with_weight_decay():
    from selfsup import train

    cfg = _cfg(weight_decay=0.5)
    model = tiny_model(dino, cfg)
    opt = train.build_optimizer(model, cfg, 1e-2)
    batch = fixed_batch(dino, cfg, n=8)
    w0 = model.student.head.last_layer.weight.detach().clone()
    mlp0 = model.student.head.mlp[0].weight.detach().clone()
    for step in range(2):  # the first epoch
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 20)
    torch.testing.assert_close(model.student.head.last_layer.weight, w0, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.student.head.mlp[0].weight, mlp0)
    loss = model(batch)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.allclose(model.student.head.last_layer.weight, w0, rtol=1e-5, atol=1e-6)


def test_teacher_centre_and_temperature_change_by_their_rules():
    cfg = _cfg(momentum_teacher=0.9, center_momentum=0.8, warmup_teacher_temp_epochs=5)
    model = tiny_model(dino, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fixed_batch(dino, cfg, n=8)
    model.center.normal_()
    c0 = model.center.clone()
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    loss = model(batch)["loss"]
    with torch.no_grad():
        want_mean = torch.cat(model.teacher(batch["views"][:2])).mean(0)  # Algorithm 1: cat([t1, t2]).mean(0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher0, model.teacher.parameters()))  # no optimizer step
    torch.testing.assert_close(model.center, c0)  # the centre moves after the step, not in the forward
    student = [p.detach().clone() for p in model.student.parameters()]
    model.on_step_end(1, 10)
    tau = dino.ema_rate(1, 10, 0.9)
    for old, new, s in zip(teacher0, model.teacher.parameters(), student):
        torch.testing.assert_close(new, tau * old + (1 - tau) * s)
    torch.testing.assert_close(model.center, 0.8 * c0 + 0.2 * want_mean)  # Eq. 4
    assert float(model.teacher_temp) == pytest.approx(dino.teacher_temperature(1, 10, cfg))
    assert {"center", "teacher_temp", "last_layer_frozen"} <= set(dict(model.named_buffers()))


def test_teacher_keeps_its_own_bn_statistics():
    """Parameters follow the student; the teacher's BN statistics come from its own passes on the globals."""
    cfg = _cfg()
    model = tiny_model(dino, cfg)
    batch = fixed_batch(dino, cfg, n=8)
    reference = copy.deepcopy(model.teacher.backbone).train()
    with torch.no_grad():
        reference(torch.cat(batch["views"][:2]))  # the teacher's forward: both global crops, in train mode
    model(batch)["loss"].backward()
    model.on_step_end(1, 10)
    bn = [n for n, _ in model.teacher.backbone.named_buffers() if n.endswith("running_mean")]
    assert bn
    own, ref = dict(model.teacher.backbone.named_buffers()), dict(reference.named_buffers())
    student = dict(model.student.backbone.named_buffers())
    for name in bn:
        torch.testing.assert_close(own[name], ref[name])
        assert not torch.allclose(own[name], student[name])  # the student's also saw the 16-px local crops


def test_view_recipe():
    cfg = dino.Config()
    pipes = dino.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipes) == 2 + cfg.n_local_crops
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 8
    assert [tuple(c.scale) for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    assert views.plan_views(pipes, in_memory=True).mode == "device"
    big = dino.augmentations(cfg, 224)

    def probs(p, name):
        return [t.p for t in p.transforms if type(t).__name__ == name or
                (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]

    assert [dino.local_crop_size(cfg, 224), dino.local_crop_size(cfg, 32)] == [96, 16]
    assert [probs(p, "GaussianBlur") for p in big] == [[1.0], [0.1]] + [[0.5]] * 8  # BYOL's T, T', then local
    assert [probs(p, "RandomSolarize") for p in big] == [[], [0.2]] + [[]] * 8
    assert all(probs(p, "GaussianBlur") == [] for p in pipes)  # no blur below 64 px
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in big[1:3]] == [(3, 224, 224), (3, 96, 96)]


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(dino.Config)}
    assert set(dino.PRESETS["small"]) <= fields
    cfg = dataclasses.replace(dino.Config(), **dino.PRESETS["small"])
    assert cfg.epochs == 15 and cfg.n_local_crops < dino.Config().n_local_crops


def test_embed_is_the_teachers_backbone():
    cfg = _cfg()
    model = tiny_model(dino, cfg)
    x = fixed_batch(dino, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, model.backbone.feature_dim)
    torch.testing.assert_close(model.embed(x), model.backbone(x))  # identical at initialisation
    with torch.no_grad():
        next(model.student.backbone.parameters()).add_(1.0)
    torch.testing.assert_close(model.embed(x), model.teacher.backbone(x))


def _tiny_vit():
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2))


def test_vit_local_crops_use_resized_position_embeddings():
    vit = _tiny_vit().eval()
    x32, x16 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(dino.encode(vit, x32), vit(x32))  # its own size: the backbone as it is
    # a 16-px crop: the same network as one built for a 2x2 grid with the 4x4 embeddings resized bicubically
    small = copy.deepcopy(vit)
    grid = vit.pos_embed.T.reshape(1, 16, 4, 4)
    small.pos_embed = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).reshape(16, 4).T
    torch.testing.assert_close(dino.encode(vit, x16), small(x16))


# a constant teacher temperature, BN in the head (as the small preset): on one fixed batch, without it, the
# teacher's scores start nearly alike for every image and centering soon leaves P_t uniform (loss log K)
SMOKE = _cfg(out_dim=256, use_bn_in_head=True, warmup_teacher_temp_epochs=0, teacher_temp=0.04,
             momentum_teacher=0.99, freeze_last_layer=0)


def test_smoke_fit_lowers_the_loss():
    losses, model = smoke_fit(dino, SMOKE, steps=12, lr=2e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert model.center.abs().sum() > 0 and model.momentum > 0.99


def test_smoke_fit_with_a_vit():
    from selfsup import train

    vit = _tiny_vit()
    model = dino.MODEL(vit, vit.feature_dim, SMOKE)
    batch = train.prepare_batch(fixed_batch(dino, SMOKE, n=16), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, SMOKE, 2e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 12)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
