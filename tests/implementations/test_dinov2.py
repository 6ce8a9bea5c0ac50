"""DINOv2: the DINO, iBOT and KoLeo terms and Sinkhorn-Knopp against literal computations, their limits, the
block masks, what the student and the teacher see, the EMA teacher, parameter groups, the view recipe, the
ViT-only contract, a smoke fit."""

import dataclasses
import math
import random
import types

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, train, views

from .helpers import backbone_grad_norm, fixed_batch, load

dinov2 = load("dinov2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def _vit(image_size=32, patch=8, dim=16, depth=1):
    torch.manual_seed(0)
    cfg = backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2)
    return backbones.ViT(cfg)


def _cfg(**kw):
    base = dict(out_dim=32, proj_hidden_dim=32, proj_dim=16, ibot_out_dim=24, ibot_proj_hidden_dim=32,
                ibot_proj_dim=8, n_local_crops=2, epochs=10)
    return dinov2.Config(**{**base, **kw})


def _model(cfg, **vit):
    backbone = _vit(**vit)
    return dinov2.MODEL(backbone, backbone.feature_dim, cfg)


# --- literal computations ----------------------------------------------------------------------------


def _log_softmax(row, t):
    logits = [a / t for a in row]
    top = max(logits)
    log_z = top + math.log(sum(math.exp(a - top) for a in logits))
    return [a - log_z for a in logits]


def _h(p, row, t):
    return -sum(pk * lk for pk, lk in zip(p, _log_softmax(row, t)))


def sinkhorn_literal(scores, t, iterations):
    """Q[k][b] = exp(s_bk / t) / total, then rows to 1/K and columns to 1/B, n times; returns B Q^T."""
    b_, k_ = len(scores), len(scores[0])
    q = [[math.exp(scores[b][k] / t) for b in range(b_)] for k in range(k_)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k_ for v in row] for row in q]
        cols = [sum(q[k][b] for k in range(k_)) for b in range(b_)]
        q = [[q[k][b] / cols[b] / b_ for b in range(b_)] for k in range(k_)]
    return [[q[k][b] * b_ for k in range(k_)] for b in range(b_)]


@pytest.mark.parametrize("b,k,t,it", [(6, 4, 0.07, 3), (3, 9, 0.04, 3), (5, 5, 0.5, 1), (4, 7, 0.1, 10)])
def test_sinkhorn_knopp_matches_literal(b, k, t, it):
    scores = torch.randn(b, k, generator=torch.Generator().manual_seed(b * k), dtype=torch.float64)
    got = dinov2.sinkhorn_knopp(scores, t, it)
    want = torch.tensor(sinkhorn_literal(scores.tolist(), t, it), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sinkhorn_knopp_limits():
    scores = torch.randn(64, 16, dtype=torch.float64)
    q = dinov2.sinkhorn_knopp(scores, 0.1, 3)
    torch.testing.assert_close(q.sum(1), torch.ones(64, dtype=torch.float64))  # each target a distribution
    # a constant added to every score changes nothing (the maximum is subtracted; the total divides it out)
    torch.testing.assert_close(dinov2.sinkhorn_knopp(scores + 123.0, 0.1, 3), q)
    # the iterations drive every prototype's share of the batch to 1/K (equipartition); softmax does not
    skewed = scores + torch.linspace(0, 2, 16, dtype=torch.float64)  # prototype 15 favoured by every sample
    soft = F.softmax(skewed / 0.1, dim=1).mean(0)
    many = dinov2.sinkhorn_knopp(skewed, 0.1, 200).mean(0)
    torch.testing.assert_close(many, torch.full((16,), 1 / 16, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert soft.max() > 3 / 16 and dinov2.sinkhorn_knopp(skewed, 0.1, 3).mean(0).max() < soft.max()
    # a lower temperature sharpens each sample's target
    def entropy(p):
        return float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())

    assert entropy(dinov2.sinkhorn_knopp(scores, 0.04, 3)) < entropy(q)
    wide = scores.float() * 2  # scores / tau up to ~150: exp overflows float32 unless shifted
    assert not torch.isfinite(torch.exp(wide / 0.04)).all()
    got = dinov2.sinkhorn_knopp(wide, 0.04, 3)
    assert torch.isfinite(got).all() and torch.allclose(got.sum(1), torch.ones(64))
    assert torch.isfinite(dinov2.sinkhorn_knopp(scores.float() * 40, 0.04, 3)).all()  # underflow: no NaN


@pytest.mark.parametrize("v,n,k,ts", [(4, 3, 5, 0.1), (2, 2, 7, 0.1), (6, 4, 3, 0.5)])
def test_dino_cross_entropy_matches_literal(v, n, k, ts):
    g = torch.Generator().manual_seed(v * n * k)
    student = torch.randn(v, n, k, generator=g, dtype=torch.float64)
    teacher = F.softmax(torch.randn(2, n, k, generator=g, dtype=torch.float64) * 3, dim=-1)
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(v):
            if j != i:
                total += sum(_h(teacher[i, r].tolist(), student[j, r].tolist(), ts) for r in range(n)) / n
                pairs += 1
    got = dinov2.dino_cross_entropy(list(student), list(teacher), ts).item()
    assert got == pytest.approx(total / pairs, rel=1e-10)


def test_dino_cross_entropy_limits():
    n, k = 5, 8
    p = F.softmax(torch.randn(n, k, dtype=torch.float64) * 2, dim=-1)
    flat = [torch.zeros(n, k, dtype=torch.float64)] * 3  # a uniform student pays log K
    assert dinov2.dino_cross_entropy(flat, [p, p], 0.1).item() == pytest.approx(math.log(k), rel=1e-12)
    match = [p.log() * 0.1] * 3  # a student that reproduces the targets: their entropy, the minimum (Gibbs)
    best = dinov2.dino_cross_entropy(match, [p, p], 0.1).item()
    assert best == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-10)
    for seed in range(3):
        other = list(torch.randn(3, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        assert dinov2.dino_cross_entropy(other, [p, p], 0.1).item() > best


def test_ibot_loss_matches_literal():
    b, l_, k, ts = 4, 6, 5, 0.1
    masks = torch.tensor([[1, 0, 1, 1, 0, 0], [0] * 6, [0, 0, 0, 0, 0, 1], [1] * 6], dtype=torch.bool)
    p = int(masks.sum())
    student = torch.randn(p, k, dtype=torch.float64)
    teacher = F.softmax(torch.randn(p, k, dtype=torch.float64) * 3, dim=-1)
    total, row = 0.0, 0
    for c in range(b):  # each crop: the mean over its masked patches; crops without any add 0
        hs = []
        for i in range(l_):
            if masks[c, i]:
                hs.append(_h(teacher[row].tolist(), student[row].tolist(), ts))
                row += 1
        total += sum(hs) / max(1, len(hs))
    got = dinov2.ibot_loss(student, teacher, masks, ts).item()
    assert got == pytest.approx(total / b, rel=1e-10)
    assert dinov2.ibot_loss(student[:0], teacher[:0], torch.zeros(3, 6, dtype=torch.bool), ts).item() == 0


def koleo_literal(x, eps=1e-8):
    rows = [[v / max(math.sqrt(sum(a * a for a in r)), eps) for v in r] for r in x]
    total = 0.0
    for i, a in enumerate(rows):
        total += math.log(min(math.dist(a, b) for j, b in enumerate(rows) if j != i) + eps)
    return -total / len(rows)


@pytest.mark.parametrize("n,d", [(5, 3), (8, 16), (2, 4)])
def test_koleo_matches_literal(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d), dtype=torch.float64) * 3
    # the official pairwise distance adds eps (1e-8) to the difference: far below this tolerance
    assert dinov2.koleo_loss(x).item() == pytest.approx(koleo_literal(x.tolist()), rel=1e-6)


def test_koleo_limits_and_gradient():
    d = 6
    spread = torch.eye(d, dtype=torch.float64)  # orthonormal: every neighbour at sqrt(2)
    assert dinov2.koleo_loss(spread * 5).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    collapsed = torch.ones(4, d, dtype=torch.float64)  # identical features: -log(eps), a large penalty
    assert dinov2.koleo_loss(collapsed).item() > 15
    x = torch.randn(16, d, dtype=torch.float64, requires_grad=True)
    loss = dinov2.koleo_loss(x)
    loss.backward()
    with torch.no_grad():  # a small step down the gradient spreads the nearest neighbours
        assert dinov2.koleo_loss(x - 1e-2 * x.grad).item() < loss.item()


# --- masks ---------------------------------------------------------------------------------------------


def official_mask(rng, h, w, count, min_patches=4, max_patches=32, min_aspect=0.3):
    """The official MaskingGenerator, with Python's random (dinov2/data/masking.py), as a (h, w) bool tensor."""
    mask = [[False] * w for _ in range(h)]
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    done = 0
    while done < count:
        budget, delta = min(count - done, max_patches), 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = sum(not mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                if 0 < new <= budget:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            mask[i][j] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        done += delta
    return torch.tensor(mask)


def _stats(masks):
    """Mean masked patches and mean bounding-box area of (B, h, w) masks."""
    rows, cols = masks.any(2).double(), masks.any(1).double()
    extent = [(r.nonzero().max() - r.nonzero().min() + 1) * (c.nonzero().max() - c.nonzero().min() + 1)
              for r, c in zip(rows, cols)]
    return masks.sum(dim=(1, 2)).double().mean().item(), torch.stack(extent).double().mean().item()


def test_block_masks_follow_the_official_generator():
    counts = torch.tensor([6, 12, 20, 32] * 2000)
    masks = dinov2.block_masks(counts, 8, 8, 4, 32, 0.3)  # (8000, 8, 8)
    got = masks.sum(dim=(1, 2))
    assert (got <= counts).all() and (got > 0).all()
    rng = random.Random(0)
    for c in (6, 12, 20, 32):  # patches masked and the blocks' extent, as the official code's (2000 masks each)
        official = torch.stack([official_mask(rng, 8, 8, c) for _ in range(2000)])
        (n_ours, box_ours), (n_official, box_official) = _stats(masks[counts == c]), _stats(official)
        assert n_ours == pytest.approx(n_official, rel=0.02) and box_ours == pytest.approx(box_official, rel=0.05)
    assert not dinov2.block_masks(torch.zeros(3, dtype=torch.long), 8, 8, 4, 32, 0.3).any()


def test_mask_counts_spread_the_ratios_over_half_the_crops():
    counts = dinov2.mask_counts(40, 64, 0.5, (0.1, 0.5))
    masked = counts[counts > 0]
    assert len(masked) == 20 and masked.min() >= int(0.1 * 64) and masked.max() <= 32
    bins = (torch.sort(masked).values.double() / 64 - 0.1) / (0.4 / 20)  # one ratio per bin of 0.02
    assert (bins.floor() <= torch.arange(20)).all() and (torch.arange(20) <= bins.ceil()).all()
    assert counts[:20].gt(0).sum() not in (0, 20)  # the masked crops are shuffled


def test_masks_are_drawn_for_the_global_batch(monkeypatch):
    """Rank 1 of 2 with 4 images keeps what one process with all 8 images draws for images 4-7."""
    model = _model(_cfg())
    torch.manual_seed(5)
    whole = model.draw_masks(2, 8, 16).view(2, 8, 16)
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 get_world_size=lambda: 2, get_rank=lambda: 1)
    monkeypatch.setattr(dinov2, "dist", fake)
    torch.manual_seed(5)
    mine = model.draw_masks(2, 4, 16).view(2, 4, 16)
    assert torch.equal(mine, whole[:, 4:]) and whole.any()


# --- the model -----------------------------------------------------------------------------------------


def test_vit_tokens_and_the_mask_token():
    vit = _vit().eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(dinov2.vit_tokens(vit, x), vit.forward_tokens(x))
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, 5] = True  # patch 5: row 1, column 1 of the 4x4 grid of 8-px patches
    token = torch.randn(1, 16)
    out = dinov2.vit_tokens(vit, x, mask, token)
    y = x.clone()
    y[:, :, 8:16, 8:16] += 1.0  # the pixels of the masked patch do not matter
    torch.testing.assert_close(dinov2.vit_tokens(vit, y, mask, token), out)
    z = x.clone()
    z[:, :, 0:8, 0:8] += 1.0  # those of a visible patch do
    assert not torch.allclose(dinov2.vit_tokens(vit, z, mask, token), out)
    with pytest.raises(ValueError, match="position embeddings for 16"):
        dinov2.vit_tokens(vit, torch.randn(1, 3, 16, 16))


def test_vit_only_with_a_one_line_error():
    cnn = backbones.SmallCNN(width=8)
    model = dinov2.MODEL(cnn, cnn.feature_dim, _cfg())  # constructs; setup (the harness) and forward refuse
    with pytest.raises(ValueError) as err:
        model.setup(64, 10)
    assert "--backbone vit_tiny" in str(err.value) and "\n" not in str(err.value)
    _model(_cfg()).setup(64, 10)


def test_what_student_and_teacher_see_and_where_gradients_go():
    cfg = _cfg()
    model = _model(cfg)
    batch = fixed_batch(dinov2, cfg, n=8)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(32, 32)] * 2 + [(16, 16)] * 2
    calls = {"student": [], "teacher": []}
    for name, shapes in calls.items():
        hook = lambda m, i, o, shapes=shapes: shapes.append(tuple(i[0].shape))  # noqa: E731
        getattr(model, name)["backbone"].patch_embed.register_forward_hook(hook)
    out = model(batch)
    assert calls["teacher"] == [(16, 3, 32, 32)]  # the two global crops only
    assert calls["student"] == [(16, 3, 32, 32), (16, 3, 16, 16)]  # globals (masked), then the local crops
    assert 0 < out["masked_fraction"] < 0.5 and 0 < out["teacher_entropy"] <= math.log(cfg.out_dim) + 1e-4
    parts = out["dino_loss"] + out["ibot_loss"] + cfg.koleo_loss_weight * out["koleo_loss"]
    torch.testing.assert_close(out["loss"].detach(), parts)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert model.mask_token.grad.abs().sum() > 0
    for head in ("dino_head", "ibot_head"):
        assert model.student[head].mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_separate_heads_sized_by_their_fields():
    model = _model(_cfg())
    dino_head, ibot_head = model.student["dino_head"], model.student["ibot_head"]
    assert dino_head.last_layer.weight.shape == (32, 16) and ibot_head.last_layer.weight.shape == (24, 8)
    assert not {id(p) for p in dino_head.parameters()} & {id(p) for p in ibot_head.parameters()}
    g = dino_head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones(32, 1))  # official DINOv2: norms 1, learnable


def test_no_masks_leaves_only_dino_and_koleo():
    cfg = _cfg(mask_sample_probability=0.0)
    model = _model(cfg)
    out = model(fixed_batch(dinov2, cfg, n=4))
    assert out["ibot_loss"] == 0 and out["masked_fraction"] == 0 and torch.isfinite(out["loss"])


def test_teacher_and_temperature_change_by_their_rules():
    cfg = _cfg(momentum_teacher=0.9, warmup_teacher_temp_epochs=5)
    model = _model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    loss = model(fixed_batch(dinov2, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher0, model.teacher.parameters()))  # no optimizer step
    student = [p.detach().clone() for p in model.student.parameters()]
    model.on_step_end(1, 10)
    tau = dinov2.ema_rate(1, 10, 0.9)
    for old, new, s in zip(teacher0, model.teacher.parameters(), student):
        torch.testing.assert_close(new, tau * old + (1 - tau) * s)
    assert float(model.teacher_temp) == pytest.approx(0.04 + 0.03 * 1 / 5)  # 5 of 10 epochs: 1/5 of the way
    model.on_step_end(5, 10)
    assert float(model.teacher_temp) == pytest.approx(0.07) and model.momentum == pytest.approx(0.95)
    assert dinov2.ema_rate(0, 100, 0.994) == pytest.approx(0.994) and dinov2.ema_rate(100, 100, 0.994) == 1


def test_param_groups():
    cfg = _cfg(weight_decay=0.04, freeze_last_layer=1, patch_embed_lr_mult=0.2)
    model = _model(cfg)
    groups = model.param_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["weight_decay"] == (0.04 if p.ndim > 1 else 0.0), name
            assert g.get("frozen_epochs", 0) == (1 if ".last_layer." in name else 0), name
            assert g.get("lr_scale", 1.0) == (0.2 if "patch_embed" in name else 1.0), name
    assert any("frozen_epochs" in g for g in groups) and any("lr_scale" in g for g in groups)
    assert isinstance(train.build_optimizer(model, cfg, 1e-3), torch.optim.AdamW)


def test_view_recipe():
    cfg = dinov2.Config()
    pipes = dinov2.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipes) == 2 + cfg.n_local_crops
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 8
    assert [tuple(c.scale) for c in crops] == [(0.32, 1.0)] * 2 + [(0.05, 0.32)] * 8
    assert views.plan_views(pipes, in_memory=True).mode == "device"
    big = dinov2.augmentations(cfg, 224)

    def probs(p, name):
        return [t.p for t in p.transforms if type(t).__name__ == name or
                (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]

    assert [dinov2.local_crop_side(cfg, 224), dinov2.local_crop_side(cfg, 32)] == [96, 16]
    assert [probs(p, "GaussianBlur") for p in big] == [[1.0], [0.1]] + [[0.5]] * 8
    assert [probs(p, "RandomSolarize") for p in big] == [[], [0.2]] + [[]] * 8
    assert all(probs(p, "GaussianBlur") == [] for p in pipes)  # no blur below 64 px


def test_small_preset_names_config_fields():
    fields = {f.name for f in dataclasses.fields(dinov2.Config)}
    assert set(dinov2.PRESETS["small"]) <= fields
    cfg = dataclasses.replace(dinov2.Config(), **dinov2.PRESETS["small"])
    assert cfg.epochs == 15 and cfg.out_dim < dinov2.Config().out_dim


def test_embed_is_the_teachers_cls_token():
    model = _model(_cfg())
    x = torch.randn(4, 3, 32, 32)
    assert model.embed(x).shape == (4, 16)
    torch.testing.assert_close(model.embed(x), model.backbone(x))  # identical at initialisation
    with torch.no_grad():
        next(model.student.parameters()).add_(1.0)
    torch.testing.assert_close(model.embed(x), model.teacher["backbone"](x))
    assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, 16)  # other sizes: resized embeddings


def test_smoke_fit_with_a_vit():
    cfg = _cfg(out_dim=256, ibot_out_dim=256, warmup_teacher_temp_epochs=0, teacher_temp=0.07,
               momentum_teacher=0.99)
    model = _model(cfg, patch=4)
    batch = train.prepare_batch(fixed_batch(dinov2, cfg, n=16), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.on_step_end(step + 1, 12)
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
