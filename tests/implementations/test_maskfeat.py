"""MaskFeat: the HOG targets and the block masks against literal loops, the loss against a literal
computation, the mask token inside the encoder, gradients, the Config, the ViT-only contract, the view
recipe, the evaluation features and a smoke fit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

maskfeat = load("maskfeat")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    vit = _vit()
    return maskfeat.MODEL(vit, vit.feature_dim, maskfeat.Config(**{"hog_cell": 2, **kw}))


def _integer_image(c, h, w, seed):
    """Integer intensities (scaled by a power of two): every gradient sum is exact in float64, so the tensor
    code and the loops see the same zero gradients and put them in the same orientation bin."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g).double() / 64


# --- HOG: literal loops over pixels and cells -------------------------------------------------------------


def hog_literal(img, cell, bins, sobel):
    """HOG of one image (C, H, W) as nested lists [c][bin][cell row][cell column], pixel by pixel: reflected
    borders, Sobel (or [1, 0, -1]) gradients, unsigned hard binning of atan2(gx, gy), per-cell L2 norm."""
    c, h, w = img.shape
    v = img.tolist()

    def px(ch, i, j):  # reflect padding (edge pixel not repeated)
        i = -i if i < 0 else (2 * (h - 1) - i if i > h - 1 else i)
        j = -j if j < 0 else (2 * (w - 1) - j if j > w - 1 else j)
        return v[ch][i][j]

    s = (1.0, 2.0, 1.0) if sobel else (0.0, 1.0, 0.0)
    hist = [[[[0.0] * (w // cell) for _ in range(h // cell)] for _ in range(bins)] for _ in range(c)]
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                gx = sum(s[a + 1] * (px(ch, i + a, j - 1) - px(ch, i + a, j + 1)) for a in (-1, 0, 1))
                gy = sum(s[a + 1] * (px(ch, i - 1, j + a) - px(ch, i + 1, j + a)) for a in (-1, 0, 1))
                b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
                hist[ch][b][i // cell][j // cell] += math.sqrt(gx * gx + gy * gy)
    for ch in range(c):
        for ci in range(h // cell):
            for cj in range(w // cell):
                norm = math.sqrt(sum(hist[ch][b][ci][cj] ** 2 for b in range(bins)))
                for b in range(bins):
                    hist[ch][b][ci][cj] /= max(norm, 1e-12)
    return hist


@pytest.mark.parametrize("sobel", [True, False])
@pytest.mark.parametrize("c,h,w,cell,patch", [(3, 16, 16, 4, 8), (3, 8, 12, 2, 4), (1, 8, 8, 4, 4)])
def test_hog_matches_literal_loops(sobel, c, h, w, cell, patch):
    imgs = torch.stack([_integer_image(c, h, w, seed) for seed in range(2)])  # (2, C, H, W) float64
    feats = maskfeat.hog_features(imgs, cell, 9, sobel)  # (2, C, 9, h', w')
    targets = maskfeat.hog_targets(imgs, patch, cell, 9, sobel)  # (2, L, K)
    u = patch // cell
    assert feats.dtype == torch.float64 and targets.shape == (2, (h // patch) * (w // patch), c * 9 * u * u)
    for n in range(2):
        hist = hog_literal(imgs[n], cell, 9, sobel)
        torch.testing.assert_close(feats[n], torch.tensor(hist, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        for k in range(targets.shape[1]):  # patch k of the row-major grid: (channel, bin, cell row, cell col)
            pi, pj = divmod(k, w // patch)
            want = [hist[ch][b][pi * u + ci][pj * u + cj]
                    for ch in range(c) for b in range(9) for ci in range(u) for cj in range(u)]
            assert targets[n, k].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hog_orientations_and_contrast_normalisation():
    cols = torch.arange(8, dtype=torch.float64)
    ramp_x = cols.expand(8, 8).expand(1, 3, 8, 8)  # intensity grows along x: gy = 0, theta = -pi/2
    hog = maskfeat.hog_features(ramp_x, 4)  # (1, 3, 9, 2, 2)
    assert torch.allclose(hog[:, :, 4], torch.ones(1, 3, 2, 2, dtype=torch.float64))  # all in bin 4 of 9
    ramp_y = ramp_x.transpose(2, 3)  # along y: gx = 0, theta = +-pi, the first bin
    assert torch.allclose(maskfeat.hog_features(ramp_y, 4)[:, :, 0], torch.ones(1, 3, 2, 2, dtype=torch.float64))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = maskfeat.hog_targets(x, 8, 4)
    # local contrast normalisation: a positive gain and an offset per channel change nothing
    scaled = x * torch.tensor([3.0, 0.5, 7.0], dtype=torch.float64).view(1, 3, 1, 1) - 2.0
    torch.testing.assert_close(maskfeat.hog_targets(scaled, 8, 4), ref)
    # unsigned orientation: the negated image (every gradient turned by pi) has the same histograms
    torch.testing.assert_close(maskfeat.hog_targets(-x, 8, 4), ref)
    # each (channel, cell) histogram has unit length; a flat image has none
    norms = maskfeat.hog_features(x, 4).pow(2).sum(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert maskfeat.hog_features(torch.ones(1, 3, 8, 8), 4).abs().sum() == 0
    # also in float32 at a value whose Sobel sums do not cancel exactly in a conv: zero, not rounding noise
    flat = torch.full((1, 3, 16, 16), -0.42421356)
    flat[..., 8:, 8:] = 1.3  # one textured corner
    hog = maskfeat.hog_features(flat, 4)  # (1, 3, 9, 4, 4)
    assert hog[..., 0, :].abs().sum() == 0 and hog[..., 3, 3].abs().sum() == 0  # cells away from the edge
    assert hog[..., 2, 2].norm(dim=-1).allclose(torch.ones(1, 3))
    with pytest.raises(ValueError, match="HOG cells of 3 px"):
        maskfeat.hog_features(x, 3)
    with pytest.raises(ValueError, match="patches of 6 px"):
        maskfeat.hog_targets(x, 6, 4)


def test_paper_target_size():
    """3 RGB channels x 9 bins x 2 x 2 cells of 8 px in a 16-px patch: 108 values (official ``pred_hog_classes``)."""
    assert maskfeat.hog_targets(torch.randn(1, 3, 224, 224), 16).shape == (1, 196, 108)


# --- block-wise masks ----------------------------------------------------------------------------------


def block_mask_literal(h, w, ratio, min_aspect, g):
    """The official MaskingGenerator for one image, loops over rows and columns, with the same uniform draws
    (four per candidate) as the vectorised function."""
    count = round(h * w * ratio)
    min_patches = count // 5
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    mask = [[0] * w for _ in range(h)]
    done = 0
    while done < count:
        budget, delta = count - done, 0
        for _ in range(10):
            u = torch.rand(4, 1, dtype=torch.float64, generator=g)[:, 0].tolist()
            area = min_patches + (budget - min_patches) * u[0]
            aspect = math.exp(lo + (hi - lo) * u[1])
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if bw < w and bh < h:
                top, left = int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1))
                taken = sum(mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                if 0 < bh * bw - taken <= budget:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if not mask[i][j]:
                                mask[i][j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        done += delta
    return [bool(v) for row in mask for v in row]


@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.4), (14, 14, 0.4), (6, 9, 0.5)])
def test_block_masking_follows_the_official_rule(h, w, ratio):
    for seed in range(5):
        got = maskfeat.block_masking(1, h, w, ratio, generator=torch.Generator().manual_seed(seed))
        want = block_mask_literal(h, w, ratio, 0.3, torch.Generator().manual_seed(seed))
        assert got.shape == (1, h * w) and got.dtype == torch.bool
        assert got[0].tolist() == want


def test_block_masking_counts_seeds_and_limits():
    g = torch.Generator().manual_seed(1)
    mask = maskfeat.block_masking(64, 8, 8, 0.4, generator=g)  # (64, 64)
    count = round(64 * 0.4)  # 26 patches of the 8 x 8 grid
    per_image = mask.sum(1)
    assert per_image.max() <= count and (per_image == count).float().mean() > 0.9
    assert len({tuple(m.tolist()) for m in mask}) == 64  # every image its own mask
    assert (mask.sum(0) > 0).all()  # every position gets masked somewhere: no fixed region
    again = maskfeat.block_masking(64, 8, 8, 0.4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)  # seeded: the same masks
    assert not torch.equal(mask, maskfeat.block_masking(64, 8, 8, 0.4, generator=torch.Generator().manual_seed(2)))
    # blocks, not scattered patches: masked patches have far more masked 4-neighbours than random ones
    scattered = torch.zeros(64, 64, dtype=torch.bool)
    scattered.scatter_(1, torch.rand(64, 64, generator=g).argsort(1)[:, :count], True)  # same count, random
    assert _masked_neighbours(mask) > 1.5 * _masked_neighbours(scattered)
    assert not maskfeat.block_masking(3, 8, 8, 0.0).any()  # ratio 0: nothing masked
    with pytest.raises(ValueError, match="mask ratio 1.0"):
        maskfeat.block_masking(2, 8, 8, 1.0)


def _masked_neighbours(mask):
    """Mean number of masked 4-neighbours of a masked patch, masks (N, 64) of an 8 x 8 grid."""
    grid = mask.view(-1, 8, 8).float()
    pad = F.pad(grid, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return ((neighbours * grid).sum() / grid.sum()).item()


# --- loss -----------------------------------------------------------------------------------------------


def loss_literal(pred, target, mask):
    total, count = 0.0, 0
    for n in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            if mask[n, k]:
                for a, b in zip(pred[n, k].tolist(), target[n, k].tolist()):
                    total += (a - b) ** 2
                    count += 1
    return total / count


@pytest.mark.parametrize("n,length,values", [(2, 5, 6), (3, 8, 27)])
def test_loss_matches_literal_computation(n, length, values):
    g = torch.Generator().manual_seed(n + length)
    pred = torch.randn(n, length, values, generator=g, dtype=torch.float64)
    target = torch.rand(n, length, values, generator=g, dtype=torch.float64)
    mask = torch.rand(n, length, generator=g) < 0.5
    mask[0, 0] = True
    got = maskfeat.maskfeat_loss(pred, target, mask).item()
    assert got == pytest.approx(loss_literal(pred, target, mask), rel=1e-12)


def test_loss_counts_only_masked_patches():
    target = torch.rand(2, 6, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert maskfeat.maskfeat_loss(target, target, mask).item() == 0.0  # the HOG itself is the minimum
    wrong_visible = target.clone()
    wrong_visible[~mask] = 100.0  # errors on visible patches cost nothing
    assert maskfeat.maskfeat_loss(wrong_visible, target, mask).item() == 0.0
    wrong_masked = target.clone()
    wrong_masked[mask] += 0.5  # an error of 0.5 in every value of the masked patches costs 0.25
    assert maskfeat.maskfeat_loss(wrong_masked, target, mask).item() == pytest.approx(0.25, rel=1e-12)


# --- model ----------------------------------------------------------------------------------------------


def _fixed_mask(monkeypatch, n, seed=0):
    mask = maskfeat.block_masking(n, 4, 4, 0.4, generator=torch.Generator().manual_seed(seed))  # (N, 16)
    monkeypatch.setattr(maskfeat, "block_masking", lambda *a, **k: mask)
    return mask


def test_mask_token_replaces_masked_patches_inside_the_encoder(monkeypatch):
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = _fixed_mask(monkeypatch, 2)
    seen = {}
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(t=args[0].detach().clone()))
    model({"views": [x]})
    t = seen["t"]  # (N, 1 + L, D): the first block sees every position, CLS first (unlike MAE's encoder)
    assert t.shape == (2, 1 + 16, 32)
    bb = model.backbone
    patches = bb.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    for n in range(2):
        torch.testing.assert_close(t[n, 0], bb.cls_token[0, 0])
        for k in range(16):
            want = (model.mask_token[0, 0] if mask[n, k] else patches[n, k]) + bb.pos_embed[k]
            torch.testing.assert_close(t[n, 1 + k], want)
    # the pixels of a masked patch cannot reach the encoder's output, only the target
    tokens = maskfeat.masked_tokens(bb, x, mask, model.mask_token)
    i, j = divmod(int(torch.nonzero(mask[0])[0]), 4)
    y = x.clone()
    y[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = torch.randn(3, 4, 4)
    torch.testing.assert_close(maskfeat.masked_tokens(bb, y, mask, model.mask_token), tokens)
    assert model({"views": [y]})["loss"].item() != model({"views": [x]})["loss"].item()
    # the mask token goes through attention: it moves the outputs of the visible patches too
    moved = maskfeat.masked_tokens(bb, x, mask, model.mask_token + torch.randn(1, 1, 32))
    visible = torch.nonzero(~mask[0])[0].item()
    assert not torch.allclose(moved[0, 1 + visible], tokens[0, 1 + visible])


def test_forward_wiring(monkeypatch):
    """Head on the final-norm patch tokens, the loss on the masked patches against the view's HOG."""
    model = _model().eval()
    x = torch.randn(3, 3, 16, 16)
    mask = _fixed_mask(monkeypatch, 3, seed=4)
    out = model({"views": [x]})
    pred = model.head(maskfeat.masked_tokens(model.backbone, x, mask, model.mask_token)[:, 1:])  # (N, L, K)
    target = maskfeat.hog_targets(x, 4, 2)  # (N, 16, 108)
    assert pred.shape == target.shape == (3, 16, 108)
    torch.testing.assert_close(out["loss"], maskfeat.maskfeat_loss(pred, target, mask))
    assert out["masked_fraction"].item() == pytest.approx(mask.float().mean().item())


def test_gradients_reach_the_encoder_and_the_mask_token():
    model = _model()
    model({"views": [torch.randn(4, 3, 16, 16)]})["loss"].backward()
    bb = model.backbone
    for p in (bb.patch_embed.weight, bb.cls_token, bb.blocks[0].attn.in_proj_weight, bb.norm.weight,
              model.mask_token, model.head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not bb.pos_embed.requires_grad


def test_config_is_the_papers():
    cfg = maskfeat.Config()
    assert (cfg.mask_ratio, cfg.mask_min_aspect) == (0.4, 0.3)
    assert (cfg.hog_bins, cfg.hog_cell, cfg.hog_sobel) == (9, 8, True)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.betas) == ("adamw", 2e-4, 0.05, (0.9, 0.999))
    assert (cfg.warmup_epochs, cfg.epochs, cfg.batch_size, cfg.min_scale) == (30, 1600, 2048, 0.5)
    vit16 = backbones.ViT(backbones.ViTConfig(image_size=32, patch_size=16, dim=16, depth=1, heads=2))
    model = maskfeat.MODEL(vit16, 16, cfg)
    assert model.head.out_features == 108  # a linear head to 3 x 9 x 2 x 2 HOG values per 16-px patch
    assert model.mask_token.shape == (1, 1, 16)


def test_small_preset_scales_the_cell_to_the_patch():
    cfg = methods.make_config(maskfeat, preset="small")
    assert cfg.hog_cell == 2 and cfg.mask_ratio == 0.4
    model = maskfeat.MODEL(backbones.build_backbone("vit_tiny", 32), 192, cfg)
    assert model.patch == 4 and model.head.out_features == 108  # 2 x 2 cells per 4-px patch, as 8 in 16
    fields = set(maskfeat.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in maskfeat.PRESETS.values())


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        maskfeat.MODEL(backbones.SmallCNN(width=8), 64, maskfeat.Config())
    with pytest.raises(ValueError, match="HOG cells of 8 px"):
        maskfeat.MODEL(_vit(), 32, maskfeat.Config())  # 4-px patches, the paper's 8-px cells


def test_embed_is_the_mean_patch_token_of_the_whole_image():
    model = _model().eval()
    bb = model.backbone
    x = torch.randn(3, 3, 16, 16)
    t = bb.patch_embed(x).flatten(2).transpose(1, 2) + bb.pos_embed  # (N, L, D), no mask token
    t = torch.cat([bb.cls_token.expand(3, -1, -1), t], dim=1)
    for blk in bb.blocks:
        t = blk(t)
    mean = t[:, 1:].mean(1)
    want = (mean - mean.mean(1, keepdim=True)) / (mean.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(model.embed(x), want)
    assert model.embed(x).shape == (3, 32)


def test_view_recipe_is_one_crop():
    cfg = methods.make_config(maskfeat, preset="small")
    pipelines = maskfeat.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    crop = pipelines[0].transforms[1]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.5, 1.0)
    assert [type(t).__name__ for t in pipelines[0].transforms] == [
        "ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None  # crop and flip run batched on the device
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_smoke_fit_lowers_the_loss():
    cfg = maskfeat.Config(hog_cell=4)  # 2 x 2 cells per 8-px patch
    model = maskfeat.MODEL(_vit(image_size=32, patch=8), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(maskfeat, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # a new mask each step, as in training
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
