"""A sweep's specification: a base run config and a grid of overrides, expanded into validated runs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import yaml

from ntkcv.config import ConfigError, RunConfig, flatten, load_config, set_dotted


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A grid of training runs.

    Every run starts from ``base`` (a :class:`~ntkcv.config.RunConfig` mapping: sections ``data``,
    ``model``, ``optimizer``, ``train``, ``monitor``, ``output``), then applies one point of the cartesian
    product of ``grid`` (dotted key → values) and one entry of ``runs`` (dotted key → value). With
    ``runs`` empty the sweep is the grid alone; a key may not be both a grid key and a ``runs`` key.

    Attributes:
      name: names the sweep (and, through ``output_dir``, its folder).
      base: the run config every run starts from.
      grid: dotted key path (``"model.widths"``) → the values it takes.
      runs: explicit override mappings, each combined with every grid point.
      workers: local parallel runs, further bounded by the CPUs and by available memory / ``memory_per_run_gb``.
      memory_per_run_gb: the memory one run needs (also the Ray task's memory request).
      output_dir: the sweep's folder; ``{name}`` becomes ``name``.
    """

    name: str
    base: dict[str, Any]
    grid: dict[str, tuple]
    runs: tuple[dict[str, Any], ...] = ()
    workers: int = 2
    memory_per_run_gb: float = 1.0
    output_dir: str = "runs/sweeps/{name}"


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
      run_id: ``<label>-<hash>``: a short label from the override values and 8 hex digits of a hash of the
        overrides' parsed values, so it does not change when grid values are added or keys reordered.
      overrides: the dotted overrides of this run (its grid point and its ``runs`` entry).
      config: the validated run config (``output.progress`` off; ``output.dir`` under the sweep's folder).
    """

    run_id: str
    overrides: dict[str, Any]
    config: RunConfig


_KEYS = (*(field.name for field in dataclasses.fields(SweepConfig)), "base_config")


def load_sweep(source: str | pathlib.Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
               ) -> SweepConfig:
    """Parse a sweep from a YAML file or a mapping and validate every run it expands to.

    Keys: ``name`` (required), ``base``, ``base_config`` (a run-config YAML file merged under ``base``;
    a relative path is read from the sweep file's folder, or the working directory for a mapping),
    ``grid``, ``runs``, ``workers``, ``memory_per_run_gb``, ``output_dir``.

    Args:
      source: the YAML file, or the sweep as a mapping.
      overrides: dotted keys set before parsing, e.g. ``{"workers": 1, "base.train.steps": 50,
        "grid.train.seed": [0, 1]}`` (after ``grid.`` the rest is one grid key).

    Raises:
      ConfigError: a key is unknown or a value not allowed; the message names the key path (``base.…``,
        ``grid['model.widths'][1]``, ``runs[0]``).
    """
    folder = pathlib.Path.cwd()
    if isinstance(source, Mapping):
        raw: Any = copy.deepcopy(dict(source))
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist")
        raw, folder = yaml.safe_load(path.read_text()) or {}, path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"the sweep must be a mapping with keys {', '.join(_KEYS)}; got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _override(raw, dotted, value)
    unknown = sorted(set(raw) - set(_KEYS), key=str)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")

    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.=+-]+", name):
        raise ConfigError(f"name must be a non-empty string of letters, digits and ._=+- (it names the sweep's "
                          f"folder), got {name!r}")
    base = _mapping(raw.get("base") or {}, "base")
    if "base_config" in raw:
        base = _merged(_read_base_config(raw["base_config"], folder), base)
    grid = _mapping(raw.get("grid") or {}, "grid")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    runs = raw.get("runs") or []
    if not isinstance(runs, (list, tuple)):
        raise ConfigError(f"runs must be a list of override mappings, got {runs!r}")
    runs = [_mapping(run, f"runs[{i}]") for i, run in enumerate(runs)]
    workers = raw.get("workers", SweepConfig.workers)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    memory = raw.get("memory_per_run_gb", SweepConfig.memory_per_run_gb)
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0:
        raise ConfigError(f"memory_per_run_gb must be a positive number, got {memory!r}")
    output_dir = raw.get("output_dir", SweepConfig.output_dir)
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"output_dir must be a non-empty string, got {output_dir!r}")
    sweep = SweepConfig(name=name, base=base, grid={key: tuple(values) for key, values in grid.items()},
                        runs=tuple(runs), workers=workers, memory_per_run_gb=float(memory), output_dir=output_dir)
    expand(sweep)  # every run is valid before anything runs
    return sweep


def expand(sweep: SweepConfig) -> list[SweepRun]:
    """The sweep's runs: every grid point (in the grid's order) combined with every ``runs`` entry.

    Raises:
      ConfigError: naming the grid key, the ``runs`` entry or the base key whose value is invalid, a key
        set by both the grid and ``runs``, or two runs with the same overrides.
    """
    _run_config(sweep.base, {}, "base")
    for key, values in sweep.grid.items():
        for i, value in enumerate(values):
            _run_config(sweep.base, {key: value}, f"grid[{key!r}][{i}]")
    for i, run in enumerate(sweep.runs):
        both = sorted(set(run) & set(sweep.grid))
        if both:
            raise ConfigError(f"runs[{i}] sets {both[0]!r}, which is also a grid key; set it in one place")
        _run_config(sweep.base, run, f"runs[{i}]")

    folder = sweep.output_dir.format(name=sweep.name)
    expanded: dict[str, SweepRun] = {}
    for point in itertools.product(*sweep.grid.values()):
        for run in sweep.runs or ({},):
            overrides = {**dict(zip(sweep.grid, point, strict=True)), **run}
            config = _run_config(sweep.base, overrides, f"the run {_describe(overrides)}")
            run_id = _run_id(overrides, config)
            if run_id in expanded:
                raise ConfigError(f"two runs have the same overrides {_describe(overrides)}: remove the duplicate "
                                  "grid value or runs entry")
            output = dataclasses.replace(config.output, dir=f"{folder}/runs/{run_id}")
            expanded[run_id] = SweepRun(run_id, overrides, dataclasses.replace(config, output=output))
    return list(expanded.values())


def _run_config(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> RunConfig:
    """``base`` with ``overrides``, validated as ``load_config`` does; errors are prefixed with ``where``."""
    raw = copy.deepcopy(dict(base))
    try:
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        config = load_config(None, flatten(raw))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if not config.output.hdf5:
        raise ConfigError(f"{where}: output.hdf5 must stay true in a sweep (the results table is read from each "
                          "run's ntkcv.h5)")
    return dataclasses.replace(config, output=dataclasses.replace(config.output, progress=False))


def _run_id(overrides: Mapping[str, Any], config: RunConfig) -> str:
    values = {key: _canonical(_lookup(config, key)) for key in sorted(overrides)}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    label = "-".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in values.items())
    label = re.sub(r"[^\w.=+-]+", "_", label)[:48].strip("_.-") or "base"
    return f"{label}-{digest}"


def _lookup(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        config = getattr(config, key)
    return config


def _canonical(value: Any) -> Any:
    """The parsed value in JSON form, so ``1`` and ``1.0`` for a float key give the same run id."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(map(_short, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "cfg"
    return str(value)


def _describe(overrides: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}={value!r}" for key, value in overrides.items()) + "}"


def _override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets a dotted key of the sweep mapping; after ``grid.`` the rest is one grid key."""
    head, _, rest = dotted.partition(".")
    if head == "grid" and rest:
        raw["grid"] = {**_mapping(raw.get("grid") or {}, "grid"), rest: value}
        return
    try:
        set_dotted(raw, dotted, value)
    except ConfigError as error:
        raise ConfigError(f"override {dotted!r}: {error}") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ConfigError(f"{where} must be a mapping with string keys, got {value!r}")
    return dict(value)


def _read_base_config(value: Any, folder: pathlib.Path) -> dict[str, Any]:
    if not isinstance(value, str):
        raise ConfigError(f"base_config must be the path of a run-config YAML file, got {value!r}")
    path = folder / value
    if not path.is_file():
        raise ConfigError(f"base_config {str(path)!r} does not exist")
    return _mapping(yaml.safe_load(path.read_text()) or {}, f"base_config {str(path)!r}")


def _merged(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``under``, merging nested mappings key by key."""
    merged = dict(under)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged
