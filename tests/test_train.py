import dataclasses
import json
import pickle
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoints
import cifar10_data
import train_cifar10 as tc
from cifar10_cnn_model import CIFAR10CNN

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tc.TrainConfig(recipe="seed", epochs=2, batch_size=16, lr=1e-2, train_subset=None, width=4,
                        val_fraction=0.25, quiet=True)


@pytest.fixture(scope="session")
def synthetic_data():
    """64 train and 40 test images whose class is readable from the mean colour."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = (np.arange(n) % 10).astype(np.int32)
        base = (labels * 25).astype(np.uint8)[:, None, None, None]
        noise = rng.integers(0, 20, size=(n, 32, 32, 3), dtype=np.uint8)
        return base + noise, labels

    return cifar10_data.Cifar10(*make(64), *make(40))


@pytest.fixture(scope="session")
def trained(synthetic_data):
    return tc.train_and_evaluate(CONFIG, data=synthetic_data)


def test_flags_map_one_to_one_onto_the_config():
    help_text = tc.build_parser().format_help()
    for field in dataclasses.fields(tc.TrainConfig):
        assert "--" + field.name.replace("_", "-") in help_text
        assert field.metadata["help"].split()[0] in help_text
    config = tc.parse_args(["--epochs", "3", "--batch-size", "32", "--lr", "0.01", "--seed",
                            "7", "--val-fraction", "0.2", "--train-subset", "500",
                            "--width", "16", "--data-dir", "d", "--output", "m.pkl",
                            "--history-plot", "h.png", "--quiet", "--recipe", "seed"])
    expected = tc.TrainConfig(recipe="seed", epochs=3, batch_size=32, lr=0.01, seed=7,
                              val_fraction=0.2, train_subset=500, width=16, data_dir="d",
                              output="m.pkl", history_plot="h.png", quiet=True)
    # the command line saves training states by default, in the run's own folder; the
    # library only when asked
    assert config == dataclasses.replace(
        expected, checkpoint_dir=str(tc.run_directory(expected)))
    assert Path(config.checkpoint_dir).parent == Path("m.states")
    default = tc.TrainConfig()
    assert tc.parse_args([]) == dataclasses.replace(
        default, checkpoint_dir=str(tc.run_directory(default)))
    smoke = tc.TrainConfig(**{**tc.SMOKE, "epochs": 5})
    assert tc.parse_args(["--smoke", "--epochs", "5"]) == dataclasses.replace(
        smoke, checkpoint_dir=str(tc.run_directory(smoke)))
    assert tc.parse_args(["--checkpoint-dir", "s", "--keep", "5", "--resume"]) == (
        tc.TrainConfig(checkpoint_dir="s", keep=5, resume=True))


def test_each_run_has_its_own_states_folder_named_by_its_output_and_settings():
    smoke = tc.parse_args(["--smoke"])
    assert smoke.output == "xai_results/smoke_model.pkl"  # never over cifar10_model.pkl
    assert Path(smoke.checkpoint_dir).parent == Path("xai_results/smoke_model.states")
    assert Path(tc.parse_args([]).checkpoint_dir).parent == Path("cifar10_model.states")
    assert tc.history_plot_path(smoke) == Path("xai_results/smoke_model_history.png")
    # every setting that shapes the run gives another folder ...
    shaping = [("--epochs", "3"), ("--lr", "0.05"), ("--seed", "1"), ("--width", "4"),
               ("--batch-size", "32"), ("--train-subset", "512"), ("--val-fraction", "0.2"),
               ("--recipe", "seed"), ("--precision", "bf16"), ("--steps-per-call", "2")]
    folders = {tc.parse_args(["--smoke", flag, value]).checkpoint_dir
               for flag, value in shaping}
    assert len(folders | {smoke.checkpoint_dir}) == len(shaping) + 1
    # ... and the rest keep it: the same run, resumed quietly from another data copy
    for extra in (["--quiet"], ["--keep", "5"], ["--data-dir", "d"], ["--resume"],
                  ["--history-plot", "h.png"]):
        assert tc.parse_args(["--smoke", *extra]).checkpoint_dir == smoke.checkpoint_dir


def test_the_printed_resume_command_resumes_the_same_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert tc.command_line(tc.parse_args(["--smoke"])) == (
        "python train_cifar10.py --smoke --resume")
    assert tc.command_line(tc.parse_args(["--smoke", "--epochs", "3"])) == (
        "python train_cifar10.py --smoke --epochs 3 --resume")
    for argv in ([], ["--lr", "0.05", "--output", "runs/a b.pkl", "--quiet"],
                 ["--checkpoint-dir", "s", "--recipe", "seed", "--keep", "2"],
                 ["--smoke", "--width", "4", "--data-dir", "/data/cifar"]):
        config = tc.parse_args(argv)
        words = shlex.split(tc.command_line(config))
        assert words[:2] == ["python", "train_cifar10.py"] and words[-1] == "--resume"
        assert tc.parse_args(words[2:]) == dataclasses.replace(config, resume=True), argv


@pytest.mark.slow
def test_train_steps_lower_the_loss_on_a_fixed_batch(synthetic_data):
    model = CIFAR10CNN(width=4)
    state = tc.create_train_state(model, CONFIG, jax.random.key(0))
    before = jax.device_get(state.batch_stats)  # the state is donated to train_step
    batch = {"image": jnp.asarray(synthetic_data.train_images[:16]),
             "label": jnp.asarray(synthetic_data.train_labels[:16])}
    losses = []
    for _ in range(12):
        state, metrics = tc.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.batch_stats,
                           before)
    assert all(jax.tree.leaves(changed))
    assert int(state.step) == 12


def test_eval_step_matches_the_model_in_eval_mode(trained, synthetic_data):
    model, state, _ = trained
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = synthetic_data.test_images[:16]
    labels = synthetic_data.test_labels[:16]
    logits = model.apply(variables, images.astype(np.float32) / 255.0)
    out = tc.eval_step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    np.testing.assert_array_equal(out["correct"], np.argmax(logits, -1) == labels)
    # evaluate() pads the last batch; the padded examples never count.
    per_example = tc.evaluate(state, jnp.asarray(synthetic_data.test_images),
                              jnp.asarray(synthetic_data.test_labels), 16)
    assert per_example["correct"].shape == (40,)
    np.testing.assert_array_equal(per_example["correct"][:16], out["correct"])


@pytest.mark.slow
def test_train_and_evaluate_reports_history_and_both_test_accuracies(trained):
    _, _, metrics = trained
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    for row in metrics["history"]:
        assert np.isfinite(row["train_loss"]) and 0 <= row["val_accuracy"] <= 1
    assert metrics["val_accuracy"] == metrics["history"][-1]["val_accuracy"]
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["test_accuracy_first1000"] == metrics["test_accuracy"]  # only 40 here
    assert metrics["device"].startswith("cpu")


def test_test_accuracy_is_reported_on_the_exact_first_1000_records():
    per_example = {"correct": np.r_[np.ones(1000, bool), np.zeros(1000, bool)],
                   "loss": np.r_[np.zeros(1000), np.ones(1000)]}
    assert tc.summarize(per_example, tc.EXACT_TEST_RECORDS) == {"accuracy": 1.0, "loss": 0.0}
    assert tc.summarize(per_example) == {"accuracy": 0.5, "loss": 0.5}


@pytest.mark.slow
def test_same_seed_gives_identical_params_and_another_seed_does_not(trained, synthetic_data):
    _, state, _ = trained
    _, again, _ = tc.train_and_evaluate(CONFIG, data=synthetic_data)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params, again.params)
    assert all(jax.tree.leaves(same))
    _, other, _ = tc.train_and_evaluate(dataclasses.replace(CONFIG, seed=1), data=synthetic_data)
    differ = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, other.params)
    assert all(jax.tree.leaves(differ))  # the seed really reaches the initialisation


def _plain_types(tree):
    if isinstance(tree, dict):
        return set().union({dict}, *(_plain_types(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union({list}, *(_plain_types(v) for v in tree))
    return {type(tree)}


def test_checkpoint_round_trip_is_exact_and_plain(trained, tmp_path, images):
    model, state, metrics = trained
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    path = tmp_path / "m.pkl"
    tc.save_checkpoint(path, model, variables, CONFIG, metrics)
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"params", "batch_stats", "config", "metrics"}
    assert _plain_types(raw) <= {dict, list, str, int, float, bool, np.ndarray}
    assert "train_subset" not in raw["config"]["train"]  # None values are left out
    loaded_model, loaded = tc.load_checkpoint(path)
    assert loaded_model == model
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b) and
                        np.asarray(a).dtype == b.dtype, variables, loaded)
    assert all(jax.tree.leaves(same))
    assert jax.tree.structure(jax.tree.map(np.asarray, variables)) == jax.tree.structure(loaded)
    np.testing.assert_array_equal(model.apply(variables, images),
                                  loaded_model.apply(loaded, images))
    assert raw["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert raw["config"]["train"]["lr"] == CONFIG.lr


def test_seed_repl_loading_lines_work_on_a_saved_checkpoint(tmp_path, images):
    full = CIFAR10CNN()
    variables = jax.jit(full.init)(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    tc.save_checkpoint(tmp_path / "cifar10_model.pkl", full, variables)
    image = np.asarray(images[0])  # 32x32x3 in [0, 1]

    # The seed's REPL lines, as users type them:
    with open(tmp_path / "cifar10_model.pkl", "rb") as f:
        checkpoint = pickle.load(f)
    params = checkpoint["params"]
    batch_stats = checkpoint["batch_stats"]
    model = CIFAR10CNN(num_classes=10)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, image[None],
                         train=False)

    np.testing.assert_allclose(logits, full.apply(variables, image[None]), rtol=1e-6)


def test_failed_write_keeps_the_previous_checkpoint(trained, tmp_path):
    model, state, _ = trained
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    path = tmp_path / "m.pkl"
    tc.save_checkpoint(path, model, variables)
    before = path.read_bytes()

    class DiskFull:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):  # fails half-way through the write
        tc.save_checkpoint(path, model, variables, metrics={"z": DiskFull()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkl"]  # no temp file left


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope\.pkl' does not exist"):
        tc.load_checkpoint(tmp_path / "nope.pkl")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"params": Payload()}))
    with pytest.raises(ValueError, match=r"evil\.pkl' is not a readable cifar10-xai "
                                         r"checkpoint .*refusing to load"):
        tc.load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "short.pkl").write_bytes(b"\x80\x04\x95")
    with pytest.raises(ValueError, match=r"short\.pkl' is not a readable"):
        tc.load_checkpoint(tmp_path / "short.pkl")


@pytest.mark.slow
def test_main_writes_checkpoint_report_and_plot(synthetic_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: synthetic_data)
    out = tmp_path / "run" / "model.pkl"
    tc.main(["--epochs", "1", "--batch-size", "16", "--width", "4", "--quiet",
             "--output", str(out), "--history-plot", str(tmp_path / "h.png"),
             "--checkpoint-dir", str(tmp_path / "states")])
    assert [p.name for p in (tmp_path / "states").iterdir()] == ["state_0001.pkl"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["train"]["epochs"] == 1
    assert report["config"]["model"] == {"num_classes": 10, "width": 4, "dropout_rate": 0.5}
    assert report["config"]["architecture"] == "CIFAR10CNN"
    assert len(report["history"]) == 1
    for key in ("val_accuracy", "test_accuracy_first1000", "test_accuracy", "wall_time_s",
                "device"):
        assert key in report
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = tc.load_checkpoint(out)
    assert model.width == 4
    captured = capsys.readouterr()
    assert "test accuracy" in captured.out
    assert captured.err == ""  # --quiet: no progress bars


@pytest.mark.slow
def test_batch_larger_than_the_training_split_is_refused(synthetic_data):
    config = dataclasses.replace(CONFIG, batch_size=64)  # 48 images after a 25 % split
    with pytest.raises(ValueError, match="batch_size must be at most the 48 training images "
                                         "left after the split, got 64"):
        tc.train_and_evaluate(config, data=synthetic_data)


# ------------------------------------------------------------------ the default recipe


def test_augment_crops_the_reflect_padded_image_and_flips_it():
    images = jax.random.randint(jax.random.key(0), (16, 32, 32, 3), 0, 256).astype(jnp.uint8)
    out = np.asarray(tc.augment(images, jax.random.key(1)))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, tc.augment(images, jax.random.key(1)))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    flipped = 0
    for image, crop in zip(padded, out):
        views = {(dy, dx, f): image[dy:dy + 32, dx:dx + 32][:, ::-1 if f else 1]
                 for dy in range(9) for dx in range(9) for f in (0, 1)}
        matches = [k for k, view in views.items() if np.array_equal(view, crop)]
        assert matches, "every output is a crop of the padded image, maybe mirrored"
        flipped += matches[0][2]
    assert 0 < flipped < 16  # both flipped and unflipped images occur
    assert not np.array_equal(out, tc.augment(images, jax.random.key(2)))


def test_default_optimizer_warms_up_decays_and_decays_only_kernels():
    config = tc.TrainConfig(recipe="default", lr=0.1)
    params = {"Conv_0": {"kernel": jnp.ones((3, 3))}, "BatchNorm_0": {"scale": jnp.ones(3),
                                                                        "bias": jnp.ones(3)}}
    tx = tc.create_optimizer(config, total_steps=100)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    rates = []
    for _ in range(100):
        updates, state = tx.update(zeros, state, params)
        rates.append(float(-updates["Conv_0"]["kernel"][0, 0]) / 5e-3)  # lr_t · wd · 1
        assert float(jnp.abs(updates["BatchNorm_0"]["scale"]).max()) == 0
    assert rates[0] == 0 and max(rates) == pytest.approx(0.1, rel=1e-5)
    assert int(np.argmax(rates)) == 15  # warmup over the first 15 % of the steps
    assert np.all(np.diff(rates[15:]) <= 0) and rates[-1] < 1e-3


def test_eval_step_tta_averages_the_logits_of_the_image_and_its_mirror(trained,
                                                                        synthetic_data):
    model, state, _ = trained
    batch = {"image": jnp.asarray(synthetic_data.test_images[:8]),
             "label": jnp.asarray(synthetic_data.test_labels[:8])}
    out = tc.eval_step(state, batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = batch["image"] / 255.0
    logits = (model.apply(variables, x) + model.apply(variables, x[:, :, ::-1])) / 2
    np.testing.assert_array_equal(out["tta_correct"], np.argmax(logits, -1) == batch["label"])
    np.testing.assert_allclose(
        out["tta_loss"], optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]), rtol=1e-5)


@pytest.mark.slow
def test_default_recipe_trains_and_reports_tta(synthetic_data):
    config = dataclasses.replace(CONFIG, recipe="default", lr=0.05)
    _, state, metrics = tc.train_and_evaluate(config, data=synthetic_data)
    for key in ("val_accuracy_tta", "test_accuracy_tta", "test_accuracy_tta_first1000"):
        assert 0 <= metrics[key] <= 1
    assert all(np.isfinite(row["train_loss"]) for row in metrics["history"])
    assert int(state.step) == 2 * (48 // 16)


def test_default_checkpoint_prefers_your_own_then_the_pretrained_one(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    assert checkpoints.default_checkpoint() == checkpoints.PRETRAINED
    assert checkpoints.PRETRAINED.parent.name == "pretrained"
    model = CIFAR10CNN(width=4)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    tc.save_checkpoint("cifar10_model.pkl", model, variables)
    assert checkpoints.default_checkpoint() == Path("cifar10_model.pkl")
    loaded, _ = tc.load_checkpoint()
    assert loaded.width == 4
    assert "loading cifar10_model.pkl" in capsys.readouterr().out
    # one line says which checkpoint it is and what its training measured
    assert checkpoints.describe_checkpoint("cifar10_model.pkl") == (
        "cifar10_model.pkl: no test accuracy recorded")
    tc.save_checkpoint("mine.pkl", model, variables, metrics={
        "test_accuracy_first1000": 0.42, "test_accuracy": 0.405})
    assert checkpoints.describe_checkpoint("mine.pkl") == (
        "mine.pkl: recorded test accuracy 42.0% on the first 1,000 test records, "
        "40.5% on all")
    assert checkpoints.describe_checkpoint(checkpoints.PRETRAINED).startswith(
        f"{checkpoints.PRETRAINED} (the shipped checkpoint): recorded test accuracy 93.0% on the "
        "first 1,000 test records")


_DATA_PARALLEL_RUN = """
import sys
import jax, numpy as np
import cifar10_data, train_cifar10 as tc
arrays = np.load(sys.argv[1])
data = cifar10_data.Cifar10(*(arrays[k] for k in cifar10_data.Cifar10._fields))
config = tc.TrainConfig(**{k: v.item() for k, v in np.load(sys.argv[2]).items()})
assert jax.device_count() == 4, jax.devices()
_, state, _ = tc.train_and_evaluate(config, data=data)
leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
np.savez(sys.argv[3], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
"""


PARALLEL_CONFIG = dataclasses.replace(CONFIG, recipe="default", lr=0.05)


@pytest.fixture(scope="module")
def trained_default(synthetic_data):
    return tc.train_and_evaluate(PARALLEL_CONFIG, data=synthetic_data)


@pytest.mark.slow
def test_data_parallel_training_matches_one_device(trained_default, synthetic_data, tmp_path):
    """The default recipe's steps (augmentation, dropout, BatchNorm over the whole batch)
    on 4 forced CPU devices, a whole epoch in one `lax.scan` as on a GPU, give the
    one-device, one-step-per-call parameters. (A subprocess, since the device count is
    fixed when JAX starts.)"""
    import os
    import subprocess
    import sys

    np.savez(tmp_path / "data.npz", **synthetic_data._asdict())
    config = dataclasses.replace(PARALLEL_CONFIG, steps_per_call=0)
    np.savez(tmp_path / "config.npz", **{k: v for k, v in dataclasses.asdict(config).items()
                                         if v is not None})
    root = Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
               JAX_COMPILATION_CACHE_DIR=str(root / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    subprocess.run([sys.executable, "-c", _DATA_PARALLEL_RUN, str(tmp_path / "data.npz"),
                    str(tmp_path / "config.npz"), str(tmp_path / "params.npz")],
                   check=True, env=env, timeout=240)
    sharded = np.load(tmp_path / "params.npz")
    leaves = jax.tree_util.tree_flatten_with_path(trained_default[1].params)[0]
    assert len(sharded.files) == len(leaves)
    for path, value in leaves:
        np.testing.assert_allclose(sharded[jax.tree_util.keystr(path)], value,
                                   rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_bf16_precision_keeps_parameters_batchnorm_and_loss_in_float32(synthetic_data):
    config = dataclasses.replace(CONFIG, recipe="default", lr=0.05, precision="bf16", epochs=1)
    model, state, metrics = tc.train_and_evaluate(config, data=synthetic_data)
    assert model.dtype == jnp.bfloat16
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert np.isfinite(metrics["history"][-1]["train_loss"])
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         jnp.zeros((2, 32, 32, 3)))
    assert logits.dtype == jnp.float32
    assert checkpoints.architecture_record(model) == ("CIFAR10CNN", {"num_classes": 10, "width": 4,
                                                            "dropout_rate": 0.5})
