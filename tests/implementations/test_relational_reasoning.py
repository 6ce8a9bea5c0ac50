"""Relational reasoning: the pairs (positives within an image, negatives by the official roll of the batch) against
the official loop, the focal loss against a literal float64 computation, its limits (a perfect head, chance
logits, collapsed features), the module's loss end to end, gradients, the nothing-drawn forward, the Config and
view recipe of the paper, and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

from selfsup import train

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

rr = load("relational-reasoning")


def _cfg(**kw):
    return rr.Config(**{"num_augmentations": 4, **kw})


# --- literal computations (loops, float64) -------------------------------------------------------------


def official_shifts(num_pairs, n):
    """The shift counter of the official ``aggregate``: starts at 1, + 1 per pair, reset to 1 at >= n."""
    shifts, counter = [], 1
    for _ in range(num_pairs):
        shifts.append(counter)
        counter += 1
        if counter >= n:
            counter = 1
    return shifts


def official_pairs(features, k, how):
    """The official ``aggregate`` on features (K N, D), augmentation-major: for index_1 < index_2 a positive
    block and a negative block (augmentation index_2's rows rolled by the counter). Returns (pairs, targets)
    in the code's interleaved order."""
    size = features.shape[0] // k
    pairs, targets, counter = [], [], 1
    for index_1 in range(0, size * k, size):
        for index_2 in range(index_1 + size, size * k, size):
            a = features[index_1 : index_1 + size]
            b = features[index_2 : index_2 + size]
            b_rolled = torch.roll(b, shifts=counter, dims=0)
            for partner in (b, b_rolled):
                if how == "cat":
                    pairs.append(torch.cat([a, partner], 1))
                elif how == "sum":
                    pairs.append(a + partner)
                elif how == "mean":
                    pairs.append((a + partner) / 2.0)
                else:
                    pairs.append(torch.max(torch.stack([a, partner], 2), 2)[0])
            targets += [1.0] * size + [0.0] * size
            counter += 1
            if counter >= size:
                counter = 1
    return torch.cat(pairs), torch.tensor(targets, dtype=torch.float64)


def focal_literal(logits, targets, gamma, alpha):
    """-alpha_t (1 - p_t)^gamma log p_t, averaged, one pair at a time."""
    total = 0.0
    for y, t in zip(logits.tolist(), targets.tolist()):
        p = 1 / (1 + math.exp(-y))
        p_t, a_t = (p, alpha) if t == 1 else (1 - p, 1 - alpha)
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / len(logits)


# --- the pairs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_pairs,n", [(6, 8), (28, 5), (496, 64), (10, 2), (3, 3)])
def test_roll_shifts_are_the_official_counter(num_pairs, n):
    assert rr.roll_shifts(num_pairs, n).tolist() == official_shifts(num_pairs, n)
    assert (rr.roll_shifts(num_pairs, n) % n != 0).all()  # a roll never pairs an image with itself


@pytest.mark.parametrize("k", [2, 3, 4, 32])
def test_augmentation_pairs_are_all_i_below_j_in_loop_order(k):
    i, j = rr.augmentation_pairs(k)
    assert list(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(k) for b in range(a + 1, k)]
    assert len(i) == k * (k - 1) // 2


@pytest.mark.parametrize("how", ["cat", "sum", "mean", "max"])
@pytest.mark.parametrize("n,k,d", [(5, 4, 3), (2, 3, 2), (7, 2, 4)])
def test_relation_pairs_match_the_official_aggregate(how, n, k, d):
    g = torch.Generator().manual_seed(n * 10 + k)
    z = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    pairs = rr.relation_pairs(z, how)  # (2, P, N, A)
    num_pairs = k * (k - 1) // 2
    assert pairs.shape == (2, num_pairs, n, 2 * d if how == "cat" else d)
    # the official order: per augmentation pair, the positive block then the negative block
    features = z.transpose(0, 1).reshape(k * n, d)  # (K N, D), augmentation-major as torch.cat(views)
    want, targets = official_pairs(features, k, how)
    got = pairs.permute(1, 0, 2, 3).reshape(2 * num_pairs * n, -1)  # interleaved as the code
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert targets.sum().item() == num_pairs * n and len(targets) == 2 * num_pairs * n


def test_negatives_pair_each_image_with_another_one_by_a_literal_loop():
    n, k, d = 4, 4, 3
    z = torch.arange(n * k * d, dtype=torch.float64).view(n, k, d)  # every row tells its image and view
    pairs = rr.relation_pairs(z, "cat")
    shifts = official_shifts(6, n)
    for p, (i, j) in enumerate((a, b) for a in range(k) for b in range(a + 1, k)):
        for row in range(n):
            assert torch.equal(pairs[0, p, row], torch.cat([z[row, i], z[row, j]]))  # the same image
            partner = (row - shifts[p]) % n
            assert partner != row
            assert torch.equal(pairs[1, p, row], torch.cat([z[row, i], z[partner, j]]))
    # shifts 1, 2, 3, 1, 2, 3 over the 6 augmentation pairs of a batch of 4
    assert shifts == [1, 2, 3, 1, 2, 3]


def test_a_batch_of_one_image_is_refused():
    with pytest.raises(ValueError, match="one image"):
        rr.relation_pairs(torch.randn(1, 4, 3))


# --- the focal loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.5), (0.0, 0.5), (1.0, 0.25), (3.0, 0.9)])
def test_focal_loss_matches_the_literal_formula(gamma, alpha):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(40, generator=g, dtype=torch.float64)
    targets = (torch.rand(40, generator=g) < 0.5).double()
    got = rr.focal_loss(logits, targets, gamma, alpha).item()
    assert got == pytest.approx(focal_literal(logits, targets, gamma, alpha), rel=1e-12)


def test_gamma_zero_is_alpha_times_bce():
    logits = torch.tensor([2.0, -1.0, 0.3, -4.0], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets).item()
    assert rr.focal_loss(logits, targets, 0.0, 0.5).item() == pytest.approx(0.5 * bce, rel=1e-12)


def test_a_perfect_head_gives_the_minimum_and_chance_gives_alpha_half_pow_gamma_log2():
    targets = torch.tensor([1.0] * 6 + [0.0] * 6, dtype=torch.float64)
    perfect = 30 * (2 * targets - 1)  # confident and right on every pair
    assert rr.focal_loss(perfect, targets).item() < 1e-30
    assert rr.focal_loss(torch.zeros(12, dtype=torch.float64), targets).item() == pytest.approx(
        0.5 * 0.25 * math.log(2), rel=1e-12)
    wrong = -perfect
    assert rr.focal_loss(wrong, targets).item() == pytest.approx(0.5 * 30, rel=1e-6)  # -log sigmoid(-30) ~ 30


def test_collapsed_features_cannot_beat_chance():
    # one logit for a positive and a negative (their inputs are equal): the best is y = 0
    ys = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    both = torch.stack([ys, ys], 1)  # (Y, 2)
    targets = torch.tensor([1.0, 0.0], dtype=torch.float64).expand_as(both)
    per_y = torch.stack([rr.focal_loss(b, t) for b, t in zip(both, targets)])
    assert per_y.argmin().item() == 600 and per_y.min().item() == pytest.approx(0.125 * math.log(2), rel=1e-12)
    # the module on identical images: every feature equal, so the loss is at least that of chance
    cfg = _cfg()
    model = tiny_model(rr, cfg)
    same = {"views": [torch.ones(8, 3, 32, 32) for _ in range(4)], "index": torch.arange(8),
            "label": torch.full((8,), -1)}
    assert model(same)["loss"].item() >= 0.125 * math.log(2) - 1e-7


# --- the module ----------------------------------------------------------------------------------------------


def test_module_loss_is_the_focal_loss_of_the_head_on_the_official_pairs():
    cfg = _cfg()
    model = tiny_model(rr, cfg)
    batch = fixed_batch(rr, cfg, n=6)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    out = model(batch)
    assert calls == [(4 * 6, 3, 32, 32)]  # all K N views in one backbone batch
    with torch.no_grad():
        features = model.backbone(torch.cat(batch["views"]))  # (K N, D), batch statistics as in forward
        pairs, targets = official_pairs(features, 4, "cat")
        logits = model.relation_head(pairs).squeeze(1).double()  # BN over the same set of pairs
    want = focal_literal(logits, targets, 2.0, 0.5)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    acc = ((logits > 0).double() == targets).double()
    assert out["accuracy_pos"].item() == pytest.approx(acc[targets == 1].mean().item())
    assert out["accuracy_neg"].item() == pytest.approx(acc[targets == 0].mean().item())
    assert {"loss", "bce", "accuracy"} <= set(out)


def test_forward_draws_nothing_from_the_rng():
    cfg = _cfg()
    model = tiny_model(rr, cfg)
    batch = fixed_batch(rr, cfg, n=8)
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(model(batch)["loss"].item())
    assert losses[0] == losses[1]


def test_gradients_reach_the_backbone_and_the_head():
    cfg = _cfg()
    model = tiny_model(rr, cfg)
    out = model(fixed_batch(rr, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    for layer in (model.relation_head[0], model.relation_head[3]):
        assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("how", ["sum", "max"])
def test_other_aggregations_size_the_head_to_d(how):
    model = tiny_model(rr, _cfg(aggregation=how))
    assert model.relation_head[0].in_features == model.backbone.feature_dim
    assert torch.isfinite(model(fixed_batch(rr, _cfg(aggregation=how), n=4))["loss"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="aggregation"):
        tiny_model(rr, _cfg(aggregation="product"))
    with pytest.raises(ValueError, match="2 augmentations"):
        tiny_model(rr, _cfg(num_augmentations=1))
    model = tiny_model(rr, _cfg())
    with pytest.raises(ValueError, match="2 augmentations"):
        model({"views": [torch.randn(4, 3, 32, 32)], "index": torch.arange(4), "label": torch.full((4,), -1)})


def test_param_groups_are_the_backbone_and_the_head_at_a_constant_rate():
    model = tiny_model(rr, rr.Config())
    groups = model.param_groups()
    assert [g["fixed_lr"] for g in groups] == [True, True]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.relation_head.parameters()}
    opt = train.build_optimizer(model, rr.Config(), 1e-3)
    assert isinstance(opt, torch.optim.AdamW) and all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert train.group_lr(groups[0], 0.0, 1e-3, 100, 10) == 1e-3  # the peak rate, whatever the schedule


def test_embed_is_the_backbone_features():
    model = tiny_model(rr, _cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


# --- Config, views, presets ------------------------------------------------------------------------------------


def test_config_is_the_papers():
    cfg = rr.Config()
    assert (cfg.num_augmentations, cfg.aggregation, cfg.batch_size, cfg.epochs) == (32, "cat", 64, 200)
    assert (cfg.relation_hidden_dim, cfg.leaky_slope, cfg.focal_gamma, cfg.focal_alpha) == (256, 0.01, 2.0, 0.5)
    assert cfg.optimizer == "adamw" and cfg.weight_decay == 0.0 and cfg.constant_lr and cfg.warmup_epochs == 0
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(1e-3)  # Adam's 1e-3 at batch 64
    head = tiny_model(rr, cfg).relation_head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]
    assert head[0].out_features == 256 and head[3].out_features == 1 and head[2].negative_slope == 0.01


def test_view_recipe_k_views_of_the_official_pipeline():
    cfg = rr.Config()
    views = rr.augmentations(cfg, 32)
    assert len(views) == 32
    view = views[0]
    kinds = [type(t) for t in view.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomApply,
                     v2.RandomGrayscale, v2.ToDtype, v2.Normalize]
    crop, jitter = view.transforms[1], view.transforms[3]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert v2.InterpolationMode(crop.interpolation) == v2.InterpolationMode.BILINEAR
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == pytest.approx((0.2, 1.8))
    assert jitter.transforms[0].hue == (-0.2, 0.2) and view.transforms[4].p == 0.2
    batch = fixed_batch(rr, _cfg(), n=4)["views"]
    assert len(batch) == 4 and all(v.shape == (4, 3, 32, 32) for v in batch)


def test_small_preset_names_config_fields():
    small = rr.PRESETS["small"]
    assert set(small) <= set(rr.Config.__dataclass_fields__)
    assert small["num_augmentations"] >= 2


def test_smoke_fit_lowers_the_loss():
    losses, model = smoke_fit(rr, _cfg(), steps=30, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
