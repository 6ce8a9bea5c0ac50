"""MoCo v3: Alg. 1's ctr against a literal InfoNCE, symmetry, limits, the momentum encoder and its cosine
schedule, the heads of both recipes, the frozen random patch projection of a ViT, smoke fits with a CNN and
a ViT, the view recipe and the presets."""

import dataclasses
import math

import pytest
import torch
from torchvision.transforms import v2

from selfsup import backbones, methods, train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

mocov3 = load("moco-v3")


def ctr_literal(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """2 t * mean_i -log exp(q_i.k_i/t) / sum_j exp(q_i.k_j/t), unit vectors, with explicit loops."""
    unit = lambda v: v / v.norm()  # noqa: E731
    total = 0.0
    keys = [unit(kj) for kj in k.double()]
    for i, qi in enumerate(q.double()):
        qi = unit(qi)
        scores = [math.exp(float(qi @ kj) / t) for kj in keys]
        total += -math.log(scores[i] / sum(scores))
    return 2 * t * total / len(q)


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.2), (7, 3, 1.0), (3, 32, 0.07), (1, 5, 0.5)])
def test_ctr_matches_equation(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    q, k = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
    assert mocov3.contrastive_loss(q, k, t).item() == pytest.approx(ctr_literal(q, k, t), rel=1e-10)


def test_symmetrised_loss_is_ctr_q1_k2_plus_ctr_q2_k1():
    g = torch.Generator().manual_seed(3)
    q1, q2, k1, k2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    want = ctr_literal(q1, k2, 0.2) + ctr_literal(q2, k1, 0.2)
    assert mocov3.moco_v3_loss(q1, q2, k1, k2, 0.2).item() == pytest.approx(want, rel=1e-10)
    assert mocov3.moco_v3_loss(q2, q1, k2, k1, 0.2).item() == pytest.approx(want, rel=1e-10)  # swapping views


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_limits(t):
    n = 5
    eye = torch.eye(n, dtype=torch.float64)
    # q = its key and every other key orthogonal: 2t log(1 + (N - 1) e^(-1/t)) per direction
    want = 2 * t * math.log(1 + (n - 1) * math.exp(-1 / t))
    assert mocov3.contrastive_loss(eye, eye, t).item() == pytest.approx(want, rel=1e-10)
    # collapsed embeddings: every logit equal, 2t log N per direction, 4t log N in all
    same = torch.ones(n, 4, dtype=torch.float64)
    assert mocov3.moco_v3_loss(same, same, same, same, t).item() == pytest.approx(4 * t * math.log(n), rel=1e-10)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(n, n, generator=g, dtype=torch.float64)
    assert mocov3.contrastive_loss(eye, eye, t).item() < mocov3.contrastive_loss(rand, eye, t).item()
    assert mocov3.contrastive_loss(eye, eye, t).item() < 2 * t * math.log(n)  # told apart beats collapsed


def test_scale_invariance_and_temperature_scaling():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    want = mocov3.contrastive_loss(q, k, 0.3).item()
    assert mocov3.contrastive_loss(3 * q, 0.5 * k, 0.3).item() == pytest.approx(want, rel=1e-12)
    # the 2 tau factor of Alg. 1: the loss is 2 tau times the plain cross-entropy
    logits = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T / 0.3
    ce = torch.nn.functional.cross_entropy(logits, torch.arange(5)).item()
    assert want == pytest.approx(0.6 * ce, rel=1e-12)


def test_loss_does_not_backpropagate_into_keys():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    mocov3.contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and k.grad is None


def test_momentum_schedule_is_cosine_from_base_to_one():
    assert mocov3.ema_rate(0, 100, 0.99) == pytest.approx(0.99)
    assert mocov3.ema_rate(50, 100, 0.99) == pytest.approx(0.995)
    assert mocov3.ema_rate(100, 100, 0.99) == pytest.approx(1.0)
    rates = [mocov3.ema_rate(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(rates, rates[1:]))


def _small_cfg(**kw):
    return mocov3.Config(**{"proj_hidden_dim": 32, "proj_dim": 16, **kw})


def test_gradients_reach_backbone_and_predictor_not_momentum_encoder():
    cfg = _small_cfg()
    model = tiny_model(mocov3, cfg)
    out = model(fixed_batch(mocov3, cfg, n=8))
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "pos_sim", "key_momentum"}
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.base_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())
    assert model.frozen == [] and all(p.requires_grad for p in model.backbone.parameters())  # a CNN: nothing frozen


def test_momentum_encoder_changes_only_through_its_cosine_ema():
    cfg = _small_cfg(key_momentum=0.9)
    model = tiny_model(mocov3, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.parameters(), model.base_encoder.parameters()))
    assert len(list(model.momentum_encoder.parameters())) == len(list(model.base_encoder.parameters()))  # no predictor
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    loss = model(fixed_batch(mocov3, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_encoder.parameters()))
    online = [p.detach().clone() for p in model.base_encoder.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, online))
    model.on_step_end(1, 10)
    m = mocov3.ema_rate(1, 10, 0.9)
    assert model.m == pytest.approx(m) and 0.9 < m < 1
    for old, new, o in zip(before, model.momentum_encoder.parameters(), online):
        torch.testing.assert_close(new, m * old + (1 - m) * o)
    model.on_step_end(10, 10)
    assert model.m == 1.0


def test_heads_of_both_recipes():
    bn, lin, relu = torch.nn.BatchNorm1d, torch.nn.Linear, torch.nn.ReLU
    vit = tiny_model(mocov3, _small_cfg())  # the default (ViT) recipe: 3-layer projector, BN on both outputs
    assert [type(m) for m in vit.base_encoder[1]] == [lin, bn, relu, lin, bn, relu, lin, bn]
    assert [type(m) for m in vit.predictor] == [lin, bn, relu, lin, bn]
    resnet = tiny_model(mocov3, methods.make_config(mocov3, {"proj_hidden_dim": "32", "proj_dim": "16"}, "resnet"))
    assert [type(m) for m in resnet.base_encoder[1]] == [lin, bn, relu, lin, bn]
    assert [type(m) for m in resnet.predictor] == [lin, bn, relu, lin]  # no BN on the predictor's output
    for head in (vit.base_encoder[1], vit.predictor, resnet.base_encoder[1]):
        assert all(m.bias is None for m in head if isinstance(m, lin))
        assert not head[-1].affine and all(m.affine for m in head[:-1] if isinstance(m, bn))
    assert vit.base_encoder[1][0].in_features == vit.backbone.feature_dim and vit.predictor[-2].out_features == 16


def _tiny_vit():
    return backbones.ViT(backbones.ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2, mlp_ratio=2.0))


def test_vit_patch_projection_is_frozen_at_its_random_init():
    torch.manual_seed(0)
    backbone = _tiny_vit()
    init = [p.clone() for p in backbone.patch_embed.parameters()]
    cfg = _small_cfg()
    model = mocov3.MODEL(backbone, backbone.feature_dim, cfg)
    assert sorted(model.frozen) == ["patch_embed.bias", "patch_embed.weight"]
    assert not any(p.requires_grad for p in backbone.patch_embed.parameters())
    assert all(p.requires_grad for n, p in backbone.named_parameters() if not n.startswith("patch_embed"))
    opt = train.build_optimizer(model, cfg, 1e-2)  # the harness's AdamW
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not held & {id(p) for p in backbone.patch_embed.parameters()}  # kept out of the optimizer
    assert id(backbone.cls_token) in held
    others = {n: p.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    batch = fixed_batch(mocov3, cfg, n=8)
    for step in range(2):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in backbone.patch_embed.parameters())
        opt.step()
        model.on_step_end(step + 1, 2)
    assert all(torch.equal(a, b) for a, b in zip(init, backbone.patch_embed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(init, model.momentum_encoder[0].patch_embed.parameters()))
    assert any(not torch.equal(p, others[n]) for n, p in backbone.named_parameters() if p.requires_grad)
    assert model.embed(batch["views"][0]).shape == (8, 16)  # the CLS token


def test_patch_projection_found_at_any_depth_and_only_when_asked():
    class Wrapped(torch.nn.Module):  # a timm-style nesting: encoder.patch_embed.proj
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.patch_embed = torch.nn.Module()
            self.encoder.patch_embed.proj = torch.nn.Conv2d(3, 4, 2, stride=2)
            self.head = torch.nn.Linear(4, 4)

    net = Wrapped()
    assert mocov3.freeze_patch_embedding(net) == ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    assert not net.encoder.patch_embed.proj.weight.requires_grad and net.head.weight.requires_grad
    backbone = _tiny_vit()
    mocov3.MODEL(backbone, backbone.feature_dim, _small_cfg(freeze_patch_embed=False))
    assert all(p.requires_grad for p in backbone.parameters())


def test_smoke_fit_lowers_the_loss_with_a_cnn():
    cfg = dataclasses.replace(methods.make_config(mocov3, preset="small"), proj_hidden_dim=64, proj_dim=32)
    losses, model = smoke_fit(mocov3, cfg, steps=30)  # LARS, the CNN recipe
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert model.m > cfg.key_momentum


def test_smoke_fit_lowers_the_loss_with_a_vit():
    cfg = _small_cfg(proj_hidden_dim=64, proj_dim=32)  # AdamW, tau 0.2, frozen patch projection
    torch.manual_seed(0)
    backbone = _tiny_vit()
    model = mocov3.MODEL(backbone, backbone.feature_dim, cfg)
    batch = train.prepare_batch(fixed_batch(mocov3, cfg), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(25):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 25)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses


def test_paper_defaults_and_presets():
    cfg = mocov3.Config()  # the ViT recipe
    assert (cfg.temperature, cfg.proj_layers, cfg.pred_last_bn, cfg.proj_hidden_dim, cfg.proj_dim) == (0.2, 3, True, 4096, 256)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs) == ("adamw", 1.5e-4, 0.1, 40, 300)
    assert (cfg.key_momentum, cfg.min_scale, cfg.batch_size, cfg.freeze_patch_embed) == (0.99, 0.08, 4096, True)
    r = methods.make_config(mocov3, preset="resnet")
    assert (r.temperature, r.proj_layers, r.pred_last_bn, r.min_scale) == (1.0, 2, False, 0.2)
    assert (r.optimizer, r.base_lr, r.weight_decay, r.warmup_epochs, r.epochs) == ("lars", 0.6, 1e-6, 10, 100)
    fields = {f.name for f in dataclasses.fields(mocov3.Config)}
    for name, preset in mocov3.PRESETS.items():
        assert set(preset) <= fields, name
    small = methods.make_config(mocov3, preset="small")
    assert (small.optimizer, small.proj_layers, small.pred_last_bn, small.temperature) == ("lars", 2, False, 0.2)
    assert methods.make_config(mocov3, preset="small-vit").optimizer == "adamw"


def _steps(pipeline: v2.Compose) -> list:
    return list(pipeline.transforms)


def test_view_recipe_is_byols_asymmetric_pair():
    first, second = mocov3.augmentations(mocov3.Config(), 224)
    crop, flip, jitter, gray, blur1, solar1 = _steps(first)[1:7]
    assert crop.scale == (0.08, 1.0) and crop.antialias and isinstance(flip, v2.RandomHorizontalFlip)
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert gray.p == 0.2
    blur2, solar2 = _steps(second)[5:7]
    assert isinstance(blur1.transforms[0], v2.GaussianBlur) and blur1.transforms[0].sigma == [0.1, 2.0]
    assert (blur1.p, blur2.p) == (1.0, 0.1)  # T always blurs, T' rarely
    assert isinstance(solar1, v2.RandomSolarize) and (solar1.p, solar2.p) == (0.0, 0.2) and solar2.threshold == 128
    resnet_views = mocov3.augmentations(methods.make_config(mocov3, preset="resnet"), 32)
    assert _steps(resnet_views[0])[1].scale == (0.2, 1.0)
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
                   for t in _steps(resnet_views[1]))  # below 64 px: no blur
    for pipelines in ((first, second), resnet_views):
        assert views.plan_views(list(pipelines), in_memory=True).mode == "device"  # batched on the device


def test_embed_is_base_backbone_features():
    model = tiny_model(mocov3, _small_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.base_encoder[0](x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
