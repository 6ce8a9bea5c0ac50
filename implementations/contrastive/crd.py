"""CRD — Tian, Krishnan, Isola. "Contrastive Representation Distillation". ICLR 2020, arXiv:1910.10699.
Catalog id: ``crd``. Official code: HobbitLong/RepDistiller (crd/criterion.py, crd/memory.py,
train_student.py).

A frozen teacher f^T and the student f^S see the same image x_i. Their penultimate features T = f^T(x_i) and
S = f^S(x_i) go through linear heads g^T, g^S to 128-d and are L2-normalised (Sec. 3; official ``Embed``).
A congruent pair is (T, S) of one image, an incongruent pair comes from two different images; with N
incongruent pairs per congruent one, the critic (Sec. 3) is

    h(T, S) = exp(g^T(T) . g^S(S) / tau) / ( exp(g^T(T) . g^S(S) / tau) + N / M ),

M the number of training images, and the NCE bound on the mutual information I(T; S) is maximised:

    L_critic = E_{q(T,S | C=1)} [log h(T, S)] + N E_{q(T,S | C=0)} [log(1 - h(T, S))].

Negatives come from two memories of M unit vectors (Sec. 3 and the official ContrastMemory): one of
student embeddings, one of teacher embeddings. The student's g^S(S_i) is scored against the teacher memory
at i (positive) and at N drawn indices j_1..j_N (negatives); the teacher's g^T(T_i) against the student
memory at the same indices. As in the official ContrastMemory, exp(s / tau) is divided by a normaliser Z,
set once per direction from the first batch, Z = M mean exp(s / tau) over its N + 1 scores (positive
included), then fixed (InstDisc's NCE normaliser). So with P = exp(s / tau) / Z (Z = 1 is the equation
above), h = P / (P + N / M) and per direction, averaged over the batch (Eq. 18, the official ContrastLoss),

    L_dir = -(1/B) sum_i [ log h(i, i) + sum_{k=1..N} log(1 - h(i, j_k)) ],    L_crd = L_student + L_teacher.

The full objective (official train_student.py; the README's CRD command ``-a 0 -b 0.8``):

    L = gamma CE(y, W S) + alpha rho^2 KL(softmax(z^T / rho) || softmax(z^S / rho)) + beta L_crd,

gamma = 1, alpha = 0 (the CRD row; alpha = 1 is CRD+KD), beta = 0.8, rho = 4, with W the student's classifier
and z^T, z^S the teacher's and the student's logits. After the scores, without gradient, each memory is
updated at the batch's indices: v_i <- normalise(m v_i + (1 - m) g(.)_i), m = 0.5 (official ``--nce_m``).
Both heads g^S and g^T are trained (the critic is maximised with the student, Sec. 3; the official
trainable list holds embed_s and embed_t); the teacher network is frozen. L_teacher's gradient reaches only
g^T (the student memory is a constant); L_student, CE and KD reach the student.

Negatives: the official samplers (dataset/cifar100.py ``CIFAR100InstanceSample``, mode "exact";
dataset/imagenet.py ``ImageFolderSample``) draw the N indices uniformly, with replacement, among the training
images of other classes than the anchor's, with P_n = 1/M kept in h. ``negatives="other_classes"`` does the
same from a buffer of labels written from the batches seen (an image not seen yet counts as another class);
``negatives="uniform"`` draws from all M images, the product of marginals of Sec. 3.

Labels: the objective is supervised (CE, class-aware negatives), so ``uses_labels`` is True. With
``uses_labels=False`` (labels are -1) ``ce_weight`` must be 0: the contrastive term alone, label-free.

The teacher: the paper distils across architectures; the harness builds one backbone, so the teacher is a
deep copy of the student's backbone, loaded in ``setup`` from ``teacher_checkpoint`` (a bare backbone
state_dict, or a harness run checkpoint whose backbone sits under ``teacher_prefix``). Without one it keeps
its random initialisation (the student's own initial weights) and ``setup`` warns. It is frozen
(requires_grad False: the harness's optimizer takes trainable parameters only) and stays in eval mode
(``train()`` keeps it there, as the official loop does). Its parameters and buffers are in ``state_dict``, so
a run checkpoint holds everything ``forward`` reads and a resume restores this teacher even if the file has
changed since (``setup`` still reads the file first: it must exist).

Collapse: the student is pulled to the teacher's embedding of the same image and pushed from the teacher's
embeddings of N other images: a constant student embedding scores every memory entry alike, which the NCE
term penalises (log(N + 1) + N log(1 + 1/N) per direction at the collapsed point, Z estimated there); CE on
labels separates the classes.

Distributed: both memories, their labels and Z are identical on every rank. The memories are written from
the GLOBAL batch (indices, labels and embeddings all-gathered without gradient), Z is estimated from the
global batch's scores (an all-reduce), and the negatives are drawn as one (N_global, N) block from each
rank's RNG, of which a rank keeps its own rows (as in instdisc.py: the harness seeds ranks differently, so
the draws are independent; with the same seed they equal one process on the concatenated batch). The loss
is per sample, so DDP's gradient averaging gives the global batch's gradient.

Deviations:
- views: the CIFAR recipe RandomCrop(32, padding=4) + flip (official dataset/cifar100.py) has no batched
  counterpart in the harness; a RandomResizedCrop keeping at least 77% of the area (a 28-px square of 32:
  shifts of up to 4 px, with a zoom of up to 1.14) + flip stands in for it;
- learning rate: the harness decays it with a cosine; the official code divides it by 10 at epochs 150, 180
  and 210;
- the memories start as unit random vectors (uniform in [-sqrt(3/D), sqrt(3/D)] as the official code draws
  them, then normalised; the official entries have unit norm only in expectation), as in instdisc.py;
- the official eps = 1e-7 in h is dropped: the loss is computed exactly as softplus of log-odds;
- class-aware negatives read labels from the batches seen, not from the data set up front: in the first
  epoch an image not seen yet may be of the anchor's class;
- the teacher has the student's architecture (see above); biases and BN parameters get no weight decay
  (the harness's optimizer groups); the official code decays all student parameters;
- ``embed_bn`` (off by default, on in the small preset) puts a BN without affine before each linear head:
  on the digits the small CNN's features are too nearly parallel for linear heads (see PRESETS).

Cost: each sample gathers N + 1 entries from each memory, two (B, N + 1, D) tensors as in the official code.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    feat_dim: int = 128
    """Dimension of g^T, g^S and of the memory entries (official ``--feat_dim``)."""
    embed_bn: bool = False
    """Not in the paper: normalise the features over the batch (BN without affine) before the linear heads;
    for the small preset (see PRESETS). False: the official Embed, linear then L2 norm."""
    nce_k: int = 16384
    """N, negatives per anchor drawn from the memories (official ``--nce_k``)."""
    temperature: float = 0.07
    """tau in h (official ``--nce_t``; the paper's text could not be checked here)."""
    memory_momentum: float = 0.5
    """m in v <- normalise(m v + (1 - m) g) (official ``--nce_m``)."""
    negatives: str = "other_classes"
    """Where negatives are drawn: ``"other_classes"`` (official samplers, see the docstring) or ``"uniform"``
    (all M images, Sec. 3's product of marginals)."""
    ce_weight: float = 1.0
    """gamma, weight of the cross-entropy with labels (official ``-r``, default 1)."""
    kd_weight: float = 0.0
    """alpha, weight of the KD term: 0 for CRD, 1 for CRD+KD (README's commands, ``-a 0`` / ``-a 1``)."""
    crd_weight: float = 0.8
    """beta, weight of L_crd (README's CRD command, ``-b 0.8``)."""
    kd_temperature: float = 4.0
    """rho of the KD term (official ``--kd_T``)."""
    teacher_checkpoint: str = ""
    """Path of the frozen teacher: a bare backbone state_dict, or a selfsup run's ``checkpoints/last.pt``.
    Empty: the teacher keeps its random initialisation (for smoke runs; ``setup`` warns)."""
    teacher_prefix: str = "backbone."
    """Where a run checkpoint keeps the backbone: ``backbone.`` (SimCLR, InstDisc, CRD), ``online.0.``
    (BYOL), ``encoder_q.0.`` (MoCo)."""
    teacher_classifier_prefix: str = "classifier."
    """Where a run checkpoint keeps the teacher's classifier, read only when kd_weight > 0 (``classifier.``:
    a CRD run, whose student can teach the next)."""
    uses_labels: bool = True
    """The harness passes class labels (site/method-interface.md, "Labels"): CE and class-aware negatives."""
    min_scale: float = 0.77
    """Smallest area fraction of the crop, standing in for RandomCrop(32, padding=4) (see Deviations); the
    official ImageNet recipe is RandomResizedCrop's default, 0.08 (dataset/imagenet.py)."""
    optimizer: str = "sgd"
    """SGD with momentum (official train_student.py)."""
    base_lr: float = 0.2
    """0.05 at batch 64 (official ``--learning_rate``), i.e. 0.2 per 256 images in the harness's scaling."""
    weight_decay: float = 5e-4
    """Official ``--weight_decay``."""
    momentum: float = 0.9
    """Official ``--momentum``."""
    warmup_epochs: int = 0
    """No warm-up (official train_student.py)."""
    epochs: int = 240
    """Official ``--epochs`` (CIFAR-100)."""
    batch_size: int = 64
    """Official ``--batch_size``, on one GPU."""
    sync_batchnorm: bool = False
    """The official code trains on one GPU."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64; the
# figures are `selfsup train crd` k-NN top-1, random init 0.839; the teacher is the digits SimCLR run, 0.881):
# - nce_k 512: N / M = 0.36, about CIFAR-100's 16384 / 50000 = 0.33, so that h's prior odds N / M are as in
#   the paper's main setting (16,384 negatives would be 11 draws of every image a step);
# - embed_bn: the small CNN's pooled ReLU features are nearly parallel (mean cosine between images 0.92 for
#   the SimCLR teacher, 0.99 at random init); the linear heads keep them so, the memories fill with nearly
#   equal entries (cosine 0.98) and L_crd stays at its collapsed value 2 (log 513 + 512 log(1 + 1/512)) = 14.5
#   for all 330 steps, whatever tau (0.07, 0.2), N (512, 4096) or weight decay (5e-4, 0): k-NN 0.983 with or
#   without the teacher, all of it from CE. Centring the features first lets the critic learn (the heads
#   alone on the teacher's features: L_crd 14.3 -> 3.2 in 15 epochs, memory cosine 0.06, instead of staying
#   at 14.3, memory cosine 0.999). With it L_crd ends at 4.8 (cosine of g^S(S_i) and g^T(T_i) 0.47) and k-NN
#   is 0.972 with the SimCLR teacher, 0.967 with the random one (the student is pulled towards a teacher
#   weaker than its own supervised features, so the working critic costs k-NN against CE alone);
# everything else is the official CIFAR-100 setting (base_lr 0.2 gives the official 0.05 at batch 64).
PRESETS = {"small": dict(nce_k=512, embed_bn=True)}


# --- augmentations (official dataset/cifar100.py: crop + flip) -------------------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view, seen by the teacher and the student alike: a crop and a flip (the CIFAR recipe, the crop
    approximated, see Deviations). Takes a PIL image or a uint8 tensor."""
    return [
        v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])
    ]


# --- heads -----------------------------------------------------------------------------------------


def embed_head(in_dim: int, cfg: Config) -> nn.Module:
    """g: one Linear to feat_dim (official Embed; the L2 norm follows in forward), after a BN without affine
    when ``embed_bn`` (not in the paper, see PRESETS)."""
    linear = nn.Linear(in_dim, cfg.feat_dim)
    return nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), linear) if cfg.embed_bn else linear


# --- distributed helpers (no gradient: memories and Z are constants of the loss) ---------------------


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank, concatenated along dim 0 in rank order, without gradient; x when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# --- negatives, losses and the memories -----------------------------------------------------------------


@torch.no_grad()
def draw_negatives(
    label: torch.Tensor, k: int, memory_label: torch.Tensor | None, num_samples: int
) -> torch.Tensor:
    """(N, k) indices into the memories, uniform with replacement: over all images (memory_label None, or an
    anchor label < 0), else over the images whose recorded label differs from the anchor's (-1: not seen yet,
    counts as another class). Made from this rank's rows of an (N_global, k) draw. label: (N,)."""
    world, rank = _world()
    n = label.shape[0]
    u = torch.rand(world * n, k, device=label.device)[rank * n : (rank + 1) * n]  # (N, k) in [0, 1)
    if memory_label is None:
        return (u * num_samples).long().clamp_(max=num_samples - 1)
    order = torch.argsort(memory_label, stable=True)  # (M,) images grouped by label
    grouped = memory_label[order]
    start = torch.searchsorted(grouped, label)  # (N,) first image of the anchor's class in `order`
    same = torch.searchsorted(grouped, label, right=True) - start  # (N,) images of the anchor's class
    same = torch.where((label >= 0) & (same < num_samples), same, 0)  # no label or one class only: all images
    allowed = (num_samples - same)[:, None]  # (N, 1)
    pos = torch.minimum((u * allowed).long(), allowed - 1)  # (N, k) rank among the allowed images
    pos = pos + torch.where(pos >= start[:, None], same[:, None], 0)  # skip the anchor's class block
    return order[pos]


def scores(anchor: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """anchor . memory entries: anchor (N, D) unit embeddings, memory (M, D), idx (N, 1 + k) with the positive
    in column 0. Returns (N, 1 + k); no gradient flows into the memory."""
    return torch.bmm(memory.detach()[idx], anchor.unsqueeze(2)).squeeze(2)  # (N, 1+k, D) x (N, D, 1)


def nce_loss(s: torch.Tensor, z, temperature: float, num_samples: int) -> torch.Tensor:
    """L_dir of one direction (Eq. 18; official ContrastLoss) averaged over the batch. s: (N, 1 + k) scores
    with the positive in column 0; z: the normaliser Z (1 gives the paper's h); num_samples: M (P_n = 1/M)."""
    k = s.shape[1] - 1
    log_z = torch.as_tensor(z, dtype=torch.float64, device=s.device).log()
    # h = P / (P + k P_n) = sigmoid(a), a = s / tau - log Z - log(k / M)
    # -log h = softplus(-a), -log(1 - h) = softplus(a): exact and stable
    a = s / temperature - (log_z + math.log(k / num_samples))  # (N, 1+k)
    return (F.softplus(-a[:, 0]) + F.softplus(a[:, 1:]).sum(dim=1)).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """rho^2 KL(softmax(z^T / rho) || softmax(z^S / rho)) averaged over the batch (official DistillKL).
    student_logits, teacher_logits: (N, C)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


@torch.no_grad()
def estimate_z(s: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """Z = M mean exp(s / tau) over all N (1 + k) scores of the global batch, positives included (official
    ContrastMemory). s: (N, 1 + k). A float64 scalar, identical on every rank."""
    e = (s.double() / temperature).exp()
    stats = torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)])
    if _world()[0] > 1:
        dist.all_reduce(stats)
    return num_samples * stats[0] / stats[1]


@torch.no_grad()
def update_bank(bank: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(m bank[i] + (1 - m) x_i) at the rows ``index`` (N,), in place; x: (N, D)."""
    v = momentum * bank[index] + (1 - momentum) * x.to(bank.dtype)  # (N, D)
    bank.index_copy_(0, index, F.normalize(v, dim=1))


def random_memory(num_samples: int, dim: int, device) -> torch.Tensor:
    """(M, D) unit random vectors, drawn as the official ContrastMemory draws them, then normalised."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return F.normalize(torch.rand(num_samples, dim, device=device) * 2 * stdv - stdv, dim=1)


# --- the teacher checkpoint -------------------------------------------------------------------------


class TeacherCheckpointError(ValueError):
    """A teacher checkpoint that cannot be used; the message names the file and what is wrong."""


def read_state(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``: a bare one, or the ``model`` entry of a selfsup run checkpoint
    (``checkpoints/last.pt``: model, optimizer, scaler, step). weights_only: the file cannot run code."""
    where = f"teacher_checkpoint {path}"
    if not os.path.isfile(path):
        raise TeacherCheckpointError(f"{where}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler refused a class: an object, not a tensor
            raise TeacherCheckpointError(
                f"{where}: holds objects other than tensors and plain containers, which "
                "only pickle could rebuild (and pickle can run code); nothing was loaded"
            ) from None
        raise TeacherCheckpointError(
            f"{where}: corrupted, truncated or not a torch checkpoint (UnpicklingError)"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        raise TeacherCheckpointError(
            f"{where}: corrupted, truncated or not a torch checkpoint ({type(e).__name__})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state:
        state = state["model"]  # a selfsup run checkpoint
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise TeacherCheckpointError(
            f"{where}: neither a state_dict (names to tensors) nor a selfsup run checkpoint"
        )
    return state


def select_weights(
    state: dict, module: nn.Module, prefix: str, field: str, what: str, path: str, bare_ok: bool
) -> dict:
    """The entries of ``state`` for ``module``: those under ``prefix`` (stripped; the Config ``field`` sets
    it), or, if no key has the prefix and ``bare_ok``, ``state`` itself (a bare state_dict). Names and shapes
    must match the module's."""
    own = module.state_dict()
    sub, where = {k[len(prefix) :]: v for k, v in state.items() if prefix and k.startswith(prefix)}, prefix
    if not sub and bare_ok:
        sub, where = state, ""
    missing = [k for k in own if k not in sub]
    if missing:
        found = sorted({k[: -len(missing[0])] for k in state if k.endswith(missing[0]) and k != missing[0]})
        hint = f"; it has them under {', '.join(map(repr, found))}: set {field}" if found else ""
        bare = " nor as a bare state_dict" if bare_ok else ""
        raise TeacherCheckpointError(
            f"teacher_checkpoint {path}: no {what} weights under {prefix!r}{bare} "
            f"({len(missing)} missing, e.g. {where}{missing[0]}){hint}"
        )
    unexpected = [k for k in sub if k not in own]
    if unexpected:
        raise TeacherCheckpointError(
            f"teacher_checkpoint {path}: {where}{unexpected[0]} and {len(unexpected) - 1} "
            f"other keys are not in the {what} (a different backbone?)"
        )
    for k, v in own.items():
        if sub[k].shape != v.shape:
            raise TeacherCheckpointError(
                f"teacher_checkpoint {path}: {where}{k} has shape {tuple(sub[k].shape)}, the "
                f"{what} expects {tuple(v.shape)} (a different backbone, width or class count?)"
            )
    return sub


# --- model ----------------------------------------------------------------------------------------


class CRD(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        if cfg.negatives not in ("other_classes", "uniform"):
            raise ValueError(f"negatives must be 'other_classes' or 'uniform', got {cfg.negatives!r}")
        if not cfg.uses_labels and cfg.ce_weight > 0:
            raise ValueError(
                "ce_weight > 0 needs labels: set uses_labels=true, or ce_weight=0 for the label-free term"
            )
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        # the teacher: the student's architecture, frozen and in eval mode
        self.teacher = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.embed_s = embed_head(feature_dim, cfg)  # g^S (official Embed: linear, then L2 norm in forward)
        self.embed_t = embed_head(feature_dim, cfg)  # g^T, trained although the teacher is frozen
        self.classifier: nn.Linear | None = None  # W, sized in setup()
        self.teacher_classifier: nn.Linear | None = None  # the teacher's, for KD only (kd_weight > 0)
        self.register_buffer("student_memory", torch.empty(0, cfg.feat_dim))  # (M, D), sized in setup()
        self.register_buffer("teacher_memory", torch.empty(0, cfg.feat_dim))  # (M, D)
        self.register_buffer("memory_label", torch.empty(0, dtype=torch.long))  # (M,), -1 until seen
        # Z of the (student-anchor, teacher-anchor) directions; < 0: not estimated yet
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))
        self._z_known = False  # caches "z >= 0" so that the check does not read the device every step

    def setup(self, num_samples: int, num_classes: int) -> None:
        """The classifier, both memories (unit random vectors), their labels, then the teacher weights."""
        cfg, device = self.cfg, self.z.device
        self.classifier = nn.Linear(self.feature_dim, num_classes).to(device)
        if cfg.kd_weight > 0:
            head = nn.Linear(self.feature_dim, num_classes)
            self.teacher_classifier = head.to(device).requires_grad_(False)
        self.student_memory = random_memory(num_samples, cfg.feat_dim, device)
        self.teacher_memory = random_memory(num_samples, cfg.feat_dim, device)
        self.memory_label = torch.full((num_samples,), -1, dtype=torch.long, device=device)
        if cfg.teacher_checkpoint:
            self.load_teacher(cfg.teacher_checkpoint)
        else:
            warnings.warn(
                "crd: no teacher_checkpoint set; the teacher is its random initialisation (the student's "
                "initial weights), which is for smoke runs only",
                stacklevel=2,
            )

    def load_teacher(self, path: str) -> None:
        """The teacher backbone (for KD also its classifier) from ``path``; errors name the file and why."""
        state = read_state(path)
        backbone = select_weights(
            state, self.teacher, self.cfg.teacher_prefix, "teacher_prefix", "backbone", path, True
        )
        self.teacher.load_state_dict(backbone)
        if self.teacher_classifier is not None:
            what = "teacher classifier (kd_weight > 0)"
            prefix = self.cfg.teacher_classifier_prefix
            field = "teacher_classifier_prefix"
            head = select_weights(state, self.teacher_classifier, prefix, field, what, path, False)
            self.teacher_classifier.load_state_dict(head)

    def train(self, mode: bool = True) -> CRD:
        super().train(mode)
        self.teacher.eval()  # frozen: BN keeps the teacher's statistics (official train_distill)
        return self

    def forward(self, batch: dict) -> dict:
        if self.classifier is None:
            raise RuntimeError(
                "CRD: call setup(num_samples, num_classes) to build the classifier and memories first"
            )
        cfg, m = self.cfg, self.student_memory.shape[0]
        x, index, label = batch["views"][0], batch["index"], batch["label"]  # (N, C, H, W), (N,), (N,)
        h_s = self.backbone(x)  # (N, F) S, the penultimate features
        with torch.no_grad():
            h_t = self.teacher(x)  # (N, F) T
        with torch.autocast(x.device.type, enabled=False):  # scores and the loss in float32
            f_s = F.normalize(self.embed_s(h_s.float()), dim=1)  # (N, D) g^S(S)
            f_t = F.normalize(self.embed_t(h_t.float()), dim=1)  # (N, D) g^T(T)
            labels = self.memory_label if cfg.negatives == "other_classes" else None
            idx = torch.cat([index[:, None], draw_negatives(label, cfg.nce_k, labels, m)], dim=1)  # (N, 1+k)
            s_student = scores(f_s, self.teacher_memory, idx)  # (N, 1+k) student anchor, teacher memory
            s_teacher = scores(f_t, self.student_memory, idx)  # (N, 1+k) teacher anchor, student memory
            if not self._z_known:
                if self.z[0] < 0:  # the first batch: estimate Z per direction, then keep it fixed
                    z = [estimate_z(s, cfg.temperature, m) for s in (s_student, s_teacher)]
                    self.z.copy_(torch.stack(z))
                self._z_known = True
            l_student = nce_loss(s_student, self.z[0], cfg.temperature, m)
            l_teacher = nce_loss(s_teacher, self.z[1], cfg.temperature, m)
            crd = l_student + l_teacher  # L_crd
            logits = self.classifier(h_s.float())  # (N, classes)
            loss = cfg.crd_weight * crd
            out = {"crd": crd.detach(), "crd_student": l_student.detach(), "crd_teacher": l_teacher.detach()}
            if cfg.ce_weight > 0:
                ce = F.cross_entropy(logits, label)
                loss = loss + cfg.ce_weight * ce
                out["ce"] = ce.detach()
            if cfg.kd_weight > 0:
                kd = kd_loss(logits, self.teacher_classifier(h_t.float()), cfg.kd_temperature)
                loss = loss + cfg.kd_weight * kd
                out["kd"] = kd.detach()
        # after the scores, without gradient, from the global batch: every rank's memories stay the same
        index_all = concat_all_gather(index)
        update_bank(self.student_memory, index_all, concat_all_gather(f_s.detach()), cfg.memory_momentum)
        update_bank(self.teacher_memory, index_all, concat_all_gather(f_t.detach()), cfg.memory_momentum)
        self.memory_label.index_copy_(0, index_all, concat_all_gather(label))
        with torch.no_grad():
            out["pos_sim"] = (f_s * f_t).sum(dim=1).mean()  # cosine of g^S(S_i) and g^T(T_i)
        return {"loss": loss, **out}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The student's penultimate features S (they feed both its classifier and g^S)."""
        return self.backbone(x)


MODEL = CRD


if __name__ == "__main__":
    m, k, t = 1000, 64, 0.07
    memory = F.normalize(torch.randn(m, 128), dim=1)
    f, index = F.normalize(torch.randn(8, 128), dim=1), torch.arange(8)
    idx = torch.cat([index[:, None], torch.randint(m, (8, k))], dim=1)
    z = estimate_z(scores(f, memory, idx), t, m)
    random, aligned = scores(f, memory, idx), scores(memory[:8], memory, idx)  # aligned: anchor = its entry
    print("NCE random:", nce_loss(random, z, t, m).item(), "aligned:", nce_loss(aligned, z, t, m).item())
