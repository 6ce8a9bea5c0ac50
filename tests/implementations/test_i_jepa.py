"""I-JEPA: the multi-block masks (sizes, placement, context less targets, min_keep, batch truncation, seeding),
the layer-normalised targets and Eq. (1) against literal computations, the predictor's mask tokens, what the
context and target encoders see, the EMA target and its schedule, gradients, the paper's Config, the view
recipe, the ViT-only contract, a smoke fit."""

import dataclasses
import math

import pytest
import torch
from torchvision.transforms import v2

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

ijepa = load("i-jepa")

SMALL = dict(min_keep=4, pred_dim=16, pred_depth=1, pred_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=32, patch=4, dim=16, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    vit = _vit()
    return ijepa.MODEL(vit, vit.feature_dim, ijepa.Config(**{**SMALL, **kw}))


def _grid_rc(idx, grid):
    return [divmod(int(i), grid) for i in idx]


# --- masks ------------------------------------------------------------------------------------------


def test_block_size_is_the_official_rule():
    # 16 x 16 grid (ViT-H/14 at 224 px): scale 0.15 + 0.5 * 0.05 = 0.175 -> int(44.8) = 44 patches at most
    a = 0.75 + 0.25 * 0.75  # aspect 0.9375
    want = (round(math.sqrt(44 * a)), round(math.sqrt(44 / a)))
    assert ijepa.block_size(16, (0.15, 0.2), (0.75, 1.5), 0.5, 0.25) == want == (6, 7)
    # a context block of scale 1 would cover the grid: cut to grid - 1 on both sides (official while loops)
    assert ijepa.block_size(16, (0.85, 1.0), (1.0, 1.0), 0.999999, 0.3) == (15, 15)
    assert ijepa.block_size(8, (0.85, 1.0), (1.0, 1.0), 0.0, 0.0) == (7, 7)  # int(54.4) = 54 -> 7 x 7


@pytest.mark.parametrize("n,grid,m,min_keep", [(5, 8, 4, 4), (3, 16, 4, 10), (4, 8, 2, 4)])
def test_multiblock_masks(n, grid, m, min_keep):
    cfg = ijepa.Config(num_targets=m, min_keep=min_keep)
    gen = torch.Generator().manual_seed(3)
    context, targets = ijepa.multiblock_masks(n, grid, cfg, generator=gen)
    assert context.dtype == targets.dtype == torch.long
    assert targets.shape[:2] == (m, n) and context.shape[0] == n
    k = targets.shape[2]
    assert min_keep < k <= 0.2 * grid * grid + 1  # one size for every block of the batch
    shapes = set()
    for i in range(m):
        for b in range(n):
            rc = _grid_rc(targets[i, b], grid)
            rows, cols = sorted({r for r, _ in rc}), sorted({c for _, c in rc})
            assert rc == [(r, c) for r in rows for c in cols]  # a full rectangle, row-major
            assert rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))
            shapes.add((len(rows), len(cols)))
    assert len(shapes) == 1  # same block shape across the batch
    h, w = shapes.pop()
    assert 0.75 * 0.8 < h / w < 1.5 * 1.25 and h < grid and w < grid  # aspect in range (up to rounding)
    for b in range(n):
        ctx = context[b].tolist()
        assert ctx == sorted(set(ctx)) and len(ctx) > min_keep  # distinct, increasing, more than min_keep
        if m == 2:  # 49 - 2 * 12 > 4 on an 8 x 8 grid: the constraint is never released, no overlap at all
            assert not set(ctx) & set(targets[:, b].flatten().tolist())
        rows, cols = zip(*_grid_rc(ctx, grid))
        assert max(rows) - min(rows) < grid - 1 and max(cols) - min(cols) < grid - 1  # inside one block < grid


def test_context_is_the_context_block_less_the_targets():
    """Before the cut to a common count: a square block, exactly the patches of it outside every target."""
    gen = torch.Generator().manual_seed(0)
    ctx, targets = ijepa.sample_masks(6, 8, num_targets=2, min_keep=4, generator=gen)
    assert ctx.shape == (6, 64) and ctx.dtype == torch.bool
    for b in range(6):
        covered = set(targets[:, b].flatten().tolist())
        inside = set(torch.nonzero(ctx[b]).flatten().tolist())
        # the 7 x 7 context block (scale >= 0.85 of 64 -> 54 patches -> 7 x 7) is the bounding box of the context
        # together with the target patches it lost
        assert not inside & covered
        rows, cols = zip(*_grid_rc(inside, 8))
        box = {r * 8 + c for r in range(min(rows), min(rows) + 7) for c in range(min(cols), min(cols) + 7)}
        if max(rows) - min(rows) == 6 and max(cols) - min(cols) == 6:  # the box is pinned down by the context
            assert inside == box - covered


def test_keep_indices_cuts_to_the_smallest_count():
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = ijepa.keep_indices(mask)
    assert keep.tolist() == [[0, 2], [1, 2], [0, 1]]  # each row's first two True positions, in order


def test_masks_are_seeded_and_vary():
    cfg = ijepa.Config(min_keep=4)
    a = ijepa.multiblock_masks(8, 8, cfg, generator=torch.Generator().manual_seed(1))
    b = ijepa.multiblock_masks(8, 8, cfg, generator=torch.Generator().manual_seed(1))
    c = ijepa.multiblock_masks(8, 8, cfg, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    # positions are drawn per image and per block, over every placement (the last row and column too)
    _, targets = ijepa.multiblock_masks(256, 8, cfg, generator=torch.Generator().manual_seed(0))
    rows, cols = zip(*_grid_rc(targets[0, 0], 8))
    h, w = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
    placements = {tuple(t.tolist()) for t in targets.reshape(-1, targets.shape[2])}
    assert len(placements) == (8 - h + 1) * (8 - w + 1)
    assert len({tuple(t.tolist()) for t in targets[:, 0]}) > 1  # the blocks of one image differ


def test_the_constraint_is_released_when_the_context_would_be_too_small():
    """Four 2 x 2 targets on a 4 x 4 grid often leave a 3 x 3 context block no more than min_keep = 3 patches:
    after 20 failed draws the last target block stops constraining it, then the one before (official
    ``tries``). Each context is a 3 x 3 block less the first L target blocks, for some L, with more than
    min_keep patches; here some contexts needed L < M."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    ctx, targets = ijepa.sample_masks(n, 4, num_targets=4, target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
                                      context_scale=(1.0, 1.0), min_keep=3, generator=gen)
    assert targets.shape == (4, n, 4) and (ctx.sum(1) > 3).all()  # 2 x 2 targets; a 3 x 3 context block
    levels = []
    for b in range(n):
        inside = set(torch.nonzero(ctx[b]).flatten().tolist())
        blocks = [set(targets[i, b].tolist()) for i in range(4)]
        fits = [(level, top, left) for level in range(4, -1, -1) for top in range(2) for left in range(2)
                if inside == {r * 4 + c for r in range(top, top + 3) for c in range(left, left + 3)}
                - set().union(*blocks[:level])]
        assert fits, f"image {b}: the context is no 3 x 3 block less its first target blocks"
        levels.append(fits[0][0])  # the most constraints that explain it
    assert min(levels) < 4 and max(levels) == 4


def test_too_small_target_blocks_are_refused():
    with pytest.raises(ValueError, match="min_keep"):
        ijepa.multiblock_masks(2, 8, ijepa.Config(min_keep=12))  # 9-12 patches on an 8 x 8 grid
    with pytest.raises(ValueError, match="min_keep"):
        ijepa.MODEL(_vit(), 16, ijepa.Config(pred_dim=16, pred_depth=1))  # the paper's 10, found at construction


def test_sincos_is_the_encoders():
    torch.testing.assert_close(ijepa.sincos_2d(4, 16), backbones.sincos_2d(4, 16))


# --- targets and loss ---------------------------------------------------------------------------------


def test_targets_are_layer_normed_then_selected():
    g = torch.Generator().manual_seed(0)
    h = 3 * torch.randn(2, 9, 6, generator=g, dtype=torch.float64) + 1
    targets = torch.tensor([[[0, 1, 3], [4, 5, 8]], [[2, 6, 7], [1, 2, 3]]])  # (M=2, N=2, K=3)
    got = ijepa.target_tokens(h, targets)  # (M*N, K, D)
    assert got.shape == (4, 3, 6)
    for i in range(2):
        for n in range(2):
            for j, patch in enumerate(targets[i, n].tolist()):
                v = h[n, patch].tolist()
                mean = sum(v) / len(v)
                var = sum((a - mean) ** 2 for a in v) / len(v)  # biased, eps 1e-5 (F.layer_norm)
                want = [(a - mean) / math.sqrt(var + 1e-5) for a in v]
                assert got[i * 2 + n, j].tolist() == pytest.approx(want, rel=1e-10)


def loss_literal(pred, target, kind):
    total, count = 0.0, 0
    for row_p, row_t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        d = row_p - row_t
        total += d * d if kind == "mse" else (0.5 * d * d if abs(d) < 1 else abs(d) - 0.5)
        count += 1
    return total / count


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
@pytest.mark.parametrize("shape", [(8, 3, 4), (2, 5, 6)])
def test_loss_matches_literal_computation(kind, shape):
    g = torch.Generator().manual_seed(sum(shape))
    pred = torch.randn(*shape, generator=g, dtype=torch.float64)
    target = 2 * torch.randn(*shape, generator=g, dtype=torch.float64)
    assert ijepa.ijepa_loss(pred, target, kind).item() == pytest.approx(loss_literal(pred, target, kind), rel=1e-12)


def test_loss_is_eq1_up_to_its_normalisation():
    """(1/M) sum_i sum_{j in B_i} ||s_hat - s||^2 per image, averaged over images, over |B| D."""
    m, n, k, d = 4, 3, 5, 6
    pred, target = torch.randn(m * n, k, d, dtype=torch.float64), torch.randn(m * n, k, d, dtype=torch.float64)
    eq1 = 0.0
    for b in range(n):
        eq1 += sum(float(((pred[i * n + b, j] - target[i * n + b, j]) ** 2).sum()) for i in range(m) for j in range(k)) / m
    assert ijepa.ijepa_loss(pred, target).item() == pytest.approx(eq1 / n / (k * d), rel=1e-12)
    assert ijepa.ijepa_loss(target, target).item() == 0.0
    with pytest.raises(ValueError, match="unknown loss"):
        ijepa.ijepa_loss(pred, target, "l1")


# --- model ----------------------------------------------------------------------------------------


def test_predictor_mask_tokens_carry_the_target_positions():
    """With no blocks each prediction depends on its own mask token + position only; the context repeats per
    block, block-major."""
    pred = ijepa.Predictor(in_dim=8, grid=4, dim=8, depth=0, heads=2)
    tokens = torch.randn(2, 5, 8)
    context = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    targets = torch.tensor([[[8, 9], [10, 11]], [[12, 13], [14, 15]], [[8, 15], [9, 9]]])  # (M=3, N=2, K=2)
    out = pred(tokens, context, targets)
    assert out.shape == (6, 2, 8)
    for i in range(3):
        for n in range(2):
            for j, patch in enumerate(targets[i, n].tolist()):
                want = pred.proj(pred.norm(pred.mask_token[0, 0] + pred.pos_embed[patch]))
                torch.testing.assert_close(out[i * 2 + n, j], want)
    assert not pred.pos_embed.requires_grad and "pos_embed" not in pred.state_dict()
    deep = ijepa.Predictor(in_dim=8, grid=4, dim=8, depth=1, heads=2)
    a, b = deep(tokens, context, targets), deep(tokens + 1, context, targets)
    assert not torch.allclose(a, b)  # with a block the context informs the prediction


def test_encoders_see_what_they_should(monkeypatch):
    """The context encoder sees only the context patches; the target encoder the whole image; no CLS token."""
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    context, targets = ijepa.multiblock_masks(2, 8, model.cfg, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ijepa, "multiblock_masks", lambda *a, **k: (context, targets))
    tokens = ijepa.vit_patch_tokens(model.backbone, x, context)
    assert tokens.shape == (2, context.shape[1], 16)
    outside = sorted(set(range(64)) - set(context[0].tolist()))
    patch = outside[0]
    y = x.clone()
    i, j = divmod(patch, 8)
    y[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] += torch.randn(3, 4, 4)
    torch.testing.assert_close(ijepa.vit_patch_tokens(model.backbone, y, context), tokens)  # context unchanged
    full_x, full_y = ijepa.vit_patch_tokens(model.target_encoder, x), ijepa.vit_patch_tokens(model.target_encoder, y)
    assert not torch.allclose(full_x[0], full_y[0]) and torch.allclose(full_x[1], full_y[1])
    assert model({"views": [y]})["loss"].item() != model({"views": [x]})["loss"].item()  # only via the targets
    # the CLS token is used nowhere and frozen
    before = ijepa.vit_patch_tokens(model.backbone, x)
    with torch.no_grad():
        model.backbone.cls_token.add_(5.0)
    torch.testing.assert_close(ijepa.vit_patch_tokens(model.backbone, x), before)
    assert not model.backbone.cls_token.requires_grad


def test_gradients_reach_the_context_encoder_and_predictor_not_the_target():
    model = _model()
    loss = model({"views": [torch.randn(4, 3, 32, 32)]})["loss"]
    loss.backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.target_encoder.parameters())


def test_ema_schedule_and_update():
    assert ijepa.ema_momentum(0, 100) == pytest.approx(0.996)
    assert ijepa.ema_momentum(50, 100) == pytest.approx(0.998)
    assert ijepa.ema_momentum(100, 100) == pytest.approx(1.0)
    model = _model()
    for p in model.target_encoder.parameters():  # identical at initialisation
        assert p.data_ptr() not in {q.data_ptr() for q in model.backbone.parameters()}
    torch.testing.assert_close(model.target_encoder.patch_embed.weight, model.backbone.patch_embed.weight)
    with torch.no_grad():
        model.backbone.patch_embed.weight.add_(1.0)
    old = model.target_encoder.patch_embed.weight.clone()
    online = model.backbone.patch_embed.weight.clone()
    model.on_step_end(1, 10)  # the first update uses m = 0.996
    torch.testing.assert_close(model.target_encoder.patch_embed.weight, 0.996 * old + 0.004 * online)
    model.on_step_end(6, 10)
    assert model.momentum == pytest.approx(0.996 + 0.004 * 5 / 10)


def test_embed_is_the_average_pooled_target_encoder():
    model = _model().eval()
    with torch.no_grad():
        model.backbone.patch_embed.weight.add_(1.0)  # the two encoders differ: embed must use the target one
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model.embed(x), ijepa.vit_patch_tokens(model.target_encoder, x).mean(1))
    assert model.embed(x).shape == (3, 16)


def test_config_is_the_papers():
    cfg = ijepa.Config()
    assert (cfg.num_targets, cfg.target_scale, cfg.target_aspect, cfg.context_scale, cfg.min_keep) == (
        4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), 10)
    assert (cfg.pred_dim, cfg.pred_depth, cfg.ema_start, cfg.ema_end, cfg.loss) == (384, 12, 0.996, 1.0, "mse")
    assert (cfg.optimizer, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs, cfg.batch_size) == ("adamw", 0.04, 15, 300, 2048)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(1e-3)
    vit = backbones.ViT(backbones.ViTConfig(image_size=64, patch_size=4, dim=192, depth=1, heads=3))  # 16 x 16
    model = ijepa.MODEL(vit, 192, cfg)
    blocks = model.predictor.blocks
    assert len(blocks) == 12 and blocks[0].self_attn.num_heads == 3 and blocks[0].norm_first  # the encoder's heads
    assert model.predictor.embed.out_features == 384 and model.predictor.proj.out_features == 192


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        ijepa.MODEL(backbones.SmallCNN(width=8), 64, ijepa.Config())


def test_view_recipe_is_one_crop_without_flip_or_colour():
    cfg = methods.make_config(ijepa, preset="small")
    pipelines = ijepa.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    kinds = [type(t) for t in pipelines[0].transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.ToDtype, v2.Normalize]
    assert pipelines[0].transforms[1].scale == (0.3, 1.0)
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields_and_build():
    fields = {f.name for f in dataclasses.fields(ijepa.Config)}
    assert all(set(p) <= fields for p in ijepa.PRESETS.values())
    cfg = methods.make_config(ijepa, preset="small")
    assert ijepa.smallest_target_block(cfg, 8) > cfg.min_keep  # vit_tiny at 32 px: an 8 x 8 grid


def test_smoke_fit_lowers_the_loss():
    cfg = ijepa.Config(**SMALL)
    model = ijepa.MODEL(_vit(dim=32), 32, cfg)
    batch = train.prepare_batch(fixed_batch(ijepa, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # new masks each step, as in training
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 30)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
