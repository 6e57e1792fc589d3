"""The bottom layer every other module stands on: argument checks, target resolution,
batching, the Gaussian blur and the jit-by-batch policy. It imports only JAX and numpy.

Shapes: images are float NHWC (N, H, W, C) in [0, 1]; maps are (N, H, W). Targets are
int32 (N,); `PREDICTED` (-1) means that example's own argmax. Every check's message names
the argument, what was expected and what was given.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

PREDICTED = -1
EPS = 1e-8

# XLA:CPU explains a single image 1.4-1.6x faster with YNNPACK convolutions, while batches
# of 4 or more run faster without them (measured with jax 0.10.2 by
# benchmarks/bench_xai.py --plain-jit). So single images get these options on CPU.
SINGLE_IMAGE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


# ----------------------------------------------------------------------------------------
# Argument checks. `check_array` and `check_batch` read only static shapes and dtypes, so
# they hold while tracing under jit; `check_images` and `check_targets` read values, on
# the host, before a jitted call.


def check_int(name, value, minimum):
    """`value` as an int >= `minimum`, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_number(name, value, upper=None):
    """`value` as a finite float >= 0 (and <= `upper` when given)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else "finite and >= 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def check_images(image, name="image"):
    """Returns `image` as a float32 batch (N, H, W, C) and whether it was one image.

    One image is (H, W, C), a batch (N, H, W, C). uint8 input is taken as 0..255 and
    divided by 255; float input must lie in [0, 1]. Whether the model takes this size is
    `xai_models.check_call`'s question.
    """
    if not isinstance(image, (np.ndarray, jax.Array)):
        if not isinstance(image, (list, tuple)):
            raise TypeError(f"{name} must be an array, one image (H, W, C) or a batch "
                            f"(N, H, W, C), got {type(image).__name__}")
        image = np.asarray(image)
    shape = tuple(image.shape)
    if len(shape) not in (3, 4) or 0 in shape[-3:]:
        raise ValueError(f"{name} must be one image (H, W, C) or a batch (N, H, W, C), got "
                         f"shape {shape}")
    if len(shape) == 4 and shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {shape}")
    xp = jnp if isinstance(image, jax.Array) else np
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255
    elif not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"{name} must be float in [0, 1] or uint8 in 0..255, got dtype "
                        f"{image.dtype}")
    else:
        if not bool(xp.isfinite(image).all()):
            raise ValueError(f"{name} must be finite, got NaN or inf values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} values must be in [0, 1] (divide 0..255 images by "
                             f"255), got range [{lo:.4g}, {hi:.4g}]")
    single = len(shape) == 3
    image = jnp.asarray(image, jnp.float32)
    return (image[None] if single else image), single


def check_targets(target_class, n, num_classes):
    """Returns int32 targets (n,) from None, one int, or n ints in [0, num_classes)."""
    expected = f"None, an int in [0, {num_classes}) or an array of {n} such ints"
    if target_class is None:
        return jnp.full((n,), PREDICTED, jnp.int32)
    if isinstance(target_class, (bool, np.bool_)):
        raise TypeError(f"target_class must be {expected}, got {target_class!r}")
    if isinstance(target_class, numbers.Integral):
        targets = np.full((n,), int(target_class))
    else:
        targets = np.asarray(target_class)
        if not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"target_class must be {expected}, got dtype {targets.dtype}")
        if targets.ndim == 0:
            targets = np.full((n,), int(targets))
        elif targets.shape != (n,):
            raise ValueError(f"target_class must be {expected}, got shape {targets.shape}")
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise ValueError(f"target_class must be in [0, {num_classes}), got {bad[0]}")
    return jnp.asarray(targets, jnp.int32)


def check_array(name, x):
    """`x`'s static shape, or a TypeError naming `name` when `x` is not an array."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def check_batch(x, name="images", *, channels=None, multiple=1, why="", floating=False):
    """The static shape of a batch (N, H, W, C), N >= 1, or an error naming `name`.

    channels: the C required (3: RGB images); multiple: H and W must be positive multiples
    of it (`why` says why, e.g. " (three 2x2 poolings)"); floating: the dtype must be
    float. The models check their input with it, the metrics their images.
    """
    layout = "a batch of RGB images (N, H, W, 3)" if channels == 3 else "a batch (N, H, W, C)"
    if not hasattr(x, "shape") or (floating and not hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array{layout[layout.index(' ('):]}, got "
                        f"{type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[0] == 0 or (channels is not None and shape[-1] != channels):
        raise ValueError(f"{name} must be {layout} with N >= 1, got shape {shape}")
    if multiple > 1 and (shape[1] % multiple or shape[2] % multiple or 0 in shape[1:3]):
        owner = name[:-2] if name.endswith(" x") else name
        raise ValueError(f"{owner} height and width must be positive multiples of "
                         f"{multiple}{why}, got {shape[1]}x{shape[2]}")
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be float images in [0, 1], got dtype {x.dtype} "
                        "(divide uint8 images by 255 first)")
    return shape


# ----------------------------------------------------------------------------------------
# Targets, batching and maps: pure and jittable.


def resolve_targets(logits, targets):
    """Replaces each `PREDICTED` (negative) target with that example's argmax class."""
    return jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets).astype(jnp.int32)


def target_logit(logits, targets):
    """Each example's logit of its target class: (N, K), (N,) -> (N,)."""
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def map_pairs(fn, n, count, batch_size, *, total):
    """Evaluates `fn(samples, images)` on every (sample, image) pair of `count` × `n`.

    `fn` takes two int32 index arrays of one length B and returns (B, ...). Pairs run
    sample-major as one vectorised call when `count · n <= batch_size`, else in chunks
    of `batch_size` inside a `lax.scan`, so `batch_size` bounds the memory of every
    sampling method. XLA:CPU runs backward convolutions about 3x slower inside a loop
    (it folds the kernel transpose into the convolution there), so the loop is used
    only when memory needs it.

    Returns:
        total=True: Σ_s fn(s, i) for each image i, (n, ...);
        total=False: every output, (count, n, ...).
    """
    pairs = n * count
    chunk = min(batch_size, pairs)
    steps = -(-pairs // chunk)
    if steps == 1:
        flat = jnp.arange(pairs, dtype=jnp.int32)
        out = fn(flat // n, flat % n)
        out = out.reshape((count, n) + out.shape[1:])
        return jnp.sum(out, axis=0) if total else out
    flat = jnp.arange(steps * chunk, dtype=jnp.int32).reshape(steps, chunk)
    index = jnp.zeros((chunk,), jnp.int32)
    out_shape = jax.eval_shape(fn, index, index)
    if total:
        def step(acc, f):
            valid = f < pairs
            f = jnp.minimum(f, pairs - 1)
            out = fn(f // n, f % n)
            out = jnp.where(valid.reshape((-1,) + (1,) * (out.ndim - 1)), out, 0)
            return acc.at[f % n].add(out), None

        acc = jnp.zeros((n,) + out_shape.shape[1:], out_shape.dtype)
        return jax.lax.scan(step, acc, flat)[0]

    def step(_, f):
        f = jnp.minimum(f, pairs - 1)
        return None, fn(f // n, f % n)

    outs = jax.lax.scan(step, None, flat)[1]
    outs = outs.reshape((steps * chunk,) + out_shape.shape[1:])[:pairs]
    return outs.reshape((count, n) + out_shape.shape[1:])


def normalize_maps(maps, eps=EPS):
    """Min-max scales each (H, W) map to [0, 1]; a constant map becomes all zeros."""
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps - lo) / (hi - lo + eps)


def gaussian_blur(images, sigma=5.0, size=11):
    """Each channel blurred with a size × size Gaussian of std `sigma` (edges repeated),
    Petsiuk et al.'s insertion start."""
    check_batch(images)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"sigma must be a number > 0, got {sigma!r}")
    check_int("size", size, 1)
    if size % 2 == 0:
        raise ValueError(f"size must be odd, got {size}")
    radius = size // 2
    taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / jnp.sum(taps)
    channels = images.shape[-1]
    padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = padded
    for kernel in (taps.reshape(size, 1, 1, 1), taps.reshape(1, size, 1, 1)):
        out = jax.lax.conv_general_dilated(
            out, jnp.tile(kernel, (1, 1, 1, channels)).astype(images.dtype), (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    return out


def map_batches(fn, arrays, batch_size: int, *, place=None, on_batch=None, to_host=None):
    """`fn(*batch)` over fixed-size batches of `arrays` (equal first axes), as numpy.

    The last batch is padded by repeating its first row, so every call has one shape
    and a jitted `fn` compiles once; the padding is cut from the outputs, which are
    concatenated along the first axis. Arrays already on a device stay there: each batch
    is cut by one compiled gather whose offset is an argument (a static slice would
    compile once per offset). The outputs come back in one transfer at the end, so the
    calls are dispatched without waiting for each other. `place(batch)` puts a batch on
    the devices (e.g. `jax.device_put` with a sharding); `on_batch(size)` is called
    after each batch is dispatched, e.g. a progress bar's `update`. `to_host(outputs)`
    brings the list of outputs back (default `jax.device_get`).
    """
    n = len(arrays[0])
    outputs = []
    for start in range(0, n, batch_size):
        batch = [_device_batch(a, start, batch_size) if isinstance(a, jax.Array)
                 else _host_batch(a, start, batch_size) for a in arrays]
        if place is not None:
            batch = place(batch)
        outputs.append(fn(*batch))
        if on_batch is not None:
            on_batch(min(batch_size, n - start))
    outputs = (to_host or jax.device_get)(outputs)
    return jax.tree.map(lambda *o: np.concatenate(o)[:n], *outputs)


def _host_batch(array, start: int, batch_size: int):
    part = array[start:start + batch_size]
    if len(part) == batch_size:
        return part
    return np.concatenate([part, np.repeat(part[:1], batch_size - len(part), axis=0)])


@functools.lru_cache(maxsize=None)
def _device_batcher(batch_size: int):
    @jax.jit
    def take(array, start):
        rows = start + jnp.arange(batch_size)
        return array[jnp.where(rows < len(array), rows, start)]  # padding: the first row

    return take


def _device_batch(array, start: int, batch_size: int):
    return _device_batcher(batch_size)(array, start)


# ----------------------------------------------------------------------------------------
# Compilation.


@functools.lru_cache(maxsize=None)
def single_image_compiler_options():
    """`SINGLE_IMAGE_CPU_OPTIONS` when this backend and jaxlib accept them, else None."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=SINGLE_IMAGE_CPU_OPTIONS)(jnp.zeros(()))
    except Exception:  # noqa: BLE001 - a jaxlib without the option: plain jit everywhere
        return None
    return SINGLE_IMAGE_CPU_OPTIONS


def jit_by_batch(fn, compiler_options="auto", **kwargs):
    """jax.jit of `fn(variables, images, ...)`: single images compiled with
    `single_image_compiler_options()` (or `compiler_options`), batches plainly; each
    compiles once per shape."""
    batched = jax.jit(fn, **kwargs)
    options = (single_image_compiler_options() if compiler_options == "auto"
               else compiler_options)
    if options is None:
        return batched
    single = jax.jit(fn, compiler_options=options, **kwargs)
    return lambda variables, images, *args, **kw: (
        single if images.shape[0] == 1 else batched)(variables, images, *args, **kw)
