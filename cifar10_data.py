"""CIFAR-10 loading: uint8 images (N, 32, 32, 3) and int32 labels (N,), train and test.

Sources, tried in this order:
  a. a folder (`data_dir` argument or the CIFAR10_DIR variable) in either official
     layout, `cifar-10-batches-bin` or `cifar-10-batches-py`;
  b. a prepared tensorflow-datasets copy of `cifar10` under TFDS_DATA_DIR;
  c. the official binary archive, downloaded into a cache folder and verified.

Every file is checked (size, shape, label range, checksums where known): a partial or
corrupt data set raises `DataError` naming the file and the fault, never loads silently.
"""

import os
import pickle
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from xai_io import file_sha256, safe_pickle_load
from xai_cache import user_cache_dir

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASS_NAMES)
RECORDS_PER_FILE = 10_000
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
IMAGE_BYTES = 32 * 32 * 3
# Test records 0..999 are exact in this project's shared data; the rest are JPEG-degraded,
# so accuracy is reported on both.
EXACT_TEST_RECORDS = 1000

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_SIZE = 170_052_171
ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
ARCHIVE_FOLDER = "cifar-10-batches-bin"


class DataError(RuntimeError):
    """The CIFAR-10 data is missing, incomplete or corrupt."""


class Cifar10(NamedTuple):
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray


# ---------------------------------------------------------------- file formats


def read_binary_batch(path, records: int = RECORDS_PER_FILE):
    """Reads one file of the binary layout: `records` x (1 label byte + 3072 pixels)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    expected = records * (1 + IMAGE_BYTES)
    if raw.size != expected:
        raise DataError(f"{path}: size is {raw.size:,} bytes, expected {expected:,} "
                        f"({records:,} records of {1 + IMAGE_BYTES} bytes); the file is "
                        "truncated or not a CIFAR-10 binary batch")
    raw = raw.reshape(records, 1 + IMAGE_BYTES)
    labels = raw[:, 0].astype(np.int32)
    images = raw[:, 1:].reshape(records, 3, 32, 32).transpose(0, 2, 3, 1)
    _check_labels(labels, path)
    return np.ascontiguousarray(images), labels


def read_python_batch(path, records: int = RECORDS_PER_FILE):
    """Reads one pickle file of the python layout, without executing code from it."""
    path = Path(path)
    try:
        batch = safe_pickle_load(path, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            IndexError, AttributeError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({e!r})") from None
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.shape != (records, IMAGE_BYTES):
        raise DataError(f"{path}: data is {data.dtype}{data.shape}, expected "
                        f"uint8({records}, {IMAGE_BYTES})")
    if labels.shape != (records,):
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels, "
                        f"expected {records}")
    labels = labels.astype(np.int32)
    _check_labels(labels, path)
    images = data.reshape(records, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _check_labels(labels, path):
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: record {bad[0]} has label byte {labels[bad[0]]}, "
                        f"expected 0..{NUM_CLASSES - 1} ({bad.size} bad records)")


def _verify_sha256sums(folder: Path):
    """Checks the files listed in the folder's SHA256SUMS, when it has one."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        if path.is_file() and file_sha256(path) != digest:
            raise DataError(f"{path}: sha256 checksum does not match {sums}; "
                            "the file is corrupt")


# ---------------------------------------------------------------- sources


def find_layout(data_dir) -> Optional[tuple]:
    """Returns (folder, 'bin' | 'py') for a folder holding, or being, an official layout."""
    root = Path(data_dir).expanduser()
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").exists() or (folder / "test_batch.bin").exists():
            return folder, "bin"
        if (folder / "data_batch_1").exists() or (folder / "test_batch").exists():
            return folder, "py"
    return None


def load_folder(data_dir, records: int = RECORDS_PER_FILE) -> Cifar10:
    """Loads the binary or the python layout from `data_dir` (or its official subfolder)."""
    found = find_layout(data_dir)
    if found is None:
        raise DataError(
            f"data_dir {str(data_dir)!r} holds no CIFAR-10 data: expected the binary layout "
            "(cifar-10-batches-bin: data_batch_1.bin .. data_batch_5.bin, test_batch.bin) "
            "or the python layout (cifar-10-batches-py: data_batch_1 .. 5, test_batch)")
    folder, layout = found
    suffix, read = (".bin", read_binary_batch) if layout == "bin" else ("", read_python_batch)
    missing = [n + suffix for n in TRAIN_FILES + (TEST_FILE,)
               if not (folder / (n + suffix)).is_file()]
    if missing:
        raise DataError(f"{folder}: incomplete CIFAR-10 data, missing {', '.join(missing)}")
    _verify_sha256sums(folder)
    train = [read(folder / (n + suffix), records) for n in TRAIN_FILES]
    test_images, test_labels = read(folder / (TEST_FILE + suffix), records)
    return Cifar10(np.concatenate([x for x, _ in train]),
                   np.concatenate([y for _, y in train]), test_images, test_labels)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    return tfds


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def load_tfds(tfds_data_dir) -> Optional[Cifar10]:
    """Reads a prepared tensorflow-datasets `cifar10`, or returns None when unusable.

    An array_record copy reads through `tfds.data_source`, without TensorFlow; a
    tfrecord copy needs TensorFlow, so it is used only when TensorFlow is installed.
    """
    if not (Path(tfds_data_dir).expanduser() / "cifar10").is_dir():
        return None
    tfds = _import_tfds()
    if tfds is None:
        return None
    builder = tfds.builder("cifar10", data_dir=str(Path(tfds_data_dir).expanduser()))
    if not builder.is_prepared():
        return None
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        def read(split):
            source = builder.as_data_source(split=split)
            records = [source[i] for i in range(len(source))]
            return (np.stack([r["image"] for r in records]),
                    np.array([r["label"] for r in records]))
    elif _has_tensorflow():
        def read(split):
            return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                    as_supervised=True))
    else:
        warnings.warn(f"{builder.data_dir} holds a tfrecord copy of cifar10, which needs "
                      "TensorFlow; it is not installed, so this copy is skipped")
        return None
    arrays = []
    for split in ("train", "test"):
        images, labels = read(split)
        if images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
            raise DataError(f"{builder.data_dir}: tfds split {split!r} has images "
                            f"{images.shape} and {len(labels)} labels, expected (N, 32, 32, 3)")
        _check_labels(labels, f"{builder.data_dir} ({split})")
        arrays += [images.astype(np.uint8), labels.astype(np.int32)]
    return Cifar10(*arrays)


def default_cache_dir() -> Path:
    """Where the downloaded archive is kept: the user cache folder."""
    return user_cache_dir()


def _check_reachable(url, timeout: float = 10.0):
    """Fails fast when offline: tfds's downloader retries a dead host for minutes."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


def _fetch(url, download_dir: Path) -> Path:
    """Downloads `url` with tensorflow-datasets' DownloadManager, else the standard library."""
    _check_reachable(url)
    tfds = _import_tfds()
    if tfds is not None:
        manager = tfds.download.DownloadManager(download_dir=str(download_dir))
        return Path(manager.download(url))
    import urllib.request
    target = download_dir / Path(url).name
    download_dir.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as r, \
            tempfile.NamedTemporaryFile(dir=download_dir, delete=False) as f:
        while block := r.read(1 << 20):
            f.write(block)
    os.replace(f.name, target)
    return target


def verify_archive(path, size: int, sha256: str):
    """Raises DataError unless the file has exactly the expected size and sha256."""
    actual = os.path.getsize(path)
    if actual != size:
        raise DataError(f"{path}: downloaded archive has {actual:,} bytes, expected "
                        f"{size:,}; the download is incomplete or not CIFAR-10")
    digest = file_sha256(path)
    if digest != sha256:
        raise DataError(f"{path}: downloaded archive sha256 is {digest}, expected "
                        f"{sha256}; refusing a corrupt or tampered archive")


def _extract(archive: Path, dest: Path) -> Path:
    """Extracts the archive's `cifar-10-batches-bin/` into `dest`, atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parts[:1] == (ARCHIVE_FOLDER,)
                       and ".." not in Path(m.name).parts]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / ARCHIVE_FOLDER, dest / ARCHIVE_FOLDER)
    return dest / ARCHIVE_FOLDER


def download(cache_dir=None, url: str = ARCHIVE_URL, size: int = ARCHIVE_SIZE,
             sha256: str = ARCHIVE_SHA256) -> Path:
    """Downloads, verifies and extracts the binary archive; returns the extracted folder."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / ARCHIVE_FOLDER
    if folder.is_dir():
        return folder
    archive = _fetch(url, cache_dir / "downloads")
    try:
        verify_archive(archive, size, sha256)
    except DataError:
        # Drop the bad file (and tfds's record of it) so that a retry downloads again.
        for bad in (archive, Path(f"{archive}.INFO")):
            bad.unlink(missing_ok=True)
        raise
    return _extract(archive, cache_dir)


def load_cifar10(data_dir=None, *, tfds_data_dir=None, cache_dir=None,
                 url: str = ARCHIVE_URL, size: int = ARCHIVE_SIZE,
                 sha256: str = ARCHIVE_SHA256,
                 records: int = RECORDS_PER_FILE) -> Cifar10:
    """Loads CIFAR-10 from the first available source (see the module docstring).

    Args:
      data_dir: folder with an official layout; defaults to $CIFAR10_DIR. When given,
        it must hold the data: no other source is tried.
      tfds_data_dir: tensorflow-datasets data dir; defaults to $TFDS_DATA_DIR, then
        ~/tensorflow_datasets.
      cache_dir: where the downloaded archive is kept; defaults to ~/.cache/cifar10-xai.
      url, size, sha256: the archive to download and its expected size and checksum.
      records: records per file (10,000 in the official data; tests use fewer).

    Returns:
      A `Cifar10` tuple of uint8 images (N, 32, 32, 3) and int32 labels.
    """
    data_dir = data_dir or os.environ.get("CIFAR10_DIR")
    if data_dir:
        return load_folder(data_dir, records)
    tfds_data_dir = (tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
                     or Path.home() / "tensorflow_datasets")
    data = load_tfds(tfds_data_dir)
    if data is not None:
        return data
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        folder = download(cache_dir, url, size, sha256)
    except DataError:
        raise
    except Exception as e:  # network failures come from several libraries
        raise DataError(
            f"CIFAR-10 was not found and could not be downloaded ({type(e).__name__}: {e}).\n"
            "Provide it in one of three ways:\n"
            "  1. a folder with the official binary or python layout, given by --data-dir "
            "or the CIFAR10_DIR environment variable;\n"
            "  2. a prepared tensorflow-datasets copy of 'cifar10' under TFDS_DATA_DIR;\n"
            f"  3. internet access, to download {url} into {cache_dir}.") from None
    return load_folder(folder, records)


def split_train_val(images, labels, val_fraction: float = 0.1, seed: int = 0):
    """Deterministic shuffled split; returns (train_images, train_labels, val_images, val_labels)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val]
