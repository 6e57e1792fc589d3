"""Shared fixtures: tiny models and synthetic CIFAR-10 files, built once per session."""

import os
import pickle
import struct
from pathlib import Path

# The tests draw their random numbers with JAX's "rbg" generator instead of the default
# threefry: its programs compile several times faster on the CPU (the tiny model's
# jitted init: 7.0 s -> 1.9 s), and this suite is compile-bound. The code paths are the
# same; only the bits drawn differ. Set through the environment, so that the training
# subprocesses the tests start draw the same numbers as the tests themselves.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# XLA:CPU compiles the tests' thousands of small programs about a fifth faster with
# LLVM's expensive passes off and the backend at optimisation level 1 instead of 2
# (tests/test_any_model.py cold: 81.5 s -> 66 s of CPU, 2026-12-02). The programs compute
# the same values; level 0 does not (it broke single-image Grad-CAM), so it is not used.
# Set in the environment, so that the subprocesses the tests start compile the same way.
# XLA:CPU's legacy fusion emitters compile faster again than its newer MLIR ones: one
# program of six explainers on a small ResNet, 6.0 s -> 4.9 s of CPU with equal maps
# (2026-12-04).
SPEED_FLAGS = ("--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=1"
               " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SPEED_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

# Compilation dominates these small tests; the persistent cache makes reruns fast, and
# within one cold run lets each command-line subprocess (they inherit the environment)
# load what another process already compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests draw the same examples on every run and keep no example database, so a
# run is repeatable and writes nothing; no per-example deadline, since the first example
# of each test compiles.
settings.register_profile("repo", derandomize=True, database=None, deadline=None,
                          max_examples=25)
settings.load_profile("repo")

RECORDS = 20  # records per synthetic batch file

# `make test` runs `--dist loadfile`: each of the two workers takes the next whole file
# when it is free. Long files collected last would leave one worker idle at the end, so
# the longest (by their cold times on the 2-core CPU) are collected first.
LONGEST_FIRST = ("test_first_hour.py", "test_distributed.py", "test_traced.py", "test_app.py",
                 "test_demo.py", "test_any_model.py",
                 "test_train.py", "test_adversarial.py", "test_architectures.py",
                 "test_compress_cli.py", "test_methods.py", "test_xai.py", "test_packaging.py",
                 "test_reliability.py", "test_app_browser.py", "test_evaluate.py",
                 "test_road.py", "test_integration.py", "test_cli.py", "test_metrics.py",
                 "test_lrp.py", "test_properties.py", "test_surrogates.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def make_split(rng, n):
    """Random uint8 images (n, 32, 32, 3) and labels covering every class."""
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.int32)
    return images, labels


def to_binary_records(images, labels):
    """Official binary records: label byte, then the R, G and B planes row-major."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def write_binary_layout(folder, rng, records=RECORDS):
    """Writes a complete binary layout; returns the expected (train, test) arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [make_split(rng, records) for _ in range(5)]
    for i, (x, y) in enumerate(train, 1):
        (folder / f"data_batch_{i}.bin").write_bytes(to_binary_records(x, y))
    test = make_split(rng, records)
    (folder / "test_batch.bin").write_bytes(to_binary_records(*test))
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way the official Python 2 files are: str as BINSTRING opcodes
    and numpy's reconstructor under its old `numpy.core.multiarray` name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                    else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(
            obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def write_python_layout(folder, train, test, records=RECORDS, py2=True):
    """Writes the same arrays in the python (pickle) layout, Python 2 style by default."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images = np.concatenate([train[0], test[0]])
    labels = np.concatenate([train[1], test[1]])
    for k, name in enumerate(names):
        x = images[k * records:(k + 1) * records]
        batch = {b"data": x.transpose(0, 3, 1, 2).reshape(records, -1),
                 b"labels": labels[k * records:(k + 1) * records].tolist(),
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            if py2:
                Py2Pickler(f, protocol=2).dump(batch)
            else:  # as Python 3 re-pickles it: bytes go through _codecs.encode
                pickle.dump(batch, f, protocol=2)


@pytest.fixture
def threefry():
    """JAX's default PRNG, for the tests of SmoothGrad's batch invariance: `vmap` over
    keys draws what per-key calls draw only with threefry, not with rbg."""
    with jax.default_prng_impl("threefry2x32"):
        yield


@pytest.fixture(scope="session")
def binary_dataset(tmp_path_factory):
    """(folder, (train_images, train_labels), (test_images, test_labels))."""
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    train, test = write_binary_layout(folder, np.random.default_rng(0))
    return folder, train, test


@pytest.fixture(scope="session")
def tiny_model():
    from cifar10_cnn_model import CIFAR10CNN
    return CIFAR10CNN(width=4)


@pytest.fixture(scope="session")
def tiny_variables(tiny_model):
    return jax.jit(tiny_model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="session")
def images():
    """Eight fixed float images in [0, 1]."""
    return jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
