"""A newcomer's first hour, as real commands in a fresh folder with the data in
CIFAR10_DIR: smoke training, a second training with other settings, the smoke run again,
a run killed and resumed with the command it printed, the demo on the default
checkpoint, and the evaluation of one method.

The data are full-size synthetic files in the official binary layout (the reader takes
only complete files), so the test needs no download and no real data.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import to_binary_records

pytestmark = pytest.mark.slow  # real commands in subprocesses, training included

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 10_000  # per file, as in the official data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (RECORDS, 32, 32, 3), dtype=np.uint8)
        labels = (np.arange(RECORDS) % 10).astype(np.int32)
        (folder / name).write_bytes(to_binary_records(images, labels))
    return folder


@pytest.fixture
def run(data_dir, tmp_path):
    """Runs `python <script> args...` in a fresh folder, as a user would."""
    env = dict(os.environ, CIFAR10_DIR=str(data_dir), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")

    def start(script, *args, wait=True):
        process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        if not wait:
            return process
        out, err = process.communicate(timeout=300)
        assert "Traceback" not in out + err, err
        assert process.returncode == 0, err
        return out

    return start


def _resume_command(printed):
    """The command after 'resume it with:' / 'resume with:', ready to run here."""
    line = next(line for line in printed.splitlines() if "resume" in line and "with: " in line)
    words = shlex.split(line.split("with: ", 1)[1])
    assert words[0] == "python"
    return words


def test_a_newcomers_first_hour(run, tmp_path):
    home = tmp_path
    smoke = home / "xai_results" / "smoke_model.pkl"

    # 1. smoke training: into xai_results/, never over cifar10_model.pkl
    out = run("train_cifar10.py", "--smoke")
    assert "test accuracy" in out and f"wrote {smoke.relative_to(home)}" in out
    assert smoke.is_file() and not (home / "cifar10_model.pkl").exists()
    states = home / "xai_results" / "smoke_model.states"
    assert [len(list(d.iterdir())) for d in states.iterdir()] == [2]  # one run, 2 epochs

    # 2. a second training with other settings, then the smoke run again: both succeed
    run("train_cifar10.py", "--smoke", "--epochs", "1", "--quiet")
    assert sorted(len(list(d.iterdir())) for d in states.iterdir()) == [1, 2]
    out = run("train_cifar10.py", "--smoke")
    assert "starting over: this run finished before" in out

    # 3. a run killed in mid-run, resumed with the command it printed
    process = run("train_cifar10.py", "--smoke", "--epochs", "4", "--output",
                  "runs/long.pkl", wait=False)
    deadline = time.time() + 240
    while not list((home / "runs").glob("long.states/*/state_0001.pkl")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert "train_cifar10.py: interrupted; the state after epoch" in err
    command = _resume_command(out)  # printed when it started ...
    assert command == _resume_command(err)  # ... and when it was interrupted
    assert command[1:] == [str(ROOT / "train_cifar10.py"), "--smoke", "--epochs", "4",
                           "--output", "runs/long.pkl", "--resume"]
    out = run(*command[1:])
    assert "resuming after epoch" in out and (home / "runs" / "long.pkl").is_file()

    # 4. the demo on the default checkpoint: the shipped one, not the smoke model
    report = json.loads((ROOT / "pretrained" / "cifar10_cnn.json").read_text())
    out = run("demo_xai.py", "--num-images", "2", "--num-detailed", "0", "--num-eval", "20",
              "--num-misclassified", "1", "--num-compare", "0")  # (test_demo.py draws it)
    assert (f"explaining {ROOT / 'pretrained' / 'cifar10_cnn.pkl'} (the shipped checkpoint):"
            f" recorded test accuracy {report['test_accuracy_first1000']:.1%} on the first "
            f"1,000 test records, {report['test_accuracy']:.1%} on all") in out
    assert (home / "xai_results" / "batch_gradcam.png").is_file()

    # 5. the evaluation of one method, on the model trained above
    out = run("evaluate_xai.py", "--checkpoint", str(smoke.relative_to(home)), "--methods",
              "gradcam", "--num-images", "4", "--chunk", "4", "--randomization-images", "2",
              "--step", "256", "--faithfulness-subsets", "8", "--infidelity-perturbations", "4",
              "--focus-mosaics", "0", "--quiet")
    card = json.loads((home / "xai_results" / "evaluation" / "evaluation.json").read_text())
    assert list(card["methods"]) == ["gradcam"]
    assert card["config"]["checkpoint"] == "xai_results/smoke_model.pkl"
