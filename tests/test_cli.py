"""Every command line meets a user's mistake with one clear line and a non-zero exit
status, never a traceback: one table of (script, arguments, status, what the message
names), run through each script's `main` as `python script.py ...` runs it, and once per
script as a real subprocess.

Each mistake is caught before anything is compiled or written, so the table is cheap.
"""

import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import xai_cli as cli
import demo_xai
import evaluate_xai
import train_cifar10 as tc
import xai_visualizations as xv

ROOT = Path(__file__).resolve().parents[1]


def _script_module(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {"train": tc, "demo": demo_xai, "evaluate": evaluate_xai,
           "bench_train": _script_module("benchmarks/bench_train.py"),
           "bench_xai": _script_module("benchmarks/bench_xai.py")}
PATHS = {"train": "train_cifar10.py", "demo": "demo_xai.py", "evaluate": "evaluate_xai.py",
         "bench_train": "benchmarks/bench_train.py", "bench_xai": "benchmarks/bench_xai.py"}


def _state_record(config, epoch):
    """A training-state file's record, as `save_state` writes it (no arrays needed:
    the run folder is checked before any array is read)."""
    return {"format": 1, "epoch": epoch, "leaves": [], "history": [],
            "config": tc.run_settings(config)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_variables):
    """The broken and foreign files of the table, by name."""
    root = tmp_path_factory.mktemp("mistakes")
    truncated = root / "truncated_data"
    truncated.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (truncated / name).write_bytes(bytes(100))  # the first one read fails
    (root / "no_data").mkdir()
    (root / "a_file").write_text("not a folder")

    tiny = root / "tiny.pkl"
    tc.save_checkpoint(tiny, tiny_model, tiny_variables)
    checkpoint = pickle.loads(tiny.read_bytes())
    for name, change in [("wider.pkl", lambda c: c["config"]["model"].update(width=8)),
                         ("resnet.pkl", lambda c: c["config"].update(
                             model={"num_classes": 10, "depth": 20}))]:
        changed = pickle.loads(pickle.dumps(checkpoint))
        change(changed)
        (root / name).write_bytes(pickle.dumps(changed))
    (root / "truncated.pkl").write_bytes(tiny.read_bytes()[:1000])

    smoke = tc.parse_args(["--smoke"])
    other_run = root / "other_run"
    other_run.mkdir()
    (other_run / "state_0002.pkl").write_bytes(pickle.dumps(_state_record(
        tc.TrainConfig(epochs=2, lr=0.05), 2)))
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "state_0001.pkl").write_bytes(pickle.dumps(_state_record(smoke, 1)))
    (root / "state_0001.pkl").write_bytes((unfinished / "state_0001.pkl").read_bytes())
    return {p.name: str(p) for p in root.iterdir()}


# (id, script, arguments with {file} placeholders, exit status, fragments of the message)
CASES = [
    # ---------------------------------------------------------------- training
    ("train: a colliding checkpoint folder", "train",
     ["--smoke", "--checkpoint-dir", "{other_run}"], 2,
     ["other_run' holds the training states of another run",
      "(saved, now): {'batch_size': (128, 64)", "choose another --checkpoint-dir"]),
    ("train: a fresh run over its own unfinished run", "train",
     ["--smoke", "--checkpoint-dir", "{unfinished}"], 2,
     ["unfinished' holds this run, stopped after epoch 1 of 2; resume it with `python ",
      "--smoke --checkpoint-dir ", "--resume`"]),
    ("train: --resume with nothing saved", "train", ["--smoke", "--resume"], 2,
     ["nothing to resume: 'xai_results/smoke_model.states/", "run without --resume"]),
    ("train: --resume a run of another width", "train",
     ["--smoke", "--width", "4", "--resume", "--checkpoint-dir", "{unfinished}"], 2,
     ["cannot resume from ", "state_0001.pkl", "{'width': (8, 4)}"]),
    ("train: a data folder with a truncated file", "train",
     ["--smoke", "--data-dir", "{truncated_data}"], 1,
     ["data_batch_1.bin: size is 100 bytes, expected 30,730,000"]),
    ("train: a data folder without CIFAR-10", "train", ["--smoke", "--data-dir", "{no_data}"],
     1, ["no_data' holds no CIFAR-10 data"]),
    ("train: zero epochs", "train", ["--epochs", "0"], 2, ["epochs must be >= 1, got 0"]),
    ("train: an unknown recipe", "train", ["--recipe", "adamw"], 2,
     ["argument --recipe: invalid choice: 'adamw'"]),
    ("train: an unknown architecture", "train", ["--model", "convnext"], 2,
     ["argument --model: invalid choice: 'convnext' (choose from 'cnn', 'resnet20', "
      "'efficientnet', 'cct', 'vit')"]),
    ("train: an output inside a file", "train", ["--smoke", "--output", "{a_file}/m.pkl"], 2,
     ["--output ", "a_file/m.pkl' cannot be written", "is a file, not a folder"]),
    # ---------------------------------------------------------------- demo
    ("demo: a missing checkpoint", "demo", ["--checkpoint", "missing.pkl"], 1,
     ["checkpoint 'missing.pkl' does not exist; train one with"]),
    ("demo: a folder as the checkpoint", "demo", ["--checkpoint", "{no_data}"], 1,
     ["checkpoint '", "no_data' is a folder; give the .pkl file"]),
    ("demo: a truncated checkpoint", "demo", ["--checkpoint", "{truncated.pkl}"], 2,
     ["truncated.pkl' is not a readable cifar10-xai checkpoint"]),
    ("demo: a checkpoint of another width", "demo", ["--checkpoint", "{wider.pkl}"], 2,
     ["wider.pkl'", "must be a float array of shape (8,), got float32(4,)"]),
    ("demo: a checkpoint of another architecture", "demo", ["--checkpoint", "{resnet.pkl}"],
     2, ["resnet.pkl' holds another architecture", "'depth': 20"]),
    ("demo: a training state instead of a checkpoint", "demo",
     ["--checkpoint", "{state_0001.pkl}"], 2, ["state_0001.pkl'", "it is a training state"]),
    ("demo: a data folder with a truncated file", "demo",
     ["--checkpoint", "{tiny.pkl}", "--data-dir", "{truncated_data}", "--quiet"], 1,
     ["data_batch_1.bin: size is 100 bytes"]),
    ("demo: an unknown layer", "demo", ["--checkpoint", "{tiny.pkl}", "--layer", "conv9"], 2,
     ["--layer 'conv9' is not a module of CIFAR10CNN; its layers are block1 (32×32×4)",
      "(aliases: conv1 = block1; conv2 = block2; conv3 = block3)"]),
    ("demo: no images", "demo", ["--num-images", "0"], 2,
     ["argument --num-images: must be an int >= 1, got 0"]),
    ("demo: an output folder that is a file", "demo", ["--output-dir", "{a_file}"], 2,
     ["--output-dir must be a folder path", "a_file', which is a file"]),
    # ---------------------------------------------------------------- evaluation
    ("evaluate: an unknown method", "evaluate", ["--methods", "deeplift"], 2,
     ["argument --methods: invalid choice: 'deeplift'"]),
    ("evaluate: an unknown layer", "evaluate",
     ["--checkpoint", "{tiny.pkl}", "--methods", "gradcam", "--layer", "fc1", "--quiet"], 2,
     ["layer 'fc1' is not a module of CIFAR10CNN; its layers are block1 (32×32×4)"]),
    ("evaluate: a method that cannot explain the model", "evaluate",
     ["--checkpoint", "{tiny.pkl}", "--methods", "attention_rollout", "--quiet"], 2,
     ["method 'attention_rollout' cannot explain CIFAR10CNN: attention rollout needs a model "
      "that sows its attention probabilities"]),
    ("evaluate: a missing checkpoint", "evaluate", ["--checkpoint", "nope.pkl"], 1,
     ["checkpoint 'nope.pkl' does not exist"]),
    ("evaluate: a checkpoint of another width", "evaluate", ["--checkpoint", "{wider.pkl}"], 2,
     ["wider.pkl'", "must be a float array of shape (8,)"]),
    ("evaluate: a data folder with a truncated file", "evaluate",
     ["--checkpoint", "{tiny.pkl}", "--data-dir", "{truncated_data}", "--quiet"], 1,
     ["data_batch_1.bin: size is 100 bytes"]),
    ("evaluate: an output folder inside a file", "evaluate",
     ["--output-dir", "{a_file}/evaluation"], 2, ["--output-dir ", "is a file, not a folder"]),
    # ---------------------------------------------------------------- benchmarks
    ("bench_train: batch 0", "bench_train", ["--batch-size", "128", "0"], 2,
     ["argument --batch-size: must be an int >= 1, got 0"]),
    ("bench_train: an unknown precision", "bench_train", ["--precision", "fp16"], 2,
     ["argument --precision: invalid choice: 'fp16'"]),
    ("bench_xai: an unknown method", "bench_xai", ["--methods", "deeplift"], 2,
     ["argument --methods: invalid choice: 'deeplift'"]),
    ("bench_xai: no repeats", "bench_xai", ["--repeats", "0"], 2,
     ["argument --repeats: must be an int >= 1, got 0"]),
]


def _argv(args, files):
    return [re.sub(r"\{([^}]+)\}", lambda m: files[m[1]], a) for a in args]


@pytest.mark.parametrize("script, args, status, fragments",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_a_users_mistake_is_one_line_and_an_exit_status(script, args, status, fragments,
                                                        files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the scripts' default outputs land here, if anywhere
    monkeypatch.setattr(sys, "argv", [str(ROOT / PATHS[script])])  # argparse's prog
    before = {name: Path(path).stat().st_mtime_ns for name, path in files.items()}
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script].main(_argv(args, files))
    out, err = capsys.readouterr()
    assert info.value.code == status
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"{Path(PATHS[script]).name}: error: ")
    if "usage:" not in err:  # argparse prints its usage first; our errors are one line
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing was written
    assert {name: Path(path).stat().st_mtime_ns for name, path in files.items()} == before


@pytest.mark.slow
def test_every_script_ends_a_mistake_without_a_traceback_when_run(files, tmp_path):
    """The same through `python script.py` in a subprocess, once per script."""
    chosen = ["train: a colliding checkpoint folder", "demo: a checkpoint of another width",
              "evaluate: an unknown layer", "bench_train: batch 0", "bench_xai: no repeats"]
    runs = []
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for case in chosen:
        _, script, args, status, fragments = next(c for c in CASES if c[0] == case)
        runs.append((case, status, fragments, subprocess.Popen(
            [sys.executable, str(ROOT / PATHS[script]), *_argv(args, files)], cwd=tmp_path,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for case, status, fragments, process in runs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == status, (case, err)
        assert "Traceback" not in out + err, case
        assert all(fragment in err for fragment in fragments), (case, err)


# ------------------------------------------------------------------ the wrapper itself


def test_the_wrapper_keeps_the_traceback_of_a_bug():
    @cli.entry_point
    def broken(argv=None):
        np.zeros(3).reshape(2, 2)  # raised inside numpy: a bug, not a user's mistake

    with pytest.raises(ValueError, match="cannot reshape"):
        broken([])

    @cli.entry_point
    def missing_key(argv=None):
        return {}["key"]

    with pytest.raises(KeyError):
        missing_key([])

    @cli.entry_point
    def jax_error(argv=None):  # JAX hides its frames: the last one left is a line of ours
        return jax.jit(lambda x: xv.overlay(x, np.zeros((32, 32))))(np.zeros((32, 32, 3)))

    with pytest.raises(TypeError, match="traced array"):
        jax_error([])


def test_the_wrapper_turns_our_own_errors_into_a_status(capsys):
    @cli.entry_point
    def bad_config(argv=None):
        tc.TrainConfig(epochs=0)  # raised by the project's own check

    with pytest.raises(SystemExit) as info:
        bad_config([])
    assert info.value.code == 2
    assert capsys.readouterr().err == "test_cli.py: error: epochs must be >= 1, got 0\n"

    @cli.entry_point
    def interrupted(argv=None):
        raise KeyboardInterrupt("resume with: python x.py --resume")

    with pytest.raises(SystemExit) as info:
        interrupted([])
    assert info.value.code == cli.INTERRUPTED == 130
    assert capsys.readouterr().err == ("test_cli.py: interrupted; resume with: "
                                       "python x.py --resume\n")


def test_check_writable_accepts_new_folders_and_refuses_files_in_the_way(tmp_path):
    cli.check_writable(tmp_path / "new" / "deeper" / "model.pkl", "--output")
    cli.check_writable(tmp_path / "new" / "figures", "--output-dir", folder=True)
    (tmp_path / "model.pkl").write_bytes(b"old")
    cli.check_writable(tmp_path / "model.pkl", "--output")  # it will be replaced atomically
    with pytest.raises(ValueError, match=r"--output must be a file path, got .*, which is "
                                         r"a folder"):
        cli.check_writable(tmp_path, "--output")
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.slow
def test_make_demo_explains_the_shipped_checkpoint_unless_you_trained_your_own():
    """After a smoke run (xai_results/smoke_model.pkl), `make demo` still picks the
    shipped checkpoint: only cifar10_model.pkl in the repo root would come first."""
    printed = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    expected = ("cifar10_model.pkl" if (ROOT / "cifar10_model.pkl").is_file()
                else "pretrained/cifar10_cnn.pkl")
    assert f"demo_xai.py --checkpoint {expected}\n" in printed
