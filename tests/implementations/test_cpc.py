"""CPC: InfoNCE of the row predictions against a literal computation of Eqs. 3-4, its limits, the patch grid
and sub-crops, the causality of the context network (by perturbation), gradients, the view recipe, the
centring of the embedding and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

cpc = load("cpc")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- InfoNCE (Eqs. 3-4) against loops ------------------------------------------------------------------


def infonce_literal(z, c, weights, offsets) -> float:
    """Sum over k of the mean over predictions (n, i, j), i + k < G, of
    -log f_k(z_{n,i+k,j}, c_{n,i,j}) / sum_{z' in X} f_k(z', c_{n,i,j}), f_k(z, c) = exp(z^T W_k c) (Eq. 3),
    X = every patch latent of every image."""
    n, g, _, d = z.shape
    dc = c.shape[-1]
    candidates = [(m, a, b) for m in range(n) for a in range(g) for b in range(g)]
    total = 0.0
    for k, w in zip(offsets, weights):
        terms = []
        for m in range(n):
            for i in range(g - k):
                for j in range(g):
                    wc = [sum(float(w[p, q]) * float(c[m, i, j, q]) for q in range(dc)) for p in range(d)]

                    def f(a, b, e, wc=wc):
                        return math.exp(sum(float(z[a, b, e, p]) * wc[p] for p in range(d)))

                    terms.append(-math.log(f(m, i + k, j) / sum(f(*x) for x in candidates)))
        total += sum(terms) / len(terms)
    return total


CASES = [(2, 4, 3, 5, [1, 2, 3]), (3, 3, 4, 4, [1, 2]), (1, 5, 2, 3, [2, 4])]


@pytest.mark.parametrize("n,g,d,dc,offsets", CASES)
def test_infonce_matches_equation(n, g, d, dc, offsets):
    z, c = rand(n, g, g, d, seed=n), 0.5 * rand(n, g, g, dc, seed=g)
    weights = [rand(d, dc, seed=10 + k) for k in offsets]
    loss, per_k, acc = cpc.cpc_infonce(z, c, weights, offsets)
    assert loss.item() == pytest.approx(infonce_literal(z, c, weights, offsets), rel=1e-10)
    assert len(per_k) == len(offsets)
    assert loss.item() == pytest.approx(sum(v.item() for v in per_k), rel=1e-12)
    assert 0.0 <= acc.item() <= 1.0


def test_limits_collapsed_and_perfect():
    n, g = 2, 3
    m = n * g * g  # |X|
    # a constant encoder: every candidate scores alike, each L_k is log |X|, whatever the context
    same = torch.ones(n, g, g, 4, dtype=torch.float64)
    loss, per_k, _ = cpc.cpc_infonce(same, rand(n, g, g, 5), [rand(4, 5, seed=k) for k in (1, 2)], [1, 2])
    assert all(v.item() == pytest.approx(math.log(m), rel=1e-10) for v in per_k)
    assert loss.item() == pytest.approx(2 * math.log(m), rel=1e-10)
    # orthogonal latents and contexts pointing at the patch one row below, scaled by a: closed form
    z = torch.eye(m, dtype=torch.float64).reshape(n, g, g, m)
    a = 4.0
    c = torch.zeros_like(z)
    c[:, :-1] = a * z[:, 1:]
    loss, _, acc = cpc.cpc_infonce(z, c, [torch.eye(m, dtype=torch.float64)], [1])
    assert loss.item() == pytest.approx(-math.log(math.exp(a) / (math.exp(a) + m - 1)), rel=1e-10)
    assert acc.item() == 1.0
    wrong, _, _ = cpc.cpc_infonce(z, a * rand(n, g, g, m), [torch.eye(m, dtype=torch.float64)], [1])
    assert loss.item() < wrong.item()


# --- the patch grid and the sub-crops --------------------------------------------------------------------


@pytest.mark.parametrize("size,patch,stride", [(256, 64, 32), (32, 8, 4), (96, 24, 12), (8, 2, 1)])
def test_patch_geometry_gives_the_papers_7x7_grid(size, patch, stride):
    assert cpc.patch_geometry(size, cpc.Config()) == (patch, stride)
    assert (size - patch) // stride + 1 == 7


def test_patch_grid_is_raster_order_slicing():
    x = rand(2, 3, 12, 12)
    p = cpc.patch_grid(x, 4, 2)
    assert p.shape == (2, 5, 5, 3, 4, 4)
    for i in range(5):
        for j in range(5):
            assert torch.equal(p[:, i, j], x[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4])


def test_jitter_is_a_sub_crop_padded_back_around_the_centre():
    p = rand(6, 2, 8, 8)
    size, lo = 5, (8 - 5) // 2
    offsets = torch.tensor([[0, 0], [3, 3], [1, 2], [2, 0], [0, 3], [3, 1]])
    out = cpc.jitter_patches(p, size, offsets)
    for b, (r, c) in enumerate(offsets.tolist()):
        want = torch.zeros(2, 8, 8, dtype=p.dtype)
        want[:, lo : lo + size, lo : lo + size] = p[b, :, r : r + size, c : c + size]
        assert torch.equal(out[b], want)


def test_offsets_cover_the_range_and_sub_crops_apply_only_in_training():
    torch.manual_seed(0)
    off = cpc.draw_offsets(4, 7, 1, torch.device("cpu"))
    assert off.shape == (4, 7, 7, 2) and set(off.unique().tolist()) == {0, 1}
    model = tiny_model(cpc, cpc.Config(context_hidden_dim=8, context_blocks=1)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.embed(x), model.embed(x))  # no random sub-crops in evaluation
    torch.manual_seed(1)
    a = model.encode_patches(x, jitter=True)
    assert not torch.allclose(a, model.encode_patches(x, jitter=False))


# --- the context network: row i sees rows <= i only (Sec. 3.2, Fig. 4) -----------------------------------


def test_context_at_row_r_ignores_every_row_below_it():
    torch.manual_seed(0)
    net = cpc.ContextNetwork(dim=6, hidden=5, blocks=3).double()
    z = rand(2, 6, 7, 7)
    base = net(z)
    for r in range(7):
        changed = z.clone()
        changed[:, :, r + 1 :] += rand(2, 6, 6 - r, 7, seed=r + 1)  # every row below r
        out = net(changed)
        assert torch.equal(out[:, :, : r + 1], base[:, :, : r + 1]), r
        if r < 6:
            assert not torch.allclose(out[:, :, r + 1], base[:, :, r + 1])  # row r + 1 does see itself
    # and a row's context does depend on the rows above it, in every column
    changed = z.clone()
    changed[:, :, 2, 3] += 1.0
    assert not torch.allclose(net(changed)[:, :, 4], base[:, :, 4])


def test_pixels_below_the_patches_of_row_r_do_not_change_its_context():
    cfg = cpc.Config(context_hidden_dim=16, context_blocks=2)
    model = tiny_model(cpc, cfg).eval()  # BN with running statistics: patches do not see each other
    patch, stride = cpc.patch_geometry(32, cfg)
    x = torch.randn(2, 3, 32, 32)

    def context(img):
        return model.context(model.encode_patches(img, jitter=False).permute(0, 3, 1, 2))

    base = context(x)
    for r in range(6):
        below = x.clone()
        below[:, :, r * stride + patch :] = torch.randn_like(below[:, :, r * stride + patch :])
        out = context(below)
        assert torch.equal(out[:, :, : r + 1], base[:, :, : r + 1]), r
        assert not torch.allclose(out[:, :, r + 1 :], base[:, :, r + 1 :])


# --- the model ------------------------------------------------------------------------------------------


def _cfg(**kw):
    return cpc.Config(**{"context_hidden_dim": 16, "context_blocks": 2, **kw})


def test_gradients_reach_backbone_context_and_every_predictor():
    cfg = _cfg()
    model = tiny_model(cpc, cfg)
    out = model(fixed_batch(cpc, cfg, n=4))
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "acc"} | {f"loss_k{k}" for k in range(1, 6)}
    assert out["loss"].item() == pytest.approx(sum(out[f"loss_k{k}"].item() for k in range(1, 6)), rel=1e-5)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context.parameters())
    assert all(w.weight.grad.abs().sum() > 0 for w in model.predictors)


def test_forward_needs_a_row_k_below():
    model = tiny_model(cpc, _cfg(max_offset=7))
    with pytest.raises(ValueError, match="rows below"):
        model({"views": [torch.randn(2, 3, 32, 32)]})


def test_view_recipe_is_the_papers_and_runs_on_the_device():
    cfg = cpc.Config()
    (view,) = cpc.augmentations(cfg, 32)
    kinds = [type(t) for t in view.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomGrayscale,
                     v2.ToDtype, v2.Normalize]
    crop = view.transforms[1]
    assert crop.scale == pytest.approx(((256 / 300) ** 2,) * 2) and crop.ratio == (1.0, 1.0)
    assert view.transforms[3].p == 1.0
    plan = views.plan_views(cpc.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True)
    assert plan.mode == "device"
    assert len(cpc.augmentations(cpc.Config(greyscale=False), 32)[0].transforms) == 5
    (x,) = fixed_batch(cpc, cfg, n=4)["views"]
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # greyscale


def test_small_preset_only_names_config_fields():
    assert set(cpc.PRESETS["small"]) <= set(cpc.Config.__dataclass_fields__)


def test_embed_is_mean_pooled_patch_features_of_the_greyscale_image():
    cfg = _cfg()
    model = tiny_model(cpc, cfg).eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model.set_normalization(mean, std)
    rgb = torch.rand(3, 3, 32, 32)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    norm = lambda img: (img - m) / s  # noqa: E731
    luma = torch.tensor([0.2989, 0.587, 0.114])[:, None, None]
    grey = (rgb * luma).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    e = model.embed(norm(rgb))
    assert e.shape == (3, model.backbone.feature_dim)
    torch.testing.assert_close(e, model.embed(norm(grey)))
    patches = cpc.patch_grid(norm(grey), 8, 4).reshape(-1, 3, 8, 8)  # (3 * 49, C, P, P)
    torch.testing.assert_close(e, model.backbone(patches).reshape(3, 49, -1).mean(1))
    colour = tiny_model(cpc, _cfg(greyscale=False)).eval()
    patches = cpc.patch_grid(norm(rgb), 8, 4).reshape(-1, 3, 8, 8)
    torch.testing.assert_close(colour.embed(norm(rgb)), colour.backbone(patches).reshape(3, 49, -1).mean(1))


def test_epoch_start_centres_the_embedding_on_the_training_set():
    model = tiny_model(cpc, _cfg()).eval()
    images = torch.randn(10, 3, 32, 32)
    plain = model.embed(images)  # zero mean at initialisation: the paper's mean-pooled latents
    assert torch.equal(model.latent_mean, torch.zeros(model.backbone.feature_dim))
    model.on_epoch_start(0, 3, lambda: model.embed(images))
    torch.testing.assert_close(model.latent_mean, plain.mean(0))
    torch.testing.assert_close(model.embed(images), plain - plain.mean(0))
    model.on_epoch_start(1, 3, lambda: model.embed(images))  # features() is already centred: no drift
    torch.testing.assert_close(model.latent_mean, plain.mean(0))
    assert "latent_mean" in model.state_dict() and not model.latent_mean.requires_grad
    off = tiny_model(cpc, _cfg(centre_embedding=False)).eval()
    off.on_epoch_start(0, 3, lambda: pytest.fail("features() computed although centring is off"))
    assert off.latent_mean.abs().sum() == 0
    # training does not touch it
    model.train()
    before = model.latent_mean.clone()
    model(fixed_batch(cpc, _cfg(), n=4))
    assert torch.equal(model.latent_mean, before)


def test_smoke_fit_lowers_the_loss():
    cfg = _cfg(optimizer="adamw")
    losses, _ = smoke_fit(cpc, cfg, steps=30, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 3.0, losses


def test_module_works_with_any_backbone():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = cpc.MODEL(backbone, 4, _cfg(max_offset=2))
    out = model({"views": [torch.randn(2, 3, 16, 16)]})
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "acc", "loss_k1", "loss_k2"}
