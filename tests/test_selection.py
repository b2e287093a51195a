"""RND and random training-set selection: RND prefers outliers, seeds reproduce, sizes are checked."""

import jax
import numpy as np
import pytest

from ntkcv.selection import random_select, rnd_select


@pytest.fixture(scope="module")
def cluster_and_outliers():
    """300 points in one dense Gaussian cluster (std 0.1) and 30 outliers scattered over [-2, 2]^8."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 0.1, (300, 8)), rng.uniform(-2.0, 2.0, (30, 8))]).astype(np.float32)
    return x, np.arange(len(x)) >= 300


def test_rnd_picks_far_more_outliers_than_random(cluster_and_outliers):
    x, is_outlier = cluster_and_outliers
    expected_random = is_outlier.mean()  # 30 / 330 ≈ 0.09
    for seed in range(3):
        chosen = rnd_select(x, 40, key=jax.random.key(seed))
        assert chosen.shape == (40,) and len(set(chosen.tolist())) == 40
        assert is_outlier[chosen].mean() > 4 * expected_random
        baseline = random_select(len(x), 40, key=jax.random.key(seed))
        assert is_outlier[baseline].mean() < is_outlier[chosen].mean()


def test_seeds_reproduce(cluster_and_outliers):
    x, is_outlier = cluster_and_outliers
    first = rnd_select(x, 20, key=jax.random.key(1), steps=20)
    np.testing.assert_array_equal(first, rnd_select(x, 20, key=jax.random.key(1), steps=20))
    assert not np.array_equal(first, rnd_select(x, 20, key=jax.random.key(2), steps=20))
    batched = rnd_select(x, 22, key=jax.random.key(1), steps=20, per_round=4)  # the last round is cut to 2
    assert batched.shape == (22,) and len(set(batched.tolist())) == 22
    assert is_outlier[batched].mean() > 4 * is_outlier.mean()
    again = random_select(50, 5, key=jax.random.key(3))
    np.testing.assert_array_equal(random_select(50, 5, key=jax.random.key(3)), again)


def test_candidates_restrict_the_pool(cluster_and_outliers):
    x, _ = cluster_and_outliers
    pool = np.arange(100, 200)
    for chosen in (rnd_select(x, 30, key=jax.random.key(0), candidates=pool, steps=10),
                   random_select(len(x), 30, key=jax.random.key(0), candidates=pool)):
        assert np.all((chosen >= 100) & (chosen < 200)) and len(set(chosen.tolist())) == 30
    everything = rnd_select(x[:12], 12, key=jax.random.key(0), steps=5, per_round=5)  # the last round overshoots
    assert sorted(everything.tolist()) == list(range(12))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, r"size must be an integer in \[1, 330\] \(the number of candidates\), got 0"),
    ({"size": 331}, r"in \[1, 330\].*got 331"),
    ({"size": 5, "candidates": [1, 2, 3]}, r"size must be an integer in \[1, 3\]"),
    ({"size": 2, "candidates": [1, 1, 3]}, "candidates must be distinct"),
    ({"size": 2, "candidates": [1, 330]}, r"candidates must be rows in \[0, 330\)"),
    ({"size": 2, "per_round": 0}, "per_round must be a positive integer, got 0"),
    ({"size": 2, "steps": -1}, "steps must be an integer >= 0, got -1"),
    ({"size": 2, "learning_rate": 0.0}, "learning_rate must be positive, got 0.0"),
])
def test_rnd_select_validates_its_arguments(cluster_and_outliers, kwargs, message):
    x, _ = cluster_and_outliers
    with pytest.raises(ValueError, match=message):
        rnd_select(x, key=jax.random.key(0), **kwargs)


def test_random_select_validates_size():
    with pytest.raises(ValueError, match=r"size must be an integer in \[1, 10\]"):
        random_select(10, 11, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"size must be an integer in \[1, 10\]"):
        random_select(10, True, key=jax.random.key(0))
