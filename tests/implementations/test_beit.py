"""BEiT: the blockwise masking against a literal Algorithm 1 fed the same random numbers, the loss against a
literal cross-entropy, the k-means tokenizer, the mask token inside the encoder, gradients, the ViT-only
contract, the view recipe, the linear-probe features, a smoke fit."""

import math

import pytest
import torch

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

beit = load("beit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=2):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(vocab=8, **kw):
    cfg = beit.Config(**{"vocab_size": vocab, "min_block_patches": 2, "probe_layer": -1, **kw})
    vit = _vit()
    model = beit.MODEL(vit, vit.feature_dim, cfg)
    g = torch.Generator().manual_seed(5)
    model.fit_tokenizer(torch.randn(200, 4 * 4 * 3, generator=g))
    return model


# --- blockwise masking ------------------------------------------------------------------------------


def algorithm1(draws, h, w, ratio, min_patches, min_aspect):
    """Algorithm 1 of the paper, written out with sets for one image; ``draws`` yields its (u0, u1, u2, u3)."""
    n_patches = h * w
    masked = set()
    while True:  # repeat
        u0, u1, u2, u3 = next(draws)
        s = min_patches + (ratio * n_patches - len(masked) - min_patches) * u0  # s <- Rand(16, 0.4N - |M|)
        lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
        r = math.exp(lo + (hi - lo) * u1)  # r <- Rand(0.3, 1/0.3)
        a, b = round(math.sqrt(s * r)), round(math.sqrt(s / r))
        if a <= h and b <= w:
            t, left = int(u2 * (h - a + 1)), int(u3 * (w - b + 1))  # t <- Rand(0, h - a), l <- Rand(0, w - b)
            masked |= {(i, j) for i in range(t, t + a) for j in range(left, left + b)}
        if len(masked) > ratio * n_patches:  # until |M| > 0.4N
            return masked


@pytest.mark.parametrize("n,h,w,ratio,min_patches", [(6, 14, 14, 0.4, 16), (5, 8, 8, 0.4, 5), (4, 6, 9, 0.5, 4),
                                                     (3, 4, 4, 0.3, 16)])
def test_blockwise_masking_is_algorithm_1(n, h, w, ratio, min_patches):
    mask = beit.blockwise_masking(n, h, w, ratio, min_patches, 0.3, generator=torch.Generator().manual_seed(7))
    assert mask.shape == (n, h * w) and mask.dtype == torch.bool
    g = torch.Generator().manual_seed(7)
    rounds = [torch.rand(4, n, dtype=torch.float64, generator=g) for _ in range(200)]  # the same stream
    for i in range(n):
        draws = (tuple(u[:, i].tolist()) for u in rounds)  # image i's k-th block uses round k
        want = algorithm1(draws, h, w, ratio, min_patches, 0.3)
        got = {divmod(k, w) for k in torch.nonzero(mask[i]).flatten().tolist()}
        assert got == want
        assert len(got) > ratio * h * w


def test_blockwise_masking_counts_seeds_and_limits():
    mask = beit.blockwise_masking(256, 14, 14, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert counts.min() > 0.4 * 196 and counts.max() < 0.4 * 196 + 40  # stops just past 40%
    assert 0.4 < counts.double().mean() / 196 < 0.5
    assert len({tuple(m.tolist()) for m in mask}) == 256  # every image its own mask
    assert mask.float().mean(0).min() > 0.03  # no position is left out (corners least often, as blocks)
    again = beit.blockwise_masking(256, 14, 14, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, beit.blockwise_masking(256, 14, 14, generator=torch.Generator().manual_seed(1)))
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    grid = mask.view(-1, 14, 14)
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & nb).sum() / grid.sum() > 0.95
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="must be in"):
            beit.blockwise_masking(2, 4, 4, bad)


# --- loss -------------------------------------------------------------------------------------------


def loss_literal(logits, tokens, mask):
    total, rows = 0.0, 0
    for n in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[n, i]:
                continue
            scores = logits[rows].tolist()
            log_z = math.log(sum(math.exp(v) for v in scores))
            total += log_z - scores[int(tokens[n, i])]  # -log p_MIM(z_i | x^M)
            rows += 1
    return total / rows


@pytest.mark.parametrize("n,length,k", [(2, 5, 7), (3, 9, 4)])
def test_loss_matches_literal_cross_entropy(n, length, k):
    g = torch.Generator().manual_seed(n + k)
    mask = torch.rand(n, length, generator=g) < 0.5
    mask[0, 0] = True
    tokens = torch.randint(k, (n, length), generator=g)
    logits = 3 * torch.randn(int(mask.sum()), k, generator=g, dtype=torch.float64)
    got = beit.beit_loss(logits, tokens, mask).item()
    assert got == pytest.approx(loss_literal(logits, tokens, mask), rel=1e-6)


def test_loss_limits():
    tokens = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    uniform = torch.zeros(int(mask.sum()), 4)
    assert beit.beit_loss(uniform, tokens, mask).item() == pytest.approx(math.log(4))
    sure = 50 * torch.nn.functional.one_hot(tokens[mask], 4).float()  # right token at every masked position
    assert beit.beit_loss(sure, tokens, mask).item() < 1e-12
    # visible positions have no score at all: their tokens cannot change the loss
    other = tokens.clone()
    other[~mask] = (other[~mask] + 1) % 4
    assert beit.beit_loss(sure, other, mask).item() < 1e-12


# --- tokenizer --------------------------------------------------------------------------------------


def test_visual_tokens_are_the_nearest_code_of_each_normalised_patch():
    g = torch.Generator().manual_seed(0)
    images, codebook = torch.randn(2, 3, 8, 8, generator=g), torch.randn(5, 12, generator=g)
    tokens = beit.visual_tokens(images, codebook, 2)
    assert tokens.shape == (2, 16)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                patch = [images[n, c, 2 * i + r, 2 * j + s].item() for r in range(2) for s in range(2) for c in range(3)]
                mean = sum(patch) / 12
                std = math.sqrt(sum((v - mean) ** 2 for v in patch) / 11 + 1e-6)
                patch = [(v - mean) / std for v in patch]
                dist = [sum((a - b) ** 2 for a, b in zip(patch, code.tolist())) for code in codebook]
                assert tokens[n, 4 * i + j].item() == dist.index(min(dist))


def test_tokenizer_is_fitted_once_from_the_training_patches_and_is_a_buffer():
    model = beit.MODEL(_vit(), 32, beit.Config(vocab_size=6, tokenizer_patches=40, probe_layer=-1))
    with pytest.raises(RuntimeError, match="no codebook yet"):
        model({"views": [torch.randn(2, 3, 16, 16)]})
    model.setup(num_samples=10, num_classes=2)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []

    def features(encode):  # what the harness does: every training image in index order, batched
        out = torch.cat([encode(images[:6]), encode(images[6:])])
        seen.append(out)
        return out

    model.on_epoch_start(0, 3, features)
    assert seen[0].shape == (10, 4 * 48)  # ceil(40 / 10) = 4 patches of each image
    patches = beit.patchify(images, 4)  # every sampled row is one of that image's patches
    rows = seen[0].view(10, 4, 48)
    assert all(any(torch.equal(rows[n, k], p) for p in patches[n]) for n in range(10) for k in range(4))
    assert bool(model.codebook_ready) and model.codebook.abs().sum() > 0
    assert "codebook" in model.state_dict() and not model.codebook.requires_grad
    first = model.codebook.clone()
    model.on_epoch_start(1, 3, features)  # later epochs (and a resumed run) keep the codebook
    assert len(seen) == 1 and torch.equal(model.codebook, first)
    other = beit.MODEL(_vit(), 32, beit.Config(vocab_size=6, tokenizer_patches=40, probe_layer=-1))
    other.setup(10, 2)
    other.on_epoch_start(0, 3, features)
    assert torch.equal(other.codebook, first)  # seeded: the same codebook on every rank and rerun
    # the codebook is the k-means of the normalised patches
    labels = beit.nearest_centroid(beit.normalize_patches(rows.reshape(-1, 48)), first)
    assert len(set(labels.tolist())) == 6


# --- model ------------------------------------------------------------------------------------------


def test_encoder_without_mask_is_the_vit():
    vit = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    final, outputs = beit.masked_encoder(vit, x)
    torch.testing.assert_close(final, vit.forward_tokens(x))
    assert len(outputs) == 2 and outputs[-1].shape == (2, 17, 32)


def test_mask_token_replaces_masked_patches_inside_the_encoder(monkeypatch):
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 5, 6]] = True
    mask[1, [10, 11]] = True
    enc, _ = beit.masked_encoder(model.backbone, x, mask, model.mask_token)
    # the pixels of a masked patch do not reach the encoder
    y = x.clone()
    y[0, :, 0:4, 4:8] = torch.randn(3, 4, 4)  # patch 1 of image 0
    torch.testing.assert_close(beit.masked_encoder(model.backbone, y, mask, model.mask_token)[0], enc)
    # the mask token does, at every position (the blocks mix it in)
    changed = beit.masked_encoder(model.backbone, x, mask, model.mask_token + 1)[0]
    assert (changed - enc).abs().amax(dim=-1).min() > 0
    # it replaces the patch embedding before the position embedding: same as a patch whose embedding is e_[M]
    t = model.backbone.patch_embed(x).flatten(2).transpose(1, 2)
    t = torch.where(mask[..., None], model.mask_token, t) + model.backbone.pos_embed
    t = torch.cat([model.backbone.cls_token.expand(2, -1, -1), t], 1)
    for blk in model.backbone.blocks:
        t = blk(t)
    torch.testing.assert_close(model.backbone.norm(t), enc)
    # forward: targets from the unmasked image, head on the masked positions only
    captured = {}
    monkeypatch.setattr(beit, "blockwise_masking", lambda *a, **k: mask)
    monkeypatch.setattr(beit, "beit_loss", lambda logits, tokens, m: captured.update(logits=logits, tokens=tokens)
                        or logits.sum())
    model({"views": [x]})
    assert torch.equal(captured["tokens"], beit.visual_tokens(x, model.codebook, 4))
    torch.testing.assert_close(captured["logits"], model.lm_head(enc[:, 1:][mask]))
    assert captured["logits"].shape == (6, 8)  # 6 masked patches, a vocabulary of 8


def test_gradients_reach_the_encoder_mask_token_and_head():
    model = _model()
    loss = model({"views": [torch.randn(4, 3, 16, 16)]})["loss"]
    loss.backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(b.grad is None for b in model.buffers())  # the tokenizer gets no gradient


def test_config_is_the_papers():
    cfg = beit.Config()
    assert (cfg.vocab_size, cfg.mask_ratio, cfg.min_block_patches, cfg.min_aspect) == (8192, 0.4, 16, 0.3)
    assert (cfg.optimizer, cfg.weight_decay, cfg.betas) == ("adamw", 0.05, (0.9, 0.999))
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(1.5e-3)
    assert (cfg.warmup_epochs, cfg.epochs, cfg.batch_size) == (10, 800, 2048)
    assert (cfg.color_jitter, cfg.min_scale) == (0.4, 0.08)
    vit = backbones.ViT()
    model = beit.MODEL(vit, 192, cfg)
    assert model.lm_head.out_features == 8192 and model.codebook.shape == (8192, 4 * 4 * 3)


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        beit.MODEL(backbones.SmallCNN(width=8), 64, beit.Config())
    with pytest.raises(ValueError, match="probe_layer -4"):
        beit.MODEL(_vit(depth=2), 32, beit.Config())


def test_embed_is_cls_and_mean_patch_token_of_the_probe_block():
    model = _model(probe_layer=-2).eval()
    x = torch.randn(3, 3, 16, 16)
    t = model.backbone.cls_token.expand(3, -1, -1)
    t = torch.cat([t, model.backbone.patch_embed(x).flatten(2).transpose(1, 2) + model.backbone.pos_embed], 1)
    t = model.backbone.blocks[0](t)  # block 1 of 2, no final norm
    torch.testing.assert_close(model.embed(x), torch.cat([t[:, 0], t[:, 1:].mean(1)], 1))


def test_view_recipe_is_one_jittered_crop():
    cfg = methods.make_config(beit, preset="small")
    pipelines = beit.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    names = [type(t).__name__ for t in pipelines[0].transforms]
    assert names[1:4] == ["ColorJitter", "RandomHorizontalFlip", "RandomResizedCrop"]
    assert pipelines[0].transforms[3].scale == (0.4, 1.0)
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields():
    fields = set(beit.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in beit.PRESETS.values())


def test_smoke_fit_lowers_the_loss():
    cfg = beit.Config(vocab_size=16, min_block_patches=2, probe_layer=-1)
    model = beit.MODEL(_vit(image_size=32, patch=8), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(beit, cfg, n=32), torch.device("cpu"), False, False)
    model.fit_tokenizer(beit.patchify(batch["views"][0], 8).flatten(0, 1))
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
    assert sum(losses[:5]) / 5 < math.log(16)  # below chance from the start: the tokens are not uniform
    # a token is not fully determined by its context, so the floor is well above 0 (2.70 -> 2.28 here)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
