"""Reference ``flax.linen`` models built from plain config values: an MLP, a small CNN and a transformer encoder.

Every model maps a batch to ``(N, num_outputs)``, is deterministic (no dropout) and treats samples
independently (no BatchNorm), so its empirical NTK on a probe batch is well defined. Module and parameter
names follow the peer's spec (``Dense_0`` …, ``Conv_0`` …), so MLP and CNN parameters can be exchanged
with it.

Example::

    import jax, jax.numpy as jnp
    from ntkcv.zoo import make_model

    model = make_model("cnn", num_outputs=10, channels=(16, 32), widths=(64,), activation="relu")
    x = jnp.zeros((4, 28, 28, 1))
    params = model.init(jax.random.key(0), x)["params"]
    logits = model.apply({"params": params}, x)   # (4, 10)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "sigmoid": nn.sigmoid,
    "erf": jax.scipy.special.erf,
}
"""Activation functions by the names the models accept."""


NTK_WEIGHT_STD = 1.0
"""σ_w of the MLP's ``"ntk"`` parameterisation."""
NTK_BIAS_STD = 0.1
"""σ_b of the MLP's ``"ntk"`` parameterisation."""
PARAMETERIZATIONS = ("standard", "ntk")
"""The MLP's parameterisations."""


class MLP(nn.Module):
    r"""Flatten, then ``Dense(w) -> activation`` for each hidden width ``w``, then ``Dense(num_outputs)``.

    ``parameterization``:

    - ``"standard"``: Flax's ``nn.Dense`` as it is, :math:`h ↦ h W + b` with LeCun-normal :math:`W` (variance
      1/fan_in) and zero :math:`b`.
    - ``"ntk"`` (Jacot et al. 2018; neural-tangents' ``stax``): :math:`h ↦ \frac{σ_w}{\sqrt{\text{fan_in}}} h W
      + σ_b b` with :math:`W, b ∼ 𝒩(0, 1)`, :math:`σ_w` = :data:`NTK_WEIGHT_STD`, :math:`σ_b` = :data:`NTK_BIAS_STD`,
      every layer including the readout. Its empirical NTK over the ``K`` outputs tends to
      ``K · ntkcv.infinite_width_ntk(len(widths), activation, parameterization="ntk", weight_std=NTK_WEIGHT_STD,
      bias_std=NTK_BIAS_STD)`` as the widths grow. Each layer is written
      :math:`σ_b · \text{Dense}(h · σ_w / (σ_b \sqrt{\text{fan_in}}))`, which has the same outputs and the same
      gradients, so the parameters stay ``Dense_i/kernel`` and ``Dense_i/bias`` of plain ``nn.Dense`` layers and
      ``ntk_fn``'s structured implementation covers them.
    """

    widths: tuple[int, ...]
    num_outputs: int
    activation: str = "tanh"
    parameterization: str = "standard"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"mlp.parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got "
                             f"{self.parameterization!r}")
        dense = _ntk_dense if self.parameterization == "ntk" else lambda features, h: nn.Dense(features)(h)
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            x = act(dense(width, x))
        return dense(self.num_outputs, x)


def _ntk_dense(features: int, x: jax.Array) -> jax.Array:
    """One NTK-parameterised layer (see :class:`MLP`), made inside the calling module's compact method."""
    normal = nn.initializers.normal(1.0)
    scale = NTK_WEIGHT_STD / (NTK_BIAS_STD * math.sqrt(x.shape[-1]))
    return NTK_BIAS_STD * nn.Dense(features, kernel_init=normal, bias_init=normal)(x * scale)


class CNN(nn.Module):
    """``Conv(c, 3×3, 'SAME') -> activation -> 2×2 average pool`` per channel count ``c``; flatten; then an
    MLP head (hidden ``widths``, output ``num_outputs``). Inputs are images ``(N, H, W, C)``."""

    channels: tuple[int, ...]
    widths: tuple[int, ...]
    num_outputs: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"cnn expects images (N, H, W, C), got an input of shape {x.shape}")
        if min(x.shape[1:3]) < 2 ** len(self.channels):
            raise ValueError(f"cnn: {len(self.channels)} conv/pool stages halve the image {len(self.channels)} "
                             f"times, so it needs at least {2 ** len(self.channels)} pixels a side; got {x.shape}")
        act = ACTIVATIONS[self.activation]
        for c in self.channels:
            x = act(nn.Conv(c, (3, 3), padding="SAME")(x))
            # nn.avg_pool divides the window sums by a NumPy integer, which strict dtype promotion refuses
            x = nn.pool(x, 0.0, jax.lax.add, (2, 2), (2, 2), "VALID") / 4
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` with hidden width ``mlp_ratio·dim``."""

    dim: int
    heads: int
    mlp_ratio: int = 4
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim, deterministic=True)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.mlp_ratio * self.dim)(h)
        h = nn.Dense(self.dim)(ACTIVATIONS[self.activation](h))
        return x + h


class Transformer(nn.Module):
    """A small transformer encoder; tokens come from the input's shape:

    - images ``(N, H, W, C)``: ``H`` tokens (rows) of ``W·C`` features;
    - float sequences ``(N, T, F)``: as they are;
    - float vectors ``(N, F)``: ``F`` tokens of one feature;
    - integer tokens ``(N, T)``: embedded with ``nn.Embed(vocab_size, dim)`` (requires ``vocab_size``).

    Float tokens are embedded by a ``Dense(dim)``; a learned positional embedding (for the sequence length
    seen at ``init``) is added; then ``depth`` :class:`TransformerBlock` s, a final LayerNorm, the mean over
    tokens and ``Dense(num_outputs)``.
    """

    num_outputs: int
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    activation: str = "gelu"
    vocab_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jnp.integer):
            if self.vocab_size is None:
                raise ValueError(f"transformer got integer tokens of shape {x.shape}: set vocab_size to embed them")
            if x.ndim != 2:
                raise ValueError(f"transformer expects integer tokens of shape (N, T), got {x.shape}")
            tokens = nn.Embed(self.vocab_size, self.dim)(x)
        else:
            if self.vocab_size is not None:
                raise ValueError(f"transformer with vocab_size={self.vocab_size} expects integer tokens, got "
                                 f"{x.dtype} inputs")
            if x.ndim == 4:
                x = x.reshape(x.shape[:2] + (-1,))
            elif x.ndim == 2:
                x = x[..., None]
            elif x.ndim != 3:
                raise ValueError(f"transformer expects (N, H, W, C), (N, T, F) or (N, F) inputs, got {x.shape}")
            tokens = nn.Dense(self.dim)(x)
        position = self.param("pos_embedding", nn.initializers.normal(0.02), tokens.shape[1:])
        x = tokens + position[None]
        for _ in range(self.depth):
            x = TransformerBlock(self.dim, self.heads, self.mlp_ratio, self.activation)(x)
        x = nn.LayerNorm()(x).mean(axis=1)
        return nn.Dense(self.num_outputs)(x)


# kind -> (module, its options with their defaults)
_KINDS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {"widths": (128, 128), "activation": "tanh", "parameterization": "standard"}),
    "cnn": (CNN, {"channels": (16, 32), "widths": (128,), "activation": "relu"}),
    "transformer": (Transformer, {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 4, "activation": "gelu",
                                  "vocab_size": None}),
}
MODEL_KINDS = tuple(_KINDS)
"""Kinds accepted by :func:`make_model`."""


def make_model(kind: str, *, num_outputs: int, **options: Any) -> nn.Module:
    """A ``flax.linen`` model of ``kind`` (one of :data:`MODEL_KINDS`) with output ``(N, num_outputs)``.

    Options (defaults in brackets):

    - ``mlp``: ``widths`` hidden widths [(128, 128)], ``activation`` [tanh], ``parameterization`` [standard]: one
      of :data:`PARAMETERIZATIONS` (see :class:`MLP`); flattens its input.
    - ``cnn``: ``channels`` conv channels [(16, 32)] (3×3 'SAME' conv, activation, 2×2 average pool each),
      ``widths`` dense hidden widths [(128,)], ``activation`` [relu].
    - ``transformer``: ``dim`` [64], ``depth`` [2], ``heads`` [4] (must divide ``dim``), ``mlp_ratio`` [4],
      ``activation`` [gelu], ``vocab_size`` [None: float inputs; an int: integer token inputs].

    ``activation`` is one of :data:`ACTIVATIONS` (tanh, relu, gelu, sigmoid, erf).

    Raises:
      ValueError: unknown kind or option, or an option value out of range (the message names it).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")
    module, defaults = _KINDS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for model kind {kind!r}; "
                         f"allowed: {', '.join(defaults)}")
    values = {**defaults, **options}
    config: dict[str, Any] = {"num_outputs": _positive_int("num_outputs", num_outputs)}
    for name, value in values.items():
        if name in ("widths", "channels"):
            config[name] = _positive_ints(f"{kind}.{name}", value, allow_empty=name == "widths")
        elif name == "activation":
            if value not in ACTIVATIONS:
                raise ValueError(f"{kind}.activation must be one of {', '.join(ACTIVATIONS)}, got {value!r}")
            config[name] = value
        elif name == "parameterization":
            if value not in PARAMETERIZATIONS:
                raise ValueError(f"{kind}.parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got "
                                 f"{value!r}")
            config[name] = value
        elif name == "vocab_size":
            config[name] = None if value is None else _positive_int(f"{kind}.vocab_size", value)
        else:
            config[name] = _positive_int(f"{kind}.{name}", value)
    if kind == "transformer" and config["dim"] % config["heads"]:
        raise ValueError(f"transformer.heads must divide transformer.dim, got heads={config['heads']} and "
                         f"dim={config['dim']}")
    return module(**config)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_ints(name: str, value: Any, *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must hold at least one positive integer, got {value!r}")
    return tuple(_positive_int(name, v) for v in value)
