"""Trains the CIFAR-10 CNN and writes a checkpoint, a JSON report and a history plot.

    python train_cifar10.py                      # the default recipe, 50 epochs
    python train_cifar10.py --train-subset 2000 --epochs 2
    python train_cifar10.py --smoke              # seconds on CPU, into xai_results/

After every epoch the whole training state goes to the run's own folder, next to the
checkpoint: `cifar10_model.states/<settings key>/`, so runs with other outputs or other
settings never share one. The same command with `--resume` continues an interrupted run;
the command prints it when it starts and when it is interrupted.

Images stay on the device as uint8 (N, 32, 32, 3) and are scaled to [0, 1] inside the
jitted step. The checkpoint is a pickle of plain numpy arrays, dicts, lists, strings and
numbers: {'params', 'batch_stats', 'config', 'metrics'}; `load_checkpoint` rebuilds the
model from it.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import numbers
import os
import shlex
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

import cifar10_data
import xai_attacks
import xai_cli as cli
import xai_core
from architectures import MODELS
# save_checkpoint and load_checkpoint are this script's API in the design card (STYLE.md);
# every other checkpoint name is imported from `checkpoints`.
from checkpoints import (architecture_record, differences, load_checkpoint,  # noqa: F401
                         load_state, newest_state, read_state, save_checkpoint, save_state,
                         shown)
from cifar10_data import EXACT_TEST_RECORDS
from xai_cli import describe_device
from xai_io import atomic_write

# What each recipe sets; flags override only the learning rate.
RECIPES = {
    # The seed project's recipe, exactly: Adam at a constant 1e-3, no augmentation.
    "seed": dict(lr=1e-3, weight_decay=0.0, label_smoothing=0.0, augment=False,
                 warmup_fraction=0.0),
    # SGD with Nesterov momentum 0.9, linear warmup over the first 15 % of the steps then
    # cosine decay to 0, decoupled weight decay 5e-3 on the kernels (the strength of the
    # usual coupled 5e-4 under momentum 0.9), label smoothing 0.1, and random crop
    # (4 px, reflect) and horizontal flip on the device.
    "default": dict(lr=0.1, weight_decay=5e-3, label_smoothing=0.1, augment=True,
                    warmup_fraction=0.15),
    # Adversarial training (Madry et al. 2018): the default recipe without label smoothing,
    # each batch replaced by its PGD-7 examples (L∞, ε = 8/255, steps of 2/255, random
    # start), found with the model in train mode. About 8x the default's cost per step.
    "adversarial": dict(lr=0.1, weight_decay=5e-3, label_smoothing=0.0, augment=True,
                        warmup_fraction=0.15, attack=(8 / 255, 2 / 255, 7)),
}
# Where an architecture's default recipe differs from the CNN's. The ViT and the CCT take
# AdamW (transformers train badly with SGD), the usual decoupled weight decay of 0.05 on
# the kernels, a 10 % warmup and gradient clipping at global norm 1; the CCT's peak
# learning rate was chosen by short runs (docs/architectures.md).
MODEL_RECIPES = {
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_fraction=0.1,
                clip_norm=1.0),
    "cct": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_fraction=0.1,
                clip_norm=1.0),
}
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _help(text, **kwargs):
    return dataclasses.field(metadata={"help": text}, **kwargs)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = _help("architecture: 'cnn' (the seed's), 'resnet20', 'efficientnet', "
                       "'cct' or 'vit'",
                       default="cnn")
    recipe: str = _help("training recipe; 'default': SGD-Nesterov (AdamW for the ViT), "
                        "warmup + cosine, augmentation, label smoothing; 'seed': the "
                        "seed's Adam at 1e-3; 'adversarial': the default on PGD-7 "
                        "examples (8/255)", default="default")
    epochs: int = _help("number of passes over the training split", default=50)
    batch_size: int = _help("images per training step", default=128)
    lr: Optional[float] = _help("peak learning rate; default: the recipe's (default 0.1, "
                                "seed 1e-3)", default=None)
    seed: int = _help("seed of the split, the initialisation, the order, dropout and "
                      "augmentation",
                      default=0)
    val_fraction: float = _help("fraction of the training set held out for validation",
                                default=0.1)
    train_subset: Optional[int] = _help("use only the first N training images", default=None)
    width: Optional[int] = _help(
        "the model's width; default: the architecture's ("
        + "; ".join(f"{name}: {entry.width_help}" for name, entry in MODELS.items()) + ")",
        default=None)
    precision: str = _help("'fp32', or 'bf16': convs and Dense layers in bfloat16 (for "
                           "GPUs), BatchNorm, the loss and the parameters in float32",
                           default="fp32")
    steps_per_call: Optional[int] = _help(
        "training steps per device call, 0 for a whole epoch in one `lax.scan`; default: "
        "1 on CPU, 0 on GPU/TPU", default=None)
    data_dir: Optional[str] = _help("CIFAR-10 folder (binary or python layout); "
                                    "default: $CIFAR10_DIR, then tfds, then download",
                                    default=None)
    output: str = _help("checkpoint path; the JSON report goes next to it",
                        default="cifar10_model.pkl")
    history_plot: Optional[str] = _help("where to save the loss and accuracy curves; "
                                        "default: next to the checkpoint, "
                                        "<output>_history.png", default=None)
    checkpoint_dir: Optional[str] = _help(
        "where the full training state is saved after every epoch; None saves none (the "
        "command line's default: the run's own folder, <output>.states/<settings key>/)",
        default=None)
    keep: int = _help("training states kept in checkpoint_dir (the newest)", default=3)
    resume: bool = _help("continue this run from its newest state in checkpoint_dir",
                         default=False)
    quiet: bool = _help("no progress bars or per-epoch lines", default=False)

    def __post_init__(self):
        for field in dataclasses.fields(self):  # types first, so the rules can compare
            value, kind = getattr(self, field.name), field.type
            optional = typing.get_origin(kind) is typing.Union
            kind = typing.get_args(kind)[0] if optional else kind
            if kind is str and isinstance(value, os.PathLike):
                object.__setattr__(self, field.name, value := os.fspath(value))
            allowed = {int: numbers.Integral, float: numbers.Real}.get(kind, kind)
            if (value is None and optional) or (
                    isinstance(value, allowed) and (kind is bool or not isinstance(value, bool))):
                if kind in (int, float) and value is not None:  # numpy scalars -> JSON-able
                    object.__setattr__(self, field.name, kind(value))
                continue
            raise TypeError(f"{field.name} must be {kind.__name__}"
                            f"{' or None' if optional else ''}, got {value!r}")
        rules = {
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr is None or self.lr > 0, "> 0"),
            "val_fraction": (0 <= self.val_fraction < 1, "in [0, 1)"),
            "train_subset": (self.train_subset is None or self.train_subset >= 1,
                             ">= 1 or None"),
            "model": (self.model in MODELS, f"one of {tuple(MODELS)}"),
            "width": (self.width is None or self.width >= 1, ">= 1 or None"),
            "steps_per_call": (self.steps_per_call is None or self.steps_per_call >= 0,
                               ">= 0 or None"),
            "recipe": (self.recipe in RECIPES, f"one of {tuple(RECIPES)}"),
            "precision": (self.precision in PRECISIONS, f"one of {tuple(PRECISIONS)}"),
            "keep": (self.keep >= 1, ">= 1"),
            "resume": (not self.resume or self.checkpoint_dir is not None,
                       "used with a checkpoint_dir"),
        }
        for name, (ok, expected) in rules.items():
            if not ok:
                raise ValueError(f"{name} must be {expected}, "
                                 f"got {getattr(self, name)!r}")


# A run of a few seconds on CPU, to check that everything works end to end. It writes
# into xai_results/, so that it never shadows a real cifar10_model.pkl.
SMOKE = dict(epochs=2, train_subset=1024, width=8, batch_size=64,
             output="xai_results/smoke_model.pkl")


class TrainState(train_state.TrainState):
    batch_stats: Any
    dropout_key: jax.Array  # each step folds in its step number


def recipe(config: TrainConfig) -> dict:
    """The recipe's settings for the config's model, with `config.lr` when given."""
    settings = {"optimizer": "adam" if config.recipe == "seed" else "sgd", "clip_norm": None,
                "attack": None, **RECIPES[config.recipe]}
    if config.recipe != "seed":
        settings.update(MODEL_RECIPES.get(config.model, {}))
    if config.lr is not None:
        settings["lr"] = config.lr
    return settings


def _is_kernel(params):
    """True for conv and dense kernels: weight decay skips BatchNorm and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The recipe's optimiser; `total_steps` sizes the 'default' schedule."""
    settings = recipe(config)
    if settings["optimizer"] == "adam":
        return optax.adam(settings["lr"])
    warmup = max(1, int(settings["warmup_fraction"] * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings["lr"], warmup, max(total_steps, warmup + 1), end_value=0.0)
    direction = (optax.scale_by_adam() if settings["optimizer"] == "adamw"
                 else optax.trace(decay=0.9, nesterov=True))
    clip = ([optax.clip_by_global_norm(settings["clip_norm"])] if settings["clip_norm"]
            else [])
    return optax.chain(
        *clip, direction,
        optax.add_decayed_weights(settings["weight_decay"], mask=_is_kernel),
        optax.scale_by_learning_rate(schedule))


def augment(images, key):
    """Random crop after 4-pixel reflect padding, and a random horizontal flip, per image.

    Args:
        images: (B, 32, 32, C), any dtype.
        key: one key for the batch; each image gets its own offsets and flip.
    """
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets = jax.random.randint(crop_key, (n, 2), 0, 9)
    crops = jax.vmap(lambda image, o: jax.lax.dynamic_slice(
        image, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))
    return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def create_train_state(model, config: TrainConfig, key, total_steps: int = 1) -> TrainState:
    """Initialises the model's variables and the optimiser from `key`."""
    init_key, dropout_key = jax.random.split(key)
    variables = jax.jit(model.init)(init_key, jnp.zeros((1, 32, 32, 3), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}),
                             tx=create_optimizer(config, total_steps),
                             dropout_key=dropout_key)


def _as_float(images):
    return images.astype(jnp.float32) / 255.0


def adversarial_batch(state: TrainState, images, labels, key, dropout_key, attack):
    """PGD examples of a float batch for adversarial training, `attack` = (ε, step, steps):
    the model in train mode (its BatchNorm updates dropped), one random start per image."""
    eps, step_size, steps = attack

    def logits(x):
        return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                              train=True, mutable=["batch_stats"],
                              rngs={"dropout": dropout_key})[0]

    start = jax.random.uniform(key, images.shape, minval=-eps, maxval=eps)
    x = xai_attacks.pgd(logits, None, jnp.clip(images + start, 0.0, 1.0), labels, None,
                        eps=eps, step_size=step_size, steps=steps, random_init=False,
                        center=images)
    return jax.lax.stop_gradient(x)


def _train_step(state: TrainState, batch, augmented=False, label_smoothing=0.0, attack=None):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    images = batch["image"]
    if augmented:  # its own stream, so that the seed recipe's dropout is unchanged
        images = augment(images, jax.random.fold_in(dropout_key, 1 << 30))
    images = _as_float(images)
    if attack is not None:
        images = adversarial_batch(state, images, batch["label"],
                                   jax.random.fold_in(dropout_key, 1 << 29), dropout_key, attack)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images,
            train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
        if label_smoothing:
            targets = optax.smooth_labels(
                jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets)
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return loss.mean(), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy}


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("augmented", "label_smoothing", "attack"))
def train_step(state: TrainState, batch, *, augmented=False, label_smoothing=0.0, attack=None):
    """One optimiser step on {'image': uint8 (B, 32, 32, 3), 'label': int (B,)}.

    `augmented` crops and flips the batch on the device (`augment`), with a key folded
    from the step number; `label_smoothing` mixes that much of the uniform distribution
    into the one-hot labels; `attack` = (ε, step, steps) trains on the batch's PGD examples
    (`adversarial_batch`).
    """
    return _train_step(state, batch, augmented, label_smoothing, attack)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("sharding", "augmented", "label_smoothing", "attack"))
def train_steps(state: TrainState, images, labels, indices, *, sharding=None,
                augmented=False, label_smoothing=0.0, attack=None):
    """`train_step` once per row of `indices` (K, B), in one call on the device.

    Each batch is gathered on the device from the uint8 `images` (N, 32, 32, 3) and
    `labels` (N,) and, when `sharding` is given, split across the devices with it.
    K > 1 runs the steps in a `lax.scan`, so an epoch needs no host round trip; K = 1
    runs one step without a loop (on XLA:CPU, convolution gradients inside a loop
    measured ~3x slower). Returns the state and the (K,) per-step metrics.
    """
    def step(state, idx):
        batch = {"image": images[idx], "label": labels[idx]}
        if sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        return _train_step(state, batch, augmented, label_smoothing, attack)

    if indices.shape[0] == 1:
        state, metrics = step(state, indices[0])
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(step, state, indices)


@jax.jit
def eval_step(state: TrainState, batch):
    """Per-example loss and correctness, in eval mode (running BatchNorm statistics),
    single view and with flip test-time augmentation (the mean of the logits of the
    image and its mirror image)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = _as_float(batch["image"])
    logits = state.apply_fn(variables, images, train=False)
    tta_logits = (logits + state.apply_fn(variables, images[:, :, ::-1], train=False)) / 2
    out = {}
    for prefix, z in (("", logits), ("tta_", tta_logits)):
        out[prefix + "loss"] = optax.softmax_cross_entropy_with_integer_labels(
            z, batch["label"])
        out[prefix + "correct"] = jnp.argmax(z, -1) == batch["label"]
    return out


def data_parallel_shardings():
    """(replicated, split along the batch) shardings over every device.

    One code path for one device or many: parameters and the data set are replicated,
    each batch is split across the devices, and XLA sums the gradients and the
    BatchNorm statistics over the whole batch.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def evaluate(state, images, labels, batch_size: int, sharding=None):
    """Per-example {'loss', 'correct'} numpy arrays over a whole set, fixed batch shapes;
    each batch is placed with `sharding` when given."""
    if sharding is None:
        return xai_core.map_batches(
            lambda x, y: eval_step(state, {"image": x, "label": y}), [images, labels],
            batch_size)
    # Each batch split across the devices, and its outputs left split: the batches are
    # dispatched without waiting for each other, and a program with a collective in it
    # (an all-gather of the outputs, as before) could then deadlock a process with
    # several local devices: the first device of two batches took both CPU threads, each
    # waiting for a second device that had no thread left. The outputs are gathered
    # once, at the end: on the host, and across processes by `process_allgather`.
    step = _split_eval_step(sharding)
    return xai_core.map_batches(
        lambda x, y: step(state, {"image": x, "label": y}), [images, labels], batch_size,
        to_host=_gather_to_host)


@functools.lru_cache(maxsize=None)
def _split_eval_step(sharding):
    return jax.jit(lambda state, batch: eval_step(
        state, jax.lax.with_sharding_constraint(batch, sharding)), out_shardings=sharding)


def _gather_to_host(outputs):
    """Split outputs as numpy, whole on every process."""
    if jax.process_count() == 1:
        return jax.device_get(outputs)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return multihost_utils.process_allgather(outputs, tiled=True)


def place(tree, sharding):
    """Host values (numpy or not yet placed) as arrays with `sharding`, which may span
    other processes' devices: each process supplies the pieces its own devices hold, so
    every process must pass the same values (the data, a state from the same seed)."""
    def one(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(leaf)),
                                            impl=jax.random.key_impl(leaf))
        value = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(one, tree)


def default_steps_per_call() -> int:
    """1 on CPU (see `train_steps`), else 0: all of an epoch's steps in one call."""
    return 1 if jax.default_backend() == "cpu" else 0


def epoch_indices(key, num_examples: int, batch_size: int):
    """A shuffled (steps, batch_size) index array; the incomplete last batch is dropped."""
    steps = num_examples // batch_size
    return jax.random.permutation(key, num_examples)[:steps * batch_size].reshape(
        steps, batch_size)


def train_epoch(state, images, labels, batch_size: int, key, bar, sharding=None,
                steps_per_call: int = 1, step_fn=None, **step_options):
    """One shuffled pass (incomplete last batch dropped); returns the state and mean metrics.

    Runs `steps_per_call` steps per device call (0: the whole epoch in one call);
    `step_fn` is a compiled `train_steps` for that block shape, else `train_steps` with
    `sharding` and `step_options` (augmented, label_smoothing). Metrics stay on the
    device until the end of the epoch.
    """
    order = epoch_indices(key, len(labels), batch_size)
    if sharding is not None:  # every device holds the whole order, like the data set
        # (every process computed the same order)
        order = place(order, _replicated(sharding))
    steps = len(order)
    block = steps_per_call or steps
    metrics = []
    for start in range(0, steps, block):
        indices = order[start:start + block]
        if step_fn is not None and len(indices) == block:
            state, block_metrics = step_fn(state, images, labels, indices)
        else:
            state, block_metrics = train_steps(state, images, labels, indices,
                                               sharding=sharding, **step_options)
        metrics.append(block_metrics)
        bar.update(len(indices))
        if not bar.disable and (start // block) % max(1, steps // block // 10) == 0:
            bar.set_postfix({k: f"{float(v[-1]):.3f}" for k, v in block_metrics.items()})
    metrics = jax.device_get(metrics)  # all the epoch's metrics in one host transfer
    per_step = {k: np.concatenate([m[k] for m in metrics]) for k in metrics[0]}
    return state, {**{k: float(np.mean(v)) for k, v in per_step.items()},
                   "losses": per_step["loss"]}


def _replicated(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def summarize(per_example, limit=None, prefix=""):
    """{'accuracy', 'loss'} of the first `limit` examples of `evaluate`'s output."""
    return {"accuracy": float(np.mean(per_example[prefix + "correct"][:limit])),
            "loss": float(np.mean(per_example[prefix + "loss"][:limit]))}


# Fields that change what training computes; a state saved under other values of these
# cannot be resumed.
RUN_FIELDS = ("recipe", "epochs", "batch_size", "lr", "seed", "val_fraction", "train_subset",
               "width", "precision", "steps_per_call")


def run_settings(config: TrainConfig) -> dict:
    """The settings that shape the run, as its training states record them: the width
    resolved to the model's default, and the model named only when it is not the CNN
    (so the CNN's runs keep the folders and states they had before the zoo)."""
    settings = {k: getattr(config, k) for k in RUN_FIELDS}
    settings["width"] = build_model(config).width
    if config.model != "cnn":
        settings["model"] = config.model
    return settings


def build_model(config: TrainConfig):
    """The config's architecture at its width and precision."""
    return MODELS[config.model].build(config.width, dtype=PRECISIONS[config.precision])


def _differences(saved: dict, config: TrainConfig) -> dict:
    """{field: (saved, now)} for each run-shaping setting that differs."""
    return differences(saved, run_settings(config))


# ---------------------------------------------------------------- runs and their folders


def history_plot_path(config: TrainConfig) -> Path:
    """`config.history_plot`, else `<output stem>_history.png` next to the checkpoint."""
    if config.history_plot:
        return Path(config.history_plot)
    output = Path(config.output)
    return output.with_name(output.stem + "_history.png")


def run_directory(config: TrainConfig) -> Path:
    """The run's own folder for its training states, `<output stem>.states/<key>/`.

    The key hashes the settings that shape the run, so two runs share a folder only
    when they write the same checkpoint with the same settings: when they are one run.
    """
    settings = json.dumps(run_settings(config), sort_keys=True)
    output = Path(config.output)
    return (output.with_name(output.stem + ".states")
            / hashlib.sha256(settings.encode()).hexdigest()[:8])


def command_line(config: TrainConfig, *, resume: bool = True) -> str:
    """The shell command that runs `config`, and with `resume` continues it.

    Flags are given only where `config` differs from the defaults, or from `--smoke`'s
    when it is a smoke run; `--checkpoint-dir` only when it is not the run's own folder.
    """
    def flags(base):
        words = []
        for field in dataclasses.fields(TrainConfig):
            value = getattr(config, field.name)
            if (field.name == "resume" or value is None or value is False
                    or value == getattr(base, field.name)
                    or (field.name == "checkpoint_dir"
                        and Path(value) == run_directory(config))):
                continue
            words.append("--" + field.name.replace("_", "-"))
            if value is not True:
                words.append(str(value))
        return words

    words = min(flags(TrainConfig()), ["--smoke"] + flags(TrainConfig(**SMOKE)), key=len)
    return shlex.join(["python", shown(__file__)] + words + (["--resume"] if resume else []))


def _other_runs(config: TrainConfig) -> str:
    """Says which other runs of the same checkpoint have states, and how to resume each."""
    own = run_directory(config)
    if Path(config.checkpoint_dir) != own or not own.parent.is_dir():
        return ""
    runs = []
    for folder in sorted(own.parent.iterdir()):
        saved = newest_state(folder) if folder.is_dir() else None
        if saved is None or folder == own:
            continue
        try:
            settings = read_state(saved)["config"]
            other = dataclasses.replace(config, **{k: settings[k] for k in RUN_FIELDS},
                                        model=settings.get("model", "cnn"),
                                        checkpoint_dir=str(folder), resume=True)
        except (ValueError, TypeError, KeyError):
            continue
        epoch = int(saved.stem.split("_")[-1])
        progress = ("finished" if epoch >= other.epochs
                    else f"after epoch {epoch} of {other.epochs}")
        runs.append(f"{folder} ({progress}; settings (there, here): "
                    f"{_differences(settings, config)}; resume it with "
                    f"`{command_line(other)}`)")
    return ("; other runs of this checkpoint: " + "; ".join(runs)) if runs else ""


def claim_run_directory(config: TrainConfig, quiet: bool = False) -> Optional[Path]:
    """Checks `config.checkpoint_dir` before any work; returns the state to resume from,
    or None to start fresh.

    `resume` needs a state of this run there. A fresh run refuses a folder that holds
    another run's states, or this run unfinished (resume it instead). It starts a
    finished run of the same settings over, deleting that run's states first, so that
    an interruption never resumes from the old ones.
    """
    directory = Path(config.checkpoint_dir)
    saved = newest_state(directory)
    if config.resume and saved is None:
        raise ValueError(f"nothing to resume: {str(directory)!r} holds no training state "
                         "of this run (run without --resume to start it)"
                         + _other_runs(config))
    if saved is None:
        return None
    record = read_state(saved)
    differ = _differences(record["config"], config)
    if config.resume:
        if differ:
            raise ValueError(f"cannot resume from {str(saved)!r}: it was trained with other "
                             f"settings (saved, now): {differ}")
        return saved
    if differ:
        raise ValueError(f"checkpoint_dir {str(directory)!r} holds the training states of "
                         f"another run, trained with other settings (saved, now): {differ}; "
                         "choose another --checkpoint-dir, or leave it out to use this "
                         "run's own folder")
    if record["epoch"] < config.epochs:
        raise ValueError(f"checkpoint_dir {str(directory)!r} holds this run, stopped after "
                         f"epoch {record['epoch']} of {config.epochs}; resume it with "
                         f"`{command_line(config)}`, or delete {str(directory)!r} to start "
                         "over")
    if not quiet:
        print(f"starting over: this run finished before; replacing its states in "
              f"{directory}")
    for old in directory.glob("state_*.pkl"):
        old.unlink()
    return None


def interruption_note(config: TrainConfig) -> str:
    """What an interrupted run tells its user: where its progress is, and how to resume."""
    saved = newest_state(config.checkpoint_dir) if config.checkpoint_dir else None
    if saved is None:
        return "no epoch had finished, so there is nothing to resume"
    return (f"the state after epoch {int(saved.stem.split('_')[-1])} is in {saved}; "
            f"resume with: {command_line(config)}")


def train_and_evaluate(config: TrainConfig, *, model=None, data=None):
    """Trains on the training split, validates every epoch, then tests.

    Args:
      config: the run's hyperparameters.
      model: the module to train; default `build_model(config)`, the architecture
        `config.model` of `config.width` and `config.precision`.
      data: a `cifar10_data.Cifar10`; default `load_cifar10(config.data_dir)`.

    Returns:
      (model, state, metrics): metrics holds the per-epoch history, the final
      validation accuracy, the test accuracy on the first 1,000 exact records and on
      all records, the wall time and the device.
    """
    start = time.time()
    saved = claim_run_directory(config, config.quiet) if config.checkpoint_dir else None
    if config.checkpoint_dir and not config.quiet:
        print(f"training states: {config.checkpoint_dir}/; if the run stops, resume it "
              f"with: {command_line(config)}", flush=True)
    if model is None:
        model = build_model(config)
    if data is None:
        data = cifar10_data.load_cifar10(config.data_dir)
    images, labels = data.train_images, data.train_labels
    if config.train_subset:
        images, labels = images[:config.train_subset], labels[:config.train_subset]
    train_x, train_y, val_x, val_y = cifar10_data.split_train_val(
        images, labels, config.val_fraction, config.seed)
    if len(train_y) < config.batch_size:
        raise ValueError(f"batch_size must be at most the {len(train_y)} training images "
                         f"left after the split, got {config.batch_size}")
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch_size must be a multiple of the {jax.device_count()} "
                         f"devices, got {config.batch_size}")
    replicated, split = data_parallel_shardings()
    train_x, train_y, val_x, val_y, test_x, test_y = place(
        (train_x, train_y, val_x, val_y, data.test_images, data.test_labels), replicated)

    init_key, order_key = jax.random.split(jax.random.key(config.seed))
    settings = recipe(config)
    steps_per_epoch = len(train_y) // config.batch_size
    state = create_train_state(model, config, init_key, config.epochs * steps_per_epoch)
    start_epoch, history = 0, []
    if saved is not None:
        state, start_epoch, history = load_state(saved, state, run_settings(config))
        if not config.quiet:
            print(f"resuming after epoch {start_epoch} from {saved}")
    state = place(state, replicated)
    step_options = dict(augmented=settings["augment"],
                        label_smoothing=settings["label_smoothing"], attack=settings["attack"])
    steps_per_call = (default_steps_per_call() if config.steps_per_call is None
                      else config.steps_per_call)
    block = min(steps_per_call or steps_per_epoch, steps_per_epoch)
    compile_start = time.time()  # compiled ahead, so that epoch times exclude it
    step_fn = train_steps.lower(
        state, train_x, train_y,
        jax.ShapeDtypeStruct((block, config.batch_size), jnp.int32, sharding=replicated),
        sharding=split, **step_options).compile()
    compile_s = round(time.time() - compile_start, 2)
    for epoch in range(start_epoch, config.epochs):
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}",
                  disable=config.quiet, leave=False) as bar:
            epoch_start = time.time()
            state, train_metrics = train_epoch(state, train_x, train_y, config.batch_size,
                                               jax.random.fold_in(order_key, epoch), bar,
                                               split, block, step_fn, **step_options)
            row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_metrics.items()},
                   "train_s": round(time.time() - epoch_start, 2)}
            if len(val_y):
                per_example = evaluate(state, val_x, val_y, config.batch_size, split)
                val = summarize(per_example)
                row.update(val_loss=val["loss"], val_accuracy=val["accuracy"],
                           val_accuracy_tta=summarize(per_example, prefix="tta_")["accuracy"])
        if not np.isfinite(train_metrics["loss"]):
            bad = int(np.argmin(np.isfinite(train_metrics["losses"])))
            last = newest_state(config.checkpoint_dir) if config.checkpoint_dir else None
            kept = f"; the last good state is {last}" if last else ""
            raise FloatingPointError(
                f"training diverged: the loss became {train_metrics['losses'][bad]} at "
                f"epoch {epoch + 1}, step {epoch * steps_per_epoch + bad + 1} (try a lower "
                f"--lr){kept}")
        del train_metrics["losses"], row["train_losses"]
        history.append(row)
        if config.checkpoint_dir and cli.is_writer():
            save_state(config.checkpoint_dir, state, epoch + 1, history, run_settings(config),
                       config.keep)
        if not config.quiet:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
    test = evaluate(state, test_x, test_y, config.batch_size, split)
    test_all = summarize(test)
    metrics = {
        "history": history,
        "val_accuracy": history[-1].get("val_accuracy"),
        "val_accuracy_tta": history[-1].get("val_accuracy_tta"),
        "test_accuracy_first1000": summarize(test, EXACT_TEST_RECORDS)["accuracy"],
        "test_accuracy": test_all["accuracy"],
        "test_accuracy_tta_first1000": summarize(test, EXACT_TEST_RECORDS, "tta_")["accuracy"],
        "test_accuracy_tta": summarize(test, prefix="tta_")["accuracy"],
        "test_loss": test_all["loss"],
        "compile_s": compile_s,
        "steps_per_call": block,
        "wall_time_s": round(time.time() - start, 2),  # this process only
        "train_time_s": round(sum(row["train_s"] for row in history), 2),  # every epoch's
        "resumed_after_epoch": start_epoch,
        "device": describe_device(),
    }
    return model, state, metrics


def fine_tune(model, variables, images, labels, config: TrainConfig, *, keep=None,
              desc="fine-tuning"):
    """`variables` trained further for `config.epochs` on `images` (uint8) and `labels`
    with the config's recipe (its warmup and cosine sized to these epochs, from
    `config.lr`), keeping the BatchNorm statistics running. `keep`, an optax
    transformation chained after the optimiser (e.g. `xai_compression.keep_pruned`),
    edits every update. Returns the new variables."""
    steps = len(labels) // config.batch_size
    if steps < 1:
        raise ValueError(f"batch_size must be at most the {len(labels)} fine-tuning images, "
                         f"got {config.batch_size}")
    key = jax.random.key(config.seed)
    state = create_train_state(model, config, key, config.epochs * steps)
    tx = state.tx if keep is None else optax.chain(state.tx, keep)
    # copies: the training steps donate the state's buffers, and the caller keeps theirs
    params = jax.tree.map(jnp.array, variables["params"])
    state = state.replace(params=params, tx=tx, opt_state=tx.init(params),
                          batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})))
    settings = recipe(config)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    for epoch in range(config.epochs):
        with tqdm(total=steps, desc=f"{desc}, epoch {epoch + 1}", disable=config.quiet,
                  leave=False) as bar:
            state, _ = train_epoch(state, images, labels, config.batch_size,
                                   jax.random.fold_in(key, epoch), bar,
                                   augmented=settings["augment"],
                                   label_smoothing=settings["label_smoothing"])
    tuned = {**variables, "params": state.params}
    if "batch_stats" in variables:
        tuned["batch_stats"] = state.batch_stats
    return tuned


# ---------------------------------------------------------------- checkpoints


def write_report(path, config: TrainConfig, model, metrics: dict):
    """Writes the run's config and metrics as JSON."""
    architecture, fields = architecture_record(model)
    report = {"config": {"architecture": architecture, "model": fields,
                         "train": dataclasses.asdict(config)}, **metrics}
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


def plot_history(history, path):
    """Saves train and validation loss and accuracy per epoch as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            if history and f"{split}_{metric}" in history[0]:
                ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], "o-",
                        label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, with the field's help text, plus --smoke."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", default=None,
                                help=field.metadata["help"])
            continue
        kind = field.type  # Optional[X] parses as X
        if typing.get_origin(kind) is typing.Union:
            kind = typing.get_args(kind)[0]
        parser.add_argument(flag, type=kind, default=None,
                            choices={"recipe": tuple(RECIPES), "model": tuple(MODELS),
                                     "precision": tuple(PRECISIONS)}.get(field.name),
                            help=field.metadata["help"] + (
                                f" (default: {field.default})" if field.default is not None
                                else ""))
    parser.add_argument("--smoke", action="store_true",
                        help=f"a few seconds on CPU: {SMOKE}, unless flags say otherwise")
    return parser


def parse_args(argv=None) -> TrainConfig:
    """Maps the flags 1:1 onto TrainConfig; --smoke starts from the SMOKE preset."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    base = TrainConfig(**SMOKE) if args.pop("smoke") else TrainConfig()
    given = {k: v for k, v in args.items() if v is not None}
    try:
        if "checkpoint_dir" not in given:  # the run's own folder
            run = dataclasses.replace(base, **{**given, "resume": False})
            given["checkpoint_dir"] = str(run_directory(run))
        return dataclasses.replace(base, **given)
    except ValueError as e:
        parser.error(str(e))


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    history_plot = history_plot_path(config)
    cli.check_writable(config.output, "--output")
    cli.check_writable(history_plot, "--history-plot")
    cli.check_writable(config.checkpoint_dir, "--checkpoint-dir", folder=True)
    try:
        model, state, metrics = train_and_evaluate(config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interruption_note(config)) from None
    metrics["command"] = shlex.join(["python", "train_cifar10.py"] + list(
        sys.argv[1:] if argv is None else argv))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    report = Path(config.output).with_suffix(".json")
    if not cli.is_writer():
        print(f"process {jax.process_index()} of {jax.process_count()}: test accuracy "
              f"{metrics['test_accuracy']:.4f}; process 0 writes the files")
        return
    save_checkpoint(config.output, model, variables, config, metrics)
    write_report(report, config, model, metrics)
    plot_history(metrics["history"], history_plot)
    print(f"test accuracy {metrics['test_accuracy_first1000']:.4f} on the first "
          f"{EXACT_TEST_RECORDS} test records, {metrics['test_accuracy']:.4f} on all "
          f"(flip TTA: {metrics['test_accuracy_tta_first1000']:.4f}, "
          f"{metrics['test_accuracy_tta']:.4f}); "
          f"wrote {config.output}, {report}, {history_plot}")


if __name__ == "__main__":
    main()
