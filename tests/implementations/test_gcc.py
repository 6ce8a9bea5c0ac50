"""GCC: the k-NN graph and its degree weights against brute force, L_RGC (with and without the graph) and
L_AGC / L_CR against literal loops in float64, their limits, the bank, the epoch hook, gradients, smoke fit."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

gcc = load("gcc")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**kw):
    return gcc.Config(**{**dict(proj_dim=16, proj_hidden_dim=16, num_clusters=4, pretext_epochs=2, graph_interval=3), **kw})


# --- the graph ---------------------------------------------------------------------------------------


def test_knn_graph_is_the_brute_force_nearest_neighbours():
    z = F.normalize(torch.randn(37, 6), dim=1)
    got = gcc.knn_graph(z, 5, chunk=8)  # several chunks, the last one short
    for i in range(37):
        scores = [sum(a * b for a, b in zip(z[i].tolist(), z[j].tolist())) for j in range(37)]
        want = sorted(range(37), key=lambda j: -scores[j])[:6]
        assert got[i].tolist() == want
        assert want[0] == i  # the image itself first


def test_degree_weights_are_the_symmetrised_neighbourhood_sizes():
    z = F.normalize(torch.randn(30, 4), dim=1)
    lists = gcc.knn_graph(z, 5).tolist()
    sets = {i: set() for i in range(30)}  # official laplace_transform
    for i, row in enumerate(lists):
        for j in row:
            sets[i].add(j)
            sets[j].add(i)
    want = [math.sqrt(3.0 / len(sets[i])) for i in range(30)]
    got = gcc.degree_weights(torch.tensor(lists), 3.0)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert len(set(round(w, 6) for w in want)) > 1  # hubs and loners: the weights differ


# --- the losses, literally -----------------------------------------------------------------------------


def rgc_literal(z1, z2, nb, w, tau):
    """The official RGCLoss with loops: positives z'_i and w_{n_r(i)} exp(w_{n_r(i)} z_i.b / tau), negatives the
    rest of [z, z', w b_1 .. w b_R]; without neighbours, -log softmax of z'_i over [z, z']."""
    n = len(z1)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for i in range(n):
        pos = math.exp(dot(z1[i], z2[i]) / tau)
        neg = sum(math.exp(dot(z1[i], z1[j]) / tau) for j in range(n))
        neg += sum(math.exp(dot(z1[i], z2[j]) / tau) for j in range(n) if j != i)
        if nb is None:
            total += -math.log(pos / (neg + pos))
            continue
        for r in range(len(nb)):
            pos += w[r][i] * math.exp(w[r][i] * dot(z1[i], nb[r][i]) / tau)
            neg += sum(math.exp(w[r][j] * dot(z1[i], nb[r][j]) / tau) for j in range(n) if j != i)
        total += -math.log(pos / neg)
    return total / n


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_rgc_loss_matches_the_literal_sum():
    z1, z2, nb = _unit(6, 5, seed=1), _unit(6, 5, seed=2), _unit(3, 6, 5, seed=3)
    w = torch.rand(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.8 + 0.3
    for tau in (0.1, 0.5):
        got = gcc.rgc_loss(z1, z2, nb, w, tau).item()
        assert got == pytest.approx(rgc_literal(z1.tolist(), z2.tolist(), nb.tolist(), w.tolist(), tau), rel=1e-10)
        got = gcc.rgc_loss(z1, z2, None, None, tau).item()
        assert got == pytest.approx(rgc_literal(z1.tolist(), z2.tolist(), None, None, tau), rel=1e-10)


def test_rgc_limits():
    n, tau = 8, 0.1
    same = F.normalize(torch.ones(n, 4, dtype=torch.float64), dim=1)
    # a constant embedding: all 2N logits equal, the instance contrast pays log 2N
    assert gcc.rgc_loss(same, same, None, None, tau).item() == pytest.approx(math.log(2 * n))
    z1 = torch.eye(n, dtype=torch.float64)
    far = -z1  # second views and neighbours opposite the anchor cost more than aligned ones
    ones = torch.ones(1, n, dtype=torch.float64)
    aligned = gcc.rgc_loss(z1, z1, z1[None], ones, tau).item()
    assert aligned < gcc.rgc_loss(z1, far, far[None], ones, tau).item()
    assert aligned < 0  # positives left out of the denominator: the ratio can exceed 1


def agc_literal(q, qn, tau):
    k, n = len(q[0]), len(q)
    col = lambda m, c: [m[i][c] for i in range(n)]  # noqa: E731
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))  # noqa: E731
    ce = 0.0
    for a in range(k):
        logits = [cos(col(q, a), col(qn, b)) / tau for b in range(k)]
        ce += -(logits[a] - math.log(sum(math.exp(v) for v in logits)))
    mass = [sum(col(q, a)) for a in range(k)]
    o = [m / sum(mass) for m in mass]
    return ce / k, math.log(k) + sum(p * math.log(p) for p in o)


def test_agc_loss_matches_the_literal_sums():
    g = torch.Generator().manual_seed(5)
    q = torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    qn = torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    for tau in (1.0, 0.3):
        l_agc, l_cr = gcc.agc_loss(q, qn, tau)
        want_agc, want_cr = agc_literal(q.tolist(), qn.tolist(), tau)
        assert l_agc.item() == pytest.approx(want_agc, rel=1e-10)
        assert l_cr.item() == pytest.approx(want_cr, rel=1e-10)


def test_agc_limits():
    k = 4
    onehot = torch.eye(k, dtype=torch.float64).repeat(3, 1)  # balanced, confident, neighbours agree
    l_agc, l_cr = gcc.agc_loss(onehot, onehot, 1.0)
    assert l_agc.item() == pytest.approx(-math.log(math.e / (math.e + k - 1)))  # the minimum at tau 1
    assert l_cr.item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((12, k), 1.0 / k, dtype=torch.float64)  # every column alike: no cluster is told apart
    assert gcc.agc_loss(uniform, uniform, 1.0)[0].item() == pytest.approx(math.log(k))
    one = torch.zeros(12, k, dtype=torch.float64)
    one[:, 0] = 1  # all in one cluster: the entropy gap is log K, its maximum
    assert gcc.agc_loss(one, onehot, 1.0)[1].item() == pytest.approx(math.log(k))


# --- the module ---------------------------------------------------------------------------------------


def _model(cfg=None, n=16):
    cfg = cfg or _cfg()
    model = tiny_model(gcc, cfg)
    model.setup(n, 10)
    return model, cfg


def _graph(model, x):
    """The epoch hook on images x that stand for the whole training set (the model in eval mode, as the harness's
    ``features``)."""

    def features(encode):
        model.eval()
        out = encode(x)
        model.train()
        return out

    model.on_epoch_start(model.cfg.pretext_epochs, 10, features)


def test_schedule_matches_the_official_epochs():
    model = tiny_model(gcc, gcc.Config())
    due = [e for e in range(70) if model.graph_due(e)]
    assert due == [51, 56, 61, 66]  # built after epochs 50, 55, ... (official), i.e. before 51, 56, ...
    model.on_epoch_start(50, 1000, lambda encode=None: pytest.fail("no graph in the pretext epochs"))


def test_epoch_hook_builds_the_graph_and_refills_the_bank():
    model, cfg = _model()
    x = fixed_batch(gcc, cfg, n=16)["views"][0]
    assert not bool(model.graph_built)
    _graph(model, x)
    model.eval()
    with torch.no_grad():
        z, q = model.heads(x)
    assert bool(model.graph_built)
    torch.testing.assert_close(model.bank_z, z)
    assert torch.equal(model.neighbors, gcc.knn_graph(model.bank_z, cfg.num_neighbors))  # (at init z are near ties)
    torch.testing.assert_close(model.degree_weight, gcc.degree_weights(model.neighbors, cfg.laplace_scale))
    torch.testing.assert_close(model.bank_q, q)


def test_forward_with_the_graph_is_the_weighted_sum_of_the_terms():
    model, cfg = _model()
    batch = fixed_batch(gcc, cfg, n=16)
    _graph(model, batch["views"][0])
    bank_z, bank_q, draws = model.bank_z.clone(), model.bank_q.clone(), model.draws
    out = model(batch)
    z, q = model.heads(torch.cat(batch["views"][:2]))
    (z1, z2), (q1, _) = z.split(16), q.split(16)
    lists = model.neighbors[batch["index"]]
    entries = lists[:, :3].T
    rgc = gcc.rgc_loss(z1, z2, bank_z[entries], model.degree_weight[entries], 0.1)
    pick = torch.randint(6, (16,), generator=torch.Generator().manual_seed(draws))
    l_agc, l_cr = gcc.agc_loss(q1, bank_q[lists[torch.arange(16), pick]], 1.0)
    torch.testing.assert_close(out["loss"], 2 * rgc + l_agc + 2 * l_cr)
    torch.testing.assert_close(out["rgc_loss"], rgc.detach())


def test_bank_takes_the_second_view_without_gradient():
    model, cfg = _model(n=40)
    batch = fixed_batch(gcc, cfg, n=8)
    batch["index"] = torch.tensor([3, 9, 10, 11, 20, 21, 30, 39])
    before_z, before_q = model.bank_z.clone(), model.bank_q.clone()
    model(batch)
    assert not model.bank_z.requires_grad and not model.bank_q.requires_grad
    with torch.no_grad():
        z, q = model.heads(torch.cat(batch["views"][:2]))
    torch.testing.assert_close(model.bank_z[batch["index"]], z[8:])
    torch.testing.assert_close(model.bank_q[batch["index"]], q[8:])
    rest = torch.ones(40, dtype=torch.bool)
    rest[batch["index"]] = False
    assert torch.equal(model.bank_z[rest], before_z[rest]) and torch.equal(model.bank_q[rest], before_q[rest])


def test_gradients_reach_the_backbone_in_both_phases():
    model, cfg = _model()
    batch = fixed_batch(gcc, cfg, n=16)
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0  # pretext
    assert float(model.cluster_head.weight.grad.abs().sum()) == 0  # the head's weight-0 term
    _graph(model, batch["views"][0])
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert float(model.cluster_head.weight.grad.abs().sum()) > 0
    assert all(not b.requires_grad for b in model.buffers())


def test_setup_and_errors():
    model = tiny_model(gcc, _cfg(num_clusters=0))
    with pytest.raises(RuntimeError, match="no bank yet"):
        model(fixed_batch(gcc, _cfg(), n=4))
    model.setup(20, 7)
    assert model.num_clusters == 7 and model.bank_q.shape == (20, 7) and model.neighbors.shape == (20, 6)
    with pytest.raises(ValueError, match="needs more than 5"):
        model.setup(5, 7)
    with pytest.raises(ValueError, match="rgc_neighbors"):
        tiny_model(gcc, _cfg(rgc_neighbors=7))


def test_view_recipe_and_preset():
    cfg = gcc.Config()
    pipes = gcc.augmentations(cfg, 32)
    assert len(pipes) == 2
    names = [type(t).__name__ for t in pipes[0].transforms]
    assert names[1:5] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale"]
    assert pipes[0].transforms[1].scale == (0.2, 1.0)
    assert views.plan_views(gcc.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    assert set(gcc.PRESETS["small"]) <= {f.name for f in dataclasses.fields(gcc.Config)}


def test_assign_is_the_argmax_of_the_cluster_head():
    model, cfg = _model()
    x = fixed_batch(gcc, cfg, n=6)["views"][0]
    model.eval()
    assert model.embed(x).shape == (6, model.backbone.feature_dim)
    assert torch.equal(model.assign(x), model.cluster_head(model.backbone(x)).argmax(dim=1))


def test_smoke_fit_lowers_the_loss():
    model, cfg = _model(n=32)
    batch = train.prepare_batch(fixed_batch(gcc, cfg, n=32), torch.device("cpu"), False, False)
    _graph(model, batch["views"][0])
    opt = train.build_optimizer(model, cfg, 0.05)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
