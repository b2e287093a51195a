"""Typed, frozen run configuration parsed once from YAML; errors name the key path and what is allowed.

A config file mirrors :class:`RunConfig`: sections ``data``, ``model``, ``optimizer``, ``train``,
``monitor`` and ``output``; every key is optional and defaults to the embedded-digits MLP run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re
import string
import types
import typing
import warnings
from collections.abc import Callable
from typing import Any, Literal

import yaml

from ntkcv.data import DATASET_INFO, training_examples


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key path."""


class ConfigWarning(UserWarning):
    """A config value that works but may not do what was meant; the message names the key path."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "mnist", "fashion_mnist", "cifar10"] = "digits"
    path: str | None = None  # directory with the standard files, for mnist / fashion_mnist / cifar10
    train_size: int | None = None  # subsample the training set (None: all)
    test_size: int | None = None
    probe_size: int = 256  # probe inputs for the NTK, drawn class-balanced from the training set
    probe_set: Literal["subset", "train"] = "subset"  # "train": probe the NTK on the whole training set instead
    subset_seed: int | None = None  # seeds only the train_size draw (None: data.seed); split and test set keep theirs
    indices: tuple[int, ...] | None = None  # train on exactly these rows of the full training split (no train_size)
    # seeds the data: the split, the subsamples, the synthetic draw (None: train.seed); set it to vary train.seed (the
    # initialisation, the batch order, the probes) on the same training and test sets
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mlp", "cnn", "transformer"] = "mlp"
    widths: tuple[int, ...] = (128, 128)  # mlp hidden widths; cnn dense hidden widths
    channels: tuple[int, ...] = (16, 32)  # cnn convolution channels
    activation: Literal["tanh", "relu", "gelu", "sigmoid", "erf"] = "tanh"
    parameterization: Literal["standard", "ntk"] = "standard"  # mlp only; "ntk": see ntkcv.zoo.MLP
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
    batch_size: int | Literal["full"] = 64  # "full": every step on the whole training set (full-batch gradient descent)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    seed: int = 0
    eval_every: int = 100


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    enabled: bool = True  # false: record the training scalars only, no NTK (the overhead benchmark's baseline)
    every_steps: int = 50
    log_spaced: int = 0  # extra log-spaced steps in [1, steps] (0: none)
    cvs: tuple[str, ...] = ("entropy", "effective_entropy", "trace", "target_alignment")
    # the NTK's probe sets: "train" (data.probe_size training examples, or all with data.probe_set "train") and
    # "test" (data.probe_size test examples); with two, CVs are cv/<set>/<name>, with one cv/<name>
    probe_sets: tuple[Literal["train", "test"], ...] = ("train", "test")
    drift: bool = True  # relative_distance and cosine_distance to the first firing's kernel, and kernel_velocity
    cross: bool = False  # the test × train cross kernel's frobenius_norm and target_alignment (both probe sets)
    layers: bool = False  # a kernel per layer (Θ = Σ_l Θ_l) and its layer_cvs, as cv/[<set>/]layer/<layer>/<name>
    layer_cvs: tuple[str, ...] = ("trace_share", "entropy")
    layer_weight_metrics: bool = False  # weight-spectrum metrics of every layer, as weights/<layer>/<metric>
    trace_axes: tuple[int, ...] = (-1,)
    implementation: Literal["auto", "jacobian", "ntvp", "structured"] = "auto"
    matrix_free: bool | Literal["auto"] = False  # "auto": the cheaper of exact and matrix-free per probe shape
    weight_metrics: bool = True
    spectrum: bool = True
    asynchronous: bool = True  # compute CVs in a background thread; the loop never waits (false: in the loop)
    blas_threads: int | None = 1  # BLAS/LAPACK threads while the monitor computes (null: the library's setting)
    # the loss's sharpness on the step's training batch: curvature/hessian_max, ggn_max, their traces, two_over_lr
    curvature: bool = False
    # the network against its linearisation at initialisation (optimizer sgd, loss mse, data.probe_set train):
    # linearised/gap on the test probes and linearised/kernel_regression_accuracy (or _loss) of the current kernel
    linearised: bool = False
    # the distance of each probe set's kernel from the infinite-width NTK (mlp of equal widths), as
    # cv/[<set>/]infinite_width/relative_distance and .../cosine_distance
    infinite_width: bool = False
    # the network outputs whose NTK the CVs are of: the logits, or the softmax probabilities (as the networks of
    # Tovey et al. 2024 end in a softmax; the loss is still of the logits)
    outputs: Literal["logits", "softmax"] = "logits"


#: Sinks that have an ``output`` key of their own, ``true`` or ``false``, older than ``output.sinks``.
SWITCHED_SINKS = ("tensorboard", "hdf5")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/digits-mlp-{time}"  # "{time}" becomes the start time, so each run gets its own directory
    checkpoint_every: int = 200  # an orbax checkpoint after every n updates and after the last
    tensorboard: bool = True
    hdf5: bool = True
    # where the run logs: any of "tensorboard", "hdf5" (in output.dir) and "mlflow" (pip install 'ntkcv[mlflow]');
    # null: tensorboard and hdf5 as the two keys above say. A list decides, and may not contradict either key if given
    sinks: tuple[Literal["tensorboard", "hdf5", "mlflow"], ...] | None = None
    mlflow_tracking_uri: str | None = None  # null: MLflow's default, $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here
    mlflow_experiment: str | None = None  # null: $MLFLOW_EXPERIMENT_NAME, or else "ntkcv"
    progress: bool = True
    # JAX's persistent compilation cache: a rerun of the same model and shapes loads its compiled programs.
    # "auto": $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/ntkcv/jax; "off": leave JAX's setting; else a path.
    compilation_cache: str = "auto"

    @property
    def enabled_sinks(self) -> tuple[str, ...]:
        """The sinks the run writes to: ``sinks``, or (null) those that ``tensorboard`` and ``hdf5`` switch on."""
        if self.sinks is not None:
            return self.sinks
        return tuple(name for name in SWITCHED_SINKS if getattr(self, name))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    output: OutputConfig = OutputConfig()


def load_config(path: str | pathlib.Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Parse a YAML file (or the defaults when ``path`` is None), then ``overrides`` (``{"train.steps": 10}``).

    Every value is checked, alone and against the others, the data set and the models, without loading
    anything: :func:`ntkcv.train.train` then fails only on what a config cannot tell (missing or corrupt data
    files, the file system).

    Raises:
      ConfigError: naming the key path, the constraint and the value received.

    Warns:
      ConfigWarning: a recoverable choice, such as ``train.batch_size`` above the number of training examples.
    """
    raw: Any = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = read_yaml(path.read_text(), f"config file {str(path)!r}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    config = parse(RunConfig, raw, "")
    _check_ranges(config)
    examples = _check_data(config)
    _check_model(config)
    _check_monitor(config)
    _check_output(config)
    config = _resolve_sinks(config, raw.get("output") or {})
    if config.train.batch_size != "full" and config.train.batch_size > examples:
        warnings.warn(f"train.batch_size {config.train.batch_size} is larger than the {examples} training "
                      f"examples: every step trains on all {examples}", ConfigWarning, stacklevel=2)
    return config


def read_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; malformed YAML is a :class:`ConfigError` naming ``where`` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {describe_yaml_error(error)}") from None


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message in one line: what is wrong and where (line and column, from 1)."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return " ".join(str(error).split())
    context, mark = getattr(error, "context", None), getattr(error, "problem_mark", None)
    position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{position}"


# key -> (the constraint, in words, and its test); None passes where the key's type allows it, and a list's
# entries are checked one by one
_AT_LEAST_0 = ("must be at least 0", lambda v: v >= 0)
_AT_LEAST_1 = ("must be at least 1", lambda v: v >= 1)
_POSITIVE = ("must be positive", lambda v: v > 0)
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "data.probe_size": _AT_LEAST_1,
    "data.subset_seed": _AT_LEAST_0,
    "data.seed": _AT_LEAST_0,
    "model.widths": _AT_LEAST_1,
    "model.channels": _AT_LEAST_1,
    "model.dim": _AT_LEAST_1,
    "model.depth": _AT_LEAST_1,
    "model.heads": _AT_LEAST_1,
    "optimizer.learning_rate": _POSITIVE,
    "optimizer.warmup_steps": _AT_LEAST_0,
    "optimizer.decay_rate": _POSITIVE,
    "optimizer.momentum": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.weight_decay": _AT_LEAST_0,
    "train.steps": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.seed": _AT_LEAST_0,
    "train.eval_every": _AT_LEAST_1,
    "monitor.every_steps": _AT_LEAST_1,
    "monitor.log_spaced": _AT_LEAST_0,
    "monitor.blas_threads": _AT_LEAST_1,
    "output.checkpoint_every": _AT_LEAST_1,
}


def _check_ranges(config: RunConfig) -> None:
    for dotted, (constraint, test) in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        optional = type(None) in typing.get_args(typing.get_type_hints(type(getattr(config, section)))[key])
        entries = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, entry in entries:
            if entry is not None and not isinstance(entry, str) and not test(entry):
                where = dotted if i is None else f"{dotted}[{i}]"
                raise ConfigError(f"{where} {constraint}{' or null' if optional else ''}, got {entry!r}")


def _check_data(config: RunConfig) -> int:
    """Checks the data keys against what is known of the data set; returns the number of training examples."""
    data = config.data
    try:
        examples = training_examples(data.name, path=data.path, train_size=data.train_size,
                                     test_size=data.test_size, subset_seed=data.subset_seed, indices=data.indices)
    except ValueError as error:  # its messages start with the argument's name
        raise ConfigError(f"data.{error}") from None
    if data.probe_set == "subset" and data.probe_size > examples:
        raise ConfigError(f"data.probe_size must be at most {examples} (the training examples) or data.probe_set "
                          f"'train', got {data.probe_size}")
    if config.train.loss == "cross_entropy" and DATASET_INFO[data.name].task == "regression":
        raise ConfigError(f"train.loss must be 'mse' for data set {data.name!r}, a regression task; got "
                          "'cross_entropy'")
    return examples


def _check_model(config: RunConfig) -> None:
    model, data = config.model, config.data
    if model.parameterization != "standard" and model.kind != "mlp":
        raise ConfigError(f"model.parameterization {model.parameterization!r} needs model.kind 'mlp' (the others "
                          f"have the standard parameterisation only); got {model.kind!r}")
    if model.kind == "cnn":
        shape = DATASET_INFO[data.name].input_shape
        if len(shape) != 3:
            raise ConfigError(f"model.kind 'cnn' needs images, and data set {data.name!r} has inputs of shape "
                              f"{shape}; choose one of 'mlp', 'transformer'")
        if not model.channels:
            raise ConfigError("model.channels must hold at least one channel count for model.kind 'cnn', got []")
        stages = min(shape[:2]).bit_length() - 1  # each conv/pool stage halves the image
        if len(model.channels) > stages:
            raise ConfigError(f"model.channels must have at most {stages} entries for the {shape[0]}×{shape[1]} "
                              f"images of data set {data.name!r} (each stage halves them); got "
                              f"{list(model.channels)}")
    if model.kind == "transformer" and model.dim % model.heads:
        raise ConfigError(f"model.heads must divide model.dim ({model.dim}), got {model.heads}")


def _check_monitor(config: RunConfig) -> None:
    from ntkcv.cv.collect import CLASSWISE, REQUIREMENTS
    from ntkcv.measurement import ESTIMABLE, NAMES
    from ntkcv.ntk.layout import make_layout

    monitor, data = config.monitor, config.data
    regression = DATASET_INFO[data.name].task == "regression"
    for key, names, allowed in (("cvs", monitor.cvs, NAMES),
                                ("layer_cvs", monitor.layer_cvs,
                                 ("trace_share", *(n for n in REQUIREMENTS if REQUIREMENTS[n] != "reference")))):
        for i, cv in enumerate(names):
            if cv not in allowed:
                raise ConfigError(f"monitor.{key}[{i}] must be one of {', '.join(map(repr, allowed))}; got {cv!r}")
            if cv in CLASSWISE and regression:
                raise ConfigError(f"monitor.{key}[{i}] {cv!r} needs class labels, and data set {data.name!r} is a "
                                  "regression task")
    if monitor.matrix_free is True:
        for i, cv in enumerate(monitor.cvs):
            if cv not in ESTIMABLE:
                raise ConfigError(f"monitor.cvs[{i}] must be one of {', '.join(map(repr, ESTIMABLE))} with "
                                  f"monitor.matrix_free true (set it to false or 'auto' for the others); got {cv!r}")
        for key in ("drift", "cross", "layers"):
            if getattr(monitor, key):
                raise ConfigError(f"monitor.{key} must be false with monitor.matrix_free true (the estimators give "
                                  "entropy and trace only)")
    if not monitor.probe_sets or len(set(monitor.probe_sets)) != len(monitor.probe_sets):
        raise ConfigError(f"monitor.probe_sets must name each of its sets ('train', 'test') once; got "
                          f"{list(monitor.probe_sets)}")
    test_examples = data.test_size or DATASET_INFO[data.name].test_examples
    if "test" in monitor.probe_sets and data.probe_size > test_examples:
        raise ConfigError(f"data.probe_size must be at most {test_examples} (the test examples) with the probe set "
                          f"'test' in monitor.probe_sets, got {data.probe_size}")
    if monitor.cross and set(monitor.probe_sets) != {"train", "test"}:
        raise ConfigError(f"monitor.cross needs monitor.probe_sets [train, test]; got {list(monitor.probe_sets)}")
    if monitor.cross and tuple(monitor.trace_axes) == ():
        raise ConfigError("monitor.cross needs a traced kernel: monitor.trace_axes [-1], not []")
    if monitor.outputs == "softmax" and regression:
        raise ConfigError(f"monitor.outputs 'softmax' needs class outputs, and data set {data.name!r} is a regression "
                          "task; use 'logits'")
    if monitor.linearised:
        if set(monitor.probe_sets) != {"train", "test"} or data.probe_set != "train":
            raise ConfigError("monitor.linearised needs monitor.probe_sets [train, test] and data.probe_set 'train' "
                              "(the linearised model is trained on the training set the kernel is measured on)")
        if config.optimizer.name != "sgd" or config.train.loss != "mse":
            raise ConfigError(f"monitor.linearised needs optimizer.name 'sgd' and train.loss 'mse' (the linearised "
                              f"model follows gradient descent on the MSE loss); got {config.optimizer.name!r} and "
                              f"{config.train.loss!r}")
    if monitor.infinite_width:
        model = config.model
        if model.kind != "mlp" or len(set(model.widths)) != 1:
            raise ConfigError(f"monitor.infinite_width needs model.kind 'mlp' with equal model.widths (the "
                              f"infinite-width limit of one width); got {model.kind!r} with widths "
                              f"{list(model.widths)}")
        if tuple(monitor.trace_axes) == ():
            raise ConfigError("monitor.infinite_width needs the output-traced kernel: monitor.trace_axes [-1], not []")
        if monitor.outputs != "logits":
            raise ConfigError("monitor.infinite_width compares the NTK of the logits: monitor.outputs must be 'logits'")
    try:
        make_layout((1, 1), monitor.trace_axes)  # checked as ntk_fn checks it on the models' (N, C) outputs
    except ValueError:
        raise ConfigError(f"monitor.trace_axes must be [], [1] or [-1] (the models' outputs are (N, C), axis 0 "
                          f"the batch); got {list(monitor.trace_axes)}") from None


def _check_output(config: RunConfig) -> None:
    template = config.output.dir
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise ConfigError(f"output.dir {template!r} is not a valid template ({error}); write {{{{ and }}}} for "
                          "literal braces") from None
    for field in fields:
        if field != ("time", "", None):
            raise ConfigError(f"output.dir may hold only the field {{time}} (the start time), got {template!r}; "
                              "write {{ and }} for literal braces")


def _resolve_sinks(config: RunConfig, given: dict[str, Any]) -> RunConfig:
    """Checks ``output.sinks`` against the switches ``output.tensorboard`` and ``output.hdf5`` (those keys in
    ``given``, the raw ``output`` section), and sets the switches as the list says."""
    output = config.output
    sinks = output.sinks
    if sinks is None:
        return config
    if len(set(sinks)) != len(sinks):
        raise ConfigError(f"output.sinks must name each sink once, got {list(sinks)}")
    for name in SWITCHED_SINKS:
        if name in given and getattr(output, name) != (name in sinks):
            listed = f"lists {name!r}" if name in sinks else f"leaves {name!r} out"
            raise ConfigError(f"output.{name} is {str(getattr(output, name)).lower()} but output.sinks {list(sinks)} "
                              f"{listed}: drop output.{name} (output.sinks decides)")
    if "mlflow" in sinks and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("output.sinks lists 'mlflow', which needs MLflow: pip install 'ntkcv[mlflow]'")
    switches = {name: name in sinks for name in SWITCHED_SINKS}
    return dataclasses.replace(config, output=dataclasses.replace(output, **switches))


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


_DECIMAL = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # YAML 1.2's numbers


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
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # X | None: X's own error
            return _value(alternatives[0], value, where)
        reasons = []
        for alternative in alternatives:
            try:
                return _value(alternative, value, where)
            except ConfigError as error:  # "must be …, got X": the constraint, and the value once at the end
                reasons.append(re.split(r"[,;] got ", str(error).removeprefix(f"{where} "))[0])
        raise ConfigError(f"{where} {' or '.join(reasons)}; got {value!r}")
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
        if isinstance(value, str) and _DECIMAL.fullmatch(value):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r} (YAML reads an unquoted off, no, on, yes as "
                              "a boolean: quote it, e.g. 'off')")
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
