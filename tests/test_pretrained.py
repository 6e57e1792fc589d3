"""The shipped pretrained checkpoint: small, plain, documented, and as good as it says."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

import train_cifar10 as tc
from cifar10_data import load_cifar10

REPORT = tc.PRETRAINED.with_suffix(".json")


def test_pretrained_checkpoint_is_small_plain_and_loads_both_ways():
    assert tc.PRETRAINED.stat().st_size <= 10 * 2**20
    with open(tc.PRETRAINED, "rb") as f:
        checkpoint = pickle.load(f)  # the seed's plain REPL way
    assert set(checkpoint) == {"params", "batch_stats", "config", "metrics"}
    model, variables = tc.load_checkpoint(tc.PRETRAINED)
    assert (model.width, model.num_classes) == (64, 10)
    same = jax.tree.map(np.array_equal, variables["params"], checkpoint["params"])
    assert all(jax.tree.leaves(same))


def test_pretrained_report_holds_config_history_accuracies_device_and_command():
    report = json.loads(REPORT.read_text())
    assert report["config"]["train"]["recipe"] == "default"
    assert len(report["history"]) == report["config"]["train"]["epochs"]
    for key in ("val_accuracy", "test_accuracy_first1000", "test_accuracy",
                "test_accuracy_tta_first1000", "test_accuracy_tta", "wall_time_s", "device"):
        assert report[key] is not None, key
    assert report["command"].startswith("python train_cifar10.py")


@pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"),
                    reason="CIFAR10_DIR is not set (.ci/run sets it)")
def test_pretrained_accuracy_is_what_its_report_says():
    data = load_cifar10(os.environ["CIFAR10_DIR"])
    model, variables = tc.load_checkpoint(tc.PRETRAINED)
    images = data.test_images[:tc.EXACT_TEST_RECORDS]
    labels = data.test_labels[:tc.EXACT_TEST_RECORDS]
    forward = jax.jit(lambda x: model.apply(variables, x / 255.0))
    logits = np.concatenate([forward(images[i:i + 250]) for i in range(0, len(images), 250)])
    report = json.loads(REPORT.read_text())
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(
        report["test_accuracy_first1000"], abs=1e-3)
