"""Model compression: quantisation through Qwix and magnitude pruning, each recorded so
that a compressed model is a checkpoint like any other.

Quantisation (`quantize`) wraps a model of the zoo with Qwix's quantisation-aware
provider (`qwix.QtProvider`): every convolution and Dense layer fake-quantises its
kernel per output channel (symmetric, absmax) and, for the 'int8' scheme, its input
activation per tensor with a static scale calibrated on images. Forward, that model
computes exactly what Qwix's post-training (PTQ) model computes, whose integer weights
are what a checkpoint stores; backward, the rounding passes gradients straight through
(the straight-through estimator), so every gradient method explains the quantised
network's function with the float network's local slopes. Qwix's PTQ model itself has a
zero gradient through its rounding and cannot be explained by gradients.

Pruning (`magnitude_masks`, `prune`, `keep_pruned`) zeroes the kernel weights of
smallest magnitude over the whole network and keeps them zero through fine-tuning.

A compression record, a plain dict, says what was done; `checkpoints.save_checkpoint`
stores it and `checkpoints.load_checkpoint` rebuilds the model from it with `restore`.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from architectures import ResNet20
from cifar10_cnn_model import CIFAR10CNN, CONVS_PER_BLOCK
from xai_core import check_batch, check_int

# scheme -> (weight qtype, activation qtype): per-channel weights, per-tensor activations
SCHEMES = {
    "int8": ("int8", "int8"),  # weights and activations, activations calibrated
    "int8_weights": ("int8", None),
    "int4_weights": ("int4", None),
}
# bfloat16 weights (every float parameter rounded to bfloat16 and stored so, computed in
# float32): not an integer grid, so not through Qwix, which has no bfloat16 qtype.
BF16 = "bf16"
QUANTIZATIONS = (*SCHEMES, BF16)
BITS = {"int8": 8, "int4": 4}
QMAX = {qtype: 2 ** (bits - 1) - 1 for qtype, bits in BITS.items()}  # 127, 7
# Symmetric absmax with the largest |w| of a channel at ±QMAX exactly. Qwix's absmax maps
# it to QMAX + 0.5 (then clips); scaling its range by (QMAX + 0.5) / QMAX restores the
# symmetric grid of TFLite and PyTorch, on which quantising the stored values again
# gives them back: a stored model computes with exactly the weights it stores.
WEIGHT_CALIBRATION = {q: f"absmax,{(m + 0.5) / m!r}" for q, m in QMAX.items()}


def _qwix():
    try:
        import qwix  # optional: only compression needs it
    except ImportError:
        raise ImportError("quantisation needs Qwix: pip install 'qwix>=0.1.8'") from None
    return qwix


def check_scheme(scheme):
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"scheme must be one of {QUANTIZATIONS}, got {scheme!r}")


def _check_share(name, value, meaning):
    """`value` in [0, 1), or a ValueError naming `name` and saying what it means."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be {meaning} in [0, 1), got {value!r}")


def _rules(scheme):
    weights, activations = SCHEMES[scheme]
    return [_qwix().QtRule(module_path=".*", weight_qtype=weights, act_qtype=activations,
                           act_static_scale=True if activations else None,
                           weight_calibration_method=WEIGHT_CALIBRATION[weights])]


def quantized_model(model, scheme):
    """`model` with Qwix's fake quantisation of `scheme` in every conv and Dense layer.

    The result is a subclass of the model's class with the same fields and module paths
    (every explainer reads it as it reads `model`); `record(result)` gives its
    compression record.
    """
    check_scheme(scheme)
    if scheme == BF16:  # the same network; the subclass carries the record
        base = type(model)
        cls = type(base.__name__, (base,), {"_unquantized_type": base,
                                            "__module__": base.__module__})
        qmodel = cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                        if f.init and f.name not in ("parent", "name")})
    else:
        qwix = _qwix()
        qmodel = qwix.quantize_model(model, qwix.QtProvider(_rules(scheme)))
        cls = type(qmodel)
    cls.compression = {"quantization": scheme}
    cls.init = _init
    # Qwix creates its activation statistics inside a custom-gradient function, which
    # cannot happen under a transformation (`jax.jit`, `jax.eval_shape`): their layout
    # is found here, once, eagerly, and `init` returns it uncalibrated.
    cls.uncalibrated = {}
    cls.not_replayable = None
    if scheme != BF16 and SCHEMES[scheme][1] is not None:
        # what a method that re-evaluates the model's program outside Flax (Guided
        # Backprop) is told
        cls.not_replayable = ("Qwix's int8 activation quantisation reads its calibrated "
                              "statistics from the Flax module that runs it, which such a "
                              "replay does not have")
        example = jnp.zeros((1,) + tuple(getattr(model, "input_shape", (32, 32, 3))))
        _, stats = qmodel.apply(_float(qmodel).init(jax.random.key(0), example), example,
                                mutable=["quant_stats"])
        cls.uncalibrated = jax.tree.map(np.zeros_like, jax.device_get(dict(stats)))
    return qmodel


def _float(qmodel):
    """The float network a quantised model was built from."""
    return type(qmodel)._unquantized_type(**{
        f.name: getattr(qmodel, f.name) for f in dataclasses.fields(qmodel)
        if f.init and f.name not in ("parent", "name")})


def _init(self, *args, **kwargs):
    """A quantised model's `init`: the float network's fresh variables and, for int8
    activations, statistics of count 0 (uncalibrated: Qwix then scales each call's
    activations by their own maximum); `calibrate` gives the real ones."""
    variables = dict(_float(self).init(*args, **kwargs))
    return {**variables, **jax.tree.map(jnp.asarray, type(self).uncalibrated)}


def record(model):
    """The compression record of a model that `quantized_model` built, else None."""
    return getattr(type(model), "compression", None)


def calibrate(qmodel, variables, images, *, batch_size=256, quiet=True):
    """`variables` with the activation statistics of `qmodel` over `images` (the mean
    over images of each quantised layer input's absolute maximum), the static scales of
    the 'int8' scheme. Images are floats in [0, 1], (N, H, W, C)."""
    check_batch(images, "calibration_images", floating=True)
    check_int("batch_size", batch_size, 1)
    variables = _arrays({k: v for k, v in variables.items() if k != "quant_stats"})

    stats = {}  # eager: Qwix's provider keeps traced values between traces of a jit
    for start in tqdm(range(0, len(images), batch_size), desc="calibrating", disable=quiet):
        _, stats = qmodel.apply({**variables, **stats},
                                jnp.asarray(images[start:start + batch_size]),
                                mutable=["quant_stats"])
    return {**variables, **stats}


def _arrays(tree):
    """Every leaf a `jax.Array`: Qwix finds a layer's kernel among its parameters by
    identity, which a numpy leaf converted inside the layer would break."""
    return jax.tree.map(jnp.asarray, tree)


def quantize(model, variables, scheme, calibration_images=None, *, batch_size=256,
             quiet=True):
    """(quantised model, its variables): `model` fake-quantised by `scheme` ('int8':
    weights and activations, activations calibrated on `calibration_images`;
    'int8_weights', 'int4_weights': weights only). `model.apply(variables, images)` runs
    it; `checkpoints.save_checkpoint` stores its integer weights."""
    check_scheme(scheme)
    qmodel = quantized_model(model, scheme)
    if scheme == BF16:
        return qmodel, _arrays({**variables, "params": dequantize(_bf16(variables["params"]))})
    variables = {**variables,
                 "params": dequantize(_store(variables["params"], SCHEMES[scheme][0]))}
    if SCHEMES[scheme][1] is None:
        return qmodel, _arrays(variables)
    if calibration_images is None:
        raise ValueError(f"calibration_images must be given for scheme {scheme!r}: its "
                         "activation scales are calibrated on images")
    type(qmodel).compression = {"quantization": scheme,
                                "calibration_images": int(len(calibration_images))}
    return qmodel, calibrate(qmodel, variables, calibration_images,
                             batch_size=batch_size, quiet=quiet)


def _is_quantized_kernel(path, value):
    """Qwix quantises the kernels of convolutions and Dense layers (rank ≥ 2)."""
    return getattr(path[-1], "key", None) == "kernel" and np.ndim(value) >= 2


def stored_params(qmodel, variables):
    """The parameters as a checkpoint stores them: each conv and Dense kernel as
    {'qvalue': int8 array, 'scale': float32 array} with one scale per output channel
    (int4 values are held in int8), the rest as they are.

    A kernel already on a quantisation grid (as `quantize` and loading leave them) is
    stored as the integers and scales that give it back bit for bit, so saving and
    loading changes no weight; any other kernel is quantised afresh by Qwix."""
    if record(qmodel)["quantization"] == BF16:
        return _bf16(variables["params"])
    qtype = SCHEMES[record(qmodel)["quantization"]][0]

    def store(path, value):
        if not _is_quantized_kernel(path, value):
            return np.asarray(value)
        return _on_its_grid(np.asarray(value, np.float32), QMAX[qtype]) or _quantized(
            value, qtype)
    return jax.tree_util.tree_map_with_path(store, variables["params"])


def _on_its_grid(kernel, qmax):
    """{'qvalue', 'scale'} with qvalue · scale == kernel exactly, |qvalue| <= qmax, one
    scale per output channel, else None. The scale that made a grid kernel is its
    channel's max |w| / qmax up to float rounding: the few nearest floats are tried."""
    axes = tuple(range(kernel.ndim - 1))
    absmax = np.abs(kernel).max(axis=axes, keepdims=True)
    base = np.where(absmax > 0, absmax / np.float32(qmax), np.float32(1)).astype(np.float32)
    scale, found = base.copy(), np.zeros(base.shape, bool)
    for ulps in (0, 1, -1, 2, -2, 3, -3):
        trial = base
        for _ in range(abs(ulps)):
            trial = np.nextafter(trial, np.float32(np.inf if ulps > 0 else -np.inf))
        qvalue = np.rint(kernel / trial)
        exact = np.all((qvalue * trial == kernel) & (np.abs(qvalue) <= qmax), axis=axes,
                       keepdims=True)
        scale = np.where(exact & ~found, trial, scale)
        found |= exact
        if found.all():
            return {"qvalue": np.rint(kernel / scale).astype(np.int8), "scale": scale}
    return None


def _quantized(value, qtype):
    """Qwix's symmetric per-output-channel quantisation of a kernel."""
    q = _qwix().quantize(jnp.asarray(value, jnp.float32), qtype,
                         channelwise_axes=[np.ndim(value) - 1],
                         calibration_method=WEIGHT_CALIBRATION[qtype])
    return {"qvalue": np.asarray(q.qvalue).astype(np.int8), "scale": np.asarray(q.scale, np.float32)}


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _store(params, qtype):
    """Every quantisable kernel of `params` quantised afresh by Qwix."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: _quantized(v, qtype) if _is_quantized_kernel(path, v) else np.asarray(v),
        params)


def _bf16(params):
    """Every float parameter rounded to bfloat16 (to nearest even), stored as
    {'bfloat16': its uint16 bits}: plain numpy, which the checkpoint loader accepts."""
    def store(value):
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            return value
        return {"bfloat16": np.asarray(jnp.asarray(value, jnp.bfloat16)).view(np.uint16)}
    return jax.tree.map(store, params)


def dequantize(stored):
    """Float parameters from `stored_params`: qvalue · scale for each quantised kernel
    (values Qwix's absmax quantisation maps back onto themselves), bfloat16 bits
    widened to float32."""
    if isinstance(stored, dict) and set(stored) == {"bfloat16"}:
        bits = np.asarray(stored["bfloat16"])
        if bits.dtype != np.uint16:
            raise ValueError(f"a bfloat16 parameter must be stored as uint16 bits, got "
                             f"{bits.dtype}")
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if isinstance(stored, dict) and set(stored) == {"qvalue", "scale"}:
        qvalue, scale = stored["qvalue"], stored["scale"]
        per_channel = (1,) * (np.ndim(qvalue) - 1) + np.shape(qvalue)[-1:]
        if np.asarray(qvalue).dtype != np.int8 or np.shape(scale) != per_channel:
            raise ValueError(f"a quantised kernel must be int8 values with one scale per "
                             f"output channel {per_channel}, got "
                             f"{np.asarray(qvalue).dtype}{np.shape(qvalue)} and scales "
                             f"of shape {np.shape(scale)}")
        return (qvalue.astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float32)
    if isinstance(stored, dict):
        return {k: dequantize(v) for k, v in stored.items()}
    return stored


def restore(model, compression, variables):
    """(quantised model, variables) of a quantised checkpoint: `model` is the float
    architecture the file records, `compression` its record, `variables` as loaded with
    the kernels dequantised (`dequantize`)."""
    qmodel = quantized_model(model, compression["quantization"])
    type(qmodel).compression = dict(compression)
    return qmodel, _arrays(variables)


def weight_bytes(params, scheme=None):
    """Bytes of the stored weights: quantised kernels at their bit width (int4 packed two
    to a byte) plus their float32 scales, every other array as stored."""
    bits = BITS[SCHEMES[scheme][0]] if scheme in SCHEMES else None
    total = 0
    for leaf in _stored_leaves(params):
        if isinstance(leaf, dict) and set(leaf) == {"bfloat16"}:
            total += leaf["bfloat16"].nbytes
        elif isinstance(leaf, dict):
            total += math.ceil(leaf["qvalue"].size * bits / 8) + leaf["scale"].nbytes
        else:
            total += np.asarray(leaf).nbytes
    return total


def _stored_leaves(tree):
    if isinstance(tree, dict) and set(tree) in ({"qvalue", "scale"}, {"bfloat16"}):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _stored_leaves(value)]
    return [tree]


# ---------------------------------------------------------------- pruning


def _is_kernel(path):
    return getattr(path[-1], "key", None) == "kernel"


def magnitude_masks(params, sparsity):
    """Global magnitude pruning: masks (1 keep, 0 prune, float32) that keep the
    round((1 - sparsity) · n) kernel weights of largest |w| over all n kernel weights of
    the network; ties at the threshold are broken by position. Biases, BatchNorm and
    other parameters are always kept."""
    _check_share("sparsity", sparsity, "a fraction")
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [np.abs(np.asarray(v)).ravel() for p, v in leaves if _is_kernel(p)]
    if not kernels:
        raise ValueError("params must hold kernels (conv or Dense) to prune; found none")
    magnitudes = np.concatenate(kernels)
    keep = np.zeros(magnitudes.size, bool)
    keep[np.argsort(-magnitudes, kind="stable")[:round((1 - sparsity) * magnitudes.size)]] = True
    masks, offset = {}, 0
    for path, value in leaves:
        if _is_kernel(path):
            size = np.size(value)
            masks[path] = keep[offset:offset + size].reshape(np.shape(value)).astype(np.float32)
            offset += size
        else:
            masks[path] = np.ones(np.shape(value), np.float32)
    return jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                        [masks[p] for p, _ in leaves])


def prune(variables, masks):
    """`variables` with the parameters multiplied by `masks`."""
    return {**variables, "params": jax.tree.map(lambda w, m: w * m, variables["params"],
                                                masks)}


def keep_pruned(masks) -> optax.GradientTransformation:
    """An optax transformation that zeroes the updates of pruned weights: chained after
    an optimiser, fine-tuning keeps them exactly zero."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, masks), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def sparsity_of(params):
    """The fraction of kernel weights that are exactly zero."""
    kernels = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
               if _is_kernel(p)]
    return float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels))


# ---------------------------------------------------------------- structured pruning

CRITERIA = ("l1", "bn_scale")  # a filter's L1 norm, or its BatchNorm's |scale| (slimming)


def _groups(model):
    """What structured pruning may narrow, as (conv, its BatchNorm, [(the layer reading
    its channels, that layer's kernel axis for them)]) module paths. The CNN: every
    convolution (the next one reads it; pooling keeps channels; the last one's channels
    are the rows of the head's first Dense layer after global average pooling). ResNet-20:
    the first convolution of every basic block, read only by the block's second one; the
    second one's channels are added to the shortcut's, so they stay."""
    if type(model) is CIFAR10CNN:
        convs = [(f"block{b + 1}", i) for b, n in enumerate(CONVS_PER_BLOCK) for i in range(n)]
        paths = [((block, f"Conv_{i}"), (block, f"BatchNorm_{i}")) for block, i in convs]
        readers = [[(conv, 2)] for conv, _ in paths[1:]] + [[(("head", "Dense_0"), 0)]]
        return [(conv, bn, reader) for (conv, bn), reader in zip(paths, readers)]
    if type(model) is ResNet20:
        return [((stage, block, "conv1"), (stage, block, "bn1"), [((stage, block, "conv2"), 2)])
                for stage in ("stage1", "stage2", "stage3")
                for block in (f"block{i + 1}" for i in range(model.blocks_per_stage))]
    raise TypeError(f"structured pruning here narrows the CIFAR10CNN and ResNet20; got "
                    f"{type(model).__name__}")


def _narrowed(model, widths):
    """`model` rebuilt with the pruned groups' widths, in `_groups`' order."""
    return model.clone(**{"channels" if type(model) is CIFAR10CNN else "inner": tuple(widths)})


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def filter_scores(model, variables, criterion="l1"):
    """{conv path: (C,) score of each output filter}, for every conv that structured
    pruning may narrow: the L1 norm of its kernel, or the |scale| of its BatchNorm."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    params = variables["params"]
    return {conv: (np.abs(np.asarray(_at(params, conv)["kernel"])).sum(axis=(0, 1, 2))
                   if criterion == "l1" else np.abs(np.asarray(_at(params, bn)["scale"])))
            for conv, bn, _ in _groups(model)}


def prune_filters(model, variables, fraction, criterion="l1"):
    """(narrower model, its variables): `fraction` of the filters of every conv that
    `_groups` allows removed, those of lowest `criterion` score, with their BatchNorm
    entries and the matching input channels of the layer that reads them. The result is
    the same architecture rebuilt narrower (the CNN's `channels`, ResNet-20's `inner`):
    really smaller and faster, not masked."""
    groups = _groups(model)
    _check_share("fraction", fraction, "the share of each layer's filters to remove,")
    scores = filter_scores(model, variables, criterion)
    params = jax.tree.map(np.array, flax.core.unfreeze(variables["params"]))
    stats = jax.tree.map(np.array, flax.core.unfreeze(variables.get("batch_stats", {})))
    widths = []
    for conv, bn, readers in groups:
        n = len(scores[conv])
        keep = np.sort(np.argsort(-scores[conv], kind="stable")[:max(1, round((1 - fraction) * n))])
        widths.append(len(keep))
        layer = _at(params, conv)
        layer["kernel"] = layer["kernel"][..., keep]
        for tree in (params, stats):
            parent = _at(tree, bn[:-1]) if _has(tree, bn) else None
            if parent is not None:
                parent[bn[-1]] = {k: v[keep] for k, v in parent[bn[-1]].items()}
        for reader, axis in readers:
            layer = _at(params, reader)
            layer["kernel"] = np.take(layer["kernel"], keep, axis=axis)
    return _narrowed(model, widths), {**variables, "params": params,
                                      **({"batch_stats": stats} if stats else {})}


def _has(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def flops(model, variables, batch=1):
    """Floating-point operations of one forward pass of `batch` images, as XLA counts
    them (its cost analysis of the compiled program)."""
    shape = (batch,) + tuple(getattr(model, "input_shape", (32, 32, 3)))
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(
        variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
