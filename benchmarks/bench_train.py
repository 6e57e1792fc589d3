"""Train-step throughput of the CIFAR-10 CNN on the current JAX device.

    python benchmarks/bench_train.py [--batch-size 128] [--steps 20] [--width 64]

Prints the device, compile time, images/s after compile and the implied seconds per
epoch of 45,000 images (the 90 % training split). Timings block on the result.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import train_cifar10 as tc  # noqa: E402
from cifar10_cnn_model import CIFAR10CNN  # noqa: E402

EPOCH_IMAGES = 45_000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after compile")
    parser.add_argument("--width", type=int, default=64, help="64 is the reference network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="default", choices=tuple(tc.RECIPES),
                        help="'default' augments on the device and smooths labels")
    parser.add_argument("--precision", default="fp32", choices=tuple(tc.PRECISIONS))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    config = tc.TrainConfig(batch_size=args.batch_size, width=args.width, seed=args.seed,
                            recipe=args.recipe, precision=args.precision)
    settings = tc.recipe(config)
    options = dict(augmented=settings["augment"], label_smoothing=settings["label_smoothing"])
    key = jax.random.key(args.seed)
    model = CIFAR10CNN(width=args.width, dtype=tc.PRECISIONS[args.precision])
    state = tc.create_train_state(model, config, key, total_steps=10_000)
    batch = {"image": jax.random.randint(key, (args.batch_size, 32, 32, 3), 0, 256,
                                         jnp.int32).astype(jnp.uint8),
             "label": jax.random.randint(key, (args.batch_size,), 0, 10)}

    start = time.perf_counter()
    state, metrics = tc.train_step(state, batch, **options)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="steps", disable=args.quiet):
        state, metrics = tc.train_step(state, batch, **options)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start

    images_per_s = args.steps * args.batch_size / elapsed
    print(f"device: {tc.describe_device()}")
    print(f"recipe {args.recipe}, {args.precision}, batch {args.batch_size}, width "
          f"{args.width}: compile+first step "
          f"{compile_s:.1f} s, {images_per_s:.1f} img/s over {args.steps} steps, "
          f"{EPOCH_IMAGES / images_per_s:.1f} s per epoch of {EPOCH_IMAGES:,} images")


if __name__ == "__main__":
    main()
