"""Batched views against torchvision: the same op with fixed parameters gives the same pixels, and the
random parameters follow the same distributions (two-sample Kolmogorov-Smirnov and binomial bounds over
a few thousand seeded draws, so the tests are deterministic)."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from selfsup import methods, views

N_DRAWS = 4000
KS_ALPHA = 1e-3  # seeded draws: a fixed outcome; this level only says how close the samples must be


def images(n=16, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def same_distribution(a, b) -> bool:
    return stats.ks_2samp(np.asarray(a), np.asarray(b)).pvalue > KS_ALPHA


def within_binomial(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p))


# --- fixed parameters: the same pixels ---------------------------------------------------------------


@pytest.mark.parametrize("out_size,antialias", [(32, True), (16, True), (48, True), (16, False)])
def test_resized_crop_equals_torchvision(out_size, antialias):
    x = images(24)
    op = views.ResizedCrop(v2.RandomResizedCrop(out_size, scale=(0.05, 1.0), antialias=antialias))
    torch.manual_seed(1)
    boxes = op.boxes(x.shape)
    got = op.apply(x, boxes)
    want = torch.stack([
        TF.resized_crop(x[i], *boxes[i].tolist(), [out_size, out_size], antialias=antialias) for i in range(len(x))
    ])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("j,tv", [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation),
                                  (3, TF.adjust_hue)])
def test_colour_adjustments_equal_torchvision(j, tv):
    x = images(8)
    f = torch.linspace(-0.45, 0.45, 8) if j == 3 else torch.linspace(0.1, 1.9, 8)
    got = views.ColorJitter.adjust(j, x.clone(), f)
    want = torch.stack([tv(x[i], float(f[i])) for i in range(len(x))])
    torch.testing.assert_close(got, want, atol=1e-4 if j == 3 else 1e-6, rtol=0)


def test_colour_jitter_applies_each_samples_own_order():
    x = images(64)
    op = views.ColorJitter(v2.ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8)
    torch.manual_seed(3)
    applied, order, factors = op.params(len(x))
    assert len({tuple(o) for o in order.tolist()}) > 10 and 0 < int(applied.sum()) < len(x)
    got = op.apply(x, applied, order, factors)
    tv = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(len(x)):
        want = x[i]
        if applied[i]:
            for j in order[i].tolist():
                want = tv[j](want, float(factors[i, j]))
        torch.testing.assert_close(got[i], want, atol=2e-4, rtol=0)


def test_grayscale_flip_solarize_normalize_equal_torchvision():
    x = images(8)
    gray = views.Grayscale(v2.RandomGrayscale(p=1.0))(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    flip = views.HorizontalFlip(v2.RandomHorizontalFlip(p=1.0))(x)
    torch.testing.assert_close(flip, TF.horizontal_flip(x))
    u8 = (x * 255).round().to(torch.uint8)
    sol = views.Solarize(v2.RandomSolarize(threshold=128, p=1.0), scale=255.0)(u8.float() / 255)
    torch.testing.assert_close(sol, TF.solarize(u8, 128).float() / 255, atol=1e-6, rtol=0)
    norm = views.Normalize(v2.Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)))(x)
    torch.testing.assert_close(norm, TF.normalize(x, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]))


def test_gaussian_blur_equals_torchvision():
    x = images(4, size=64)
    got = views.GaussianBlur(v2.GaussianBlur(7, sigma=(1.3, 1.3)))(x)
    want = TF.gaussian_blur(x, [7, 7], [1.3, 1.3])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --- random parameters: the same distributions --------------------------------------------------------


def test_crop_area_and_aspect_ratio_follow_torchvision():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    op = views.ResizedCrop(v2.RandomResizedCrop(32, scale=scale, ratio=ratio))
    torch.manual_seed(0)
    boxes = op.boxes(torch.Size([N_DRAWS, 3, 32, 32]))
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(N_DRAWS)])
    for col in (2, 3):
        assert boxes[:, col].min() >= 1 and boxes[:, col].max() <= 32
    area, aspect = (boxes[:, 2] * boxes[:, 3]).float(), (boxes[:, 3] / boxes[:, 2]).float()
    ref_area, ref_aspect = (ref[:, 2] * ref[:, 3]).float(), (ref[:, 3] / ref[:, 2]).float()
    assert same_distribution(area, ref_area) and same_distribution(aspect, ref_aspect)
    assert same_distribution(boxes[:, 0].float(), ref[:, 0].float())  # the top offset too


def test_flip_grayscale_solarize_rates():
    torch.manual_seed(0)
    x = torch.rand(N_DRAWS, 3, 2, 2) * 0.4 + 0.55  # every pixel above the solarize threshold, not gray
    flipped = views.HorizontalFlip(v2.RandomHorizontalFlip(p=0.5))(x)
    n_flip = int((flipped != x).flatten(1).any(1).sum())
    gray = views.Grayscale(v2.RandomGrayscale(p=0.2))(x)
    n_gray = int((gray != x).flatten(1).any(1).sum())
    sol = views.Solarize(v2.RandomSolarize(threshold=0.5, p=0.2), scale=1.0)(x)
    n_sol = int((sol != x).flatten(1).any(1).sum())
    assert within_binomial(n_flip, N_DRAWS, 0.5)
    assert within_binomial(n_gray, N_DRAWS, 0.2)
    assert within_binomial(n_sol, N_DRAWS, 0.2)


def _recover_factors(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Factors read back from probe images (see test below): pixel 0 is (0.5, 0.5, 0.5) for brightness,
    pixels 1-2 are 0.3/0.7 gray for contrast, pixel 3 is (0.6, 0.4, 0.5) for saturation and hue."""
    b = out[:, 0, 0, 0] / 0.5
    c = (out[:, 0, 0, 2] - out[:, 0, 0, 1]) / 0.4
    s = (out[:, 0, 0, 3] - out[:, 1, 0, 3]) / 0.2
    return {"brightness": b, "contrast": c, "saturation": s}


def _probe(n: int) -> torch.Tensor:
    x = torch.zeros(n, 3, 1, 4)
    x[:, :, 0, 0] = 0.5
    x[:, :, 0, 1], x[:, :, 0, 2] = 0.3, 0.7
    x[:, :, 0, 3] = torch.tensor([0.6, 0.4, 0.5])
    return x


@pytest.mark.parametrize("name,kwargs", [("brightness", {"brightness": 0.4}), ("contrast", {"contrast": 0.4}),
                                         ("saturation", {"saturation": 0.4})])
def test_jitter_factor_distributions_follow_torchvision(name, kwargs):
    # contrast uses the whole image's mean, so the probe's mean must stay fixed: brightness and saturation
    # probes each keep their own pixel, contrast reads the 0.3/0.7 pair, whose blend target is the mean
    tv_op, op = v2.RandomApply([v2.ColorJitter(**kwargs)], p=0.8), views.ColorJitter(v2.ColorJitter(**kwargs), p=0.8)
    x = _probe(N_DRAWS)
    torch.manual_seed(0)
    got = _recover_factors(op(x))[name]
    torch.manual_seed(1)
    want = _recover_factors(torch.stack([tv_op(x[i]) for i in range(N_DRAWS)]))[name]
    assert same_distribution(got, want)
    unchanged = ((got - 1).abs() < 1e-6).float().mean().item()
    assert abs(unchanged - 0.2) < 0.03  # the apply probability


def test_hue_shift_distribution_follows_torchvision():
    x = _probe(N_DRAWS)
    op, tv_op = views.ColorJitter(v2.ColorJitter(hue=0.1)), v2.ColorJitter(hue=0.1)
    torch.manual_seed(0)
    got = TF.rgb_to_grayscale(op(x))  # a hue rotation changes the luma of a coloured pixel
    torch.manual_seed(1)
    want = TF.rgb_to_grayscale(torch.stack([tv_op(x[i]) for i in range(N_DRAWS)]))
    assert same_distribution(got[:, 0, 0, 3], want[:, 0, 0, 3])


def test_jitter_order_is_uniform_over_permutations():
    torch.manual_seed(0)
    _, order, _ = views.ColorJitter(v2.ColorJitter(0.4, 0.4, 0.4, 0.1)).params(24 * 200)
    counts = np.unique((order * torch.tensor([64, 16, 4, 1])).sum(1).numpy(), return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > KS_ALPHA


def test_blur_sigma_follows_the_range():
    # blur a centred impulse: the output's spread is sigma; compare with torchvision's draws
    x = torch.zeros(N_DRAWS // 4, 3, 15, 15)
    x[:, :, 7, 7] = 1.0
    op, tv_op = views.GaussianBlur(v2.GaussianBlur(15, sigma=(0.5, 2.0))), v2.GaussianBlur(15, sigma=(0.5, 2.0))
    torch.manual_seed(0)
    got = op(x)[:, 0, 7, 7]
    torch.manual_seed(1)
    want = torch.stack([tv_op(x[i]) for i in range(len(x))])[:, 0, 7, 7]
    assert same_distribution(got, want)


# --- plans ---------------------------------------------------------------------------------------------


def test_method_recipes_translate_and_make_views_like_the_loader():
    for method in ("simclr", "byol"):
        module = methods.load_method_module(method)
        cfg = methods.make_config(module, {}, "paper")
        pipelines = module.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
        plan = views.plan_views(pipelines, in_memory=True)
        assert plan.mode == "device" and plan.notice is None and plan.shared_input
        x = (images(64) * 255).to(torch.uint8)
        torch.manual_seed(0)
        batched = plan.make_views([x])
        per_image = [torch.stack([p(img) for img in x]) for p in pipelines]
        for b, ref in zip(batched, per_image):
            assert b.shape == ref.shape and b.dtype == ref.dtype == torch.float32
            # different random draws, the same value range and roughly the same statistics
            assert abs(b.mean().item() - ref.mean().item()) < 0.25 and abs(b.std().item() - ref.std().item()) < 0.25


def test_untranslatable_recipe_falls_back_to_the_loader_with_a_notice():
    pipelines = [v2.Compose([v2.ToImage(), v2.RandomRotation(30), v2.ToDtype(torch.float32, scale=True)])] * 2
    plan = views.plan_views(pipelines, in_memory=True)
    assert plan.mode == "loader" and "RandomRotation" in plan.notice
    assert plan.host == pipelines and plan.device == [None, None]


def test_images_decoded_per_access_crop_in_the_loader_and_colour_on_the_device():
    module = methods.load_method_module("simclr")
    pipelines = module.augmentations(methods.make_config(module), 64)
    plan = views.plan_views(pipelines, in_memory=False)
    assert plan.mode == "device" and not plan.shared_input
    host = plan.host[0]
    assert [type(t) for t in host.transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    crop = host((torch.rand(3, 100, 80) * 255).to(torch.uint8))
    assert crop.shape == (3, 64, 64) and crop.dtype == torch.uint8
    out = plan.make_views([crop[None], crop[None]])
    assert out[0].shape == (1, 3, 64, 64) and out[0].dtype == torch.float32


def test_loader_mode_keeps_the_pipelines_as_written():
    module = methods.load_method_module("byol")
    pipelines = module.augmentations(methods.make_config(module), 32)
    plan = views.plan_views(pipelines, in_memory=True, mode="loader")
    assert plan.mode == "loader" and plan.host == pipelines and plan.notice is None
