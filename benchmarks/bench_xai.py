"""Explainer throughput of the CIFAR-10 CNN on the current JAX device.

    python benchmarks/bench_xai.py [--batch-size 64] [--repeats 20] [--width 64]

Prints images/s for GradCAM (conv3) and saliency on batches of --batch-size, and ms per
image for SmoothGrad with 50 samples, explained one image at a time: the public
`GradCAM` / `SaliencyMap` calls, input checks and the copy back to numpy included.
`--plain-jit` also times the same jitted functions without the XLA:CPU options that
`xai_visualizations` sets, to show what they buy. Every timing comes after a warm-up call
that compiles, and is the median of --repeats calls.
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import xai_visualizations as xv  # noqa: E402
from cifar10_cnn_model import CIFAR10CNN  # noqa: E402
from train_cifar10 import describe_device  # noqa: E402


def time_call(fn, repeats, desc, quiet):
    """(seconds of the first, compiling call; median seconds of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    times = []
    for _ in tqdm(range(repeats), desc=desc, disable=quiet, leave=False):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per method")
    parser.add_argument("--samples", type=int, default=50, help="SmoothGrad samples")
    parser.add_argument("--width", type=int, default=64, help="64 is the reference network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-jit", action="store_true",
                        help="also time the functions jitted without the CPU options")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    model = CIFAR10CNN(width=args.width)
    key = jax.random.key(args.seed)
    variables = jax.jit(model.init)(key, jnp.zeros((1, 32, 32, 3)))
    params, batch_stats = variables["params"], variables["batch_stats"]
    images = jax.random.uniform(key, (args.batch_size, 32, 32, 3))
    gradcam, saliency = xv.GradCAM(model, "conv3"), xv.SaliencyMap(model)

    runs = {
        "GradCAM": (args.batch_size, lambda: gradcam.compute_gradcam(
            params, batch_stats, images)),
        "saliency": (args.batch_size, lambda: saliency.compute_saliency(
            params, batch_stats, images)),
        f"SmoothGrad-{args.samples}": (1, lambda: saliency.compute_smooth_saliency(
            params, batch_stats, images[0], n_samples=args.samples)),
    }
    if args.plain_jit:  # the pure functions, plain jax.jit, no checks: the reference
        targets = jnp.full((args.batch_size,), xv.PREDICTED, jnp.int32)
        plain_gc = jax.jit(functools.partial(xv._gradcam_outputs, model, "conv3"),
                           static_argnames="normalize")
        plain_sal = jax.jit(functools.partial(xv._saliency_outputs, model),
                            static_argnames="normalize")
        plain_sg = jax.jit(functools.partial(xv._smooth_saliency_outputs, model),
                           static_argnames=("normalize", "n_samples", "batch_size"))
        runs.update({
            "GradCAM, plain jit": (args.batch_size, lambda: plain_gc(
                variables, images, targets, normalize=True)),
            "saliency, plain jit": (args.batch_size, lambda: plain_sal(
                variables, images, targets, normalize=True)),
            f"SmoothGrad-{args.samples}, plain jit": (1, lambda: plain_sg(
                variables, images[:1], targets[:1], key, normalize=True,
                n_samples=args.samples, noise_level=0.15, batch_size=256)),
        })

    print(f"device: {describe_device()}; width {args.width}; "
          f"XLA:CPU options: {xv._compiler_options() or 'none'}")
    for name, (n, fn) in runs.items():
        compile_s, seconds = time_call(fn, args.repeats, name, args.quiet)
        print(f"{name:32s} batch {n:3d}: {n / seconds:8.1f} img/s, "
              f"{1000 * seconds / n:7.2f} ms/image (first call {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
