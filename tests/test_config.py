"""The typed config schema: defaults, the shipped configs, and errors that name the key."""

import json
import pathlib
import sys
import warnings

import numpy as np
import pytest
import yaml

from ntkcv.config import ConfigError, ConfigWarning, RunConfig, load_config, to_dict
from ntkcv.data import DATASET_INFO, load_dataset

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_the_default_config():
    assert load_config(CONFIGS / "default.yaml") == load_config() == RunConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize("overrides, message", [
    ({"train.stepz": 1}, "unknown key 'train.stepz'; allowed keys: steps, batch_size"),
    ({"trainer": {}}, "unknown key 'trainer'; allowed keys: data, model"),
    ({"optimizer.name": "sgdd"}, "optimizer.name must be one of 'sgd', 'momentum', 'adam', 'adamw'; got 'sgdd'"),
    ({"train.steps": "many"}, "train.steps must be an integer, got 'many'"),
    ({"train.steps": 0}, "train.steps must be at least 1, got 0"),
    ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate must be positive, got -1.0"),
    ({"model.widths": [8, "a"]}, r"model.widths\[1\] must be an integer, got 'a'"),
    ({"monitor.cvs": ["entropi"]}, r"monitor.cvs\[0\] must be one of .*'entropy'.*got 'entropi'"),
    ({"output.tensorboard": "yes"}, "output.tensorboard must be true or false, got 'yes'"),
    ({"output.compilation_cache": False}, r"output\.compilation_cache must be a string, got False \(YAML reads an "
                                          r"unquoted off, no, on, yes as a boolean: quote it, e.g. 'off'\)"),
    ({"monitor.blas_threads": 0}, "monitor.blas_threads must be at least 1 or null, got 0"),
])
def test_bad_values_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_union_values_accept_each_alternative_and_name_both_on_error():
    assert load_config(None, {"monitor.matrix_free": "auto"}).monitor.matrix_free == "auto"
    assert load_config(None, {"monitor.matrix_free": True, "monitor.cvs": ["entropy"],
                              "monitor.drift": False}).monitor.matrix_free is True
    with pytest.raises(ConfigError,
                       match=r"monitor\.matrix_free must be true or false or must be one of 'auto'; got 'x'"):
        load_config(None, {"monitor.matrix_free": "x"})


def test_data_selection_keys_parse_and_default_to_todays_behaviour():
    default = load_config().data
    assert (default.probe_set, default.subset_seed, default.indices) == ("subset", None, None)
    data = load_config(None, {"data.probe_set": "train", "data.subset_seed": 7, "data.indices": [3, 1, 2],
                              "train.batch_size": 3}).data
    assert (data.probe_set, data.subset_seed, data.indices) == ("train", 7, (3, 1, 2))


@pytest.mark.parametrize("overrides, message", [
    ({"data.indices": [1, 2], "data.train_size": 2}, "data.indices and train_size exclude each other"),
    ({"data.indices": []}, r"data.indices must be a non-empty sequence of integers, got \(\)"),
    ({"data.indices": [0, -1]}, r"data.indices must be rows of the training split, in \[0, 1437\); got -1"),
    ({"data.indices": [0, 1.5]}, r"data.indices\[1\] must be an integer, got 1.5"),
    ({"data.probe_set": "test"}, "data.probe_set must be one of 'subset', 'train'; got 'test'"),
    ({"data.subset_seed": "a"}, "data.subset_seed must be an integer, got 'a'"),
])
def test_data_selection_keys_reject_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


REGRESSION = {"data.name": "synthetic", "train.loss": "mse"}


@pytest.mark.parametrize("overrides, message", [
    ({"model.widths": [8, 0]}, r"model\.widths\[1\] must be at least 1, got 0"),
    ({"model.widths": [-1]}, r"model\.widths\[0\] must be at least 1, got -1"),
    ({"model.channels": [16, -2]}, r"model\.channels\[1\] must be at least 1, got -2"),
    ({"model.kind": "cnn", "model.channels": []}, r"model\.channels must hold at least one channel count .*'cnn'"),
    ({"model.kind": "cnn", "model.channels": [4, 4, 4, 4]},
     r"model\.channels must have at most 3 entries for the 8×8 images of data set 'digits'"),
    ({**REGRESSION, "model.kind": "cnn"}, r"model\.kind 'cnn' needs images, .*'synthetic' has inputs of shape \(8,\)"),
    ({"model.kind": "transformer", "model.heads": 3}, r"model\.heads must divide model\.dim \(64\), got 3"),
    ({"data.indices": [0, 1437]}, r"data\.indices must be rows of the training split, in \[0, 1437\); got 1437"),
    ({"data.indices": [3, 3]}, "data.indices must be distinct; row 3 is repeated"),
    ({"data.train_size": 0}, "data.train_size must be a positive integer or None, got 0"),
    ({"data.train_size": 1438}, r"data\.train_size must be at most 1437 \(the examples available\), got 1438"),
    ({"data.name": "mnist", "data.path": "x", "data.train_size": 60001}, "data.train_size must be at most 60000"),
    ({"data.test_size": 0}, "data.test_size must be a positive integer or None, got 0"),
    ({"data.name": "cifar10", "data.path": "x", "data.test_size": 10001}, "data.test_size must be at most 10000"),
    ({"data.name": "mnist"}, "data.path is required for data set 'mnist', which is read from local files"),
    ({"data.name": "fashion_mnist"}, "data.path is required for data set 'fashion_mnist'"),
    ({"data.path": "x"}, "data.path must be None for data set 'digits', which is built in"),
    ({**REGRESSION, "data.subset_seed": 1}, "data.subset_seed must be None for data set 'synthetic'"),
    ({**REGRESSION, "data.indices": [1024]}, r"data\.indices must be rows of the training split, in \[0, 1024\)"),
    ({"data.train_size": 100}, r"data\.probe_size must be at most 100 \(the training examples\) or data\.probe_set "
                               r"'train', got 256"),
    ({"data.indices": [1, 2], "data.probe_size": 3}, "data.probe_size must be at most 2"),
    ({"data.subset_seed": -1}, "data.subset_seed must be at least 0 or null, got -1"),
    ({"train.seed": -1}, "train.seed must be at least 0, got -1"),
    ({"data.name": "synthetic"}, "train.loss must be 'mse' for data set 'synthetic', a regression task; got "
                                 "'cross_entropy'"),
    ({**REGRESSION, "monitor.cvs": ["entropy", "class_trace"]},
     r"monitor\.cvs\[1\] 'class_trace' needs class labels, and data set 'synthetic' is a regression task"),
    ({**REGRESSION, "monitor.cvs": ["class_entropy"]}, r"monitor\.cvs\[0\] 'class_entropy' needs class labels"),
    ({"monitor.matrix_free": True, "monitor.cvs": ["entropy"]}, r"monitor\.drift must be false with "
     r"monitor\.matrix_free true"),
    ({"monitor.cvs": ["drift"]}, r"monitor\.cvs\[0\] must be one of .*'kernel_velocity'; got 'drift'"),
    ({"monitor.layer_cvs": ["relative_distance"]}, r"monitor\.layer_cvs\[0\] must be one of 'trace_share', "),
    ({"monitor.probe_sets": ["train", "train"]}, r"monitor\.probe_sets must name each of its sets"),
    ({"monitor.probe_sets": []}, r"monitor\.probe_sets must name each of its sets"),
    ({"monitor.probe_sets": ["test"], "data.probe_size": 400}, r"data\.probe_size must be at most 360 \(the test "),
    ({"monitor.cross": True, "monitor.probe_sets": ["train"]}, r"monitor\.cross needs monitor\.probe_sets"),
    ({"monitor.cross": True, "monitor.trace_axes": []}, r"monitor\.cross needs a traced kernel"),
    ({"monitor.matrix_free": True}, r"monitor\.cvs\[1\] must be one of 'entropy', 'trace' with monitor\.matrix_free "
                                    r"true \(set it to false or 'auto' for the others\); got 'effective_entropy'"),
    ({"monitor.log_spaced": -1}, "monitor.log_spaced must be at least 0, got -1"),
    ({"monitor.trace_axes": [2]}, r"monitor\.trace_axes must be \[\], \[1\] or \[-1\] \(the models' outputs are "
                                  r"\(N, C\), axis 0 the batch\); got \[2\]"),
    ({"monitor.trace_axes": [0]}, r"monitor\.trace_axes must be .*; got \[0\]"),
    ({"monitor.trace_axes": [-2]}, r"monitor\.trace_axes must be .*; got \[-2\]"),
    ({"monitor.trace_axes": [1, -1]}, r"monitor\.trace_axes must be .*; got \[1, -1\]"),
    ({"output.dir": "runs/{seed}"}, r"output\.dir may hold only the field \{time\} \(the start time\), got "
                                    r"'runs/\{seed\}'; write \{\{ and \}\} for literal braces"),
    ({"output.dir": "runs/{}"}, r"output\.dir may hold only the field \{time\}"),
    ({"output.dir": "runs/{time!r}"}, r"output\.dir may hold only the field \{time\}"),
    ({"output.dir": "runs/{time"}, r"output\.dir 'runs/\{time' is not a valid template \(expected '\}' before end"),
    ({"output.dir": "runs/}"}, r"output\.dir 'runs/\}' is not a valid template \(Single '\}'"),
    ({"optimizer.learning_rate": float("inf")}, "optimizer.learning_rate must be a finite number, got inf"),
    ({"optimizer.decay_rate": 0}, "optimizer.decay_rate must be positive, got 0.0"),
    ({"optimizer.momentum": 1}, r"optimizer\.momentum must be in \[0, 1\), got 1.0"),
    ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay must be at least 0, got -0.1"),
    ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps must be at least 0, got -1"),
])
def test_values_that_would_fail_in_train_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    {"output.dir": "runs/{time}-{{literal}}"},
    {**REGRESSION, "monitor.cvs": ["target_alignment", "centred_target_alignment"], "monitor.trace_axes": []},
    {"model.kind": "cnn", "model.channels": [4, 4, 4]},
    {"monitor.matrix_free": True, "monitor.cvs": ["entropy", "trace"], "monitor.drift": False},
    {"monitor.cvs": ["relative_distance", "subspace_overlap", "kernel_velocity"], "monitor.cross": True,
     "monitor.layers": True, "monitor.layer_cvs": ["trace_share", "effective_rank"]},
    {"monitor.matrix_free": "auto"},  # the monitor computes the others exactly
    {"monitor.trace_axes": [1]},
    {"data.probe_set": "train", "data.train_size": 100},
    {"data.indices": [1436, 0], "data.probe_set": "train", "train.batch_size": 2},
])
def test_edge_values_that_work_are_accepted(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(None, overrides)


def test_float_keys_accept_numeric_strings_in_files_and_overrides(tmp_path):
    """PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string."""
    (tmp_path / "run.yaml").write_text("optimizer:\n  learning_rate: 1e-3\n  decay_rate: 5E-1\n")
    assert load_config(tmp_path / "run.yaml").optimizer.learning_rate == 0.001
    assert load_config(tmp_path / "run.yaml").optimizer.decay_rate == 0.5
    assert load_config(None, {"optimizer.learning_rate": "2e-2"}).optimizer.learning_rate == 0.02
    for text in ("1e-3x", "fast", "nan", "1_000", " 1e-3"):
        with pytest.raises(ConfigError, match=f"optimizer.learning_rate must be a number, got '{text}'"):
            load_config(None, {"optimizer.learning_rate": text})


def test_malformed_yaml_file_names_the_file_and_the_position(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.yaml' is not valid YAML: while parsing a flow "
                                          r"sequence: expected ',' or '\]', but got '<stream end>' at line 3, "
                                          "column 1"):
        load_config(tmp_path / "bad.yaml")


def test_batch_larger_than_the_training_data_warns_and_still_loads():
    with pytest.warns(ConfigWarning, match="train.batch_size 300 is larger than the 100 training examples: every "
                                           "step trains on all 100"):
        config = load_config(None, {"data.train_size": 100, "data.probe_size": 32, "train.batch_size": 300})
    assert config.train.batch_size == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(None, {"data.train_size": 100, "data.probe_size": 32, "train.batch_size": 100})


@pytest.mark.parametrize("name, options", [("digits", {}), ("synthetic", {})])
def test_dataset_info_matches_the_loaded_data(name, options):
    """What the config is checked against is what load_dataset gives."""
    info, data = DATASET_INFO[name], load_dataset(name, **options)
    assert (data.task, data.x_train.shape, data.x_test.shape) == (
        info.task, (info.train_examples, *info.input_shape), (info.test_examples, *info.input_shape))
    assert np.issubdtype(data.y_train.dtype, np.integer) == (info.task == "classification")


def test_output_sinks_decide_and_the_older_switches_still_work(tmp_path):
    assert load_config().output.enabled_sinks == ("tensorboard", "hdf5")
    assert load_config(None, {"output.tensorboard": False}).output.enabled_sinks == ("hdf5",)
    config = load_config(None, {"output.sinks": ["hdf5", "mlflow"]})
    assert config.output.enabled_sinks == ("hdf5", "mlflow")
    assert (config.output.tensorboard, config.output.hdf5) == (False, True)  # the switches follow the list
    agreeing = {"output.sinks": ["mlflow"], "output.tensorboard": False, "output.hdf5": False}
    assert load_config(None, agreeing).output.enabled_sinks == ("mlflow",)
    assert load_config(None, {"output.sinks": []}).output.enabled_sinks == ()
    saved = tmp_path / "config.yaml"  # a run's saved config (every key) loads as the same config
    saved.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config)))))
    assert load_config(saved) == config


@pytest.mark.parametrize("overrides, message", [
    ({"output.sinks": ["hdf5", "wandb"]},
     r"output\.sinks\[1\] must be one of 'tensorboard', 'hdf5', 'mlflow'; got 'wandb'"),
    ({"output.sinks": "mlflow"}, r"output\.sinks must be a list, got 'mlflow'"),
    ({"output.sinks": ["hdf5", "hdf5"]}, r"output\.sinks must name each sink once, got \['hdf5', 'hdf5'\]"),
    ({"output.sinks": ["tensorboard"], "output.tensorboard": False},
     r"output\.tensorboard is false but output\.sinks \['tensorboard'\] lists 'tensorboard': drop output\.tensorboard"),
    ({"output.sinks": ["mlflow"], "output.hdf5": True},
     r"output\.hdf5 is true but output\.sinks \['mlflow'\] leaves 'hdf5' out: drop output\.hdf5"),
])
def test_output_sinks_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_mlflow_sink_needs_mlflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importlib finds no such module
    message = r"output\.sinks lists 'mlflow', which needs MLflow: pip install 'ntkcv\[mlflow\]'"
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"output.sinks": ["hdf5", "mlflow"]})
