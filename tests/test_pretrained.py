"""The shipped pretrained checkpoints, one per architecture: small, plain, documented, and
as good as they say."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

import checkpoints
import train_cifar10 as tc
from architectures import MODELS, registry_name
from checkpoints import pretrained_checkpoints
from cifar10_data import load_cifar10
from xai_io import file_sha256

SHIPPED = pretrained_checkpoints()


def test_the_cnn_is_shipped():
    assert SHIPPED["cnn"] == checkpoints.PRETRAINED


@pytest.mark.parametrize("name", list(SHIPPED))
def test_pretrained_checkpoint_is_small_plain_and_loads_both_ways(name):
    path = SHIPPED[name]
    assert path.stat().st_size <= 10 * 2**20
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)  # the seed's plain REPL way
    assert set(checkpoint) == {"params", "batch_stats", "config", "metrics"}
    model, variables = tc.load_checkpoint(path)
    assert registry_name(model) == name and model.num_classes == 10
    assert MODELS[name].config(model) == MODELS[name].config(MODELS[name].build())  # defaults
    same = jax.tree.map(np.array_equal, variables["params"], checkpoint["params"])
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("name", list(SHIPPED))
def test_pretrained_report_holds_config_history_accuracies_device_and_command(name):
    report = json.loads(SHIPPED[name].with_suffix(".json").read_text())
    assert report["config"]["train"]["recipe"] == "default"
    assert report["config"]["train"].get("model", "cnn") == name
    assert len(report["history"]) == report["config"]["train"]["epochs"]
    for key in ("val_accuracy", "test_accuracy_first1000", "test_accuracy",
                "test_accuracy_tta_first1000", "test_accuracy_tta", "wall_time_s", "device"):
        assert report[key] is not None, key
    assert report["command"].startswith("python train_cifar10.py")


@pytest.fixture(scope="module")
def exact_test_records():
    """The first 1,000 test records (the exact ones) of the real CIFAR-10, read once."""
    if not os.environ.get("CIFAR10_DIR"):
        pytest.skip("CIFAR10_DIR is not set (.ci/run sets it)")
    data = load_cifar10(os.environ["CIFAR10_DIR"])
    return (data.test_images[:tc.EXACT_TEST_RECORDS].copy(),
            data.test_labels[:tc.EXACT_TEST_RECORDS].copy())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED))
def test_pretrained_accuracy_is_what_its_report_says(name, exact_test_records):
    model, variables = tc.load_checkpoint(SHIPPED[name])
    images, labels = exact_test_records
    forward = jax.jit(lambda x: model.apply(variables, x / 255.0))
    logits = np.concatenate([forward(images[i:i + 250]) for i in range(0, len(images), 250)])
    report = json.loads(SHIPPED[name].with_suffix(".json").read_text())
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(
        report["test_accuracy_first1000"], abs=1e-3)


INT8 = checkpoints.PRETRAINED_DIR / "cifar10_cnn_int8.pkl"


def test_the_int8_cnn_is_a_quarter_of_the_size_and_loads_as_any_checkpoint():
    xc = pytest.importorskip("xai_compression")
    pytest.importorskip("qwix")
    model, variables = checkpoints.load_checkpoint(INT8)
    record = xc.record(model)
    assert {k: v for k, v in record.items() if k != "original"} == {
        "quantization": "int8", "calibration_images": 1024}
    assert record["original"]["sha256"] == file_sha256(checkpoints.PRETRAINED)
    with open(INT8, "rb") as f:
        raw = pickle.load(f)
    assert raw["params"]["block1"]["Conv_0"]["kernel"]["qvalue"].dtype == np.int8
    float_model, float_variables = checkpoints.load_checkpoint(checkpoints.PRETRAINED)
    shipped = xc.weight_bytes(raw["params"], "int8")
    assert xc.weight_bytes(checkpoints.plain(float_variables["params"])) >= 3.5 * shipped
    report = json.loads(INT8.with_suffix(".json").read_text())
    assert report["size"]["weight_bytes"] == shipped
    assert report["command"].startswith("python compress_xai.py --checkpoint "
                                        "pretrained/cifar10_cnn.pkl ")


PRUNED = checkpoints.PRETRAINED_DIR / "cifar10_cnn_pruned.pkl"


def test_the_pruned_cnn_is_narrower_with_half_the_flops_and_loads_as_any_checkpoint():
    xc = pytest.importorskip("xai_compression")
    model, variables = checkpoints.load_checkpoint(PRUNED)
    float_model, float_variables = checkpoints.load_checkpoint(checkpoints.PRETRAINED)
    assert type(model) is type(float_model)
    def widths(variables, rank):
        return [v.shape[-1] for p, v in jax.tree_util.tree_flatten_with_path(
            variables["params"])[0] if p[-1].key == "kernel" and v.ndim == rank]
    # 30 % of every convolution's filters gone; the Dense layers keep their widths
    assert widths(variables, 4) == [round((1 - 0.3) * w) for w in widths(float_variables, 4)]
    assert widths(variables, 2) == widths(float_variables, 2)
    assert xc.flops(model, variables) <= 0.5 * xc.flops(float_model, float_variables)
    report = json.loads(PRUNED.with_suffix(".json").read_text())
    assert {k: v for k, v in report["compression"].items() if k not in (
        "original", "finetune_device")} == {"pruning": "filters", "fraction": 0.3,
                                            "criterion": "bn_scale", "finetune_epochs": 15}
    assert report["compression"]["original"]["sha256"] == file_sha256(checkpoints.PRETRAINED)


@pytest.mark.slow
def test_the_int8_cnn_loses_at_most_half_a_point_and_the_pruned_one_a_point(
        exact_test_records):
    pytest.importorskip("qwix")
    images, labels = exact_test_records
    images = images / np.float32(255)
    # the float CNN's own accuracy is its report's (test_pretrained_accuracy_is_what_its_
    # report_says holds them equal), so it is not computed again here
    accuracy = {"cifar10_cnn.pkl": json.loads(checkpoints.PRETRAINED.with_suffix(
        ".json").read_text())["test_accuracy_first1000"]}
    for path in (INT8, PRUNED):
        model, variables = checkpoints.load_checkpoint(path)
        forward = jax.jit(model.apply)
        logits = np.concatenate([forward(variables, images[i:i + 250])
                                 for i in range(0, len(images), 250)])
        accuracy[path.name] = np.mean(logits.argmax(1) == labels)
    report = json.loads(INT8.with_suffix(".json").read_text())
    assert accuracy["cifar10_cnn_int8.pkl"] == pytest.approx(
        report["metrics"]["test_accuracy_first1000"], abs=1e-3)
    assert accuracy["cifar10_cnn_int8.pkl"] >= accuracy["cifar10_cnn.pkl"] - 0.005
    assert accuracy["cifar10_cnn_pruned.pkl"] >= accuracy["cifar10_cnn.pkl"] - 0.01
