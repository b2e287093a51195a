"""Data sets as numpy arrays, loaded from embedded data or standard local files (never downloaded).

Every loader returns a :class:`Dataset` with float32 inputs (images channels-last, ``(N, H, W, C)``, in
``[0, 1]``) and int32 class labels ``(N,)``, or float32 targets ``(N, 1)`` for regression.

=================  ==============================================================================
name               source
=================  ==============================================================================
``digits``         scikit-learn's embedded 8×8 digits (1797 images), stratified 1437/360 split
``synthetic``      Gaussian inputs, targets from a smooth random two-layer tanh teacher plus noise
``mnist``          the four IDX files (``train-images-idx3-ubyte`` …, optionally ``.gz``) in ``path``
``fashion_mnist``  as ``mnist`` (Fashion-MNIST ships under the same file names)
``cifar10``        the python pickle batches (``data_batch_1`` … ``data_batch_5``, ``test_batch``)
=================  ==============================================================================

Example::

    from ntkcv.data import load_dataset, probe_subset

    data = load_dataset("digits", train_size=500, seed=0)   # x_train (500, 8, 8, 1), y_train (500,)
    x_probe, y_probe = probe_subset(data.x_train, data.y_train, 100, seed=0)   # 10 per class
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np


class DatasetInfo(NamedTuple):
    """What is known of a data set before it is loaded: its task, the shape of one input and its split sizes.

    The sizes of ``mnist``, ``fashion_mnist`` and ``cifar10`` are the published files'; ``synthetic`` (with its
    default options) draws any number of samples, these by default.
    """

    task: Literal["classification", "regression"]
    input_shape: tuple[int, ...]
    train_examples: int
    test_examples: int


DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("classification", (8, 8, 1), 1437, 360),  # 1797 images
    "synthetic": DatasetInfo("regression", (8,), 1024, 256),
    "mnist": DatasetInfo("classification", (28, 28, 1), 60000, 10000),
    "fashion_mnist": DatasetInfo("classification", (28, 28, 1), 60000, 10000),
    "cifar10": DatasetInfo("classification", (32, 32, 3), 50000, 10000),
}
"""Each data set's :class:`DatasetInfo`."""

DATASETS = tuple(DATASET_INFO)
"""Names accepted by :func:`load_dataset`."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: inputs ``x_*`` (float32) and labels ``y_*`` (int32 ``(N,)`` or float32 ``(N, 1)``).

    ``num_classes`` is ``None`` for regression (``task == "regression"``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    task: Literal["classification", "regression"]
    name: str


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    subset_seed: int | None = None,
    indices: Sequence[int] | None = None,
    **options: Any,
) -> Dataset:
    """Load the data set ``name`` (one of :data:`DATASETS`).

    Args:
      name: which data set.
      path: directory holding the standard files (``mnist``, ``fashion_mnist``, ``cifar10`` only).
      train_size: subsample the training set to this many examples, stratified by class and seeded
        (``None``: all). For ``synthetic`` it is the number of samples drawn (default 1024).
      test_size: the same for the test set (``synthetic`` default 256).
      seed: seeds the digits split, the subsampling and the synthetic data.
      subset_seed: seeds the ``train_size`` draw alone (``None``: ``seed``), so that the training subset
        varies while the split, the test subsample and everything else seeded by ``seed`` stay fixed;
        ``subset_seed=seed`` gives the same data as ``None``. No effect without ``train_size``.
      indices: train on exactly these rows of the full training split, in this order (for a training set
        chosen by a selection rule such as :func:`ntkcv.selection.rnd_select`); excludes ``train_size``.
      **options: per-data-set options; only ``synthetic`` has any: ``dim`` (input dimension, default 8)
        and ``noise`` (standard deviation of the additive Gaussian noise, default 0.1).

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: unknown name or option, a path given (or missing) where it must not be (must be), a
        subsample size out of range, ``indices`` out of range, repeated or given with ``train_size``, or
        ``subset_seed`` for ``synthetic`` (whose samples are all drawn from ``seed``).
      FileNotFoundError: standard files missing from ``path`` (the message names them).
    """
    training_examples(name, path=path, train_size=train_size, test_size=test_size, subset_seed=subset_seed,
                      indices=indices, **options)
    loader = _LOADERS[name][0]
    if name == "synthetic":
        info = DATASET_INFO[name]
        data = loader(train_size or info.train_examples, test_size or info.test_examples, seed=seed, **options)
        return data if indices is None else _select_rows(data, indices)
    data = loader(pathlib.Path(path) if path is not None else None, seed)
    rng = np.random.default_rng([seed, 1])
    x_train, y_train = _subsample(data.x_train, data.y_train, train_size, rng, "train_size")  # advances rng
    if subset_seed is not None:
        subset_rng = np.random.default_rng([subset_seed, 1])
        x_train, y_train = _subsample(data.x_train, data.y_train, train_size, subset_rng, "train_size")
    x_test, y_test = _subsample(data.x_test, data.y_test, test_size, rng, "test_size")
    data = dataclasses.replace(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return data if indices is None else _select_rows(data, indices)


def training_examples(
    name: str,
    *,
    path: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    subset_seed: int | None = None,
    indices: Sequence[int] | None = None,
    **options: Any,
) -> int:
    """The number of training examples :func:`load_dataset` gives for these arguments, known without loading
    anything (from :data:`DATASET_INFO`); checks the arguments as :func:`load_dataset` does before it loads.

    Raises:
      ValueError: as :func:`load_dataset` for its arguments; the message starts with the argument's name
        (but for an unknown data set or option).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    _, allowed_options, needs_path = _LOADERS[name]
    unknown = sorted(set(options) - set(allowed_options))
    if unknown:
        allowed = ", ".join(allowed_options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for data set {name!r}; allowed: {allowed}")
    if needs_path and path is None:
        raise ValueError(f"path is required for data set {name!r}, which is read from local files: pass path, the "
                         "directory holding them")
    if not needs_path and path is not None:
        raise ValueError(f"path must be None for data set {name!r}, which is built in and takes no path; got "
                         f"path={path!r}")
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1):
            raise ValueError(f"{label} must be a positive integer or None, got {size!r}")
    if indices is not None and train_size is not None:
        raise ValueError(f"indices and train_size exclude each other (the indices fix the training set); "
                         f"got train_size={train_size}")
    info = DATASET_INFO[name]
    if name == "synthetic":  # draws as many samples as asked
        if subset_seed is not None:
            raise ValueError(f"subset_seed must be None for data set 'synthetic', which draws every sample from "
                             f"seed; got {subset_seed!r}")
    else:
        _check_size("train_size", train_size, info.train_examples)
        _check_size("test_size", test_size, info.test_examples)
    if indices is not None:
        return len(_checked_rows(indices, info.train_examples))
    return train_size or info.train_examples


def probe_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` examples of ``(x, y)`` for probing the NTK, drawn without replacement and seeded.

    With integer labels ``y`` of shape ``(N,)`` the draw is class-balanced: classes take turns (in a seeded
    order) contributing one example each, so every class gets ``size // C`` or one more, unless it runs out
    of examples, when the others fill in. Other targets (regression) are drawn uniformly.

    Raises:
      ValueError: ``size`` is not in ``[1, N]`` or ``x`` and ``y`` differ in length.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= n:
        raise ValueError(f"size must be an integer in [1, {n}] (the number of examples), got {size!r}")
    rng = np.random.default_rng(seed)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        classes, inverse = np.unique(y, return_inverse=True)
        rank = np.empty(n, dtype=np.int64)  # position of each example in a random order within its class
        for k in range(len(classes)):
            members = rng.permutation(np.flatnonzero(inverse == k))
            rank[members] = np.arange(len(members))
        turn = rng.permutation(len(classes))  # the order in which classes contribute within a round
        chosen = np.lexsort((turn[inverse], rank))[:size]
    else:
        chosen = rng.permutation(n)[:size]
    return x[chosen], y[chosen]


# --- subsampling --------------------------------------------------------------------------------------------


def _select_rows(data: Dataset, indices: Sequence[int]) -> Dataset:
    """The training rows ``indices`` (distinct, in ``[0, N)``) of ``data``, in that order; the test set as is."""
    rows = _checked_rows(indices, len(data.x_train))
    return dataclasses.replace(data, x_train=data.x_train[rows], y_train=data.y_train[rows])


def _checked_rows(indices: Sequence[int], n: int) -> np.ndarray:
    """``indices`` as an array, checked to be distinct rows of a training split of ``n`` examples."""
    rows = np.asarray(indices)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty sequence of integers, got {indices!r}")
    bad = rows[(rows < 0) | (rows >= n)]
    if bad.size:
        raise ValueError(f"indices must be rows of the training split, in [0, {n}); got {int(bad[0])}")
    if np.unique(rows).size != rows.size:
        values, counts = np.unique(rows, return_counts=True)
        raise ValueError(f"indices must be distinct; row {int(values[counts > 1][0])} is repeated")
    return rows


def _check_size(label: str, size: int | None, n: int) -> None:
    if size is not None and size > n:
        raise ValueError(f"{label} must be at most {n} (the examples available), got {size}")


def _subsample(
    x: np.ndarray, y: np.ndarray, size: int | None, rng: np.random.Generator, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` examples in their original order; stratified by class (proportional, largest remainder) when
    ``y`` holds integer labels."""
    n = len(x)
    if size is None or size == n:
        return x, y
    _check_size(label, size, n)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        quota = counts * size / n
        take = np.floor(quota).astype(np.int64)
        by_remainder = np.argsort(-(quota - take), kind="stable")
        take[by_remainder[: size - take.sum()]] += 1
        chosen = np.concatenate([rng.permutation(np.flatnonzero(inverse == k))[:t] for k, t in enumerate(take)])
    else:
        chosen = rng.permutation(n)[:size]
    chosen.sort()
    return x[chosen], y[chosen]


# --- built-in data sets ----------------------------------------------------------------------------------


def _digits(path: pathlib.Path | None, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=DATASET_INFO["digits"].test_examples,
                                                        stratify=y, random_state=seed)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, task="classification", name="digits")


def _synthetic(train_size: int, test_size: int, *, seed: int, dim: int = 8, noise: float = 0.1) -> Dataset:
    """x ~ N(0, I_dim); y = Σ_j a_j tanh(w_j·x / √dim) + sin(v·x / √dim) + noise·ε, 16 hidden units.

    The teacher (a, w, v) and the samples are drawn from ``seed``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"synthetic option dim must be a positive integer, got {dim!r}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"synthetic option noise must be a finite number >= 0, got {noise!r}")
    rng = np.random.default_rng([seed, 2])
    hidden = 16
    w = rng.standard_normal((dim, hidden))
    a = rng.standard_normal(hidden) / np.sqrt(hidden)
    v = rng.standard_normal(dim)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, dim))
        y = np.tanh(x @ w / np.sqrt(dim)) @ a + np.sin(x @ v / np.sqrt(dim)) + noise * rng.standard_normal(n)
        return x.astype(np.float32), y[:, None].astype(np.float32)

    x_train, y_train = sample(train_size)
    x_test, y_test = sample(test_size)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=None, task="regression", name="synthetic")


# --- MNIST / Fashion-MNIST (IDX files) -------------------------------------------------------------------

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(file: pathlib.Path) -> np.ndarray:
    """An IDX array: magic ``00 00 <dtype code> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data."""
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{file} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{file} is not a valid IDX file: header for {ndim} dimensions is truncated")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{file} is a corrupt IDX file: header says shape {shape} ({expected} bytes of data), "
                         f"found {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find_files(
    directory: pathlib.Path, names: tuple[str, ...], dataset: str, suffixes: tuple[str, ...]
) -> list[pathlib.Path]:
    """The path of each of ``names`` (each possibly with one of ``suffixes``) in ``directory``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{dataset}: directory {directory} does not exist (it should hold {', '.join(names)})")
    found, missing = [], []
    for name in names:
        candidates = [directory / (name + suffix) for suffix in suffixes]
        hit = next((c for c in candidates if c.is_file()), None)
        found.append(hit)
        if hit is None:
            missing.append(" or ".join(c.name for c in candidates))
    if missing:
        raise FileNotFoundError(f"{dataset}: missing {', '.join(missing)} in {directory}")
    return found


def _idx_dataset(name: str) -> Callable[[pathlib.Path | None, int], Dataset]:
    def load(path: pathlib.Path | None, seed: int) -> Dataset:
        files = _find_files(path, _IDX_FILES, name, ("", ".gz"))
        x_train, y_train, x_test, y_test = (_read_idx(f) for f in files)
        for images, labels, images_file, labels_file in ((x_train, y_train, *files[:2]), (x_test, y_test, *files[2:])):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{name}: expected images (N, H, W) and labels (N,), got {images.shape} in "
                                 f"{images_file} and {labels.shape} in {labels_file}")
        return Dataset(_images(x_train[..., None]), y_train.astype(np.int32), _images(x_test[..., None]),
                       y_test.astype(np.int32), num_classes=10, task="classification", name=name)

    return load


def _images(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)


# --- CIFAR-10 (python pickle batches) --------------------------------------------------------------------

_CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def _cifar10(path: pathlib.Path | None, seed: int) -> Dataset:
    """The python version's pickled batches; only load files you trust (this unpickles them)."""
    directory = path
    if not (path / _CIFAR_FILES[0]).is_file() and (path / "cifar-10-batches-py").is_dir():
        directory = path / "cifar-10-batches-py"
    files = _find_files(directory, _CIFAR_FILES, "cifar10", ("",))
    batches = [_read_cifar_batch(f) for f in files]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    x_test, y_test = batches[-1]
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, task="classification", name="cifar10")


def _read_cifar_batch(file: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with open(file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{file} is not a CIFAR-10 batch: expected a pickled dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{file}: expected data (N, 3072) and labels (N,), got {data.shape} and {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> (N, H, W, C)
    return _images(images), labels.astype(np.int32)


# name -> (loader, its options, whether it reads files from a path); ``synthetic`` is called with its sizes.
_LOADERS: dict[str, tuple[Callable[..., Dataset], tuple[str, ...], bool]] = {
    "digits": (_digits, (), False),
    "synthetic": (_synthetic, ("dim", "noise"), False),
    "mnist": (_idx_dataset("mnist"), (), True),
    "fashion_mnist": (_idx_dataset("fashion_mnist"), (), True),
    "cifar10": (_cifar10, (), True),
}
