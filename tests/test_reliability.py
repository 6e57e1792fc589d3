"""Resumable training, atomic saves, loading that runs no code, and the divergence guard."""

import dataclasses
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoints
import train_cifar10 as tc
import xai_io
from cifar10_cnn_model import CIFAR10CNN
from test_train import synthetic_data  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tc.TrainConfig(recipe="default", lr=0.05, epochs=3, batch_size=8, width=4,
                        val_fraction=0.2, quiet=True)

_RUN = """
import sys
import jax, numpy as np
import cifar10_data, train_cifar10 as tc
arrays = np.load(sys.argv[1])
data = cifar10_data.Cifar10(*(arrays[k] for k in cifar10_data.Cifar10._fields))
config = tc.TrainConfig(recipe="default", lr=0.05, epochs=int(sys.argv[3]), batch_size=8,
                        width=4, val_fraction=0.2, quiet=True, checkpoint_dir=sys.argv[2],
                        resume=sys.argv[4] == "resume")
_, state, _ = tc.train_and_evaluate(config, data=data)
leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
np.savez(sys.argv[5], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
"""


def _env():
    """The subprocesses share the suite's persistent compilation cache."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")


def _start(tmp_path, states, epochs, mode, out):
    env = _env()
    return subprocess.Popen([sys.executable, "-c", _RUN, str(tmp_path / "data.npz"),
                             str(states), str(epochs), mode, str(out)], env=env)


@pytest.mark.slow
def test_sigkill_in_mid_run_then_resume_gives_bit_identical_params(synthetic_data,
                                                                   tmp_path):
    np.savez(tmp_path / "data.npz", **synthetic_data._asdict())
    epochs = 12
    killed = _start(tmp_path, tmp_path / "killed", epochs, "fresh", tmp_path / "killed.npz")
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "state_0003.pkl").exists():
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()  # it really died before the end
    survivors = sorted(p.name for p in (tmp_path / "killed").glob("state_*.pkl"))
    assert 3 <= len(survivors) <= 3 + 1 and survivors[-1] < f"state_{epochs:04d}.pkl"
    resumed = _start(tmp_path, tmp_path / "killed", epochs, "resume", tmp_path / "killed.npz")
    # meanwhile, the same run uninterrupted, in this process
    config = dataclasses.replace(CONFIG, epochs=epochs, checkpoint_dir=str(tmp_path / "whole"))
    _, whole, _ = tc.train_and_evaluate(config, data=synthetic_data)
    assert resumed.wait(timeout=240) == 0
    b = np.load(tmp_path / "killed.npz")
    leaves = jax.tree_util.tree_flatten_with_path(whole.params)[0]
    assert sorted(b.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    for path, value in leaves:
        np.testing.assert_array_equal(b[jax.tree_util.keystr(path)], np.asarray(value),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    states = tmp_path_factory.mktemp("states")
    config = dataclasses.replace(CONFIG, checkpoint_dir=str(states), keep=2)
    _, state, metrics = tc.train_and_evaluate(config, data=synthetic_data)
    return config, state, metrics, states


def test_each_epoch_saves_the_whole_state_and_keeps_the_newest(trained, synthetic_data):
    config, state, metrics, states = trained
    assert sorted(p.name for p in states.iterdir()) == ["state_0002.pkl", "state_0003.pkl"]
    template = tc.create_train_state(CIFAR10CNN(width=4), config, jax.random.key(9), 30)
    restored, epoch, history = tc.load_state(states / "state_0003.pkl", template,
                                             tc.run_settings(config))
    assert epoch == 3 and history == metrics["history"]
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        jax.tree.map(np.asarray, jax.device_get(state.params)),
                        jax.device_get(restored.params))
    assert all(jax.tree.leaves(same))
    assert int(restored.step) == int(state.step)
    np.testing.assert_array_equal(jax.random.key_data(restored.dropout_key),
                                  jax.random.key_data(state.dropout_key))


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_more(trained, synthetic_data):
    config, state, metrics, _ = trained
    _, again, again_metrics = tc.train_and_evaluate(dataclasses.replace(config, resume=True),
                                                    data=synthetic_data)
    assert again_metrics["history"] == metrics["history"]
    assert int(again.step) == int(state.step)
    # the report of a resumed run still counts the training time of every epoch
    assert metrics["resumed_after_epoch"] == 0 and again_metrics["resumed_after_epoch"] == 3
    assert again_metrics["train_time_s"] == metrics["train_time_s"] == pytest.approx(
        sum(row["train_s"] for row in metrics["history"]))
    assert again_metrics["train_time_s"] > 0


@pytest.mark.slow
def test_resume_refuses_a_state_trained_with_other_settings(trained, synthetic_data):
    config, _, _, _ = trained
    other = dataclasses.replace(config, resume=True, lr=0.1)
    with pytest.raises(ValueError, match=r"other settings \(saved, now\): \{'lr': \(0.05, 0.1\)\}"):
        tc.train_and_evaluate(other, data=synthetic_data)


def test_a_truncated_state_is_refused_clearly(trained, tmp_path):
    config, _, _, states = trained
    broken = tmp_path / "state_0001.pkl"
    broken.write_bytes((states / "state_0003.pkl").read_bytes()[:1000])
    template = tc.create_train_state(CIFAR10CNN(width=4), config, jax.random.key(0), 30)
    with pytest.raises(ValueError, match="is not readable .*delete it to resume"):
        tc.load_state(broken, template, tc.run_settings(config))


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_epoch_and_step(synthetic_data, tmp_path):
    config = dataclasses.replace(CONFIG, lr=1e12, epochs=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"loss became \w+ at epoch \d, step \d+"):
        tc.train_and_evaluate(config, data=synthetic_data)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("loader", ["checkpoint", "state"])
def test_a_malicious_pickle_never_runs_its_payload(loader, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"params": _Payload(marker), "leaves": [_Payload(marker)]}, f)
    with pytest.raises(ValueError, match="is not (a )?readable"):
        if loader == "checkpoint":
            tc.load_checkpoint(path)
        else:
            template = tc.create_train_state(CIFAR10CNN(width=4), CONFIG, jax.random.key(0))
            tc.load_state(path, template, tc.run_settings(CONFIG))
    assert not marker.exists()


_SLOW_SAVE = """
import pickle, sys, time
import jax, jax.numpy as jnp
import checkpoints
import train_cifar10 as tc
from cifar10_cnn_model import CIFAR10CNN

def half_then_hang(obj, f, protocol=None):
    data = pickle.dumps(obj, protocol=protocol)
    f.write(data[:len(data) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

model = CIFAR10CNN(width=4)
variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
checkpoints.pickle.dump = half_then_hang
tc.save_checkpoint(sys.argv[1], model, variables)
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    model = CIFAR10CNN(width=4)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    path = tmp_path / "model.pkl"
    tc.save_checkpoint(path, model, variables)
    before = path.read_bytes()
    env = _env()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert path.read_bytes() == before
    _, loaded = tc.load_checkpoint(path)
    same = jax.tree.map(np.array_equal, loaded["params"], jax.device_get(variables["params"]))
    assert all(jax.tree.leaves(same))


def test_a_failed_save_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    model = CIFAR10CNN(width=4)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    path = tmp_path / "model.pkl"
    tc.save_checkpoint(path, model, variables)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xai_io.os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"could not write .*model.pkl.* \(No space left on "
                                      r"device\); the previous file is unchanged"):
        tc.save_checkpoint(path, model, variables)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pkl"]  # no temporary file left


def _tampered(tmp_path, change):
    model = CIFAR10CNN(width=4)
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(0),
                                                   np.zeros((1, 32, 32, 3), np.float32)))
    path = tmp_path / "model.pkl"
    tc.save_checkpoint(path, model, variables)
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    change(checkpoint)
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c["params"]["head"].pop("Dense_1"), r"does not match its model config .*"
                                                   r"missing \[\"\['params'\]\['head'\]"),
    (lambda c: c["config"]["model"].update(width=8),
     r"\['mean'\] must be a float array of shape \(8,\), got float32\(4,\)"),
    (lambda c: c["params"]["block1"]["Conv_0"].update(kernel=np.zeros((3, 3, 3, 5))),
     r"\['params'\]\['block1'\]\['Conv_0'\]\['kernel'\] must be a float array of shape "
     r"\(3, 3, 3, 4\), got float64\(3, 3, 3, 5\)"),
    (lambda c: c["batch_stats"]["block1"]["BatchNorm_0"].update(mean=[0.0] * 4),
     r"does not match its model config .*missing .*\['BatchNorm_0'\]\['mean'\]"),
    (lambda c: c.pop("batch_stats"), "is not a readable cifar10-xai checkpoint"),
    (lambda c: c["config"].pop("model"), "is not a readable cifar10-xai checkpoint"),
])
def test_load_checkpoint_checks_the_structure_against_the_model(tmp_path, change, message):
    path = _tampered(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        tc.load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused_clearly(tmp_path):
    path = _tampered(tmp_path, lambda c: None)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="is not a readable cifar10-xai checkpoint"):
        tc.load_checkpoint(path)


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.mark.slow
def test_a_fresh_run_never_touches_another_runs_states(trained, synthetic_data):
    config, _, _, states = trained
    before = _contents(states)
    with pytest.raises(ValueError, match=r"holds the training states of another run, "
                                         r"trained with other settings \(saved, now\): "
                                         r"\{'lr': \(0.05, 0.1\)\}; choose another"):
        tc.train_and_evaluate(dataclasses.replace(config, lr=0.1), data=synthetic_data)
    assert _contents(states) == before


@pytest.mark.slow
def test_a_fresh_run_of_an_unfinished_run_says_how_to_resume_it(trained, synthetic_data,
                                                                 tmp_path):
    config, _, _, states = trained
    stopped = tmp_path / "stopped"
    shutil.copytree(states, stopped)
    (stopped / "state_0003.pkl").unlink()  # as if killed during epoch 3
    config = dataclasses.replace(config, checkpoint_dir=str(stopped))
    with pytest.raises(ValueError) as info:
        tc.train_and_evaluate(config, data=synthetic_data)
    message = str(info.value)
    assert "holds this run, stopped after epoch 2 of 3; resume it with `python " in message
    command = shlex.split(message.split("`")[1])
    assert tc.parse_args(command[2:]) == dataclasses.replace(config, resume=True)
    assert sorted(p.name for p in stopped.iterdir()) == ["state_0002.pkl"]


@pytest.mark.slow
def test_a_fresh_run_of_a_finished_run_starts_it_over(trained, synthetic_data, tmp_path):
    config, state, metrics, states = trained
    again = tmp_path / "again"
    shutil.copytree(states, again)
    (again / "state_0002.pkl").rename(again / "state_0001.pkl")  # would survive pruning
    old = (again / "state_0003.pkl").stat().st_mtime_ns
    _, state2, metrics2 = tc.train_and_evaluate(
        dataclasses.replace(config, checkpoint_dir=str(again)), data=synthetic_data)
    assert sorted(p.name for p in again.iterdir()) == ["state_0002.pkl", "state_0003.pkl"]
    assert (again / "state_0003.pkl").stat().st_mtime_ns != old
    # the same run again, from the start: the same losses and parameters
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in metrics2["history"]] == [
        (r["epoch"], r["train_loss"], r["val_loss"]) for r in metrics["history"]]
    same = jax.tree.map(np.array_equal, jax.device_get(state2.params),
                        jax.device_get(state.params))
    assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_resuming_nothing_names_the_other_runs_of_that_checkpoint(trained, synthetic_data,
                                                                  tmp_path):
    config, _, _, states = trained
    ran = dataclasses.replace(config, output=str(tmp_path / "m.pkl"))
    shutil.copytree(states, tc.run_directory(ran))
    other = dataclasses.replace(ran, lr=0.1)
    other = dataclasses.replace(other, checkpoint_dir=str(tc.run_directory(other)),
                                resume=True)
    with pytest.raises(ValueError) as info:
        tc.train_and_evaluate(other, data=synthetic_data)
    message = str(info.value)
    assert message.startswith(f"nothing to resume: '{other.checkpoint_dir}' holds no "
                              "training state of this run")
    assert (f"other runs of this checkpoint: {tc.run_directory(ran)} (finished; "
            "settings (there, here): {'lr': (0.05, 0.1)}; resume it with `python") in message
    command = shlex.split(message.split("`")[1])
    assert tc.parse_args(command[2:]) == dataclasses.replace(
        ran, checkpoint_dir=str(tc.run_directory(ran)), resume=True)
