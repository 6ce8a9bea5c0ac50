"""SimCLR v2: NT-Xent with memory against a literal computation, its limits, the 3-layer head and the layer
``embed`` reads, the memory network's EMA, the queue, the views and a smoke fit."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

v2m = load("simclr-v2")
simclr = load("simclr")


def memory_loss_literal(z1, z2, k1, k2, memory, t: float) -> float:
    """The loss of the docstring with explicit loops: anchor z_i (2N of them) against the memory network's keys
    k_c of the batch's 2N views, c != i, and the K queued keys; the positive is the other view's key."""
    z = torch.cat([z1, z2]).double()
    k = torch.cat([k1, k2]).double()
    n2 = len(z)
    sim = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        num = math.exp(sim(z[i], k[j]) / t)
        den = sum(math.exp(sim(z[i], k[c]) / t) for c in range(n2) if c != i)
        den += sum(math.exp(sim(z[i], m) / t) for m in memory.double())
        total += -math.log(num / den)
    return total / n2


def nt_xent_literal(z1, z2, t: float) -> float:
    """SimCLR Eq. 1 with explicit loops, 2N anchors, k != i in the denominator."""
    return memory_loss_literal(z1, z2, z1, z2, torch.empty(0, z1.shape[1]), t)


@pytest.mark.parametrize("n,d,k,t", [(4, 8, 0, 0.1), (7, 3, 5, 0.5), (5, 16, 20, 0.2), (2, 4, 3, 1.0)])
def test_memory_loss_matches_equation(n, d, k, t):
    g = torch.Generator().manual_seed(n * d + k)
    z1, z2, k1, k2, memory = (torch.randn(m, d, generator=g, dtype=torch.float64) for m in (n, n, n, n, k))
    got = v2m.memory_nt_xent(z1, z2, k1, k2, memory, t).item()
    assert got == pytest.approx(memory_loss_literal(z1, z2, k1, k2, memory, t), rel=1e-10)


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.5), (7, 3, 0.1)])
def test_nt_xent_matches_equation_and_simclr(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert v2m.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_literal(z1, z2, t), rel=1e-10)
    assert v2m.nt_xent(z1, z2, t).item() == pytest.approx(simclr.nt_xent(z1, z2, t).item(), rel=1e-12)
    # keys equal to the projections and an empty memory: the memory loss is SimCLR's value
    empty = torch.empty(0, d, dtype=torch.float64)
    assert v2m.memory_nt_xent(z1, z2, z1, z2, empty, t).item() == pytest.approx(v2m.nt_xent(z1, z2, t).item(), rel=1e-12)


def test_memory_loss_is_symmetric_in_the_views():
    z1, z2, k1, k2 = (torch.randn(6, 5, dtype=torch.float64) for _ in range(4))
    memory = torch.randn(9, 5, dtype=torch.float64)
    assert v2m.memory_nt_xent(z1, z2, k1, k2, memory, 0.2).item() == pytest.approx(
        v2m.memory_nt_xent(z2, z1, k2, k1, memory, 0.2).item(), rel=1e-12)


def test_limits():
    n, k, t = 4, 6, 0.1
    eye = torch.eye(n + k, dtype=torch.float64)
    z, memory = eye[:n], eye[n:]  # keys = anchors of both views, every other sample and memory entry orthogonal
    best = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2 + k))
    assert v2m.memory_nt_xent(z, z, z, z, memory, t).item() == pytest.approx(best, rel=1e-10)
    same = torch.ones(n, 3, dtype=torch.float64)  # a constant embedding: every logit equal
    assert v2m.memory_nt_xent(same, same, same, same, torch.ones(k, 3, dtype=torch.float64), t).item() == pytest.approx(
        math.log(2 * n - 1 + k), rel=1e-10)
    assert v2m.nt_xent(same, same, t).item() == pytest.approx(math.log(2 * n - 1), rel=1e-10)
    rand = torch.randn(n, n + k, dtype=torch.float64)
    assert best < v2m.memory_nt_xent(rand, rand.roll(1, 0), rand, rand.roll(1, 0), memory, t).item()
    # memory entries close to the anchors make the loss larger
    assert v2m.memory_nt_xent(z, z, z, z, z.repeat(2, 1), t).item() > best


def test_scale_invariance_and_no_gradient_into_keys_or_memory():
    z1, z2 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True), torch.randn(5, 6, dtype=torch.float64)
    k1, k2, memory = (torch.randn(m, 6, dtype=torch.float64, requires_grad=True) for m in (5, 5, 7))
    loss = v2m.memory_nt_xent(z1, z2, k1, k2, memory, 0.3)
    scaled = v2m.memory_nt_xent(3 * z1, 0.5 * z2, 2 * k1, 4 * k2, 2 * memory, 0.3)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    assert z1.grad is not None and k1.grad is None and k2.grad is None and memory.grad is None


def _small_cfg(**kw):
    return v2m.Config(**{"proj_dim": 16, "queue_size": 64, **kw})


def test_head_has_three_bn_layers_as_wide_as_the_features():
    model = tiny_model(v2m, _small_cfg())
    width = model.backbone.feature_dim
    head = model.projector
    assert len(head) == 3
    linears = [layer[0] for layer in head]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(width, width), (width, width), (width, 16)]
    assert all(lin.bias is None for lin in linears)  # BN's shift replaces the bias
    assert all(isinstance(layer[1], torch.nn.BatchNorm1d) for layer in head)
    assert [isinstance(layer[-1], torch.nn.ReLU) for layer in head] == [True, True, False]
    last_bn = head[2][1]
    assert not last_bn.bias.requires_grad and torch.equal(last_bn.bias, torch.zeros(16))  # center=False
    assert all(0.005 < lin.weight.std().item() < 0.02 for lin in linears)  # N(0, 0.01^2) init
    assert len(tiny_model(v2m, _small_cfg(proj_hidden_dim=24, num_proj_layers=2)).projector[0][0].weight) == 24


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_embed_reads_the_chosen_head_layer(layer):
    model = tiny_model(v2m, _small_cfg(embed_layer=layer)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = model.backbone(x)
        want = [h]
        for j in range(3):
            lin, bn = model.projector[j][0], model.projector[j][1]
            out = bn(lin(want[-1]))
            want.append(out.relu() if j < 2 else out)
    torch.testing.assert_close(model.embed(x), want[layer])
    if layer == 3:
        torch.testing.assert_close(model.embed(x), model.online(x))


def test_default_embed_layer_is_the_first_head_layer_and_bad_layers_are_refused():
    assert v2m.Config().embed_layer == 1
    with pytest.raises(ValueError, match="embed_layer"):
        tiny_model(v2m, _small_cfg(embed_layer=4))
    with pytest.raises(ValueError, match="num_proj_layers"):
        tiny_model(v2m, _small_cfg(num_proj_layers=0, embed_layer=0))


def test_gradients_reach_backbone_not_memory_network_or_queue():
    cfg = _small_cfg()
    model = tiny_model(v2m, cfg)
    out = model(fixed_batch(v2m, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.online.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())
    assert not model.queue.requires_grad and model.queue.grad is None
    assert {"queue", "queue_ptr"} <= set(dict(model.named_buffers())) and {"queue", "queue_ptr"} <= set(model.state_dict())


def test_memory_network_changes_only_through_ema():
    cfg = _small_cfg(key_momentum=0.9)
    model = tiny_model(v2m, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.parameters(), model.online.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    loss = model(fixed_batch(v2m, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_encoder.parameters()))
    online = [p.detach().clone() for p in model.online.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, online))
    model.on_step_end(1, 10)
    for old, new, o in zip(before, model.momentum_encoder.parameters(), online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)
    for b_m, b_o in zip(model.momentum_encoder.buffers(), model.online.buffers()):
        assert torch.equal(b_m, b_o)  # BN statistics copied


def test_queue_takes_both_views_normalised_keys_at_the_pointer():
    cfg = _small_cfg(queue_size=40)
    model = tiny_model(v2m, cfg)
    batch = fixed_batch(v2m, cfg, n=8)
    reference = copy.deepcopy(model.momentum_encoder)  # before the step, train mode, both views in one pass
    with torch.no_grad():
        want = F.normalize(reference(torch.cat(batch["views"])), dim=1)  # (16, D): view 1, then view 2
    for step, start in enumerate([0, 16, 32]):
        before = model.queue.clone()
        assert int(model.queue_ptr) == start
        model(batch)
        assert torch.equal(model.queue, before)  # forward alone leaves the queue as it is
        keys = model.pending_keys.clone()
        if step == 0:
            torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-6)
        model.on_step_end(step + 1, 3)
        slots = [(start + i) % 40 for i in range(16)]  # the third batch wraps: 32..39, then 0..7
        assert torch.equal(model.queue[slots], keys)
        rest = [i for i in range(40) if i not in slots]
        assert torch.equal(model.queue[rest], before[rest])
        torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(40))
        assert model.pending_keys is None
    assert int(model.queue_ptr) == 8


def test_the_loss_contrasts_with_the_memory_networks_keys_and_the_queue():
    cfg = _small_cfg(queue_size=32)
    model = tiny_model(v2m, cfg).eval()  # BN with running statistics: deterministic outputs
    with torch.no_grad():  # a memory network that differs from the online one
        for p in model.momentum_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = fixed_batch(v2m, cfg, n=8)
    x = torch.cat(batch["views"])
    with torch.no_grad():
        z1, z2 = model.online(x).split(8)
        k1, k2 = F.normalize(model.momentum_encoder(x), dim=1).split(8)
        want = v2m.memory_nt_xent(z1, z2, k1, k2, model.queue, cfg.temperature)
        assert model(batch)["loss"].item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(model.pending_keys, torch.cat([k1, k2]))
        empty = model.queue[:0]
        assert want.item() != pytest.approx(v2m.memory_nt_xent(z1, z2, k1, k2, empty, cfg.temperature).item(), rel=1e-3)
        assert want.item() != pytest.approx(v2m.memory_nt_xent(z1, z2, z1, z2, model.queue, cfg.temperature).item(), rel=1e-3)


def test_without_memory_there_is_no_momentum_encoder_or_queue():
    cfg = _small_cfg(queue_size=0)
    model = tiny_model(v2m, cfg)
    assert not hasattr(model, "momentum_encoder") and "queue" not in dict(model.named_buffers())
    batch = fixed_batch(v2m, cfg, n=8)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and model.pending_keys is None
    model.on_step_end(1, 10)  # nothing to do
    with torch.no_grad():
        model.eval()
        z1, z2 = model.online(torch.cat(batch["views"])).split(8)
        assert model(batch)["loss"].item() == pytest.approx(v2m.nt_xent(z1, z2, cfg.temperature).item(), rel=1e-6)


def test_smoke_fit_lowers_the_loss():
    cfg = _small_cfg(queue_size=32, key_momentum=0.9, temperature=0.5, optimizer="sgd")
    losses, model = smoke_fit(v2m, cfg, steps=30, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[1:6]) / 5 - 0.1, losses
    assert int(model.queue_ptr) == (30 * 64) % 32 and model.pending_keys is None


def test_presets_and_paper_defaults():
    cfg = v2m.Config()
    assert (cfg.num_proj_layers, cfg.proj_hidden_dim, cfg.proj_dim, cfg.embed_layer) == (3, 0, 128, 1)
    assert (cfg.queue_size, cfg.key_momentum, cfg.temperature) == (65536, 0.999, 0.1)
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs, cfg.batch_size, cfg.sync_batchnorm) == ("lars", 1e-4, 800, 4096, True)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(0.1 * math.sqrt(4096))  # peak 6.4
    assert cfg.warmup_epochs == 0.05 * cfg.epochs
    fields = set(v2m.Config.__dataclass_fields__)
    for preset in v2m.PRESETS.values():
        assert set(preset) <= fields
    small = methods.make_config(v2m, preset="small")
    assert small.queue_size == 0 or small.queue_size % 128 == 0  # whole steps of 2 x 64 keys


def test_view_recipe():
    pipelines = v2m.augmentations(v2m.Config(), 224)
    assert len(pipelines) == 2
    steps = list(pipelines[0].transforms)
    crop, jitter, gray, blur = steps[1], steps[3], steps[4], steps[5]
    assert crop.scale == (0.08, 1.0) and crop.antialias
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    for got, want in zip((cj.brightness, cj.contrast, cj.saturation, cj.hue), ((0.2, 1.8),) * 3 + ((-0.2, 0.2),)):
        assert got == pytest.approx(want)  # strength 1: 0.8, 0.8, 0.8, 0.2 (SimCLR App. A)
    assert gray.p == 0.2 and isinstance(blur.transforms[0], v2.GaussianBlur) and blur.p == 0.5
    small = v2m.augmentations(v2m.Config(), 32)
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
                   for t in small[0].transforms)  # below 64 px: no blur
    for p in (pipelines, small):
        assert views.plan_views(p, in_memory=True).mode == "device"
    batch = fixed_batch(v2m, v2m.Config(), n=4)["views"]
    assert batch[0].shape == (4, 3, 32, 32) and not torch.allclose(batch[0], batch[1])
