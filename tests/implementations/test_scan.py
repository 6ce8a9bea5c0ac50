"""SCAN: NT-Xent, the SCAN loss (Eq. 2) and the self-labelling loss against direct loops in float64, the
loss's limits, neighbour mining against brute force, head selection, the stage switches of the epoch hook,
the prediction bank (updated, no gradient), gradients per stage, the views, smoke fits."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

scan = load("scan")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    base = dict(num_clusters=4, num_heads=2, num_neighbors=3, proj_hidden_dim=16, proj_dim=8,
                pretext_epochs=2, scan_epochs=2, selflabel_epochs=1, epochs=5)
    return scan.Config(**{**base, **kw})


# --- losses against direct computations -------------------------------------------------------------


def nt_xent_literal(z1, z2, t):
    z = [F.normalize(v, dim=0) for v in list(z1) + list(z2)]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -(float(z[i] @ z[j]) / t - math.log(den))
    return total / (2 * n)


def test_nt_xent_matches_the_literal_formula():
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert scan.nt_xent(z1, z2, 0.1).item() == pytest.approx(nt_xent_literal(z1, z2, 0.1), rel=1e-9)


def scan_literal(logits, nbr, lambd):
    """Eq. 2 with loops: the mean over anchors and neighbours of -log <p_X, p_k>, plus lambda sum p' log p'."""
    n, k, c = nbr.shape
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    cons = 0.0
    for i in range(n):
        for j in range(k):
            cons += -math.log(sum(p[i][a] * float(nbr[i, j, a]) for a in range(c))) / (n * k)
    mean = [sum(p[i][a] for i in range(n)) / n for a in range(c)]
    neg_entropy = sum(m * math.log(m) for m in mean)
    return cons + lambd * neg_entropy, cons, -neg_entropy


def test_scan_loss_matches_the_literal_equation():
    logits = torch.randn(6, 3, dtype=torch.float64) * 2
    nbr = F.softmax(torch.randn(6, 4, 3, dtype=torch.float64), dim=2)
    total, cons, ent = scan.scan_loss(logits, nbr, 5.0)
    want = scan_literal(logits, nbr, 5.0)
    for got, w in zip((total, cons, ent), want):
        assert got.item() == pytest.approx(w, rel=1e-6)


def test_consistent_confident_neighbours_give_the_minimum():
    """Confident predictions shared with every neighbour: consistency 0 (its infimum); balanced over the C
    clusters: the total is -lambda log C, the minimum of Eq. 2."""
    onehot = torch.eye(4, dtype=torch.float64).repeat(3, 1)  # (12, 4), 3 images per cluster
    total, cons, ent = scan.scan_loss(onehot * 50, onehot[:, None].expand(12, 5, 4), 5.0)
    assert cons.item() == pytest.approx(0.0, abs=1e-12)
    assert total.item() == pytest.approx(-5.0 * math.log(4), rel=1e-9)
    for _ in range(20):  # random predictions and neighbours are all above it
        t, _, _ = scan.scan_loss(torch.randn(12, 4, dtype=torch.float64) * 3,
                                 F.softmax(torch.randn(12, 5, 4, dtype=torch.float64) * 3, dim=2), 5.0)
        assert t.item() > total.item()
    # disagreeing neighbours cost: the same anchors with neighbours from another cluster
    _, wrong, _ = scan.scan_loss(onehot * 50, onehot.roll(1, dims=0)[:, None].expand(12, 5, 4).clamp_min(1e-3), 5.0)
    assert wrong.item() > 5


def test_a_collapsed_prediction_is_penalised_by_the_entropy_term():
    """Every image confidently in cluster 0 with its neighbours: consistency 0 too, but entropy 0, so the
    total is lambda log C above the balanced solution."""
    collapsed = torch.zeros(12, 4, dtype=torch.float64)
    collapsed[:, 0] = 1
    total, cons, ent = scan.scan_loss(collapsed * 50, collapsed[:, None].expand(12, 5, 4), 5.0)
    assert cons.item() == pytest.approx(0.0, abs=1e-12) and ent.item() == pytest.approx(0.0, abs=1e-6)  # p clamped at 1e-8
    balanced = torch.eye(4, dtype=torch.float64).repeat(3, 1)
    best, _, _ = scan.scan_loss(balanced * 50, balanced[:, None].expand(12, 5, 4), 5.0)
    assert total.item() - best.item() == pytest.approx(5.0 * math.log(4), rel=1e-6)


def selflabel_literal(weak, strong, threshold, balancing):
    n, c = weak.shape
    pw = F.softmax(weak, dim=1).tolist()
    picked = [(i, max(range(c), key=lambda a: pw[i][a])) for i in range(n) if max(pw[i]) > threshold]
    counts = {y: sum(1 for _, t in picked if t == y) for _, y in picked}
    num = den = 0.0
    for i, y in picked:
        w = len(picked) / counts[y] if balancing else 1.0
        row = strong[i].tolist()
        ce = math.log(sum(math.exp(v) for v in row)) - row[y]
        num, den = num + w * ce, den + w
    return num / den, len(picked)


@pytest.mark.parametrize("balancing", [True, False])
def test_selflabel_loss_matches_the_literal_weighted_cross_entropy(balancing):
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(16, 3, generator=g, dtype=torch.float64) * 6
    strong = torch.randn(16, 3, generator=g, dtype=torch.float64)
    want, n = selflabel_literal(weak, strong, 0.9, balancing)
    assert 3 <= n <= 13  # some confident, some not, more than one class
    loss, confident = scan.selflabel_loss(weak, strong, 0.9, balancing)
    assert loss.item() == pytest.approx(want, rel=1e-6) and confident.item() == n


def test_selflabel_loss_without_a_confident_image_is_zero_and_targets_take_no_gradient():
    weak = torch.zeros(4, 3, requires_grad=True)  # uniform: nothing above 0.99
    strong = torch.randn(4, 3, requires_grad=True)
    loss, n = scan.selflabel_loss(weak, strong, 0.99, True)
    assert loss.item() == 0.0 and n.item() == 0
    weak2 = (torch.eye(3)[[0, 1, 1, 2]] * 20).requires_grad_(True)
    loss, _ = scan.selflabel_loss(weak2, strong, 0.99, True)
    loss.backward()
    assert weak2.grad is None and strong.grad.abs().sum() > 0


# --- mining, head selection, stages -------------------------------------------------------------------


def test_mining_equals_brute_force_top_k():
    z = torch.randn(50, 6, dtype=torch.float64)
    got = scan.mine_neighbors(z, 5, chunk=7)  # chunks that do not divide N
    zn = F.normalize(z, dim=1)
    for i in range(50):
        sims = sorted(((float(zn[i] @ zn[j]), j) for j in range(50) if j != i), reverse=True)
        assert got[i].tolist() == [j for _, j in sims[:5]]
    assert torch.equal(got, scan.mine_neighbors(z, 5))
    with pytest.raises(ValueError, match="between 1 and 49"):
        scan.mine_neighbors(z, 50)


def test_head_losses_match_a_loop_and_pick_the_consistent_head():
    probs = F.softmax(torch.randn(10, 2, 3, dtype=torch.float64) * 2, dim=2)
    nbrs = torch.randint(0, 10, (10, 4))
    got = scan.head_losses(probs, nbrs, chunk=3)
    for h in range(2):
        cons = sum(-math.log(float(probs[i, h] @ probs[nbrs[i, j], h])) for i in range(10) for j in range(4)) / 40
        mean = probs[:, h].mean(0)
        assert got[h].item() == pytest.approx(cons + float((mean * mean.log()).sum()), rel=1e-9)
    good = torch.eye(3, dtype=torch.float64)[torch.arange(9) % 3]  # head 1 consistent with the neighbours
    probs = torch.stack([F.softmax(torch.randn(9, 3, dtype=torch.float64), 1), good * 0.97 + 0.01], dim=1)
    nbrs = (torch.arange(9)[:, None] + 3 * torch.arange(1, 3)) % 9  # the same cluster
    assert scan.head_losses(probs, nbrs).argmin().item() == 1


def test_stage_bounds():
    assert scan.stage_bounds(scan.Config(), 750) == (500, 550)
    assert scan.stage_bounds(scan.Config(), 75) == (50, 55)  # scaled to another run length
    small = dataclasses.replace(scan.Config(), **scan.PRESETS["small"])
    assert scan.stage_bounds(small, 15) == (9, 13)


def _features(model, x):
    def features(encode=None):
        was = model.training
        model.eval()
        with torch.no_grad():
            out = (encode or model.embed)(x)
        model.train(was)
        return out
    return features


def test_epoch_hook_switches_stages_mines_once_and_fills_the_bank():
    cfg = _cfg()
    model = tiny_model(scan, cfg)
    model.setup(32, 10)
    x = fixed_batch(scan, cfg, n=32)["views"][2]  # the weak view: the images as they are
    calls = []

    def features(encode=None):
        calls.append(encode.__name__ if encode is not None else "embed")
        return _features(model, x)(encode)

    model.on_epoch_start(0, 5, features)
    model.on_epoch_start(1, 5, features)
    assert int(model.stage) == scan.PRETEXT and calls == [] and not bool(model.mined)
    heads_before = [h.weight.clone() for h in model.heads]
    model.on_epoch_start(2, 5, features)  # the clustering stage: mining, fresh heads, bank
    assert int(model.stage) == scan.CLUSTER and calls == ["project", "head_probs"]
    assert torch.equal(model.neighbors, scan.mine_neighbors(_features(model, x)(model.project), cfg.num_neighbors))
    assert not torch.equal(model.heads[0].weight, heads_before[0])
    again = tiny_model(scan, cfg)
    again.setup(32, 10)
    again.on_epoch_start(2, 5, _features(again, x))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(again.heads, model.heads))  # alike on every rank
    want = _features(model, x)(model.head_probs).view(32, 2, 4)
    torch.testing.assert_close(model.bank, want)
    assert int(model.best_head) == int(scan.head_losses(want, model.neighbors).argmin())
    nbrs = model.neighbors.clone()
    model.on_epoch_start(3, 5, features)  # next clustering epoch: bank and head refreshed, no new mining
    assert calls[2:] == ["head_probs"] and torch.equal(model.neighbors, nbrs)
    model.on_epoch_start(4, 5, features)  # self-labelling: the head after the last clustering epoch
    assert int(model.stage) == scan.SELFLABEL and calls[3:] == ["head_probs"]
    model.on_epoch_start(5, 6, features)  # a later self-labelling epoch: nothing to compute
    assert calls[4:] == []


def _cluster_model(cfg, n=32):
    model = tiny_model(scan, cfg)
    model.setup(n, 10)
    batch = train.prepare_batch(fixed_batch(scan, cfg, n=n), torch.device("cpu"), False, False)
    model.on_epoch_start(cfg.pretext_epochs, cfg.epochs, _features(model, batch["views"][2]))
    return model, batch


def test_bank_takes_the_anchors_predictions_and_no_gradient():
    cfg = _cfg(cutout_fraction=0.0)
    model, batch = _cluster_model(cfg)
    sub = {"views": [v[:8] for v in batch["views"]], "index": batch["index"][:8] + 4, "label": batch["label"][:8]}
    before = model.bank.clone()
    nbr = before[model.neighbors[sub["index"]]]
    out = model(sub)
    h = model.backbone(sub["views"][3])
    logits = [head(h) for head in model.heads]
    want = torch.stack([F.softmax(s, 1) for s in logits], dim=1)  # (8, H, C)
    torch.testing.assert_close(model.bank[sub["index"]], want.detach())
    rest = torch.ones(32, dtype=torch.bool)
    rest[sub["index"]] = False
    assert torch.equal(model.bank[rest], before[rest])
    total = sum(scan.scan_loss(s, nbr[:, :, j], cfg.entropy_weight)[0] for j, s in enumerate(logits))
    torch.testing.assert_close(out["loss"], total)  # computed with the stored neighbours
    out["loss"].backward()
    assert not model.bank.requires_grad and model.bank.grad is None
    assert "bank" in dict(model.named_buffers()) and "bank" not in dict(model.named_parameters())


def test_gradients_per_stage():
    cfg = _cfg()
    model = tiny_model(scan, cfg)
    model.setup(32, 10)
    batch = fixed_batch(scan, cfg, n=8)
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        model.stage.fill_(scan.CLUSTER)
        model(batch)
    model.stage.fill_(scan.PRETEXT)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert all(float(h.weight.grad.abs().sum()) == 0 for h in model.heads)  # present, zero
    model, batch = _cluster_model(cfg)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert all(h.weight.grad.abs().sum() > 0 for h in model.heads)
    assert float(model.projector[0].weight.grad.abs().sum()) == 0
    model.on_epoch_start(4, 5, _features(model, batch["views"][2]))  # self-labelling
    with torch.no_grad():  # make the kept head confident so that some images pass 0.99
        model.heads[int(model.best_head)].weight.mul_(200)
    out = model(batch)
    assert out["confident"].item() > 0
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0
    b = int(model.best_head)
    assert model.heads[b].weight.grad.abs().sum() > 0
    assert all(float(h.weight.grad.abs().sum()) == 0 for j, h in enumerate(model.heads) if j != b)


def test_cutout_zeroes_one_bounded_square():
    x = torch.ones(64, 3, 32, 32)
    out = scan.cutout(x, 0.5)
    holes = out[:, 0] == 0  # (N, H, W)
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert bool((rows <= 16).all() and (cols <= 16).all())
    assert torch.equal(holes.sum((1, 2)), rows * cols)  # one rectangle each
    assert bool((out[:, 1:] == out[:, :1]).all())  # all channels
    assert int((holes.sum((1, 2)) > 0).sum()) > 40
    assert torch.equal(scan.cutout(x, 0.0), x)


def test_view_recipe_and_preset():
    cfg = scan.Config()
    pipes = scan.augmentations(cfg, 32)
    assert len(pipes) == 4
    names = [[type(t).__name__ for t in p.transforms] for p in pipes]
    assert names[0] == names[1] and "RandomResizedCrop" in names[0]
    assert names[2] == ["ToImage", "ToDtype", "Normalize"]
    assert "RandomSolarize" in names[3] and names[3][:5] == names[0][:5]
    assert views.plan_views(scan.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(scan.PRESETS["small"]) <= {f.name for f in dataclasses.fields(scan.Config)}
    small = dataclasses.replace(cfg, **scan.PRESETS["small"])
    assert small.pretext_epochs + small.scan_epochs + small.selflabel_epochs == small.epochs == 15
    assert cfg.pretext_epochs + cfg.scan_epochs + cfg.selflabel_epochs == cfg.epochs


def test_assign_uses_the_kept_head_and_embed():
    cfg = _cfg()
    model = tiny_model(scan, cfg)
    x = fixed_batch(scan, cfg, n=6)["views"][2]
    model.eval()
    assert model.embed(x).shape == (6, model.backbone.feature_dim)
    model.best_head.fill_(1)
    assert torch.equal(model.assign(x), model.heads[1](model.backbone(x)).argmax(1))
    with pytest.raises(ValueError, match="more than the 3"):
        model.setup(3, 10)


def _fit(model, batch, steps=25, lr=0.05):
    opt = train.build_optimizer(model, model.cfg, lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_smoke_fit_pretext_and_clustering_lower_the_loss():
    cfg = _cfg()
    model = tiny_model(scan, cfg)
    model.setup(32, 10)
    batch = train.prepare_batch(fixed_batch(scan, cfg, n=32), torch.device("cpu"), False, False)
    model.on_epoch_start(0, 5, _features(model, batch["views"][2]))
    losses = _fit(model, batch, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    model.on_epoch_start(2, 5, _features(model, batch["views"][2]))
    with torch.no_grad():  # confident, inconsistent heads: fresh heads on an untrained backbone start near
        for head in model.heads:  # the uniform prediction, a saddle that a few dozen steps do not leave
            head.weight.mul_(10)
    model.on_epoch_start(3, 5, _features(model, batch["views"][2]))  # the bank from the scaled heads
    losses = _fit(model, batch, lr=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2, losses
