"""CRD: the NCE critic of both directions against literal computations, the normaliser Z, the KD term, their
limits, the negative draws, the two memories (update rule, no gradient; identical on every rank is checked
in test_distributed), the frozen teacher (no gradient, unchanged, eval mode, saved), teacher checkpoints
(bare and run formats) and their errors, the view recipe and smoke fits."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.transforms import v2

from selfsup import backbones, catalog, methods, train, views

from .helpers import backbone_grad_norm, fixed_batch, load, smoke_fit, tiny_model

crd = load("crd")


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --- literal computations of the paper's equations (loops, float64) ----------------------------------


def nce_literal(anchor, memory, idx, z, t):
    """Sec. 3 / Eq. 18 (official ContrastLoss) term by term: P = exp(a.v/t)/Z, h = P/(P + N/M),
    -log h(pos) - sum_k log(1 - h(neg_k)), averaged over the anchors."""
    m, k = len(memory), idx.shape[1] - 1

    def h(i, j):
        p = math.exp(float(anchor[i] @ memory[j]) / t) / z
        return p / (p + k / m)

    total = 0.0
    for i in range(len(anchor)):
        total += -math.log(h(i, int(idx[i, 0])))
        for c in range(1, k + 1):
            total += -math.log(1.0 - h(i, int(idx[i, c])))
    return total / len(anchor)


def z_literal(anchor, memory, idx, t):
    """Z = M x the mean of exp(a_i.v_j/t) over every score of the batch, positives included."""
    m = len(memory)
    terms = [math.exp(float(anchor[i] @ memory[int(j)]) / t) for i in range(len(anchor)) for j in idx[i]]
    return m * sum(terms) / len(terms)


def kd_literal(zs, zt, rho):
    total = 0.0
    for a, b in zip(zs.tolist(), zt.tolist()):
        ps = [math.exp(v / rho) / sum(math.exp(u / rho) for u in a) for v in a]
        pt = [math.exp(v / rho) / sum(math.exp(u / rho) for u in b) for v in b]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return rho**2 * total / len(zs)


def _idx(b, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(m, generator=g)[:b, None], torch.randint(m, (b, k), generator=g)], dim=1)


@pytest.mark.parametrize("m,b,k,d,t", [(20, 4, 5, 8, 0.07), (50, 6, 30, 16, 0.5), (9, 3, 12, 4, 1.0)])
def test_nce_loss_and_z_match_equation(m, b, k, d, t):
    memory, anchor, idx = unit(m, d, seed=1), unit(b, d, seed=2), _idx(b, k, m, seed=m + k)
    s = crd.scores(anchor, memory, idx)
    assert s.shape == (b, k + 1)
    z = crd.estimate_z(s, t, m)
    assert z.item() == pytest.approx(z_literal(anchor, memory, idx, t), rel=1e-12)
    for zz in (z.item(), 1.0, 0.3 * z.item()):  # the estimate, the paper's h (Z = 1), any fixed Z
        assert crd.nce_loss(s, zz, t, m).item() == pytest.approx(
            nce_literal(anchor, memory, idx, zz, t), rel=1e-10
        )


@pytest.mark.parametrize("n,c,rho", [(4, 10, 4.0), (7, 3, 1.0)])
def test_kd_loss_matches_equation(n, c, rho):
    g = torch.Generator().manual_seed(n)
    zs, zt = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    assert crd.kd_loss(zs, zt, rho).item() == pytest.approx(kd_literal(zs, zt, rho), rel=1e-10)
    assert crd.kd_loss(zt, zt, rho).item() == pytest.approx(0.0, abs=1e-12)  # the student matches the teacher


def test_nce_limits():
    m, k, t = 16, 8, 0.07
    # collapse: every memory entry and every anchor the same point, Z estimated there: P = 1/M for every
    # score, h = 1/(1 + N), the loss of indistinguishable images, log(N + 1) + N log(1 + 1/N)
    same = F.normalize(torch.ones(m, 6, dtype=torch.float64), dim=1)
    idx = _idx(4, k, m, seed=0)
    s = crd.scores(same[:4], same, idx)
    z = crd.estimate_z(s, t, m)
    assert z.item() == pytest.approx(m * math.exp(1 / t), rel=1e-12)
    collapsed = crd.nce_loss(s, z, t, m).item()
    assert collapsed == pytest.approx(math.log(k + 1) + k * math.log(1 + 1 / k), rel=1e-10)
    # each anchor equal to its own memory entry and orthogonal to the others beats random anchors and collapse
    eye = torch.eye(m, dtype=torch.float64)
    idx = torch.cat(
        [torch.arange(8)[:, None], 8 + torch.randint(8, (8, k), generator=torch.Generator().manual_seed(1))],
        1,
    )
    z = crd.estimate_z(crd.scores(eye[:8], eye, idx), t, m)
    perfect = crd.nce_loss(crd.scores(eye[:8], eye, idx), z, t, m).item()
    assert perfect < crd.nce_loss(crd.scores(unit(8, m, seed=3), eye, idx), z, t, m).item()
    assert perfect < collapsed


def test_negatives_avoid_the_anchors_class_once_its_labels_are_known():
    m = 30
    memory_label = torch.arange(m) % 3
    memory_label[[4, 5]] = -1  # not seen yet: counts as another class
    label = torch.tensor([0, 1, 2, -1])
    torch.manual_seed(0)
    neg = crd.draw_negatives(label, 20000, memory_label, m)
    assert neg.shape == (4, 20000) and neg.min() >= 0 and neg.max() < m
    for row, c in zip(neg, label.tolist()):
        drawn = set(row.tolist())
        allowed = set(range(m)) if c < 0 else {j for j in range(m) if memory_label[j] != c}
        assert drawn == allowed  # every allowed image, no other (650 to 1,000 draws of each)
        counts = torch.bincount(row, minlength=m)[sorted(allowed)].double()
        assert counts.max() / counts.min() < 1.4  # uniform over the allowed ones (about 1.3 by chance)
    torch.manual_seed(0)
    uniform = crd.draw_negatives(label, 3000, None, m)
    assert all(set(row.tolist()) == set(range(m)) for row in uniform)
    # one class everywhere: nothing to avoid, so every image
    torch.manual_seed(0)
    one = crd.draw_negatives(torch.zeros(2, dtype=torch.long), 500, torch.zeros(m, dtype=torch.long), m)
    assert set(one.flatten().tolist()) == set(range(m))


def test_update_memory_function():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    f = torch.tensor([[0.0, 1.0]])
    crd.update_bank(memory, torch.tensor([0]), f, momentum=0.25)  # 0.25 (1, 0) + 0.75 (0, 1), normalised
    torch.testing.assert_close(memory[0], torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75))
    torch.testing.assert_close(memory[1:], F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=1))


# --- the model: both directions, memories, Z, gradients --------------------------------------------


def _cfg(**kw):
    return crd.Config(**{"feat_dim": 16, "nce_k": 32, **kw})


def _model(cfg, num_samples=64, num_classes=10, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no teacher checkpoint: the warning is tested below
        model = tiny_model(crd, cfg, seed)
        model.setup(num_samples, num_classes)
    return model


def _embeddings(model, batch):
    """g^S(S), g^T(T) as the forward computes them (BN in training mode: the batch's statistics)."""
    x = batch["views"][0]
    with torch.no_grad():
        return (
            F.normalize(model.embed_s(model.backbone(x)), dim=1),
            F.normalize(model.embed_t(model.teacher(x)), dim=1),
        )


@pytest.mark.parametrize("embed_bn", [False, True])
def test_forward_is_ce_plus_both_directions_against_the_other_networks_memory(embed_bn):
    cfg = _cfg(embed_bn=embed_bn)
    model = _model(cfg)
    batch = fixed_batch(crd, cfg, n=8)
    batch["index"] = torch.tensor([3, 17, 0, 42, 8, 63, 21, 5])
    f_s, f_t = (f.double() for f in _embeddings(model, batch))
    mem_s, mem_t, labels = (
        model.student_memory.double().clone(),
        model.teacher_memory.double().clone(),
        model.memory_label.clone(),
    )
    with torch.no_grad():
        ce = F.cross_entropy(model.classifier(model.backbone(batch["views"][0])), batch["label"]).item()
    torch.manual_seed(123)
    out = model(batch)
    torch.manual_seed(123)  # the same draw of negatives as in the forward
    idx = torch.cat([batch["index"][:, None], crd.draw_negatives(batch["label"], 32, labels, 64)], dim=1)
    z_s, z_t = z_literal(f_s, mem_t, idx, cfg.temperature), z_literal(f_t, mem_s, idx, cfg.temperature)
    assert model.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    student = nce_literal(f_s, mem_t, idx, z_s, cfg.temperature)  # student anchor, teacher memory
    teacher = nce_literal(f_t, mem_s, idx, z_t, cfg.temperature)  # teacher anchor, student memory
    assert out["crd"].item() == pytest.approx(student + teacher, rel=1e-4)
    assert out["crd_student"].item() == pytest.approx(student, rel=1e-4)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.8 * (student + teacher) + ce, rel=1e-4)
    swapped = nce_literal(f_s, mem_s, idx, z_s, cfg.temperature) + nce_literal(
        f_t, mem_t, idx, z_t, cfg.temperature
    )
    assert abs(out["crd"].item() - swapped) > 1e-2  # the memories are not interchangeable


def test_setup_builds_the_classifier_and_unit_memories_as_buffers():
    cfg = _cfg()
    model = tiny_model(crd, cfg)
    with pytest.raises(RuntimeError, match="setup"):
        model(fixed_batch(crd, cfg, n=4))
    with pytest.warns(UserWarning, match="teacher_checkpoint"):  # no teacher: it keeps its random weights
        model.setup(100, 7)
    assert model.classifier.out_features == 7 and model.teacher_classifier is None
    for name in ("student_memory", "teacher_memory"):
        memory = getattr(model, name)
        assert memory.shape == (100, 16) and not memory.requires_grad and name in model.state_dict()
        torch.testing.assert_close(memory.norm(dim=1), torch.ones(100))
    assert not torch.equal(model.student_memory, model.teacher_memory)
    assert model.memory_label.tolist() == [-1] * 100 and "z" in model.state_dict()
    with pytest.raises(ValueError, match="negatives"):
        crd.MODEL(model.backbone, 32, _cfg(negatives="hard"))
    with pytest.raises(ValueError, match="uses_labels"):
        crd.MODEL(model.backbone, 32, _cfg(uses_labels=False))
    crd.MODEL(model.backbone, 32, _cfg(uses_labels=False, ce_weight=0.0))  # the label-free term alone


def test_memories_follow_the_momentum_rule_at_the_batch_indices():
    cfg = _cfg(memory_momentum=0.5)
    model = _model(cfg)
    batch = fixed_batch(crd, cfg, n=8)
    rows = batch["index"] = torch.tensor([3, 17, 0, 42, 8, 63, 21, 5])
    before_s, before_t = model.student_memory.clone(), model.teacher_memory.clone()
    f_s, f_t = _embeddings(model, batch)
    model(batch)
    torch.testing.assert_close(
        model.student_memory[rows], F.normalize(0.5 * before_s[rows] + 0.5 * f_s, dim=1)
    )
    torch.testing.assert_close(
        model.teacher_memory[rows], F.normalize(0.5 * before_t[rows] + 0.5 * f_t, dim=1)
    )
    others = torch.ones(64, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(model.student_memory[others], before_s[others])
    assert torch.equal(model.teacher_memory[others], before_t[others])
    assert torch.equal(model.memory_label[rows], batch["label"]) and (model.memory_label[others] == -1).all()


def test_z_is_estimated_from_the_first_batch_then_fixed():
    cfg = _cfg()
    model = _model(cfg)
    assert (model.z < 0).all()
    model(fixed_batch(crd, cfg, n=8))
    z1 = model.z.clone()
    assert (z1 > 0).all()
    other = fixed_batch(crd, cfg, n=8, seed=1)
    other["index"] = other["index"] + 20
    model(other)
    assert torch.equal(model.z, z1)
    fresh = _model(cfg)  # a restored model keeps the saved Z
    fresh.load_state_dict(model.state_dict())
    fresh(other)
    assert torch.equal(fresh.z, z1)


@pytest.mark.parametrize("embed_bn", [False, True])
def test_gradients_reach_the_student_and_both_heads_not_the_teacher_or_memories(embed_bn):
    cfg = _cfg(kd_weight=1.0, embed_bn=embed_bn)
    model = _model(cfg)
    out = model(fixed_batch(crd, cfg, n=8))
    assert torch.isfinite(out["loss"])
    assert set(out) == {"loss", "crd", "crd_student", "crd_teacher", "ce", "kd", "pos_sim"}
    assert backbone_grad_norm(model, out["loss"], model.backbone) > 0  # backward survives the memory update
    for head in (model.embed_s, model.embed_t, model.classifier):  # g^T is trained with the critic
        assert all(p.grad.abs().sum() > 0 for p in head.parameters())
    for p in [*model.teacher.parameters(), *model.teacher_classifier.parameters()]:
        assert p.grad is None and not p.requires_grad
    assert model.student_memory.grad is None and model.teacher_memory.grad is None


def test_the_teacher_stays_frozen_in_eval_mode_and_out_of_the_optimizer():
    cfg = _cfg()
    model = _model(cfg)
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    assert model.backbone.training and not any(m.training for m in model.teacher.modules())
    opt = train.build_optimizer(model, cfg, 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt.isdisjoint(id(p) for p in model.teacher.parameters())
    assert id(model.embed_t.weight) in in_opt and id(model.classifier.weight) in in_opt
    batch = train.prepare_batch(fixed_batch(crd, cfg, n=16), torch.device("cpu"), True, False)
    for _ in range(3):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    # unchanged, BN running statistics included (eval mode: the batches did not update them)
    assert all(torch.equal(v, teacher[k]) for k, v in model.teacher.state_dict().items())
    model.eval()
    assert not model.training and not model.backbone.training
    # saved: the teacher is in state_dict, so a restored model has it even when its file is gone
    assert any(k.startswith("teacher.") for k in model.state_dict())


# --- teacher checkpoints ---------------------------------------------------------------------------


def _other_backbone(seed=7, width=8):
    torch.manual_seed(seed)
    net = backbones.SmallCNN(width=width)
    with torch.no_grad():
        for m in net.modules():  # BN statistics that a trained network would have
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _with_teacher(path, **kw):
    cfg = _cfg(teacher_checkpoint=str(path), **kw)
    model = tiny_model(crd, cfg)
    model.setup(64, 10)
    return model


def _same(module, state):
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_loads_a_bare_backbone_state_dict(tmp_path):
    src = _other_backbone()
    torch.save(src.state_dict(), tmp_path / "teacher.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when a teacher is given
        model = _with_teacher(tmp_path / "teacher.pt")
    assert _same(model.teacher, src.state_dict())
    assert not torch.equal(model.teacher.features[0].weight, model.backbone.features[0].weight)
    assert not model.teacher.training


def _run_checkpoint(path, method, cfg, seed=5, **setup):
    """A run checkpoint (``checkpoints/last.pt``) of a tiny ``method`` model, as the harness writes it."""
    module = methods.load_method_module(str(FILES[method]))  # by path: no catalog to read
    model = tiny_model(module, cfg, seed)
    if hasattr(model, "setup"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.setup(64, 10)
    opt = train.build_optimizer(model, cfg, 0.1)
    train.save_checkpoint(path, train._state(model, opt, torch.amp.GradScaler("cuda", enabled=False), 7))
    return model


FILES = {
    m: catalog.ROOT / "implementations" / family / f"{m}.py"
    for m, family in [("simclr", "contrastive"), ("byol", "distillation"), ("crd", "contrastive")]
}


def test_loads_the_backbone_of_a_run_checkpoint(tmp_path):
    simclr = methods.load_method_module(str(FILES["simclr"]))
    src = _run_checkpoint(tmp_path / "simclr.pt", "simclr", simclr.Config(proj_hidden_dim=16, proj_dim=8))
    assert _same(_with_teacher(tmp_path / "simclr.pt").teacher, src.backbone.state_dict())
    # BYOL keeps its backbone under online.0.: the default prefix fails, naming where it is; that one loads
    byol = methods.load_method_module(str(FILES["byol"]))
    src = _run_checkpoint(tmp_path / "byol.pt", "byol", byol.Config(proj_hidden_dim=16, proj_dim=8))
    with pytest.raises(
        crd.TeacherCheckpointError, match=r"byol\.pt: no backbone weights under 'backbone\.'.*'online\.0\.'"
    ):
        _with_teacher(tmp_path / "byol.pt")
    assert _same(
        _with_teacher(tmp_path / "byol.pt", teacher_prefix="online.0.").teacher, src.backbone.state_dict()
    )


def test_kd_reads_the_teachers_classifier_from_a_crd_run(tmp_path):
    src = _run_checkpoint(tmp_path / "crd.pt", "crd", _cfg())  # a CRD student can teach the next one
    model = _with_teacher(tmp_path / "crd.pt", kd_weight=1.0)
    assert _same(model.teacher, src.backbone.state_dict())
    assert _same(model.teacher_classifier, src.classifier.state_dict())
    assert not model.teacher_classifier.weight.requires_grad
    torch.save(src.backbone.state_dict(), tmp_path / "bare.pt")  # a bare backbone has no classifier
    with pytest.raises(crd.TeacherCheckpointError, match="teacher classifier"):
        _with_teacher(tmp_path / "bare.pt", kd_weight=1.0)


def test_bad_teacher_checkpoints_fail_with_one_line_naming_the_file(tmp_path):
    good = _other_backbone().state_dict()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save(good, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(_other_backbone(width=16).state_dict(), tmp_path / "wide.pt")
    torch.save({k: v for i, (k, v) in enumerate(good.items()) if i != 3}, tmp_path / "partial.pt")
    torch.save({**good, "features.99.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    torch.save(
        {"model": {k: v for k, v in good.items()}, "step": 1, "note": torch.nn.Linear(2, 2)},
        tmp_path / "pickled.pt",
    )  # a module object: only pickle can rebuild it
    cases = {
        "missing.pt": "no such file",
        "garbage.pt": "corrupted, truncated or not a torch checkpoint",
        "truncated.pt": "corrupted, truncated or not a torch checkpoint",
        "list.pt": "neither a state_dict",
        "wide.pt": r"has shape \(16, 3, 3, 3\), the backbone expects \(8, 3, 3, 3\)",
        "partial.pt": "1 missing",
        "extra.pt": "features.99.weight and 0 other keys are not in the backbone",
        "pickled.pt": "objects other than tensors",
    }
    for name, message in cases.items():
        with pytest.raises(crd.TeacherCheckpointError, match=message) as e:
            _with_teacher(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


# --- recipe, presets, catalog, embed ----------------------------------------------------------------


def test_single_view_recipe_of_standard_transforms_batched_on_the_device():
    cfg = crd.Config()
    (view,) = crd.augmentations(cfg, 32)
    assert [type(t) for t in view.transforms] == [
        v2.ToImage,
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ToDtype,
        v2.Normalize,
    ]
    assert view.transforms[1].scale == (0.77, 1.0)
    assert (
        views.plan_views(crd.augmentations(cfg, 32, (0.5,) * 3, (0.25,) * 3), in_memory=True).mode == "device"
    )
    batch_views = fixed_batch(crd, cfg, n=4)["views"]
    assert len(batch_views) == 1 and batch_views[0].shape == (4, 3, 32, 32)


def test_paper_defaults_small_preset_and_catalog_properties():
    cfg = crd.Config()
    assert (cfg.nce_k, cfg.temperature, cfg.memory_momentum, cfg.feat_dim) == (16384, 0.07, 0.5, 128)
    assert (cfg.ce_weight, cfg.kd_weight, cfg.crd_weight, cfg.kd_temperature) == (1.0, 0.0, 0.8, 4.0)
    assert cfg.base_lr * 64 / 256 == pytest.approx(0.05) and cfg.batch_size == 64
    small = crd.PRESETS["small"]
    assert set(small) <= set(crd.Config.__dataclass_fields__) and small["nce_k"] < 1437
    entry = yaml.safe_load((catalog.ROOT / "catalog" / "crd.yaml").read_text())
    assert entry["implementation"] == "implementations/contrastive/crd.py"
    assert entry["properties"]["uses_labels"] is cfg.uses_labels is True


def test_heads_are_linear_or_bn_then_linear():
    plain, bn = _model(_cfg()), _model(_cfg(embed_bn=True))
    assert isinstance(plain.embed_s, torch.nn.Linear) and plain.embed_s.out_features == 16
    norm, linear = bn.embed_t
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and linear.out_features == 16
    assert crd.PRESETS["small"]["embed_bn"] and not crd.Config().embed_bn  # the paper's heads by default


def test_embed_is_the_students_backbone_features():
    model = _model(_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.embed(x), model.backbone(x))


# --- smoke fits ---------------------------------------------------------------------------------------


def test_smoke_fit_of_the_label_free_term_lowers_the_loss():
    """Through the shared helper, which passes labels as -1: the contrastive term alone."""
    cfg = _cfg(uses_labels=False, ce_weight=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses, model = smoke_fit(crd, cfg, steps=30, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert (model.z > 0).all()


def test_smoke_fit_of_the_full_objective_with_labels():
    cfg = _cfg(kd_weight=1.0)
    model = _model(cfg)
    batch = train.prepare_batch(fixed_batch(crd, cfg), torch.device("cpu"), True, False)
    assert (batch["label"] >= 0).all()
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = train.build_optimizer(model, cfg, 0.05)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert out["ce"].item() < losses[0]  # the classifier learns the labels
    assert _same(model.teacher, teacher)
