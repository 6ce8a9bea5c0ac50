"""DEC: q (Eq. 1), P (Eq. 3) and KL(P || Q) (Eq. 2) against loops in float64, the gradients against the
closed forms of Eq. 4-5, the limits, the autoencoder stage, k-means with restarts, the epoch hook's
schedule (k-means initialisation, target refreshes, changed fraction), state buffers, smoke fit."""

import dataclasses
import math

import pytest
import torch

from selfsup import train, views

from .helpers import backbone_grad_norm, fixed_batch, load, tiny_model

dec = load("dec")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def q_loop(z, mu, alpha):
    """Eq. 1 written out point by point."""
    n, k = len(z), len(mu)
    q = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        kern = [(1 + sum((float(z[i, d]) - float(mu[j, d])) ** 2 for d in range(z.shape[1])) / alpha) ** (-(alpha + 1) / 2)
                for j in range(k)]
        for j in range(k):
            q[i, j] = kern[j] / sum(kern)
    return q


def p_loop(q):
    """Eq. 3 written out."""
    n, k = q.shape
    f = [sum(float(q[i, j]) for i in range(n)) for j in range(k)]
    p = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        w = [float(q[i, j]) ** 2 / f[j] for j in range(k)]
        for j in range(k):
            p[i, j] = w[j] / sum(w)
    return p


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_soft_assignment_target_and_kl_match_loops(alpha):
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    log_q = dec.soft_assignment(z, mu, alpha)
    q = q_loop(z, mu, alpha)
    torch.testing.assert_close(log_q.exp(), q, rtol=1e-10, atol=1e-12)
    p = dec.target_distribution(q)
    torch.testing.assert_close(p, p_loop(q), rtol=1e-10, atol=1e-12)
    kl = sum(float(p[i, j]) * math.log(float(p[i, j]) / float(q[i, j])) for i in range(7) for j in range(4)) / 7
    assert dec.dec_loss(log_q, p).item() == pytest.approx(kl, rel=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_gradients_are_eq_4_and_5(alpha):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = dec.target_distribution(q_loop(z.detach(), mu.detach(), alpha) ** 1.3)  # any fixed target with rows summing to 1
    dec.dec_loss(dec.soft_assignment(z, mu, alpha), p).backward()
    q = q_loop(z.detach(), mu.detach(), alpha)
    grad_z, grad_mu = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for i in range(6):
        for j in range(4):
            diff = z[i].detach() - mu[j].detach()
            w = (alpha + 1) / alpha / (1 + float(diff @ diff) / alpha) * (float(p[i, j]) - float(q[i, j]))
            grad_z[i] += w * diff  # Eq. 4
            grad_mu[j] -= w * diff  # Eq. 5
    # the loss is the mean over the batch: the paper's sums divided by N
    torch.testing.assert_close(z.grad, grad_z / 6, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mu.grad, grad_mu / 6, rtol=1e-9, atol=1e-12)


def test_limits():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    z = torch.randn(40, 4, generator=g, dtype=torch.float64) * 3
    q = dec.soft_assignment(z, mu).exp()
    p = dec.target_distribution(q)
    # P sharpens Q: a lower entropy per point on average and a larger top probability for confident points
    ent = lambda d: -(d * d.log()).sum(1)  # noqa: E731
    assert float(ent(p).mean()) < float(ent(q).mean())
    assert bool((p.max(1).values >= q.max(1).values - 1e-12)[q.max(1).values > 0.5].all())
    # a point at a centre: q_ij is largest at that centre, and the kernel there is 1
    zc = mu[2:3].clone()
    log_q = dec.soft_assignment(zc, mu)
    assert int(log_q.argmax()) == 2
    kern = (1 + ((zc - mu) ** 2).sum(1)) ** -1.0
    assert float(log_q[0, 2].exp()) == pytest.approx(1.0 / float(kern.sum()), rel=1e-12)
    # KL(P || Q) is zero where Q already equals its target and positive otherwise
    assert float(dec.dec_loss(q.log(), q)) == pytest.approx(0.0, abs=1e-14)
    assert float(dec.dec_loss(q.log(), p)) > 0
    # equal frequencies and one-hot-like q: P is q^2 renormalised per row
    qe = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(dec.target_distribution(qe), qe**2 / (qe**2).sum(1, keepdim=True))
    # a large cluster's targets are damped by its frequency f_j
    qb = torch.tensor([[0.6, 0.4]] * 9 + [[0.4, 0.6]], dtype=torch.float64)
    pb = dec.target_distribution(qb)
    assert float(pb[0, 0]) < float((qb[0] ** 2 / (qb[0] ** 2).sum())[0])


def test_kmeans_restarts_keeps_the_best_run():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0], [5.0, 5.0]])
    x = centres.repeat_interleave(30, 0) + 0.3 * torch.randn(150, 2, generator=g)
    best = dec.kmeans_restarts(x, 5, 10, 50, torch.Generator().manual_seed(0))
    cost = lambda c: float(((x - c[dec.nearest_centroid(x, c)]) ** 2).sum())  # noqa: E731
    gen = torch.Generator().manual_seed(0)  # the same draws, run by run
    costs = [cost(dec.kmeans(x, 5, 50, gen)[1]) for _ in range(10)]
    assert cost(best) == pytest.approx(min(costs))
    # the blobs are found: each true centre has a centroid close to it
    assert float(torch.cdist(centres, best).min(1).values.max()) < 0.3


def _cfg(**kw):
    return dec.Config(**{**dict(hidden_dims=(32, 32, 64), embed_dim=4, recon_size=8, num_clusters=4, pretrain_epochs=2,
                                update_epochs=2, kmeans_restarts=3, kmeans_iterations=20, epochs=10), **kw})


def _model(cfg, n=32, spread=True):
    model = tiny_model(dec, cfg)
    model.setup(n, 10)
    if spread:  # a fresh narrow MLP maps all images to nearly one point: spread z out
        with torch.no_grad():
            model.encoder[-1].weight.mul_(100.0)
    return model, fixed_batch(dec, cfg, n=n)


def test_setup_sizes_state_and_defaults_to_the_classes():
    model, _ = _model(_cfg(num_clusters=0))
    assert model.centres.shape == (10, 4) and model.target.shape == (32, 10) and model.assignments.shape == (32,)
    buffers = dict(model.named_buffers())
    for name in ("target", "assignments", "clustering", "changed", "converged_epoch"):
        assert name in buffers and name in model.state_dict()
    assert "centres" in dict(model.named_parameters())
    with pytest.raises(ValueError, match="clusters for 3 training images"):
        model.setup(3, 10)


def test_autoencoder_stage_lowers_the_reconstruction_loss():
    cfg = _cfg()
    model, batch = _model(cfg, spread=False)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    out = model(batch)
    assert set(out) == {"loss", "reconstruction"}
    assert out["loss"].item() == pytest.approx(cfg.pretrain_lr_scale * out["reconstruction"].item())
    opt = train.build_optimizer(model, cfg, 0.05)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # the corruption's draws
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # every parameter gets a gradient (DDP); the centres' is zero in this stage
    model.zero_grad()
    model(batch)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert float(model.centres.grad.abs().sum()) == 0 and float(model.decoder[0].weight.grad.abs().sum()) > 0
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0


def test_reconstruction_target_is_the_pooled_clean_input():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    recon = torch.randn(2, 3 * 4 * 4, dtype=torch.float64)
    want = 0.0
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    t = float(x[n, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean())
                    want += (float(recon[n, c * 16 + i * 4 + j]) - t) ** 2
    assert dec.reconstruction_loss(recon, x, 4).item() == pytest.approx(want / recon.numel(), rel=1e-6)


def _features_of(model, batch):
    calls = []

    def features(encode=None):
        calls.append(encode)
        was = model.training
        model.eval()
        out = (encode or model.embed)(batch["views"][0]).detach()
        model.train(was)
        return out

    return features, calls


def test_epoch_hook_initialises_by_kmeans_then_refreshes_on_schedule():
    cfg = _cfg()
    model, batch = _model(cfg)
    features, calls = _features_of(model, batch)
    placeholder = model.centres.detach().clone()
    for epoch in range(cfg.pretrain_epochs):  # the autoencoder stage: nothing to do
        model.on_epoch_start(epoch, cfg.epochs, features)
    assert not calls and not bool(model.clustering) and torch.equal(model.centres.detach(), placeholder)

    model.on_epoch_start(cfg.pretrain_epochs, cfg.epochs, features)  # k-means on z of the whole set
    assert len(calls) == 1 and calls[0] == model.encode
    assert bool(model.clustering)
    model.eval()
    z = model.encode(batch["views"][0]).detach()
    want = dec.kmeans_restarts(z, 4, cfg.kmeans_restarts, cfg.kmeans_iterations, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.centres.detach(), want)
    q = dec.soft_assignment(z, want).exp()
    torch.testing.assert_close(model.target, dec.target_distribution(q))
    assert torch.equal(model.assignments, q.argmax(1)) and float(model.changed) == 1.0
    assert int(model.converged_epoch) == -1

    # the KL stage: the centres move, P stays until the next refresh (every update_epochs = 2)
    model.train()
    prepared = train.prepare_batch(batch, torch.device("cpu"), False, False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss = model(prepared)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(model.centres.detach(), want)
    target, old = model.target.clone(), model.assignments.clone()
    model.on_epoch_start(cfg.pretrain_epochs + 1, cfg.epochs, lambda *a: pytest.fail("no refresh in this epoch"))
    assert torch.equal(model.target, target)

    model.on_epoch_start(cfg.pretrain_epochs + 2, cfg.epochs, features)  # a refresh with the moved centres
    model.eval()
    z = model.encode(batch["views"][0]).detach()
    q = dec.soft_assignment(z, model.centres.detach()).exp()
    torch.testing.assert_close(model.target, dec.target_distribution(q))
    assert float(model.changed) == pytest.approx(float((q.argmax(1) != old).float().mean()))

    model.on_epoch_start(cfg.pretrain_epochs + 4, cfg.epochs, features)  # nothing moved since: converged
    assert float(model.changed) == 0.0 and int(model.converged_epoch) == cfg.pretrain_epochs + 4
    model.on_epoch_start(cfg.pretrain_epochs + 6, cfg.epochs, features)
    assert int(model.converged_epoch) == cfg.pretrain_epochs + 4  # the first epoch below tol is kept


def test_clustering_stage_loss_gradients_and_state():
    cfg = _cfg()
    model, batch = _model(cfg)
    features, _ = _features_of(model, batch)
    model.on_epoch_start(cfg.pretrain_epochs, cfg.epochs, features)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    out = model(batch)
    assert set(out) == {"loss", "kl", "changed"}
    # the loss is Eq. 2 on this batch's q (no dropout in this stage) and the stored rows of P
    z = model.encode(batch["views"][0])
    want = dec.dec_loss(dec.soft_assignment(z, model.centres), model.target[batch["index"]])
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    model.zero_grad()
    out["loss"].backward()
    assert float(model.centres.grad.abs().sum()) > 0
    assert float(model.decoder[0].weight.grad.abs().sum()) == 0  # the decoder is out of the loss
    assert backbone_grad_norm(model, model(batch)["loss"], model.backbone) > 0
    assert not model.target.requires_grad and model.target.grad is None


def test_view_recipe_and_preset():
    cfg = dec.Config()
    (pipe,) = dec.augmentations(cfg, 32)
    crop = next(t for t in pipe.transforms if type(t).__name__ == "RandomResizedCrop")
    assert tuple(crop.scale) == (1.0, 1.0) and tuple(crop.ratio) == (1.0, 1.0)
    assert views.plan_views(dec.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(pipe(x), pipe(x))  # no randomness: the whole image
    fields = {f.name for f in dataclasses.fields(dec.Config)}
    assert set(dec.PRESETS["small"]) <= fields
    small = dataclasses.replace(cfg, **dec.PRESETS["small"])
    assert 0 < small.pretrain_epochs < 15  # both stages within the digits budget of 15 epochs
    assert (cfg.embed_dim, cfg.hidden_dims, cfg.alpha, cfg.tol, cfg.kmeans_restarts) == (10, (500, 500, 2000), 1.0, 0.001, 20)


def test_embed_and_assign():
    cfg = _cfg()
    model, batch = _model(cfg)
    features, _ = _features_of(model, batch)
    model.on_epoch_start(cfg.pretrain_epochs, cfg.epochs, features)
    x = batch["views"][0][:5]
    model.eval()  # as the harness evaluates, and as the hook's features() are computed
    assert model.embed(x).shape == (5, model.backbone.feature_dim)
    a = model.assign(x)
    assert a.shape == (5,) and torch.equal(a, model.assignments[:5])


def test_smoke_fit_of_the_clustering_stage():
    cfg = _cfg()
    model, batch = _model(cfg)
    features, _ = _features_of(model, batch)
    model.on_epoch_start(cfg.pretrain_epochs, cfg.epochs, features)
    batch = train.prepare_batch(batch, torch.device("cpu"), False, False)
    opt = train.build_optimizer(model, cfg, 0.05)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
