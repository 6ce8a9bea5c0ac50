"""data2vec (image): the block masks against a literal port of BEiT's generator, the ViT walked part by part,
the teacher targets and the Smooth L1 loss against literal computations, what the student and the teacher
see, gradients, the EMA teacher and its schedule, the Config, the ViT-only contract, the view recipe, embed,
a smoke fit."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

d2v = load("data2vec")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def _vit(image_size=16, patch=4, dim=16, depth=2):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(vit=None, **kw):
    cfg = d2v.Config(**{"top_k_blocks": 2, "mask_min_patches": 2, **kw})
    vit = vit or _vit()
    return d2v.MODEL(vit, vit.feature_dim, cfg)


# --- block masks ----------------------------------------------------------------------------------


def masks_literal(n, h, w, count, min_patches, max_patches, min_aspect, seed):
    """BEiT's MaskingGenerator written per image with Python loops, fed the uniforms that block_masking
    draws (one row of 4 per image per round): U(a, b) = a + (b - a) u, randint(0, m) = floor(u (m + 1))."""
    g = torch.Generator().manual_seed(seed)
    masks = [[[False] * w for _ in range(h)] for _ in range(n)]
    done, fails, active = [0] * n, [0] * n, [count > 0] * n
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    while any(active):
        u = torch.rand(4, n, dtype=torch.float64, generator=g).tolist()
        for b in range(n):
            if not active[b]:
                continue
            budget = min(count - done[b], max_patches)
            area = min_patches + (budget - min_patches) * u[0][b]
            aspect = math.exp(lo + (hi - lo) * u[1][b])
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            accepted = False
            if bh < h and bw < w:
                top, left = int(u[2][b] * (h - bh + 1)), int(u[3][b] * (w - bw + 1))
                cells = [(i, j) for i in range(top, top + bh) for j in range(left, left + bw)]
                new = sum(not masks[b][i][j] for i, j in cells)
                if 0 < new <= budget:
                    for i, j in cells:
                        masks[b][i][j] = True
                    done[b] += new
                    accepted = True
            fails[b] = 0 if accepted else fails[b] + 1
            active[b] = done[b] < count and fails[b] < 10
    return torch.tensor([[v for row in m for v in row] for m in masks])


@pytest.mark.parametrize("n,h,w,count,min_p,max_p", [(40, 14, 14, 118, 16, 196), (40, 8, 8, 38, 5, 64),
                                                      (30, 6, 9, 20, 4, 6), (5, 4, 4, 0, 2, 16)])
def test_block_masking_is_beits_generator(n, h, w, count, min_p, max_p):
    mask = d2v.block_masking(n, h, w, count, min_p, max_p, 0.3, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (n, h * w) and mask.dtype == torch.bool
    assert torch.equal(mask, masks_literal(n, h, w, count, min_p, max_p, 0.3, seed=3))
    assert (mask.sum(1) <= count).all()  # never above the count


def test_block_masking_counts_seeds_and_limits():
    g = torch.Generator().manual_seed(0)
    mask = d2v.block_masking(500, 14, 14, 118, 16, 196, 0.3, generator=g)
    counts = mask.sum(1)
    assert (counts <= 118).all() and (counts == 118).float().mean() > 0.6 and counts.min() > 100
    assert mask.float().mean(0).min() > 0.05  # every position is masked in some images (corners least)
    assert len({tuple(m.tolist()) for m in mask}) == 500  # a mask per image
    again = d2v.block_masking(500, 14, 14, 118, 16, 196, 0.3, generator=torch.Generator().manual_seed(0))
    other = d2v.block_masking(500, 14, 14, 118, 16, 196, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    # one block only: a budget of 9 patches with blocks of at least 9 and at most 9 is one 3 x 3 square
    one = d2v.block_masking(50, 8, 8, 9, 9, 9, 0.99, generator=g)
    for m in one.view(50, 8, 8):
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == 9 and len(rows) == 3 and len(cols) == 3 and m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert not d2v.block_masking(4, 8, 8, 0, 2, 8, 0.3).any()
    with pytest.raises(ValueError, match="cannot mask 65 of 64"):
        d2v.block_masking(2, 8, 8, 65)


# --- the ViT, part by part ------------------------------------------------------------------------


def test_vit_blocks_is_the_harness_vit():
    vit = _vit(depth=3)
    x = torch.randn(2, 3, 16, 16)
    final, outs = d2v.vit_blocks(vit, x, keep=3)
    torch.testing.assert_close(final, vit.forward_tokens(x))
    t = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patchify_embed(x)], dim=1)
    for blk, out in zip(vit.blocks, outs):
        t = blk(t)  # the harness's own Block.forward
        torch.testing.assert_close(out, t)
    # "ffn": the FFN output before the last residual connection = block output - block input - attention part
    _, ffn = d2v.vit_blocks(vit, x, keep=1, output="ffn")
    _, before = d2v.vit_blocks(vit, x, keep=2)
    blk, h = vit.blocks[-1], vit.blocks[-1].norm1(before[0])
    mid = before[0] + blk.attn(h, h, h, need_weights=False)[0]
    torch.testing.assert_close(ffn[0], outs[-1] - mid)
    torch.testing.assert_close(ffn[0], blk.mlp(blk.norm2(mid)))
    assert len(d2v.vit_blocks(vit, x, keep=0)[1]) == 0
    with pytest.raises(ValueError, match="expected 'block' or 'ffn'"):
        d2v.vit_blocks(vit, x, output="attn")
    with pytest.raises(ValueError, match="position embeddings for 16"):
        d2v.vit_blocks(vit, torch.randn(1, 3, 24, 24))


def test_mask_token_is_inside_the_encoder():
    vit = _vit()
    token = torch.randn(1, 16)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 5]] = mask[1, [10, 15]] = True
    out, _ = d2v.vit_blocks(vit, x, mask, token)
    y = x.clone()  # new pixels in every masked patch: the student cannot see them
    y[0, :, 0:4, 0:8] = torch.randn(3, 4, 8)
    y[0, :, 4:8, 4:8] = torch.randn(3, 4, 4)
    y[1, :, 8:12, 8:12] = torch.randn(3, 4, 4)
    y[1, :, 12:16, 12:16] = torch.randn(3, 4, 4)
    torch.testing.assert_close(d2v.vit_blocks(vit, y, mask, token)[0], out)
    # the mask token replaces the embedding before the blocks: it changes the visible patches' outputs too
    other, _ = d2v.vit_blocks(vit, x, mask, token + torch.randn(1, 16))  # (a constant shift normalises away)
    assert (other[0, 1 + 2] - out[0, 1 + 2]).abs().max() > 1e-3  # patch 2 of image 0 is visible
    # where nothing is masked, the mask token does nothing
    torch.testing.assert_close(d2v.vit_blocks(vit, x, torch.zeros_like(mask), token)[0], vit.forward_tokens(x))


# --- targets and loss -----------------------------------------------------------------------------


def _ln_literal(v, eps=1e-5):
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)  # biased, as F.layer_norm
    return [(a - mean) / math.sqrt(var + eps) for a in v]


def targets_literal(layers, norm, post):
    k, (n, length, dim) = len(layers), layers[0].shape
    out = torch.zeros(n, length, dim, dtype=torch.float64)
    for a in layers:
        a = a.tolist()
        for i in range(n):
            if norm == "instance":  # each channel over the image's patches
                cols = [_ln_literal([a[i][t][c] for t in range(length)]) for c in range(dim)]
                normed = [[cols[c][t] for c in range(dim)] for t in range(length)]
            elif norm == "layer":  # each token over the channels
                normed = [_ln_literal(a[i][t]) for t in range(length)]
            else:
                normed = a[i]
            for t in range(length):
                for c in range(dim):
                    out[i, t, c] += normed[t][c] / k
    if post:
        out = torch.tensor([[_ln_literal(out[i, t].tolist()) for t in range(length)] for i in range(n)],
                           dtype=torch.float64)
    return out


@pytest.mark.parametrize("norm", ["layer", "instance", "none"])
@pytest.mark.parametrize("post", [True, False])
def test_targets_match_literal_computation(norm, post):
    g = torch.Generator().manual_seed(7)
    layers = [3 * torch.randn(2, 5, 6, generator=g, dtype=torch.float64) + k for k in range(3)]
    got = d2v.teacher_targets(layers, norm, post)
    assert got.dtype == torch.float64 and got.shape == (2, 5, 6)
    torch.testing.assert_close(got, targets_literal(layers, norm, post), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="target_norm 'batch'"):
        d2v.teacher_targets(layers, "batch")


def test_targets_average_top_blocks_and_normalise_away_their_scale():
    a = torch.randn(2, 4, 8, dtype=torch.float64)
    # a block with a huge norm does not dominate: layer norm removes each block's scale and offset
    torch.testing.assert_close(d2v.teacher_targets([a, 1000 * a + 5]), d2v.teacher_targets([a, a]))
    y = d2v.teacher_targets([a], "layer", True)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert d2v.teacher_targets([a.half()]).dtype == torch.float32  # float32 at least


def loss_literal(pred, target, beta):
    total = 0.0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        e = abs(p - t)
        total += 0.5 * e * e / beta if e <= beta else e - 0.5 * beta
    return total / pred.numel()


@pytest.mark.parametrize("beta", [2.0, 0.5])
def test_loss_matches_literal_smooth_l1(beta):
    g = torch.Generator().manual_seed(1)
    pred = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert d2v.data2vec_loss(pred, target, beta).item() == pytest.approx(loss_literal(pred, target, beta), rel=1e-12)


def test_loss_limits():
    t = torch.randn(4, 3, dtype=torch.float64)
    assert d2v.data2vec_loss(t.clone(), t).item() == 0.0  # the target itself is the minimum
    assert d2v.data2vec_loss(t + 1.0, t, 2.0).item() == pytest.approx(0.25)  # quadratic: 1 / (2 * 2)
    assert d2v.data2vec_loss(t + 5.0, t, 2.0).item() == pytest.approx(4.0)  # linear: 5 - 2 / 2
    empty = torch.zeros(0, 3, requires_grad=True)
    assert d2v.data2vec_loss(empty, torch.zeros(0, 3)).item() == 0.0


# --- model ----------------------------------------------------------------------------------------


def _capture(monkeypatch, model, mask):
    """Fix the model's masks and record what reaches the loss."""
    seen = {}

    def loss(pred, target, beta):
        seen["pred"], seen["target"] = pred, target
        return F.smooth_l1_loss(pred, target, beta=beta)

    monkeypatch.setattr(model, "draw_masks", lambda n: mask)
    monkeypatch.setattr(d2v, "data2vec_loss", loss)
    return seen


def test_teacher_sees_the_whole_image_and_the_student_the_masked_one(monkeypatch):
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1]] = mask[1, [5, 6, 9]] = True
    seen = _capture(monkeypatch, model, mask)
    model({"views": [x]})
    # targets: the teacher's top-2 blocks on the unmasked image at the masked patches, in row-major order
    _, top = d2v.vit_blocks(model.teacher, x, keep=2)
    want = d2v.teacher_targets([a[:, 1:] for a in top])[mask]
    torch.testing.assert_close(seen["target"], want)
    assert seen["pred"].shape == (5, 16)
    # new pixels in a masked patch: the prediction stays, the teacher's target moves
    y = x.clone()
    y[0, :, 0:4, 0:4] = torch.randn(3, 4, 4)
    pred, target = seen["pred"].detach(), seen["target"]
    model({"views": [y]})
    torch.testing.assert_close(seen["pred"].detach(), pred)
    assert (seen["target"] - target).abs().max() > 1e-3
    # another mask: the same targets at the patches both masks cover (the teacher never sees a mask)
    target_y = seen["target"]
    mask2 = mask.clone()
    mask2[0, 2] = True  # rows of mask2: image 0 patches 0, 1, 2, then image 1 patches 5, 6, 9
    monkeypatch.setattr(model, "draw_masks", lambda n: mask2)
    model({"views": [y]})
    torch.testing.assert_close(seen["target"][[0, 1, 3, 4, 5]], target_y)


def test_ffn_targets_and_instance_norm_reach_the_loss(monkeypatch):
    model = _model(target_output="ffn", target_norm="instance", post_target_layer_norm=False)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.5
    seen = _capture(monkeypatch, model, mask)
    model({"views": [x]})
    _, top = d2v.vit_blocks(model.teacher, x, keep=2, output="ffn")
    want = d2v.teacher_targets([a[:, 1:] for a in top], "instance", False)[mask]
    torch.testing.assert_close(seen["target"], want)


def test_gradients_reach_the_student_not_the_teacher():
    model = _model()
    out = model({"views": [torch.randn(4, 3, 16, 16)]})
    out["loss"].backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert not any(n.startswith("teacher.") for n, p in model.named_parameters() if p.requires_grad)
    assert 0.4 < out["masked_fraction"].item() < 0.7 and out["target_var"] > 0


def test_weight_decay_groups_are_beits():
    model = _model(weight_decay=0.05)
    decay, no_decay = model.param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.cls_token" in exempt and "head.bias" in exempt and "backbone.norm.weight" in exempt
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"mask_token", "head.weight", "backbone.patch_embed.weight"} <= decayed
    assert not any(n.startswith("teacher.") for n in exempt | decayed)
    assert len(exempt | decayed) == sum(p.requires_grad for p in model.parameters())


def test_ema_schedule_follows_the_rule():
    cfg = d2v.Config(ema_decay_init=0.9, ema_decay_end=0.99, ema_anneal_steps=10)
    assert [d2v.ema_decay(k, cfg) for k in (0, 5, 10, 11, 1000)] == pytest.approx([0.9, 0.945, 0.99, 0.99, 0.99])
    paper = d2v.Config()  # ViT-B: constant 0.9998, no ramp
    assert {d2v.ema_decay(k, paper) for k in (0, 1, 500, 10**6)} == {0.9998}


def test_teacher_moves_by_the_ema_rule_after_each_step():
    model = _model(ema_decay_init=0.5, ema_decay_end=0.9, ema_anneal_steps=4)
    for t, s in zip(model.teacher.parameters(), model.backbone.parameters()):
        assert torch.equal(t, s)  # a copy at the start
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in (1, 2):
        model({"views": [torch.randn(4, 3, 16, 16)]})["loss"].backward()
        opt.step()
        opt.zero_grad()
        before = [t.clone() for t in model.teacher.parameters()]
        model.on_step_end(step, 100)
        tau = 0.5 + 0.4 * step / 4
        assert model.momentum == pytest.approx(tau)
        for t, t0, s in zip(model.teacher.parameters(), before, model.backbone.parameters()):
            torch.testing.assert_close(t, tau * t0 + (1 - tau) * s)
        assert any(not torch.equal(t, t0) for t, t0 in zip(model.teacher.parameters(), before))


def test_config_is_the_papers():
    cfg = d2v.Config()
    assert (cfg.top_k_blocks, cfg.loss_beta, cfg.mask_ratio, cfg.mask_min_patches) == (6, 2.0, 0.6, 16)
    assert (cfg.target_output, cfg.target_norm, cfg.post_target_layer_norm) == ("block", "layer", True)
    assert (cfg.ema_decay_init, cfg.ema_decay_end, cfg.ema_anneal_steps) == (0.9998, 0.9998, 0)
    assert (cfg.optimizer, cfg.weight_decay, cfg.betas, cfg.epochs, cfg.batch_size) == ("adamw", 0.05, (0.9, 0.999), 800, 2048)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(2e-3) and cfg.warmup_epochs == 10
    model = d2v.MODEL(_vit(depth=6), 16, d2v.Config())
    assert model.draw_masks(3).sum(1).max() <= round(0.6 * 16)


def test_needs_a_vit_with_enough_blocks():
    with pytest.raises(ValueError, match="needs a ViT with patch tokens"):
        d2v.MODEL(backbones.SmallCNN(width=8), 64, d2v.Config())
    with pytest.raises(ValueError, match="top_k_blocks 3: the ViT has 2 blocks"):
        _model(top_k_blocks=3)


def test_embed_is_the_mean_patch_token_layer_normalised():
    model = _model().eval()
    x = torch.randn(3, 3, 16, 16)
    seen = []
    handle = model.backbone.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    model.backbone(x)
    handle.remove()
    pooled = seen[0][:, 1:].mean(1)  # (3, 16) the last block's patch tokens, before the final norm
    want = (pooled - pooled.mean(1, keepdim=True)) / (pooled.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(model.embed(x), want)


def test_view_recipe_is_beits():
    cfg = d2v.Config()
    (pipeline,) = d2v.augmentations(cfg, 224)
    kinds = [type(t).__name__ for t in pipeline.transforms]
    assert kinds == ["ToImage", "ColorJitter", "RandomHorizontalFlip", "RandomResizedCrop", "ToDtype", "Normalize"]
    jitter, flip, crop = pipeline.transforms[1:4]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + (None,)
    assert flip.p == 0.5 and crop.scale == (0.08, 1.0) and crop.size == (224, 224)
    small = d2v.augmentations(methods.make_config(d2v, preset="small"), 32, (0.5,) * 3, (0.25,) * 3)
    assert views.plan_views(small, in_memory=True).mode == "device"  # batched on the device
    out = small[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields():
    fields = set(d2v.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in d2v.PRESETS.values())
    small = methods.make_config(d2v, preset="small")
    assert small.top_k_blocks <= backbones.ViTConfig().depth


def test_smoke_fit_lowers_the_loss():
    cfg = d2v.Config(top_k_blocks=2, mask_min_patches=2, ema_decay_init=0.999, ema_decay_end=0.999, min_scale=0.4)
    model = d2v.MODEL(_vit(image_size=32, patch=8, dim=32, depth=2), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(d2v, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # a new mask each step, as in training
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 30)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
