"""MSN / PMSN: the objective against a literal computation, Sinkhorn, sharpening, the ME-MAX and prior
limits, the masked ViT anchors and focal crops, the EMA target, the view recipe, presets, a smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import backbones, train, views

from .helpers import fixed_batch, load

msn = load("msn")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


# --- the objective, literally ---------------------------------------------------------------------


def _unit(row):
    n = math.sqrt(sum(a * a for a in row))
    return [a / n for a in row]


def _softmax(logits):
    top = max(logits)
    e = [math.exp(a - top) for a in logits]
    return [x / sum(e) for x in e]


def sinkhorn_literal(p, iterations):
    """Official distributed_sinkhorn with loops on Q = p^T (K x B), in one process."""
    k, b = len(p[0]), len(p)
    q = [[p[j][r] for j in range(b)] for r in range(k)]
    total = sum(sum(row) for row in q)
    q = [[a / total for a in row] for row in q]
    for _ in range(iterations):
        q = [[a / (sum(row) * k) for a in row] for row in q]  # each prototype: 1/K
        cols = [sum(q[r][j] for r in range(k)) for j in range(b)]
        q = [[q[r][j] / (cols[j] * b) for j in range(b)] for r in range(k)]  # each sample: 1/B
    return [[q[r][j] * b for r in range(k)] for j in range(b)]


def msn_literal(anchor, target, protos, tau, tau_t, prior, lam, iterations):
    """Sec. 3: 1/(MB) sum H(p+_i, p_{i,m}) + lambda KL(p_bar || prior), with cosine softmaxes."""
    q = [_unit(r) for r in protos.tolist()]
    cos = [[sum(a * b for a, b in zip(_unit(z), qk)) for qk in q] for z in anchor.tolist()]
    p = [_softmax([c / tau for c in row]) for row in cos]
    t = [_softmax([sum(a * b for a, b in zip(_unit(z), qk)) / tau_t for qk in q]) for z in target.tolist()]
    if iterations:
        t = sinkhorn_literal(t, iterations)
    b = len(t)
    ce = sum(-sum(tk * math.log(pk) for tk, pk in zip(t[r % b], p[r])) for r in range(len(p))) / len(p)
    p_bar = [sum(row[k] for row in p) / len(p) for k in range(len(q))]
    kl = sum(a * math.log(a / pi) for a, pi in zip(p_bar, prior.tolist()))
    return ce + lam * kl, ce, kl


@pytest.mark.parametrize("m,b,k,d,tau,tau_t,exponent,iters", [
    (3, 4, 5, 6, 0.1, 0.025, 0.0, 3), (1, 5, 7, 4, 0.1, 0.05, 0.25, 0), (5, 2, 3, 8, 0.5, 0.1, 1.0, 3),
    (2, 6, 8, 3, 0.2, 0.2, 0.25, 10)])
def test_loss_matches_literal_computation(m, b, k, d, tau, tau_t, exponent, iters):
    g = torch.Generator().manual_seed(m * b * k)
    anchor, target = torch.randn(m * b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    protos = torch.randn(k, d, generator=g, dtype=torch.float64)
    prior = msn.power_law_prior(k, exponent, dtype=torch.float64)
    want = msn_literal(anchor, target, protos, tau, tau_t, prior, 0.7, iters)
    # the loss casts to float32 (AMP-safe), so compare at float32's precision
    loss, ce, kl, targets = msn.msn_loss(anchor, target, protos, tau, tau_t, prior, 0.7, iters)
    for got, w in zip((loss, ce, kl), want):
        assert got.item() == pytest.approx(w, rel=2e-5, abs=1e-6)
    assert targets.shape == (b, k)


def test_sinkhorn_matches_literal_and_equipartitions():
    p = F.softmax(torch.randn(6, 4, dtype=torch.float64) / 0.3, dim=-1)
    got = msn.sinkhorn(p, 3)
    torch.testing.assert_close(got.double(), torch.tensor(sinkhorn_literal(p.tolist(), 3), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(6))  # every target a distribution (the last step)
    many = msn.sinkhorn(p, 200)
    torch.testing.assert_close(many.sum(dim=0), torch.full((4,), 6 / 4), rtol=1e-4, atol=1e-4)  # B/K each
    torch.testing.assert_close(msn.sinkhorn(3.0 * p, 3), got)  # scale-free
    perm = torch.eye(5)[torch.randperm(5)] * 0.9 + 0.02  # already doubly stochastic (rows and columns 1)
    torch.testing.assert_close(msn.sinkhorn(perm, 3), perm)


def test_target_is_the_official_sharpened_prediction():
    """softmax(cos / 0.1) ** (1 / 0.25), renormalised (official ``sharpen``) = softmax(cos / 0.025)."""
    z, protos = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    _, _, _, targets = msn.msn_loss(z, z, protos, 0.1, 0.025, msn.power_law_prior(6, 0.0), 1.0, 0)
    p = F.softmax(F.normalize(z, dim=-1) @ F.normalize(protos, dim=-1).T / 0.1, dim=-1)
    sharp = p ** (1 / 0.25)
    torch.testing.assert_close(targets.double(), sharp / sharp.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert (targets.max(dim=1).values >= p.max(dim=1).values.float()).all()  # sharper than the anchor's


# --- limits ---------------------------------------------------------------------------------------


def test_me_max_is_kl_to_uniform_and_pmsn_prior():
    k = 7
    uniform = msn.power_law_prior(k, 0.0, dtype=torch.float64)
    torch.testing.assert_close(uniform, torch.full((k,), 1 / k, dtype=torch.float64))
    p = F.softmax(torch.randn(k, dtype=torch.float64), dim=0)
    entropy = float(-(p * p.log()).sum())
    assert msn.prior_kl(p, uniform).item() == pytest.approx(math.log(k) - entropy, rel=1e-12)  # log K - H(p_bar)
    one_hot = torch.zeros(k, dtype=torch.float64)
    one_hot[2] = 1
    assert msn.prior_kl(one_hot, uniform).item() == pytest.approx(math.log(k), rel=1e-12)  # the most it costs
    assert msn.prior_kl(uniform, uniform).item() == pytest.approx(0, abs=1e-15)
    power = msn.power_law_prior(k, 0.25, dtype=torch.float64)
    want = torch.arange(1, k + 1, dtype=torch.float64) ** -0.25
    torch.testing.assert_close(power, want / want.sum())
    assert (power[1:] < power[:-1]).all()  # decreasing in k
    assert msn.prior_kl(power, power).item() == pytest.approx(0, abs=1e-15)
    assert msn.prior_kl(uniform, power).item() > 0 and msn.prior_kl(power, uniform).item() > 0


def test_limits_of_the_objective():
    k = d = 6
    protos = torch.eye(k, dtype=torch.float64)  # orthonormal prototypes
    prior = msn.power_law_prior(k, 0.0, dtype=torch.float64)
    # each image on its own prototype: p_bar uniform by symmetry, ME-MAX exactly 0
    _, _, spread, _ = msn.msn_loss(protos, protos, protos, 0.1, 0.025, prior, 1.0, 3)
    assert spread.item() == pytest.approx(0, abs=1e-6)
    # every image on prototype 0 (collapse): ME-MAX = KL(p || U) of one peaked softmax, close to log K
    collapsed = protos[:1].expand(k, d)
    _, _, kl, _ = msn.msn_loss(collapsed, protos, protos, 0.1, 0.025, prior, 1.0, 3)
    p = F.softmax(protos[0] / 0.1, dim=0)
    assert kl.item() == pytest.approx(math.log(k) + float((p * p.log()).sum()), rel=1e-5)
    assert kl.item() > 0.9 * math.log(k)
    # anchors orthogonal to every prototype predict uniform: the cross-entropy is log K whatever the target
    flat = torch.zeros(4, d + 1, dtype=torch.float64)
    flat[:, -1] = 1
    padded = F.pad(protos, (0, 1))
    _, ce, kl_flat, _ = msn.msn_loss(flat, torch.randn(4, d + 1, dtype=torch.float64), padded, 0.1, 0.025, prior, 1.0, 3)
    assert ce.item() == pytest.approx(math.log(k), rel=1e-6) and kl_flat.item() == pytest.approx(0, abs=1e-6)
    # an anchor that matches its own target beats random anchors on the cross-entropy
    t = torch.randn(8, d, dtype=torch.float64)
    _, best, _, _ = msn.msn_loss(t, t, protos, 0.025, 0.025, prior, 1.0, 0)
    for seed in range(3):
        other = torch.randn(8, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert msn.msn_loss(other, t, protos, 0.025, 0.025, prior, 1.0, 0)[1].item() > best.item()


def test_no_gradient_through_the_target():
    anchor = torch.randn(12, 5, requires_grad=True)
    target = torch.randn(4, 5, requires_grad=True)
    protos = torch.randn(6, 5, requires_grad=True)
    msn.msn_loss(anchor, target, protos, 0.1, 0.025, msn.power_law_prior(6, 0.25), 1.0, 3)[0].backward()
    assert target.grad is None and anchor.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0


def test_single_process_mean_and_momentum_schedule():
    p = torch.rand(5, 3)
    assert torch.equal(msn.global_mean(p), p.mean(0))  # no process group: a plain mean
    cfg = msn.Config()
    assert msn.ema_momentum(0, 100, cfg) == pytest.approx(0.996)
    assert msn.ema_momentum(100, 100, cfg) == pytest.approx(0.996 + 0.004 / 1.25)  # linear over 1.25 x the run
    assert msn.ema_momentum(50, 100, cfg) == pytest.approx(0.996 + 0.002 / 1.25)
    assert msn.ema_momentum(10**6, 100, cfg) == 1.0


# --- the model ------------------------------------------------------------------------------------


def _cfg(**kw):
    base = dict(num_prototypes=32, proj_hidden_dim=32, proj_dim=16, n_focal_views=2, epochs=10)
    return msn.Config(**{**base, **kw})


def _tiny_vit():
    torch.manual_seed(0)
    return backbones.ViT(backbones.ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2))


def _model(cfg):
    vit = _tiny_vit()
    return msn.MODEL(vit, vit.feature_dim, cfg)


def test_needs_a_vit_backbone():
    cnn = backbones.SmallCNN(width=8)
    with pytest.raises(ValueError, match=r"needs a ViT backbone .*vit_tiny.* has no forward_tokens") as e:
        msn.MODEL(cnn, cnn.feature_dim, _cfg())
    assert "\n" not in str(e.value)


def test_anchor_sees_only_kept_patches_and_focal_crops_target_sees_all():
    cfg = _cfg(mask_ratio=0.3)
    model = _model(cfg)
    batch = fixed_batch(msn, cfg, n=8)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(32, 32)] * 2 + [(16, 16)] * 2
    tokens = {"anchor": [], "target": []}
    for name, seen in tokens.items():
        blocks = getattr(model, name).backbone.blocks[0]
        blocks.register_forward_hook(lambda m, i, o, seen=seen: seen.append(tuple(i[0].shape[:2])))
    keeps = []
    forward_tokens = model.backbone.forward_tokens
    model.backbone.forward_tokens = lambda x, keep=None: keeps.append(keep) or forward_tokens(x, keep)
    out = model(batch)
    n_keep = math.floor(16 * 0.7)  # 16 patches of 8 px, 30% dropped
    assert tokens["anchor"] == [(8, 1 + n_keep), (16, 1 + 4)]  # masked anchors, then 2 x 8 focal crops (2x2)
    assert tokens["target"] == [(8, 1 + 16)]  # the unmasked target view
    (keep,) = keeps
    assert keep.shape == (8, n_keep) and (keep == keep[0]).all()  # one mask for the batch (official)
    assert len(set(keep[0].tolist())) == n_keep and keep.max() < 16
    assert torch.isfinite(out["loss"]) and 0 <= out["me_max"] <= math.log(32) + 1e-4
    assert 1 / 32 <= out["target_max"] <= 1 and 1 <= out["prototypes_used"] <= 8
    x = batch["views"][0]
    torch.testing.assert_close(msn.encode_masked(model.backbone, x, 0.0), model.backbone(x))


def test_gradients_reach_backbone_and_prototypes_not_target():
    cfg = _cfg()
    model = _model(cfg)
    model(fixed_batch(msn, cfg, n=8))["loss"].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None) > 0
    assert model.prototypes.grad.abs().sum() > 0 and model.anchor.head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())


def test_target_follows_by_ema_after_the_step():
    cfg = _cfg(ema_start=0.9)
    model = _model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target0 = [p.clone() for p in model.target.parameters()]
    loss = model(fixed_batch(msn, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(target0, model.target.parameters()))  # no optimizer step
    anchor = [p.detach().clone() for p in model.anchor.parameters()]
    model.on_step_end(1, 10)
    m = msn.ema_momentum(1, 10, cfg)
    assert model.momentum == m
    for old, new, a in zip(target0, model.target.parameters(), anchor):
        torch.testing.assert_close(new, m * old + (1 - m) * a)


def test_prototypes_get_no_weight_decay():
    cfg = _cfg(weight_decay=0.04)
    model = _model(cfg)
    decay, no_decay = model.param_groups()
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    assert any(p is model.prototypes for p in no_decay["params"])
    assert not any(p is model.prototypes for p in decay["params"])
    assert any(p is model.anchor.head[0].weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_embed_is_the_targets_cls_token():
    cfg = _cfg()
    model = _model(cfg)
    x = fixed_batch(msn, cfg, n=4)["views"][0]
    assert model.embed(x).shape == (4, 16)
    torch.testing.assert_close(model.embed(x), model.backbone(x))  # identical at initialisation
    with torch.no_grad():
        next(model.anchor.backbone.parameters()).add_(1.0)
    torch.testing.assert_close(model.embed(x), model.target.backbone(x))


# --- views and presets ----------------------------------------------------------------------------


def _probs(pipe, name):
    return [t.p for t in pipe.transforms if type(t).__name__ == name or
            (type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == name)]


def test_view_recipe():
    cfg = msn.Config()
    pipes = msn.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipes) == 2 + cfg.n_focal_views
    crops = [next(t for t in p.transforms if type(t).__name__ == "RandomResizedCrop") for p in pipes]
    assert [tuple(c.size) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 10
    assert [tuple(c.scale) for c in crops] == [(0.3, 1.0)] * 2 + [(0.05, 0.3)] * 10
    jitter = next(t for t in pipes[0].transforms if type(t).__name__ == "RandomApply").transforms[0]
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)  # s = 0.5: (0.4, 0.4, 0.4, 0.1)
    assert views.plan_views(pipes, in_memory=True).mode == "device"
    assert [msn.focal_crop_size(cfg, s) for s in (224, 64, 32)] == [96, 32, 16]
    big = msn.augmentations(cfg, 224)
    assert [_probs(p, "GaussianBlur") for p in big] == [[0.5]] * 12 and all(_probs(p, "GaussianBlur") == [] for p in pipes)
    assert all(_probs(p, "RandomSolarize") == [] for p in big)
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in big[1:3]] == [(3, 224, 224), (3, 96, 96)]


def test_presets_name_config_fields():
    fields = {f.name for f in dataclasses.fields(msn.Config)}
    for name, preset in msn.PRESETS.items():
        assert set(preset) <= fields, name
    small = dataclasses.replace(msn.Config(), **msn.PRESETS["small"])
    assert small.epochs == 15 and small.n_focal_views < msn.Config().n_focal_views and small.prior_exponent == 0
    assert dataclasses.replace(msn.Config(), **msn.PRESETS["pmsn"]).prior_exponent == 0.25
    assert msn.PRESETS["pmsn-small"] == {**msn.PRESETS["small"], "prior_exponent": 0.25}


# --- smoke fit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.0, 0.25])
def test_smoke_fit_lowers_the_loss(exponent):
    """helpers.smoke_fit builds a small CNN, which MSN refuses: the same loop with a tiny ViT."""
    cfg = _cfg(prior_exponent=exponent, ema_start=0.99)
    model = _model(cfg)
    batch = train.prepare_batch(fixed_batch(msn, cfg, n=16), torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 2e-3)
    losses = []
    for step in range(15):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, 15)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert model.momentum > 0.99
