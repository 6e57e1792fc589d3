"""Integration tests on the real CIFAR-10 in $CIFAR10_DIR (set by .ci/run)."""

import os

import numpy as np
import pytest

import train_cifar10 as tc
from cifar10_cnn_model import CIFAR10CNN
from cifar10_data import load_cifar10

pytestmark = pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"),
                                reason="CIFAR10_DIR is not set (.ci/run sets it)")


@pytest.fixture(scope="module")
def cifar10():
    return load_cifar10(os.environ["CIFAR10_DIR"])


def test_real_data_counts_and_classes(cifar10):
    assert cifar10.train_images.shape == (50_000, 32, 32, 3)
    assert cifar10.test_images.shape == (10_000, 32, 32, 3)
    assert cifar10.train_images.dtype == np.uint8
    assert np.bincount(cifar10.train_labels).tolist() == [5_000] * 10
    assert np.bincount(cifar10.test_labels).tolist() == [1_000] * 10
    # The exact training-set channel means (on 0..255) pin the pixel layout.
    np.testing.assert_allclose(cifar10.train_images.reshape(-1, 3).mean(0),
                               [125.306918046875, 122.950394140625, 113.86538318359375],
                               rtol=1e-9)


@pytest.mark.slow
def test_about_100_steps_on_a_real_subset_learn(cifar10):
    # 6,400 images, batch 64, one epoch = 100 steps of a narrow network.
    config = tc.TrainConfig(epochs=1, batch_size=64, train_subset=6_400, val_fraction=0.0,
                            width=8, quiet=True)
    _, state, metrics = tc.train_and_evaluate(config, model=CIFAR10CNN(width=8), data=cifar10)
    assert int(state.step) == 100
    row = metrics["history"][0]
    assert np.isfinite(row["train_loss"])
    # Chance is 10 %; 100 steps reach about 25-30 % on the test set.
    assert metrics["test_accuracy_first1000"] > 0.18
    assert metrics["test_accuracy"] > 0.18
