"""The reference training loop behind ``ntkcv train``: flax + optax, the NTK monitor, orbax checkpoints.

Step ``s`` applies one optimiser update to the parameters; the monitor records the loss of that update
and, on its schedule, the NTK collective variables of the parameters *before* it. A checkpoint saved at
step ``s`` holds the state after update ``s``; ``resume=True`` restores the latest checkpoint, purges
every log row with step ``> s`` (TensorBoard ``purge_step``, HDF5 ``resume_from_step``, MLflow a new run holding
the steps ``<= s``) and continues at ``s + 1``, so a resumed run has no duplicate and no missing step.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkcv
from ntkcv._run_dir import claim_run_dir, write_config
from ntkcv.config import OptimizerConfig, RunConfig, flatten, to_dict
from ntkcv.data import Dataset, load_dataset, probe_subset
from ntkcv.monitor import NTKMonitor
from ntkcv.schedule import Schedule
from ntkcv.zoo import NTK_BIAS_STD, NTK_WEIGHT_STD, make_model


def learning_rate(config: OptimizerConfig, total_steps: int) -> float | optax.Schedule:
    """The learning rate named in the config: a number, or an optax schedule of the step."""
    lr = config.learning_rate
    schedules = {
        "constant": lambda: lr,
        "cosine": lambda: optax.cosine_decay_schedule(lr, total_steps),
        "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(
            0.0, lr, min(config.warmup_steps, total_steps - 1), total_steps),
        "exponential": lambda: optax.exponential_decay(lr, total_steps, config.decay_rate),
    }
    return schedules[config.schedule]()


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimiser and learning-rate schedule named in the config."""
    rate = learning_rate(config, total_steps)
    optimizers = {
        "sgd": lambda: optax.sgd(rate),
        "momentum": lambda: optax.sgd(rate, momentum=config.momentum),
        "adam": lambda: optax.adam(rate),
        "adamw": lambda: optax.adamw(rate, weight_decay=config.weight_decay),
    }
    return optimizers[config.name]()


def _loss_fn(kind: str, num_classes: int | None):
    def loss(logits, targets):
        if kind == "cross_entropy":
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        if num_classes is not None:  # MSE on one-hot classification targets
            targets = jax.nn.one_hot(targets, num_classes)
        return 0.5 * jnp.mean(jnp.sum((logits - targets) ** 2, axis=-1))

    return loss


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the minibatch of ``step``: a fresh seeded permutation each epoch (resumable)."""
    per_epoch = max(n // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[position * batch_size : (position + 1) * batch_size]


#: Programs that compile faster than this are not written to the persistent compilation cache (JAX's own
#: default, 1 s, leaves out the train step and the monitor's program of the default run).
CACHE_MIN_COMPILE_SECONDS = 0.1


@contextlib.contextmanager
def compilation_cache(setting: str) -> Iterator[pathlib.Path | None]:
    """Store compiled XLA programs on disk (JAX's persistent compilation cache) for the block, so that a rerun of the
    same model and shapes loads its compiled train step and monitor program instead of compiling them again; JAX's
    settings are restored afterwards.

    ``setting`` is ``output.compilation_cache``: ``"auto"`` (``$JAX_COMPILATION_CACHE_DIR`` if set, else
    ``~/.cache/ntkcv/jax``), ``"off"`` (JAX's own setting is left alone) or a directory. Programs that took
    at least :data:`CACHE_MIN_COMPILE_SECONDS` (or ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``) to compile
    are stored. Yields the directory in use.
    """
    from jax.experimental.compilation_cache import compilation_cache as cache

    if setting == "off":
        yield None
        return
    if setting == "auto":
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/ntkcv/jax"
    path = pathlib.Path(setting).expanduser().resolve()
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    if previous["jax_compilation_cache_dir"] != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
        cache.reset_cache()  # takes effect also after earlier compilations in this process
    try:
        yield path
    finally:
        if any(getattr(jax.config, name) != value for name, value in previous.items()):
            for name, value in previous.items():
                jax.config.update(name, value)
            cache.reset_cache()


def resolve_run_dir(template: str, *, resume: bool) -> pathlib.Path:
    """``output.dir`` with ``{time}`` replaced by the start time; resuming needs a run's real directory."""
    run_dir = pathlib.Path(template.format(time=time.strftime("%Y%m%d-%H%M%S"))).resolve()
    if resume and "{time}" in template:
        raise ValueError(f"--resume needs the run's own directory, not the template {template!r}: "
                         "pass --set output.dir=PATH")
    return run_dir


def train(config: RunConfig, *, resume: bool = False, run_dir: str | pathlib.Path | None = None,
          console: Any = None) -> dict[str, Any]:
    """Train as configured (in ``run_dir``, default: the resolved ``output.dir``); returns the final metrics
    and where the logs are.

    The run directory is claimed first (see :func:`ntkcv._run_dir.claim_run_dir`): its lock is held until the
    run ends, a directory holding a run is refused unless ``resume``, and a resume must keep the saved config.
    ``resume`` restores the newest checkpoint that restores (warning about each newer one it skips) and
    continues after it; without a checkpoint it starts again from step 0, replacing the logs.
    """
    run_dir = resolve_run_dir(config.output.dir, resume=resume) if run_dir is None else pathlib.Path(run_dir)
    data = load_dataset(config.data.name, path=config.data.path, train_size=config.data.train_size,
                        test_size=config.data.test_size,
                        seed=config.train.seed if config.data.seed is None else config.data.seed,
                        subset_seed=config.data.subset_seed, indices=config.data.indices)
    if data.task == "regression" and config.train.loss != "mse":
        raise ValueError(f"data set {config.data.name!r} is a regression task: set train.loss to 'mse'")
    lock = claim_run_dir(run_dir, config, resume=resume)
    try:
        with compilation_cache(config.output.compilation_cache):
            return _train_in(run_dir, config, data, resume=resume, console=console)
    finally:
        lock.release()


def num_outputs(data: Dataset) -> int:
    """The model's outputs for ``data``: one per class, or per regression target."""
    return data.num_classes if data.task == "classification" else data.y_train.shape[-1]


def _train_in(run_dir: pathlib.Path, config: RunConfig, data: Dataset, *, resume: bool, console: Any
              ) -> dict[str, Any]:
    module = make_model(config.model.kind, num_outputs=num_outputs(data), **_model_options(config))
    key = jax.random.key(config.train.seed)
    # jitted: one compilation (kept by the persistent cache) instead of one per initialiser op, eagerly
    params = jax.jit(module.init)(key, jnp.asarray(data.x_train[:1]))["params"]

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    # made before the rest of the set-up (imports included): an asynchronous monitor compiles its program in the
    # background meanwhile
    monitor = _make_monitor(config, data, ntkcv.from_function(apply_fn, params))
    with monitor:  # closes the sinks, also when the set-up below fails
        import orbax.checkpoint as ocp

        from ntkcv.sinks import ConsoleSink, HDF5Sink, TensorBoardSink

        optimizer = make_optimizer(config.optimizer, config.train.steps)
        opt_state = optimizer.init(params)
        loss_fn = _loss_fn(config.train.loss, data.num_classes)

        @jax.jit
        def train_step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, x), y))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        @jax.jit
        def evaluate(params, x, y):
            logits = apply_fn(params, x)
            metrics = {"loss": loss_fn(logits, y)}
            if data.task == "classification":
                metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
            return metrics

        x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)  # on the device once, not per eval

        def batch(step: int) -> tuple[jax.Array, jax.Array]:
            """The training batch of ``step``."""
            if config.train.batch_size == "full":
                return x_train, y_train
            indices = _batch_indices(step, x_train.shape[0], config.train.batch_size, config.train.seed)
            return x_train[indices], y_train[indices]

        checkpoints = _checkpoint_manager(run_dir, config)
        try:
            if resume:
                checkpoints, state, start = _restore(checkpoints, run_dir, config,
                                                     _training_state(params, opt_state, monitor, batch(0)))
                params, opt_state = state["params"], state["opt_state"]
                if "monitor" in state and start:
                    monitor.state = state["monitor"]
            else:
                start = 0
            write_config(run_dir, config)  # the run is accepted
            if "tensorboard" in config.output.enabled_sinks:
                monitor.sinks.append(TensorBoardSink(str(run_dir / "tensorboard"),
                                                     purge_step=start if resume else None))
            if "hdf5" in config.output.enabled_sinks:
                monitor.sinks.append(HDF5Sink(run_dir / "ntkcv.h5", resume_from_step=start if resume else None))
            if "mlflow" in config.output.enabled_sinks:
                monitor.sinks.append(_mlflow_sink(run_dir, config, resume_from_step=start if resume else None))
            if config.output.progress:
                monitor.sinks.append(ConsoleSink(config.train.steps, console=console))

            started = time.perf_counter()
            test_metrics: dict[str, float] = {}
            for step in range(start, config.train.steps):
                x, y = batch(step)
                new_params, opt_state, loss = train_step(params, opt_state, x, y)
                scalars = {"loss": loss}
                if (step + 1) % config.train.eval_every == 0 or step == config.train.steps - 1:
                    test_metrics = jax.device_get(evaluate(new_params, x_test, y_test))
                    scalars.update({f"test_{name}": value for name, value in test_metrics.items()})
                monitor(step, params, batch=(x, y), **scalars)
                params = new_params
                if checkpoints.should_save(step):  # logs up to a checkpoint must survive a crash after it
                    monitor.flush()  # and the monitor's state holds every firing so far
                    state = _training_state(params, opt_state, monitor, (x, y))
                    checkpoints.save(step, args=ocp.args.StandardSave(state))
            checkpoints.wait_until_finished()
            monitor.flush()
            final = {f"final/test_{k}": float(v) for k, v in test_metrics.items()}
            final |= {f"final/{k}": v for k, v in monitor.latest.items() if k.startswith("cv/")}
            for sink in monitor.sinks:
                sink.write_hparams({key: value if isinstance(value, (int, float, str, bool)) else str(value)
                                    for key, value in flatten(to_dict(config)).items()}, final)
        except BaseException:  # the first error is the one to report: closing may fail too (a full disk)
            with contextlib.suppress(Exception):
                checkpoints.close()
            raise
        checkpoints.close()
    return {"run_dir": str(run_dir), "tensorboard": str(run_dir / "tensorboard"), "hdf5": str(run_dir / "ntkcv.h5"),
            "steps": config.train.steps, "resumed_from": start, "seconds": time.perf_counter() - started, **final}


def _mlflow_sink(run_dir: pathlib.Path, config: RunConfig, *, resume_from_step: int | None) -> Any:
    """The run's :class:`~ntkcv.sinks.MLflowSink`; ``run_dir/mlflow.json`` records its tracking store and run id,
    so that a resume continues that run there (as a new run holding its steps before ``resume_from_step``)."""
    from ntkcv.sinks import MLflowSink

    record = run_dir / "mlflow.json"
    if resume_from_step is not None and record.is_file():
        previous = json.loads(record.read_text())
        sink = MLflowSink(previous["tracking_uri"], run_id=previous["run_id"], resume_from_step=resume_from_step)
    else:
        experiment = config.output.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ntkcv"
        sink = MLflowSink(config.output.mlflow_tracking_uri, experiment=experiment, run_name=run_dir.name,
                          tags={"ntkcv.run_dir": str(run_dir)})
    record.write_text(json.dumps({"tracking_uri": sink.tracking_uri, "run_id": sink.run_id}))
    return sink


def _checkpoint_manager(run_dir: pathlib.Path, config: RunConfig) -> Any:
    """Orbax's manager of the run's checkpoints: after every ``output.checkpoint_every`` updates and after the last
    one; the two latest are kept."""
    import orbax.checkpoint as ocp

    every, final_step = config.output.checkpoint_every, config.train.steps - 1
    return ocp.CheckpointManager(run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(
        should_save_fn=lambda step, _: (step + 1) % every == 0 or step == final_step, max_to_keep=2))


def _training_state(params: Any, opt_state: Any, monitor: NTKMonitor, batch: tuple[jax.Array, jax.Array]
                    ) -> dict[str, Any]:
    """What a checkpoint holds: the parameters, the optimiser state and the monitor's state (the drift reference
    and the previous kernel, so that a resumed run measures drift and velocity as an uninterrupted one); ``batch``: a
    training batch, the shape of the state of measurements that need one."""
    state = {"params": params, "opt_state": opt_state}
    if monitor.measurements and monitor.state is not None:
        state["monitor"] = monitor.state
    elif monitor.measurements and not isinstance(monitor.probes, str):
        state["monitor"] = monitor.initial_state(params, batch=batch)
    return state


def _restore(checkpoints: Any, run_dir: pathlib.Path, config: RunConfig, template: dict[str, Any]
             ) -> tuple[Any, dict[str, Any], int]:
    """``(manager, state, next step)`` from the newest checkpoint that restores into ``template`` (``template``
    itself and step 0 if there is none); each newer one is skipped with a warning naming it, and deleted."""
    import orbax.checkpoint as ocp

    saved = sorted(checkpoints.all_steps(), reverse=True)
    for position, step in enumerate(saved):
        try:
            state = checkpoints.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as error:  # orbax raises many kinds of errors for a damaged checkpoint
            reason = (str(error).splitlines() or [""])[0]
            warnings.warn(f"checkpoint {step} in {checkpoints.directory} does not restore ({type(error).__name__}: "
                          f"{reason}): skipped", RuntimeWarning, stacklevel=3)
            checkpoints.close()  # a manager that failed to restore fails on every later step too
            checkpoints = _checkpoint_manager(run_dir, config)
            continue
        for skipped in saved[:position]:  # the run saves those steps again
            checkpoints.delete(skipped)
        return checkpoints, state, step + 1
    if saved:
        checkpoints.close()
        raise ValueError(f"no checkpoint in {checkpoints.directory} restores (steps {saved}): "
                         "remove the run directory to start again")
    return checkpoints, template, 0


def _make_monitor(config: RunConfig, data: Dataset, model: ntkcv.Model) -> NTKMonitor:
    """The run's NTK monitor, without sinks (the caller adds them to ``monitor.sinks``)."""
    monitor = config.monitor
    sets = {}
    if "train" in monitor.probe_sets:
        if config.data.probe_set == "train":  # the NTK on the training data itself (the CV studies' kernel)
            sets["train"] = data.x_train, data.y_train
        else:
            sets["train"] = probe_subset(data.x_train, data.y_train, config.data.probe_size, config.train.seed)
    if "test" in monitor.probe_sets:
        sets["test"] = probe_subset(data.x_test, data.y_test, config.data.probe_size, config.train.seed)
    probes, labels = {name: x for name, (x, _) in sets.items()}, {name: y for name, (_, y) in sets.items()}
    if len(sets) == 1:  # one set keeps the plain names, cv/<name>
        (probes, labels), = sets.values()
    cvs = (*monitor.cvs, *(("relative_distance", "cosine_distance", "kernel_velocity") if monitor.drift else ()))
    if monitor.infinite_width:  # the zoo's MLP: standard (flax Dense, σ_w = 1, σ_b = 0) or ntk parameterisation
        parameterization = config.model.parameterization
        stds = {"weight_std": NTK_WEIGHT_STD, "bias_std": NTK_BIAS_STD} if parameterization == "ntk" else {}
        infinite_ntk = ntkcv.infinite.infinite_width_ntk(len(config.model.widths), config.model.activation,
                                                         parameterization=parameterization, **stds)
        scale = ntkcv.infinite.empirical_scale(parameterization, num_outputs=num_outputs(data),
                                               width=config.model.widths[0])
        cvs = (*cvs, ntkcv.infinite.infinite_width_distance(infinite_ntk, scale=scale))
    steps = config.train.steps
    log_spaced = (1, steps, monitor.log_spaced) if monitor.log_spaced else None
    rate, measurements = learning_rate(config.optimizer, steps), {}
    if monitor.curvature:
        measurements["curvature"] = ntkcv.curvature.curvature_measurement(model.apply_fn, loss=config.train.loss,
                                                                         learning_rate=rate)
    if monitor.linearised:
        measurements["linearised"] = ntkcv.predict.linearisation_measurement(
            model.apply_fn, learning_rate=rate, trace_axes=monitor.trace_axes, implementation=monitor.implementation)
    if monitor.outputs == "softmax":  # the CVs' kernel is of the probabilities; the other measurements keep the logits
        model = ntkcv.from_function(lambda p, x, logits=model.apply_fn: jax.nn.softmax(logits(p, x)), model.params)
    return NTKMonitor(  # labels: integer classes, or the regression targets (N, 1) for the alignments
        model, probes, labels=labels, cvs=tuple(dict.fromkeys(cvs)) if monitor.enabled else (),
        measurements=measurements if monitor.enabled else None,
        groups="layers" if monitor.layers else None,
        layer_cvs=monitor.layer_cvs, cross=("test", "train") if monitor.cross else None,
        schedule=Schedule(every_steps=monitor.every_steps, on_steps=(steps - 1,), log_spaced=log_spaced),
        matrix_free=monitor.matrix_free, log_spectrum=monitor.spectrum,
        weight_metrics=monitor.enabled and ("layers" if monitor.layer_weight_metrics else monitor.weight_metrics),
        trace_axes=monitor.trace_axes,
        implementation=monitor.implementation, blas_threads=monitor.blas_threads, asynchronous=monitor.asynchronous)


def _model_options(config: RunConfig) -> dict[str, Any]:
    m = config.model
    if m.kind == "mlp":
        return {"widths": m.widths, "activation": m.activation, "parameterization": m.parameterization}
    if m.kind == "cnn":
        return {"channels": m.channels, "widths": m.widths, "activation": m.activation}
    return {"dim": m.dim, "depth": m.depth, "heads": m.heads}
