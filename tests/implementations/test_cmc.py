"""CMC: the Lab views against the colour-space formulas, the NCE, bank-softmax and in-batch losses against
literal computations, their limits, the two encoders (first convolution adapted), the memory banks (update
rule, no gradient; identical on every rank is checked in test_distributed), Z, embed, and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

cmc = load("cmc")


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --- Lab: a per-pixel literal computation of sRGB (D65) -> XYZ -> CIE Lab ----------------------------


def lab_literal(r, g, b):
    def linear(c):
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = linear(r), linear(g), linear(b)
    x = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.95047
    y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_rgb_to_lab_matches_the_formulas_pixel_by_pixel():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.0  # black, and dark values on the linear branches of both formulas
    rgb[0, :, 0, 1] = torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64)
    lab = cmc.rgb_to_lab(rgb)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                want = lab_literal(*(float(c) for c in rgb[n, :, i, j]))
                assert lab[n, :, i, j].tolist() == pytest.approx(want, abs=1e-9)


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    lab = cmc.rgb_to_lab(rgb.view(4, 3, 1, 1)).view(4, 3)
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=1e-2)  # white
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)  # black
    assert lab[2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=1e-2)  # sRGB red
    assert lab[3].tolist() == pytest.approx([87.73, -86.18, 83.18], abs=1e-2)  # green: the a minimum of the range


def test_lab_views_undo_the_normalisation_and_normalise_as_the_official_code():
    mean, std = torch.tensor([0.3, 0.4, 0.5]), torch.tensor([0.2, 0.25, 0.3])
    rgb = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    x = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    lum, ab = cmc.lab_views(x, mean, std)
    assert lum.shape == (3, 1, 6, 6) and ab.shape == (3, 2, 6, 6)
    lab = cmc.rgb_to_lab(rgb)
    torch.testing.assert_close(lum[:, 0], (lab[:, 0] - 50) / 50, rtol=1e-4, atol=1e-4)
    a_mid, a_half = (-86.183 + 98.233) / 2, (86.183 + 98.233) / 2
    b_mid, b_half = (-107.857 + 94.478) / 2, (107.857 + 94.478) / 2
    torch.testing.assert_close(ab[:, 0], (lab[:, 1] - a_mid) / a_half, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ab[:, 1], (lab[:, 2] - b_mid) / b_half, rtol=1e-4, atol=1e-4)
    assert lum.abs().max() <= 1 + 1e-5 and ab.abs().max() <= 1 + 1e-3  # the ranges map to about [-1, 1]


# --- literal computations of the losses (loops, float64) ----------------------------------------------


def nce_literal(scores, z, t, n):
    """Per anchor: P = exp(s/t)/Z, h = P/(P + K/n); -log h(positive) - sum_k log(1 - h(noise_k))."""
    k = scores.shape[1] - 1
    total = 0.0
    for row in scores.tolist():
        def h(s):
            p = math.exp(s / t) / z
            return p / (p + k / n)

        total += -math.log(h(row[0])) - sum(math.log(1 - h(s)) for s in row[1:])
    return total / len(scores)


def softmax_literal(scores, t):
    total = 0.0
    for row in scores.tolist():
        e = [math.exp(s / t) for s in row]
        total += -math.log(e[0] / sum(e))
    return total / len(scores)


def contrast_literal(z1, z2, t):
    """L^{V1,V2}: for each anchor v_1^i, -log h(v_1^i, v_2^i) / sum_j h(v_1^i, v_2^j), h = exp(cos / t)."""
    total = 0.0
    for i in range(len(z1)):
        h = [math.exp(float(z1[i] @ z2[j]) / t) for j in range(len(z2))]
        total += -math.log(h[i] / sum(h))
    return total / len(z1)


@pytest.mark.parametrize("b,k,n,t", [(4, 5, 20, 0.07), (6, 30, 50, 0.5), (3, 12, 9, 1.0)])
def test_nce_loss_and_z_match_the_equations(b, k, n, t):
    scores = unit(b, 1 + k, 8, seed=b) @ unit(8, seed=k)  # cosines in [-1, 1], (b, 1 + k)
    z = cmc.estimate_z(scores, t, n)
    want_z = n * sum(math.exp(s / t) for s in scores.flatten().tolist()) / scores.numel()  # all K + 1 columns
    assert z.item() == pytest.approx(want_z, rel=1e-12)
    for zz in (z.item(), 0.6 * z.item()):
        assert cmc.nce_loss(scores, zz, t, n).item() == pytest.approx(nce_literal(scores, zz, t, n), rel=1e-10)


@pytest.mark.parametrize("b,k,t", [(4, 6, 0.07), (7, 3, 0.5)])
def test_bank_softmax_loss_matches_the_equation(b, k, t):
    scores = unit(b, 1 + k, 6, seed=3) @ unit(6, seed=4)
    assert cmc.softmax_loss(scores, t).item() == pytest.approx(softmax_literal(scores, t), rel=1e-10)


@pytest.mark.parametrize("b,d,t", [(5, 8, 0.07), (9, 4, 0.3)])
def test_batch_loss_is_the_contrast_in_both_directions(b, d, t):
    z1, z2 = unit(b, d, seed=5), unit(b, d, seed=6)
    l12, l21 = cmc.batch_loss(z1, z2, t)
    assert l12.item() == pytest.approx(contrast_literal(z1, z2, t), rel=1e-10)
    assert l21.item() == pytest.approx(contrast_literal(z2, z1, t), rel=1e-10)
    r12, r21 = cmc.batch_loss(z2, z1, t)  # swapping the views swaps the two directions
    assert (r12.item(), r21.item()) == pytest.approx((l21.item(), l12.item()), rel=1e-12)


# --- known limits ---------------------------------------------------------------------------------


def test_collapsed_features_give_the_indistinguishable_losses():
    b, k, n, t = 4, 8, 16, 0.07
    same = torch.ones(b, 1 + k, dtype=torch.float64)  # every candidate has cosine 1
    z = cmc.estimate_z(same, t, n)
    assert z.item() == pytest.approx(n * math.exp(1 / t), rel=1e-12)
    assert cmc.nce_loss(same, z, t, n).item() == pytest.approx(math.log(k + 1) + k * math.log(1 + 1 / k), rel=1e-10)
    assert cmc.softmax_loss(same, t).item() == pytest.approx(math.log(k + 1), rel=1e-12)
    point = F.normalize(torch.ones(b, 5, dtype=torch.float64), dim=1)
    assert sum(cmc.batch_loss(point, point, t)).item() == pytest.approx(2 * math.log(b), rel=1e-12)


def test_aligned_views_beat_random_ones():
    t = 0.1
    eye = torch.eye(8, dtype=torch.float64)
    rand1, rand2 = unit(8, 8, seed=7), unit(8, 8, seed=8)
    assert sum(cmc.batch_loss(eye, eye, t)).item() < sum(cmc.batch_loss(rand1, rand2, t)).item()
    good = torch.cat([torch.ones(3, 1), torch.zeros(3, 6)], dim=1).double()  # positive 1, noise 0
    bad = unit(3, 7, 4, seed=9) @ unit(4, seed=10)
    z = cmc.estimate_z(bad, t, 50)
    assert cmc.nce_loss(good, z, t, 50).item() < cmc.nce_loss(bad, z, t, 50).item()
    assert cmc.softmax_loss(good, t).item() < cmc.softmax_loss(bad, t).item()


# --- the encoders -------------------------------------------------------------------------------------


def test_first_conv_is_adapted_generically():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 5, stride=2, padding=2, bias=False), nn.ReLU()),
                        nn.Conv2d(4, 4, 3))
    second = net[1]
    cmc.adapt_first_conv(net, 2)
    first = net[0][0]
    assert first.in_channels == 2 and first.out_channels == 4 and first.kernel_size == (5, 5)
    assert first.stride == (2, 2) and first.padding == (2, 2) and first.bias is None
    assert net[1] is second  # only the first convolution changes
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        cmc.adapt_first_conv(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), 1)


def test_two_encoders_one_per_view():
    model = tiny_model(cmc, cmc.Config(proj_dim=16))
    first = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    first_ab = [m for m in model.backbone_ab.modules() if isinstance(m, nn.Conv2d)]
    assert first[0].in_channels == 1 and first_ab[0].in_channels == 2
    assert [m.in_channels for m in first[1:]] == [m.in_channels for m in first_ab[1:]]
    own = {p.data_ptr() for p in model.backbone.parameters()}
    assert not own & {p.data_ptr() for p in model.backbone_ab.parameters()}  # a copy, not shared weights


# --- the model: banks, Z, gradients ----------------------------------------------------------------


def _cfg(**kw):
    return cmc.Config(**{"proj_dim": 16, "nce_k": 32, **kw})


def _model(cfg, num_samples=64):
    model = tiny_model(cmc, cfg)
    model.setup(num_samples, 10)
    return model


def _embeddings(model, batch):
    """z_L, z_ab as the forward computes them (BN in training mode: the batch's statistics)."""
    with torch.no_grad():
        h_l, h_ab = model.encode(batch["views"][0])
        return F.normalize(model.head_l(h_l), dim=1), F.normalize(model.head_ab(h_ab), dim=1)


def test_setup_allocates_two_banks_of_unit_vectors_as_buffers():
    cfg = _cfg()
    model = tiny_model(cmc, cfg)
    with pytest.raises(RuntimeError, match="setup"):
        model(fixed_batch(cmc, cfg, n=4))
    model.setup(100, 10)
    for bank in (model.bank_l, model.bank_ab):
        assert bank.shape == (100, 16) and not bank.requires_grad
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(100))
    assert not torch.equal(model.bank_l, model.bank_ab)
    assert {"bank_l", "bank_ab", "nce_z", "rgb_mean", "rgb_std"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="loss"):
        cmc.MODEL(model.backbone, 32, _cfg(loss="infonce"))


def test_set_normalization_is_what_forward_undoes():
    model = tiny_model(cmc, _cfg())
    torch.testing.assert_close(model.rgb_mean, torch.tensor([0.485, 0.456, 0.406]))  # ImageNet until told
    model.set_normalization((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    torch.testing.assert_close(model.rgb_std, torch.tensor([0.5, 0.6, 0.7]))
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = (rgb - model.rgb_mean.view(1, 3, 1, 1)) / model.rgb_std.view(1, 3, 1, 1)
    lum, ab = cmc.lab_views(x, model.rgb_mean, model.rgb_std)
    l0, ab0 = cmc.lab_views((rgb - 0.5) / 0.25, torch.full((3,), 0.5), torch.full((3,), 0.25))
    torch.testing.assert_close(lum, l0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ab, ab0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss", ["nce", "softmax", "batch"])
def test_gradients_reach_both_encoders_not_the_banks(loss):
    cfg = _cfg(loss=loss)
    model = _model(cfg)
    out = model(fixed_batch(cmc, cfg, n=8))
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss", "loss_l", "loss_ab", "pos_sim"}
    assert out["loss"].item() == pytest.approx((out["loss_l"] + out["loss_ab"]).item(), rel=1e-6)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0  # backward survives the bank update
    assert sum(float(p.grad.abs().sum()) for p in model.backbone_ab.parameters()) > 0
    assert model.head_l.weight.grad.abs().sum() > 0 and model.head_ab.weight.grad.abs().sum() > 0
    assert not model.bank_l.requires_grad and not model.bank_ab.requires_grad


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_bank_update_follows_the_momentum_rule(loss):
    cfg = _cfg(loss=loss, bank_momentum=0.5)
    model = _model(cfg)
    batch = fixed_batch(cmc, cfg, n=8)
    batch["index"] = torch.tensor([3, 17, 0, 42, 8, 63, 21, 5])
    before_l, before_ab = model.bank_l.clone(), model.bank_ab.clone()
    z_l, z_ab = _embeddings(model, batch)
    model(batch)
    rows = batch["index"]
    torch.testing.assert_close(model.bank_l[rows], F.normalize(0.5 * before_l[rows] + 0.5 * z_l, dim=1))
    torch.testing.assert_close(model.bank_ab[rows], F.normalize(0.5 * before_ab[rows] + 0.5 * z_ab, dim=1))
    others = torch.ones(64, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(model.bank_l[others], before_l[others]) and torch.equal(model.bank_ab[others], before_ab[others])


def test_each_view_is_scored_against_the_other_views_bank():
    """The positive of the L anchor is M_ab[i], of the ab anchor M_L[i]: the loss follows the other bank."""
    cfg = _cfg(loss="softmax")
    model = _model(cfg)
    batch = fixed_batch(cmc, cfg, n=8)
    z_l, z_ab = _embeddings(model, batch)
    model.bank_ab[batch["index"]] = z_l.clone()  # M_ab now holds the L embeddings: L anchors find themselves
    torch.manual_seed(0)
    out = model(batch)
    assert out["loss_l"] < out["loss_ab"]


def test_z_is_estimated_from_the_first_batch_then_fixed():
    cfg = _cfg(nce_k=16)
    model = _model(cfg)
    assert (model.nce_z < 0).all()
    batch = fixed_batch(cmc, cfg, n=8)
    bank_l, bank_ab = model.bank_l.clone(), model.bank_ab.clone()
    z_l, z_ab = _embeddings(model, batch)
    torch.manual_seed(123)
    model(batch)
    torch.manual_seed(123)  # the same noise draw as in the forward
    idx = torch.cat([batch["index"][:, None], torch.randint(64, (8, 16))], dim=1)
    for k, (bank, z) in enumerate([(bank_ab, z_l), (bank_l, z_ab)]):
        scores = torch.einsum("nkd,nd->nk", bank[idx].double(), z.double())
        want = 64 * (scores / cfg.temperature).exp().mean().item()
        assert model.nce_z[k].item() == pytest.approx(want, rel=1e-5)
    z1 = model.nce_z.clone()
    model(fixed_batch(cmc, cfg, n=8, seed=1))
    assert torch.equal(model.nce_z, z1)
    fresh = _model(cfg)
    fresh.load_state_dict(model.state_dict())
    fresh(batch)
    assert torch.equal(fresh.nce_z, z1)


def test_in_batch_loss_needs_no_bank():
    cfg = _cfg(loss="batch")
    model = tiny_model(cmc, cfg)
    model.setup(64, 10)
    assert model.bank_l.numel() == 0 and model.bank_ab.numel() == 0
    assert torch.isfinite(model(fixed_batch(cmc, cfg, n=8))["loss"])


def test_view_recipe_is_one_crop_without_colour_jitter():
    cfg = cmc.Config()
    (view,) = cmc.augmentations(cfg, 32)
    kinds = [type(t) for t in view.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    assert view.transforms[1].scale == (0.08, 1.0)
    views = fixed_batch(cmc, cfg, n=4)["views"]
    assert len(views) == 1 and views[0].shape == (4, 3, 32, 32)


def test_small_preset_fits_the_digits_bank():
    small = cmc.PRESETS["small"]
    assert set(small) <= {f for f in cmc.Config.__dataclass_fields__}
    assert small.get("nce_k", 0) < 1437


def test_embed_concatenates_both_encoders_on_l_and_ab():
    model = _model(_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    lum, ab = cmc.lab_views(x, model.rgb_mean, model.rgb_std)
    want = torch.cat([model.backbone(lum), model.backbone_ab(ab)], dim=1)
    torch.testing.assert_close(model.embed(x), want)
    assert want.shape == (3, 2 * 64)


@pytest.mark.parametrize("loss", ["nce", "softmax", "batch"])
def test_smoke_fit_lowers_the_loss(loss):
    cfg = _cfg(loss=loss)
    losses, model = smoke_fit(cmc, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert (model.nce_z > 0).all() or loss != "nce"


def test_grayscale_images_have_an_almost_empty_ab_view():
    """On grayscale data (the embedded digits) a and b are ~1e-3, a linear function of L: the constants'
    rounding, no colour."""
    g = torch.Generator().manual_seed(3)
    gray = torch.rand(4, 1, 6, 6, generator=g, dtype=torch.float64).expand(4, 3, 6, 6).clamp_min(0.15)
    lab = cmc.rgb_to_lab(gray)
    assert lab[:, 1:].abs().max() < 0.01 and lab[:, 0].std() > 1  # a, b ~ 0 while L varies
    ratio = lab[:, 1:] / (lab[:, :1] + 16)  # constant on the cube-root branch of f (pixels above 0.15)
    torch.testing.assert_close(ratio, ratio[:1, :, :1, :1].expand_as(ratio), rtol=1e-6, atol=0.0)
