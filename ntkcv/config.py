"""Typed, frozen run configuration parsed once from YAML; errors name the key path and what is allowed.

A config file mirrors :class:`RunConfig`: sections ``data``, ``model``, ``optimizer``, ``train``,
``monitor`` and ``output``; every key is optional and defaults to the embedded-digits MLP run.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key path."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "mnist", "fashion_mnist", "cifar10"] = "digits"
    path: str | None = None  # directory with the standard files, for mnist / fashion_mnist / cifar10
    train_size: int | None = None  # subsample the training set (None: all)
    test_size: int | None = None
    probe_size: int = 256  # probe inputs for the NTK, drawn class-balanced from the training set
    probe_set: Literal["subset", "train"] = "subset"  # "train": probe the NTK on the whole training set instead
    subset_seed: int | None = None  # seeds only the train_size draw (None: train.seed); split and test set keep theirs
    indices: tuple[int, ...] | None = None  # train on exactly these rows of the full training split (no train_size)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mlp", "cnn", "transformer"] = "mlp"
    widths: tuple[int, ...] = (128, 128)  # mlp hidden widths; cnn dense hidden widths
    channels: tuple[int, ...] = (16, 32)  # cnn convolution channels
    activation: Literal["tanh", "relu", "gelu", "sigmoid", "erf"] = "tanh"
    dim: int = 64  # transformer width
    depth: int = 2  # transformer blocks
    heads: int = 4  # transformer attention heads


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "momentum", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    schedule: Literal["constant", "cosine", "warmup_cosine", "exponential"] = "constant"
    warmup_steps: int = 0
    decay_rate: float = 0.1  # exponential: factor reached at the last step
    momentum: float = 0.9
    weight_decay: float = 1e-4  # adamw


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    seed: int = 0
    eval_every: int = 100


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    enabled: bool = True  # false: record the training scalars only, no NTK (the overhead benchmark's baseline)
    every_steps: int = 50
    log_spaced: int = 0  # extra log-spaced steps in [1, steps] (0: none)
    cvs: tuple[str, ...] = ("entropy", "effective_entropy", "trace", "target_alignment")
    trace_axes: tuple[int, ...] = (-1,)
    implementation: Literal["auto", "jacobian", "ntvp", "structured"] = "auto"
    matrix_free: bool | Literal["auto"] = False  # "auto": the cheaper of exact and matrix-free per probe shape
    weight_metrics: bool = True
    spectrum: bool = True
    asynchronous: bool = True  # compute CVs in a background thread; the loop never waits (false: in the loop)
    blas_threads: int | None = 1  # BLAS/LAPACK threads while the monitor computes (null: the library's setting)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/digits-mlp-{time}"  # "{time}" becomes the start time, so each run gets its own directory
    checkpoint_every: int = 200  # an orbax checkpoint after every n updates and after the last
    tensorboard: bool = True
    hdf5: bool = True
    progress: bool = True
    # JAX's persistent compilation cache: a rerun of the same model and shapes loads its compiled programs.
    # "auto": $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/ntkcv/jax; "off": leave JAX's setting; else a path.
    compilation_cache: str = "auto"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    output: OutputConfig = OutputConfig()


def load_config(path: str | pathlib.Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Parse a YAML file (or the defaults when ``path`` is None), then ``overrides`` (``{"train.steps": 10}``)."""
    raw: Any = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    config = parse(RunConfig, raw, "")
    _check_ranges(config)
    return config


_AT_LEAST_ONE = ("data.probe_size", "train.steps", "train.batch_size", "train.eval_every", "monitor.every_steps",
                 "output.checkpoint_every", "model.dim", "model.depth", "model.heads")
_POSITIVE = ("optimizer.learning_rate",)


def _check_ranges(config: RunConfig) -> None:
    from ntkcv.cv import AVAILABLE

    def get(dotted):
        section, key = dotted.split(".")
        return getattr(getattr(config, section), key)

    for dotted in _AT_LEAST_ONE:
        if get(dotted) < 1:
            raise ConfigError(f"{dotted} must be at least 1, got {get(dotted)}")
    for dotted in _POSITIVE:
        if not get(dotted) > 0:
            raise ConfigError(f"{dotted} must be positive, got {get(dotted)}")
    if config.data.indices is not None:
        if config.data.train_size is not None:
            raise ConfigError(f"data.indices and data.train_size exclude each other (the indices fix the training "
                              f"set); got train_size={config.data.train_size}")
        if not config.data.indices:
            raise ConfigError("data.indices must hold at least one row index, got []")
        for i, index in enumerate(config.data.indices):
            if index < 0:
                raise ConfigError(f"data.indices[{i}] must be a row index >= 0, got {index}")
    if config.monitor.blas_threads is not None and config.monitor.blas_threads < 1:
        raise ConfigError(f"monitor.blas_threads must be at least 1 or null, got {config.monitor.blas_threads}")
    for i, name in enumerate(config.monitor.cvs):
        if name not in AVAILABLE:
            raise ConfigError(f"monitor.cvs[{i}] must be one of {', '.join(map(repr, AVAILABLE))}; got {name!r}")


def parse(cls: type, raw: Any, where: str) -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {_join(where, unknown[0])!r}; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _value(hints[name], value, _join(where, name)) for name, value in raw.items()})


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = []
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _value(alternative, value, where)
            except ConfigError as error:
                reasons.append(str(error).removeprefix(f"{where} "))
        raise ConfigError(f"{where} {' or '.join(reasons)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in the schema, not user input


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for the run's metadata and hparams)."""
    return dataclasses.asdict(config)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["train"]["steps"] = value`` for ``dotted="train.steps"``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    section = raw
    for depth, key in enumerate(parents):
        section = section.setdefault(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{'.'.join(parents[: depth + 1])} must be a mapping, got {section!r}")
    section[leaf] = value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys: ``{"train": {"steps": 5}} -> {"train.steps": 5}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
