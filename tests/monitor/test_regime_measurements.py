"""The curvature and linearisation measurements through the monitor and ``ntkcv train``, against independent
computations: the Gauss–Newton matrix from the full NTK, and a linear model, whose linearisation is exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkcv
from ntkcv.config import ConfigError, load_config
from ntkcv.measurement import Measurement, combine
from ntkcv.report import read_scalars
from ntkcv.train import train


class _Tanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


def _model(x):
    module = _Tanh()
    return ntkcv.from_linen(module, module.init(jax.random.key(0), x))


def test_combine_names_each_measurement_and_keeps_its_state():
    def counter(name):
        def apply(params, probe_sets, state, step):
            return {"count": state + 1, "sets": jnp.asarray(len(probe_sets))}, {"seen": jnp.arange(2)}, state + 1
        return Measurement(lambda params, probe_sets: jnp.asarray(0), apply, frozenset({name}))

    combined = combine({"a": counter("x"), "b": counter("y")})
    assert combined.needs == {"x", "y"}
    inputs = {"a": {"x": {}}, "b": {"x": {}, "y": {}}}
    state = combined.init(None, inputs)
    scalars, arrays, state = combined.apply(None, inputs, state, 0)
    scalars, arrays, state = combined.apply(None, inputs, state, 1)
    assert {k: int(v) for k, v in scalars.items()} == {"a/count": 2, "a/sets": 1, "b/count": 2, "b/sets": 2}
    assert set(arrays) == {"a/seen", "b/seen"} and state == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="without '/'"):
        combine({"a/b": counter("x")})


def test_monitor_logs_the_sharpness_of_the_training_batch():
    x = jax.random.normal(jax.random.key(1), (12, 5))
    labels = jnp.arange(12) % 3
    model = _model(x)
    measurement = ntkcv.curvature.curvature_measurement(model.apply_fn, loss="mse",
                                                        learning_rate=optax.linear_schedule(0.1, 0.05, 10))
    monitor = ntkcv.NTKMonitor(model, x, cvs=(), schedule=ntkcv.Schedule(every_steps=5),
                               measurements={"curvature": measurement})
    values = monitor(5, model.params, batch=(x, labels), loss=1.0)
    full = ntkcv.flatten_kernel(ntkcv.ntk_fn(model.apply_fn, trace_axes=())(model.params, x))
    assert values["curvature/ggn_max"] == pytest.approx(float(jnp.linalg.eigvalsh(full)[-1]) / 12, rel=1e-4)
    assert values["curvature/ggn_trace"] == pytest.approx(float(jnp.trace(full)) / 12, rel=1e-4)
    assert values["curvature/two_over_lr"] == pytest.approx(2 / 0.075)
    loss_fn = ntkcv.curvature.make_loss_fn(model.apply_fn, x, labels, loss="mse")
    flat, unravel = jax.flatten_util.ravel_pytree(model.params)
    hessian = jax.hessian(lambda v: loss_fn(unravel(v)))(flat)
    assert values["curvature/hessian_max"] == pytest.approx(float(jnp.linalg.eigvalsh(hessian)[-1]), rel=1e-3)
    with pytest.raises(ValueError, match=r"need the training batch: call monitor\(step, params, batch=\(inputs, "):
        monitor(10, model.params, batch=x)
    with pytest.raises(ValueError, match="without the training batch"):
        monitor.as_optax_transform()
    monitor.close()


def test_the_linearisation_of_a_linear_model_is_its_gradient_flow():
    """For f(x) = xW + b the kernel is (xx' + 1) ⊗ I at every step: the monitor's linearised outputs must be the
    gradient flow of that kernel over the summed learning-rate schedule, computed here with numpy."""
    with jax.enable_x64(True):
        x_train = jax.random.normal(jax.random.key(2), (20, 6), jnp.float64)
        x_test = jax.random.normal(jax.random.key(3), (7, 6), jnp.float64)
        y_train, y_test = jnp.arange(20) % 3, jnp.arange(7) % 3
        module = nn.Dense(3, param_dtype=jnp.float64)
        initial = params = module.init(jax.random.key(4), x_train)

        def apply_fn(p, x):
            return module.apply(p, x)

        schedule = optax.linear_schedule(0.3, 0.1, 40)
        measurement = ntkcv.predict.linearisation_measurement(apply_fn, learning_rate=schedule)
        monitor = ntkcv.NTKMonitor(apply_fn, {"train": x_train, "test": x_test},
                                   labels={"train": y_train, "test": y_test}, cvs=(),
                                   schedule=ntkcv.Schedule(on_steps=(0, 40)), measurements={"linearised": measurement})
        targets = jax.nn.one_hot(y_train, 3)
        grad = jax.jit(jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, x_train) - targets) ** 2, -1))))
        for step in range(40):
            monitor(step, params)
            params = jax.tree.map(lambda p, g, s=step: p - schedule(s) * g, params, grad(params))
        values = monitor(40, params)  # after updates 0 … 39
        monitor.close()
        time = sum(float(schedule(u)) for u in range(40)) / 20
        x_train, x_test = np.asarray(x_train), np.asarray(x_test)
        eigenvalues, vectors = np.linalg.eigh(x_train @ x_train.T + 1)
        moved = vectors @ np.diag(-np.expm1(-time * eigenvalues) / eigenvalues) @ vectors.T
        residual = np.asarray(apply_fn(initial, x_train)) - np.asarray(targets)
        linear_test = np.asarray(apply_fn(initial, x_test)) - (x_test @ x_train.T + 1) @ moved @ residual
        network_test = np.asarray(apply_fn(params, x_test))
        expected_gap = np.linalg.norm(network_test - linear_test) / np.linalg.norm(
            network_test - np.asarray(apply_fn(initial, x_test)))
    assert values["linearised/gap"] == pytest.approx(expected_gap, rel=1e-6)
    assert 1e-4 < expected_gap < 0.05  # gradient descent with these steps is close to its flow, not equal
    assert values["linearised/accuracy"] == pytest.approx(np.mean(np.argmax(linear_test, -1) == np.asarray(y_test)))
    kernel = x_train @ x_train.T + 1  # of rank 7: the measurement's relative ridge, 1e-6, makes it invertible
    ridged = kernel + 1e-6 * np.trace(kernel) / 20 * np.eye(20)
    kernel_regression = (x_test @ x_train.T + 1) @ np.linalg.solve(ridged, np.asarray(targets))
    assert values["linearised/kernel_regression_accuracy"] == pytest.approx(
        np.mean(np.argmax(kernel_regression, -1) == np.asarray(y_test)))


def test_train_logs_curvature_to_every_sink_on_full_batch_gradient_descent(tmp_path):
    config = load_config(None, {"data.train_size": 40, "data.probe_set": "train", "model.widths": [16],
                                "train.steps": 4, "train.batch_size": "full", "train.loss": "mse",
                                "optimizer.name": "sgd", "optimizer.learning_rate": 0.05, "monitor.every_steps": 2,
                                "monitor.cvs": [], "monitor.drift": False, "monitor.weight_metrics": False,
                                "monitor.curvature": True, "monitor.linearised": True, "output.progress": False,
                                "output.dir": str(tmp_path)})
    series = read_scalars(train(config)["hdf5"])
    for name in ("hessian_max", "ggn_max", "two_over_lr", "hessian_trace", "ggn_trace"):
        assert list(series[f"curvature/{name}"][0]) == [0, 2, 3]
    assert np.allclose(series["curvature/two_over_lr"][1], 40.0)
    assert series["linearised/gap"][1][0] == 0 and 0 < series["linearised/gap"][1][-1] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("curvature/ggn_max")] == [0, 2, 3]
    # full batch: the loss of step 0 is the loss on all 40 points, as with a batch of all 40 (in another order)
    shuffled = load_config(None, {**{k: v for k, v in _flat(config).items()}, "train.batch_size": 40,
                                  "output.dir": str(tmp_path / "batch40")})
    assert read_scalars(train(shuffled)["hdf5"])["train/loss"][1][0] == pytest.approx(series["train/loss"][1][0],
                                                                                      rel=1e-5)


def _flat(config):
    from ntkcv.config import flatten, to_dict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(to_dict(config)).items()}


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": "half"}, r"train.batch_size must be an integer or must be one of 'full'; got 'half'"),
    ({"monitor.linearised": True}, "monitor.linearised needs monitor.probe_sets"),
    ({"monitor.linearised": True, "data.probe_set": "train", "data.train_size": 100},
     "monitor.linearised needs optimizer.name 'sgd' and train.loss 'mse'"),
    ({"monitor.infinite_width": True, "model.widths": [64, 32]}, "monitor.infinite_width needs model.kind 'mlp' with "
                                                                 "equal model.widths"),
    ({"monitor.infinite_width": True, "monitor.outputs": "softmax"}, "monitor.outputs must be 'logits'"),
    ({"monitor.outputs": "softmax", "data.name": "synthetic", "train.loss": "mse"}, "needs class outputs"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.standard_dtype_promotion
def test_train_logs_the_distance_from_the_infinite_width_kernel(tmp_path):
    config = load_config(None, {"data.train_size": 30, "data.probe_set": "train", "model.widths": [256, 256],
                                "train.steps": 1, "monitor.cvs": ["trace"], "monitor.drift": False,
                                "monitor.probe_sets": ["train"], "monitor.infinite_width": True,
                                "monitor.weight_metrics": False, "output.progress": False,
                                "output.dir": str(tmp_path)})
    series = read_scalars(train(config)["hdf5"])
    from ntkcv.data import load_dataset
    from ntkcv.zoo import make_model

    data = load_dataset("digits", train_size=30, seed=0)
    module = make_model("mlp", num_outputs=10, widths=(256, 256), activation="tanh")
    x = jnp.asarray(data.x_train)
    params = jax.jit(module.init)(jax.random.key(0), x[:1])["params"]
    empirical = ntkcv.ntk_fn(lambda p, x: module.apply({"params": p}, x))(params, x) / (10 * 256)
    limit = ntkcv.infinite_width_ntk(2, "tanh", parameterization="standard")(x)
    assert series["cv/trace"][1][0] == pytest.approx(float(jnp.trace(empirical)) * 2560, rel=1e-5)
    expected = float(jnp.linalg.norm(empirical - limit) / jnp.linalg.norm(limit))
    assert series["cv/infinite_width/relative_distance"][1][0] == pytest.approx(expected, rel=1e-4)
    assert series["cv/infinite_width/cosine_distance"][1][0] < 0.01  # the same shape: O(1/width) apart
