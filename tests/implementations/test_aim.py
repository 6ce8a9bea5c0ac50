"""AIM: the prefix lengths and the prefix-causal mask, the block walk against the harness's own blocks, what each
position sees, the next-patch loss against a literal computation, gradients, the frozen CLS token, the Config,
the ViT-only contract, the view recipe and a smoke fit."""

import math

import pytest
import torch

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

aim = load("aim")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=32, depth=2):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    cfg = aim.Config(**{"head_dim": 16, "head_depth": 1, **kw})
    vit = _vit()
    return aim.MODEL(vit, vit.feature_dim, cfg)


# --- prefix lengths and the mask ------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 5, 16])
def test_prefix_lengths_are_uniform_on_1_to_L_minus_1(length):
    s = aim.sample_prefix_lengths(4000, length, generator=torch.Generator().manual_seed(1))
    assert s.shape == (4000,) and s.dtype == torch.long
    assert s.min() >= 1 and s.max() <= length - 1  # one patch of context at least, one to predict at least
    counts = torch.bincount(s, minlength=length)[1:]  # (L-1,) how often each of 1..L-1 was drawn
    assert (counts > 0).all()  # every length occurs
    expected = 4000 / (length - 1)
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)  # flat within 5 sigma
    again = aim.sample_prefix_lengths(4000, length, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, again)  # seeded: the same lengths
    other = aim.sample_prefix_lengths(4000, length, generator=torch.Generator().manual_seed(2))
    assert length == 2 or not torch.equal(s, other)
    with pytest.raises(ValueError, match="at least 2 patches"):
        aim.sample_prefix_lengths(3, 1)


def test_prefix_attention_matches_literal_rule():
    prefix_len = torch.tensor([1, 2, 4, 5])
    allowed = aim.prefix_attention(prefix_len, 6)  # (4, 6, 6)
    assert allowed.shape == (4, 6, 6) and allowed.dtype == torch.bool
    for n, s in enumerate(prefix_len.tolist()):
        for i in range(6):
            for j in range(6):
                both_in_prefix = i < s and j < s
                assert bool(allowed[n, i, j]) == (j <= i or both_in_prefix or j < s), (n, i, j)
                if j > i:  # a future key is visible only inside the prefix
                    assert bool(allowed[n, i, j]) == both_in_prefix
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(allowed[0], causal)  # S = 1: plain causal attention
    assert allowed.diagonal(dim1=1, dim2=2).all()  # no query is left without a key


# --- the ViT walked with a mask -------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_block_forward_is_the_blocks_own_computation(training):
    blk = backbones.Block(16, 2, 4.0).train(training)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(aim.block_forward(blk, x), blk(x), rtol=0, atol=0)
    nothing_blocked = torch.zeros(3 * 2, 7, 7, dtype=torch.bool)
    torch.testing.assert_close(aim.block_forward(blk, x, nothing_blocked), blk(x), rtol=1e-6, atol=1e-6)


def test_aim_tokens_are_the_vit_without_its_cls_token():
    vit = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    t = vit.patchify_embed(x)  # (N, L, D) with position embeddings, no CLS token
    for blk in vit.blocks:
        t = blk(t)
    got = aim.aim_tokens(vit, x)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, vit.norm(t), rtol=1e-6, atol=1e-6)
    everything = torch.ones(2, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(aim.aim_tokens(vit, x, everything), got, rtol=1e-6, atol=1e-6)


def _with_patch_changed(x, k, p=4, grid=4):
    y = x.clone()
    i, j = divmod(k, grid)
    y[:, :, p * i : p * i + p, p * j : p * j + p] = torch.randn(x.shape[0], 3, p, p)
    return y


@pytest.mark.parametrize("s", [1, 5, 15])
def test_each_position_sees_the_prefix_and_its_past_only(s):
    """Changing patch j leaves every position before j unchanged when j is past the prefix; inside the
    prefix the change reaches every position (bidirectional)."""
    vit = _vit().eval()
    x = torch.randn(1, 3, 16, 16)
    allowed = aim.prefix_attention(torch.tensor([s]), 16)
    base = aim.aim_tokens(vit, x, allowed)  # (1, L, D)
    for j in range(16):
        out = aim.aim_tokens(vit, _with_patch_changed(x, j), allowed)
        changed = (out - base).abs().amax(dim=-1)[0] > 1e-6  # (L,) which positions moved
        if j >= s:
            assert not changed[:j].any(), f"a position before patch {j} saw it (S = {s})"
            assert changed[j:].all()
        else:
            assert changed.all(), f"patch {j} of the prefix is not seen by every position (S = {s})"


def test_forward_predicts_each_patch_from_the_position_before_it(monkeypatch):
    model = _model()
    x = torch.randn(3, 3, 16, 16)
    prefix_len = torch.tensor([1, 7, 15])
    monkeypatch.setattr(aim, "sample_prefix_lengths", lambda *a, **k: prefix_len)
    tokens = aim.aim_tokens(model.backbone, x, aim.prefix_attention(prefix_len, 16))
    pred = model.head(tokens + model.backbone.pos_embed)  # (N, L, P)
    want = aim.aim_loss(pred, aim.patchify(x, 4), prefix_len)
    torch.testing.assert_close(model({"views": [x]})["loss"], want)
    # the prediction of patch k never depends on patch k itself: change patch 9 of every image
    y = _with_patch_changed(x, 9)
    pred_y = model.head(aim.aim_tokens(model.backbone, y, aim.prefix_attention(prefix_len, 16))
                        + model.backbone.pos_embed)
    for n, s in enumerate(prefix_len.tolist()):
        if s <= 9:  # patch 9 is predicted: its prediction (position 8) is blind to it
            torch.testing.assert_close(pred_y[n, 8], pred[n, 8])


# --- loss -----------------------------------------------------------------------------------------


def loss_literal(pred, target, prefix_len, norm_pix):
    n_images, length, values = pred.shape
    total = 0.0
    for n in range(n_images):
        per_image = 0.0
        for k in range(prefix_len[n], length):  # the patches after the prefix (0-based)
            t = target[n, k].tolist()
            if norm_pix:
                mean = sum(t) / values
                var = sum((v - mean) ** 2 for v in t) / (values - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            guess = pred[n, k - 1].tolist()  # the output one position earlier
            per_image += sum((a - b) ** 2 for a, b in zip(guess, t)) / values
        total += per_image / length  # Eq. (2): 1/K
    return total / n_images


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("n,length,values", [(2, 5, 6), (3, 9, 12)])
def test_loss_matches_literal_computation(norm_pix, n, length, values):
    g = torch.Generator().manual_seed(n + length)
    pred = torch.randn(n, length, values, generator=g, dtype=torch.float64)
    target = 3 * torch.randn(n, length, values, generator=g, dtype=torch.float64) + 1
    prefix_len = torch.randint(1, length, (n,), generator=g)
    prefix_len[0] = 1
    got = aim.aim_loss(pred, target, prefix_len, norm_pix).item()
    assert got == pytest.approx(loss_literal(pred, target, prefix_len.tolist(), norm_pix), rel=1e-12)


def test_loss_counts_only_the_patches_after_the_prefix():
    target = torch.randn(2, 6, 12, dtype=torch.float64)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    normed = (target - mean) / std
    prefix_len = torch.tensor([2, 4])
    perfect = torch.zeros_like(target)
    perfect[:, :-1] = normed[:, 1:]  # position k holds patch k + 1
    assert aim.aim_loss(perfect, target, prefix_len).item() == pytest.approx(0.0, abs=1e-12)
    wrong_elsewhere = perfect.clone()
    wrong_elsewhere[:, -1] = 100.0  # the last position predicts nothing
    wrong_elsewhere[0, :1] = 100.0  # image 0: position 0 predicts patch 1, inside its prefix of 2
    wrong_elsewhere[1, :3] = 100.0  # image 1: positions 0-2 predict patches 1-3, inside its prefix of 4
    assert aim.aim_loss(wrong_elsewhere, target, prefix_len).item() == pytest.approx(0.0, abs=1e-12)
    off_by_one = perfect + 1.0  # an error of 1 on every value: each image costs (K - S) / K
    want = ((6 - 2) / 6 + (6 - 4) / 6) / 2
    assert aim.aim_loss(off_by_one, target, prefix_len).item() == pytest.approx(want, rel=1e-12)
    raw = torch.zeros_like(target)
    raw[:, :-1] = target[:, 1:]
    assert aim.aim_loss(raw, target, prefix_len, norm_pix=False).item() == 0.0


# --- model ----------------------------------------------------------------------------------------


def test_gradients_reach_the_trunk_and_head_not_the_unused_cls_token():
    model = _model()
    loss = model({"views": [torch.randn(4, 3, 16, 16)]})["loss"]
    loss.backward()
    assert model.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.blocks[0].parameters())
    assert model.backbone.norm.weight.grad.abs().sum() > 0
    assert model.head.embed.weight.grad.abs().sum() > 0
    assert not model.backbone.cls_token.requires_grad and model.backbone.cls_token.grad is None
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # nothing DDP would wait for in vain


def test_config_is_the_papers():
    cfg = aim.Config()
    assert (cfg.head_dim, cfg.head_depth, cfg.head_mlp_ratio, cfg.norm_pix_loss, cfg.min_scale) == (2048, 12, 4.0, True, 0.4)
    assert (cfg.optimizer, cfg.batch_size, cfg.base_lr * cfg.batch_size / 256) == ("adamw", 4096, 1e-3)
    assert (cfg.weight_decay, cfg.betas, cfg.warmup_epochs, cfg.epochs) == (0.05, (0.9, 0.95), 100, 1600)
    with torch.device("meta"):  # the paper's head (~400M parameters) without allocating it
        head = aim.MLPHead(1536, cfg.head_dim, cfg.head_depth, cfg.head_mlp_ratio, 14 * 14 * 3)
    assert len(head.blocks) == 12 and head.embed.out_features == 2048 and head.pred.out_features == 588
    assert head.blocks[0].mlp[0].out_features == 4 * 2048
    assert all(m.bias is None for m in head.modules() if isinstance(m, torch.nn.Linear))  # no biases (Sec. 4.2)


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        aim.MODEL(backbones.SmallCNN(width=8), 64, aim.Config())


def test_embed_is_the_mean_patch_token_under_bidirectional_attention():
    model = _model().eval()
    x = torch.randn(3, 3, 16, 16)
    got = model.embed(x)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, aim.aim_tokens(model.backbone, x).mean(dim=1))
    # bidirectional: the first patch's token sees the last patch
    y = _with_patch_changed(x, 15)
    first = aim.aim_tokens(model.backbone, x)[:, 0]
    assert (aim.aim_tokens(model.backbone, y)[:, 0] - first).abs().max() > 1e-4
    # the CLS token plays no part
    model.backbone.cls_token.data.normal_()
    torch.testing.assert_close(model.embed(x), got)


def test_view_recipe_is_one_crop():
    cfg = methods.make_config(aim, preset="small")
    pipelines = aim.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 1
    crop = pipelines[0].transforms[1]
    assert crop.scale == (0.4, 1.0)
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None  # crop and flip run batched on the device
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_presets_name_config_fields():
    fields = set(aim.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in aim.PRESETS.values())


def test_smoke_fit_lowers_the_loss():
    cfg = aim.Config(head_dim=32, head_depth=1)
    model = aim.MODEL(_vit(image_size=32, patch=8, depth=1), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(aim, cfg, n=32), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # new prefix lengths each step, as in training
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
