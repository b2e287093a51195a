import gzip
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntkcv.data import DATASETS, Dataset, load_dataset, probe_subset

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path, array, *, compress=False):
    """Write ``array`` (uint8) as an IDX file: magic 00 00 08 ndim, big-endian uint32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10, dtype=np.uint8),
    }


def write_cifar(directory, *, per_batch=4, seed=0):
    """Small CIFAR-10 python batches in ``directory``; returns {file name: (data, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


# --- digits -----------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_ranges():
    data = load_dataset("digits")
    assert isinstance(data, Dataset)
    assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
    assert data.y_train.shape == (1437,) and data.y_test.shape == (360,)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert (data.num_classes, data.task, data.name) == (10, "classification", "digits")
    # stratified: every class has 36 (or 35/37) test examples
    assert np.all(np.abs(np.bincount(data.y_test, minlength=10) - 36) <= 1)


def test_digits_is_reproducible_and_seeded():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


def test_subsampling_is_stratified_seeded_and_checked():
    full = load_dataset("digits")
    data = load_dataset("digits", train_size=200, test_size=50)
    assert data.x_train.shape == (200, 8, 8, 1) and data.y_test.shape == (50,)
    expected = np.bincount(full.y_train, minlength=10) * 200 / len(full.y_train)
    assert np.all(np.abs(np.bincount(data.y_train, minlength=10) - expected) < 1)
    again = load_dataset("digits", train_size=200, test_size=50)
    np.testing.assert_array_equal(data.x_train, again.x_train)
    with pytest.raises(ValueError, match="train_size must be at most 1437"):
        load_dataset("digits", train_size=5000)
    with pytest.raises(ValueError, match="test_size must be a positive integer"):
        load_dataset("digits", test_size=0)


# --- synthetic --------------------------------------------------------------------------------------------


def test_synthetic_regression_is_reproducible():
    a = load_dataset("synthetic", train_size=64, test_size=16, seed=1, dim=5)
    b = load_dataset("synthetic", train_size=64, test_size=16, seed=1, dim=5)
    c = load_dataset("synthetic", train_size=64, test_size=16, seed=2, dim=5)
    assert a.x_train.shape == (64, 5) and a.y_train.shape == (64, 1) and a.y_test.shape == (16, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.float32
    assert (a.num_classes, a.task) == (None, "regression")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)
    defaults = load_dataset("synthetic")
    assert defaults.x_train.shape == (1024, 8) and defaults.x_test.shape == (256, 8)


def test_synthetic_targets_are_a_function_of_the_inputs_plus_noise():
    clean = load_dataset("synthetic", train_size=2000, test_size=10, noise=0.0)
    noisy = load_dataset("synthetic", train_size=2000, test_size=10, noise=0.5)
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)  # same teacher and inputs, only noise differs
    residual = noisy.y_train - clean.y_train
    assert abs(residual.std() - 0.5) < 0.05
    assert clean.y_train.std() > 0.3  # the teacher is not constant


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown option.*width.*allowed: dim, noise"):
        load_dataset("synthetic", width=3)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        load_dataset("synthetic", dim=0)
    with pytest.raises(ValueError, match=r"unknown option.*dim.*'digits'"):
        load_dataset("digits", dim=3)


# --- MNIST / Fashion-MNIST --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_files_round_trip(tmp_path, idx_arrays, name, compress):
    for file, array in idx_arrays.items():
        write_idx(tmp_path / file, array, compress=compress)
    data = load_dataset(name, path=str(tmp_path))
    assert data.x_train.shape == (20, 28, 28, 1) and data.x_test.shape == (10, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert (data.num_classes, data.task, data.name) == (10, "classification", name)
    np.testing.assert_array_equal(np.rint(data.x_train[..., 0] * 255), idx_arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(np.rint(data.x_test[..., 0] * 255), idx_arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_train, idx_arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.y_test, idx_arrays["t10k-labels-idx1-ubyte"])
    assert data.x_train.max() <= 1.0


def test_idx_missing_files_are_named(tmp_path, idx_arrays):
    write_idx(tmp_path / "train-images-idx3-ubyte", idx_arrays["train-images-idx3-ubyte"])
    write_idx(tmp_path / "train-labels-idx1-ubyte", idx_arrays["train-labels-idx1-ubyte"], compress=True)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", path=str(tmp_path))
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("fashion_mnist", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pass path"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda raw: b"\x01\x02" + raw[2:], "bad magic number"),  # not 00 00
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "bad magic number"),  # unknown dtype code
        (lambda raw: raw[:-5], "corrupt IDX file.*header says shape"),  # data shorter than the header says
        (lambda raw: raw[:6], "truncated"),
    ],
)
def test_idx_corrupt_header_is_an_error(tmp_path, idx_arrays, corrupt, match):
    for file, array in idx_arrays.items():
        write_idx(tmp_path / file, array)
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", path=str(tmp_path))


def test_idx_images_and_labels_must_agree(tmp_path, idx_arrays):
    idx_arrays["t10k-labels-idx1-ubyte"] = idx_arrays["t10k-labels-idx1-ubyte"][:7]
    for file, array in idx_arrays.items():
        write_idx(tmp_path / file, array)
    with pytest.raises(ValueError, match=r"expected images \(N, H, W\) and labels \(N,\)"):
        load_dataset("mnist", path=str(tmp_path))


# --- CIFAR-10 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_cifar10_round_trips_values_and_channel_layout(tmp_path, nested):
    batches = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    data = load_dataset("cifar10", path=str(tmp_path))
    assert data.x_train.shape == (20, 32, 32, 3) and data.x_test.shape == (4, 32, 32, 3)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(data.y_train, train_labels)
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][1])
    # one pixel: row 5, column 17 of image 7; the channel-major row holds R, G, B planes of 1024 bytes each
    row, col = 5, 17
    rgb = train_data[7, [c * 1024 + row * 32 + col for c in range(3)]]
    np.testing.assert_array_equal(np.rint(data.x_train[7, row, col] * 255), rgb)
    # and every value round-trips
    planes = train_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.rint(data.x_train * 255), planes)


def test_cifar10_missing_batches_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3, test_batch in .*"):
        load_dataset("cifar10", path=str(tmp_path))


def test_cifar10_not_a_batch_is_an_error(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"expected data \(N, 3072\)"):
        load_dataset("cifar10", path=str(tmp_path))


# --- entry point ------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_built_in_data_sets_take_no_path(tmp_path):
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset("digits", path=str(tmp_path))


# --- probe subset -----------------------------------------------------------------------------------------


def test_probe_subset_is_class_balanced_and_seeded():
    data = load_dataset("digits")
    x, y = probe_subset(data.x_train, data.y_train, 50, seed=0)
    assert x.shape == (50, 8, 8, 1) and y.shape == (50,)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 5))
    x_again, _ = probe_subset(data.x_train, data.y_train, 50, seed=0)
    np.testing.assert_array_equal(x, x_again)
    x_other, _ = probe_subset(data.x_train, data.y_train, 50, seed=1)
    assert not np.array_equal(x, x_other)
    # the examples are real rows of x, paired with their labels, without repetition
    rows = {data.x_train[i].tobytes(): data.y_train[i] for i in range(len(data.y_train))}
    assert all(rows[xi.tobytes()] == yi for xi, yi in zip(x, y, strict=True))
    assert len({xi.tobytes() for xi in x}) == 50


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_probe_subset_balance_property(counts, data):
    y = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    size = data.draw(st.integers(1, len(y)))
    _, y_probe = probe_subset(np.arange(len(y)), y, size, seed=0)
    got = np.bincount(y_probe, minlength=len(counts))
    assert got.sum() == size and np.all(got <= counts)
    # classes that still had examples left received within one of the largest share
    not_exhausted = got < np.asarray(counts)
    assert np.all(got[not_exhausted] >= got.max() - 1)


def test_probe_subset_regression_and_errors():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = x * 2
    xp, yp = probe_subset(x, y, 7, seed=0)
    assert xp.shape == (7, 1) and len(np.unique(xp)) == 7
    np.testing.assert_array_equal(yp, xp * 2)
    with pytest.raises(ValueError, match=r"size must be an integer in \[1, 20\]"):
        probe_subset(x, y, 21, seed=0)
    with pytest.raises(ValueError, match="same length"):
        probe_subset(x, y[:5], 3, seed=0)


# --- subset seed and explicit indices ---------------------------------------------------------------------


def test_subset_seed_varies_only_the_training_subset():
    default = load_dataset("digits", train_size=50, test_size=40, seed=0)
    same = load_dataset("digits", train_size=50, test_size=40, seed=0, subset_seed=0)
    other = load_dataset("digits", train_size=50, test_size=40, seed=0, subset_seed=1)
    np.testing.assert_array_equal(same.x_train, default.x_train)  # subset_seed=seed is today's draw
    assert not np.array_equal(other.x_train, default.x_train)
    np.testing.assert_array_equal(other.x_test, default.x_test)  # split and test subsample keep seed's
    np.testing.assert_array_equal(np.bincount(other.y_train), np.bincount(default.y_train))  # still stratified
    full = load_dataset("digits", seed=0)
    rows = {x.tobytes() for x in full.x_train}
    assert all(x.tobytes() in rows for x in other.x_train)  # drawn from the same training split
    again = load_dataset("digits", train_size=50, test_size=40, seed=0, subset_seed=1)
    np.testing.assert_array_equal(again.x_train, other.x_train)


def test_indices_select_exactly_those_rows_in_order():
    full = load_dataset("digits", seed=3)
    data = load_dataset("digits", seed=3, indices=[10, 2, 500])
    np.testing.assert_array_equal(data.x_train, full.x_train[[10, 2, 500]])
    np.testing.assert_array_equal(data.y_train, full.y_train[[10, 2, 500]])
    np.testing.assert_array_equal(data.x_test, full.x_test)


@pytest.mark.parametrize("kwargs, message", [
    ({"indices": [0, 1437]}, r"indices must be rows of the training split, in \[0, 1437\); got 1437"),
    ({"indices": [-1]}, r"in \[0, 1437\); got -1"),
    ({"indices": [3, 4, 3]}, "indices must be distinct; row 3 is repeated"),
    ({"indices": []}, "indices must be a non-empty sequence of integers"),
    ({"indices": [1, 2], "train_size": 2}, "indices and train_size exclude each other"),
])
def test_indices_errors_name_the_constraint(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


def test_synthetic_rejects_subset_seed_and_takes_indices_of_its_draw():
    with pytest.raises(ValueError, match="subset_seed must be None"):
        load_dataset("synthetic", subset_seed=1)
    full = load_dataset("synthetic", seed=0)
    np.testing.assert_array_equal(load_dataset("synthetic", seed=0, indices=[4, 1]).y_train, full.y_train[[4, 1]])
