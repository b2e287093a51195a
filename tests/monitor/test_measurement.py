"""The monitor's measurements: drift and velocity, probe sets, cross-set CVs and user measurements, against
closed forms and independent float64 computations; errors at construction."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from tests.monitor.test_monitor import RecordingSink, _model


def _scaled_model():
    """f(x; w) = w²·x/2 for inputs (n, 1): ∂f/∂w = w·x, so the NTK is w²·xxᵀ in closed form."""
    x = jnp.linspace(-1.0, 2.0, 6)[:, None]
    return (lambda p, x: 0.5 * p["w"] ** 2 * x), x


def test_drift_and_velocity_of_a_kernel_known_in_closed_form():
    apply_fn, x = _scaled_model()
    weights = {0: 1.0, 3: 1.5, 5: 3.0, 6: 2.0}  # w at the firing steps
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("relative_distance", "cosine_distance", "kernel_velocity"),
                               schedule=ntkcv.Schedule(on_steps=tuple(weights)), sinks=[sink])
    for step in range(7):
        monitor(step, {"w": jnp.asarray(weights.get(step, 9.0))})  # off-schedule steps never reach the state
    monitor.close()
    theta = {step: w**2 for step, w in weights.items()}  # Θ_t = θ_t · xxᵀ
    steps = list(weights)
    assert [s for s, _ in sink.scalars["cv/relative_distance"]] == steps
    np.testing.assert_allclose([v for _, v in sink.scalars["cv/relative_distance"]],
                               [abs(theta[s] - theta[0]) / theta[0] for s in steps], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in sink.scalars["cv/cosine_distance"]], 0.0, atol=1e-6)  # same direction
    expected_velocity = [0.0] + [abs(theta[s] - theta[p]) / theta[p] / (s - p) for p, s in itertools.pairwise(steps)]
    np.testing.assert_allclose([v for _, v in sink.scalars["cv/kernel_velocity"]], expected_velocity, rtol=1e-6)


def test_a_given_reference_kernel_replaces_the_first_firing():
    apply_fn, x = _scaled_model()
    reference = 4.0 * np.asarray(x @ x.T)  # Θ at w = 2
    monitor = ntkcv.NTKMonitor(apply_fn, x, cvs=("relative_distance",), reference=reference,
                               schedule=ntkcv.Schedule(every_steps=1))
    assert monitor(0, {"w": jnp.asarray(1.0)})["cv/relative_distance"] == pytest.approx(0.75)
    assert monitor(1, {"w": jnp.asarray(2.0)})["cv/relative_distance"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference kernel of 'the probes' must have the kernel's shape"):
        ntkcv.NTKMonitor(apply_fn, x, cvs=("relative_distance",), reference=np.eye(3))(0, {"w": jnp.asarray(1.0)})


@pytest.mark.parametrize("asynchronous", [False, True])
def test_drift_and_velocity_match_a_recomputation_from_the_saved_parameters(asynchronous):
    apply_fn, params, _ = _model()
    x = jax.random.normal(jax.random.key(7), (40, 5))
    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, {"train": x[:24], "test": x[24:]},
                               cvs=("entropy", "relative_distance", "subspace_overlap", "kernel_velocity"),
                               schedule=ntkcv.Schedule(every_steps=2), sinks=[sink], asynchronous=asynchronous)
    saved, p = {}, params
    for step in range(7):
        p = jax.tree_util.tree_map(lambda a, step=step: a * (1.0 + 0.05 * step) + 0.01 * step, p)
        if step % 2 == 0:
            saved[step] = p
        monitor(step, p)
    monitor.close()
    with jax.enable_x64(True):
        kernel_fn = ntkcv.ntk_fn(apply_fn)
        for name, probes in (("train", x[:24]), ("test", x[24:])):
            kernels = {s: np.asarray(kernel_fn(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), q),
                                               jnp.asarray(probes, jnp.float64))) for s, q in saved.items()}
            steps = sorted(kernels)
            distance = [np.linalg.norm(kernels[s] - kernels[0]) / np.linalg.norm(kernels[0]) for s in steps]
            velocity = [0.0] + [np.linalg.norm(kernels[s] - kernels[q]) / np.linalg.norm(kernels[q]) / (s - q)
                                for q, s in itertools.pairwise(steps)]
            top = {s: np.linalg.eigh(k)[1][:, ::-1][:, :10] for s, k in kernels.items()}  # top_k = 10 < n
            overlap = [np.sum((top[0].T @ top[s]) ** 2) / 10 for s in steps]
            for cv, expected in (("relative_distance", distance), ("kernel_velocity", velocity),
                                 ("subspace_overlap", overlap)):
                logged = sink.scalars[f"cv/{name}/{cv}"]
                assert [s for s, _ in logged] == steps
                np.testing.assert_allclose([v for _, v in logged], expected, rtol=2e-4, atol=1e-6)


def test_probe_sets_and_the_cross_kernel_against_a_dense_float64_reference():
    apply_fn, params, x = _model()
    labels = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 2])
    monitor = ntkcv.NTKMonitor(apply_fn, {"train": x[:7], "test": x[7:]},
                               labels={"train": labels[:7], "test": labels[7:]},
                               cvs=("entropy", "target_alignment"), cross=("test", "train"))
    values = monitor(0, params)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        jacobian = jax.vmap(lambda xi: jax.jacrev(lambda q: apply_fn(q, xi[None])[0])(p64))(x64)
        leaves = jax.tree_util.tree_leaves(jacobian)
        flat = np.concatenate([np.asarray(leaf).reshape(x.shape[0], 3, -1) for leaf in leaves], axis=-1)  # (N, O, P)
        full = np.einsum("aop,bop->ab", flat, flat)  # traced: summed over the outputs
    for name, rows in (("train", slice(0, 7)), ("test", slice(7, 12))):
        kernel = full[rows, rows]
        p = np.clip(np.linalg.eigvalsh(kernel), 0, None)
        p = p[p > 0] / p.sum()
        assert values[f"cv/{name}/entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)
        target = np.asarray(labels[rows][:, None] == labels[rows][None, :], np.float64)
        alignment = (kernel * target).sum() / (np.linalg.norm(kernel) * np.linalg.norm(target))
        assert values[f"cv/{name}/target_alignment"] == pytest.approx(alignment, rel=1e-4)
    cross = full[7:, :7]
    target = np.asarray(labels[7:, None] == labels[None, :7], np.float64)
    assert values["cv/cross/test/train/frobenius_norm"] == pytest.approx(np.linalg.norm(cross), rel=1e-4)
    assert values["cv/cross/test/train/target_alignment"] == pytest.approx(
        (cross * target).sum() / (np.linalg.norm(cross) * np.linalg.norm(target)), rel=1e-4)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_user_measurement_runs_in_the_jitted_program_beside_the_built_in_ones(asynchronous):
    apply_fn, params, x = _model()
    labels = jnp.arange(12) % 3
    seen = []

    def margin(context: ntkcv.Context):
        seen.append(type(context.kernel))  # traced once, inside jit
        top_two = context.eigenvalues[:2]
        correct = jnp.take_along_axis(context.outputs, context.labels[:, None], axis=1)[:, 0]
        return {"eigengap": top_two[0] - top_two[1], "kernel_diagonal": jnp.diag(context.kernel),
                "mean_correct_logit": jnp.mean(correct)}

    def top_eigenvalue(context):
        return context.eigenvalues[0]

    sink = RecordingSink()
    monitor = ntkcv.NTKMonitor(apply_fn, x, labels=labels, cvs=("trace", margin, top_eigenvalue),
                               schedule=ntkcv.Schedule(every_steps=1), sinks=[sink], asynchronous=asynchronous)
    for step in range(3):
        monitor(step, params)
    monitor.close()
    kernel = np.asarray(ntkcv.ntk_fn(apply_fn)(params, x), np.float64)
    eigenvalues = np.linalg.eigvalsh(kernel)[::-1]
    assert [v for _, v in sink.scalars["cv/eigengap"]] == pytest.approx([eigenvalues[0] - eigenvalues[1]] * 3,
                                                                        rel=1e-4)
    assert sink.scalars["cv/top_eigenvalue"][0][1] == pytest.approx(eigenvalues[0], rel=1e-5)
    correct = np.asarray(apply_fn(params, x))[np.arange(12), np.asarray(labels)]
    assert sink.scalars["cv/mean_correct_logit"][0][1] == pytest.approx(correct.mean(), rel=1e-5)
    np.testing.assert_allclose(sink.arrays["cv/kernel_diagonal"][0][1], np.diag(kernel), rtol=1e-5)
    assert len(seen) == 1 and issubclass(seen[0], jax.core.Tracer)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"cvs": ("target_alignment",)}, ValueError, "'target_alignment' needs labels, and the probes has none"),
    ({"cvs": ("class_entropy",), "labels": np.ones((12, 2), np.float32)}, ValueError,
     "'class_entropy' needs integer class labels"),
    ({"cvs": ("entropy", "drift")}, ValueError, "got the unknown \\['drift'\\]"),
    ({"cvs": ("entropy", lambda a, b: a)}, TypeError, "a function of one Context"),
    ({"cvs": ("entropy",), "reference": np.eye(12)}, ValueError, "it needs a drift CV in cvs"),
    ({"cvs": ("relative_distance",), "matrix_free": True}, ValueError, "matrix_free estimates only the cvs"),
    ({"cvs": ("trace",), "cross": ("train", "test")}, ValueError, "cross must name two different probe sets"),
    ({"cvs": ("trace",), "layer_cvs": ("relative_distance",), "groups": "layers"}, ValueError,
     "layer_cvs must be 'trace_share' or CVs"),
    ({"cvs": ("trace",), "weight_metrics": "all"}, ValueError, "weight_metrics must be True, False or 'layers'"),
])
def test_errors_are_raised_at_construction(kwargs, error, message):
    apply_fn, _, x = _model()
    with pytest.raises(error, match=message):
        ntkcv.NTKMonitor(apply_fn, x, **kwargs)


@pytest.mark.parametrize("probes, labels, message", [
    ({"train": np.ones((4, 5))}, {"test": np.zeros(4, np.int32)}, "labels for 'test', which is not a probe set"),
    ({"": np.ones((4, 5))}, None, "probe sets need non-empty names without '/'"),
    ({"a/b": np.ones((4, 5))}, None, "probe sets need non-empty names without '/'"),
    ({"train": np.ones((4, 5))}, np.zeros(4), "labels must be a mapping of set names"),
    ({"train": np.ones((4, 5))}, {"train": np.zeros(3)}, "one row per probe: 4 in probe set 'train'"),
    ("batch", np.zeros(4), "labels cannot go with probes='batch'"),
])
def test_probe_set_errors_name_the_set(probes, labels, message):
    apply_fn, _, _ = _model()
    with pytest.raises(ValueError, match=message):
        ntkcv.NTKMonitor(apply_fn, probes, labels=labels)


def test_a_saved_state_continues_drift_and_velocity_as_if_uninterrupted():
    apply_fn, params, x = _model()
    steps = [jax.tree_util.tree_map(lambda a, s=s: a * (1.0 + 0.1 * s), params) for s in range(6)]
    kwargs = {"cvs": ("relative_distance", "kernel_velocity"), "schedule": ntkcv.Schedule(every_steps=2)}
    whole = RecordingSink()
    with ntkcv.NTKMonitor(apply_fn, x, sinks=[whole], **kwargs) as monitor:
        for step, p in enumerate(steps):
            monitor(step, p)
    first, second = RecordingSink(), RecordingSink()
    with ntkcv.NTKMonitor(apply_fn, x, sinks=[first], **kwargs) as monitor:
        for step, p in enumerate(steps[:3]):
            monitor(step, p)
        monitor.flush()
        saved = jax.device_get(monitor.state)
    assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(monitor.initial_state(params))
    with ntkcv.NTKMonitor(apply_fn, x, sinks=[second], **kwargs) as monitor:
        monitor.state = saved
        for step, p in list(enumerate(steps))[3:]:
            monitor(step, p)
    for name in ("cv/relative_distance", "cv/kernel_velocity"):
        assert first.scalars[name] + second.scalars[name] == whole.scalars[name]


def test_per_layer_kernels_split_the_trace_as_the_layers_jacobians_do():
    import flax.linen as nn

    module = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(8), nn.tanh, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (20, 4))
    params = module.init(jax.random.key(1), x)["params"]
    model = ntkcv.from_linen(module, {"params": params})
    values = ntkcv.NTKMonitor(model, x, cvs=("trace",), groups="layers",
                              layer_cvs=("trace_share", "entropy", "trace"))(0, params)
    layers = sorted({name.split("/")[2] for name in values if name.startswith("cv/layer/")})
    assert layers == ["layers_0", "layers_2", "layers_4"]  # nn.Sequential's Dense layers
    assert sum(values[f"cv/layer/{layer}/trace_share"] for layer in layers) == pytest.approx(1.0, rel=1e-6)
    with jax.enable_x64(True):  # tr Θ_l = Σ_i ‖∂f(x_i)/∂θ_l‖², summed over the outputs
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        jacobian = jax.jacrev(lambda p: module.apply({"params": p}, jnp.asarray(x, jnp.float64)))(p64)
        for layer in layers:
            expected = sum(float(jnp.sum(leaf**2)) for leaf in jax.tree_util.tree_leaves(jacobian[layer]))
            assert values[f"cv/layer/{layer}/trace"] == pytest.approx(expected, rel=1e-5)
            assert values[f"cv/layer/{layer}/trace_share"] == pytest.approx(expected / values["cv/trace"], rel=1e-5)


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_program_is_compiled_once_although_later_firings_pass_back_its_state(tmp_path, asynchronous, stored):
    from tests.test_program_store import jax_cache_dir

    apply_fn, params, x = _model()
    with jax_cache_dir(str(tmp_path) if stored else ""):  # the stored (exported) program and the traced one
        _fire_four_times_counting_compiles(ntkcv.NTKMonitor(
            ntkcv.from_function(apply_fn, params), x, cvs=("entropy", "kernel_velocity"),
            schedule=ntkcv.Schedule(every_steps=1), asynchronous=asynchronous), params)


def _fire_four_times_counting_compiles(monitor, params):
    monitor(0, params)
    monitor.flush()
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for step in range(1, 4):
            monitor(step, params)
        monitor.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []  # the initial state is committed to the device like the state the program returns
