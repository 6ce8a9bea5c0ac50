"""SiT: the corruption and rotation functions, the three losses and their uncertainty weighting against literal
computations, the token walk (rotation and contrastive tokens beside the patches), what the encoder sees,
gradients, the ViT-only contract, the paper's Config, the view recipe, a smoke fit."""

import math

import pytest
import torch

from selfsup import backbones, methods, train, views

from .helpers import fixed_batch, load

sit = load("atito-2021-sit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vit(image_size=16, patch=4, dim=16, depth=1):
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=2))


def _model(**kw):
    vit = _vit()
    return sit.MODEL(vit, vit.feature_dim, sit.Config(**{"contrastive_dim": 8, **kw}))


# --- rotations and corruptions --------------------------------------------------------------------


def test_rotation_is_counter_clockwise_and_seeded():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    out, k = sit.rotate_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and set(k.tolist()) == {0, 1, 2, 3}  # 16 draws cover all four
    for n in range(len(x)):
        want = x[n]
        for _ in range(int(k[n])):  # one quarter turn counter-clockwise: new[i][j] = old[j][S-1-i]
            want = torch.stack([torch.stack([want[:, j, 3 - i] for j in range(4)], dim=1) for i in range(4)], dim=1)
        assert torch.equal(out[n], want)
    again = sit.rotate_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], k)
    with pytest.raises(ValueError, match="square"):
        sit.rotate_batch(torch.zeros(1, 3, 4, 6))


def test_corruption_changes_only_the_masked_pixels_and_is_seeded():
    cfg = sit.Config()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bad, mask = sit.corrupt(x, cfg, torch.Generator().manual_seed(2))
    assert bad.shape == x.shape and mask.shape == (6, 1, 32, 32) and mask.dtype == torch.bool
    changed = (bad != x).any(dim=1, keepdim=True)
    assert not (changed & ~mask).any()  # nothing outside the mask moves
    assert mask.any() and (bad != x).any()
    again = sit.corrupt(x, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(again[0], bad) and torch.equal(again[1], mask)
    assert not torch.equal(sit.corrupt(x, cfg, torch.Generator().manual_seed(3))[1], mask)
    assert x.grad is None and torch.equal(x, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def test_corruption_off_is_the_identity():
    cfg = sit.Config(gray_prob=0.0, blur_prob=0.0, max_noise_drop=0.0, max_replace_drop=0.0)
    x = torch.randn(4, 3, 16, 16)
    bad, mask = sit.corrupt(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(bad, x) and not mask.any()


def test_noise_drop_covers_its_share():
    """Noise blocks only: the corrupted area reaches the drawn share U(0, max) and blocks are 5%-25% of a side."""
    cfg = sit.Config(gray_prob=0.0, blur_prob=0.0, max_noise_drop=0.3, max_replace_drop=0.0)
    _, mask = sit.corrupt(torch.zeros(64, 3, 40, 40), cfg, torch.Generator().manual_seed(0))
    share = mask.float().mean((1, 2, 3))
    assert share.max() <= 0.3 + 2 * 10 * 10 / 1600  # at most one block of 10x10 past the target
    assert share.mean() > 0.05 and (share == 0).sum() < 8


def test_replacement_copies_the_same_place_of_another_image():
    cfg = sit.Config(gray_prob=0.0, blur_prob=0.0, max_noise_drop=0.0, max_replace_drop=0.3)
    x = torch.stack([torch.full((3, 20, 20), float(v)) for v in range(5)])  # image n is constant n
    bad, mask = sit.corrupt(x, cfg, torch.Generator().manual_seed(4))
    for n in range(5):
        vals = set(bad[n][mask[n].expand(3, -1, -1)].tolist())
        assert vals <= set(range(5))  # copied, never noise
        torch.testing.assert_close(bad[n][~mask[n].expand(3, -1, -1)], x[n][~mask[n].expand(3, -1, -1)])
    # image 0 is corrupted first, from an image j != 0 still clean at that point: one value, not 0
    vals0 = set(bad[0][mask[0].expand(3, -1, -1)].tolist())
    assert mask[0].any() and len(vals0) == 1 and 0.0 not in vals0


def test_grey_block_is_the_channel_mean():
    cfg = sit.Config(gray_prob=1.0, blur_prob=0.0, max_noise_drop=0.0, max_replace_drop=0.0)
    x = torch.randn(3, 3, 16, 16)
    bad, mask = sit.corrupt(x, cfg, torch.Generator().manual_seed(5))
    m = mask.expand(-1, 3, -1, -1)
    grey = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(bad[m], grey[m])
    assert mask.sum() > 0


# --- loss -----------------------------------------------------------------------------------------


def nt_xent_literal(z1, z2, t):
    z = [[a / math.sqrt(sum(b * b for b in v)) for a in v] for v in z1.tolist() + z2.tolist()]
    n2, n = len(z), len(z) // 2
    total = 0.0
    for i in range(n2):
        sims = [sum(a * b for a, b in zip(z[i], z[k])) / t for k in range(n2)]
        pos = (i + n) % n2
        total += -sims[pos] + math.log(sum(math.exp(s) for k, s in enumerate(sims) if k != i))
    return total / n2


def test_losses_match_literal_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    rot = torch.tensor([0, 3, 1, 2, 2, 0])
    z1, z2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    recon, clean = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g,
                                                                                          dtype=torch.float64)
    got = sit.sit_losses(logits, rot, z1, z2, recon, clean, 0.5).tolist()
    ce = sum(-logits[m, rot[m]].item() + math.log(sum(math.exp(v) for v in logits[m].tolist())) for m in range(6)) / 6
    l1 = sum(abs(a - b) for a, b in zip(recon.flatten().tolist(), clean.flatten().tolist())) / recon.numel()
    assert got == pytest.approx([ce, nt_xent_literal(z1, z2, 0.5), l1], rel=1e-12)


def test_uncertainty_weighting_matches_literal_computation():
    losses = torch.tensor([1.3, 2.1, 0.4], dtype=torch.float64)
    s = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    want = sum(a * math.exp(-v) * L + 0.5 * v for a, v, L in zip((1.0, 1.0, 0.5), s.tolist(), losses.tolist()))
    assert sit.uncertainty_weighted(losses, s).item() == pytest.approx(want, rel=1e-12)


def test_reconstruction_scores_every_pixel():
    """l1 over the whole image: an error on an uncorrupted pixel costs as much as one on a corrupted one."""
    clean = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    logits, rot, z = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long), torch.eye(2)[:1]
    recon = clean.clone()
    recon[0, 0, 0, 0] = 48.0
    assert sit.sit_losses(logits, rot, z, z, recon, clean, 0.5)[2].item() == pytest.approx(1.0)


# --- model ----------------------------------------------------------------------------------------


def test_token_walk_has_rotation_contrastive_and_patch_tokens():
    model = _model().eval()
    vit = model.backbone
    x = torch.randn(2, 3, 16, 16)
    t = sit.sit_tokens(vit, x, model.contrastive_token)
    assert t.shape == (2, 2 + 16, 16)
    # literal: the same walk written out
    p = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed
    seq = torch.cat([vit.cls_token.expand(2, -1, -1), model.contrastive_token.expand(2, -1, -1), p], dim=1)
    for blk in vit.blocks:
        seq = blk(seq)
    torch.testing.assert_close(t, vit.norm(seq))
    rot, z, rec = model.heads(x)
    assert rot.shape == (2, 4) and z.shape == (2, 8) and rec.shape == (2, 3, 16, 16)
    torch.testing.assert_close(model.embed(x), torch.cat([t[:, 0], t[:, 1]], dim=1))


def test_reconstruction_head_maps_each_patch_token_to_its_own_patch():
    model = _model().eval()
    x = torch.randn(1, 3, 16, 16)
    t = sit.sit_tokens(model.backbone, x, model.contrastive_token)
    rec = model.heads(x)[2]
    w, b = model.recon_head.weight, model.recon_head.bias  # (D, C, p, p), (C,)
    for k in (0, 5, 15):
        i, j = divmod(k, 4)
        want = torch.einsum("d,dcpq->cpq", t[0, 2 + k], w) + b[:, None, None]
        torch.testing.assert_close(rec[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], want, atol=1e-5, rtol=1e-5)


def test_encoder_sees_the_corrupted_rotated_view_and_targets_the_clean_one(monkeypatch):
    model = _model()
    seen, targets = [], []
    x = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    real_heads, real_losses = model.heads, sit.sit_losses
    monkeypatch.setattr(model, "heads", lambda v: seen.append(v) or real_heads(v))
    monkeypatch.setattr(sit, "sit_losses", lambda *a: targets.append(a) or real_losses(*a))
    torch.manual_seed(3)
    model({"views": x})
    torch.manual_seed(3)
    rotated, k = sit.rotate_batch(x[0])
    bad, _ = sit.corrupt(rotated, model.cfg)
    torch.testing.assert_close(seen[0], bad)
    _, rot, _, _, _, clean, t = targets[0]
    assert torch.equal(rot[:3], k) and t == 0.5
    torch.testing.assert_close(clean[:3], rotated)
    assert not torch.equal(seen[0], rotated)


def test_gradients_reach_the_encoder_tokens_heads_and_weights():
    model = _model()
    out = model({"views": [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]})
    out["loss"].backward()
    for p in (model.backbone.patch_embed.weight, model.backbone.cls_token, model.contrastive_token,
              model.rot_head.weight, model.contrastive_head.weight, model.recon_head.weight, model.log_vars):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())  # DDP: every parameter is used
    assert set(out) == {"loss", "rotation", "contrastive", "reconstruction"}


def test_config_is_the_papers():
    cfg = sit.Config()
    assert (cfg.contrastive_dim, cfg.temperature, cfg.init_log_var) == (512, 0.5, 1.0)
    assert (cfg.gray_prob, cfg.blur_prob, cfg.max_noise_drop, cfg.max_replace_drop) == (1.0, 1.0, 0.3, 0.3)
    assert (cfg.max_block, cfg.min_block, cfg.max_blur_kernel) == (0.25, 0.05, 15)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 2.5e-4, 0.05, 5)
    assert (cfg.epochs, cfg.batch_size, cfg.min_scale, cfg.colour_jitter) == (501, 72, 0.08, 0.4)
    assert sit.TASK_SCALE == (1.0, 1.0, 0.5)
    model = sit.MODEL(backbones.ViT(), 192, cfg)
    assert model.rot_head.out_features == 4 and model.contrastive_head.out_features == 512
    assert model.recon_head.kernel_size == (4, 4) and model.recon_head.stride == (4, 4)
    assert model.log_vars.tolist() == [1.0, 1.0, 1.0]


def test_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        sit.MODEL(backbones.SmallCNN(width=8), 64, sit.Config())


def test_nt_xent_is_simclrs():
    simclr = load("simclr")
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert sit.nt_xent(z1, z2, 0.5).item() == simclr.nt_xent(z1, z2, 0.5).item()


def test_view_recipe_is_two_crops():
    cfg = methods.make_config(sit, preset="small")
    pipelines = sit.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipelines) == 2
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "device" and plan.notice is None
    out = pipelines[0](torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    names = [type(t).__name__ for t in pipelines[0].transforms]
    assert names[1:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]


def test_presets_name_config_fields():
    fields = set(sit.Config.__dataclass_fields__)
    assert all(set(p) <= fields for p in sit.PRESETS.values())


def test_smoke_fit_lowers_the_loss():
    cfg = sit.Config(contrastive_dim=16)
    model = sit.MODEL(_vit(image_size=32, patch=8, dim=32), 32, cfg)  # 16 patches of the 32-px digits
    batch = train.prepare_batch(fixed_batch(sit, cfg, n=16), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 5e-3)
    rows = []
    for step in range(30):
        torch.manual_seed(step)  # new rotations and corruptions each step, as in training
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        rows.append([out[k].item() for k in ("loss", "reconstruction")])
    assert all(math.isfinite(v) for r in rows for v in r)
    first, last = (torch.tensor(rows[:5]).mean(0), torch.tensor(rows[-5:]).mean(0))
    # the weighted objective falls, and the reconstruction (the term 30 steps on 16 images can move) clearly
    assert last[0] < 0.95 * first[0] and last[1] < 0.75 * first[1]
