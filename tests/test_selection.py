"""RND and random training-set selection: RND prefers outliers, seeds reproduce, sizes are checked."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkcv.selection import random_select, rnd_networks, rnd_select
from ntkcv.zoo import CNN

pytestmark = pytest.mark.standard_dtype_promotion  # the RND predictor trains with optax's Adam


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
    ({"size": 2, "until_loss": 0.0}, "until_loss must be positive or None, got 0.0"),
    ({"size": 2, "until_loss": 1e-3, "steps": 50, "max_steps": 49},
     r"max_steps must be an integer >= steps \(50\) with until_loss, got 49"),
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


def _initial_errors(x, key, **networks):
    """e(x) = ‖f(x) − g(x)‖² of the untrained predictor, from rnd_networks, in float64."""
    target, predictor = rnd_networks(x, key=key, **networks)
    difference = (np.asarray(predictor.apply_fn(predictor.params, x), np.float64)
                  - np.asarray(target.apply_fn(target.params, x), np.float64))
    return np.sum(difference.reshape(len(x), -1) ** 2, axis=1)


@pytest.mark.parametrize("networks", [{}, {"architecture": CNN((4,), (), 8)}])
def test_rnd_networks_are_the_networks_rnd_select_scores_with(networks):
    """Without training (steps 0, and until_loss never binding) the greedy order is the untrained predictor's error,
    largest first: the ranking of ``rnd_networks``' outputs."""
    x = np.random.default_rng(1).uniform(0, 1, (60, 8, 8, 1)).astype(np.float32)
    key = jax.random.key(4)
    errors = _initial_errors(x, key, **networks)
    expected = np.argsort(-errors, kind="stable")[:12]
    assert np.all(np.diff(np.sort(errors)[::-1][:13]) < 0)  # no ties among the first picks
    np.testing.assert_array_equal(rnd_select(x, 12, key=key, steps=0, **networks), expected)
    np.testing.assert_array_equal(rnd_select(x, 12, key=key, steps=0, until_loss=1e6, **networks), expected)
    target = rnd_networks(x, key=key, **networks).target
    assert target.apply_fn(target.params, x).shape == (60, 8 if networks else 16)


def test_until_loss_trains_each_round_to_the_threshold(cluster_and_outliers):
    """One round of 12 picks: its training, redone step by step with optax, needs as many steps to reach the
    threshold (after the minimum of 5) as rnd_select reports, and ends at the reported loss per output."""
    x, _ = cluster_and_outliers
    key = jax.random.key(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the threshold is met: no warning
        chosen, training = rnd_select(x, 12, key=key, per_round=12, steps=5, max_steps=5000, until_loss=1e-3,
                                      with_training=True)
    np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(-_initial_errors(x, key))[:12]))
    target, predictor = rnd_networks(x, key=key)
    goal = target.apply_fn(target.params, x[chosen])
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        loss_fn = lambda p: jnp.mean(jnp.sum((predictor.apply_fn(p, x[chosen]) - goal) ** 2, axis=-1))  # noqa: E731
        updates, state = optimizer.update(jax.grad(loss_fn)(params), state, params)
        params = optax.apply_updates(params, updates)
        return params, state, jnp.mean((predictor.apply_fn(params, x[chosen]) - goal) ** 2)

    params, state, taken, loss = predictor.params, optimizer.init(predictor.params), 0, np.inf
    while taken < 5 or loss > 1e-3:
        params, state, loss = step(params, state)
        taken += 1
    assert 5 < training.steps[0] < 5000 and abs(int(training.steps[0]) - taken) <= 1
    assert training.loss[0] <= 1e-3 and training.loss[0] == pytest.approx(float(loss), rel=0.05)


def test_until_loss_reports_the_rounds_stopped_at_the_cap(cluster_and_outliers):
    """A cap equal to the minimum is the plain rule: the same order, every round at the cap and a warning."""
    x, _ = cluster_and_outliers
    plain = rnd_select(x, 15, key=jax.random.key(2), steps=7)
    with pytest.warns(RuntimeWarning, match=r"above until_loss=1e-12 after max_steps=7 Adam steps in 15 of 15 rounds"):
        capped, training = rnd_select(x, 15, key=jax.random.key(2), steps=7, until_loss=1e-12, max_steps=7,
                                      with_training=True)
    np.testing.assert_array_equal(capped, plain)
    assert training.steps.tolist() == [7] * 15 and np.all(training.loss > 1e-12)


def test_threshold_selection_is_deterministic_and_nested(cluster_and_outliers):
    x, is_outlier = cluster_and_outliers
    options = {"key": jax.random.key(5), "steps": 10, "max_steps": 500, "until_loss": 1e-3, "with_training": True}
    first, training = rnd_select(x, 24, **options)
    again, training_again = rnd_select(x, 24, **options)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(training.steps, training_again.steps)
    np.testing.assert_array_equal(rnd_select(x, 10, **options)[0], first[:10])  # greedy selection is nested
    assert is_outlier[first].mean() > 4 * is_outlier.mean()


def test_random_start_draws_the_first_pick_uniformly(cluster_and_outliers):
    x, _ = cluster_and_outliers
    pool = np.arange(50, 330)
    firsts = [int(rnd_select(x, 1, key=jax.random.key(seed), candidates=pool, random_start=True)[0])
              for seed in range(24)]
    greedy = [int(rnd_select(x, 1, key=jax.random.key(seed), candidates=pool)[0]) for seed in range(24)]
    assert all(50 <= first < 330 for first in firsts)
    assert np.mean(np.asarray(firsts) >= 300) < 0.35  # 30 of 280 candidates are outliers: about 0.11 expected
    assert np.mean(np.asarray(greedy) >= 300) > 0.9  # the untrained predictor's largest error: an outlier
    assert len(set(firsts)) > 18
    later = rnd_select(x, 5, key=jax.random.key(0), candidates=pool, random_start=True)
    assert later[0] == firsts[0] and len(set(later.tolist())) == 5
