"""MSF: the loss against a brute-force literal computation, its limits, the bank (written from the batch
before the search, FIFO), the EMA target, the view recipe, the presets and a smoke fit."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup import methods, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

msf = load("mean-shift")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor of every test is the same on every run


def unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in row))
    return [a / norm for a in row]


def sq_dist(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def msf_literal(q: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int) -> float:
    """The loss with loops: for each target, the k bank rows at the smallest Euclidean distance (all
    vectors normalised, brute force over the whole bank), then the mean of || u/||u|| - z ||^2 over them."""
    rows = [unit(r) for r in bank.tolist()]
    total = 0.0
    for qi, ti in zip(q.tolist(), t.tolist()):
        qi, ti = unit(qi), unit(ti)
        by_distance = sorted(range(len(rows)), key=lambda j: sq_dist(ti, rows[j]))
        total += sum(sq_dist(qi, rows[j]) for j in by_distance[:k]) / k
    return total / len(q)


def _bank_with(t: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """m random unit rows with the normalised targets t written into some of them, as the model does."""
    bank = F.normalize(torch.randn(m, t.shape[1], generator=g, dtype=torch.float64), dim=1)
    slots = torch.randperm(m, generator=g)[: len(t)]
    bank[slots] = F.normalize(t, dim=1)
    return bank


@pytest.mark.parametrize("n,d,m,k", [(4, 8, 12, 1), (5, 3, 20, 5), (3, 16, 40, 7), (6, 4, 6, 6)])
def test_loss_matches_equation(n, d, m, k):
    g = torch.Generator().manual_seed(n * d + m + k)
    q, t = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    bank = _bank_with(t, m, g)
    assert msf.msf_loss(q, t, bank, k).item() == pytest.approx(msf_literal(q, t, bank, k), rel=1e-10)
    # a bank that does not hold the targets: the neighbours are picked the same way
    other = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    assert msf.msf_loss(q, t, other, k).item() == pytest.approx(msf_literal(q, t, other, k), rel=1e-10)


def test_neighbours_are_nearest_first_and_the_target_is_its_own_first():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    bank = _bank_with(t, 30, g)
    index = msf.nearest_neighbours(t, bank, 4)  # (5, 4)
    for i, ti in enumerate(F.normalize(t, dim=1)):
        dists = ((bank - ti) ** 2).sum(dim=1)
        assert index[i].tolist() == dists.argsort()[:4].tolist()
        assert torch.allclose(bank[index[i, 0]], ti)  # itself, at distance 0


def test_k1_is_byol_and_the_loss_is_the_distance_to_the_neighbours_mean():
    g = torch.Generator().manual_seed(4)
    q, t = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    bank = _bank_with(t, 25, g)
    byol = (2 - 2 * F.cosine_similarity(q, t)).mean().item()  # BYOL's Eq. 2
    assert msf.msf_loss(q, t, bank, 1).item() == pytest.approx(byol, rel=1e-12)
    # mean shift: 1/k sum_z ||u - z||^2 = 2 - 2 u . z_mean, lowest at u = z_mean / ||z_mean||
    k = 5
    z_mean = bank[msf.nearest_neighbours(t, bank, k)].mean(dim=1)  # (6, 8)
    want = (2 - 2 * (F.normalize(q, dim=1) * z_mean).sum(dim=1)).mean().item()
    assert msf.msf_loss(q, t, bank, k).item() == pytest.approx(want, rel=1e-12)
    best = msf.msf_loss(z_mean, t, bank, k).item()
    assert best == pytest.approx((2 - 2 * z_mean.norm(dim=1)).mean().item(), rel=1e-12)
    for _ in range(5):
        assert best < msf.msf_loss(z_mean + 0.3 * torch.randn(6, 8, generator=g, dtype=torch.float64), t, bank, k).item()


def test_limits():
    t = torch.randn(4, 6, dtype=torch.float64)
    collapsed = F.normalize(torch.ones(10, 6, dtype=torch.float64), dim=1)
    same = torch.ones(4, 6, dtype=torch.float64)
    assert msf.msf_loss(same, same, collapsed, 5).item() == pytest.approx(0.0, abs=1e-12)  # collapse: loss 0
    assert msf.msf_loss(-same, same, collapsed, 5).item() == pytest.approx(4.0, rel=1e-12)  # opposite: 4
    eye = torch.eye(6, dtype=torch.float64)
    assert msf.msf_loss(eye[:1], eye[1:2], eye[1:], 3).item() == pytest.approx(2.0, rel=1e-12)  # orthogonal: 2
    bank = F.normalize(t, dim=1)
    assert msf.msf_loss(3 * t, 0.5 * t, bank, 1).item() == pytest.approx(0.0, abs=1e-12)  # scale-free, aligned


def test_loss_does_not_backpropagate_into_target_or_bank():
    q, t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    bank = F.normalize(torch.randn(10, 8), dim=1).requires_grad_()
    msf.msf_loss(q, t, bank, 3).backward()
    assert q.grad is not None and t.grad is None and bank.grad is None


def test_search_keeps_float32_under_autocast():
    # near-duplicates at cos ~0.999: bfloat16 rounds both scores to 1 and cannot tell the target from them
    t = F.normalize(torch.randn(64, 16), dim=1)
    near = F.normalize(t + 0.012 * torch.randn(64, 16), dim=1)
    bank = torch.cat([near, t])  # the target's own entry is row 64 + i
    assert (F.cosine_similarity(near, t) > 0.996).all()
    own = list(range(64, 128))
    assert (t.bfloat16() @ bank.bfloat16().T).argmax(dim=1).tolist() != own  # bfloat16 scores pick wrongly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        index = msf.nearest_neighbours(t, bank, 1)
    assert index[:, 0].tolist() == own


def test_enqueue_wraps_and_keeps_the_newest_when_the_batch_exceeds_the_bank():
    bank, ptr = torch.zeros(5, 2), torch.tensor(3)
    msf.enqueue(bank, ptr, torch.arange(8.0).view(4, 2))  # rows 0..3 into slots 3, 4, 0, 1
    assert bank[:, 0].tolist() == [4.0, 6.0, 0.0, 0.0, 2.0] and int(ptr) == 2
    msf.enqueue(bank, ptr, torch.arange(14.0).view(7, 2))  # 7 rows into 5 slots: the newest 5
    assert bank[:, 0].tolist() == [10.0, 12.0, 4.0, 6.0, 8.0] and int(ptr) == 2


def _small_cfg(**kw):
    return msf.Config(**{"proj_hidden_dim": 32, "proj_dim": 16, "bank_size": 64, **kw})


def test_gradients_reach_online_backbone_and_predictor_not_target_or_bank():
    cfg = _small_cfg()
    model = tiny_model(msf, cfg)
    out = model(fixed_batch(msf, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    assert all(p.grad is not None for p in model.online.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert not model.bank.requires_grad and model.bank.grad is None
    assert set(dict(model.named_buffers())) >= {"bank", "bank_ptr"}  # buffers: checkpoints carry them
    assert set(model.state_dict()) >= {"bank", "bank_ptr"}


def test_model_with_k1_is_byol_and_logs_the_byol_term():
    cfg = _small_cfg(topk=1)
    out = tiny_model(msf, cfg)(fixed_batch(msf, cfg, n=8))
    assert out["loss"].item() == pytest.approx(2 - 2 * out["pos_sim"].item(), abs=1e-5)


def test_forward_writes_the_batch_to_the_bank_before_the_search():
    cfg = _small_cfg(bank_size=20)
    model = tiny_model(msf, cfg)
    batch = fixed_batch(msf, cfg, n=8)
    reference = copy.deepcopy(model.target)  # the target before the step (train mode, whole batch)
    with torch.no_grad():
        want = F.normalize(reference(batch["views"][1]), dim=1)  # (8, D): the target (weak) view
    for step, start in enumerate([0, 8, 16]):
        assert int(model.bank_ptr) == start
        before = model.bank.clone()
        model(batch)
        slots = [(start + i) % 20 for i in range(8)]  # the third batch wraps: 16..19, then 0..3
        if step == 0:
            torch.testing.assert_close(model.bank[slots], want, rtol=1e-5, atol=1e-6)
            # written before the loss was taken: each target is its own first neighbour
            assert msf.nearest_neighbours(want, model.bank, 1)[:, 0].tolist() == slots
        rest = [i for i in range(20) if i not in slots]
        assert torch.equal(model.bank[rest], before[rest])
        torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(20))
        model.on_step_end(step + 1, 3)  # the EMA alone: the bank is not written twice
        assert int(model.bank_ptr) == (start + 8) % 20
    assert int(model.bank_ptr) == 4


def test_target_changes_only_through_the_constant_momentum_ema():
    cfg = _small_cfg(target_momentum=0.9)
    model = tiny_model(msf, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.target.parameters(), model.online.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fixed_batch(msf, cfg, n=8)
    for step in (1, 9):  # the same rate early and late: no schedule
        before = [p.clone() for p in model.target.parameters()]
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters()))  # not by the optimizer
        online = [p.detach().clone() for p in model.online.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, online))
        model.on_step_end(step, 10)
        for old, new, o in zip(before, model.target.parameters(), online):
            torch.testing.assert_close(new, 0.9 * old + 0.1 * o)
        for b_t, b_o in zip(model.target.buffers(), model.online.buffers()):
            assert torch.equal(b_t, b_o)  # BN statistics copied


def test_bank_and_topk_are_checked():
    with pytest.raises(ValueError, match="topk"):
        tiny_model(msf, _small_cfg(topk=65))
    with pytest.raises(ValueError, match="augmentation"):
        tiny_model(msf, _small_cfg(augmentation="weak"))
    cfg = _small_cfg(bank_size=4, topk=2)
    with pytest.raises(ValueError, match="global batch"):
        tiny_model(msf, cfg)(fixed_batch(msf, cfg, n=8))


def test_smoke_fit_lowers_the_loss():
    # one fixed batch of 32, a bank of 64: from step 1 on the bank holds only this batch's targets (of this
    # step and the one before; step 0 also has random entries, far from everything), so the fall after
    # step 2 is the online network learning to predict them and their neighbours
    cfg = _small_cfg()
    losses, model = smoke_fit(msf, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[2:7]) / 5 - 0.2, losses
    assert int(model.bank_ptr) == 30 * 32 % 64


def test_presets_and_paper_defaults():
    cfg = msf.Config()
    assert (cfg.topk, cfg.bank_size, cfg.target_momentum, cfg.proj_hidden_dim, cfg.proj_dim) == (5, 1_024_000, 0.99, 4096, 512)
    assert (cfg.augmentation, cfg.min_scale) == ("weak/strong", 0.2)
    assert (cfg.optimizer, cfg.base_lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.05, 0.9, 1e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.warmup_epochs, cfg.sync_batchnorm) == (200, 256, 0, False)
    fields = {f.name for f in dataclasses.fields(msf.Config)}
    assert set(msf.PRESETS["small"]) <= fields
    small = methods.make_config(msf, preset="small")
    assert small.bank_size % 64 == 0 and small.bank_size < 1437  # divides the digits batch, below the data set
    assert methods.make_config(msf, {"augmentation": "weak/weak"}).augmentation == "weak/weak"
    head = tiny_model(msf, _small_cfg()).predictor
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]


def _kinds(pipeline: v2.Compose) -> list[type]:
    return [type(t) for t in pipeline.transforms]


WEAK = [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]


def test_view_recipe_weak_target_strong_online():
    online, target = msf.augmentations(msf.Config(), 224)
    assert _kinds(target) == WEAK
    crop, jitter, gray, blur = (online.transforms[i] for i in (1, 3, 4, 5))
    assert crop.scale == (0.2, 1.0) and crop.antialias and target.transforms[1].scale == (0.2, 1.0)
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur.transforms[0], v2.GaussianBlur) and blur.p == 0.5
    assert blur.transforms[0].sigma == [0.1, 2.0] and blur.transforms[0].kernel_size == (23, 23)
    online32, _ = msf.augmentations(msf.Config(), 32)
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
                   for t in online32.transforms)  # below 64 px: no blur
    for setting in msf.AUGMENTATIONS:
        pipelines = msf.augmentations(msf.Config(augmentation=setting), 32)
        t_kind, o_kind = setting.split("/")
        assert (_kinds(pipelines[1]) == WEAK) == (t_kind == "weak") and (_kinds(pipelines[0]) == WEAK) == (o_kind == "weak")
        assert views.plan_views(pipelines, in_memory=True).mode == "device"  # batched on the device
    with pytest.raises(ValueError, match="augmentation"):
        msf.augmentations(msf.Config(augmentation="strong"), 32)


def test_embed_is_online_backbone_features():
    model = tiny_model(msf, _small_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.online[0](x))
    assert model.embed(x).shape == (3, model.backbone.feature_dim)
