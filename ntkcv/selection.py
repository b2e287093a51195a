r"""Training-set selection: random network distillation (RND) and uniform random selection.

RND (Burda et al., arXiv 1810.12894) scores how novel an input is by how badly a *predictor* network,
trained on the inputs seen so far, imitates a fixed random *target* network there. Used as a data selector
(Tovey et al., "Towards a phenomenological understanding of neural networks: data", arXiv 2305.00995, after
the ZnNL implementation), it builds a training set greedily: start empty; in each round score every candidate,
add the ``per_round`` unselected candidates with the largest error, then train the predictor further on
the selected set. Points unlike anything selected so far keep a large error, so the set spreads over
the input space: it prefers outliers and sparse regions to dense clusters, which a uniform draw
over-samples.

Both selectors return row indices of ``x``; pass them as ``data.indices`` to train on the selection.

Example::

    import jax
    from ntkcv.data import load_dataset
    from ntkcv.selection import random_select, rnd_select

    data = load_dataset("digits")
    chosen = rnd_select(data.x_train, 100, key=jax.random.key(0))     # (100,) int indices, greedy order
    baseline = random_select(len(data.x_train), 100, key=jax.random.key(0))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcv.zoo import MLP

__all__ = ["random_select", "rnd_select"]


def rnd_select(
    x: np.ndarray | jax.Array,
    size: int,
    *,
    key: jax.Array,
    candidates: Sequence[int] | np.ndarray | None = None,
    target_widths: tuple[int, ...] = (64, 64),
    predictor_widths: tuple[int, ...] = (64, 64),
    features: int = 16,
    per_round: int = 1,
    steps: int = 50,
    learning_rate: float = 1e-2,
) -> np.ndarray:
    r"""Greedy RND selection of ``size`` rows of ``x`` (among ``candidates``), in the order picked.

    With target :math:`g` (a tanh MLP with random, fixed weights) and predictor :math:`f_θ` (a tanh MLP of
    its own), both ``R^D → R^features`` on the flattened inputs, a candidate's error is

    .. math::
       e(x) = \| f_θ(x) - g(x) \|^2 .

    Round :math:`r` adds the ``per_round`` unselected candidates with the largest :math:`e` to the
    selected set :math:`A`, then takes ``steps`` full-batch Adam steps on
    :math:`\frac{1}{|A|} \sum_{x ∈ A} e(x)`, warm-starting from the previous :math:`θ`. The first round
    scores with the untrained predictor. The predictor is retrained after every ``per_round``
    additions: ``per_round=1`` (the default) is the exact greedy rule, and it stays affordable because
    the warm-started predictor only has to absorb one new point per round; larger values trade fidelity
    (near-duplicates in one round are all added, as no retraining separated them) for
    ``per_round``-fold fewer rounds on large pools.

    The whole selection is one ``jit``-compiled loop (``lax.fori_loop`` over rounds); the predictor trains
    on a fixed-size buffer of the selected rows with zero weight on the slots not yet filled, so the set's
    growth causes no recompilation and a step costs ``O(size)``, not ``O(N)``.

    Args:
      x: inputs ``(N, …)``; each row is flattened.
      size: number of rows to select, in ``[1, number of candidates]``.
      key: PRNG key for the target's and the predictor's initial weights.
      candidates: the rows allowed (default: all ``N``).
      target_widths: hidden widths of the target network.
      predictor_widths: hidden widths of the predictor network.
      features: output dimension of both networks.
      per_round: candidates added per round (between predictor updates).
      steps: Adam steps on the selected set after each round.
      learning_rate: Adam's learning rate.

    Returns:
      ``(size,)`` int64 row indices of ``x``, distinct, in the order selected.

    Raises:
      ValueError: ``size`` or ``per_round`` out of range, ``steps`` negative, ``learning_rate`` not positive,
        ``candidates`` not distinct rows of ``x``.

    Reference: Burda, Edwards, Storkey & Klimov, "Exploration by random network distillation",
    arXiv 1810.12894; Tovey et al., arXiv 2305.00995 (RND data selection raises the NTK's collective
    variables and the test accuracy).
    """
    x = jnp.asarray(x, jnp.float32).reshape(len(x), -1)
    allowed = _candidate_mask(len(x), candidates)
    _check_size(size, int(allowed.sum()))
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ValueError(f"per_round must be a positive integer, got {per_round!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    order = _rnd_order(x, jnp.asarray(allowed), key, rounds=math.ceil(size / per_round), per_round=per_round,
                       steps=steps, learning_rate=learning_rate, target_widths=tuple(target_widths),
                       predictor_widths=tuple(predictor_widths), features=features)
    return np.asarray(order[:size], dtype=np.int64)


def random_select(
    num_rows: int, size: int, *, key: jax.Array, candidates: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """``size`` distinct rows drawn uniformly from ``range(num_rows)`` (or from ``candidates``).

    Returns:
      ``(size,)`` int64 row indices in the order drawn.

    Raises:
      ValueError: ``size`` not in ``[1, number of candidates]``, ``candidates`` not distinct rows.
    """
    allowed = _candidate_mask(num_rows, candidates)
    _check_size(size, int(allowed.sum()))
    pool = np.flatnonzero(allowed)
    return np.asarray(jax.random.choice(key, jnp.asarray(pool), (size,), replace=False), dtype=np.int64)


def _candidate_mask(num_rows: int, candidates: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if candidates is None:
        return np.ones(num_rows, dtype=bool)
    rows = np.asarray(candidates)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"candidates must be a sequence of integer row indices, got {candidates!r}")
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"candidates must be rows in [0, {num_rows}); got {int(rows.min())} … {int(rows.max())}")
    if np.unique(rows).size != rows.size:
        raise ValueError("candidates must be distinct row indices; some are repeated")
    mask = np.zeros(num_rows, dtype=bool)
    mask[rows] = True
    return mask


def _check_size(size: int, available: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= available:
        raise ValueError(f"size must be an integer in [1, {available}] (the number of candidates), got {size!r}")


@functools.partial(jax.jit, static_argnames=("rounds", "per_round", "steps", "learning_rate", "target_widths",
                                             "predictor_widths", "features"))
def _rnd_order(x, allowed, key, *, rounds, per_round, steps, learning_rate, target_widths, predictor_widths,
               features):
    """Indices ``(rounds · per_round,)`` in the order RND picks them (the module docstring's rule)."""
    target, predictor = MLP(target_widths, features), MLP(predictor_widths, features)
    target_key, predictor_key = jax.random.split(key)
    target_out = target.apply(target.init(target_key, x[:1]), x)
    params = predictor.init(predictor_key, x[:1])
    optimizer = optax.adam(learning_rate)

    def errors(params, inputs, targets):
        return jnp.sum((predictor.apply(params, inputs) - targets) ** 2, axis=-1)

    def weighted_loss(params, inputs, targets, weights):
        return jnp.sum(weights * errors(params, inputs, targets)) / jnp.sum(weights)

    def train_step(_, state):
        params, opt_state, batch = state
        updates, opt_state = optimizer.update(jax.grad(weighted_loss)(params, *batch), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch

    def one_round(r, state):
        params, opt_state, selected, order = state
        score = jnp.where(allowed & ~selected, errors(params, x, target_out), -jnp.inf)
        _, picked = jax.lax.top_k(score, per_round)
        selected = selected.at[picked].set(True)
        order = jax.lax.dynamic_update_slice(order, picked, (r * per_round,))
        # train on the selected rows only: the first (r + 1) · per_round entries of ``order``
        weights = (jnp.arange(order.shape[0]) < (r + 1) * per_round).astype(x.dtype)
        batch = (x[order], target_out[order], weights)
        params, opt_state, _ = jax.lax.fori_loop(0, steps, train_step, (params, opt_state, batch))
        return params, opt_state, selected, order

    state = (params, optimizer.init(params), jnp.zeros(x.shape[0], bool), jnp.zeros(rounds * per_round, jnp.int32))
    return jax.lax.fori_loop(0, rounds, one_round, state)[3]
