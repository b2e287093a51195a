"""The monitor with a fake sink and a fake clock: schedules, values, compilation count, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from ntkcv.cv import collective_variables


class RecordingSink:
    def __init__(self):
        self.scalars, self.arrays, self.flushed, self.closed = {}, {}, 0, False

    def write_scalars(self, step, scalars):
        for name, value in scalars.items():
            self.scalars.setdefault(name, []).append((step, value))

    def write_arrays(self, step, arrays):
        for name, value in arrays.items():
            self.arrays.setdefault(name, []).append((step, value))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed = True


class FullDiskSink:
    """Raises from every call, as a sink on a full disk does."""

    def __init__(self):
        self.closed = False

    def _fail(self, *args):
        raise OSError("No space left on device")

    write_scalars = write_arrays = flush = _fail

    def close(self):
        self.closed = True
        self._fail()


def _blas_threads_now():
    from ntkcv.recorder import _blas_libraries

    return [library["num_threads"] for library in _blas_libraries().info() if library["user_api"] == "blas"]


def _model():
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (5, 16)), "v": jax.random.normal(keys[1], (16, 3))}
    apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    return apply_fn, params, jax.random.normal(keys[2], (12, 5))


def test_values_match_the_kernel_and_go_to_sinks_on_schedule():
    apply_fn, params, x = _model()
    sink = RecordingSink()
    labels = jnp.arange(12) % 3
    monitor = ntkcv.NTKMonitor(apply_fn, x, labels=labels, schedule=ntkcv.Schedule(every_steps=5),
                               cvs=("entropy", "trace", "target_alignment"), sinks=[sink])
    for step in range(11):
        params = jax.tree_util.tree_map(lambda a: a * 1.01, params)
        values = monitor(step, params, loss=1.0 / (step + 1))
        if step % 5 == 0:
            expected = collective_variables(ntkcv.ntk_fn(apply_fn)(params, x), ["entropy", "trace", "target_alignment"],
                                            labels=labels)
            for name, value in expected.items():
                np.testing.assert_allclose(values[f"cv/{name}"], value, rtol=1e-5)
        else:
            assert not any(name.startswith("cv/") for name in values)
    assert [s for s, _ in sink.scalars["cv/entropy"]] == [0, 5, 10]
    assert [s for s, _ in sink.scalars["train/loss"]] == list(range(11))
    assert [s for s, _ in sink.arrays["cv/spectrum"]] == [0, 5, 10]
    assert sink.arrays["cv/spectrum"][0][1].shape == (12,)
    assert monitor.trace_count == 1  # compiled once for the probe shape
    monitor.close()
    assert sink.closed


def test_time_schedule_with_fake_clock_and_log_spaced_steps():
    now = [0.0]
    schedule = ntkcv.Schedule(every_secs=10, clock=lambda: now[0])
    fired = []
    for step in range(6):
        fired.append(schedule(step))
        now[0] += 4
    assert fired == [True, False, False, True, False, False]
    log = ntkcv.Schedule(log_spaced=(1, 1000, 4))
    assert sorted(log.steps) == [1, 10, 100, 1000]
    with pytest.raises(ValueError, match="never fires"):
        ntkcv.Schedule()


def test_batch_probes_compile_once_per_shape_and_matrix_free():
    apply_fn, params, x = _model()
    monitor = ntkcv.NTKMonitor(apply_fn, "batch", schedule=ntkcv.Schedule(every_steps=1), cvs=("entropy", "trace"),
                               matrix_free=True, num_probes=60, num_matvecs=12)
    exact = collective_variables(ntkcv.ntk_fn(apply_fn)(params, x), ["entropy", "trace"])
    values = monitor(0, params, batch=x)
    assert abs(values["cv/entropy"] - float(exact["entropy"])) <= 4 * values["cv/entropy_stderr"] + 1e-3
    assert abs(values["cv/trace"] - float(exact["trace"])) <= 4 * values["cv/trace_stderr"] + 1e-3 * exact["trace"]
    monitor(1, params, batch=x + 1)
    assert monitor.trace_count == 1
    monitor(2, params, batch=x[:7])
    assert monitor.trace_count == 2
    with pytest.raises(ValueError, match="needs the minibatch"):
        monitor(3, params)


def test_nan_parameters_log_nan_and_continue():
    apply_fn, params, x = _model()
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_steps=1), sinks=[sink])
    bad = {**params, "w": params["w"].at[0, 0].set(jnp.nan)}
    with pytest.warns(RuntimeWarning, match="non-finite") as warned:
        values = monitor(0, bad, loss=float("nan"))
    assert warned[0].filename == __file__  # points at the call
    assert np.isnan(values["cv/entropy"])
    values = monitor(1, params, loss=0.5)
    assert np.isfinite(values["cv/entropy"])
    assert [s for s, _ in sink.scalars["cv/entropy"]] == [0, 1]


def test_bad_input_names_the_problem():
    apply_fn, params, x = _model()
    with pytest.raises(ValueError, match="probes"):
        ntkcv.NTKMonitor(apply_fn)
    with pytest.raises(ValueError, match="one row per probe"):
        ntkcv.NTKMonitor(apply_fn, x, labels=jnp.zeros(3, int))
    with pytest.raises(ValueError, match=r"cvs must be .*'effective_entropy'.*got the unknown \['entropyy'\]"):
        ntkcv.NTKMonitor(apply_fn, x, cvs=("entropy", "entropyy"))
    monitor = ntkcv.NTKMonitor(apply_fn, jnp.ones((4, 7)), schedule=ntkcv.Schedule(every_steps=1))
    with pytest.raises(ValueError, match=r"probe inputs of shape \(4, 7\).*do not fit the model"):
        monitor(0, params)


def test_optax_transform_records_the_scheduled_steps_from_inside_jit():
    import optax

    apply_fn, params, x = _model()
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_steps=3, on_steps=(4,)), cvs=("entropy",),
                               sinks=[sink])
    optimizer = optax.chain(monitor.as_optax_transform(), optax.sgd(0.05))
    state = optimizer.init(params)
    history = []

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(lambda p: jnp.sum(apply_fn(p, x) ** 2))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(8):
        history.append(params)
        params, state = train_step(params, state)
    jax.effects_barrier()
    assert not sink.scalars  # the callback only handed the parameters over: no sink is written inside jit
    monitor.flush()
    assert [s for s, _ in sink.scalars["cv/entropy"]] == [0, 3, 4, 6]
    for step, value in sink.scalars["cv/entropy"]:
        expected = collective_variables(ntkcv.ntk_fn(apply_fn)(history[step], x), ["entropy"])["entropy"]
        np.testing.assert_allclose(value, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="step-based schedule"):
        ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_secs=1.0)).as_optax_transform()


def test_auto_picks_exact_for_small_kernels_and_matrix_free_for_large_ones():
    from ntkcv.monitor import prefer_matrix_free

    apply_fn, params, x = _model()
    monitor = ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_steps=1), cvs=("entropy", "trace"),
                               matrix_free="auto")
    assert "cv/entropy_stderr" not in monitor(0, params)  # 12 x 12: the eigendecomposition is cheaper
    big = jnp.ones((4000, 5))
    assert prefer_matrix_free(apply_fn, params, big, trace_axes=(), num_probes=30, num_matvecs=30)
    assert not prefer_matrix_free(apply_fn, params, x, trace_axes=(), num_probes=30, num_matvecs=30)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        ntkcv.NTKMonitor(apply_fn, x, matrix_free="sometimes")


def test_asynchronous_monitor_writes_the_same_values_with_their_own_steps():
    apply_fn, params, x = _model()
    runs = {}
    for asynchronous in (False, True):
        sink = RecordingSink()
        monitor = ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_steps=3), cvs=("entropy", "trace"),
                                   sinks=[sink], asynchronous=asynchronous)
        p = params
        for step in range(10):
            p = jax.tree_util.tree_map(lambda a: a * 1.02, p)
            returned = monitor(step, p, loss=float(step))
            assert returned["train/loss"] == step
        monitor.close()
        assert monitor.latest["cv/entropy"] == sink.scalars["cv/entropy"][-1][1]
        runs[asynchronous] = sink
    sync, background = runs[False], runs[True]
    assert [s for s, _ in background.scalars["train/loss"]] == list(range(10))
    for name in ("cv/entropy", "cv/trace"):
        assert [s for s, _ in background.scalars[name]] == [0, 3, 6, 9]
        np.testing.assert_allclose([v for _, v in background.scalars[name]], [v for _, v in sync.scalars[name]],
                                   rtol=1e-6)
    assert [s for s, _ in background.arrays["cv/spectrum"]] == [0, 3, 6, 9]


def test_asynchronous_monitor_does_not_wait_and_bounds_pending_firings(monkeypatch):
    import threading

    apply_fn, params, x = _model()
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, schedule=ntkcv.Schedule(every_steps=1), cvs=("trace",), sinks=[sink],
                               asynchronous=True, max_pending=2)
    release = threading.Event()
    fire = monitor._fire
    monkeypatch.setattr(monitor, "_fire", lambda *args: (release.wait(), fire(*args))[1])
    monitor(0, params)
    monitor(1, params)  # two firings pending, neither finished: the loop goes on
    assert "cv/trace" not in sink.scalars and len(monitor._recorder._pending) == 2
    threading.Timer(0.2, release.set).start()
    monitor(2, params)  # a third waits for the oldest
    monitor.flush()
    assert [s for s, _ in sink.scalars["cv/trace"]] == [0, 1, 2]
    assert sink.flushed == 1
    monitor.close()


def test_asynchronous_monitor_keeps_params_that_a_train_step_donates():
    apply_fn, params, x = _model()
    sink = RecordingSink()
    expected = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",))(0, params)["cv/trace"]
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",), sinks=[sink], asynchronous=True)
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a: a * 0.0, p), donate_argnums=0)
    monitor(0, params)
    step(params)  # deletes params' buffers where the backend supports donation
    monitor.close()
    assert sink.scalars["cv/trace"][0][1] == pytest.approx(expected, rel=1e-6)


def test_asynchronous_monitor_compiles_from_construction_and_checks_probes_there():
    apply_fn, params, x = _model()
    model = ntkcv.from_function(apply_fn, params)
    monitor = ntkcv.NTKMonitor(model, x, cvs=("trace",), asynchronous=True)
    monitor._recorder._worker.submit(lambda: None).result()  # the warm-up ran first
    assert monitor.trace_count == 1
    monitor(0, params)
    monitor.close()
    assert monitor.trace_count == 1 and "cv/trace" in monitor.latest
    with pytest.raises(ValueError, match="do not fit the model"):
        ntkcv.NTKMonitor(model, x[:, :3], cvs=("trace",), asynchronous=True)


def test_asynchronous_warm_up_compiles_the_program_without_running_it():
    apply_fn, params, x = _model()
    runs = []

    def counted_apply_fn(p, x):
        jax.debug.callback(lambda: runs.append(1))
        return apply_fn(p, x)

    monitor = ntkcv.NTKMonitor(ntkcv.from_function(counted_apply_fn, params), x, cvs=("trace",), asynchronous=True)
    monitor._recorder._worker.submit(lambda: None).result()  # the warm-up ran first
    assert monitor.trace_count == 1 and runs == []
    monitor(0, params)
    monitor.close()
    assert monitor.trace_count == 1 and runs and "cv/trace" in monitor.latest


@pytest.mark.parametrize("asynchronous", [False, True])
def test_blas_threads_are_limited_while_a_firing_runs_and_left_as_they_were_otherwise(asynchronous):
    apply_fn, params, x = _model()
    before = _blas_threads_now()
    assert before, "no BLAS library found in this process"
    if min(before) < 2:
        pytest.skip("one BLAS thread already: a limit to one cannot be seen")
    seen, between = {}, []
    for blas_threads in (1, None):
        monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("entropy",), blas_threads=blas_threads,
                                   asynchronous=asynchronous, schedule=ntkcv.Schedule(every_steps=2))
        fire = monitor._fire

        def recording(*args, fire=fire, blas_threads=blas_threads):
            seen.setdefault(blas_threads, []).append(_blas_threads_now())
            return fire(*args)

        monitor._fire = recording
        for step in range(3):
            monitor(step, params)
            monitor.flush()
            between.append(_blas_threads_now())  # no limit left behind by a firing
        monitor.close()
    assert seen[1] == [[1] * len(before)] * 2  # while a firing computed (in the monitor's thread when asynchronous)
    assert seen[None] == [before] * 2
    assert between == [before] * 6 and _blas_threads_now() == before
    with pytest.raises(ValueError, match="blas_threads must be at least 1 or None"):
        ntkcv.NTKMonitor(apply_fn, x, blas_threads=0)


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_monitor_compiles_its_program_with_the_quick_options(monkeypatch, tmp_path, stored, asynchronous):
    """The options (for a background compile when asynchronous) reach the compiler on the traced path and on the
    stored one (an option XLA does not know fails the compile, so reaching it is visible)."""
    from tests.test_program_store import jax_cache_dir

    apply_fn, params, x = _model()
    asked = []
    monkeypatch.setattr("ntkcv.monitor.quick_compile_options",
                        lambda **kwargs: asked.append(kwargs) or {"xla_no_such_option_anywhere": True})
    with jax_cache_dir(str(tmp_path) if stored else ""):
        monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",), asynchronous=asynchronous)
        with pytest.raises(Exception, match="xla_no_such_option_anywhere"):
            monitor(0, params)
            monitor.close()
    assert asked == [{"background": asynchronous}]
    assert any(tmp_path.rglob("*.jaxexport")) == stored


def test_a_single_cv_name_may_be_a_string():
    apply_fn, params, x = _model()
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs="effective_entropy", schedule=ntkcv.Schedule(every_steps=1))
    assert monitor.cvs == ("effective_entropy",)
    assert {name for name in monitor(0, params) if name.startswith("cv/")} == {"cv/effective_entropy"}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failing_sink_keeps_neither_the_others_from_their_data_nor_close_from_finishing(asynchronous):
    from ntkcv.recorder import _blas_libraries

    apply_fn, params, x = _model()
    failing, fine = FullDiskSink(), RecordingSink()
    with _blas_libraries().limit(limits=2, user_api="blas"):
        before = _blas_threads_now()
        monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",), schedule=ntkcv.Schedule(every_steps=1),
                                   sinks=[failing, fine], asynchronous=asynchronous)
        with pytest.raises(OSError, match="No space left"):
            monitor(0, params, loss=0.5)
        assert fine.scalars["train/loss"] == [(0, 0.5)]
        with pytest.raises(OSError, match="No space left"):
            monitor.flush()
        assert fine.flushed == 1
        with pytest.raises(OSError, match="No space left"):
            monitor.close()
        assert _blas_threads_now() == before  # restored
    assert [s for s, _ in fine.scalars["cv/trace"]] == [0] and [s for s, _ in fine.arrays["cv/spectrum"]] == [0]
    assert failing.closed and fine.closed
    assert monitor.latest["train/loss"] == 0.5
    if asynchronous:
        with pytest.raises(RuntimeError, match="after shutdown"):  # the background thread was stopped
            monitor._recorder._worker.submit(print)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_calls_after_close_raise_and_closing_again_does_nothing(asynchronous):
    apply_fn, params, x = _model()
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",), sinks=[sink], asynchronous=asynchronous)
    monitor(0, params)
    monitor.close()
    monitor.close()
    for call in (lambda: monitor(1, params), monitor.flush):
        with pytest.raises(ValueError, match="NTKMonitor is closed"):
            call()
    assert sink.closed and [s for s, _ in sink.scalars["cv/trace"]] == [0]


def test_an_error_in_an_asynchronous_firing_reaches_the_caller_after_the_other_data_was_written(monkeypatch):
    import threading

    apply_fn, params, x = _model()
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("trace",), schedule=ntkcv.Schedule(every_steps=1), sinks=[sink],
                               asynchronous=True, max_pending=3)
    fire, firings, release = monitor._fire, [], threading.Event()

    def failing_at_steps_1_and_5(*args):
        step = len(firings)
        firings.append(step)
        if step == 5:
            release.wait()  # still running when close() is called
        if step in (1, 5):
            raise RuntimeError(f"the firing of step {step} failed")
        return fire(*args)

    monkeypatch.setattr(monitor, "_fire", failing_at_steps_1_and_5)
    for step in range(3):
        monitor(step, params, loss=float(step))
    monitor._recorder._worker.submit(lambda: None).result()  # every firing so far has finished
    with pytest.raises(RuntimeError, match="step 1 failed"):  # at the next call
        monitor(3, params, loss=3.0)
    assert [s for s, _ in sink.scalars["train/loss"]] == [0, 1, 2, 3]  # this call's scalars were written
    assert [s for s, _ in sink.scalars["cv/trace"]] == [0, 2]  # the firing after the failed one too
    monitor(4, params)
    monitor(5, params)
    release.set()
    with pytest.raises(RuntimeError, match="step 5 failed"):
        monitor.close()
    assert [s for s, _ in sink.scalars["cv/trace"]] == [0, 2, 3, 4] and sink.closed
