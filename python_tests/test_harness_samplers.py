"""Samplers (docs/methods.md §1.4): empirical class frequencies follow the weights; DDP shards are disjoint."""
import math

import numpy as np
import pytest
import torch

from ltkernels.data import SAMPLER_KINDS, LTSampler, sampler_class_weights

COUNTS = [60, 30, 12, 5, 2]


def labels_of(counts):
    return [c for c, n in enumerate(counts) for _ in range(n)]


def expected_weights(kind, n, beta=0.9999, a=0.9999, b=1e-5):
    n = np.asarray(n, dtype=np.float64)
    if kind == "instance":
        return np.ones_like(n)
    if kind in ("class_balanced", "class_aware"):
        return 1 / n
    if kind == "sqrt":
        return n ** -0.5
    if kind == "effective_number":
        return (1 - beta) / (1 - beta ** n)
    d = np.log(n.max()) - np.log(n)
    dh = (d - d.min()) / (d.max() - d.min())
    bj = a + b * dh
    return (1 - bj) / (1 - bj ** n)


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_empirical_class_frequencies(kind):
    s = LTSampler(labels_of(COUNTS), kind, seed=3)
    lab = np.asarray(labels_of(COUNTS))
    draws = np.concatenate([lab[s.global_draw(e).numpy()] for e in range(200)])
    freq = np.bincount(draws, minlength=len(COUNTS)) / len(draws)
    p = np.asarray(COUNTS) * expected_weights(kind, COUNTS)
    p = p / p.sum()
    # 5 binomial standard errors
    tol = 5 * np.sqrt(p * (1 - p) / len(draws)) + 1e-3
    assert np.all(np.abs(freq - p) <= tol), (kind, freq, p)


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt", "effective_number", "cben"])
def test_weights_match_priors(kind):
    from ltkernels import priors
    ours = sampler_class_weights(COUNTS, kind)
    theirs = priors.sampler_class_weights(COUNTS, kind).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    np.testing.assert_allclose(ours, expected_weights(kind, COUNTS), rtol=1e-12)


def test_cben_thesis_range_and_equal_counts():
    w = sampler_class_weights(COUNTS, "cben", cben_a=0.999, cben_b=0.0009)
    np.testing.assert_allclose(w, expected_weights("cben", COUNTS, a=0.999, b=0.0009))
    w = sampler_class_weights([7, 7, 7], "cben")  # official code divides 0 by 0 here
    assert np.all(np.isfinite(w)) and np.allclose(w, w[0])


def test_instance_is_a_permutation():
    s = LTSampler(labels_of(COUNTS), "instance", seed=1)
    assert sorted(s.global_draw(0).tolist()) == list(range(sum(COUNTS)))


def test_class_aware_cycles_classes():
    s = LTSampler(labels_of(COUNTS), "class_aware", seed=0, class_aware_k=2)
    lab = np.asarray(labels_of(COUNTS))[s.global_draw(0).numpy()]
    # k consecutive samples share a class and every window of C*k covers all classes once per cycle
    k, C = 2, len(COUNTS)
    blocks = lab[: (len(lab) // k) * k].reshape(-1, k)
    assert (blocks == blocks[:, :1]).all()
    first_cycle = blocks[:C, 0]
    assert sorted(first_cycle.tolist()) == list(range(C))


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "class_aware"])
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_disjoint_and_cover_global_draw(kind, world):
    lab = labels_of(COUNTS)
    ref = LTSampler(lab, kind, seed=5, world_size=world)
    ref.set_epoch(4)
    glob = ref.global_draw().tolist()
    shards = []
    for r in range(world):
        s = LTSampler(lab, kind, seed=5, rank=r, world_size=world)
        s.set_epoch(4)
        shards.append(list(iter(s)))
        assert len(shards[-1]) == len(s) == math.ceil(len(lab) / world)
    # positions are disjoint: interleaving the shards rebuilds the one global draw
    rebuilt = [shards[i % world][i // world] for i in range(len(glob))]
    assert rebuilt == glob
    if kind == "instance":  # without replacement: shards are disjoint as index sets too (up to padding)
        pad = ref.total_size - len(lab)
        assert sum(len(set(a) & set(b)) for i, a in enumerate(shards) for b in shards[i + 1:]) <= pad


def test_epochs_reproducible_and_distinct():
    lab = labels_of(COUNTS)
    a, b = LTSampler(lab, "class_balanced", seed=2), LTSampler(lab, "class_balanced", seed=2)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_set_start_skips_consumed_prefix():
    s = LTSampler(labels_of(COUNTS), "sqrt", seed=0, rank=1, world_size=2)
    full = list(s)
    s.set_start(7)
    assert len(s) == len(full) - 7
    assert list(s) == full[7:]
    assert list(s) == full  # start resets after one pass


def test_bad_kind_names_allowed_values():
    with pytest.raises(ValueError, match="allowed values.*class_balanced"):
        LTSampler([0, 1], "balanced")
