"""Evaluation on frozen features, and label-free diagnostics that make collapse visible.

- [`knn_classify`][selfsup.evaluate.knn_classify]: weighted k-NN (Wu et al. 2018, Sec. 3.4): cosine
  similarities to the k nearest training features vote for their class with weight exp(s / T). Defaults k=200,
  T=0.1 (the setting of lightly's CIFAR-10 benchmark table; InstDisc used T=0.07).
- [`linear_probe`][selfsup.evaluate.linear_probe]: a linear classifier trained on frozen, standardised
  features.
- [`rankme`][selfsup.evaluate.rankme]: RankMe (Garrido et al. 2023, Eq. 1), the exponential of the entropy of
  the normalised singular values of the embedding matrix; between 1 (collapse to a line) and min(N, D).
- [`alignment`][selfsup.evaluate.alignment] and [`uniformity`][selfsup.evaluate.uniformity]: Wang & Isola
  (2020), Eqs. 4-5, on l2-normalised features.
- [`feature_std`][selfsup.evaluate.feature_std]: mean per-dimension standard deviation of l2-normalised
  features; near 0 means every sample maps to the same point.
- [`cluster_quality`][selfsup.evaluate.cluster_quality]: a clustering against the labels: NMI, ARI and
  cluster accuracy under the best one-to-one matching of clusters to classes (Hungarian algorithm), of
  k-means on the features ([`kmeans_labels`][selfsup.evaluate.kmeans_labels], k = the number of classes)
  or of a method's own assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class _Images(Dataset):
    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        return self.transform(self.split.image(i)), int(self.split.labels[i])


def eval_transform(image_size: int, mean, std):
    """Per image (a uint8 tensor or PIL image): resize, centre crop, scale to [0, 1], normalise."""
    from torchvision.transforms import v2

    # ImageNet-sized images: resize to 256/224 of the crop, then centre-crop (the standard protocol)
    resize = image_size if image_size < 128 else round(image_size * 256 / 224)
    return v2.Compose([
        v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor], split, image_size: int, mean, std, device: torch.device,
    batch_size: int = 256, num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 on the CPU and labels (N,) of a split, in index order, through
    [`eval_transform`][selfsup.evaluate.eval_transform]. Decoded splits already at ``image_size`` are only
    normalised, batched on the device."""
    labels = torch.as_tensor(split.labels)
    if split.in_memory and tuple(split.pixels.shape[-2:]) == (image_size, image_size):
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device).view(1, 3, 1, 1)
        feats = [
            embed((split.pixels[i : i + batch_size].to(device).float() / 255 - m) / s).float().cpu()
            for i in range(0, len(split), batch_size)
        ]
        return torch.cat(feats), labels
    loader = DataLoader(_Images(split, eval_transform(image_size, mean, std)), batch_size=batch_size, num_workers=num_workers)
    feats = [embed(x.to(device)).float().cpu() for x, _ in loader]
    return torch.cat(feats), labels


@torch.no_grad()
def knn_classify(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
    k: int = 200, temperature: float = 0.1, chunk: int = 1024,
) -> torch.Tensor:
    """Predicted classes (M,) for test features (M, D) by weighted k-NN on train features (N, D)."""
    k = min(k, len(train_x))
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    preds = []
    for start in range(0, len(test_x), chunk):
        sim = test_x[start : start + chunk] @ train_x.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], weights)  # (m, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    return (knn_classify(train_x, train_y, test_x, num_classes, k, temperature) == test_y).float().mean().item()


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4,
    batch_size: int = 256, seed: int = 0,
) -> float:
    """Top-1 accuracy of a linear classifier trained with AdamW on standardised frozen features."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(tx.shape[1], num_classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.zeros_(head.bias)
        torch.nn.init.normal_(head.weight, std=0.01)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(tx) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(tx), generator=g)
        for start in range(0, len(tx), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(head(tx[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(vx).argmax(1) == test_y).float().mean().item()


# --- label-free diagnostics ---------------------------------------------------------------------


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(-sum_k p_k log p_k), p_k = s_k / ||s||_1 + eps over singular values s of z (N, D)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(y)||^alpha over positive pairs (rows of x, y), on normalised features."""
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs, on normalised features."""
    x = F.normalize(x, dim=1)
    sq = torch.pdist(x.double()).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(len(sq)))


def feature_std(x: torch.Tensor) -> float:
    """Mean over dimensions of the std of normalised features (about 1/sqrt(D) when spread out)."""
    return float(F.normalize(x, dim=1).std(dim=0).mean())


def diagnostics(features: torch.Tensor, view_a: torch.Tensor | None = None, view_b: torch.Tensor | None = None) -> dict:
    out = {
        "rankme": rankme(features),
        "feature_std": feature_std(features),
        "uniformity": uniformity(features[:2000]),
    }
    if view_a is not None and view_b is not None:
        out["alignment"] = alignment(view_a, view_b)
    return out


# --- clustering against the labels ----------------------------------------------------------------


def kmeans_labels(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 10) -> torch.Tensor:
    """Cluster indices (N,) of k-means (scikit-learn's ``KMeans``, k-means++ and ``n_init`` restarts) on the
    l2-normalised features x (N, D), the geometry of the k-NN evaluation."""
    from sklearn.cluster import KMeans

    z = F.normalize(x.double(), dim=1).numpy()
    return torch.as_tensor(KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z))


def cluster_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of samples whose cluster is matched to their class, under the one-to-one matching of
    clusters to classes that maximises it (Hungarian algorithm). With more clusters than classes, the
    samples of unmatched clusters count as errors."""
    from scipy.optimize import linear_sum_assignment

    clusters = torch.unique(pred, return_inverse=True)[1]
    classes = torch.unique(labels, return_inverse=True)[1]
    counts = torch.zeros(int(clusters.max()) + 1, int(classes.max()) + 1, dtype=torch.long)
    counts.index_put_((clusters, classes), torch.ones_like(clusters), accumulate=True)  # (P, C) co-occurrences
    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    return float(counts[rows, cols].sum()) / len(labels)


def cluster_quality(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """NMI (arithmetic normalisation, scikit-learn's default), ARI and cluster accuracy of cluster indices
    pred (N,) against labels (N,)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    p, y = pred.numpy(), labels.numpy()
    return {"nmi": float(normalized_mutual_info_score(y, p)), "ari": float(adjusted_rand_score(y, p)),
            "cluster_acc": cluster_accuracy(pred, labels)}
