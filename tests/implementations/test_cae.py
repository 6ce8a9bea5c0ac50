"""CAE: the exact-count block masks, the loss against a literal computation, the encoder seeing only the
visible patches, the stop-gradient target (the encoder on the masked patches alone), the regressor's and
decoder's inputs, gradients, the ViT-only contract, the paper's Config, the view recipe, a smoke fit."""

import math

import pytest
import torch
from torchvision.transforms import v2

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

cae = load("cae")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    cfg = cae.Config(**{"regressor_depth": 1, "decoder_depth": 1, "decoder_heads": 2, "min_block_patches": 2, **kw})
    vit = _vit()
    return cae.MODEL(vit, vit.feature_dim, cfg)


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,h,w,m,minp", [(8, 8, 8, 32, 5), (4, 14, 14, 98, 16), (5, 4, 4, 8, 2), (3, 4, 4, 0, 2)])
def test_block_masks_have_the_exact_count(n, h, w, m, minp):
    mask = cae.exact_block_masking(n, h, w, m, minp, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (n, h * w) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [m] * n
    again = cae.exact_block_masking(n, h, w, m, minp, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)  # seeded
    other = cae.exact_block_masking(n, h, w, m, minp, generator=torch.Generator().manual_seed(2))
    assert m == 0 or not torch.equal(mask, other)
    with pytest.raises(ValueError, match="at least one must stay visible"):
        cae.exact_block_masking(n, h, w, h * w, minp)


def test_block_masks_are_blocks_and_the_fill_guard_keeps_the_count():
    """Without the random fill, masked patches come in blocks: far more masked 4-neighbours than at random."""
    mask = cae.exact_block_masking(64, 14, 14, 98, 16, generator=torch.Generator().manual_seed(0)).view(64, 14, 14)
    same = (mask[:, 1:] & mask[:, :-1]).float().sum() / mask[:, 1:].float().sum()
    assert same > 0.75  # random masks at 50% give about 0.5
    none = cae.exact_block_masking(6, 8, 8, 32, 5, max_rounds=0, generator=torch.Generator().manual_seed(0))
    assert none.sum(1).tolist() == [32] * 6  # no block round at all: filled at random, still exact


def test_split_indices_are_the_complement_in_grid_order():
    mask = cae.exact_block_masking(3, 4, 4, 6, 2, generator=torch.Generator().manual_seed(3))
    visible, masked = cae.split_indices(mask)
    assert visible.shape == (3, 10) and masked.shape == (3, 6)
    for r in range(3):
        assert masked[r].tolist() == [i for i in range(16) if mask[r, i]]
        assert visible[r].tolist() == [i for i in range(16) if not mask[r, i]]


def test_patchify_is_maes():
    mae = load("mae")
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(cae.patchify(x, 4), mae.patchify(x, 4))


# --- loss -----------------------------------------------------------------------------------------


def loss_literal(pred, target, zp, zt, lambd, norm_pix):
    rec, n_patches = 0.0, 0
    for n in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            t = target[n, k].tolist()
            if norm_pix:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            rec += sum((a - b) ** 2 for a, b in zip(pred[n, k].tolist(), t)) / len(t)
            n_patches += 1
    align, count = 0.0, 0
    for a, b in zip(zp.flatten().tolist(), zt.flatten().tolist()):
        align += (a - b) ** 2
        count += 1
    return rec / n_patches + lambd * align / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("n,m,p,d,lambd", [(2, 3, 6, 4, 2.0), (3, 5, 12, 8, 0.5)])
def test_loss_matches_literal_computation(norm_pix, n, m, p, d, lambd):
    g = torch.Generator().manual_seed(n + m)
    pred = torch.randn(n, m, p, generator=g, dtype=torch.float64)
    target = 3 * torch.randn(n, m, p, generator=g, dtype=torch.float64) + 1
    zp, zt = torch.randn(2, n, m, d, generator=g, dtype=torch.float64)
    loss, rec, align = cae.cae_loss(pred, target, zp, zt, lambd, norm_pix)
    assert loss.item() == pytest.approx(loss_literal(pred, target, zp, zt, lambd, norm_pix), rel=1e-12)
    assert loss.item() == pytest.approx(rec.item() + lambd * align.item(), rel=1e-12)


def test_loss_limits_and_stop_gradient():
    target = torch.randn(2, 4, 12, dtype=torch.float64)
    perfect = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    z = torch.randn(2, 4, 8, dtype=torch.float64)
    assert cae.cae_loss(perfect, target, z, z)[0].item() == pytest.approx(0.0, abs=1e-12)
    zp, zt = z.clone().requires_grad_(), (z + 1).requires_grad_()
    loss, _, align = cae.cae_loss(perfect, target, zp, zt, lambd=2.0)
    assert align.item() == pytest.approx(1.0) and loss.item() == pytest.approx(2.0)
    loss.backward()
    assert zt.grad is None  # the target gets no gradient
    torch.testing.assert_close(zp.grad, torch.full_like(z, 2.0 * 2 * -1.0 / z.numel()))


# --- model ----------------------------------------------------------------------------------------


def _fixed_mask(monkeypatch, model, n):
    mask = cae.exact_block_masking(n, 4, 4, model.num_masked, 2, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model, "draw_mask", lambda k: mask)
    return mask


def test_encoder_sees_only_visible_patches_and_the_target_only_masked_ones(monkeypatch):
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = _fixed_mask(monkeypatch, model, 2)
    visible, masked = cae.split_indices(mask)
    assert model.num_masked == 8 and visible.shape == (2, 8)
    calls = []
    orig = model.backbone.forward_tokens
    monkeypatch.setattr(model.backbone, "forward_tokens", lambda img, keep=None: calls.append(keep) or orig(img, keep))
    out = model({"views": [x]})
    assert len(calls) == 2 and torch.equal(calls[0], visible) and torch.equal(calls[1], masked)
    # the target is the encoder on the masked patches alone: changing a visible patch leaves it unchanged
    i, j = divmod(int(visible[0, 0]), 4)
    y = x.clone()
    y[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = torch.randn(3, 4, 4)
    torch.testing.assert_close(model.latent_target(y, masked), model.latent_target(x, masked))
    want = orig(x, masked)[:, 1:]
    torch.testing.assert_close(model.latent_target(x, masked), want)
    assert not model.latent_target(x, masked).requires_grad
    assert set(out) == {"loss", "loss_dec", "loss_align"}


def test_regressor_does_not_update_visible_latents_and_decoder_sees_only_predictions():
    model = _model(regressor_depth=2, decoder_depth=1)
    neck = model.neck.eval()
    z_v, pos_v = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    pos_m = torch.randn(2, 3, 32)
    z_m, pred = neck(z_v, pos_v, pos_m)
    assert z_m.shape == (2, 3, 32) and pred.shape == (2, 3, 4 * 4 * 3)
    # the decoder's output is a function of z_m and the masked positions only
    x = z_m + pos_m
    for blk in neck.decoder:
        x = blk(x)
    torch.testing.assert_close(pred, neck.head(neck.norm2(x)))
    # permuting the visible latents (with their positions) changes nothing: they are keys/values only
    perm = torch.tensor([4, 2, 0, 1, 3])
    z_m2, _ = neck(z_v[:, perm], pos_v[:, perm], pos_m)
    torch.testing.assert_close(z_m2, z_m, atol=1e-5, rtol=1e-5)


def test_gradients_reach_encoder_regressor_and_mask_token():
    model = _model()
    loss = model({"views": [torch.randn(4, 3, 16, 16)]})["loss"]
    loss.backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.cls_token.grad.abs().sum() > 0
    assert model.neck.mask_token.grad.abs().sum() > 0
    assert model.neck.regressor[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_alignment_gradient_flows_only_through_the_visible_branch(monkeypatch):
    """With the decoder term removed, the gradient equals that of the alignment with an explicitly detached
    target: the encoder run on the masked patches contributes none."""
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    mask = _fixed_mask(monkeypatch, model, 2)
    visible, masked = cae.split_indices(mask)
    monkeypatch.setattr(cae, "cae_loss", lambda p, t, zp, zt, lambd, norm: (((zp - zt) ** 2).mean(),) * 3)
    model.zero_grad()
    model({"views": [x]})["loss"].backward()
    got = model.backbone.patch_embed.weight.grad.clone()
    model.zero_grad()
    z_v = model.backbone.forward_tokens(x, visible)[:, 1:]
    pos = model.backbone.pos_embed
    z_m, _ = model.neck(z_v, cae.gather_tokens(pos, visible), cae.gather_tokens(pos, masked))
    target = model.backbone.forward_tokens(x, masked)[:, 1:].detach()
    ((z_m - target) ** 2).mean().backward()
    torch.testing.assert_close(got, model.backbone.patch_embed.weight.grad)


def test_config_is_the_papers():
    cfg = cae.Config()
    assert (cfg.mask_ratio, cfg.min_block_patches, cfg.min_aspect) == (0.5, 16, 0.3)
    assert (cfg.regressor_depth, cfg.decoder_depth, cfg.decoder_heads, cfg.layer_scale, cfg.lambd) == (4, 4, 12, 0.1, 2.0)
    assert (cfg.optimizer, cfg.weight_decay, cfg.betas, cfg.warmup_epochs, cfg.epochs) == ("adamw", 0.05, (0.9, 0.999), 20, 800)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(1.5e-3) and cfg.batch_size == 2048
    assert cfg.min_scale == 0.08
    vit = backbones.ViT(backbones.ViTConfig(image_size=56, patch_size=4, dim=48, depth=1, heads=2))  # 14 x 14
    model = cae.MODEL(vit, 48, cfg)
    assert model.num_masked == 98 and len(model.neck.regressor) == 4 and len(model.neck.decoder) == 4
    assert model.neck.regressor[0].attn.num_heads == 12 and model.neck.head.out_features == 4 * 4 * 3


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        cae.MODEL(backbones.SmallCNN(width=8), 64, cae.Config())


def test_embed_is_the_cls_token_of_the_whole_image():
    model = _model().eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model.embed(x), model.backbone.forward_tokens(x)[:, 0])


def test_view_recipe_is_one_crop():
    cfg = methods.make_config(cae, preset="small")
    pipelines = cae.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None
    crop = [t for t in pipelines[0].transforms if isinstance(t, v2.RandomResizedCrop)]
    assert len(crop) == 1 and crop[0].scale == (0.4, 1.0)
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in pipelines[0].transforms)
    assert not any(isinstance(t, v2.ColorJitter) for t in pipelines[0].transforms)  # --color_jitter 0
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields():
    fields = set(cae.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in cae.PRESETS.values())


def test_smoke_fit_lowers_the_loss():
    cfg = cae.Config(regressor_depth=1, decoder_depth=1, decoder_heads=2, min_block_patches=2)
    model = cae.MODEL(_vit(image_size=32, patch=8), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(cae, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # a new mask each step, as in training
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
