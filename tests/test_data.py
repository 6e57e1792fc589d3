import hashlib
import http.server
import io
import pickle
import pickletools
import socket
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import cifar10_data
import xai_core
from cifar10_data import DataError, load_cifar10, load_folder, split_train_val
from conftest import RECORDS, write_binary_layout, write_python_layout


def assert_matches(data, train, test):
    np.testing.assert_array_equal(data.train_images, train[0])
    np.testing.assert_array_equal(data.train_labels, train[1])
    np.testing.assert_array_equal(data.test_images, test[0])
    np.testing.assert_array_equal(data.test_labels, test[1])
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32


def test_binary_layout_record_format(tmp_path):
    # One hand-made record: label 7, red plane all 1, green 2, blue 3, except pixel
    # (row 0, col 1) whose red byte is 200.
    planes = np.concatenate([np.full(1024, c, np.uint8) for c in (1, 2, 3)])
    planes[1] = 200
    (tmp_path / "one.bin").write_bytes(bytes([7]) + planes.tobytes())
    images, labels = cifar10_data.read_binary_batch(tmp_path / "one.bin", records=1)
    assert labels.tolist() == [7]
    assert images.shape == (1, 32, 32, 3)
    assert images[0, 0, 1].tolist() == [200, 2, 3]
    assert images[0, 5, 5].tolist() == [1, 2, 3]


def test_binary_and_python_layouts_load_the_same_arrays(binary_dataset, tmp_path):
    folder, train, test = binary_dataset
    assert_matches(load_folder(folder, RECORDS), train, test)
    # The parent folder works too, and so does the python layout.
    assert_matches(load_folder(folder.parent, RECORDS), train, test)
    write_python_layout(tmp_path / "cifar-10-batches-py", train, test)
    ops = [(op.name, arg) for op, arg, _ in
           pickletools.genops((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())]
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops  # as Python 2 wrote it
    assert ("SHORT_BINSTRING", "data") in ops and ("GLOBAL", "_codecs encode") not in ops
    assert_matches(load_folder(tmp_path, RECORDS), train, test)
    write_python_layout(tmp_path / "py3" / "cifar-10-batches-py", train, test, py2=False)
    assert_matches(load_folder(tmp_path / "py3", RECORDS), train, test)


def test_cifar10_dir_is_the_default_folder(binary_dataset, monkeypatch):
    folder, train, test = binary_dataset
    monkeypatch.setenv("CIFAR10_DIR", str(folder))
    assert_matches(load_cifar10(records=RECORDS), train, test)


def test_split_is_deterministic_disjoint_and_90_10():
    images = np.arange(1000)[:, None]
    labels = np.arange(1000)
    a = split_train_val(images, labels, 0.1, seed=3)
    b = split_train_val(images, labels, 0.1, seed=3)
    c = split_train_val(images, labels, 0.1, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[3], c[3])
    assert len(a[1]) == 900 and len(a[3]) == 100
    assert sorted(np.concatenate([a[1], a[3]]).tolist()) == list(range(1000))
    np.testing.assert_array_equal(a[0][:, 0], a[1])  # images and labels stay paired
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        split_train_val(images, labels, 1.5)


@pytest.fixture
def fresh_copy(binary_dataset, tmp_path):
    """A writable copy of the synthetic binary layout."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for f in binary_dataset[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_truncated_file_is_refused_naming_file_and_size(fresh_copy):
    path = fresh_copy / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: size is 61,360 bytes, "
                                        r"expected 61,460"):
        load_folder(fresh_copy, RECORDS)


def test_bad_label_byte_is_refused_naming_file_and_record(fresh_copy):
    path = fresh_copy / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[4 * 3073] = 12  # label byte of record 4
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test_batch\.bin: record 4 has label byte 12, "
                                        r"expected 0\.\.9"):
        load_folder(fresh_copy, RECORDS)


def test_checksum_mismatch_is_refused(fresh_copy):
    path = fresh_copy / "data_batch_1.bin"
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    (fresh_copy / "SHA256SUMS").write_text(f"{good}  data_batch_1.bin\n")
    load_folder(fresh_copy, RECORDS)  # a matching checksum loads
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # same size, same labels, one pixel flipped
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"data_batch_1\.bin: sha256 checksum does not match"):
        load_folder(fresh_copy, RECORDS)


def test_missing_file_is_refused_not_loaded_partially(fresh_copy):
    (fresh_copy / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match=r"incomplete CIFAR-10 data, missing data_batch_5\.bin"):
        load_folder(fresh_copy, RECORDS)


def test_folder_without_data_names_both_layouts(tmp_path):
    with pytest.raises(DataError, match=r"holds no CIFAR-10 data: expected the binary layout "
                                        r"\(cifar-10-batches-bin.*python layout"):
        load_folder(tmp_path)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_python_layout_never_executes_code_from_the_pickle(binary_dataset, tmp_path):
    _, train, test = binary_dataset
    folder = tmp_path / "cifar-10-batches-py"
    write_python_layout(folder, train, test)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": []}, f)
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR-10 python batch "
                                        r".*refusing to load pathlib"):
        load_folder(folder, RECORDS)
    assert not marker.exists()


def test_python_layout_with_wrong_shape_is_refused(binary_dataset, tmp_path):
    _, train, test = binary_dataset
    folder = tmp_path / "cifar-10-batches-py"
    write_python_layout(folder, train, test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((RECORDS, 100), np.uint8), b"labels": [0] * RECORDS}, f)
    with pytest.raises(DataError, match=r"test_batch: data is uint8\(20, 100\), "
                                        r"expected uint8\(20, 3072\)"):
        load_folder(folder, RECORDS)


# ---------------------------------------------------------------- download


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tiny .tar.gz in the official layout; returns (bytes, train, test)."""
    root = tmp_path_factory.mktemp("archive")
    train, test = write_binary_layout(root / "cifar-10-batches-bin", np.random.default_rng(5))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return buf.getvalue(), train, test


@pytest.fixture
def server(archive):
    """Serves the archive from 127.0.0.1; yields its URL."""
    payload = archive[0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-binary.tar.gz"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no-tfds"))


@pytest.mark.parametrize("fetcher", ["tfds", "urllib"])
def test_download_verifies_extracts_and_caches(archive, server, no_local_data, tmp_path,
                                               monkeypatch, fetcher):
    payload, train, test = archive
    if fetcher == "urllib":  # tensorflow-datasets is optional: the standard library fetches
        monkeypatch.setattr(cifar10_data, "_import_tfds", lambda: None)
    kwargs = dict(cache_dir=tmp_path / "cache", url=server, size=len(payload),
                  sha256=hashlib.sha256(payload).hexdigest(), records=RECORDS)
    assert_matches(load_cifar10(**kwargs), train, test)
    assert (tmp_path / "cache" / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    # Second call: the extracted cache is used, no network needed.
    assert_matches(load_cifar10(**{**kwargs, "url": "http://127.0.0.1:9/gone"}), train, test)


def test_tampered_archive_is_refused_and_deleted(archive, server, no_local_data, tmp_path):
    payload = archive[0]
    wrong = hashlib.sha256(payload + b"x").hexdigest()
    with pytest.raises(DataError, match=r"sha256 is [0-9a-f]{64}, expected " + wrong):
        load_cifar10(cache_dir=tmp_path / "cache", url=server, size=len(payload),
                     sha256=wrong, records=RECORDS)
    with pytest.raises(DataError, match=r"has [0-9,]+ bytes, expected 170,052,171"):
        load_cifar10(cache_dir=tmp_path / "cache", url=server, records=RECORDS)
    assert not (tmp_path / "cache" / "cifar-10-batches-bin").exists()
    assert [p for p in (tmp_path / "cache" / "downloads").iterdir() if p.is_file()] == []


def test_offline_without_data_names_the_three_ways(no_local_data, tmp_path):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as info:
        load_cifar10(cache_dir=tmp_path / "cache", url=f"http://127.0.0.1:{port}/c.tar.gz")
    message = str(info.value)
    for way in ("--data-dir", "CIFAR10_DIR", "TFDS_DATA_DIR", "download"):
        assert way in message


def test_sources_are_tried_in_order(binary_dataset, no_local_data, monkeypatch, tmp_path):
    folder, train, test = binary_dataset
    fake_tfds = cifar10_data.Cifar10(*(a[:3] for a in (*train, *test)))
    monkeypatch.setattr(cifar10_data, "load_tfds", lambda d: fake_tfds)
    # a folder beats tfds
    assert_matches(load_cifar10(folder, records=RECORDS), train, test)
    # tfds beats the download (the URL would fail)
    data = load_cifar10(cache_dir=tmp_path, url="http://127.0.0.1:9/x", records=RECORDS)
    assert data is fake_tfds


def test_unprepared_tfds_dir_falls_through(tmp_path):
    (tmp_path / "cifar10").mkdir()
    assert cifar10_data.load_tfds(tmp_path) is None
    assert cifar10_data.load_tfds(tmp_path / "absent") is None


class _FakeBuilder:
    """Stands in for a prepared tfds `cifar10` builder (preparing one needs TensorFlow)."""

    def __init__(self, file_format, splits):
        self.info = types.SimpleNamespace(file_format=file_format)
        self.data_dir = "/tfds/cifar10/3.0.2"
        self.splits = splits

    def is_prepared(self):
        return True

    def as_data_source(self, split):
        images, labels = self.splits[split]
        return [{"id": str(i), "image": x, "label": y}
                for i, (x, y) in enumerate(zip(images, labels))]


@pytest.fixture
def fake_tfds(binary_dataset, monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    _, train, test = binary_dataset
    (tmp_path / "cifar10").mkdir()

    def install(file_format, splits={"train": train, "test": test}):
        fake = types.SimpleNamespace(builder=lambda name, data_dir: _FakeBuilder(
            file_format, splits), core=tfds.core)
        monkeypatch.setattr(cifar10_data, "_import_tfds", lambda: fake)
        return tmp_path

    return install


def test_tfds_array_record_copy_reads_without_tensorflow(binary_dataset, fake_tfds):
    import tensorflow_datasets as tfds

    _, train, test = binary_dataset
    folder = fake_tfds(tfds.core.FileFormat.ARRAY_RECORD)
    assert_matches(cifar10_data.load_tfds(folder), train, test)


def test_tfds_tfrecord_copy_without_tensorflow_is_skipped_with_a_warning(fake_tfds,
                                                                         monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(cifar10_data, "_has_tensorflow", lambda: False)
    folder = fake_tfds(tfds.core.FileFormat.TFRECORD)
    with pytest.warns(UserWarning, match="tfrecord copy of cifar10, which needs TensorFlow"):
        assert cifar10_data.load_tfds(folder) is None


def test_tfds_copy_with_bad_labels_is_refused(binary_dataset, fake_tfds):
    import tensorflow_datasets as tfds

    _, train, test = binary_dataset
    folder = fake_tfds(tfds.core.FileFormat.ARRAY_RECORD,
                       {"train": (train[0], train[1] + 10), "test": test})
    with pytest.raises(DataError, match=r"\(train\): record 0 has label byte 10"):
        cifar10_data.load_tfds(folder)


def test_map_batches_pads_the_last_batch_cuts_the_padding_and_compiles_once(caplog):
    """10 rows in batches of 4 (4, 4, 2 + 2 padding rows): the outputs are row-wise
    `fn` of every row, in order, as numpy; device and host inputs give the same; the
    jitted `fn` compiles once, and device inputs are cut by one compiled program per
    input array for all three offsets (JAX's compile log, `jax.log_compiles`)."""
    import logging

    import chex
    import jax
    import jax.numpy as jnp

    rows = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    labels = np.arange(10, dtype=np.int32)
    shapes = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(x, y):
        shapes.append(x.shape)
        return {"sum": x.sum(axis=1), "label": y * 2}

    seen = []
    for inputs in ([rows, labels], [jnp.asarray(rows), jnp.asarray(labels)]):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            out = xai_core.map_batches(fn, inputs, 4, on_batch=seen.append)
        assert isinstance(out["sum"], np.ndarray)
        np.testing.assert_array_equal(out["sum"], rows.sum(axis=1))
        np.testing.assert_array_equal(out["label"], labels * 2)
    assert shapes == [(4, 3)] and seen == [4, 4, 2] * 2
    compiled = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Finished XLA compilation")]
    assert len(compiled) == 2, compiled  # the device-side cutter: rows, then labels
