"""The typed config schema: defaults, the shipped configs, and errors that name the key."""

import pathlib

import pytest

from ntkcv.config import ConfigError, RunConfig, load_config

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
    assert load_config(None, {"monitor.matrix_free": True}).monitor.matrix_free is True
    with pytest.raises(ConfigError, match=r"monitor\.matrix_free must be true or false, got 'x' or must be one of"):
        load_config(None, {"monitor.matrix_free": "x"})


def test_data_selection_keys_parse_and_default_to_todays_behaviour():
    default = load_config().data
    assert (default.probe_set, default.subset_seed, default.indices) == ("subset", None, None)
    data = load_config(None, {"data.probe_set": "train", "data.subset_seed": 7, "data.indices": [3, 1, 2]}).data
    assert (data.probe_set, data.subset_seed, data.indices) == ("train", 7, (3, 1, 2))


@pytest.mark.parametrize("overrides, message", [
    ({"data.indices": [1, 2], "data.train_size": 2}, "data.indices and data.train_size exclude each other"),
    ({"data.indices": []}, r"data.indices must hold at least one row index, got \[\]"),
    ({"data.indices": [0, -1]}, r"data.indices\[1\] must be a row index >= 0, got -1"),
    ({"data.indices": [0, 1.5]}, r"data.indices\[1\] must be an integer, got 1.5"),
    ({"data.probe_set": "test"}, "data.probe_set must be one of 'subset', 'train'; got 'test'"),
    ({"data.subset_seed": "a"}, "data.subset_seed must be an integer, got 'a'"),
])
def test_data_selection_keys_reject_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
