"""The model zoo: the seed's CNN, a CIFAR ResNet-20 and a small Vision Transformer.

Every model takes float NHWC images in [0, 1] and standardises them itself with the
CIFAR-10 training mean and std (`standardize`), returns (N, num_classes) float32 logits,
takes `train` as a keyword, and declares what explainers read: its default layer to
explain (`explanation_layer`) and the image shape it was built for (`input_shape`).

    MODELS["resnet20"].build(width=16)   # a model by its registry name

Module paths (`xai_visualizations.layers(model, variables)` lists them with shapes):
    ResNet20: stem, stage1..stage3 (each block1..block3), head
    ViT:      patch_embed, encoder/layer_0..layer_{depth-1}, encoder/norm, head
"""

import functools
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from cifar10_cnn_model import CIFAR10_MEAN, CIFAR10_STD, CIFAR10CNN, model_config
from xai_core import check_batch
from xai_layers import DepthwiseConv


def standardize(x):
    """(x - mean) / std per channel, with the CIFAR-10 training statistics."""
    return ((x - jnp.reshape(jnp.asarray(CIFAR10_MEAN), (1, 1, 1, 3)))
            / jnp.reshape(jnp.asarray(CIFAR10_STD), (1, 1, 1, 3)))


def _check_fields(model: str, **rules):
    """rules: name -> (value, ok, expected)."""
    for name, (value, ok, expected) in rules.items():
        if not ok:
            raise ValueError(f"{model} {name} must be {expected}, got {value!r}")


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---------------------------------------------------------------- ResNet-20

# He et al. (2016), section 4.2: fan-out He initialisation for the convolutions.
_he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), 3x3 convs.

    The shortcut is option A of He et al.: the identity, or, where the block halves the
    resolution and doubles the channels, the input subsampled by 2 and zero-padded in
    the channels. It has no parameters, so the network's 0.27 M are the paper's.
    """

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    inner: Optional[int] = None  # conv1's channels, where pruning narrowed them

    def setup(self):
        conv = lambda features, stride, name: nn.Conv(  # noqa: E731
            features, (3, 3), (stride, stride), padding=1, use_bias=False,
            kernel_init=_he_normal, dtype=self.dtype, name=name)
        self.conv1 = conv(self.inner or self.features, self.stride, "conv1")
        self.conv2 = conv(self.features, 1, "conv2")
        self.bn1, self.bn2 = (nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                                           name=name) for name in ("bn1", "bn2"))

    def shortcut(self, x):
        """Option A: subsample and zero-pad the channels where the shape changes."""
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride]
        extra = self.features - x.shape[-1]
        if extra:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return x

    def branch(self, x, *, train: bool):
        y = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        return self.bn2(self.conv2(y), use_running_average=not train)

    def __call__(self, x, *, train: bool = False):
        return nn.relu(self.branch(x, train=train) + self.shortcut(x))


class Stage(nn.Module):
    """`blocks` blocks (basic blocks unless `block` says otherwise, called with
    features, stride and dtype); the first one strides by `stride`."""

    features: int
    blocks: int
    stride: int
    dtype: Any = jnp.float32
    block: Callable = None
    inner: Optional[Tuple[int, ...]] = None  # each basic block's conv1 channels

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        block = self.block or BasicBlock
        for i in range(self.blocks):
            narrowed = {} if self.inner is None else {"inner": self.inner[i]}
            x = block(features=self.features, stride=self.stride if i == 0 else 1,
                      dtype=self.dtype, name=f"block{i + 1}", **narrowed)(x, train=train)
        return x


class Stem(nn.Module):
    """The first 3x3 conv, BatchNorm and ReLU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=_he_normal,
                    dtype=self.dtype)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                    dtype=jnp.float32)(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet of He et al. (2016), n = 3 (20 layers, 0.27 M parameters).

    A 3x3 conv with `width` channels, three stages of `blocks_per_stage` basic blocks
    with `width`, 2 `width` and 4 `width` channels (stride 2 at stages 2 and 3), global
    average pooling and a Dense layer.
    """

    num_classes: int = 10
    width: int = 16
    blocks_per_stage: int = 3
    dtype: Any = jnp.float32
    # the first conv's channels in every block, in order, where structured pruning
    # narrowed them (the second conv's stay the stage's, which the shortcut adds to)
    inner: Optional[Tuple[int, ...]] = None
    explanation_layer: ClassVar[str] = "stage3"
    input_shape: ClassVar[Tuple[int, int, int]] = (32, 32, 3)

    def setup(self):
        _check_fields("ResNet20", num_classes=(self.num_classes, _positive_int(self.num_classes),
                                               "an int >= 1"),
                      width=(self.width, _positive_int(self.width), "an int >= 1"),
                      blocks_per_stage=(self.blocks_per_stage,
                                        _positive_int(self.blocks_per_stage), "an int >= 1"))
        n = self.blocks_per_stage
        if self.inner is not None and not (
                isinstance(self.inner, tuple) and len(self.inner) == 3 * n
                and all(_positive_int(c) for c in self.inner)):
            raise ValueError(f"ResNet20 inner must be None or a tuple of {3 * n} ints >= 1 "
                             f"(one per block), got {self.inner!r}")
        self.stem = Stem(self.width, self.dtype)
        self.stages = [Stage(self.width * 2**i, n, 1 if i == 0 else 2, self.dtype,
                             inner=None if self.inner is None else self.inner[i * n:(i + 1) * n],
                             name=f"stage{i + 1}") for i in range(3)]
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, x, *, train: bool = False):
        check_batch(x, "ResNet20 input x", channels=3, multiple=4, floating=True)
        x = self.stem(standardize(x), train=train)
        for stage in self.stages:
            x = stage(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


# ---------------------------------------------------------------- Vision Transformer


def _check_transformer(model, name: str, **more):
    """The ViT's and the CCT's shared field checks, and `more` of the same form."""
    _check_fields(
        name, num_classes=(model.num_classes, _positive_int(model.num_classes), "an int >= 1"),
        width=(model.width, _positive_int(model.width) and model.width % model.heads == 0,
               f"a positive multiple of heads={model.heads}"),
        depth=(model.depth, _positive_int(model.depth), "an int >= 1"),
        heads=(model.heads, _positive_int(model.heads), "an int >= 1"),
        mlp_ratio=(model.mlp_ratio, _positive_int(model.mlp_ratio), "an int >= 1"), **more)


class SelfAttention(nn.Module):
    """Multi-head self-attention that keeps its attention probabilities: they are sown
    as `intermediates/.../attention` (N, heads, T, T), which attention rollout reads."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        qkv = nn.DenseGeneral((3, self.heads, d // self.heads), dtype=self.dtype,
                              name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, H, D/H)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(d // self.heads).astype(
            self.dtype)
        probs = nn.softmax(logits.astype(jnp.float32), axis=-1)
        self.sow("intermediates", "attention", probs)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(self.dtype), v)
        return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + mlp(ln(x)) with GELU."""

    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        d = x.shape[-1]
        x = x + SelfAttention(self.heads, self.dtype, name="attention")(
            nn.LayerNorm(dtype=jnp.float32, name="norm1")(x))
        y = nn.LayerNorm(dtype=jnp.float32, name="norm2")(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y)
        y = nn.Dense(d, dtype=self.dtype, name="mlp2")(nn.gelu(y))
        return x + y


class Encoder(nn.Module):
    depth: int
    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for i in range(self.depth):
            x = EncoderLayer(self.heads, self.mlp_dim, self.dtype, name=f"layer_{i}")(
                x, train=train)
        return nn.LayerNorm(dtype=jnp.float32, name="norm")(x)


class ViT(nn.Module):
    """A small Vision Transformer for 32x32 images (Dosovitskiy et al. 2021).

    Patches of `patch` x `patch` pixels (64 tokens at patch 4) embedded to `width`, a
    class token, learned position embeddings, `depth` pre-norm layers of `heads` heads
    and an MLP of `mlp_ratio` x `width`, a final LayerNorm, and a Dense head on the
    class token. The explanation layer is the last layer's tokens (N, 65, width) as its
    attention reads them; the explainers drop the class token and lay the 64 others on
    their 8 x 8 grid.
    """

    num_classes: int = 10
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 2
    patch: int = 4
    dtype: Any = jnp.float32
    input_shape: ClassVar[Tuple[int, int, int]] = (32, 32, 3)

    @property
    def explanation_layer(self) -> str:
        """The last layer's tokens as its attention reads them (its first LayerNorm's
        output), as pytorch-grad-cam does for ViTs. The last layer's *output* would not
        do: the head reads only the class token there, so the patch tokens' gradients
        are exactly zero."""
        return f"encoder/layer_{self.depth - 1}/norm1"

    def setup(self):
        _check_transformer(self, "ViT",
                           patch=(self.patch, _positive_int(self.patch), "an int >= 1"))
        tokens = (self.input_shape[0] // self.patch) * (self.input_shape[1] // self.patch)
        self.patch_embed = nn.Conv(self.width, (self.patch, self.patch),
                                   (self.patch, self.patch), padding="VALID", dtype=self.dtype)
        self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                    (1, tokens + 1, self.width))
        self.encoder = Encoder(self.depth, self.heads, self.mlp_ratio * self.width, self.dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, x, *, train: bool = False):
        check_batch(x, "ViT input x", channels=3, multiple=self.patch, floating=True)
        expected = self.pos_embed.shape[1] - 1
        x = self.patch_embed(standardize(x))
        n, h, w, d = x.shape
        if h * w != expected:
            raise ValueError(f"ViT input must be {self.input_shape[0]}x"
                             f"{self.input_shape[1]} ({expected} patches of {self.patch}x"
                             f"{self.patch}), got {h * self.patch}x{w * self.patch}")
        x = jnp.concatenate([jnp.broadcast_to(self.cls, (n, 1, d)).astype(x.dtype),
                             x.reshape(n, h * w, d)], axis=1)
        x = self.encoder(x + self.pos_embed.astype(x.dtype), train=train)
        return self.head(x[:, 0]).astype(jnp.float32)


# ---------------------------------------------------------------- Compact Convolutional Transformer


class ConvTokenizer(nn.Module):
    """CCT's tokenizer: per entry of `features`, a 3x3 convolution without bias, ReLU
    and a 3x3 max pooling of stride 2 ('SAME'); 32x32 images give 8x8 tokens after two."""

    features: Tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate(self.features):
            x = nn.Conv(features, (3, 3), padding=1, use_bias=False, kernel_init=_he_normal,
                        dtype=self.dtype, name=f"conv{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding="SAME")
        return x


class SequencePool(nn.Module):
    """Sequence pooling (Hassani et al. 2021): Σ_t w_t x_t with w = softmax_t(x_t · g + b),
    the tokens weighted by an attention the model learns. The weights (N, T) are sown as
    `intermediates/.../pooling`, which attention rollout reads as the classifier's row."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scores = nn.Dense(1, dtype=self.dtype, name="score")(x)[..., 0]
        weights = nn.softmax(scores.astype(jnp.float32), axis=-1)
        self.sow("intermediates", "pooling", weights)
        return jnp.einsum("nt,ntd->nd", weights.astype(x.dtype), x)


class CCT(nn.Module):
    """A Compact Convolutional Transformer for 32x32 images (Hassani et al. 2021, CCT-L/3xK).

    A convolutional tokenizer (`ConvTokenizer`: 3x3 convolutions of `tokenizer`
    channels, then `width`, each with ReLU and a stride-2 max pooling) gives 8x8 = 64
    tokens of `width`; learned position embeddings; `depth` pre-norm encoder layers
    (`EncoderLayer`: `heads` heads of `SelfAttention`, which sows its attention, and an
    MLP of `mlp_ratio` x `width`); a final LayerNorm; sequence pooling (`SequencePool`)
    instead of a class token; a Dense head. Module paths: tokenizer (conv1, conv2),
    encoder/layer_0..layer_{depth-1}, encoder/norm, pool, head.

    Its explanation layer is the final LayerNorm's tokens (N, 64, width), laid on their
    8x8 grid in the tokenizer's row-major order: every token reaches the head through
    the pooling, so, unlike the ViT's class-token readout, the last tokens have
    gradients.
    """

    num_classes: int = 10
    width: int = 128
    depth: int = 2
    heads: int = 2
    mlp_ratio: int = 1
    tokenizer: Tuple[int, ...] = (64,)
    dtype: Any = jnp.float32
    explanation_layer: ClassVar[str] = "encoder/norm"
    input_shape: ClassVar[Tuple[int, int, int]] = (32, 32, 3)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        check_batch(x, "CCT input x", channels=3, multiple=4, floating=True)
        _check_transformer(self, "CCT")
        x = ConvTokenizer(tuple(self.tokenizer) + (self.width,), self.dtype,
                          name="tokenizer")(standardize(x))
        n, h, w, d = x.shape
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w, d))
        x = x.reshape(n, h * w, d) + pos_embed.astype(x.dtype)
        x = Encoder(self.depth, self.heads, self.mlp_ratio * self.width, self.dtype,
                    name="encoder")(x, train=train)
        x = SequencePool(self.dtype, name="pool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(
            jnp.float32)


# ---------------------------------------------------------------- EfficientNet

# Tan & Le (2019): variance-scaling (fan-out) normal initialisation for the convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _mbconv_norm(train, name):
    """The EfficientNet's BatchNorm (momentum 0.9, ε 1e-3, float32) named `name`."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                        dtype=jnp.float32, name=name)


class SqueezeExcite(nn.Module):
    """x · sigmoid(W2 silu(W1 mean_hw(x) + b1) + b2): a per-channel gate from the
    image's own global average (Hu et al. 2018), `reduced` hidden units."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.silu(nn.Dense(self.reduced, dtype=self.dtype, name="reduce")(s))
        gate = nn.sigmoid(nn.Dense(x.shape[-1], dtype=self.dtype, name="expand")(s))
        return x * gate


class MBConv(nn.Module):
    """The inverted residual block of MobileNetV2 with squeeze-and-excitation: a 1x1
    expansion to `expand` x the input channels (skipped at 1), a depthwise kxk
    convolution (`xai_layers.DepthwiseConv`) with `stride`, squeeze-and-excitation
    reducing to a quarter of the block's input channels, and a linear 1x1 projection;
    BatchNorm after each convolution, SiLU after the first two; the input is added
    where the shapes allow (stride 1, same channels)."""

    features: int
    expand: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        norm = functools.partial(_mbconv_norm, train)
        inputs, channels = x, x.shape[-1]
        if self.expand != 1:
            x = nn.Conv(channels * self.expand, (1, 1), use_bias=False, kernel_init=_conv_init,
                        dtype=self.dtype, name="expand")(x)
            x = nn.silu(norm("expand_bn")(x))
        x = DepthwiseConv(self.kernel, self.stride, self.dtype, name="depthwise")(x)
        x = nn.silu(norm("depthwise_bn")(x))
        x = SqueezeExcite(max(1, channels // 4), self.dtype, name="squeeze_excite")(x)
        x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="project")(x)
        x = norm("project_bn")(x)
        if self.stride == 1 and channels == self.features:
            x = x + inputs
        return x


# (expansion, kernel, stride, output channels, blocks) per stage
# B0's stages (Tan & Le 2019, table 1) cut to what this 2-core CPU trains in the budget
# (docs/architectures.md): B0's first six stages at 1, 2, 2, 2, 2 and 1 blocks, with
# stride 1 at stage 4 so that 8x8 maps carry the middle of the network, as CIFAR
# versions of MobileNetV2 keep their resolution. At `width` 16 (x0.5) the channels are
# 8, 16, 24, 40, 56 and 80 and the network has 0.29 M parameters.
EFFICIENTNET_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
                       (6, 3, 1, 80, 2), (6, 5, 2, 112, 2), (6, 5, 1, 160, 1))


class EfficientNet(nn.Module):
    """An EfficientNet-B0-style network for 32x32 images (Tan & Le 2019).

    A stride-1 3x3 stem with `width` channels, MBConv stages given by `stages`
    ((expansion, kernel, stride, channels, blocks) each, channels scaled by
    `width` / 32 and rounded to multiples of 8 as B0's width multiplier is), a 1x1
    convolution to `head_width` channels, global average pooling, dropout and a Dense
    layer. SiLU and BatchNorm throughout. Module paths: stem, stage1..stage6 (each
    block1.., with expand, depthwise, squeeze_excite, project), head_conv, head.
    """

    num_classes: int = 10
    width: int = 16
    stages: Tuple[Tuple[int, int, int, int, int], ...] = EFFICIENTNET_STAGES
    head_width: int = 640
    dropout: float = 0.2
    dtype: Any = jnp.float32
    input_shape: ClassVar[Tuple[int, int, int]] = (32, 32, 3)

    @property
    def explanation_layer(self) -> str:
        """The last stage's output, as Grad-CAM's users take the last MBConv block."""
        return f"stage{len(self.stages)}"

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        check_batch(x, "EfficientNet input x", channels=3, multiple=1, floating=True)
        _check_fields("EfficientNet", num_classes=(
            self.num_classes, _positive_int(self.num_classes), "an int >= 1"),
            width=(self.width, _positive_int(self.width), "an int >= 1"))
        norm = functools.partial(_mbconv_norm, train)
        scale = lambda c: max(8, int(c * self.width / 32 + 4) // 8 * 8)  # noqa: E731
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="stem")(standardize(x))
        x = nn.silu(norm("stem_bn")(x))
        for s, (expand, kernel, stride, channels, blocks) in enumerate(self.stages):
            x = Stage(scale(channels), blocks, stride, self.dtype, name=f"stage{s + 1}",
                      block=functools.partial(MBConv, expand=expand, kernel=kernel))(
                          x, train=train)
        x = nn.Conv(self.head_width, (1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="head_conv")(x)
        x = nn.silu(norm("head_bn")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(
            jnp.float32)


# ---------------------------------------------------------------- registry


def _fields(*names, optional=()):
    """The constructor arguments `names`, and those of `optional` that are not None."""
    return lambda model: {**{name: getattr(model, name) for name in names},
                          **{name: getattr(model, name) for name in optional
                             if getattr(model, name) is not None}}


class Architecture(NamedTuple):
    """A registry entry: the class, its constructor arguments as a checkpoint records
    them (`config(model)`), and what `--width` means for it."""

    cls: type
    config: Callable[[Any], dict]
    width_help: str
    paper: str

    def build(self, width: Optional[int] = None, **kwargs):
        """The model, with `width` (None: the architecture's default) and any other
        constructor arguments."""
        if width is not None:
            kwargs["width"] = width
        return self.cls(**kwargs)


MODELS = {
    "cnn": Architecture(CIFAR10CNN, model_config, "channels of block 1 (default 64)",
                        "the seed's VGG-style CNN"),
    "resnet20": Architecture(ResNet20, _fields("num_classes", "width", "blocks_per_stage",
                                               optional=("inner",)),
                             "channels of stage 1 (default 16)",
                             "He et al. 2016, Deep Residual Learning, sec. 4.2"),
    "efficientnet": Architecture(
        EfficientNet, _fields("num_classes", "width", "stages", "head_width", "dropout"),
        "stem channels; the blocks' channels scale by width / 32 (default 16)",
        "Tan & Le 2019, EfficientNet; Sandler et al. 2018, MobileNetV2"),
    "cct": Architecture(
        CCT, _fields("num_classes", "width", "depth", "heads", "mlp_ratio", "tokenizer"),
        "the token width (default 128)",
        "Hassani et al. 2021, Escaping the Big Data Paradigm with Compact Transformers"),
    "vit": Architecture(ViT, _fields("num_classes", "width", "depth", "heads", "mlp_ratio",
                                     "patch"),
                        "the token width (default 128)",
                        "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words"),
}


def registry_name(model) -> str:
    """The registry name of `model`'s architecture ('cnn', 'resnet20', 'vit')."""
    for name, entry in MODELS.items():
        if type(model) is entry.cls:
            return name
    raise TypeError(f"model must be one of the architectures {tuple(MODELS)}, got "
                    f"{type(model).__name__}")
