"""Layers written for XLA:CPU that the explainers still see as what they are.

`depthwise_conv(x, kernel, stride)` is a depthwise convolution (one kxk filter per
channel, 'SAME' padding) computed as k² shifted multiply-adds. XLA:CPU runs the same
operation as `lax.conv_general_dilated` with `feature_group_count` = channels at about
0.7 GFLOP/s forward + backward; the shifted form is several times faster with equal
outputs and gradients (`benchmarks/bench_depthwise.py`, tests/test_layers.py).

It is a `jax.jit` function named `DEPTHWISE`, so a model's program holds it as one call
of (image-dependent x, constant kernel): the LRP interpreter treats that call as a
linear layer (`xai_lrp`), with its BatchNorm merged in and its composite's rule, rather
than as k² products it would have no rule for.

Shapes: x (N, H, W, C); kernel (k_h, k_w, C); output (N, ceil(H/s), ceil(W/s), C).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

DEPTHWISE = "depthwise_conv"


def same_padding(size: int, window: int, stride: int):
    """(before, after) of TensorFlow's and Flax's 'SAME' padding along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


@functools.partial(jax.jit, static_argnames=("stride",))
def depthwise_conv(x, kernel, stride: int = 1):
    """Σ_ij x_padded[:, s·h + i, s·w + j, c] · kernel[i, j, c], 'SAME' padding."""
    kh, kw, _ = kernel.shape
    n, h, w, c = x.shape
    pads = [same_padding(h, kh, stride), same_padding(w, kw, stride)]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = -(-h // stride), -(-w // stride)
    out = None
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(
                xp, (0, i, j, 0),
                (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                (1, stride, stride, 1))
            term = window * kernel[i, j].astype(x.dtype)[None, None, None, :]
            out = term if out is None else out + term
    return out



class DepthwiseConv(nn.Module):
    """A depthwise kxk convolution without bias ('SAME' padding), as `depthwise_conv`.

    The kernel is (k, k, channels), initialised He-normal over its fan-in k² (the
    fan-out of a depthwise filter is k² as well).
    """

    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.normal((2.0 / (k * k)) ** 0.5),
                            (k, k, x.shape[-1]))
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                              stride=self.stride)
