"""Any Flax linen model, or a plain function, as the explainers see it.

- `forward(model, variables)` is the model as a function of its images, f(x) -> logits.
  `model` is a `flax.linen.Module` (run with `model.apply(variables, x, **apply_kwargs)`)
  or a plain function f(x) -> logits, e.g. a Flax NNX model closed over its state.
- A layer is a submodule's Flax module path, such as `block3`, `stage3/block2` or
  `encoder/layer_5`. `split(...)` reaches it with `flax.linen.intercept_methods`, with no
  hook and nothing the model must define: `features(x)` captures the submodule's
  output A, and `head(x, A)` replaces it, so layer methods differentiate the logits with
  `jax.vjp` with respect to A. XLA drops what each half does not use (`tests/test_any_model.py`
  counts the convolutions in the compiled program).
- `layers(...)` lists every layer a method can target, with its output shape. A model may
  declare `explanation_layer` (the default layer) and `layer_aliases` (other names for
  its layers), as `CIFAR10CNN` does for the seed's `conv1`..`conv3`.
- Token layers (N, T, D), as in a ViT, are read as a square grid: `as_grid` reshapes
  them to (N, s, s, D) when T = s², and drops the first token (a class token) when
  T − 1 = s².
- `check_call(...)` checks images and variables against the model with `jax.eval_shape`
  before anything is compiled, and names the first thing that does not fit.
- `guided(fn)` evaluates fn's traced program with Guided Backprop's rule on every ReLU,
  and `softplus_relus(fn, beta)` with a softplus in place of every ReLU.

Shapes: images (N, H, W, C); logits (N, K).
"""

import functools
import math
from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from xai_core import map_batches

# ----------------------------------------------------------------------------------------
# Models as functions.


def is_module(model) -> bool:
    return isinstance(model, nn.Module)


def model_name(model) -> str:
    return type(model).__name__ if is_module(model) else getattr(model, "__name__",
                                                                  type(model).__name__)


def forward(model, variables, apply_kwargs=None) -> Callable:
    """The model as f(x) -> logits: `model.apply(variables, x, **apply_kwargs)` for a
    linen Module, the function itself otherwise (its `variables` are unused)."""
    if is_module(model):
        kwargs = dict(apply_kwargs or {})
        return lambda x: model.apply(variables, x, **kwargs)
    if not callable(model):
        raise TypeError(f"model must be a flax.linen Module or a function f(x) -> logits, "
                        f"got {type(model).__name__}")
    return model


@functools.partial(jax.jit, static_argnames=("model", "apply_kwargs"))
def _probabilities(variables, images, *, model, apply_kwargs):
    x = images / 255.0 if images.dtype == jnp.uint8 else images
    return jax.nn.softmax(forward(model, variables, dict(apply_kwargs))(x))


def predict(model, variables, images, *, apply_kwargs=None, batch_size=250, place=None,
            on_batch=None):
    """Softmax probabilities (N, K), numpy, of uint8 images (0..255) or float ones in
    [0, 1], in jitted batches of `batch_size` (`xai_core.map_batches`: the last one
    padded, so each shape compiles once). Every script and the explorer predict with it.

    place: puts each batch on the devices (e.g. a sharding over them); on_batch(size):
    called after each batch, e.g. a progress bar's `update`.
    """
    kwargs = frozen_kwargs(apply_kwargs)

    def probabilities(x):
        return _probabilities(variables, x, model=model, apply_kwargs=kwargs)

    return map_batches(probabilities, [images], batch_size, place=place, on_batch=on_batch)


def _path(context) -> str:
    return "/".join(context.module.path)


def _record_calls(model, variables, images_shape, apply_kwargs=None):
    """{path: output ShapeDtypeStruct} of every submodule `__call__`, in the order the
    calls start; traced abstractly with `jax.eval_shape`."""
    outputs = {}

    def record(next_fun, args, kwargs, context):
        path = _path(context)
        if context.method_name != "__call__" or not path:
            return next_fun(*args, **kwargs)
        outputs.setdefault(path, None)  # in the order the calls start
        out = next_fun(*args, **kwargs)
        if outputs[path] is None:
            outputs[path] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                         out)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: forward(model, v, apply_kwargs)(
            jnp.zeros(images_shape, jnp.float32)), variables)
    return outputs


def _targetable(out) -> bool:
    """A layer output explainers can map back onto the image: (N, H, W, C) or (N, T, D)."""
    return isinstance(out, jax.ShapeDtypeStruct) and out.ndim in (3, 4)


def layers(model, variables, image_shape, apply_kwargs=None) -> Dict[str, Tuple[int, ...]]:
    """Every targetable layer of a linen model: {module path: output shape without the
    batch axis}, in the order the forward pass runs them. Traced once per model,
    variables layout and image shape.

    Args:
        image_shape: (H, W, C) of one image, or (N, H, W, C).
    """
    shape = tuple(image_shape)
    abstract, layout = _abstract(variables)
    return dict(_layers_cached(model, frozen_kwargs(apply_kwargs), layout, abstract,
                               (1,) + shape[-3:]))


@functools.lru_cache(maxsize=256)
def _layers_cached(model, apply_kwargs, layout, tree, image_shape):
    variables = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(s, d) for s, d in layout])
    outputs = _record_calls(model, variables, image_shape, dict(apply_kwargs))
    return tuple((path, tuple(out.shape[1:])) for path, out in outputs.items()
                 if _targetable(out))


def frozen_kwargs(apply_kwargs) -> tuple:
    """`apply_kwargs` as sorted (name, value) pairs: hashable, for caches and jit."""
    return tuple(sorted((apply_kwargs or {}).items()))


def _abstract(variables):
    """(tree structure, ((shape, dtype), ...)): a hashable stand-in for `variables`."""
    leaves, tree = jax.tree.flatten(variables if variables is not None else {})
    return tree, tuple((tuple(np.shape(v)), np.dtype(getattr(v, "dtype", None)
                                                     or np.result_type(v)))
                       for v in leaves)


def describe_layers(found: Dict[str, Tuple[int, ...]]) -> str:
    return ", ".join(f"{path} ({'×'.join(map(str, shape))})" for path, shape in found.items())


def default_layer(model) -> Optional[str]:
    """The layer the model declares for explanations (`explanation_layer`), or None."""
    return getattr(model, "explanation_layer", None)


def resolve_layer(model, variables, layer, image_shape, apply_kwargs=None,
                  name="layer") -> str:
    """The module path of `layer` (a path, an alias the model declares, or None for the
    model's `explanation_layer`), checked against `layers(...)`; `name` is the argument
    that gave it, for the message."""
    if not is_module(model):
        raise TypeError(f"{name}: layer methods need a flax.linen Module to reach a layer "
                        f"in, got the plain function {model_name(model)}")
    found = layers(model, variables, image_shape, apply_kwargs)
    if layer is None:
        layer = default_layer(model)
        if layer is None:
            raise ValueError(f"{name} must be given: {model_name(model)} declares no "
                             f"explanation_layer; its layers are {describe_layers(found)}")
    aliases = dict(getattr(model, "layer_aliases", {}))
    path = aliases.get(layer, layer)
    if path not in found:
        also = "; ".join(f"{a} = {p}" for a, p in aliases.items())
        raise ValueError(f"{name} {layer!r} is not a module of {model_name(model)}; its "
                         f"layers are {describe_layers(found)}"
                         + (f" (aliases: {also})" if also else ""))
    return path


# ----------------------------------------------------------------------------------------
# A layer's output, and the rest of the network from it.


def split(model, variables, layer: str, apply_kwargs=None):
    """(features, head): features(x) -> A, the output of the submodule at `layer`, and
    head(x, A) -> logits, the network with that output replaced by A.

    `layer` is a module path (see `resolve_layer`). The submodule must run once per
    forward pass. In `head`, nothing before the layer is used, so XLA drops it; in
    `features`, nothing after it.
    """
    kwargs = dict(apply_kwargs or {})

    def run(x, replacement=None):
        seen = []

        def intercept(next_fun, args, call_kwargs, context):
            if context.method_name != "__call__" or _path(context) != layer:
                return next_fun(*args, **call_kwargs)
            seen.append(next_fun(*args, **call_kwargs) if replacement is None
                        else replacement)
            return seen[-1]

        with nn.intercept_methods(intercept):
            logits = model.apply(variables, x, **kwargs)
        if len(seen) != 1:
            raise ValueError(f"layer {layer!r} runs {len(seen)} times in one forward pass of "
                             f"{model_name(model)}; choose a layer that runs once")
        return seen[0], logits

    return (lambda x: run(x)[0]), (lambda x, acts: run(x, acts)[1])


def as_grid(acts):
    """Layer outputs as (N, h, w, C) maps: spatial ones unchanged; tokens (N, T, D) on an
    s × s grid, dropping the first (class) token when T − 1 = s²."""
    if acts.ndim == 4:
        return acts
    n, tokens, dim = acts.shape
    for skip in (0, 1):
        side = math.isqrt(tokens - skip)
        if side * side == tokens - skip:
            return acts[:, skip:].reshape(n, side, side, dim)
    raise ValueError(f"a token layer must hold s² or s² + 1 tokens to lie on a square grid, "
                     f"got {tokens}")


# ----------------------------------------------------------------------------------------
# Checks of images and variables against the model, before anything is compiled.


def _paths(tree) -> Dict[str, tuple]:
    """{'collection/module/.../name': shape}, the 'params' collection first."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
             for p, v in leaves}
    return dict(sorted(paths.items(), key=lambda item: not item[0].startswith("params/")))


@functools.lru_cache(maxsize=256)
def abstract_variables(model, image_shape, apply_kwargs=()):
    """The shapes and dtypes of `model.init` on images of `image_shape` (N, H, W, C),
    without computing anything; `apply_kwargs` as sorted (name, value) pairs."""
    x = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **dict(apply_kwargs)), x)


@functools.lru_cache(maxsize=256)
def _check_cached(model, apply_kwargs, layout, tree, image_shape, layer):
    """The checks of `check_call` for one model, variables layout, image shape and layer."""
    variables = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(s, d) for s, d in layout])
    kwargs = dict(apply_kwargs)
    name = model_name(model)
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    if is_module(model):
        try:
            expected = abstract_variables(model, image_shape, apply_kwargs)
        except Exception as e:  # noqa: BLE001 - the model's own reason, in our words
            raise ValueError(f"image of shape {image_shape[1:]} does not fit {name}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        want, got = _paths(expected), _paths(variables)
        missing = [p for p in want if p not in got]
        extra = [p for p in got if p not in want]
        if missing or extra:
            swapped = dict(variables)
            hint = ""
            if {"params", "batch_stats"} <= set(swapped):
                swapped["params"], swapped["batch_stats"] = (swapped["batch_stats"],
                                                             swapped["params"])
                if set(_paths(swapped)) == set(want):
                    hint = " (params and batch_stats are swapped)"
            first = (f"{missing[0]} is missing" if missing else f"{extra[0]} is not a "
                     f"variable of {name}")
            raise ValueError(f"variables do not fit {name}: {first}{hint}")
        for path, shape in want.items():
            if got[path] != shape:
                raise ValueError(f"variables do not fit {name} on images of shape "
                                 f"{image_shape[1:]}: {path} is {got[path]}, the model "
                                 f"needs {shape}")
    try:
        logits = jax.eval_shape(lambda v, x: forward(model, v, kwargs)(x), variables, x)
    except Exception as e:  # noqa: BLE001 - the model's own reason, in our words
        raise ValueError(f"image of shape {image_shape[1:]} does not fit {name}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(logits, jax.ShapeDtypeStruct) or logits.shape[:1] != image_shape[:1] \
            or logits.ndim != 2:
        raise ValueError(f"{name} must return logits (N, K) for images (N, H, W, C), got "
                         f"{jax.tree.map(lambda a: a.shape, logits)}")
    if layer is not _NO_LAYER:
        resolve_layer(model, variables, layer, image_shape, kwargs)
    return logits.shape[1]


_NO_LAYER = object()  # check_call's default: no layer to check


def check_call(model, variables, images_shape, apply_kwargs=None, layer=_NO_LAYER) -> int:
    """Checks that `variables` and images of `images_shape` (N, H, W, C) fit `model`, and
    `layer` (when given; None is the model's `explanation_layer`) is one of its layers;
    returns the number of classes. Runs once per model, variables layout, shape and
    layer; later calls cost a lookup."""
    if is_module(model) and not hasattr(variables, "items"):
        raise TypeError(f"variables must be a dict of collections, such as {{'params': "
                        f"...}}, got {type(variables).__name__}")
    tree, layout = _abstract(variables)
    return _check_cached(model, frozen_kwargs(apply_kwargs), layout, tree, tuple(images_shape),
                         layer)


# ----------------------------------------------------------------------------------------
# Guided Backprop by rewriting the traced program.


@jax.custom_vjp
def guided_relu(x):
    """ReLU whose backward pass is Guided Backprop's rule (Springenberg et al. 2015): the
    gradient passes only where the input was positive and the incoming gradient is."""
    return jax.nn.relu(x)


def _guided_relu_fwd(x):
    return jax.nn.relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, 0.0).astype(g.dtype),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)

# Primitives whose inner program runs once, in order: the interpreters step into them.
CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat", "checkpoint"}


def _is_zero(v) -> bool:
    return isinstance(v, jex.Literal) and np.ndim(v.val) == 0 and float(v.val) == 0.0


def _relu_input(eqn):
    """The input of a ReLU equation, else None: `jax.nn.relu` (a custom_jvp_call named
    relu), or `jnp.maximum(x, 0)` with the zero second, as a ReLU is written by hand.
    `jnp.maximum(0, x)` is left alone: normalisation layers clamp their variance with
    it (flax's LayerNorm), and guiding that clamp would be wrong."""
    if eqn.primitive.name == "custom_jvp_call" and eqn.params.get("name") == "relu":
        return eqn.invars[0]
    if eqn.primitive.name == "max" and len(eqn.invars) == 2 and _is_zero(eqn.invars[1]):
        return eqn.invars[0]
    return None


def inner_programs(eqn):
    """The inner programs of a higher-order equation, each with its constants where it
    has them (a `ClosedJaxpr`: e.g. a jitted function that closes over arrays).
    `jax.extend.core.jaxprs_in_params` would give open jaxprs, without those constants."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jex.ClosedJaxpr, jex.Jaxpr)):
                found.append(item)
    return found


def bind(eqn, values):
    """Runs one equation of a program on `values`: its outputs, as a list."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def count_relus(jaxpr) -> int:
    """ReLUs anywhere in a program, nested programs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if _relu_input(eqn) is not None:
            total += 1
        else:
            total += sum(count_relus(inner) for inner in inner_programs(eqn))
    return total


def closed(inner):
    """(jaxpr, consts) of an inner program, closed or not."""
    return (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())


def environment(jaxpr, consts, args):
    """(env, read) to evaluate `jaxpr` by hand: env maps its variables to values, with
    its constants and inputs set; read(v) is a literal's value or env[v]."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    return env, read


def _eval_relus(relu, what, jaxpr, consts, *args):
    """Evaluates a program with every ReLU run as `relu`, and everything else as traced."""
    env, read = environment(jaxpr, consts, args)
    for eqn in jaxpr.eqns:
        relu_in = _relu_input(eqn)
        inner = inner_programs(eqn)
        if relu_in is not None:
            outs = [relu(read(relu_in))]
        elif inner and any(count_relus(closed(j)[0]) for j in inner):
            if eqn.primitive.name not in CALLS or len(inner) != 1:
                raise UnguidedError(f"{what} cannot rewrite the ReLUs inside a "
                                    f"`{eqn.primitive.name}` (a loop or branch) of the model")
            outs = _eval_relus(relu, what, *closed(inner[0]), *map(read, eqn.invars))
        else:
            outs = bind(eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jex.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


class UnguidedError(TypeError):
    """A program Guided Backprop cannot explain: no ReLU, or ReLUs inside a loop or a
    branch."""


def guided(fn: Callable) -> Callable:
    """fn(x) with every ReLU's backward pass replaced by Guided Backprop's rule.

    The program fn traces to is evaluated equation by equation, with each ReLU
    (`jax.nn.relu`, or jnp.maximum(x, 0)) run as `guided_relu`; everything else, and the forward
    values, are unchanged. A program without ReLUs, or with ReLUs inside a loop or a
    branch, is refused rather than explained unguided.
    """
    def guided_fn(x):
        closed = jax.make_jaxpr(fn)(x)
        if not count_relus(closed.jaxpr):
            raise UnguidedError("Guided Backprop needs a ReLU network, and the model's program "
                            "has no ReLU (jax.nn.relu or max(x, 0))")
        (out,) = _eval_relus(guided_relu, "Guided Backprop", closed.jaxpr, closed.consts, x)
        return out

    return guided_fn


def softplus_relus(fn: Callable, beta: float) -> Callable:
    """fn(x) with every ReLU replaced by softplus_β(z) = log(1 + exp(βz)) / β.

    A ReLU network's input gradient is piecewise constant, so its second derivatives are
    zero and an attack cannot differentiate a gradient explanation; the softplus network
    is a smooth surrogate that tends to fn as β -> ∞ (Dombrowski et al. 2019), and the
    β-smoothed explanation is their defence. A program without ReLUs is returned as is;
    ReLUs inside a loop or a branch are refused.
    """
    def relu(z):
        return jax.nn.softplus(beta * z) / beta

    def smooth_fn(x):
        closed = jax.make_jaxpr(fn)(x)
        if not count_relus(closed.jaxpr):
            return fn(x)
        (out,) = _eval_relus(relu, "softplus_relus", closed.jaxpr, closed.consts, x)
        return out

    return smooth_fn
