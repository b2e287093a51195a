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
    target = rnd_networks(data.x_train, key=jax.random.key(0)).target  # the network RND distilled
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcv.models import Model, from_linen
from ntkcv.zoo import MLP

if TYPE_CHECKING:
    import flax.linen as nn

__all__ = ["RNDNetworks", "RNDTraining", "random_select", "rnd_networks", "rnd_select"]


class RNDNetworks(NamedTuple):
    """The fixed random target network and the predictor before training, each as ``Model(apply_fn, params)``."""

    target: Model
    predictor: Model


class RNDTraining(NamedTuple):
    """What the predictor's training did in each round of :func:`rnd_select` (arrays of length ``rounds``)."""

    steps: np.ndarray
    """Adam steps taken after the round's picks."""
    loss: np.ndarray
    """The predictor's mean squared error per output on the selected set after them (see ``until_loss``)."""


def rnd_networks(
    x: np.ndarray | jax.Array,
    *,
    key: jax.Array,
    target_widths: tuple[int, ...] = (64, 64),
    predictor_widths: tuple[int, ...] = (64, 64),
    features: int = 16,
    architecture: nn.Module | None = None,
) -> RNDNetworks:
    """The target and the untrained predictor that :func:`rnd_select` with the same arguments starts from.

    Each is a tanh :class:`~ntkcv.zoo.MLP` (hidden ``target_widths`` / ``predictor_widths``, ``features``
    outputs) or, with ``architecture``, that ``flax.linen`` module; the target is initialised from the first key
    of ``jax.random.split(key)``, the predictor from the second. ``x`` (a batch of inputs) fixes the input shape.
    """
    if architecture is None:
        target, predictor = MLP(tuple(target_widths), features), MLP(tuple(predictor_widths), features)
    else:
        target = predictor = architecture
    target_key, predictor_key = jax.random.split(key)
    sample = jnp.asarray(x[:1], jnp.float32)
    return RNDNetworks(from_linen(target, target.init(target_key, sample)),
                       from_linen(predictor, predictor.init(predictor_key, sample)))


def rnd_select(
    x: np.ndarray | jax.Array,
    size: int,
    *,
    key: jax.Array,
    candidates: Sequence[int] | np.ndarray | None = None,
    target_widths: tuple[int, ...] = (64, 64),
    predictor_widths: tuple[int, ...] = (64, 64),
    features: int = 16,
    architecture: nn.Module | None = None,
    per_round: int = 1,
    steps: int = 50,
    learning_rate: float = 1e-2,
    until_loss: float | None = None,
    max_steps: int = 10_000,
    random_start: bool = False,
    with_training: bool = False,
) -> np.ndarray | tuple[np.ndarray, RNDTraining]:
    r"""Greedy RND selection of ``size`` rows of ``x`` (among ``candidates``), in the order picked.

    With target :math:`g` (a network with random, fixed weights) and predictor :math:`f_θ` (a network of the
    same kind, trained), both ``x → R^K`` (:func:`rnd_networks`: tanh MLPs with ``K = features`` outputs, or
    ``architecture``), a candidate's error is

    .. math::
       e(x) = \| f_θ(x) - g(x) \|^2 .

    Round :math:`r` adds the ``per_round`` unselected candidates with the largest :math:`e` to the
    selected set :math:`A`, then takes ``steps`` full-batch Adam steps on
    :math:`\frac{1}{|A|} \sum_{x ∈ A} e(x)`, warm-starting from the previous :math:`θ`. The first round
    scores with the untrained predictor (or, with ``random_start``, picks uniformly at random). The predictor
    is retrained after every ``per_round`` additions: ``per_round=1`` (the default) is the exact greedy rule,
    and it stays affordable because the warm-started predictor only has to absorb one new point per round;
    larger values trade fidelity (near-duplicates in one round are all added, as no retraining separated them)
    for ``per_round``-fold fewer rounds on large pools.

    With ``until_loss`` each round goes on training after its ``steps`` steps until the mean squared error per
    output on the selected set is small enough,

    .. math::
       L = \frac{1}{|A|\,K} \sum_{x ∈ A} e(x) ≤ \text{until\_loss},

    but for at most ``max_steps`` steps in all (ZnRND trains its predictor for 100 epochs after each pick, then
    on until this loss is below ``1e-3``); rounds that stop at the cap are reported by a ``RuntimeWarning`` and
    in :class:`RNDTraining`.

    The whole selection is one ``jit``-compiled loop (``lax.fori_loop`` over rounds, ``lax.while_loop`` over the
    steps with ``until_loss``); the predictor trains on a fixed-size buffer of the selected rows with zero weight
    on the slots not yet filled, so the set's growth causes no recompilation and a step costs ``O(size)``, not
    ``O(N)``. Greedy selection is nested: the first ``m`` rows of a selection of ``size`` are the selection of
    ``m`` with the same arguments.

    Args:
      x: inputs ``(N, …)`` (the MLPs flatten each row).
      size: number of rows to select, in ``[1, number of candidates]``.
      key: PRNG key for the target's and the predictor's initial weights and the random start.
      candidates: the rows allowed (default: all ``N``).
      target_widths: hidden widths of the target network.
      predictor_widths: hidden widths of the predictor network.
      features: output dimension of both networks.
      architecture: a ``flax.linen`` module used for both networks (each with its own initial weights) in place
        of the MLPs; ``target_widths``, ``predictor_widths`` and ``features`` then play no part.
      per_round: candidates added per round (between predictor updates).
      steps: Adam steps on the selected set after each round (with ``until_loss``: at least this many).
      learning_rate: Adam's learning rate.
      until_loss: after ``steps`` steps, train on until :math:`L` is at most this (``None``: ``steps`` steps).
      max_steps: with ``until_loss``, the most Adam steps a round may take (``>= steps``).
      random_start: the first round's picks are uniformly random candidates (ZnRND's random seed point).
      with_training: also return the :class:`RNDTraining` of the rounds.

    Returns:
      ``(size,)`` int64 row indices of ``x``, distinct, in the order selected; with ``with_training``, the pair
      ``(indices, RNDTraining)``.

    Raises:
      ValueError: ``size`` or ``per_round`` out of range, ``steps`` negative, ``learning_rate`` or ``until_loss``
        not positive, ``max_steps`` below ``steps`` (with ``until_loss``), ``candidates`` not distinct rows of ``x``.

    Reference: Burda, Edwards, Storkey & Klimov, "Exploration by random network distillation",
    arXiv 1810.12894; Tovey et al., arXiv 2305.00995 (RND data selection raises the NTK's collective
    variables and the test accuracy).
    """
    x = jnp.asarray(x, jnp.float32)
    allowed = _candidate_mask(len(x), candidates)
    _check_size(size, int(allowed.sum()))
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ValueError(f"per_round must be a positive integer, got {per_round!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if until_loss is not None and not until_loss > 0:
        raise ValueError(f"until_loss must be positive or None, got {until_loss!r}")
    if until_loss is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < steps):
        raise ValueError(f"max_steps must be an integer >= steps ({steps}) with until_loss, got {max_steps!r}")
    rounds = math.ceil(size / per_round)
    order, taken, loss = _rnd_order(
        x, jnp.asarray(allowed), key, rounds=rounds, per_round=per_round, steps=steps, learning_rate=learning_rate,
        until_loss=until_loss, max_steps=max_steps, random_start=bool(random_start), target_widths=tuple(target_widths),
        predictor_widths=tuple(predictor_widths), features=features, architecture=architecture)
    training = RNDTraining(np.asarray(taken, dtype=np.int64), np.asarray(loss, dtype=np.float64))
    capped = training.loss > until_loss if until_loss is not None else np.zeros(rounds, bool)
    if capped.any():
        warnings.warn(f"rnd_select: the predictor's loss stayed above until_loss={until_loss:g} after max_steps="
                      f"{max_steps} Adam steps in {int(capped.sum())} of {rounds} rounds (largest "
                      f"{training.loss.max():.3g}); raise max_steps or until_loss", RuntimeWarning, stacklevel=2)
    indices = np.asarray(order[:size], dtype=np.int64)
    return (indices, training) if with_training else indices


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


@functools.partial(jax.jit, static_argnames=("rounds", "per_round", "steps", "learning_rate", "until_loss",
                                             "max_steps", "random_start", "target_widths", "predictor_widths",
                                             "features", "architecture"))
def _rnd_order(x, allowed, key, *, rounds, per_round, steps, learning_rate, until_loss, max_steps, random_start,
               target_widths, predictor_widths, features, architecture):
    """Indices ``(rounds · per_round,)`` in the order RND picks them (the rule of :func:`rnd_select`), and per round
    the Adam steps taken and the mean squared error per output after them."""
    target, predictor = rnd_networks(x, key=key, target_widths=target_widths, predictor_widths=predictor_widths,
                                     features=features, architecture=architecture)
    target_out = target.apply_fn(target.params, x).reshape(len(x), -1)
    outputs = target_out.shape[1]
    optimizer = optax.adam(learning_rate)

    def errors(params, inputs, targets):
        return jnp.sum((predictor.apply_fn(params, inputs).reshape(len(inputs), -1) - targets) ** 2, axis=-1)

    def weighted_loss(params, inputs, targets, weights):
        return jnp.sum(weights * errors(params, inputs, targets)) / jnp.sum(weights)

    def train_step(_, state):
        params, opt_state, batch = state
        updates, opt_state = optimizer.update(jax.grad(weighted_loss)(params, *batch), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch

    def train(params, opt_state, batch):
        """``steps`` Adam steps, then (with ``until_loss``) more until the loss per output is at most ``until_loss``
        or ``max_steps`` are taken; returns the parameters, the optimiser state, the steps taken and the loss."""
        params, opt_state, _ = jax.lax.fori_loop(0, steps, train_step, (params, opt_state, batch))
        loss = weighted_loss(params, *batch) / outputs
        if until_loss is None:
            return params, opt_state, steps, loss

        def unconverged(state):
            taken, _, _, loss = state
            return (taken < max_steps) & (loss > until_loss)

        def step(state):
            taken, params, opt_state, _ = state
            params, opt_state, _ = train_step(taken, (params, opt_state, batch))
            return taken + 1, params, opt_state, weighted_loss(params, *batch) / outputs

        taken, params, opt_state, loss = jax.lax.while_loop(unconverged, step, (steps, params, opt_state, loss))
        return params, opt_state, taken, loss

    def one_round(r, state):
        params, opt_state, selected, order, taken, losses = state
        error = errors(params, x, target_out)
        if random_start:
            error = jnp.where(r == 0, jax.random.uniform(jax.random.fold_in(key, 2), error.shape), error)
        score = jnp.where(allowed & ~selected, error, -jnp.inf)
        _, picked = jax.lax.top_k(score, per_round)
        selected = selected.at[picked].set(True)
        order = jax.lax.dynamic_update_slice(order, picked, (r * per_round,))
        # train on the selected rows only: the first (r + 1) · per_round entries of ``order``
        weights = (jnp.arange(order.shape[0]) < (r + 1) * per_round).astype(x.dtype)
        batch = (x[order], target_out[order], weights)
        params, opt_state, steps_taken, loss = train(params, opt_state, batch)
        return params, opt_state, selected, order, taken.at[r].set(steps_taken), losses.at[r].set(loss)

    params = predictor.params
    state = (params, optimizer.init(params), jnp.zeros(x.shape[0], bool), jnp.zeros(rounds * per_round, jnp.int32),
             jnp.zeros(rounds, jnp.int32), jnp.zeros(rounds, x.dtype))
    return jax.lax.fori_loop(0, rounds, one_round, state)[3:]
