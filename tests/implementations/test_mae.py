"""MAE: patchify, the random masking and the loss against literal computations, the encoder seeing only the
visible patches, the decoder's un-shuffling, gradients, the ViT-only contract, the view recipe, a smoke fit."""

import math

import pytest
import torch

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

mae = load("mae")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    cfg = mae.Config(**{"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, **kw})
    vit = _vit()
    return mae.MODEL(vit, vit.feature_dim, cfg)


# --- patches and masks ----------------------------------------------------------------------------


def test_patchify_is_the_grid_in_row_major_order():
    x = torch.randn(2, 3, 8, 12)
    p = mae.patchify(x, 4)  # a 2 x 3 grid
    assert p.shape == (2, 6, 48)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[n, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]  # (C, p, p)
                want = [patch[c, r, s].item() for r in range(4) for s in range(4) for c in range(3)]
                assert p[n, 3 * i + j].tolist() == want
    with pytest.raises(ValueError, match="do not split into 5 px"):
        mae.patchify(x, 5)


def test_patch_order_is_the_strided_convs():
    """Token l of the ViT's patch embedding is a linear map of patchify's row l."""
    vit = _vit()
    x = torch.randn(2, 3, 16, 16)
    conv = vit.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    w = vit.patch_embed.weight.permute(0, 2, 3, 1).reshape(vit.feature_dim, -1)  # (D, p, p, C) flattened
    lin = mae.patchify(x, 4) @ w.T + vit.patch_embed.bias
    torch.testing.assert_close(conv, lin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,length,ratio", [(3, 16, 0.75), (2, 10, 0.5), (4, 64, 0.9), (1, 7, 0.0)])
def test_random_masking(n, length, ratio):
    keep, mask, restore = mae.random_masking(n, length, ratio, generator=torch.Generator().manual_seed(1))
    n_keep = int(length * (1 - ratio))
    assert keep.shape == (n, n_keep) and mask.shape == (n, length) and mask.dtype == torch.bool
    for row in range(n):
        kept = set(keep[row].tolist())
        assert len(kept) == n_keep  # distinct
        assert kept == {i for i in range(length) if not mask[row, i]}  # the mask is the complement
        # restore puts [kept (shuffled), removed] back into grid order: position restore[l] holds patch l
        shuffled = torch.empty(length, dtype=torch.long)
        shuffled[restore[row]] = torch.arange(length)
        assert shuffled[:n_keep].tolist() == keep[row].tolist()
        assert sorted(shuffled.tolist()) == list(range(length))
    again = mae.random_masking(n, length, ratio, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((keep, mask, restore), again))  # seeded: the same masks
    other = mae.random_masking(n, length, ratio, generator=torch.Generator().manual_seed(2))
    assert ratio == 0.0 or not torch.equal(mask, other[1])
    with pytest.raises(ValueError, match="mask ratio 1.0"):
        mae.random_masking(n, length, 1.0)


def test_masks_differ_between_samples():
    _, mask, _ = mae.random_masking(64, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) == 64
    assert mask.float().mean(0).min() > 0.4  # every position is masked for some samples: uniform, not fixed


def test_sincos_matches_the_formula():
    pos = mae.sincos_2d(3, 8)  # (9, 8): D/4 = 2 frequencies
    assert pos.shape == (9, 8)
    for k in range(9):
        row, col = divmod(k, 3)
        want = []
        for fn, coord in ((math.sin, col), (math.cos, col), (math.sin, row), (math.cos, row)):
            want += [fn(coord / 10000 ** (k / 2)) for k in range(2)]
        assert pos[k].tolist() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(pos, backbones.sincos_2d(3, 8))  # the encoder's own embeddings are the same
    with pytest.raises(ValueError, match="divisible by 4"):
        mae.sincos_2d(3, 6)


# --- loss -----------------------------------------------------------------------------------------


def loss_literal(pred, target, mask, norm_pix):
    total, count = 0.0, 0
    for n in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            if not mask[n, k]:
                continue
            t = target[n, k].tolist()
            if norm_pix:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            total += sum((a - b) ** 2 for a, b in zip(pred[n, k].tolist(), t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("n,length,values", [(2, 5, 6), (3, 8, 12)])
def test_loss_matches_literal_computation(norm_pix, n, length, values):
    g = torch.Generator().manual_seed(n + length)
    pred = torch.randn(n, length, values, generator=g, dtype=torch.float64)
    target = 3 * torch.randn(n, length, values, generator=g, dtype=torch.float64) + 1
    mask = torch.rand(n, length, generator=g) < 0.6
    mask[0, 0] = True
    got = mae.mae_loss(pred, target, mask, norm_pix).item()
    assert got == pytest.approx(loss_literal(pred, target, mask, norm_pix), rel=1e-12)


def test_loss_counts_only_masked_patches():
    target = torch.randn(2, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = (target - mean) / std
    assert mae.mae_loss(perfect, target, mask).item() == pytest.approx(0.0, abs=1e-12)
    wrong_visible = perfect.clone()
    wrong_visible[~mask] = 100.0  # errors on visible patches cost nothing
    assert mae.mae_loss(wrong_visible, target, mask).item() == pytest.approx(0.0, abs=1e-12)
    wrong_masked = perfect.clone()
    wrong_masked[mask] += 1.0  # an error of 1 everywhere on masked patches costs 1
    assert mae.mae_loss(wrong_masked, target, mask).item() == pytest.approx(1.0, rel=1e-12)
    # raw pixels: the pixels themselves are the minimum
    assert mae.mae_loss(target, target, mask, norm_pix=False).item() == 0.0


# --- model ----------------------------------------------------------------------------------------


def test_decoder_puts_tokens_back_at_their_patches():
    """With no decoder blocks each output depends on its own position only: kept patches on their encoded
    token, removed ones on the mask token (all alike but for the position embedding, zeroed here)."""
    dec = mae.Decoder(in_dim=8, num_patches=9, patch_values=5, dim=8, depth=0, heads=2)
    dec.pos_embed.zero_()
    keep, mask, restore = mae.random_masking(2, 9, 0.6, generator=torch.Generator().manual_seed(3))
    tokens = torch.randn(2, 1 + keep.shape[1], 8)
    out = dec(tokens, restore)  # (2, 9, 5)
    assert out.shape == (2, 9, 5)
    single = dec.pred(dec.norm(dec.embed(tokens)))  # (2, 1 + L_keep, 5) each token on its own
    fill = dec.pred(dec.norm(dec.mask_token[0, 0]))
    for n in range(2):
        for j, patch in enumerate(keep[n].tolist()):
            torch.testing.assert_close(out[n, patch], single[n, 1 + j])
        for patch in torch.nonzero(mask[n]).flatten().tolist():
            torch.testing.assert_close(out[n, patch], fill)


def test_encoder_sees_only_visible_patches(monkeypatch):
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    keep, mask, restore = mae.random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(mae, "random_masking", lambda *a, **k: (keep, mask, restore))
    pred = model.decoder(model.backbone.forward_tokens(x, keep), restore)
    # change the pixels of one removed patch of image 0: the prediction cannot change
    patch = int(torch.nonzero(mask[0])[0])
    y = x.clone()
    i, j = divmod(patch, 4)
    y[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = torch.randn(3, 4, 4)  # (a constant shift normalises away)
    torch.testing.assert_close(model.decoder(model.backbone.forward_tokens(y, keep), restore), pred)
    # the loss sees the change only through the target of that patch
    assert model({"views": [y]})["loss"].item() != model({"views": [x]})["loss"].item()
    tokens = model.backbone.forward_tokens(x, keep)
    assert tokens.shape == (2, 1 + 4, 32)  # CLS and the 4 visible patches of 16


def test_gradients_reach_the_encoder_and_the_mask_token():
    model = _model()
    loss = model({"views": [torch.randn(4, 3, 16, 16)]})["loss"]
    loss.backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.cls_token.grad.abs().sum() > 0
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert not model.decoder.pos_embed.requires_grad and "decoder.pos_embed" not in model.state_dict()


def test_config_is_the_papers():
    cfg = mae.Config()
    assert (cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, cfg.norm_pix_loss) == (0.75, 512, 8, True)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.betas) == ("adamw", 1.5e-4, 0.05, (0.9, 0.95))
    model = mae.MODEL(backbones.ViT(), 192, cfg)
    blocks = model.decoder.blocks
    assert len(blocks) == 8 and blocks[0].self_attn.num_heads == 16 and blocks[0].norm_first
    assert model.decoder.pred.out_features == 4 * 4 * 3  # one patch's pixels


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        mae.MODEL(backbones.SmallCNN(width=8), 64, mae.Config())


def test_embed_is_the_cls_token_of_the_whole_image():
    model = _model().eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model.embed(x), model.backbone.forward_tokens(x)[:, 0])


def test_view_recipe_is_one_crop():
    cfg = methods.make_config(mae, preset="small")
    pipelines = mae.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None  # crop and flip run batched on the device
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields():
    fields = set(mae.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in mae.PRESETS.values())


def test_smoke_fit_lowers_the_loss():
    cfg = mae.Config(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model = mae.MODEL(_vit(image_size=32, patch=8), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(mae, cfg, n=32), torch.device("cpu"), False, False)
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
