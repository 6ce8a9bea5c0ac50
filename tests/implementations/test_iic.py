"""IIC: the mutual information of paired assignments against a literal loop over Eq. 3, its limits and
symmetries, the official clamps, the pairing of x with its repeats, the Sobel input, the alternating heads,
the sub-head choice, gradients, the view recipe, smoke fit."""

import dataclasses
import math

import pytest
import torch

from selfsup import views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

iic = load("iic")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mi_literal(p, p_tf, lamb: float = 1.0) -> tuple[float, float]:
    """(loss, I) with plain loops: P = (1/n) sum_i p_i p'_i^T, (P + P^T) / 2, marginals, Eq. 3."""
    n, c = len(p), len(p[0])
    joint = [[sum(p[i][a] * p_tf[i][b] for i in range(n)) / n for b in range(c)] for a in range(c)]
    sym = [[(joint[a][b] + joint[b][a]) / 2 for b in range(c)] for a in range(c)]
    row = [sum(sym[a][b] for b in range(c)) for a in range(c)]
    col = [sum(sym[a][b] for a in range(c)) for b in range(c)]
    mi = sum(sym[a][b] * math.log(sym[a][b] / (row[a] * col[b])) for a in range(c) for b in range(c))
    loss = -sum(sym[a][b] * (math.log(sym[a][b]) - lamb * math.log(col[b]) - lamb * math.log(row[a]))
                for a in range(c) for b in range(c))
    return loss, mi


def _softmax(n, c, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("n,c,lamb", [(7, 3, 1.0), (12, 5, 1.0), (9, 4, 1.5)])
def test_loss_matches_equation_3(n, c, lamb):
    p, p_tf = _softmax(n, c, n), _softmax(n, c, n + 1)
    loss, mi = iic.iic_loss(p, p_tf, lamb)
    want_loss, want_mi = mi_literal(p.tolist(), p_tf.tolist(), lamb)
    assert mi.item() == pytest.approx(want_mi, rel=1e-10)
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)
    if lamb == 1.0:
        assert loss.item() == pytest.approx(-mi.item(), rel=1e-12)


def test_joint_is_symmetric_and_normalised():
    p, p_tf = _softmax(10, 4, 0), _softmax(10, 4, 1)
    joint = iic.joint_distribution(p, p_tf)
    torch.testing.assert_close(joint, joint.T)
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(joint, (p.T @ p_tf + p_tf.T @ p) / (2 * 10))


def test_limits():
    c = 6
    # a deterministic, one-to-one, uniform assignment (both views in the same cluster): I = ln C, the maximum
    perfect = torch.eye(c, dtype=torch.float64).repeat(4, 1)  # (24, C)
    loss, mi = iic.iic_loss(perfect, perfect)
    assert mi.item() == pytest.approx(math.log(c), rel=1e-12) and loss.item() == pytest.approx(-math.log(c), rel=1e-12)
    # random outputs stay within [0, ln C]
    for seed in range(5):
        mi = iic.iic_loss(_softmax(20, c, seed, 4.0), _softmax(20, c, seed + 10, 4.0))[1].item()
        assert -1e-12 <= mi <= math.log(c)
    # independent assignments: every image given the same distribution a, so P = a a^T; I = 0
    a = _softmax(1, c, 3)
    flat = a.expand(15, c)
    assert abs(iic.iic_loss(flat, flat)[1].item()) < 1e-12
    # collapse into one cluster: P has one non-zero entry, I = 0 (the clamps keep it finite)
    one = torch.zeros(15, c, dtype=torch.float64)
    one[:, 2] = 1
    loss, mi = iic.iic_loss(one, one)
    assert math.isfinite(loss.item()) and abs(mi.item()) < 1e-12
    # balanced clusters, but the copy's cluster unrelated to the image's: I = 0
    lab = torch.arange(c * c)
    first = torch.nn.functional.one_hot(lab % c, c).double()
    second = torch.nn.functional.one_hot(lab // c, c).double()
    assert abs(iic.iic_loss(first, second)[1].item()) < 1e-12
    # agreement beats disagreement at equal balance
    assert iic.iic_loss(first, first)[0] < iic.iic_loss(first, second)[0]


def test_symmetries():
    p, p_tf = _softmax(11, 5, 4), _softmax(11, 5, 5)
    loss = iic.iic_loss(p, p_tf)[0]
    torch.testing.assert_close(iic.iic_loss(p_tf, p)[0], loss)  # the two views swap
    perm = torch.randperm(11)
    torch.testing.assert_close(iic.iic_loss(p[perm], p_tf[perm])[0], loss)  # pairs are unordered
    relabel = torch.randperm(5)
    torch.testing.assert_close(iic.iic_loss(p[:, relabel], p_tf[:, relabel])[0], loss)  # cluster names


def test_clamp_is_the_official_one():
    """Entries of P below EPS become EPS and pass no gradient; the marginals come from the unclamped P."""
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    p_tf = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    loss, mi = iic.iic_loss(p, p_tf)
    eps = iic.EPS
    # P = diag(1/2, 1/2, 0): its seven zeros clamped to eps, marginals (1/2, 1/2, eps)
    want = (math.log(2) + 2 * eps * math.log(eps / 0.25) + 4 * eps * math.log(eps / (0.5 * eps))
            + eps * math.log(eps / (eps * eps)))
    assert mi.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert torch.isfinite(p.grad).all()
    assert iic.Config().eps == eps == 2.0 ** -52 and iic.Config().lamb == 1.0


def test_gradients_flow_through_both_views():
    p = _softmax(8, 4, 6).requires_grad_()
    p_tf = _softmax(8, 4, 7).requires_grad_()
    iic.iic_loss(p, p_tf)[0].backward()
    assert p.grad.abs().sum() > 0 and p_tf.grad.abs().sum() > 0


def _cfg(**kw):
    base = dict(num_sub_heads=3, num_repeats=2)
    return iic.Config(**{**base, **kw})


def _batch(cfg, n=8):
    return fixed_batch(iic, cfg, n=n)


def test_forward_pairs_x_with_each_repeat():
    cfg = _cfg(num_clusters=4, num_overclusters=6)
    model = tiny_model(iic, cfg)
    batch = _batch(cfg)
    assert len(batch["views"]) == 3
    shapes = []
    model.backbone.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    out = model(batch)
    assert shapes == [(8, 3, 32, 32), (16, 3, 32, 32)]  # x once, then both copies together
    torch.manual_seed(0)
    ref = tiny_model(iic, cfg)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # same BN batches as the forward: x, then the copies
        x, copies = batch["views"][0], batch["views"][1:]
        f = ref.backbone(iic.sobel(x, ref.mean, ref.std))
        f_tf = ref.backbone(iic.sobel(torch.cat(copies), ref.mean, ref.std))
        want = []
        for head in (ref.main_head, ref.over_head):
            p, p_tf = head(f).double(), head(f_tf).double()  # (8, H, K), (16, H, K)
            sub = []
            for j in range(cfg.num_sub_heads):  # literal pairs (x_i, x'_{d, i})
                rows = [p[i, j].tolist() for d in range(2) for i in range(8)]
                rows_tf = [p_tf[d * 8 + i, j].tolist() for d in range(2) for i in range(8)]
                sub.append(mi_literal(rows, rows_tf)[0])
            want.append(sum(sub) / len(sub))
    assert int(model.training_head) == iic.OVER  # the over-clustering head's epoch comes first
    assert out["loss"].item() == pytest.approx(want[1], rel=1e-4, abs=1e-7)
    assert out["mi_main"].item() == pytest.approx(-want[0], rel=1e-4, abs=1e-7)
    assert model.main_head.num_clusters == 4 and model.over_head.num_clusters == 6


def test_gradients_reach_backbone_and_only_the_active_head():
    cfg = _cfg()
    model = tiny_model(iic, cfg)
    model.setup(64, 10)
    batch = _batch(cfg)
    model.training_head.fill_(iic.MAIN)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.main_head.linear.weight.grad.abs().sum() > 0
    assert model.over_head.linear.weight.grad is not None  # weight 0: a zero gradient, not a missing one
    assert model.over_head.linear.weight.grad.abs().sum() == 0
    summed = tiny_model(iic, _cfg(alternate=False))
    summed.setup(64, 10)
    summed(batch)["loss"].backward()
    assert summed.over_head.linear.weight.grad.abs().sum() > 0 and summed.main_head.linear.weight.grad.abs().sum() > 0


def test_alternation_by_epoch():
    model = tiny_model(iic, _cfg())
    heads = []
    for epoch in range(6):
        model.on_epoch_start(epoch, 6, lambda: None)
        heads.append(int(model.training_head))
    o, m = iic.OVER, iic.MAIN
    assert heads == [o, m, m, o, m, m]  # --head_A_first --head_B_epochs 2
    model = tiny_model(iic, _cfg(overcluster_first=False, main_epochs=1))
    assert int(model.training_head) == m
    heads = []
    for epoch in range(4):
        model.on_epoch_start(epoch, 4, lambda: None)
        heads.append(int(model.training_head))
    assert heads == [m, o, m, o]


def test_setup_sizes_heads_from_the_data():
    model = tiny_model(iic, iic.Config())
    model.setup(100, 20)
    assert (model.main_head.num_clusters, model.over_head.num_clusters, model.main_head.num_heads) == (20, 140, 5)
    assert model.main_head.linear.weight.shape == (5 * 20, model.feature_dim)
    fixed = tiny_model(iic, iic.Config(num_clusters=8, num_overclusters=30))
    fixed.setup(100, 20)
    assert (fixed.main_head.num_clusters, fixed.over_head.num_clusters) == (8, 30)
    w = model.over_head.linear.weight
    assert model.over_head.linear.bias.abs().sum() == 0 and abs(w.std().item() - 0.01) < 1e-3  # official init


def test_sobel_input():
    mean, std = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.5, 0.25, 0.2])
    rgb = torch.rand(2, 3, 5, 6)
    x = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    out = iic.sobel(x, mean, std)
    assert out.shape == (2, 3, 5, 6) and out[:, 2].abs().max() == 0
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    kx, ky = [[1, 0, -1], [2, 0, -2], [1, 0, -1]], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]

    def at(img, i, j):
        return img[i, j].item() if 0 <= i < img.shape[0] and 0 <= j < img.shape[1] else 0.0

    for b in range(2):
        for i in range(5):
            for j in range(6):
                dx = sum(kx[u][v] * at(grey[b], i + u - 1, j + v - 1) for u in range(3) for v in range(3))
                dy = sum(ky[u][v] * at(grey[b], i + u - 1, j + v - 1) for u in range(3) for v in range(3))
                assert out[b, 0, i, j].item() == pytest.approx(dx, abs=1e-5)
                assert out[b, 1, i, j].item() == pytest.approx(dy, abs=1e-5)
    model = tiny_model(iic, _cfg())
    model.set_normalization(mean.tolist(), std.tolist())
    torch.testing.assert_close(model._input(x), out)
    assert torch.equal(tiny_model(iic, _cfg(sobel=False))._input(x), x)


def test_view_recipe():
    cfg = iic.Config()
    pipes = iic.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(pipes) == 1 + cfg.num_repeats == 4
    names = [[type(t).__name__ for t in p.transforms] for p in pipes]
    assert "RandomHorizontalFlip" not in names[0] and "ColorJitter" not in names[0]  # x: the crop only
    assert all("RandomHorizontalFlip" in n and "ColorJitter" in n for n in names[1:])
    crop = pipes[1].transforms[1]
    assert tuple(crop.size) == (32, 32) and crop.scale == pytest.approx(((20 / 32) ** 2,) * 2) and crop.ratio == (1.0, 1.0)
    jitter = next(t for t in pipes[1].transforms if type(t).__name__ == "ColorJitter")
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.125, 0.125))
    assert views.plan_views(pipes, in_memory=True).mode == "device"
    assert iic.crop_size(cfg, 32) == 20 and iic.crop_size(cfg, 96) == 60
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(p(x).shape) for p in pipes[:2]] == [(3, 32, 32)] * 2


def test_config_and_preset():
    fields = {f.name for f in dataclasses.fields(iic.Config)}
    assert set(iic.PRESETS["small"]) <= fields
    cfg = iic.Config()
    assert (cfg.num_sub_heads, cfg.num_repeats, cfg.overcluster_factor, cfg.main_epochs) == (5, 3, 7, 2)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="num_repeats"):
        tiny_model(iic, _cfg(num_repeats=0))


def test_assign_uses_the_lowest_loss_sub_head_and_embed():
    cfg = _cfg()
    model = tiny_model(iic, cfg)
    model.setup(64, 10)
    batch = _batch(cfg)
    model(batch)
    first = model.sub_head_loss.clone()
    assert bool(model.sub_head_seen) and first.abs().sum() > 0  # the first step: the losses themselves
    shifted = first + 1.0  # a known running value: the same batch gives the same losses again
    model.sub_head_loss.copy_(shifted)
    model(batch)
    m = cfg.subhead_loss_momentum  # then a running mean
    torch.testing.assert_close(model.sub_head_loss, m * shifted + (1 - m) * first)
    model.eval()
    x = batch["views"][0][:6]
    assert model.embed(x).shape == (6, model.backbone.feature_dim)
    model.sub_head_loss.copy_(torch.tensor([0.0, -1.0, 0.5]))
    assert model.best_sub_head() == 1
    a = model.assign(x)
    want = model.main_head(model.embed(x))[:, 1].argmax(1)
    assert a.dtype == torch.long and torch.equal(a, want) and bool(((0 <= a) & (a < 10)).all())


def test_test_transform_is_the_centre_crop():
    x = torch.randn(2, 3, 32, 32)
    out = iic.center_crop_resized(x, 20)
    want = torch.nn.functional.interpolate(x[..., 6:26, 6:26], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want)
    assert iic.center_crop_resized(x, 32) is x


def test_smoke_fit_raises_the_mutual_information():
    cfg = _cfg(num_repeats=1, overcluster_factor=2, alternate=False)
    losses, model = smoke_fit(iic, cfg, steps=12, lr=3e-2)  # near-uniform outputs at init: I starts at ~0
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
