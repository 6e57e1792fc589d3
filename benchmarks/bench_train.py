"""Training throughput of a model of the zoo on the current JAX device.

    python benchmarks/bench_train.py                          # the CNN, batch 128, fp32
    python benchmarks/bench_train.py --batch-size 128 256 512 --precision fp32 bf16
    python benchmarks/bench_train.py --model efficientnet --width 24   # any architecture

For each batch size and precision: the device, the compile time, images/s after
compile and the seconds per epoch of 45,000 images (the 90 % training split). The steps
run exactly as in training: `train_cifar10.train_steps` on batches gathered on the
device from a uint8 data set that lives there, `--steps-per-call` steps per call (default
as in training: 1 on CPU, a whole epoch in one `lax.scan` elsewhere). Timings block on
the result.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import xai_cli as cli  # noqa: E402
import train_cifar10 as tc  # noqa: E402
from architectures import MODELS  # noqa: E402

EPOCH_IMAGES = 45_000


def bench(batch_size, precision, args, images, labels, replicated, split):
    """Returns (compile s, images/s, steps per call) for one configuration."""
    config = tc.TrainConfig(model=args.model, batch_size=batch_size, width=args.width,
                            seed=args.seed, recipe=args.recipe, precision=precision)
    settings = tc.recipe(config)
    options = dict(augmented=settings["augment"], label_smoothing=settings["label_smoothing"],
                   sharding=split)
    key = jax.random.key(args.seed)
    model = tc.build_model(config)
    state = jax.device_put(tc.create_train_state(model, config, key, total_steps=10_000),
                           replicated)
    order = jax.device_put(tc.epoch_indices(key, EPOCH_IMAGES, batch_size), replicated)
    steps_per_call = (tc.default_steps_per_call() if args.steps_per_call is None
                      else args.steps_per_call)
    block = min(steps_per_call or len(order), len(order))
    blocks = [order[i:i + block] for i in range(0, len(order) - block + 1, block)]

    start = time.perf_counter()
    step_fn = tc.train_steps.lower(state, images, labels, blocks[0], **options).compile()
    compile_s = time.perf_counter() - start
    state, metrics = step_fn(state, images, labels, blocks[0])  # warm-up call
    jax.block_until_ready((state, metrics))

    calls = max(1, -(-(args.steps or (3 * len(order) if block > 1 else 20)) // block))
    start = time.perf_counter()
    for i in tqdm(range(calls), desc=f"batch {batch_size} {precision}", disable=args.quiet):
        state, metrics = step_fn(state, images, labels, blocks[i % len(blocks)])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    return compile_s, calls * block * batch_size / elapsed, block


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=cli.int_at_least(1), nargs="+", default=[128])
    parser.add_argument("--precision", nargs="+", default=["fp32"],
                        choices=tuple(tc.PRECISIONS))
    parser.add_argument("--steps", type=cli.int_at_least(1), default=None,
                        help="timed steps after compile; default 20 steps one at a time, "
                             "else 3 epochs")
    parser.add_argument("--steps-per-call", type=cli.int_at_least(0), default=None,
                        help="0: a whole epoch per call; default: as in training")
    parser.add_argument("--model", default="cnn", choices=tuple(MODELS),
                        help="the architecture, by its registry name")
    parser.add_argument("--width", type=cli.int_at_least(1), default=None,
                        help="the model's width; default: the architecture's")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=0)
    parser.add_argument("--recipe", default="default", choices=tuple(tc.RECIPES),
                        help="'default' augments on the device and smooths labels")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for batch_size in args.batch_size:
        if batch_size % jax.device_count():
            parser.error(f"--batch-size must be a multiple of the {jax.device_count()} "
                         f"devices, got {batch_size}")

    replicated, split = tc.data_parallel_shardings()
    key = jax.random.key(args.seed)
    images = jax.device_put(jax.random.randint(key, (EPOCH_IMAGES, 32, 32, 3), 0, 256,
                                               jnp.int32).astype(jnp.uint8), replicated)
    labels = jax.device_put(jax.random.randint(key, (EPOCH_IMAGES,), 0, 10), replicated)
    print(f"device: {cli.describe_device()}, {args.model}, recipe {args.recipe}, width "
          f"{args.width or 'default'}")
    print("| batch | precision | steps per call | compile s | img/s | s per epoch |")
    print("|---|---|---|---|---|---|")
    for precision in args.precision:
        for batch_size in args.batch_size:
            compile_s, images_per_s, block = bench(batch_size, precision, args, images,
                                                   labels, replicated, split)
            print(f"| {batch_size} | {precision} | {block} | {compile_s:.1f} | "
                  f"{images_per_s:,.0f} | {EPOCH_IMAGES / images_per_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
