"""Evaluation and diagnostics against direct computations and known values."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup import evaluate


def knn_literal(train_x, train_y, test_x, num_classes, k, t):
    preds = []
    for q in test_x:
        sims = [float(F.cosine_similarity(q, x, dim=0)) for x in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.07), (30, 1.0)])
def test_weighted_knn_matches_literal_vote(k, t):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(30, 6, generator=g), torch.randn(12, 6, generator=g)
    train_y = torch.randint(0, 3, (30,), generator=g)
    got = evaluate.knn_classify(train_x, train_y, test_x, 3, k=k, temperature=t, chunk=5)
    assert torch.equal(got, knn_literal(train_x, train_y, test_x, 3, k, t))


def test_knn_with_k_larger_than_train_set():
    x = torch.eye(3)
    assert evaluate.knn_accuracy(x, torch.arange(3), x, torch.arange(3), 3, k=200) == 1.0


def test_rankme_known_values():
    assert evaluate.rankme(torch.eye(16)) == pytest.approx(16, rel=1e-4)
    line = torch.randn(50, 1) @ torch.randn(1, 8)
    assert evaluate.rankme(line) == pytest.approx(1.0, abs=0.01)
    s = torch.tensor([3.0, 1.0])
    p = s / s.sum()
    want = math.exp(-float((p * p.log()).sum()))
    assert evaluate.rankme(torch.diag(s)) == pytest.approx(want, rel=1e-5)


def test_alignment_and_uniformity_formulas():
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    assert evaluate.alignment(x, y) == pytest.approx(float(((xn - yn) ** 2).sum(1).mean()))
    assert evaluate.alignment(x, 3 * x) == pytest.approx(0.0, abs=1e-12)
    pairs = [float(torch.exp(-2 * ((xn[i] - xn[j]) ** 2).sum())) for i in range(20) for j in range(i + 1, 20)]
    assert evaluate.uniformity(x) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)
    # collapse: every point the same gives the worst uniformity, 0
    assert evaluate.uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-9)


def test_feature_std_sees_collapse():
    assert evaluate.feature_std(torch.ones(32, 8)) == pytest.approx(0.0, abs=1e-7)
    assert evaluate.feature_std(torch.randn(512, 64)) == pytest.approx(1 / math.sqrt(64), rel=0.1)


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    acc = evaluate.linear_probe(x[:300], y[:300], x[300:], y[300:], 4, epochs=30)
    assert acc > 0.95
    noise = torch.randn(400, 16, generator=g)
    assert evaluate.linear_probe(noise[:300], y[:300], noise[300:], y[300:], 4, epochs=30) < 0.5


def test_decoded_split_features_equal_the_per_image_transform():
    """The batched path for decoded splits at the training size is the evaluation transform, batched."""
    from selfsup import data

    ds = data.load_digits()
    split = data.Split(ds.test.labels[:40], ds.test.classes, pixels=ds.test.pixels[:40])
    per_image = data.Split(split.labels, split.classes, decode=lambda i: split.pixels[i])
    embed = lambda x: x.flatten(1)  # noqa: E731 - the features are the normalised pixels
    fast = evaluate.extract_features(embed, split, 32, ds.mean, ds.std, torch.device("cpu"))
    slow = evaluate.extract_features(embed, per_image, 32, ds.mean, ds.std, torch.device("cpu"))
    torch.testing.assert_close(fast[0], slow[0], atol=1e-6, rtol=0)
    assert torch.equal(fast[1], slow[1])


def cluster_accuracy_brute_force(pred, labels) -> float:
    """Every one-to-one map of clusters to classes tried (small cases only)."""
    import itertools

    clusters, classes = sorted(set(pred.tolist())), sorted(set(labels.tolist()))
    best = 0
    for chosen in itertools.permutations(clusters, min(len(clusters), len(classes))):
        for assigned in itertools.permutations(classes, len(chosen)):
            m = dict(zip(chosen, assigned))
            best = max(best, sum(m.get(p) == y for p, y in zip(pred.tolist(), labels.tolist())))
    return best / len(labels)


@pytest.mark.parametrize("n_clusters,n_classes,seed", [(3, 3, 0), (4, 3, 1), (2, 4, 2), (5, 5, 3)])
def test_cluster_accuracy_is_the_best_matching(n_clusters, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (30,), generator=g)
    pred = torch.where(torch.rand(30, generator=g) < 0.6, labels % n_clusters, torch.randint(0, n_clusters, (30,), generator=g))
    assert evaluate.cluster_accuracy(pred, labels) == pytest.approx(cluster_accuracy_brute_force(pred, labels))


def test_cluster_quality_known_values():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    renamed = torch.tensor([5, 5, 9, 9, 1, 1, 1])  # the same partition under other names
    assert evaluate.cluster_quality(renamed, labels) == pytest.approx({"nmi": 1.0, "ari": 1.0, "cluster_acc": 1.0})
    one = torch.zeros(7, dtype=torch.long)  # everything in one cluster: no information
    q = evaluate.cluster_quality(one, labels)
    assert q["nmi"] == pytest.approx(0.0, abs=1e-12) and q["ari"] == pytest.approx(0.0, abs=1e-12)
    assert q["cluster_acc"] == pytest.approx(3 / 7)
    split = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # one cluster per sample: only 3 can be matched
    assert evaluate.cluster_accuracy(split, labels) == pytest.approx(3 / 7)


def test_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(25)
    x = centres[labels] + 0.3 * torch.randn(100, 16, generator=g)
    pred = evaluate.kmeans_labels(x * torch.rand(100, 1, generator=g).add(0.5), 4)  # scale does not matter: cosine
    assert evaluate.cluster_quality(pred, labels)["cluster_acc"] == 1.0
