"""InstDisc: NCE and the non-parametric softmax against literal computations, their limits, the memory bank
(its update rule, no gradient; identical on every rank is checked in test_distributed), the fixed normaliser Z, and a smoke fit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

instdisc = load("instdisc")


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --- literal computations of the paper's equations (loops, float64) ----------------------------------


def nce_literal(f, bank, index, noise, z, t):
    """Sec. 3.2 term by term: P(j|f) = exp(v_j.f/t)/Z, h = P/(P + m/n), -log h(i) - sum_k log(1 - h(j_k))."""
    n, m = len(bank), noise.shape[1]
    total = 0.0
    for i in range(len(f)):
        def h(j, i=i):
            p = math.exp(float(bank[j] @ f[i]) / t) / z
            return p / (p + m * (1.0 / n))

        total += -math.log(h(int(index[i])))
        for k in range(m):
            total += -math.log(1.0 - h(int(noise[i, k])))
    return total / len(f)


def softmax_literal(f, bank, index, t):
    total = 0.0
    for i in range(len(f)):
        scores = [math.exp(float(v @ f[i]) / t) for v in bank]
        total += -math.log(scores[int(index[i])] / sum(scores))
    return total / len(f)


def z_literal(f, bank, noise, t):
    """Z ~= n/m sum_k exp(v_{j_k}.f_i/t), averaged over the batch's samples i."""
    n, (b, m) = len(bank), noise.shape
    per_sample = [n / m * sum(math.exp(float(bank[int(noise[i, k])] @ f[i]) / t) for k in range(m)) for i in range(b)]
    return sum(per_sample) / b


def sims(f, bank, index, noise):
    return (bank[index] * f).sum(1), torch.einsum("nmd,nd->nm", bank[noise], f)


@pytest.mark.parametrize("n,b,m,d,t", [(20, 4, 5, 8, 0.07), (50, 6, 30, 16, 0.5), (9, 3, 12, 4, 1.0)])
def test_nce_loss_and_z_match_equation(n, b, m, d, t):
    g = torch.Generator().manual_seed(n + m)
    bank, f = unit(n, d, seed=1), unit(b, d, seed=2)
    index, noise = torch.randperm(n, generator=g)[:b], torch.randint(n, (b, m), generator=g)
    pos, neg = sims(f, bank, index, noise)
    z = instdisc.estimate_z(neg, t, n)
    assert z.item() == pytest.approx(z_literal(f, bank, noise, t), rel=1e-12)
    for zz in (z.item(), 0.7 * z.item()):  # any fixed Z, not only the estimate
        got = instdisc.nce_loss(pos, neg, zz, t, n).item()
        assert got == pytest.approx(nce_literal(f, bank, index, noise, zz, t), rel=1e-10)


@pytest.mark.parametrize("n,b,d,t", [(10, 4, 8, 0.07), (30, 7, 5, 0.5)])
def test_softmax_loss_matches_equation(n, b, d, t):
    bank, f = unit(n, d, seed=3), unit(b, d, seed=4)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:b]
    got = instdisc.softmax_loss(f, bank, index, t).item()
    assert got == pytest.approx(softmax_literal(f, bank, index, t), rel=1e-10)


def test_proximal_term_matches_equation():
    f, v = unit(5, 6, seed=5), unit(5, 6, seed=6)
    want = 30.0 * sum(float(((a - b) ** 2).sum()) for a, b in zip(f, v)) / 5
    assert instdisc.proximal_term(f, v, 30.0).item() == pytest.approx(want, rel=1e-12)
    # unit vectors: 2 lambd (1 - f.v), zero when the feature equals its bank entry
    assert instdisc.proximal_term(f, v, 30.0).item() == pytest.approx(60 * (1 - (f * v).sum(1)).mean().item(), rel=1e-10)
    assert instdisc.proximal_term(f, f, 30.0).item() == 0.0


# --- known limits ---------------------------------------------------------------------------------


def test_nce_limits():
    n, m, d, t = 16, 8, 16, 0.07
    # collapse: every bank entry and every feature the same point, Z estimated there: P(j|f) = 1/n for
    # every j, the loss of indistinguishable instances, log(m + 1) + m log(1 + 1/m)
    same = F.normalize(torch.ones(n, d, dtype=torch.float64), dim=1)
    noise = torch.randint(n, (4, m), generator=torch.Generator().manual_seed(0))
    pos, neg = sims(same[:4], same, torch.arange(4), noise)
    z = instdisc.estimate_z(neg, t, n)
    assert z.item() == pytest.approx(n * math.exp(1 / t), rel=1e-12)
    collapsed = instdisc.nce_loss(pos, neg, z, t, n).item()
    assert collapsed == pytest.approx(math.log(m + 1) + m * math.log(1 + 1 / m), rel=1e-10)
    # each feature equal to its own bank entry and orthogonal to every other entry beats random features
    eye = torch.eye(n, dtype=torch.float64)
    index = torch.arange(8)
    noise = torch.randint(n, (8, m), generator=torch.Generator().manual_seed(1))
    pos, neg = sims(eye[index], eye, index, noise)
    z = instdisc.estimate_z(neg, t, n)
    perfect = instdisc.nce_loss(pos, neg, z, t, n).item()
    rand = unit(8, n, seed=7)
    pos_r, neg_r = sims(rand, eye, index, noise)
    assert perfect < instdisc.nce_loss(pos_r, neg_r, z, t, n).item()
    assert perfect < collapsed


def test_softmax_limits():
    n, t = 12, 0.1
    same = F.normalize(torch.ones(n, 4, dtype=torch.float64), dim=1)
    assert instdisc.softmax_loss(same[:5], same, torch.arange(5), t).item() == pytest.approx(math.log(n), rel=1e-12)
    eye = torch.eye(n, dtype=torch.float64)
    best = -math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))
    assert instdisc.softmax_loss(eye, eye, torch.arange(n), t).item() == pytest.approx(best, rel=1e-10)
    assert best < instdisc.softmax_loss(unit(n, n, seed=8), eye, torch.arange(n), t).item()


# --- the model: bank, Z, gradients ---------------------------------------------------------------


def _cfg(**kw):
    return instdisc.Config(**{"dim": 16, "nce_k": 32, **kw})


def _model(cfg, num_samples=64):
    model = tiny_model(instdisc, cfg)
    model.setup(num_samples, 10)
    return model


def _features(model, batch):
    """f = normalise(W g(x)) as the forward computes it (BN in training mode: the batch's statistics)."""
    with torch.no_grad():
        return F.normalize(model.projector(model.backbone(batch["views"][0])), dim=1)


def test_setup_allocates_a_bank_of_unit_vectors_as_a_buffer():
    cfg = _cfg()
    model = tiny_model(instdisc, cfg)
    with pytest.raises(RuntimeError, match="setup"):
        model(fixed_batch(instdisc, cfg, n=4))
    model.setup(100, 10)
    assert model.bank.shape == (100, 16) and not model.bank.requires_grad
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(100))
    assert "bank" in model.state_dict() and "z" in model.state_dict()
    assert all(p.data_ptr() != model.bank.data_ptr() for p in model.parameters())
    with pytest.raises(ValueError, match="loss"):
        instdisc.MODEL(model.backbone, model.backbone.feature_dim, _cfg(loss="infonce"))


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_gradients_reach_backbone_not_bank(loss):
    cfg = _cfg(loss=loss)
    model = _model(cfg)
    out = model(fixed_batch(instdisc, cfg, n=8))
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss", loss, "prox", "pos_sim"}
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0  # backward also survives the bank update
    assert model.projector.weight.grad.abs().sum() > 0
    assert model.bank.grad is None and not model.bank.requires_grad


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_bank_update_follows_the_momentum_rule_at_the_batch_indices(loss):
    cfg = _cfg(loss=loss, bank_momentum=0.5)
    model = _model(cfg)
    batch = fixed_batch(instdisc, cfg, n=8)
    batch["index"] = torch.tensor([3, 17, 0, 42, 8, 63, 21, 5])
    before = model.bank.clone()
    f = _features(model, batch)
    model(batch)
    rows = batch["index"]
    torch.testing.assert_close(model.bank[rows], F.normalize(0.5 * before[rows] + 0.5 * f, dim=1))
    others = torch.ones(len(before), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(model.bank[others], before[others])
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(len(before)))


def test_update_bank_function():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    f = torch.tensor([[0.0, 1.0]])
    instdisc.update_bank(bank, torch.tensor([0]), f, momentum=0.25)  # 0.25 (1, 0) + 0.75 (0, 1), normalised
    torch.testing.assert_close(bank[0], torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75))
    torch.testing.assert_close(bank[1:], F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=1))


def test_z_is_estimated_from_the_first_batch_then_fixed():
    cfg = _cfg(nce_k=16)
    model = _model(cfg)
    assert model.z.item() < 0
    batch = fixed_batch(instdisc, cfg, n=8)
    bank, f = model.bank.clone(), _features(model, batch)
    torch.manual_seed(123)
    model(batch)
    torch.manual_seed(123)  # the same draw of noise indices as in the forward
    noise = torch.randint(64, (8, 16))
    want = z_literal(f.double(), bank.double(), noise, cfg.temperature)
    assert model.z.item() == pytest.approx(want, rel=1e-5)
    z1 = model.z.clone()
    other = fixed_batch(instdisc, cfg, n=8, seed=1)
    other["index"] = other["index"] + 20
    model(other)
    assert torch.equal(model.z, z1)
    # a restored model keeps the saved Z
    fresh = _model(cfg)
    fresh.load_state_dict(model.state_dict())
    fresh(batch)
    assert torch.equal(fresh.z, z1)


def test_single_view_recipe_of_standard_transforms():
    cfg = instdisc.Config()
    (view,) = instdisc.augmentations(cfg, 32)
    kinds = [type(t) for t in view.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomGrayscale, v2.ColorJitter,
                     v2.ToDtype, v2.Normalize]
    crop, jitter = view.transforms[1], view.transforms[4]
    assert crop.scale == (0.2, 1.0) and view.transforms[3].p == 0.2
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.4, 0.4)
    views = fixed_batch(instdisc, cfg, n=4)["views"]
    assert len(views) == 1 and views[0].shape == (4, 3, 32, 32)


def test_small_preset_fits_the_digits_bank():
    small = instdisc.PRESETS["small"]
    assert small["nce_k"] < 1437 and set(small) <= {f for f in instdisc.Config.__dataclass_fields__}


def test_embed_is_backbone_features():
    model = _model(_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_smoke_fit_lowers_the_loss(loss):
    cfg = _cfg(loss=loss)
    losses, model = smoke_fit(instdisc, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert model.z.item() > 0 or loss == "softmax"
