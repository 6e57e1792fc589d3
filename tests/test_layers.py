"""The EfficientNet's and the CCT's parts against independent routes: the fast depthwise
convolution against XLA's grouped convolution (values and gradients, and LRP through
either), squeeze-and-excitation against a gate computed by hand, and sequence pooling's
invariance to the order of the tokens."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_lrp
import xai_visualizations as xv
from architectures import CCT, EfficientNet, MBConv, SqueezeExcite
from xai_layers import DepthwiseConv, depthwise_conv, same_padding


def grouped(x, kernel, stride):
    """The depthwise convolution as XLA's grouped convolution, 'SAME' padding."""
    kh, kw, c = kernel.shape
    pads = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


@pytest.mark.parametrize("size, k, stride", [(8, 3, 1), (8, 5, 2), (7, 3, 2), (9, 5, 1)])
def test_the_fast_depthwise_step_equals_the_grouped_convolution(size, k, stride):
    keys = jax.random.split(jax.random.key(size * k + stride), 3)
    x = jax.random.normal(keys[0], (2, size, size, 6))
    kernel = jax.random.normal(keys[1], (k, k, 6))
    ours, theirs = depthwise_conv(x, kernel, stride=stride), grouped(x, kernel, stride)
    assert ours.shape == theirs.shape == (2, -(-size // stride), -(-size // stride), 6)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # gradients with respect to the input and the kernel, of a random projection
    probe = jax.random.normal(keys[2], ours.shape)
    loss = lambda fn: jax.grad(lambda x, w: jnp.sum(fn(x, w, stride) * probe),  # noqa: E731
                               argnums=(0, 1))(x, kernel)
    for a, b in zip(loss(lambda x, w, s: depthwise_conv(x, w, stride=s)), loss(grouped)):
        np.testing.assert_allclose(a, b, atol=1e-4)


class Depthwise(nn.Module):
    """conv -> depthwise (fast, or XLA's grouped convolution) -> BatchNorm -> ReLU -> GAP
    -> Dense, bias-free convolutions; the grouped kernel is (k, k, 1, C)."""

    fast: bool
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv")(x))
        if self.fast:
            x = DepthwiseConv(3, 2, name="depthwise")(x)
        else:
            x = nn.Conv(4, (3, 3), (2, 2), padding="SAME", feature_group_count=4,
                        use_bias=False, name="depthwise")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, use_bias=self.bias,
                                 use_scale=self.bias, name="bn")(x))
        return nn.Dense(3, use_bias=self.bias, name="head")(jnp.mean(x, axis=(1, 2)))


def _twins(bias=True):
    """The two forms with the same weights and BatchNorm statistics: (images, (fast
    model, variables), (grouped model, variables))."""
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    fast, slow = Depthwise(True, bias), Depthwise(False, bias)
    variables = fast.init(jax.random.key(1), x)
    # without a bias, the running mean (BatchNorm's bias) is zero too
    stats = {"mean": jnp.linspace(-0.2, 0.3, 4) * bias, "var": jnp.linspace(0.5, 2.0, 4)}
    variables = {"params": variables["params"], "batch_stats": {"bn": stats}}
    params = dict(variables["params"])
    params["depthwise"] = {"kernel": params["depthwise"]["kernel"][:, :, None, :]}
    return x, (fast, variables), (slow, {"params": params, "batch_stats": {"bn": stats}})


def test_lrp_sees_the_fast_depthwise_step_as_the_convolution_it_computes():
    """Every composite gives the fast form the maps of XLA's grouped convolution with the
    same weights, BatchNorm merged into it: the interpreter takes the call as one linear
    layer, not as nine products and sums."""
    x, (fast, v_fast), (slow, v_slow) = _twins()
    np.testing.assert_allclose(fast.apply(v_fast, x), slow.apply(v_slow, x), atol=1e-5)
    maps = jax.jit(lambda x: {  # one program for every composite and both forms
        composite: [xv.explain("lrp", model, variables, x, composite=composite).maps
                    for model, variables in ((fast, v_fast), (slow, v_slow))]
        for composite in xai_lrp.COMPOSITES})(x)
    for composite, (a, b) in maps.items():
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=composite)


def test_the_fast_depthwise_step_is_one_conservative_lrp_layer():
    """LRP-0 on the bias-free form: the call is one layer, `depthwise`, between the
    convolution and the head, and it passes on all the relevance it receives."""
    x, (fast, variables), _ = _twins(bias=False)
    zero = xai_lrp.composite({"conv": xai_lrp.Epsilon(1e-9), "dense": xai_lrp.Epsilon(1e-9)})
    start = lambda logits: jax.nn.one_hot(jnp.argmax(logits, -1), 3) * logits  # noqa: E731
    found = xai_lrp.layer_relevances(lambda images: fast.apply(variables, images), x, start,
                                     zero)
    assert [(path, kind) for path, kind, *_ in found] == [
        ("conv", "conv"), ("depthwise", "conv"), ("head", "dense")]
    _, _, _, r_in, r_out = found[1]
    np.testing.assert_allclose(jnp.sum(r_in, axis=(1, 2, 3)), jnp.sum(r_out, axis=(1, 2, 3)),
                               rtol=1e-4)


def test_lrp_zero_through_the_fast_depthwise_step_is_gradient_times_input():
    """On a bias-free ReLU network, LRP-0 equals Gradient × Input (here ε = 1e-9)."""
    x, (fast, variables), _ = _twins(bias=False)
    zero = xai_lrp.composite({"conv": xai_lrp.Epsilon(1e-9), "dense": xai_lrp.Epsilon(1e-9)})
    lrp = xv.explain("lrp", fast, variables, x, jnp.array([1, 2]), composite=zero).maps
    gxi = xv.explain("grad_x_input", fast, variables, x, jnp.array([1, 2])).maps
    np.testing.assert_allclose(lrp, gxi, rtol=1e-4, atol=1e-6)


def test_squeeze_and_excitation_gates_each_channel_by_hand():
    """gate_c = sigmoid(W2 · silu(W1 · mean_hw(x) + b1) + b2)_c, in numpy."""
    x = jax.random.normal(jax.random.key(2), (1, 2, 2, 3))
    se = SqueezeExcite(reduced=2)
    variables = se.init(jax.random.key(3), x)
    p = jax.tree.map(np.asarray, variables["params"])
    mean = np.asarray(x).mean(axis=(1, 2))                        # (1, 3)
    hidden = mean @ p["reduce"]["kernel"] + p["reduce"]["bias"]   # (1, 2)
    hidden = hidden / (1 + np.exp(-hidden))                       # SiLU
    gate = 1 / (1 + np.exp(-(hidden @ p["expand"]["kernel"] + p["expand"]["bias"])))
    np.testing.assert_allclose(se.apply(variables, x), np.asarray(x) * gate[:, None, None],
                               rtol=1e-5, atol=1e-6)


def test_an_mbconv_block_adds_its_input_only_where_the_shapes_match():
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 8))
    same, strided = MBConv(8, 6, 3, 1), MBConv(16, 6, 5, 2)
    variables = same.init(jax.random.key(5), x)
    branch = jax.tree.map(lambda a: a, variables)
    branch["params"]["project_bn"] = {"scale": jnp.zeros(8), "bias": jnp.zeros(8)}
    np.testing.assert_allclose(same.apply(branch, x), x, atol=1e-6)  # branch 0: the input
    out = strided.apply(strided.init(jax.random.key(6), x), x)
    assert out.shape == (2, 4, 4, 16)


def test_sequence_pooling_ignores_the_tokens_order_without_position_embeddings():
    """Attention and the MLPs are permutation-equivariant and the pooling sums over the
    tokens, so permuting the tokenizer's output changes nothing when the position
    embeddings are zero, and changes the logits when they are not."""
    model = CCT(width=8, depth=2, heads=2, tokenizer=(4,))
    images = jax.random.uniform(jax.random.key(8), (2, 32, 32, 3))
    variables = model.init(jax.random.key(9), images)
    tokens = jax.random.normal(jax.random.key(10), (2, 8, 8, 8))
    order = jax.random.permutation(jax.random.key(11), 64)
    shuffled = tokens.reshape(2, 64, 8)[:, order].reshape(tokens.shape)

    def logits(params, given):
        def swap(next_fun, args, kwargs, context):  # the tokenizer returns `given`
            if context.module.name == "tokenizer" and context.method_name == "__call__":
                return given
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(swap):
            return model.apply({"params": params}, images)

    params = variables["params"]
    assert not np.allclose(logits(params, tokens), logits(params, shuffled), atol=1e-4)
    flat = dict(params, pos_embed=jnp.zeros_like(params["pos_embed"]))
    np.testing.assert_allclose(logits(flat, tokens), logits(flat, shuffled), atol=1e-5)
    # and the pooling weights are a distribution over the tokens, sown for rollout
    sown = xv.attention_probabilities(model, variables, images)
    np.testing.assert_allclose(jnp.sum(sown.pooling, axis=-1), 1.0, atol=1e-6)
    assert sown.pooling.shape == (2, 64) and len(sown.layers) == 2


class PooledAttention(nn.Module):
    """One layer of one head over a 2x2 grid of tokens (no class token), and sequence
    pooling weights, both given."""

    attention: tuple
    pooling: tuple

    def __call__(self, x):
        n = x.shape[0]
        self.sow("intermediates", "attention",
                 jnp.broadcast_to(jnp.asarray(self.attention)[None, None], (n, 1, 4, 4)))
        self.sow("intermediates", "pooling", jnp.broadcast_to(jnp.asarray(self.pooling), (n, 4)))
        return jnp.sum(x, axis=(1, 2))


def test_rollout_under_sequence_pooling_takes_the_pooling_weights_row():
    """A: token 0 attends to token 3, the others to themselves; Â = ½A + ½I, so row 0 of
    the rollout is ½e0 + ½e3 and the others e_t. With pooling weights w = (½, ½, 0, 0)
    the classifier's row is w·Â = (¼, ½, 0, ¼) on the 2x2 grid."""
    attention = np.eye(4, dtype=np.float32)
    attention[0] = np.eye(4)[3]
    model = PooledAttention(tuple(map(tuple, attention)), (0.5, 0.5, 0.0, 0.0))
    out = xv.attention_rollout(model, {}, jnp.ones((1, 2, 2, 3)), jnp.array([xv.PREDICTED]))
    np.testing.assert_allclose(out.maps[0], [[0.25, 0.5], [0.0, 0.25]], atol=1e-6)


def test_the_efficientnet_is_refused_by_the_methods_it_cannot_take_with_the_reason():
    model = EfficientNet(width=8, head_width=16)
    why = xv.unsupported("lrp", model)
    assert why is not None and "squeeze_excite" in why and "multiplies two activations" in why
    assert "ReLU" in xv.unsupported("guided_backprop", model)
    assert "attention" in xv.unsupported("attention_rollout", model)
