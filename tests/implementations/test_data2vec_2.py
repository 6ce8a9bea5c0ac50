"""data2vec 2.0 (image): the inverse block masks against a literal loop, the teacher targets, the decoder and
the loss against literal float64 computations, what the student (visible patches only, M copies) and the
teacher (one unmasked pass) see, gradients, the EMA teacher and its schedule, the Config, the ViT-only
contract, the view recipe, embed, a smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, train, views

from .helpers import fixed_batch, load

d2v2 = load("data2vec-2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def _vit(image_size=16, patch=4, dim=16, depth=2):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(vit=None, **kw):
    cfg = d2v2.Config(**{"top_k_blocks": 2, "clone_batch": 3, "mask_length": 2, "decoder_dim": 16,
                         "decoder_groups": 4, "decoder_layers": 2, **kw})
    vit = vit or _vit()
    return d2v2.MODEL(vit, vit.feature_dim, cfg)


# --- inverse block masks --------------------------------------------------------------------------


def masks_literal(n, side, ratio, adjust, length, seed):
    """The official compute_block_mask_2d(inverse_mask=True, require_same_masks=True) per image with Python
    loops, fed the numbers that inverse_block_masking draws: randint(0, L) = floor(u L) for the centres (with
    replacement), a draw without replacement = the largest keys for the count correction."""
    L = side * side
    keep = 1 - ratio
    centres = int(L * ((keep + adjust) / length**2))
    target = int(L * keep)
    g = torch.Generator().manual_seed(seed)
    uc = torch.rand(n, centres, generator=g).tolist()
    u = torch.rand(n, L, generator=g).tolist()
    out = []
    for b in range(n):
        kept = [[False] * side for _ in range(side)]
        for v in uc[b]:
            r0, c0 = divmod(min(int(v * L), L - 1), side)
            for i in range(length):
                for j in range(length):
                    r = min(max(r0 + i - length // 2, 0), side - 1)
                    c = min(max(c0 + j - length // 2, 0), side - 1)
                    kept[r][c] = True
        flat = [kept[r][c] for r in range(side) for c in range(side)]
        ins = sorted((k for k in range(L) if flat[k]), key=lambda k: -u[b][k])
        outs = sorted((k for k in range(L) if not flat[k]), key=lambda k: -u[b][k])
        final = set((ins + outs)[:target])  # trim a random subset of the kept, or pad with random others
        out.append([k not in final for k in range(L)])
    return torch.tensor(out)


@pytest.mark.parametrize("n,side,ratio,adjust,length", [(20, 14, 0.8, 0.07, 3), (20, 8, 0.8, 0.07, 2),
                                                         (10, 6, 0.5, 0.0, 3), (5, 4, 0.9, 0.3, 2)])
def test_inverse_block_masking_is_the_official_rule(n, side, ratio, adjust, length):
    mask = d2v2.inverse_block_masking(n, side, ratio, adjust, length, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (n, side * side) and mask.dtype == torch.bool
    assert torch.equal(mask, masks_literal(n, side, ratio, adjust, length, seed=3))


def test_inverse_block_masking_counts_blocks_seeds_and_limits():
    g = torch.Generator().manual_seed(0)
    mask = d2v2.inverse_block_masking(200, 14, generator=g)
    assert (mask.sum(1) == 196 - int(196 * (1 - 0.8))).all()  # 157 masked, 39 visible in every image
    again = d2v2.inverse_block_masking(200, 14, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, d2v2.inverse_block_masking(200, 14, generator=torch.Generator().manual_seed(1)))
    # the kept patches come in blocks: most visible patches have a visible 4-neighbour
    vis = (~mask).view(200, 14, 14).float()
    nb = F.conv2d(vis[:, None], torch.tensor([[[[0., 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1)[:, 0]
    assert ((nb > 0) & (vis > 0)).sum() > 0.9 * vis.sum()
    with pytest.raises(ValueError):
        d2v2.inverse_block_masking(2, 4, mask_ratio=1.0)
    with pytest.raises(ValueError):
        d2v2.inverse_block_masking(2, 4, length=1)


# --- targets, decoder, loss -----------------------------------------------------------------------


def test_targets_match_literal_computation():
    layers = [torch.randn(2, 5, 4, dtype=torch.float64) * (k + 1) + k for k in range(3)]
    got = d2v2.teacher_targets(layers)
    want = torch.zeros(2, 5, 4, dtype=torch.float64)
    for b in range(2):
        avg = [[0.0] * 4 for _ in range(5)]
        for a in layers:
            for c in range(4):
                col = [a[b, t, c].item() for t in range(5)]
                mu = sum(col) / 5
                var = sum((v - mu) ** 2 for v in col) / 5
                for t in range(5):
                    avg[t][c] += (col[t] - mu) / math.sqrt(var + 1e-5) / 3
        for t in range(5):
            mu = sum(avg[t]) / 4
            var = sum((v - mu) ** 2 for v in avg[t]) / 4
            for c in range(4):
                want[b, t, c] = (avg[t][c] - mu) / math.sqrt(var + 1e-5)
    torch.testing.assert_close(got, want)


def test_decoder_matches_literal_convolutions():
    dec = d2v2.ConvDecoder(4, 3, width=4, kernel=3, groups=2, layers=2).double()
    z = torch.randn(2, 9, 4, dtype=torch.float64)
    x = z.transpose(1, 2).reshape(2, 4, 3, 3)
    for conv in dec.convs:
        w, bias = conv.weight, conv.bias  # (4, 2, 3, 3) two groups of 2 channels
        y = torch.zeros_like(x)
        for b in range(2):
            for o in range(4):
                g = o // 2
                for i in range(3):
                    for j in range(3):
                        acc = bias[o].item()
                        for ci in range(2):
                            for di in range(3):
                                for dj in range(3):
                                    r, c = i + di - 1, j + dj - 1
                                    if 0 <= r < 3 and 0 <= c < 3:
                                        acc += w[o, ci, di, dj].item() * x[b, g * 2 + ci, r, c].item()
                        y[b, o, i, j] = acc
        mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
        y = (y - mu) / torch.sqrt(var + 1e-5)
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        x = y + x  # residual, the widths match
    want = x.flatten(2).transpose(1, 2) @ dec.proj.weight.T + dec.proj.bias
    torch.testing.assert_close(dec(z), want.detach())


def test_loss_matches_literal_sum():
    pred, target = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    cp, ct = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    reg = sum((pred[i, d].item() - target[i, d].item()) ** 2 for i in range(7) for d in range(4)) / 2
    cls = sum((cp[i, d].item() - ct[i, d].item()) ** 2 for i in range(3) for d in range(4)) / 2
    want = (reg + 0.01 * 7 * cls) / 7
    assert d2v2.data2vec2_loss(pred, target, cp, ct, 0.01).item() == pytest.approx(want, rel=1e-12)
    assert d2v2.data2vec2_loss(pred, pred, cp, cp).item() == 0
    empty = torch.zeros(0, 4, requires_grad=True)
    assert d2v2.data2vec2_loss(empty, empty.detach(), cp, ct).item() == 0


# --- what the teacher and the student see ---------------------------------------------------------


def test_one_teacher_pass_and_visible_only_students(monkeypatch):
    model = _model()
    teacher_calls, student_calls = [], []
    real_blocks = d2v2.vit_blocks
    monkeypatch.setattr(d2v2, "vit_blocks", lambda m, x, **kw: teacher_calls.append((m, x)) or real_blocks(m, x, **kw))
    real_tokens = model.backbone.forward_tokens
    monkeypatch.setattr(model.backbone, "forward_tokens",
                        lambda x, keep=None: student_calls.append((x, keep)) or real_tokens(x, keep))
    masks = []
    real_draw = model.draw_masks
    monkeypatch.setattr(model, "draw_masks", lambda n: masks.append(real_draw(n)) or masks[-1])
    x = torch.randn(4, 3, 16, 16)
    out = model({"views": [x]})
    assert len(teacher_calls) == 1 and teacher_calls[0][0] is model.teacher and torch.equal(teacher_calls[0][1], x)
    (xs, keep), = student_calls
    assert torch.equal(xs, x.repeat_interleave(3, 0))  # M = 3 copies per image, copies adjacent
    mask = masks[0]
    assert mask.shape == (12, 16) and keep.shape == (12, 16 - mask[0].sum())
    for b in range(12):
        assert keep[b].tolist() == [k for k in range(16) if not mask[b, k]]  # visible only, no mask tokens
    assert len({tuple(m.tolist()) for m in mask}) > 1  # the copies get different masks
    assert out["masked_fraction"].item() == pytest.approx(mask.float().mean().item())


def test_forward_is_the_literal_objective():
    model = _model(mask_noise_std=0.0).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(5)
    loss = model({"views": [x]})["loss"]
    torch.manual_seed(5)
    mask = model.draw_masks(6)
    with torch.no_grad():
        _, top = d2v2.vit_blocks(model.teacher, x, keep=2)
        y = d2v2.teacher_targets([a[:, 1:] for a in top])
        total, S = 0.0, int(mask.sum())
        for b in range(6):
            img = b // 3
            vis = [k for k in range(16) if not mask[b, k]]
            s = model.backbone.forward_tokens(x[img:img + 1], torch.tensor([vis]))[0]
            z = torch.zeros(16, 16, dtype=torch.float64)
            z[vis] = s[1:]
            f = model.decoder(z[None])[0]
            total += sum(((f[t] - y[img, t]) ** 2).sum().item() for t in range(16) if mask[b, t]) / 4
            total += 0.01 * S * ((s[0] - y[img].mean(0)) ** 2).sum().item() / 4
    assert loss.item() == pytest.approx(total / S, rel=1e-6)  # forward scores in float32


def test_gradients_reach_the_student_and_decoder_not_the_teacher():
    model = _model()
    model({"views": [torch.randn(2, 3, 16, 16)]})["loss"].backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.cls_token.grad.abs().sum() > 0  # the CLS loss
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_weight_decay_groups():
    model = _model()
    decay, no_decay = model.param_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    assert not any(p is q for g in (decay, no_decay) for p in g["params"] for q in model.teacher.parameters())


# --- EMA ------------------------------------------------------------------------------------------


def test_ema_schedule_follows_the_rule():
    cfg = d2v2.Config()
    assert d2v2.ema_decay(0, cfg) == 0.9998 and d2v2.ema_decay(10**6, cfg) == 0.99999
    assert d2v2.ema_decay(50000, cfg) == pytest.approx(0.9998 + 0.5 * (0.99999 - 0.9998))


def test_teacher_moves_by_the_ema_rule_after_each_step():
    model = _model(ema_decay_init=0.5, ema_decay_end=0.9, ema_anneal_steps=4)
    for t, s in zip(model.teacher.parameters(), model.backbone.parameters()):
        assert torch.equal(t, s)
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


# --- config, contract, views, embed ---------------------------------------------------------------


def test_config_is_the_papers():
    c = d2v2.Config()
    assert (c.clone_batch, c.mask_ratio, c.mask_prob_adjust, c.mask_length, c.mask_noise_std) == (16, 0.8, 0.07, 3, 0.01)
    assert (c.top_k_blocks, c.target_output, c.instance_norm_target_layer, c.layer_norm_targets) == (10, "ffn", True, True)
    assert (c.cls_loss, c.decoder_dim, c.decoder_kernel, c.decoder_groups, c.decoder_layers) == (0.01, 768, 3, 16, 6)
    assert (c.ema_decay_init, c.ema_decay_end, c.ema_anneal_steps) == (0.9998, 0.99999, 100000)
    assert (c.optimizer, c.base_lr, c.weight_decay, c.betas) == ("adamw", 1e-3, 0.05, (0.9, 0.95))
    assert (c.warmup_epochs, c.epochs, c.batch_size) == (10, 75, 256)


def test_needs_a_vit():
    cnn = backbones.SmallCNN(width=8)
    with pytest.raises(ValueError, match="needs a ViT"):
        d2v2.MODEL(cnn, cnn.feature_dim, d2v2.Config())
    with pytest.raises(ValueError, match="top_k_blocks"):
        _model(top_k_blocks=3)


def test_embed_is_the_mean_patch_token_layer_normalised():
    model = _model()
    x = torch.randn(3, 3, 16, 16)
    tokens = model.backbone.forward_tokens(x)[:, 1:].mean(1)
    torch.testing.assert_close(model.embed(x), F.layer_norm(tokens, (16,), eps=1e-6))


def test_view_recipe():
    (pipe,) = d2v2.augmentations(d2v2.Config(), 32)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert pipe.transforms[1].scale == (0.08, 1.0)
    assert views.plan_views([pipe], in_memory=True).mode == "device"


def test_presets_name_config_fields():
    fields = {f.name for f in dataclasses.fields(d2v2.Config)}
    for preset in d2v2.PRESETS.values():
        assert set(preset) <= fields
        d2v2.Config(**preset)  # builds


def test_smoke_fit_lowers_the_loss():
    cfg = d2v2.Config(top_k_blocks=2, clone_batch=2, mask_length=2, decoder_dim=32, decoder_groups=4,
                      decoder_layers=2, ema_decay_init=0.999, ema_decay_end=0.999, min_scale=0.4)
    model = d2v2.MODEL(_vit(image_size=32, patch=8, dim=32, depth=2), 32, cfg)  # a 4 x 4 grid
    batch = train.prepare_batch(fixed_batch(d2v2, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 30)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
