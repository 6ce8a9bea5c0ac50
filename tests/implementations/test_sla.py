"""SLA: the joint labels (class * M + rotation, the official order), L_SLA against a literal loop and its
limits (a perfect joint classifier, chance log(N M)), the large-loss option, the aggregated inference against
a literal loop (and ``aggregated_logits`` on images), the four rotations made in forward (exact rot90s, no
randomness), labels required (refusals), the joint head built in setup, gradients, the Config against the
official code, the view recipe, the small preset, embed, the catalog entry and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
import yaml
from torchvision.transforms import v2

from selfsup import catalog, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

sla = load("lee-2020-label-augmentation")
M = 4


def _model(num_classes=10, **kw):
    model = tiny_model(sla, sla.Config(**kw))
    model.setup(64, num_classes)
    return model


def _batch(n=4, num_classes=10):
    batch = fixed_batch(sla, sla.Config(), n=n)
    batch["label"] = torch.arange(n) % num_classes
    return batch


# --- joint labels and the loss ------------------------------------------------------------------------


def test_joint_label_is_class_times_m_plus_rotation():
    label = torch.tensor([0, 3, 7])
    rotation = torch.tensor([2, 0, 3])
    assert sla.joint_labels(label, rotation, M).tolist() == [2, 12, 31]
    # every (class, rotation) pair of 10 classes x 4 rotations has its own index in 0..39
    y, j = torch.meshgrid(torch.arange(10), torch.arange(M), indexing="ij")
    idx = sla.joint_labels(y.flatten(), j.flatten(), M)
    assert sorted(idx.tolist()) == list(range(40))
    assert torch.equal(idx // M, y.flatten()) and torch.equal(idx % M, j.flatten())


def sla_literal(z, label, num_classes, large=False):
    """1/N sum_n 1/M sum_j -log softmax(z~(t_j(x_n)))_{(y_n, j)}, the softmax over all N_c M joint labels."""
    total = 0.0
    n = len(label)
    for i in range(n):
        for j in range(M):
            row = [float(v) for v in z[i * M + j]]
            assert len(row) == num_classes * M
            log_norm = math.log(sum(math.exp(v) for v in row))
            total += -(row[int(label[i]) * M + j] - log_norm) / (1 if large else M)
    return total / n


@pytest.mark.parametrize("n,num_classes,seed", [(1, 2, 0), (5, 3, 1), (6, 10, 2)])
def test_sla_loss_matches_a_literal_joint_cross_entropy(n, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n * M, num_classes * M, generator=g, dtype=torch.float64)
    label = torch.randint(num_classes, (n,), generator=g)
    target = sla.joint_labels(label.repeat_interleave(M), torch.arange(M).repeat(n), M)
    assert sla.sla_loss(z, target, M).item() == pytest.approx(sla_literal(z, label, num_classes), rel=1e-6)
    large = sla.sla_loss(z, target, M, large_loss=True).item()
    assert large == pytest.approx(sla_literal(z, label, num_classes, large=True), rel=1e-6)


def test_sla_loss_limits_perfect_joint_classifier_and_chance():
    n, num_classes = 3, 5
    label = torch.tensor([4, 0, 2])
    target = sla.joint_labels(label.repeat_interleave(M), torch.arange(M).repeat(n), M)
    perfect = 50.0 * nn.functional.one_hot(target, num_classes * M).double()
    assert sla.sla_loss(perfect, target, M).item() < 1e-12
    uniform = torch.zeros(n * M, num_classes * M)
    assert sla.sla_loss(uniform, target, M).item() == pytest.approx(math.log(num_classes * M), rel=1e-6)
    # right class, wrong rotation is still a mistake of the joint softmax
    wrong_rotation = 50.0 * nn.functional.one_hot(target - target % M + (target + 1) % M, num_classes * M).double()
    assert sla.sla_loss(wrong_rotation, target, M).item() > 40


# --- aggregated inference ---------------------------------------------------------------------------------


def aggregate_literal(z, num_classes):
    """s_i(x_n) = 1/M sum_j z~_{i M + j}(t_j(x_n))."""
    n = len(z) // M
    return [[sum(float(z[k * M + j, i * M + j]) for j in range(M)) / M for i in range(num_classes)] for k in range(n)]


@pytest.mark.parametrize("n,num_classes", [(1, 2), (4, 3), (3, 10)])
def test_aggregate_matches_a_literal_loop(n, num_classes):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n * M, num_classes * M, generator=g, dtype=torch.float64)
    got = sla.aggregate(z, M)
    assert got.shape == (n, num_classes)
    torch.testing.assert_close(got, torch.tensor(aggregate_literal(z, num_classes), dtype=torch.float64))


def test_aggregated_logits_read_each_rotated_copy_at_its_own_rotation():
    model = _model(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    rotated, _ = sla.four_rotations(x)
    with torch.no_grad():
        z = model.head(model.backbone(rotated))  # (8, 12)
    want = aggregate_literal(z, 3)
    torch.testing.assert_close(model.aggregated_logits(x), torch.tensor(want), rtol=1e-5, atol=1e-6)


# --- rotations (the same helper as rotnet.py) -------------------------------------------------------------


def test_four_rotations_are_exact_rot90s_image_major():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    rotated, rotation = sla.four_rotations(x)
    assert rotation.tolist() == [0, 1, 2, 3] * 2
    for i in range(2):
        for r in range(M):
            for a in range(4):
                for b in range(4):
                    src = [(a, b), (b, 3 - a), (3 - a, 3 - b), (3 - b, a)][r]  # counter-clockwise r x 90 degrees
                    assert torch.equal(rotated[M * i + r][:, a, b], x[i, :, src[0], src[1]])
    with pytest.raises(ValueError, match="square"):
        sla.four_rotations(torch.zeros(1, 3, 4, 5))


def test_rotation_helper_is_a_verbatim_copy_of_rotnets():
    import inspect

    assert inspect.getsource(sla.four_rotations) == inspect.getsource(load("rotnet").four_rotations)


# --- the model: labels, setup, forward, gradients ---------------------------------------------------------------


def test_refuses_to_run_without_labels():
    with pytest.raises(ValueError, match="uses_labels"):
        tiny_model(sla, sla.Config(uses_labels=False))
    model = _model()
    batch = _batch()
    batch["label"] = torch.full((4,), -1)  # what the harness passes a method that does not ask for labels
    with pytest.raises(ValueError, match="labels"):
        model(batch)


def test_setup_builds_the_joint_classifier_from_the_number_of_classes():
    model = tiny_model(sla, sla.Config())
    with pytest.raises(RuntimeError, match="setup"):
        model(_batch())
    model.setup(100, 7)
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (64, 28)
    assert {"head.weight", "head.bias"} <= set(model.state_dict())


def test_forward_feeds_all_four_copies_once_and_logs_the_accuracies():
    model = _model()
    batch = _batch()
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    out = model(batch)
    assert len(seen) == 1 and seen[0].shape == (16, 3, 32, 32)
    torch.testing.assert_close(seen[0], sla.four_rotations(batch["views"][0])[0], rtol=0, atol=0)
    assert set(out) == {"loss", "joint_acc", "single_acc", "agg_acc"} and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(math.log(40), abs=0.5)  # near chance at init


def test_forward_is_the_loss_of_the_joint_labels_and_draws_nothing():
    model = _model()
    batch = _batch()
    torch.manual_seed(0)
    loss = model(batch)["loss"]
    state = torch.get_rng_state()
    z, rotation = model.joint_logits(batch["views"][0])
    want = sla_literal(z.detach().double(), batch["label"], 10)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.manual_seed(0)
    model(batch)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw in forward


def test_gradients_reach_the_backbone_and_the_head():
    model = _model()
    out = model(_batch())
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert model.head.weight.grad.abs().sum() > 0


def test_embed_is_backbone_features_of_the_upright_image():
    model = _model().eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


# --- Config, views, presets, catalog --------------------------------------------------------------------------


def test_config_is_the_official_cifar_setting():
    cfg = sla.Config()
    assert cfg.uses_labels is True and cfg.large_loss is False
    assert cfg.optimizer == "sgd" and cfg.base_lr * cfg.batch_size / 256 == pytest.approx(0.1)
    assert (cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.warmup_epochs) == (0.9, 1e-4, 128, 0)
    assert cfg.epochs == round(80000 * 128 / 45000)


def test_view_recipe_one_crop_and_flip():
    (view,) = sla.augmentations(sla.Config(), 32)
    assert [type(t) for t in view.transforms] == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip,
                                                  v2.ToDtype, v2.Normalize]
    crop = view.transforms[1]
    assert crop.scale == (0.77, 1.0) and crop.ratio == (1.0, 1.0) and tuple(crop.size) == (32, 32)
    assert views.plan_views([view], in_memory=True).mode == "device"


def test_small_preset_names_config_fields():
    assert set(sla.PRESETS["small"]) <= set(sla.Config.__dataclass_fields__)


def test_catalog_entry_points_here_and_is_marked_supervised():
    entry = yaml.safe_load((catalog.ROOT / "catalog" / "lee-2020-label-augmentation.yaml").read_text())
    assert entry["implementation"] == "implementations/pretext_task/sla.py"
    props = entry["properties"]
    assert props["uses_labels"] is True and props["projector"] is False and props["negatives"] is False


# --- smoke fit --------------------------------------------------------------------------------------------


def test_smoke_fit_lowers_the_loss():
    losses, model = smoke_fit(sla, sla.Config(), steps=25, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert model.head.out_features == 10 * M  # smoke_fit's setup(64, 10)
