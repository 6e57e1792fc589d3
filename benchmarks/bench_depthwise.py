"""The depthwise convolution on XLA:CPU: `lax.conv_general_dilated` with
`feature_group_count` = channels against `xai_layers.depthwise_conv` (k² shifted
multiply-adds), forward + backward, same inputs; prints ms per call and the ratio.

    python benchmarks/bench_depthwise.py
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xai_layers import depthwise_conv, same_padding  # noqa: E402


def grouped(x, kernel, stride):
    kh, kw, c = kernel.shape
    pads = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def timed(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch}")
    for size, channels, k, stride in ((32, 32, 3, 1), (16, 96, 3, 1), (16, 144, 5, 2),
                                      (8, 240, 5, 1), (8, 480, 3, 1)):
        keys = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(keys[0], (args.batch, size, size, channels))
        kernel = jax.random.normal(keys[1], (k, k, channels))
        row = []
        for fn in (grouped, depthwise_conv):
            loss = jax.jit(jax.value_and_grad(
                lambda x, w, fn=fn: jnp.sum(fn(x, w, stride) ** 2), argnums=(0, 1)))
            row.append(timed(loss, x, kernel))
        a = jax.jit(grouped, static_argnums=2)(x, kernel, stride)
        b = depthwise_conv(x, kernel, stride=stride)
        print(f"{size}x{size}x{channels} k{k} s{stride}: grouped conv {row[0]:7.1f} ms, "
              f"shifted {row[1]:6.1f} ms, {row[0] / row[1]:4.1f}x faster; max |diff| "
              f"{float(np.max(np.abs(a - b))):.1e}")


if __name__ == "__main__":
    main()
