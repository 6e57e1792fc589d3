"""Multi-process runs on one machine, as on N hosts: two CPU processes on 127.0.0.1 join
through `jax.distributed` (gloo collectives), each started by the same command with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, against one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoints
import xai_cli

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--smoke", "--epochs", "1", "--width", "4", "--batch-size", "16",
         "--train-subset", "256", "--quiet"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script, args, cwd, data_dir, process=None, **extra):
    env = dict(os.environ, CIFAR10_DIR=str(data_dir), JAX_PLATFORMS="cpu", **extra,
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    for name in xai_cli.DISTRIBUTED_ENV:
        env.pop(name, None)
    if process is not None:
        index, count, port = process
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in err, err
    return out


@pytest.fixture(scope="module")
def data_dir():
    """The real CIFAR-10 ($CIFAR10_DIR, set by .ci/run): the scripts read whole files."""
    if not os.environ.get("CIFAR10_DIR"):
        pytest.skip("CIFAR10_DIR is not set (.ci/run sets it)")
    return os.environ["CIFAR10_DIR"]


@pytest.mark.slow
def test_two_processes_or_two_devices_train_the_parameters_of_one(data_dir, tmp_path):
    """The same command in two processes (one CPU device each, the batch split between
    them, BatchNorm over the whole batch) and in one process with two CPU devices gives
    the same parameters (and those of one device: test_train's data-parallel test); only
    process 0 writes the checkpoint and the training states. The two-device run
    evaluates the 10,000 test records in 625 batches dispatched without waiting (it
    deadlocked when each gathered its outputs across the devices)."""
    for folder in ("two", "devices"):
        (tmp_path / folder).mkdir()
    port = free_port()
    both = [start("train_cifar10.py", FLAGS, tmp_path / "two", data_dir, (i, 2, port))
            for i in range(2)]
    devices = start("train_cifar10.py", FLAGS, tmp_path / "devices", data_dir,
                    XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                    + " --xla_force_host_platform_device_count=2")
    outs = [finish(p) for p in both]
    finish(devices)
    assert "process 1 of 2" in outs[1] and "wrote" in outs[0] and "wrote" not in outs[1]
    smoke = Path("xai_results") / "smoke_model.pkl"
    _, two = checkpoints.load_checkpoint(tmp_path / "two" / smoke)
    _, other = checkpoints.load_checkpoint(tmp_path / "devices" / smoke)
    leaves = jax.tree_util.tree_flatten_with_path(two)[0]
    assert len(leaves) == len(jax.tree.leaves(other))
    for (path, a), b in zip(leaves, jax.tree.leaves(other)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5,
                                   err_msg=f"devices {jax.tree_util.keystr(path)}")
    states = list((tmp_path / "two" / "xai_results" / "smoke_model.states").rglob("*.pkl"))
    assert [p.name for p in states] == ["state_0001.pkl"]


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
     "JAX_NUM_PROCESSES must be set to an int when JAX_COORDINATOR_ADDRESS is set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES = 2), got 2"),
])
def test_a_half_described_launch_is_refused_in_words(monkeypatch, env, message):
    for name in xai_cli.DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as error:
        xai_cli.start_distributed()
    assert message in str(error.value)


TIMINGS = {"ms_per_image", "compile_s", "deletion_insertion_s", "measures_s", "device"}


def numbers(tree, path=""):
    """{path: value} of every number in a report, timings and the device left out."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if key not in TIMINGS
                for k, v in numbers(value, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in numbers(value, f"{path}/{i}").items()}
    return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.slow
def test_two_processes_evaluate_the_card_of_one(data_dir, tmp_path, tiny_model, tiny_variables):
    """Each process explains and measures its share of the images, each batch split over
    its two CPU devices, and every process gathers the rest: process 0's card (four
    devices in two processes) equals one process's on one device within 1e-6. Grad-CAM with
    the keyed measures (ROAD's noise, the random subsets and perturbations, the random
    maps and weights): each is drawn once per key for the whole batch. (SmoothGrad's
    noise, drawn per sample under `vmap`, is the same for an image wherever it sits in
    a batch only with JAX's default threefry, not with the tests' rbg; checked once by
    hand with threefry, as in docs/evaluating.md.)"""
    import json

    import train_cifar10 as tc

    checkpoint = tmp_path / "tiny.pkl"
    tc.save_checkpoint(checkpoint, tiny_model, tiny_variables)
    flags = ["--checkpoint", str(checkpoint), "--methods", "gradcam",
             "--num-images", "7", "--chunk", "4", "--randomization-images", "3", "--step",
             "128", "--batch-size", "128",
             "--faithfulness-subsets", "8", "--infidelity-perturbations", "4",
             "--focus-mosaics", "0", "--quiet"]
    port = free_port()
    both = [start("evaluate_xai.py", flags + ["--output-dir", str(tmp_path / "two")], tmp_path,
                  data_dir, (i, 2, port),
                  XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                  + " --xla_force_host_platform_device_count=2") for i in range(2)]
    alone = start("evaluate_xai.py", flags + ["--output-dir", str(tmp_path / "one")], tmp_path,
                  data_dir)
    outs = [finish(p) for p in both]
    finish(alone)
    assert "process 1 of 2" in outs[1]
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert one["device"].endswith("x1 (jax " + jax.__version__ + ")"), one["device"]
    assert two["device"].endswith("x4 (jax " + jax.__version__ + ")"), two["device"]
    one, two = numbers(one), numbers(two)
    assert set(one) == set(two) and len(one) > 50
    differ = {path: (value, two[path]) for path, value in one.items()
              if two[path] != pytest.approx(value, abs=1e-6, rel=1e-6)}
    assert not differ, differ
