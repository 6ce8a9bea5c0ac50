"""SimMIM: the coarse random masking, the L1 loss on masked pixels and the linear head against literal
computations, mask tokens inside the encoder, the raw input as the target, gradients, the official weight-decay
groups, the ViT-only and mask-size errors, the probe features, the view recipe, a smoke fit."""

import math

import pytest
import torch
from torchvision.transforms import v2

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

simmim = load("simmim")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(image_size=16, patch=4, mask_patch=8, depth=1, **kw):
    vit = _vit(image_size, patch, depth=depth)
    return simmim.MODEL(vit, vit.feature_dim, simmim.Config(mask_patch_size=mask_patch, **kw))


def _fix_mask(monkeypatch, mask):
    monkeypatch.setattr(simmim, "coarse_random_masking", lambda *a, **k: mask)


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,image,mask_patch,model_patch,ratio,masked_cells", [
    (3, 224, 32, 16, 0.6, 30),  # the paper's ViT-B: 7 x 7 cells over 14 x 14 patches, ceil(29.4)
    (3, 32, 8, 4, 0.6, 10),  # the small preset: 4 x 4 cells over 8 x 8 patches, ceil(9.6)
    (2, 16, 4, 4, 0.5, 8),  # mask patch = ViT patch: plain random patch masking
    (2, 32, 16, 4, 0.0, 0),
    (2, 32, 16, 4, 0.99, 4),
])
def test_coarse_masking(n, image, mask_patch, model_patch, ratio, masked_cells):
    mask = simmim.coarse_random_masking(n, image, mask_patch, model_patch, ratio,
                                        generator=torch.Generator().manual_seed(1))
    grid, side, scale = image // model_patch, image // mask_patch, mask_patch // model_patch
    assert mask.shape == (n, grid * grid) and mask.dtype == torch.bool
    for row in range(n):
        fine = mask[row].view(grid, grid)
        coarse = [[bool(fine[i * scale, j * scale]) for j in range(side)] for i in range(side)]
        assert sum(map(sum, coarse)) == masked_cells
        for i in range(grid):  # every ViT patch carries the state of the mask cell it lies in
            for j in range(grid):
                assert bool(fine[i, j]) == coarse[i // scale][j // scale]
        assert int(mask[row].sum()) == masked_cells * scale * scale
    again = simmim.coarse_random_masking(n, image, mask_patch, model_patch, ratio,
                                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)  # seeded: the same masks
    other = simmim.coarse_random_masking(n, image, mask_patch, model_patch, ratio,
                                         generator=torch.Generator().manual_seed(2))
    assert masked_cells in (0, side * side) or not torch.equal(mask, other)


def test_masking_errors():
    with pytest.raises(ValueError, match="must divide the 32-px image"):
        simmim.coarse_random_masking(2, 32, 12, 4, 0.6)
    with pytest.raises(ValueError, match="multiple of the 6-px ViT patch"):
        simmim.coarse_random_masking(2, 32, 16, 6, 0.6)
    with pytest.raises(ValueError, match="mask ratio 1.5"):
        simmim.coarse_random_masking(2, 32, 8, 4, 1.5)


def test_masks_are_uniform_and_differ_between_images():
    mask = simmim.coarse_random_masking(256, 32, 8, 4, 0.6, generator=torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) > 250
    freq = mask.float().mean(0)  # 10 of 16 cells: 0.625 everywhere in expectation
    assert freq.min() > 0.5 and freq.max() < 0.75


# --- loss -----------------------------------------------------------------------------------------


def loss_literal(pred, target, mask, patch):
    n, c, h, w = target.shape
    grid_w = w // patch
    total, pixels = 0.0, 0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if not mask[i, (y // patch) * grid_w + x // patch]:
                    continue
                pixels += 1
                total += sum(abs(pred[i, ch, y, x].item() - target[i, ch, y, x].item()) for ch in range(c))
    return total / (pixels + 1e-5) / c


@pytest.mark.parametrize("n,c,size,patch", [(2, 3, 8, 4), (3, 1, 6, 2), (1, 3, 9, 3)])
def test_loss_matches_literal_computation(n, c, size, patch):
    g = torch.Generator().manual_seed(n + size)
    pred = torch.randn(n, c, size, size, generator=g, dtype=torch.float64)
    target = 2 * torch.randn(n, c, size, size, generator=g, dtype=torch.float64) + 1
    mask = torch.rand(n, (size // patch) ** 2, generator=g) < 0.6
    mask[0, 0] = True
    got = simmim.simmim_loss(pred, target, mask, patch).item()
    assert got == pytest.approx(loss_literal(pred, target, mask, patch), rel=1e-12)


def test_loss_counts_only_masked_pixels():
    target = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)  # 2 x 2 patches of 4 px
    assert simmim.simmim_loss(target, target, mask, 4).item() == 0.0  # the pixels themselves are the minimum
    wrong_visible = target.clone()
    wrong_visible[0, :, :4, 4:] += 100.0  # patch 1 of image 0 is visible: costs nothing
    wrong_visible[1, :, :4, :4] -= 100.0
    assert simmim.simmim_loss(wrong_visible, target, mask, 4).item() == 0.0
    off_by_one = target + 1.0  # an error of 1 on every value: a mean of 1 (up to the official 1e-5)
    assert simmim.simmim_loss(off_by_one, target, mask, 4).item() == pytest.approx(1.0, rel=1e-6)
    one_channel = target.clone()
    one_channel[:, 0] += 3.0  # 3 on one channel of three: the mean over channels is 1
    assert simmim.simmim_loss(one_channel, target, mask, 4).item() == pytest.approx(1.0, rel=1e-6)


# --- model ----------------------------------------------------------------------------------------


def test_mask_tokens_replace_the_embeddings_before_the_position_embedding():
    """With no blocks each output token is the final norm of its input: masked patches give the mask token
    plus their own position embedding, visible ones their patch embedding plus it."""
    vit = _vit(depth=0)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 6, 7]] = True
    mask[1, 0] = True
    token = torch.randn(1, 1, 32)
    out = simmim.masked_vit_tokens(vit, x, mask, token)  # (2, 17, 32)
    assert out.shape == (2, 17, 32)
    embedded = vit.patch_embed(x).flatten(2).transpose(1, 2)  # (2, 16, 32)
    for n in range(2):
        torch.testing.assert_close(out[n, 0], vit.norm(vit.cls_token[0, 0]))
        for pos in range(16):
            inp = token[0, 0] if mask[n, pos] else embedded[n, pos]
            torch.testing.assert_close(out[n, 1 + pos], vit.norm(inp + vit.pos_embed[pos]))
    assert not torch.allclose(out[0, 2], out[0, 7])  # two mask tokens, told apart by their positions


def test_encoder_sees_every_position_but_not_the_masked_pixels():
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = simmim.coarse_random_masking(2, 16, 8, 4, 0.6, generator=torch.Generator().manual_seed(0))  # 3 of 4
    tokens = simmim.masked_vit_tokens(model.backbone, x, mask, model.mask_token)
    assert tokens.shape == (2, 1 + 16, 32)  # all 16 positions, unlike MAE's encoder
    masked_l, visible_l = int(torch.nonzero(mask[0])[0]), int(torch.nonzero(~mask[0])[0])
    y = x.clone()
    i, j = divmod(masked_l, 4)
    y[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = torch.randn(3, 4, 4)  # pixels under the mask
    torch.testing.assert_close(simmim.masked_vit_tokens(model.backbone, y, mask, model.mask_token), tokens)
    z = x.clone()
    i, j = divmod(visible_l, 4)
    z[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] += 1.0  # a visible patch: the mask tokens attend to it
    changed = simmim.masked_vit_tokens(model.backbone, z, mask, model.mask_token)
    assert not torch.allclose(changed[0, 1 + masked_l], tokens[0, 1 + masked_l])


def test_head_is_one_linear_map_from_each_token_to_its_pixels():
    model = _model()
    z = torch.randn(2, 32, 4, 4)  # (N, D, G, G)
    out = model.head(z)  # (N, 3, 16, 16)
    assert out.shape == (2, 3, 16, 16)
    weight, bias = model.head[0].weight[:, :, 0, 0], model.head[0].bias  # (p p C, D)
    for n in range(2):
        for i, j in ((0, 0), (1, 3), (3, 2)):
            for c in range(3):
                for a in range(4):
                    for b in range(4):
                        k = c * 16 + a * 4 + b  # PixelShuffle's channel order (C, p, p)
                        want = (weight[k] @ z[n, :, i, j] + bias[k]).item()
                        assert out[n, c, 4 * i + a, 4 * j + b].item() == pytest.approx(want, abs=1e-5)


def test_forward_regresses_the_input_pixels_on_the_masked_patches(monkeypatch):
    model = _model()
    x = torch.randn(3, 3, 16, 16)
    mask = simmim.coarse_random_masking(3, 16, 8, 4, 0.6, generator=torch.Generator().manual_seed(5))
    _fix_mask(monkeypatch, mask)
    out = model({"views": [x]})
    pred = model.predict(simmim.masked_vit_tokens(model.backbone, x, mask, model.mask_token))
    assert pred.shape == x.shape
    # the target is the normalised input itself: no per-patch normalisation
    assert out["loss"].item() == pytest.approx(loss_literal(pred.double(), x.double(), mask, 4), rel=1e-5)
    assert out["masked_fraction"].item() == pytest.approx(12 / 16)


def test_gradients_reach_the_encoder_the_mask_token_and_the_head():
    model = _model()
    model({"views": [torch.randn(4, 3, 16, 16)]})["loss"].backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].mlp[0].weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0
    assert model.head[0].weight.grad.abs().sum() > 0


def test_weight_decay_groups_are_the_official_ones():
    model = _model()
    groups = model.param_groups()
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    assert decay | no_decay == set(names) and not decay & no_decay
    assert id(model.backbone.cls_token) in no_decay  # official no_weight_decay: cls_token (and pos_embed)
    assert id(model.mask_token) in decay  # the ViT variant does not exempt it
    assert id(model.head[0].weight) in decay and id(model.head[0].bias) in no_decay
    assert all(names[i].endswith("bias") or "norm" in names[i] or names[i] == "backbone.cls_token" for i in no_decay)
    opt = train.build_optimizer(model, model.cfg, 1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_config_is_the_papers():
    cfg = simmim.Config()
    assert (cfg.mask_patch_size, cfg.mask_ratio, cfg.crop_scale, cfg.crop_ratio) == (32, 0.6, (0.67, 1.0), (0.75, 4 / 3))
    assert (cfg.optimizer, cfg.weight_decay, cfg.betas) == ("adamw", 0.05, (0.9, 0.999))
    assert (cfg.warmup_epochs, cfg.epochs, cfg.batch_size) == (10, 800, 2048)
    assert cfg.base_lr * 2048 / 256 == pytest.approx(1e-4 * 2048 / 512)  # official BASE_LR 1e-4 per 512
    vit = backbones.ViT(backbones.ViTConfig(image_size=224, patch_size=16, dim=16, depth=12, heads=2))  # ViT-B's grid
    model = simmim.MODEL(vit, 16, cfg)
    assert model.head[0].kernel_size == (1, 1) and model.head[0].out_channels == 16 * 16 * 3
    assert model.head[1].upscale_factor == 16
    assert model.embed_depth == 8  # the 8th of 12 blocks
    mask = simmim.coarse_random_masking(1, 224, cfg.mask_patch_size, 16, cfg.mask_ratio)
    assert int(mask.sum()) == 30 * 4  # 30 of 49 mask patches, 4 ViT patches each


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        simmim.MODEL(backbones.SmallCNN(width=8), 64, simmim.Config())


def test_mask_patches_must_fit_the_image():
    with pytest.raises(ValueError, match="masks every patch of the 32-px image"):
        simmim.MODEL(_vit(image_size=32), 32, simmim.Config())  # the paper's 32-px mask patches at 32 px
    with pytest.raises(ValueError, match="must divide"):
        simmim.MODEL(_vit(image_size=32), 32, simmim.Config(mask_patch_size=12))
    model = _model()
    with pytest.raises(ValueError, match="position embeddings for 16"):
        model({"views": [torch.randn(2, 3, 32, 32)]})


def test_embed_is_the_mean_patch_token_of_an_intermediate_block():
    vit = _vit(depth=6)
    model = simmim.MODEL(vit, 32, simmim.Config(mask_patch_size=8)).eval()
    assert model.embed_depth == 4  # round(6 x 8/12)
    x = torch.randn(3, 3, 16, 16)
    t = torch.cat([vit.cls_token.expand(3, -1, -1), vit.patchify_embed(x)], dim=1)  # (3, 17, 32)
    for blk in vit.blocks[:4]:
        t = blk(t)
    torch.testing.assert_close(model.embed(x), t[:, 1:].mean(dim=1))
    assert model.embed(x).shape == (3, 32)


def test_view_recipe_is_one_crop_and_flip():
    cfg = methods.make_config(simmim, preset="small")
    pipelines = simmim.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    crop = pipelines[0].transforms[1]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.67, 1.0) and crop.ratio == (0.75, 4 / 3)
    assert crop.interpolation in ("bilinear", v2.InterpolationMode.BILINEAR)  # torchvision's default, as officially
    assert [type(t).__name__ for t in pipelines[0].transforms] == [
        "ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None  # crop and flip run batched on the device
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields_and_fit_vit_tiny():
    fields = set(simmim.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in simmim.PRESETS.values())
    cfg = methods.make_config(simmim, preset="small")
    model = simmim.MODEL(backbones.ViT(backbones.ViTConfig(dim=16, depth=6, heads=2)), 16, cfg)  # vit_tiny's grid
    assert (model.image_size, model.patch, model.embed_depth) == (32, 4, 4)
    mask = simmim.coarse_random_masking(1, 32, cfg.mask_patch_size, 4, cfg.mask_ratio)
    assert int(mask.sum()) == 10 * 4  # 10 of 16 cells of 8 px


def test_smoke_fit_lowers_the_loss():
    cfg = simmim.Config(mask_patch_size=8)
    model = simmim.MODEL(_vit(image_size=32, patch=4, dim=32), 32, cfg)  # the small preset's geometry
    batch = train.prepare_batch(fixed_batch(simmim, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 5e-3)
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
