"""AMDIM: the regularised NCE against a literal computation, the multiscale sum over 1t5, 1t7, 5t5 in both
directions, its limits, the feature maps read inside the backbone, the shared flip, gradients and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

from selfsup import backbones

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

amdim = load("amdim")


# --- literal computations (loops, float64) ------------------------------------------------------------


def nce_literal(src, trg, rows, offset, clip):
    """-1/(|rows| L) sum_{i, l} log e^phi(i,i,l) / (e^phi(i,i,l) + sum_{j != i, l'} e^phi(i,j,l')), with
    phi = c tanh((s . t / sqrt(d)) / c); and the mean squared raw score over every (i, j, l)."""
    d, locs = src.shape[1], trg.shape[2]
    raw = lambda i, j, loc: float(src[i] @ trg[j, :, loc]) / math.sqrt(d)  # noqa: E731
    phi = lambda i, j, loc: clip * math.tanh(raw(i, j, loc) / clip)  # noqa: E731
    total, squares = 0.0, []
    for i in rows:
        own = i + offset
        neg = sum(math.exp(phi(i, j, m)) for j in range(len(trg)) if j != own for m in range(locs))
        for loc in range(locs):
            pos = math.exp(phi(i, own, loc))
            total += -math.log(pos / (pos + neg))
        squares += [raw(i, j, loc) ** 2 for j in range(len(trg)) for loc in range(locs)]
    return total / (len(rows) * locs), sum(squares) / len(squares)


def _features(n, d, locs, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, d, generator=g, dtype=torch.float64),
            scale * torch.randn(n, d, locs, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("n,d,locs,clip,scale", [(3, 4, 1, 20.0, 1.0), (5, 9, 4, 20.0, 2.0), (4, 16, 9, 1.5, 3.0)])
def test_nce_matches_equation(n, d, locs, clip, scale):
    src, trg = _features(n, d, locs, seed=n * d, scale=scale)
    nce, reg = amdim.nce_loss(src, trg, 0, clip)
    want_nce, want_reg = nce_literal(src, trg, range(n), 0, clip)
    assert nce.item() == pytest.approx(want_nce, rel=1e-10) and reg.item() == pytest.approx(want_reg, rel=1e-10)
    # one rank's rows against the gathered targets, its positives at i + offset
    k = n - 1
    nce_r, reg_r = amdim.nce_loss(src[1:], trg, 1, clip)
    want_nce_r, want_reg_r = nce_literal(src[1:], trg, range(k), 1, clip)
    assert nce_r.item() == pytest.approx(want_nce_r, rel=1e-10) and reg_r.item() == pytest.approx(want_reg_r, rel=1e-10)


def test_tanh_clip():
    x = torch.tensor([-1e4, -50.0, -1e-3, 0.0, 1e-3, 50.0, 1e4], dtype=torch.float64)
    y = amdim.tanh_clip(x, 20.0)
    assert y.abs().max() <= 20.0 and torch.all(y[1:] >= y[:-1])
    torch.testing.assert_close(y[2:5], x[2:5], rtol=1e-8, atol=0)  # near identity for small scores
    assert y[5].item() == pytest.approx(20 * math.tanh(2.5), rel=1e-12)


def test_multiscale_loss_is_the_sum_over_pairs_of_both_directions():
    n, d, clip, lambd = 4, 6, 20.0, 0.05
    r1 = [_features(n, d, 1, seed=s)[0] for s in (1, 2)]
    src5 = [_features(n, d, 1, seed=s)[0] for s in (3, 4)]
    r5 = [_features(n, d, 4, seed=s)[1] for s in (5, 6)]
    r7 = [_features(n, d, 9, seed=s)[1] for s in (7, 8)]
    want_terms, want = {}, 0.0
    for name, src, trg in (("1t5", r1, r5), ("1t7", r1, r7), ("5t5", src5, r5)):
        ab, ba = nce_literal(src[0], trg[1], range(n), 0, clip), nce_literal(src[1], trg[0], range(n), 0, clip)
        want_terms[name] = 0.5 * (ab[0] + ba[0])
        want += want_terms[name] + lambd * 0.5 * (ab[1] + ba[1])
    loss, terms = amdim.amdim_loss(tuple(r1), tuple(r5), tuple(r7), tuple(src5), 0, clip, lambd)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want_terms, rel=1e-10)
    # symmetric in the two views
    swapped, _ = amdim.amdim_loss(r1[::-1], r5[::-1], r7[::-1], src5[::-1], 0, clip, lambd)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-12)


def test_limits():
    n, d, locs, clip = 6, 8, 4, 20.0
    # a collapsed encoder: every score equal, the NCE term at its no-information value
    same_src, same_trg = torch.ones(n, d, dtype=torch.float64), torch.ones(n, d, locs, dtype=torch.float64)
    nce, reg = amdim.nce_loss(same_src, same_trg, 0, clip)
    assert nce.item() == pytest.approx(math.log(1 + (n - 1) * locs), rel=1e-12)
    assert reg.item() == pytest.approx(d, rel=1e-12)  # (d / sqrt(d))^2
    # sources aligned with their own targets, orthogonal to the others: far lower
    eye = 10 * torch.eye(n, d, dtype=torch.float64)
    aligned, _ = amdim.nce_loss(eye, eye[:, :, None].expand(n, d, locs), 0, clip)
    rand, _ = amdim.nce_loss(*_features(n, d, locs, seed=0, scale=3.0), 0, clip)
    assert aligned.item() < 0.01 < rand.item()
    # the clip bounds every score by c: positives at +1e3, negatives at -1e3 (raw) score +c and -c, and the
    # loss cannot fall below log(1 + (n - 1) L e^(-2c))
    src = torch.eye(n, d, dtype=torch.float64)
    trg = (2 * src - src.sum(0)) * 1e3 * math.sqrt(d)  # src_i . trg_j / sqrt(d) = +1e3 if i == j else -1e3
    floor = math.log(1 + (n - 1) * locs * math.exp(-2 * clip))
    assert amdim.nce_loss(src, trg[:, :, None].expand(n, d, locs), 0, clip)[0].item() == pytest.approx(floor, rel=1e-9)


# --- the feature maps, the heads, the model ---------------------------------------------------------------


def test_feature_maps_of_small_cnn():
    small = backbones.SmallCNN(width=8).eval()
    red, channels_7, channels_5 = amdim.find_feature_maps(small)
    assert red == "features.11" and (channels_7, channels_5) == (32, 64)
    x = torch.randn(2, 3, 32, 32)
    y, m7, m5 = amdim.forward_with_maps(small, x, red, final=True)
    torch.testing.assert_close(m7, small.features[:11](x))  # 8 x 8, the map entering the last max-pool
    torch.testing.assert_close(m5, small.features(x))  # 4 x 4, the map the global pooling reads
    torch.testing.assert_close(y, m5.mean(dim=(2, 3)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())  # hooks removed
    model = amdim.MODEL(small, small.feature_dim, amdim.Config())
    r1, r5, r7 = model.encode(x)
    assert r1.shape == (2, 64) and r5.shape == (2, 64, 16) and r7.shape == (2, 64, 64)


def test_a_final_map_of_1x1_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = amdim.MODEL(net, 8, amdim.Config())
    with pytest.raises(RuntimeError, match="final feature map"):
        model.encode(torch.randn(2, 3, 2, 2))  # the second conv sees 1 x 1
    assert model.encode(torch.randn(2, 3, 8, 8))[1].shape == (2, 8, 16)


def test_local_embedding_starts_as_bn_of_a_noisy_identity():
    torch.manual_seed(0)
    head = amdim.LocalEmbedding(4, 8)
    assert torch.equal(head.conv2.weight, torch.zeros_like(head.conv2.weight))
    w = head.shortcut.weight[:, :, 0, 0]
    assert torch.equal(w[:4, :4].diagonal(), torch.ones(4)) and w[4:].abs().max() <= 0.01
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(head(x), head.bn_out(head.shortcut(x)))


def _cfg(**kw):
    return amdim.Config(**kw)


def test_gradients_reach_backbone_and_both_embeddings():
    cfg = _cfg()
    model = tiny_model(amdim, cfg)
    out = model(fixed_batch(amdim, cfg, n=8))
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "nce_1t5", "nce_1t7", "nce_5t5"}
    assert out["loss"].item() > sum(out[k].item() for k in ("nce_1t5", "nce_1t7", "nce_5t5"))  # + the penalty
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter in the loss
    assert model.embed_5.conv1.weight.grad is not None and model.embed_7.shortcut.weight.grad.abs().sum() > 0


def test_one_flip_for_both_views_of_an_image():
    cfg = _cfg()
    model = tiny_model(amdim, cfg)
    batch = fixed_batch(amdim, cfg, n=16)
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(3)
    model(batch)
    handle.remove()
    (a, b), (x_a, x_b) = seen, batch["views"]
    flipped = [torch.equal(a[i], x_a[i].flip(-1)) and torch.equal(b[i], x_b[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(a[i], x_a[i]) and torch.equal(b[i], x_b[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    torch.manual_seed(3)
    drawn = amdim.draw_for_batch(16, 2, torch.device("cpu"))  # one process: the whole batch's draw
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(2, (16,)))


def test_view_recipe():
    cfg = amdim.Config()
    va, vb = amdim.augmentations(cfg, 32)
    kinds = [type(t) for t in va.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomApply, v2.RandomGrayscale, v2.ToDtype, v2.Normalize]
    crop, jitter, gray = va.transforms[1], va.transforms[2], va.transforms[3]
    assert crop.scale == (0.3, 1.0) and crop.ratio == (0.7, 1.4) and jitter.p == 0.8 and gray.p == 0.25
    assert jitter.transforms[0].hue == (-0.1, 0.1) and jitter.transforms[0].brightness == (0.6, 1.4)
    per_view, _ = amdim.augmentations(amdim.Config(shared_flip=False), 32)
    assert type(per_view.transforms[2]) is v2.RandomHorizontalFlip
    views = fixed_batch(amdim, cfg, n=4)["views"]
    assert len(views) == 2 and views[0].shape == (4, 3, 32, 32) and not torch.allclose(views[0], views[1])


def test_small_preset_names_config_fields():
    assert set(amdim.PRESETS["small"]) <= set(amdim.Config.__dataclass_fields__)


def test_embed_is_the_global_feature():
    model = tiny_model(amdim, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x)) and model.embed(x).shape == (3, 64)


def test_smoke_fit_lowers_the_loss():
    losses, _ = smoke_fit(amdim, _cfg(), steps=30, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
