"""PIRL: the NCE of Eq. 2 and the convex combination of Eq. 5 against literal computations, their limits,
the jigsaw transformation made in forward (grid, crops inside the cells, permutation, one backbone call for
all tiles), the g head, the memory bank (update rule, no gradient; identical on every rank is checked in
test_distributed), the normaliser Z, negatives that exclude the image itself, and a smoke fit."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

pirl = load("pirl")


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --- literal computations of the paper's equations (loops, float64) ----------------------------------


def h_literal(s, t, num_neg, n, z=1.0):
    """Eq. 2: exp(s/t) / (exp(s/t) + N/|D|), with exp(s/t) divided by Z when a normaliser is used."""
    e = math.exp(s / t) / z
    return e / (e + num_neg / n)


def nce_literal(a, m_pos, m_neg, t, n, z=1.0):
    """L_NCE(m_I, a) = -log h(m_I, a) - sum_{I'} log(1 - h(a, m_I')), averaged over the anchors."""
    total = 0.0
    for i in range(len(a)):
        cos = lambda u, v: float(u @ v) / (float(u.norm()) * float(v.norm()))  # noqa: E731
        num_neg = m_neg.shape[1]
        total += -math.log(h_literal(cos(m_pos[i], a[i]), t, num_neg, n, z))
        for k in range(num_neg):
            total += -math.log(1 - h_literal(cos(a[i], m_neg[i, k]), t, num_neg, n, z))
    return total / len(a)


@pytest.mark.parametrize("b,num_neg,n,d,t", [(4, 5, 20, 8, 0.07), (6, 30, 50, 16, 0.5), (3, 12, 9, 4, 1.0)])
def test_nce_loss_matches_eq2_and_with_a_normaliser(b, num_neg, n, d, t):
    a, m_pos, m_neg = unit(b, d, seed=1) * 3, unit(b, d, seed=2), unit(b, num_neg, d, seed=3)
    pos, neg = pirl.scores(a, m_pos, m_neg)
    for z in (1.0, 7.5, 1e3):
        got = pirl.nce_loss(pos, neg, t, n, z).item()
        assert got == pytest.approx(nce_literal(a, m_pos, m_neg, t, n, z), rel=1e-10)


@pytest.mark.parametrize("lambd", [0.5, 0.0, 1.0, 0.3])
def test_pirl_loss_is_the_convex_combination_of_eq5(lambd):
    b, num_neg, n, d, t = 5, 7, 30, 6, 0.07
    g, f = unit(b, d, seed=4), unit(b, d, seed=5)
    m_pos, m_neg = unit(b, d, seed=6), unit(b, num_neg, d, seed=7)
    loss, nce_g, nce_f = pirl.pirl_loss(g, f, m_pos, m_neg, lambd, t, n)
    want_g, want_f = nce_literal(g, m_pos, m_neg, t, n), nce_literal(f, m_pos, m_neg, t, n)
    assert nce_g.item() == pytest.approx(want_g, rel=1e-10) and nce_f.item() == pytest.approx(want_f, rel=1e-10)
    assert loss.item() == pytest.approx(lambd * want_g + (1 - lambd) * want_f, rel=1e-10)


@pytest.mark.parametrize("b,num_neg,t", [(4, 6, 0.07), (7, 3, 0.5)])
def test_softmax_variant_matches_the_equation(b, num_neg, t):
    a, m_pos, m_neg = unit(b, 5, seed=13), unit(b, 5, seed=14), unit(b, num_neg, 5, seed=15)
    want = 0.0
    for i in range(b):
        e = [math.exp(float(a[i] @ m_pos[i]) / t)] + [math.exp(float(a[i] @ m_neg[i, k]) / t) for k in range(num_neg)]
        want += -math.log(e[0] / sum(e)) / b
    assert pirl.softmax_loss(*pirl.scores(a, m_pos, m_neg), t).item() == pytest.approx(want, rel=1e-10)
    loss, term_g, term_f = pirl.pirl_loss(a, m_pos, m_pos, m_neg, 0.5, t, 50, loss="softmax")
    assert term_g.item() == pytest.approx(want, rel=1e-10) and loss.item() == pytest.approx(0.5 * (want + term_f.item()))


def test_estimate_z_is_n_times_the_mean_score():
    pos, neg = unit(4, 3, seed=8) @ unit(3, seed=9), unit(4, 6, 3, seed=10) @ unit(3, seed=11)
    t, n = 0.1, 40
    values = [math.exp(s / t) for s in pos.tolist()] + [math.exp(s / t) for s in neg.flatten().tolist()]
    assert pirl.estimate_z(pos, neg, t, n).item() == pytest.approx(n * sum(values) / len(values), rel=1e-12)


# --- known limits ---------------------------------------------------------------------------------


def test_collapsed_features_are_the_worst_case():
    b, num_neg, n, d, t = 4, 8, 16, 5, 0.07
    same = F.normalize(torch.ones(b, d, dtype=torch.float64), dim=1)
    same_neg = same[:, None].expand(b, num_neg, d)
    pos, neg = pirl.scores(same, same, same_neg)
    # Eq. 2 as printed: every pair has h = sigmoid(1/t - log(N/n))
    h = 1 / (1 + math.exp(-(1 / t - math.log(num_neg / n))))
    collapsed = pirl.nce_loss(pos, neg, t, n).item()
    assert collapsed == pytest.approx(-math.log(h) - num_neg * math.log(1 - h), rel=1e-10)
    # with Z estimated there (Z = n e^{1/t}): h = 1/(N + 1), the loss of indistinguishable instances
    z = pirl.estimate_z(pos, neg, t, n)
    assert z.item() == pytest.approx(n * math.exp(1 / t), rel=1e-12)
    assert pirl.nce_loss(pos, neg, t, n, z).item() == pytest.approx(
        math.log(num_neg + 1) + num_neg * math.log(1 + 1 / num_neg), rel=1e-10)
    # anchors on their own bank entry and orthogonal to the negatives beat collapse and random anchors
    eye = torch.eye(d + 3, dtype=torch.float64)
    a, m_neg = eye[:4], eye[4:][None].expand(4, 4, d + 3)
    perfect = pirl.nce_loss(*pirl.scores(a, a, m_neg), t, n, z).item()
    rand = pirl.nce_loss(*pirl.scores(unit(4, d + 3, seed=12), a, m_neg), t, n, z).item()
    assert perfect < rand and perfect < pirl.nce_loss(pos, neg, t, n, z).item()


# --- the jigsaw transformation ----------------------------------------------------------------------


def _positions(n, h, w):
    """An image whose two channels hold each pixel's row and column."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None].expand(h, w)
    return torch.stack([rows, cols])[None].expand(n, 2, h, w).contiguous()


@pytest.mark.parametrize("size,grid,frac", [(32, 3, 64 / 85), (255, 3, 64 / 85), (9, 3, 2 / 3), (8, 2, 0.5)])
def test_jigsaw_tiles_are_crops_inside_a_permutation_of_the_cells(size, grid, frac):
    torch.manual_seed(0)
    n = 16
    tiles = pirl.jigsaw(_positions(n, size, size), grid, frac)
    cell = size // grid
    t = max(1, round(cell * frac))
    margin = (size - grid * cell) // 2
    assert tiles.shape == (n, grid * grid, 2, t, t)
    top, left = tiles[:, :, 0, 0, 0].long(), tiles[:, :, 1, 0, 0].long()  # (N, 9) each tile's corner
    # each tile is a contiguous t x t crop
    torch.testing.assert_close(tiles[:, :, 0], top[..., None, None] + torch.arange(t)[:, None].float().expand(t, t))
    torch.testing.assert_close(tiles[:, :, 1], left[..., None, None] + torch.arange(t)[None].float().expand(t, t))
    # inside one cell, and the nine cells of an image are a permutation
    r, c = (top - margin) // cell, (left - margin) // cell
    assert ((top - margin - r * cell) <= cell - t).all() and ((left - margin - c * cell) <= cell - t).all()
    cells = (r * grid + c).sort(dim=1).values
    assert torch.equal(cells, torch.arange(grid * grid).expand(n, -1))
    assert len({tuple(row) for row in (r * grid + c).tolist()}) > 1  # the order differs between images


def test_jigsaw_refuses_views_smaller_than_the_grid():
    with pytest.raises(ValueError, match="grid"):
        pirl.jigsaw(torch.zeros(2, 3, 2, 2), 3, 0.75)


def test_jigsaw_offsets_take_every_position_in_the_cell():
    torch.manual_seed(1)
    tiles = pirl.jigsaw(_positions(64, 32, 32), 3, 64 / 85)  # cells of 10 px, tiles of 8: offsets 0..2
    top = tiles[:, :, 0, 0, 0].long()
    assert set(((top - 1) % 10).flatten().tolist()) == {0, 1, 2}


def test_jigsaw_head_concatenates_in_order_and_projects():
    torch.manual_seed(0)
    head = pirl.JigsawHead(6, 4, 9).double()
    v = torch.randn(3, 9, 6, dtype=torch.float64)
    want = head.joint(torch.cat([head.tile(v[:, k]) for k in range(9)], dim=1))
    torch.testing.assert_close(head(v), want)
    assert not torch.allclose(head(v.flip(1)), head(v))  # the order of the tiles is seen by g


# --- the model: bank, Z, negatives, gradients -----------------------------------------------------


def _cfg(**kw):
    return pirl.Config(**{"proj_dim": 16, "num_negatives": 32, **kw})


def _model(cfg, num_samples=64):
    model = tiny_model(pirl, cfg)
    model.setup(num_samples, 10)
    return model


def test_negatives_are_uniform_over_the_other_images():
    torch.manual_seed(0)
    index = torch.tensor([0, 5, 9])
    neg = pirl.draw_negatives(index, 2000, 10)
    assert neg.shape == (3, 2000) and neg.min() >= 0 and neg.max() <= 9
    for row, i in zip(neg, index.tolist()):
        assert i not in row.tolist() and set(row.tolist()) == set(range(10)) - {i}


def test_setup_allocates_a_bank_of_unit_vectors_as_a_buffer():
    with pytest.raises(ValueError, match="loss"):
        tiny_model(pirl, _cfg(loss="infonce"))
    cfg = _cfg()
    model = tiny_model(pirl, cfg)
    with pytest.raises(RuntimeError, match="setup"):
        model(fixed_batch(pirl, cfg, n=4))
    model.setup(100, 10)
    assert model.bank.shape == (100, 16) and not model.bank.requires_grad
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(100))
    assert {"bank", "z"} <= set(model.state_dict())


def test_tiles_go_through_the_backbone_in_one_batch():
    cfg = _cfg()
    model = _model(cfg)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    model(fixed_batch(pirl, cfg, n=4))
    assert calls == [(4 * 9, 3, 8, 8), (4, 3, 32, 32)]  # 10-px cells of a 32-px view, 8-px tiles


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_gradients_reach_backbone_and_both_heads_not_the_bank(loss):
    cfg = _cfg(loss=loss)
    model = _model(cfg)
    out = model(fixed_batch(pirl, cfg, n=8))
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss", "loss_jigsaw", "loss_image", "pos_sim"}
    assert out["loss"].item() == pytest.approx(0.5 * (out["loss_jigsaw"] + out["loss_image"]).item(), rel=1e-6)
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0  # backward survives the bank update
    for p in (model.head_f.weight, model.head_g.tile.weight, model.head_g.joint.weight):
        assert p.grad.abs().sum() > 0
    assert model.bank.grad is None and not model.bank.requires_grad


def test_bank_update_follows_the_momentum_rule_with_f():
    cfg = _cfg(bank_momentum=0.5)
    model = _model(cfg)
    batch = fixed_batch(pirl, cfg, n=8)
    batch["index"] = torch.tensor([3, 17, 0, 42, 8, 63, 21, 5])
    before = model.bank.clone()
    with torch.no_grad():
        f = F.normalize(model.head_f(model.backbone(batch["views"][0])), dim=1)  # the image view, not the tiles
    model(batch)
    rows = batch["index"]
    torch.testing.assert_close(model.bank[rows], F.normalize(0.5 * before[rows] + 0.5 * f, dim=1))
    others = torch.ones(64, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(model.bank[others], before[others])


def test_update_bank_function():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    pirl.update_bank(bank, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), momentum=0.25)
    torch.testing.assert_close(bank[0], torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75))
    torch.testing.assert_close(bank[1], torch.tensor([0.0, 1.0]))


def test_z_is_estimated_from_the_first_batch_then_fixed():
    cfg = _cfg()
    model = _model(cfg)
    assert model.z.item() < 0
    batch = fixed_batch(pirl, cfg, n=8)
    torch.manual_seed(5)
    model(batch)
    z1 = model.z.clone()
    assert z1.item() > 0
    model(fixed_batch(pirl, cfg, n=8, seed=1))
    assert torch.equal(model.z, z1)
    fresh = _model(cfg)
    fresh.load_state_dict(model.state_dict())
    fresh(batch)
    assert torch.equal(fresh.z, z1)
    plain = _model(_cfg(estimate_z=False))  # Eq. 2 as printed: Z = 1 throughout
    plain(batch)
    assert plain.z.item() == 1.0


def test_view_recipe_two_standard_views():
    cfg = pirl.Config()
    image, tiles = pirl.augmentations(cfg, 32)
    for view, scale in ((image, (0.08, 1.0)), (tiles, (0.6, 1.0))):
        kinds = [type(t) for t in view.transforms]
        assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter,
                         v2.RandomGrayscale, v2.ToDtype, v2.Normalize]
        assert view.transforms[1].scale == scale and view.transforms[4].p == 0.2
        assert view.transforms[3].hue == (-0.2, 0.2)
    views = fixed_batch(pirl, cfg, n=4)["views"]
    assert len(views) == 2 and all(v.shape == (4, 3, 32, 32) for v in views)


def test_small_preset_names_config_fields():
    small = pirl.PRESETS["small"]
    assert set(small) <= {f for f in pirl.Config.__dataclass_fields__}
    assert small.get("num_negatives", 0) < 1437


def test_embed_is_backbone_features_of_the_whole_image():
    model = _model(_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


@pytest.mark.parametrize("loss,temperature", [("nce", 0.5), ("softmax", 0.07)])
def test_smoke_fit_lowers_the_loss(loss, temperature):
    # NCE at tau = 0.07 first rises on a fixed batch: once its own images' bank entries are written, their
    # nearly parallel random-init features score e^{0.8/0.07} against a Z estimated on the random bank
    losses, model = smoke_fit(pirl, _cfg(loss=loss, temperature=temperature), steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert model.z.item() > 0 and (model.z.item() == 1.0) == (loss == "softmax")


def test_heads_are_linear():
    model = _model(_cfg())
    assert isinstance(model.head_f, nn.Linear)
    assert isinstance(model.head_g.tile, nn.Linear) and model.head_g.joint.in_features == 9 * 16
