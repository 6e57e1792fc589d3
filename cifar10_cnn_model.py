"""The CIFAR-10 CNN: three VGG-style conv blocks, then a GAP -> Dense -> Dense head.

Shapes: images are float NHWC in [0, 1], (B, 32, 32, 3); logits are (B, num_classes).
The per-channel standardisation happens inside the model, so callers never normalise.

Named activations (block outputs after BN+ReLU, before pooling), returned with
`return_activations=True`:
    conv1 (B, 32, 32, w), conv2 (B, 16, 16, 2w), conv3 (B, 8, 8, 4w), with w = `width`.
They are the outputs of the submodules `block1`, `block2` and `block3`: explainers reach
any layer by its module path (`xai_models`), and the seed's names are aliases of these
paths (`layer_aliases`), so no checkpoint had to be renamed.
"""

import itertools
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from xai_core import check_batch

# Exact per-channel mean and std of the 50,000 CIFAR-10 training images, on [0, 1].
CIFAR10_MEAN = (0.4913996, 0.4821584, 0.4465309)
CIFAR10_STD = (0.2470322, 0.2434851, 0.2615878)

LAYER_NAMES = ("conv1", "conv2", "conv3")
CONVS_PER_BLOCK = (2, 2, 3)


class ConvBlock(nn.Module):
    """`num_convs` x [Conv 3x3 SAME -> BatchNorm -> ReLU]; pooling is left to the caller."""

    features: Union[int, Tuple[int, ...]]  # one for every conv, or each conv's own
    num_convs: int
    dtype: Any = jnp.float32
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x, *, train: bool):
        features = ((self.features,) * self.num_convs if isinstance(self.features, int)
                    else self.features)
        for n in features:
            # No conv bias: the BatchNorm that follows subtracts it again.
            x = nn.Conv(n, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=jnp.float32)(x)
            x = self.activation(x)
        return x


class Head(nn.Module):
    """Global average pooling -> Dense -> ReLU -> Dropout -> Dense."""

    hidden: int
    num_classes: int
    dropout_rate: float
    dtype: Any = jnp.float32
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.mean(x, axis=(1, 2))
        x = self.activation(nn.Dense(self.hidden, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def pool2x2(x):
    """2x2 max pooling, stride 2, as a max over a reshape.

    Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, but its gradient is a plain
    mask instead of XLA's select-and-scatter: measured on the 2-core CPU, the forward pass
    is ~20 % faster, input gradients ~19 % and a training step ~9 %. On a tie the
    gradient is shared among the tied inputs, which is an equally valid subgradient.
    """
    n, h, w, c = x.shape
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _is_int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_input(x):
    """Refuses what the network would silently turn into garbage: anything but a float
    batch (N, H, W, 3) with H and W multiples of 8 (three 2x2 poolings). Only the static
    shape and dtype are read, so this also works while tracing under jit."""
    check_batch(x, "CIFAR10CNN input x", channels=3, multiple=8,
                why=" (three 2x2 poolings)", floating=True)


class CIFAR10CNN(nn.Module):
    """VGG-style CIFAR-10 classifier.

    Attributes:
        num_classes: number of output logits.
        width: channels of block 1; blocks 2 and 3 use 2x and 4x, the hidden Dense 8x.
            The default 64 is the reference network; small widths make fast test models.
        dropout_rate: dropout before the last Dense layer (train mode only).
        dtype: what the convs and Dense layers compute in, e.g. `jnp.bfloat16` for
            mixed-precision training. Parameters, BatchNorm and the logits stay float32.
        activation: the nonlinearity after every BatchNorm and the hidden Dense layer;
            `model.clone(activation=...)` swaps it and keeps the parameters.
    """

    num_classes: int = 10
    width: int = 64
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    activation: Callable = nn.relu
    # each conv's output channels, in order (7), where they differ from `width`'s (a
    # network narrowed by structured pruning); None: width, width, 2 width, ... 4 width
    channels: Optional[Tuple[int, ...]] = None
    # What explainers read, when a model declares it: the default layer to explain,
    # other names for layers, and the image shape the model was built for.
    explanation_layer: ClassVar[Optional[str]] = "block3"
    layer_aliases: ClassVar[Dict[str, str]] = {name: f"block{i + 1}"
                                               for i, name in enumerate(LAYER_NAMES)}
    input_shape: ClassVar[Tuple[int, int, int]] = (32, 32, 3)

    def setup(self):
        for name, value, ok, expected in (
                ("num_classes", self.num_classes, _is_int(self.num_classes, 1), "an int >= 1"),
                ("width", self.width, _is_int(self.width, 1), "an int >= 1"),
                ("dropout_rate", self.dropout_rate,
                 isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1,
                 "a number in [0, 1)")):
            if not ok:
                raise ValueError(f"CIFAR10CNN {name} must be {expected}, got {value!r}")
        if self.channels is not None and not (
                isinstance(self.channels, tuple) and len(self.channels) == sum(CONVS_PER_BLOCK)
                and all(_is_int(c, 1) for c in self.channels)):
            raise ValueError(f"CIFAR10CNN channels must be None or a tuple of "
                             f"{sum(CONVS_PER_BLOCK)} ints >= 1, got {self.channels!r}")
        ends = (0, *itertools.accumulate(CONVS_PER_BLOCK))  # each block's slice of channels
        self.blocks = [ConvBlock(self.width * 2**i if self.channels is None
                                 else self.channels[ends[i]:ends[i + 1]], n, self.dtype,
                                 self.activation, name=f"block{i + 1}")
                       for i, n in enumerate(CONVS_PER_BLOCK)]
        self.head = Head(8 * self.width, self.num_classes, self.dropout_rate, self.dtype,
                         self.activation)

    def __call__(self, x, *, train: bool = False, return_activations: bool = False):
        check_input(x)
        x = (x - jnp.reshape(jnp.asarray(CIFAR10_MEAN), (1, 1, 1, 3))) / jnp.reshape(
            jnp.asarray(CIFAR10_STD), (1, 1, 1, 3))
        acts = {}
        for name, block in zip(LAYER_NAMES, self.blocks):
            if acts:
                x = pool2x2(x)
            x = acts[name] = block(x, train=train)
        logits = self.head(pool2x2(x), train=train)
        return (logits, acts) if return_activations else logits


def model_config(model: CIFAR10CNN) -> Dict[str, object]:
    """The constructor arguments that rebuild `model`, as plain JSON-able values.

    `dtype` and `activation` are left out on purpose: a checkpoint always rebuilds a
    float32 ReLU model, which is what explaining wants, however it was trained.
    """
    config = {"num_classes": model.num_classes, "width": model.width,
              "dropout_rate": model.dropout_rate}
    if model.channels is not None:
        config["channels"] = tuple(model.channels)
    return config
