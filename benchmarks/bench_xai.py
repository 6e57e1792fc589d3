"""Explainer throughput of the CIFAR-10 CNN on the current JAX device.

    python benchmarks/bench_xai.py [--batch-size 64] [--repeats 20] [--width 64]

Prints images/s for GradCAM (conv3) and saliency on batches of --batch-size, and ms per
image for SmoothGrad with 50 samples, explained one image at a time, next to the model's
plain forward pass: the public `GradCAM` / `SaliencyMap` calls, input checks and the
copy back to numpy included. A straightforward jit+vmap version (`reference:`) is timed
alongside, so that speed-ups are measured on the same machine at the same moment.
`--plain-jit` also times the same calls without the XLA:CPU options that
`xai_visualizations` sets for single images, to show what they buy. Every timing comes after a warm-up call
that compiles, and is the median of --repeats calls.

    python benchmarks/bench_xai.py --methods                     # also every method
    python benchmarks/bench_xai.py --deletion-images 1000         # also the deletion curves

`--methods` times every method of `xai_visualizations.METHODS` (or the ones named)
through `Explainer` with its default options; `--deletion-images N` times deletion +
insertion curves of random maps on N images every `--deletion-step` pixels, in fp32 or
`--precision bf16`, and prints the model passes per second.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import cifar10_cnn_model as cm  # noqa: E402
import xai_cli as cli  # noqa: E402
import xai_visualizations as xv  # noqa: E402
from cifar10_cnn_model import CONVS_PER_BLOCK, CIFAR10CNN  # noqa: E402
from xai_cli import describe_device  # noqa: E402


def time_call(fn, repeats, desc, quiet):
    """(seconds of the first, compiling call; median seconds of `repeats` later calls)."""
    compile_s, times = time_round_robin({desc: fn}, repeats, quiet)
    return compile_s[desc], times[desc]


def time_round_robin(calls, repeats, quiet):
    """Compiles every call, then times them in turn, `repeats` rounds.

    Interleaving matters on a shared machine: its speed drifts by tens of percent over
    minutes, which would otherwise favour whichever call ran in a fast spell.

    Returns:
        ({name: seconds of the compiling call}, {name: median seconds per call}).
    """
    compile_s, times = {}, {name: [] for name in calls}
    for name, fn in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - start
    for _ in tqdm(range(repeats), desc="rounds", disable=quiet, leave=False):
        for name, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return compile_s, {name: statistics.median(t) for name, t in times.items()}


@cli.entry_point
def main(argv=None):
    positive = cli.int_at_least(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--repeats", type=positive, default=20, help="timed calls per method")
    parser.add_argument("--samples", type=positive, default=50, help="SmoothGrad samples")
    parser.add_argument("--width", type=positive, default=64,
                        help="64 is the reference network")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=0)
    parser.add_argument("--plain-jit", action="store_true",
                        help="also time the calls jitted without the CPU options")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the straightforward jit+vmap version")
    parser.add_argument("--conv-layers", action="store_true",
                        help="also time each conv layer alone (GFLOP/s) at --batch-size")
    parser.add_argument("--methods", nargs="*", default=None, choices=tuple(xv.METHODS),
                        help="also time these methods (none given: all) through "
                             "`Explainer`, with their default options, on --method-batch "
                             "images")
    parser.add_argument("--method-batch", type=positive, default=16)
    parser.add_argument("--deletion-images", type=cli.int_at_least(0), default=0,
                        help="also time deletion + insertion curves on this many images")
    parser.add_argument("--deletion-step", type=positive, default=32, help="pixels per point")
    parser.add_argument("--deletion-chunk", type=positive, default=1000,
                        help="images per deletion call")
    parser.add_argument("--deletion-batch", type=positive, default=4096,
                        help="image pairs per model call in the deletion curves")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the model's compute precision in the deletion curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    model = CIFAR10CNN(width=args.width)
    key = jax.random.key(args.seed)
    variables = jax.jit(model.init)(key, jnp.zeros((1, 32, 32, 3)))
    images = jax.random.uniform(key, (args.batch_size, 32, 32, 3))
    print(f"device: {describe_device()}; width {args.width}")
    print(f"XLA:CPU options for single images: {xv.single_image_compiler_options() or 'none'}")
    runs = build_runs(model, variables, images, args.samples, xv.single_image_compiler_options())
    if not args.no_reference:
        runs.update(reference_runs(model, variables, images, args.samples))
    if args.plain_jit:
        plain = build_runs(model, variables, images, args.samples, None)
        runs.update({f"{name}, no options": run for name, run in plain.items()
                     if run[0] == 1})  # batches get no options either way
    compile_s, seconds = time_round_robin({name: fn for name, (_, fn) in runs.items()},
                                          args.repeats, args.quiet)
    for name, (n, _) in runs.items():
        print(f"  {name:36s} batch {n:3d}: {n / seconds[name]:8.1f} img/s, "
              f"{1000 * seconds[name] / n:7.2f} ms/image "
              f"(first call {compile_s[name]:.1f} s)")
    if args.conv_layers:
        time_conv_layers(args.width, args.batch_size, args.repeats, args.quiet)
    if args.methods is not None:
        time_methods(model, variables, args.methods or list(xv.METHODS), args.method_batch,
                     max(1, args.repeats // 5), args.quiet)
    if args.deletion_images:
        time_deletion(model, variables, args)


def time_methods(model, variables, methods, batch, repeats, quiet):
    """Every method's public call on one batch, default options: ms per image."""
    images = jax.random.uniform(jax.random.key(1), (batch, 32, 32, 3))
    print(f"methods, batch {batch}, default options (median of {repeats} calls):")
    for name in methods:
        explainer = xv.Explainer(model, name)
        first, seconds = time_call(
            lambda: explainer.explain(variables["params"], variables["batch_stats"], images),
            repeats, name, quiet)
        forward, backward = xv.METHODS[name].passes(explainer.options, images.shape[1:])
        print(f"  {name:22s} {1000 * seconds / batch:9.2f} ms/image, {batch / seconds:9.1f} "
              f"img/s, {forward} + {backward} passes/image (first call {first:.1f} s)")


def time_deletion(model, variables, args):
    """Deletion + insertion curves of random maps on --deletion-images images."""
    import numpy as np  # noqa: PLC0415

    import xai_metrics as xm  # noqa: PLC0415

    n, chunk = args.deletion_images, min(args.deletion_chunk, args.deletion_images)
    scorer = model.clone(dtype=jnp.bfloat16) if args.precision == "bf16" else model
    curves = jax.jit(lambda v, x, m, t: xm.deletion_insertion(
        scorer, v, x, m, t, step=args.deletion_step, batch_size=args.deletion_batch)[
            "deletion_auc"])
    key = jax.random.key(2)
    x = jax.random.uniform(key, (chunk, 32, 32, 3))
    maps = jax.random.uniform(jax.random.fold_in(key, 1), (chunk, 32, 32))
    targets = jnp.zeros((chunk,), jnp.int32)
    start = time.perf_counter()
    jax.block_until_ready(curves(variables, x, maps, targets))
    compile_s = time.perf_counter() - start
    calls = -(-n // chunk)
    start = time.perf_counter()
    for _ in tqdm(range(calls), desc="deletion", disable=args.quiet, leave=False):
        out = curves(variables, x, maps, targets)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    points = len(xm.curve_fractions(1024, args.deletion_step))
    passes = calls * chunk * points * 2
    print(f"deletion + insertion, {calls * chunk} images, every {args.deletion_step} px "
          f"({points} points), {args.precision}: {seconds:.1f} s after {compile_s:.1f} s "
          f"compile and first call, {passes / seconds:,.0f} model passes/s")


def time_conv_layers(width, batch_size, repeats, quiet):
    """Each 3x3 conv of the network alone, forward and input gradient: where the time goes."""
    key = jax.random.key(0)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = jax.jit(conv)
    backward = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    channels, totals = 3, {"forward": [0.0, 0.0], "input gradient": [0.0, 0.0]}
    print(f"conv layers alone, batch {batch_size} (ms/image, GFLOP/s):")
    for block, convs in enumerate(CONVS_PER_BLOCK):
        size, out = 32 >> block, width << block
        for _ in range(convs):
            x = jax.random.normal(key, (batch_size, size, size, channels))
            w = jax.random.normal(key, (3, 3, channels, out)) * 0.05
            g = jax.random.normal(key, (batch_size, size, size, out))
            flop = 2 * batch_size * size * size * 9 * channels * out
            line = f"  {size:2d}x{size:<2d} {channels:3d} -> {out:3d}:"
            for name, fn in [("forward", lambda: forward(x, w)),
                             ("input gradient", lambda: backward(x, w, g))]:
                _, seconds = time_call(fn, repeats, name, quiet)
                totals[name][0] += seconds
                totals[name][1] += flop
                line += (f"  {name} {1000 * seconds / batch_size:6.3f}"
                         f" ({flop / seconds / 1e9:5.1f})")
            print(line)
            channels = out
    for name, (seconds, flop) in totals.items():
        print(f"  all convs, {name}: {1000 * seconds / batch_size:.3f} ms/image, "
              f"{flop / batch_size / 1e9:.3f} GFLOP/image, {flop / seconds / 1e9:.1f} GFLOP/s")


def reference_runs(model, variables, images, samples):
    """The straightforward version that the explainer issue measured, for comparison.

    One image's gradient of its own top logit, `jax.vmap`ped over the batch and jitted,
    on the model with flax's `nn.max_pool`, no compiler options.
    """
    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    def with_flax_pool(fn):
        def traced(*args):
            with mock.patch.object(cm, "pool2x2", flax_pool):  # active while jit traces
                return fn(*args)
        return jax.jit(traced)

    def top_logit(x, fn):
        return fn(x)[jnp.argmax(jax.lax.stop_gradient(fn(x)))]

    def saliency(x):
        logit = lambda x: top_logit(x, lambda x: model.apply(variables, x[None])[0])
        return xv.normalize_maps(jnp.max(jnp.abs(jax.grad(logit)(x)), axis=-1))

    def head_from_block3(module, acts):  # the network after block 3, written out
        return module.head(cm.pool2x2(acts), train=False)

    def gradcam(x):
        acts = model.apply(variables, x[None], return_activations=True)[1]["conv3"][0]
        head = lambda a: model.apply(variables, a[None], method=head_from_block3)[0]
        grads = jax.grad(lambda a: top_logit(a, head))(acts)
        cam = jax.nn.relu(jnp.sum(jnp.mean(grads, axis=(0, 1)) * acts, axis=-1))
        return xv.normalize_maps(jax.image.resize(cam, (32, 32), "bilinear"))

    def smooth(x, key):
        noise = jax.random.normal(key, (samples,) + x.shape) * 0.15 * (x.max() - x.min())
        c = jnp.argmax(model.apply(variables, x[None])[0])
        grad = jax.vmap(jax.grad(lambda x: model.apply(variables, x[None])[0, c]))(x + noise)
        return xv.normalize_maps(jnp.max(jnp.abs(grad.mean(0)), axis=-1))

    batch_saliency, batch_gradcam = with_flax_pool(jax.vmap(saliency)), with_flax_pool(
        jax.vmap(gradcam))
    smooth_one = with_flax_pool(smooth)
    key, n = jax.random.key(0), len(images)
    return {
        "reference: GradCAM": (n, lambda: batch_gradcam(images)),
        "reference: saliency": (n, lambda: batch_saliency(images)),
        f"reference: SmoothGrad-{samples}": (1, lambda: smooth_one(images[0], key)),
    }


def build_runs(model, variables, images, samples, options):
    """{name: (images per call, call)} for the public explainers jitted with `options`."""
    with mock.patch.object(xv, "single_image_compiler_options", lambda: options):
        gradcam, saliency = xv.GradCAM(model, "conv3"), xv.SaliencyMap(model)
        forward = xv.jit_by_batch(lambda v, x: model.apply(v, x))
    params, batch_stats = variables["params"], variables["batch_stats"]
    n = len(images)
    return {
        "model forward": (n, lambda: forward(variables, images)),
        "GradCAM": (n, lambda: gradcam.compute_gradcam(params, batch_stats, images)),
        "saliency": (n, lambda: saliency.compute_saliency(params, batch_stats, images)),
        "GradCAM, one image": (1, lambda: gradcam.compute_gradcam(
            params, batch_stats, images[0])),
        "saliency, one image": (1, lambda: saliency.compute_saliency(
            params, batch_stats, images[0])),
        f"SmoothGrad-{samples}, one image": (1, lambda: saliency.compute_smooth_saliency(
            params, batch_stats, images[0], n_samples=samples)),
    }


if __name__ == "__main__":
    main()
