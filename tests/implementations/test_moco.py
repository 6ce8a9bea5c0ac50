"""MoCo v2 / v1: Eq. 1 against a literal computation, its limits, the key encoder's EMA, the queue, shuffling
BN, the presets and a smoke fit."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

moco = load("moco-v2")


def infonce_literal(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    """Eq. 1 with explicit loops: -log exp(q.k+/t) / (exp(q.k+/t) + sum_i exp(q.k_i/t)), unit vectors."""
    unit = lambda v: v / v.norm()  # noqa: E731
    total = 0.0
    for qi, ki in zip(q.double(), k.double()):
        qi = unit(qi)
        pos = math.exp(float(qi @ unit(ki)) / t)
        neg = sum(math.exp(float(qi @ unit(kj)) / t) for kj in queue.double())
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("n,d,size,t", [(4, 8, 5, 0.07), (7, 3, 16, 0.2), (3, 32, 40, 1.0)])
def test_loss_matches_equation(n, d, size, t):
    g = torch.Generator().manual_seed(n * d + size)
    q, k, queue = (torch.randn(m, d, generator=g, dtype=torch.float64) for m in (n, n, size))
    assert moco.moco_loss(q, k, queue, t).item() == pytest.approx(infonce_literal(q, k, queue, t), rel=1e-10)


def test_limits():
    n, size, t = 4, 6, 0.2
    eye = torch.eye(n + size, dtype=torch.float64)
    q, queue = eye[:n], eye[n:]  # every queued key orthogonal to every query
    # q = k+ and orthogonal negatives: -log(e^(1/t) / (e^(1/t) + K))
    want = math.log(1 + size * math.exp(-1 / t))
    assert moco.moco_loss(q, q, queue, t).item() == pytest.approx(want, rel=1e-10)
    # negatives opposite to the query give less still: log(1 + K e^(-2/t))
    far = -q[:1].repeat(size, 1)
    assert moco.moco_loss(q[:1], q[:1], far, t).item() == pytest.approx(math.log(1 + size * math.exp(-2 / t)), rel=1e-10)
    # a collapsed embedding: every logit equal, the loss is log(K + 1)
    same = torch.ones(n, 5, dtype=torch.float64)
    assert moco.moco_loss(same, same, torch.ones(size, 5, dtype=torch.float64), t).item() == pytest.approx(
        math.log(size + 1), rel=1e-10
    )
    rand = torch.randn(n, n + size, dtype=torch.float64)
    assert moco.moco_loss(q, q, queue, t).item() < moco.moco_loss(rand, rand.roll(1, 0), queue, t).item()


def test_scale_invariance():
    q, k, queue = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64), torch.randn(9, 6)
    want = moco.moco_loss(q, k, queue.double(), 0.3).item()
    assert moco.moco_loss(3 * q, 0.5 * k, 2 * queue.double(), 0.3).item() == pytest.approx(want, rel=1e-12)


def test_loss_does_not_backpropagate_into_keys_or_queue():
    q, k, queue = (torch.randn(m, 8, requires_grad=True) for m in (4, 4, 10))
    moco.moco_loss(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def _small_cfg(**kw):
    return moco.Config(**{"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 64, **kw})


def test_gradients_reach_query_backbone_not_key_encoder_or_queue():
    cfg = _small_cfg()
    model = tiny_model(moco, cfg)
    out = model(fixed_batch(moco, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert not model.queue.requires_grad and model.queue.grad is None
    names = dict(model.named_buffers())
    assert "queue" in names and "queue_ptr" in names  # buffers: checkpoints carry them
    assert set(model.state_dict()) >= {"queue", "queue_ptr"}


def test_key_encoder_changes_only_through_ema():
    cfg = _small_cfg(key_momentum=0.9)
    model = tiny_model(moco, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder_k.parameters(), model.encoder_q.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = [p.clone() for p in model.encoder_k.parameters()]
    loss = model(fixed_batch(moco, cfg, n=8))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    # the optimizer step moved the query encoder but not the key encoder
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder_k.parameters()))
    query = [p.detach().clone() for p in model.encoder_q.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, query))
    model.on_step_end(1, 10)
    for old, new, o in zip(before, model.encoder_k.parameters(), query):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)  # Eq. 2
    for b_k, b_q in zip(model.encoder_k.buffers(), model.encoder_q.buffers()):
        assert torch.equal(b_k, b_q)  # BN statistics copied


def test_queue_takes_this_batchs_normalised_keys_at_the_pointer():
    cfg = _small_cfg(queue_size=20)
    model = tiny_model(moco, cfg)
    batch = fixed_batch(moco, cfg, n=8)
    reference = copy.deepcopy(model.encoder_k)  # the key encoder before the step (train mode, whole batch)
    with torch.no_grad():
        want = F.normalize(reference(batch["views"][1]), dim=1)  # (8, D)
    for step, start in enumerate([0, 8, 16]):
        before = model.queue.clone()
        assert int(model.queue_ptr) == start
        model(batch)
        assert torch.equal(model.queue, before)  # forward alone leaves the queue as it is
        if step == 0:
            model.on_step_end(1, 3)
            torch.testing.assert_close(model.queue[:8], want, rtol=1e-5, atol=1e-6)
        else:
            keys = model.pending_keys.clone()
            model.on_step_end(step + 1, 3)
            slots = [(start + i) % 20 for i in range(8)]  # the third batch wraps: 16..19, then 0..3
            assert torch.equal(model.queue[slots], keys)
            rest = [i for i in range(20) if i not in slots]
            assert torch.equal(model.queue[rest], before[rest])
        torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(20))
    assert int(model.queue_ptr) == 4


def test_enqueue_wraps_and_keeps_the_newest_when_the_batch_exceeds_the_queue():
    queue, ptr = torch.zeros(5, 2), torch.tensor(3)
    keys = torch.arange(8.0).view(4, 2)  # rows 0..3
    moco.enqueue(queue, ptr, keys)
    assert queue[:, 0].tolist() == [4.0, 6.0, 0.0, 0.0, 2.0] and int(ptr) == 2  # slots 3, 4, 0, 1
    big = torch.arange(14.0).view(7, 2)  # 7 keys into 5 slots: the newest 5, oldest first from ptr
    moco.enqueue(queue, ptr, big)
    assert queue[:, 0].tolist() == [10.0, 12.0, 4.0, 6.0, 8.0] and int(ptr) == 2


def test_shuffled_keys_are_unshuffled_and_use_their_own_bn_groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 6))
    x = torch.randn(8, 3, 6, 6)
    net.eval()  # BN with running statistics: per sample, so shuffling must give back the plain keys
    k, k_all = moco.shuffled_keys(net, x, groups=2)
    torch.testing.assert_close(k, F.normalize(net(x), dim=1))
    assert k_all is not None and torch.equal(k_all, k)  # one process: this rank's keys are all the keys
    net.train()  # batch statistics: each key is normalised within its shuffled sub-batch
    torch.manual_seed(1)
    k, _ = moco.shuffled_keys(net, x, groups=2)
    torch.manual_seed(1)
    perm = torch.randperm(8)
    with torch.no_grad():
        by_group = torch.cat([net(x[perm[:4]]), net(x[perm[4:]])])[torch.argsort(perm)]
        whole = net(x)
    torch.testing.assert_close(k, F.normalize(by_group, dim=1))
    assert not torch.allclose(k, F.normalize(whole, dim=1), atol=1e-3)


def test_queries_use_bn_groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(8, 5)
    torch.testing.assert_close(moco.encode_in_groups(net, x, 2), torch.cat([net(x[:4]), net(x[4:])]))
    torch.testing.assert_close(moco.encode_in_groups(net, x, 1), net(x))


def test_smoke_fit_lowers_the_loss():
    # One fixed batch of 32 and a queue of 32: from step 1 on the queue holds this batch's keys of the
    # step before (step 0 contrasts against the random initial queue, an easier task), so each query's
    # own older key is a negative too; the loss still falls as the images are told apart.
    cfg = _small_cfg(queue_size=32, key_momentum=0.99)
    losses, model = smoke_fit(moco, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[1:6]) / 5 - 0.3, losses
    assert int(model.queue_ptr) == 0 and model.pending_keys is None  # 30 batches of 32 fill it 30 times


def test_presets_and_paper_defaults():
    cfg = moco.Config()  # v2 (v2 "Settings", "MLP head", Table 1)
    assert (cfg.temperature, cfg.queue_size, cfg.key_momentum, cfg.proj_dim, cfg.proj_hidden_dim) == (0.2, 65536, 0.999, 128, 2048)
    assert cfg.mlp and cfg.aug_plus and cfg.min_scale == 0.2
    assert (cfg.optimizer, cfg.base_lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.warmup_epochs, cfg.sync_batchnorm) == (200, 256, 0, False)
    v1 = methods.make_config(moco, preset="v1")
    assert (v1.temperature, v1.mlp, v1.aug_plus, v1.queue_size, v1.key_momentum) == (0.07, False, False, 65536, 0.999)
    small = methods.make_config(moco, preset="small")
    assert small.queue_size % 64 == 0 and small.queue_size < 1437  # divides the digits batch, below the data set
    assert methods.make_config(moco, {"queue_size": "128"}).queue_size == 128
    assert isinstance(tiny_model(moco, v1).encoder_q[1], torch.nn.Linear)  # v1: a linear fc head
    head = tiny_model(moco, _small_cfg()).encoder_q[1]
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


def _steps(pipeline: v2.Compose) -> list:
    return list(pipeline.transforms)


def test_view_recipes_of_v1_and_v2():
    v2_views = moco.augmentations(moco.Config(), 224)
    v1_views = moco.augmentations(methods.make_config(moco, preset="v1"), 224)
    assert len(v2_views) == len(v1_views) == 2
    crop, jitter, gray, blur = (_steps(v2_views[0])[i] for i in (1, 3, 4, 5))
    assert crop.scale == (0.2, 1.0) and crop.antialias
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert gray.p == 0.2 and isinstance(blur.transforms[0], v2.GaussianBlur) and blur.p == 0.5
    assert blur.transforms[0].sigma == [0.1, 2.0]
    v1_steps = _steps(v1_views[0])
    assert isinstance(v1_steps[3], v2.ColorJitter) and v1_steps[3].hue == (-0.4, 0.4)  # always applied
    assert not any(isinstance(t, v2.RandomApply) for t in v1_steps)  # no blur in v1
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
                   for t in _steps(moco.augmentations(moco.Config(), 32)[0]))  # below 64 px: no blur
    for pipelines in (v2_views, v1_views):
        assert views.plan_views(pipelines, in_memory=True).mode == "device"  # batched on the device


def test_embed_is_query_backbone_features():
    cfg = _small_cfg()
    model = tiny_model(moco, cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.encoder_q[0](x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
