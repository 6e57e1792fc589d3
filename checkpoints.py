"""Checkpoints and training states on disk: atomic writes, the loader that runs no code,
and the choice of the default checkpoint.

A checkpoint is a plain pickle of numpy arrays, dicts, lists, strings and numbers:
{'params', 'batch_stats', 'config', 'metrics'}, where `config` records the architecture
(`config['architecture']`, a name in `ARCHITECTURES`; absent in older files, which are
`CIFAR10CNN`s) and its constructor arguments (`config['model']`), so `load_checkpoint`
rebuilds the model in one call. A training state is the whole `TrainState` after an
epoch, as a list of arrays, with the epoch, the history and the settings of its run.
"""

import dataclasses
import importlib.resources
import pickle
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import xai_compression as compression_lib
from architectures import MODELS
from xai_io import atomic_write, safe_pickle_load

# The `pretrained` package's folder: beside this file in a clone, in site-packages once
# installed (the wheel carries it as package data).
PRETRAINED_DIR = Path(str(importlib.resources.files("pretrained")))
PRETRAINED = PRETRAINED_DIR / "cifar10_cnn.pkl"
OWN_CHECKPOINT = Path("cifar10_model.pkl")  # where training writes yours, in the working folder
DEFAULT_ARCHITECTURE = "CIFAR10CNN"  # what files that record no architecture hold
# What a checkpoint records: the class name -> its registry entry (architectures.MODELS).
ARCHITECTURES = {entry.cls.__name__: entry for entry in MODELS.values()}


def architecture_record(model) -> tuple:
    """(class name, constructor arguments) that rebuild `model` from a checkpoint."""
    cls = getattr(type(model), "_unquantized_type", type(model))  # a quantised model's too
    for name, entry in ARCHITECTURES.items():
        if cls is entry.cls:
            return name, entry.config(model)
    raise TypeError(f"model must be one of the architectures {tuple(ARCHITECTURES)} to be "
                    f"saved, got {type(model).__name__}")


def pretrained_checkpoints() -> dict:
    """{registry name: path} of the shipped checkpoints: `pretrained/cifar10_cnn.pkl`
    for the CNN, `pretrained/<name>.pkl` for the others, where the file exists."""
    paths = {name: PRETRAINED if name == "cnn" else PRETRAINED_DIR / f"{name}.pkl"
             for name in MODELS}
    return {name: path for name, path in paths.items() if path.is_file()}


# ---------------------------------------------------------------- files


def plain(tree):
    """Converts a pytree to numpy arrays inside plain dicts and lists; drops None values."""
    if hasattr(tree, "items"):  # dict or FrozenDict
        return {str(k): plain(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, (list, tuple)):
        return [plain(v) for v in tree]
    if isinstance(tree, (jax.Array, np.ndarray)):
        return np.asarray(jax.device_get(tree))
    return tree


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, variables, config: Optional[dict] = None,
                    metrics: Optional[dict] = None, compression: Optional[dict] = None):
    """Writes {'params', 'batch_stats', 'config', 'metrics'} atomically as a plain pickle.

    `config` is the training config that produced the model (a dataclass or a dict), if
    any. A compressed model's file also records how it was compressed
    (`config['compression']`: `compression`, merged with a quantised model's own record)
    and stores a quantised model's kernels as integers with their scales, and its
    activation statistics ('quant_stats').
    """
    architecture, fields = architecture_record(model)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    record = {**(compression_lib.record(model) or {}), **(compression or {})}
    quantized = "quantization" in record
    checkpoint = {
        "params": plain(compression_lib.stored_params(model, variables) if quantized
                        else variables["params"]),
        "batch_stats": plain(variables.get("batch_stats", {})),
        "config": plain({"architecture": architecture, "model": fields,
                         "train": dict(config or {}),
                         **({"compression": record} if record else {})}),
        "metrics": plain(metrics or {}),
    }
    if quantized:
        checkpoint["quant_stats"] = plain(variables.get("quant_stats", {}))
    atomic_write(path, lambda f: pickle.dump(checkpoint, f, protocol=4))


def default_checkpoint() -> Path:
    """Your `cifar10_model.pkl` when it exists, else the shipped pretrained checkpoint."""
    return OWN_CHECKPOINT if OWN_CHECKPOINT.is_file() else PRETRAINED


def load_checkpoint(path=None):
    """Loads a checkpoint written by `save_checkpoint`, without running code from it.

    Args:
      path: the checkpoint; default `default_checkpoint()`, and it says which it took.

    Returns:
      (model, variables): the rebuilt model (the architecture the file records,
      `CIFAR10CNN` when it records none) and {'params', 'batch_stats'} ({'params'}
      for a model without BatchNorm), ready for `model.apply(variables, images)`.
    """
    if path is None:
        path = default_checkpoint()
        print(f"loading {path}" + (" (the pretrained checkpoint; train your own into "
                                   "cifar10_model.pkl to use it instead)"
                                   if path == PRETRAINED else ""))
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a folder; give the .pkl file "
                                "that `python train_cifar10.py --output PATH` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train one with "
                                "`python train_cifar10.py --output PATH`")
    try:
        checkpoint = safe_pickle_load(path)
        if isinstance(checkpoint, dict) and {"leaves", "epoch"} <= set(checkpoint):
            raise ValueError("it is a training state, written after every epoch; the "
                             "run's checkpoint is the file its --output names")
        config = checkpoint["config"]
        architecture = config.get("architecture", DEFAULT_ARCHITECTURE)
        fields = {k: _tuples(v) for k, v in config["model"].items()}
        compression = config.get("compression")
        variables = {k: checkpoint[k] for k in ("params", "batch_stats")
                     if k == "params" or checkpoint[k]}  # a model without BatchNorm has none
        if compression and "quantization" in compression:
            compression_lib.check_scheme(compression["quantization"])
            variables["params"] = compression_lib.dequantize(variables["params"])
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable cifar10-xai "
                         f"checkpoint ({type(e).__name__}: {e})") from None
    if architecture not in ARCHITECTURES:
        raise ValueError(f"checkpoint {str(path)!r} holds a {architecture!r}, an "
                         f"architecture this version does not know; it knows "
                         f"{tuple(ARCHITECTURES)}")
    try:
        model = ARCHITECTURES[architecture].cls(**fields)
    except TypeError as e:
        raise ValueError(f"checkpoint {str(path)!r} holds another architecture: its model "
                         f"config {fields} does not build a {architecture} ({e})") from None
    _check_structure(path, model, variables)
    if compression and "quantization" in compression:
        model, variables = compression_lib.restore(model, compression, variables)
        stats = checkpoint.get("quant_stats") or {}
        if stats:
            _check_quant_stats(path, model, variables, stats)
            variables = {**variables, "quant_stats": jax.tree.map(jnp.asarray, stats)}
    return model, variables


def _check_quant_stats(path, model, variables, stats):
    """The activation statistics a quantised model needs, with their shapes."""
    example = (1,) + tuple(getattr(model, "input_shape", (32, 32, 3)))
    _, expected = jax.eval_shape(
        lambda x: model.apply(variables, x, mutable=["quant_stats"]),
        jax.ShapeDtypeStruct(example, jnp.float32))
    want = {jax.tree_util.keystr(p): v.shape for p, v in
            jax.tree_util.tree_flatten_with_path(expected.get("quant_stats", {}))[0]}
    try:
        got = {jax.tree_util.keystr(p): np.shape(v) for p, v in
               jax.tree_util.tree_flatten_with_path(stats)[0]}
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} holds malformed quant_stats ({e})") from None
    if got != want:
        raise ValueError(f"checkpoint {str(path)!r}: its activation statistics (quant_stats) "
                         f"do not match its model; expected {want}, got {got}")


def _tuples(value):
    """Lists as tuples, nested ones too (a model's tuple fields, e.g. the EfficientNet's
    stages, hashable again however the config was stored)."""
    return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def shown(path) -> str:
    """`path` as a user would type it from the current folder: relative when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def describe_checkpoint(path) -> str:
    """One line: which checkpoint this is, and the test accuracy its training recorded."""
    which = " (the shipped checkpoint)" if Path(path).resolve() == PRETRAINED else ""
    try:
        metrics = dict(safe_pickle_load(path).get("metrics") or {})
    except Exception:  # noqa: BLE001 - load_checkpoint says what is wrong with the file
        metrics = {}
    first, every = metrics.get("test_accuracy_first1000"), metrics.get("test_accuracy")
    if first is None:
        return f"{shown(path)}{which}: no test accuracy recorded"
    return (f"{shown(path)}{which}: recorded test accuracy {first:.1%} on the first "
            "1,000 test records"
            + (f", {every:.1%} on all" if every is not None else ""))


def compression_record(path) -> Optional[dict]:
    """How the checkpoint at `path` was compressed (`save_checkpoint`'s record: e.g.
    {'quantization': 'int8', ...} or {'pruning': 'filters', ...}), or None for an
    uncompressed or unreadable one (`load_checkpoint` says what is wrong with it)."""
    try:
        return safe_pickle_load(path)["config"].get("compression") or None
    except Exception:  # noqa: BLE001
        return None


def _check_structure(path, model, variables):
    """Every array the model needs, with its shape and a float dtype, and nothing else."""
    example = (1,) + tuple(getattr(model, "input_shape", (32, 32, 3)))
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct(example, jnp.float32))
    expected = {k: expected.get(k, {}) for k in ("params", "batch_stats")}  # no sown values
    want = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
    try:
        got = {jax.tree_util.keystr(p): v for p, v in
               jax.tree_util.tree_flatten_with_path(variables)[0]}
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} holds malformed variables ({e})") from None
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint {str(path)!r} does not match its model config "
                         f"{architecture_record(model)[1]}: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}")
    for name, like in want.items():
        value = got[name]
        if (not isinstance(value, np.ndarray) or value.shape != like.shape
                or not np.issubdtype(value.dtype, np.floating)):
            raise ValueError(f"checkpoint {str(path)!r}: {name} must be a float array of "
                             f"shape {like.shape}, got {getattr(value, 'dtype', type(value).__name__)}"
                             f"{getattr(value, 'shape', '')}")


# ---------------------------------------------------------------- training states


def is_key(leaf):
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def save_state(directory, state, epoch: int, history, settings: dict, keep: int):
    """Writes the whole training state after `epoch` atomically to
    `directory/state_EPOCH.pkl` as plain numpy arrays and builtins, with the `settings`
    that shape the run, then deletes all but the newest `keep` states."""
    directory = Path(directory)
    leaves = [np.asarray(jax.random.key_data(leaf) if is_key(leaf) else leaf)
              for leaf in jax.device_get(jax.tree.leaves(state))]
    record = {"format": 1, "epoch": epoch, "leaves": leaves, "history": history,
              "config": dict(settings)}
    atomic_write(directory / f"state_{epoch:04d}.pkl",
                  lambda f: pickle.dump(record, f, protocol=4))
    for old in sorted(directory.glob("state_*.pkl"))[:-keep]:
        old.unlink(missing_ok=True)


def newest_state(directory) -> Optional[Path]:
    """The state file of the latest epoch in `directory`, or None."""
    states = sorted(Path(directory).glob("state_[0-9]*.pkl"))
    return states[-1] if states else None


def read_state(path) -> dict:
    """The record `save_state` wrote: {'epoch', 'leaves', 'history', 'config'}, checked."""
    try:
        record = safe_pickle_load(path)
        record = {"config": dict(record["config"]), "leaves": list(record["leaves"]),
                  "epoch": int(record["epoch"]), "history": list(record["history"])}
    except Exception as e:
        raise ValueError(f"training state {str(path)!r} is not readable ({type(e).__name__}: "
                         f"{e}); delete it to resume from the one before") from None
    return record


def differences(saved: dict, settings: dict) -> dict:
    """{name: (saved, now)} for each setting that differs."""
    return {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}


def load_state(path, template, settings: dict):
    """Rebuilds a saved training state on the structure of `template` (a fresh state of
    the same run), checking the run's `settings`, the number of arrays and each shape
    and dtype.

    Returns:
        (state, epoch, history).
    """
    record = read_state(path)
    leaves, epoch, history = record["leaves"], record["epoch"], record["history"]
    differ = differences(record["config"], settings)
    if differ:
        raise ValueError(f"cannot resume from {str(path)!r}: it was trained with other "
                         f"settings (saved, now): {differ}")
    template_leaves, treedef = jax.tree.flatten(template)
    template_leaves = [leaf if is_key(leaf) else jnp.asarray(leaf)  # the step may be an int
                       for leaf in template_leaves]
    if len(leaves) != len(template_leaves):
        raise ValueError(f"training state {str(path)!r} holds {len(leaves)} arrays, the "
                         f"model and optimiser need {len(template_leaves)}")
    restored = []
    for i, (leaf, like) in enumerate(zip(leaves, template_leaves)):
        if is_key(like):
            leaf = jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
        if leaf.shape != like.shape or leaf.dtype != like.dtype:
            raise ValueError(f"training state {str(path)!r}: array {i} is {leaf.dtype}"
                             f"{tuple(leaf.shape)}, expected {like.dtype}{tuple(like.shape)}")
        restored.append(leaf)
    return jax.tree.unflatten(treedef, restored), epoch, history
