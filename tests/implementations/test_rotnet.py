"""RotNet: the four rotations made in forward (exact rot90s, the official rotate_img's orientation, labels,
image-major order, no randomness), the 4-way cross-entropy against a literal loop and its limits (a perfect
classifier, chance), one backbone call on all 4N copies, gradients, the head, the Config against the paper and
the official config, the view recipe, the small preset, embed, the catalog entry and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
import yaml
from torchvision.transforms import v2

from selfsup import catalog, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

rotnet = load("rotnet")


def _cfg(**kw):
    return rotnet.Config(**{"head_hidden_dim": 16, **kw})


# --- the rotations -----------------------------------------------------------------------------------


def test_four_rotations_are_exact_counter_clockwise_rot90s_with_their_labels():
    torch.manual_seed(0)
    n, c, s = 3, 2, 5
    x = torch.randn(n, c, s, s)
    rotated, labels = rotnet.four_rotations(x)
    assert rotated.shape == (4 * n, c, s, s) and labels.tolist() == [0, 1, 2, 3] * n
    for i in range(n):
        for r in range(4):
            out = rotated[4 * i + r]  # image-major: row 4i + r
            assert labels[4 * i + r] == r
            for a in range(s):
                for b in range(s):
                    # the official rotate_img: 90 = flipud(transpose), 180 = flipud(fliplr), 270 = transpose(flipud)
                    src = [(a, b), (b, s - 1 - a), (s - 1 - a, s - 1 - b), (s - 1 - b, a)][r]
                    assert torch.equal(out[:, a, b], x[i, :, src[0], src[1]])


def test_rotations_compose_and_preserve_pixels():
    x = torch.randn(2, 3, 6, 6)
    rotated, _ = rotnet.four_rotations(x)
    r90 = rotated[1::4]
    again, _ = rotnet.four_rotations(r90)
    torch.testing.assert_close(again[1::4], rotated[2::4], rtol=0, atol=0)  # 90 + 90 = 180
    torch.testing.assert_close(again[3::4], x, rtol=0, atol=0)  # 90 + 270 = 360
    for r in range(4):  # a permutation of the pixels, nothing interpolated
        assert torch.equal(rotated[r::4].flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)


def test_four_rotations_refuse_non_square_views():
    with pytest.raises(ValueError, match="square"):
        rotnet.four_rotations(torch.zeros(2, 3, 4, 6))


# --- the loss ------------------------------------------------------------------------------------------


def rotation_loss_literal(logits, target):
    """1/N sum_i -1/K sum_y log softmax(F(g(X_i | y)))_y, with the 4N rows in groups of K = 4."""
    total = 0.0
    n = len(logits) // 4
    for i in range(n):
        for y in range(4):
            row = [float(v) for v in logits[4 * i + y]]
            log_z = math.log(sum(math.exp(v) for v in row))
            total += -(row[int(target[4 * i + y])] - log_z) / 4
    return total / n


@pytest.mark.parametrize("n,seed", [(1, 0), (5, 1), (8, 2)])
def test_rotation_loss_matches_a_literal_cross_entropy(n, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4 * n, 4, generator=g, dtype=torch.float64)
    target = torch.arange(4).repeat(n)
    got = rotnet.rotation_loss(logits, target).item()
    assert got == pytest.approx(rotation_loss_literal(logits, target), rel=1e-6)


def test_rotation_loss_limits_perfect_classifier_and_chance():
    target = torch.arange(4).repeat(6)
    perfect = 50.0 * nn.functional.one_hot(target, 4).double()
    assert rotnet.rotation_loss(perfect, target).item() < 1e-12
    assert rotnet.rotation_loss(torch.zeros(24, 4), target).item() == pytest.approx(math.log(4), rel=1e-6)
    constant = torch.randn(1, 4).expand(24, 4)  # the same prediction for every rotation: at best chance
    assert rotnet.rotation_loss(constant, target).item() >= math.log(4) - 1e-6


# --- the model ------------------------------------------------------------------------------------------


def test_forward_feeds_all_four_copies_in_one_backbone_call():
    cfg = _cfg()
    model = tiny_model(rotnet, cfg)
    batch = fixed_batch(rotnet, cfg, n=4)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    out = model(batch)
    assert len(seen) == 1 and seen[0].shape == (16, 3, 32, 32)
    torch.testing.assert_close(seen[0], rotnet.four_rotations(batch["views"][0])[0], rtol=0, atol=0)
    assert set(out) == {"loss", "rotation_acc"} and torch.isfinite(out["loss"])
    assert 0.0 <= out["rotation_acc"].item() <= 1.0


def test_forward_draws_nothing_from_the_rng():
    cfg = _cfg()
    model = tiny_model(rotnet, cfg)
    batch = fixed_batch(rotnet, cfg, n=4)
    torch.manual_seed(0)
    a = model(batch)["loss"]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    b = model(batch)["loss"]
    assert torch.equal(a, b)
    torch.manual_seed(0)
    model(batch)
    assert torch.equal(torch.get_rng_state(), state)  # the RNG is where it was: nothing drawn


def test_gradients_reach_the_backbone_and_the_head():
    cfg = _cfg()
    model = tiny_model(rotnet, cfg)
    out = model(fixed_batch(rotnet, cfg, n=4))
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_head_is_alexnets_fc_block_or_nins_linear():
    model = tiny_model(rotnet, _cfg())
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert model.head[0].in_features == 64 and model.head[0].bias is None and model.head[-1].out_features == 4
    linear = tiny_model(rotnet, _cfg(head_layers=0)).head
    assert len(linear) == 1 and (linear[0].in_features, linear[0].out_features) == (64, 4)
    with pytest.raises(ValueError, match="head_layers"):
        tiny_model(rotnet, _cfg(head_layers=-1))


def test_embed_is_backbone_features_of_the_upright_image():
    model = tiny_model(rotnet, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


# --- Config, views, presets, catalog ------------------------------------------------------------------------


def test_config_is_the_papers_cifar_setting():
    cfg = rotnet.Config()
    assert cfg.optimizer == "sgd" and cfg.base_lr * cfg.batch_size / 256 == pytest.approx(0.1)
    assert (cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.warmup_epochs) == (0.9, 5e-4, 128, 0)
    assert cfg.epochs == 200 and (cfg.head_layers, cfg.head_hidden_dim) == (2, 4096)
    assert rotnet.NUM_ROTATIONS == 4


def test_view_recipe_one_crop_and_flip():
    cfg = rotnet.Config()
    (view,) = rotnet.augmentations(cfg, 32)
    kinds = [type(t) for t in view.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    crop = view.transforms[1]
    assert crop.scale == (0.77, 1.0) and crop.ratio == (1.0, 1.0) and tuple(crop.size) == (32, 32)
    assert views.plan_views([view], in_memory=True).mode == "device"  # runs batched on the device
    made = fixed_batch(rotnet, cfg, n=4)["views"]
    assert len(made) == 1 and made[0].shape == (4, 3, 32, 32)


def test_small_preset_names_config_fields():
    small = rotnet.PRESETS["small"]
    assert set(small) <= set(rotnet.Config.__dataclass_fields__)
    assert small["head_hidden_dim"] < rotnet.Config().head_hidden_dim


def test_catalog_entry_points_here_and_matches_the_code():
    entry = yaml.safe_load((catalog.ROOT / "catalog" / "rotnet.yaml").read_text())
    assert entry["implementation"] == "implementations/pretext_task/rotnet.py"
    props = entry["properties"]
    assert props["uses_labels"] is False and props["negatives"] is False and props["projector"] is True
    assert props["reconstruction_target"] == "generated_labels" and props["collapse_prevention"] == "pretext_labels"


# --- smoke fit --------------------------------------------------------------------------------------------


def test_smoke_fit_lowers_the_loss():
    losses, _ = smoke_fit(rotnet, _cfg(), steps=25, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
