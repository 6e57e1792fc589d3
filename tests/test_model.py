import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cifar10_cnn_model as cm
import xai_models
from cifar10_cnn_model import LAYER_NAMES, CIFAR10CNN


def test_reference_network_parameter_count_and_shapes():
    model = CIFAR10CNN()
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    # convs 1,734,336 (no bias: BatchNorm follows) + BN 2,304 + dense 131,584 + 5,130
    assert n_params == 1_873_354
    assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 2_304
    logits, acts = jax.eval_shape(
        lambda v, x: model.apply(v, x, return_activations=True),
        variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 10)
    assert {k: a.shape for k, a in acts.items()} == {
        "conv1": (2, 32, 32, 64), "conv2": (2, 16, 16, 128), "conv3": (2, 8, 8, 256)}


def test_activations_are_post_relu_block_outputs(tiny_model, tiny_variables, images):
    logits, acts = tiny_model.apply(tiny_variables, images, return_activations=True)
    assert set(LAYER_NAMES) <= set(acts)
    for name in LAYER_NAMES:
        assert float(acts[name].min()) >= 0.0  # after ReLU
    # Each block's input is the previous block's output max-pooled 2x2.
    assert acts["conv2"].shape[1:3] == (16, 16) and acts["conv3"].shape[1:3] == (8, 8)
    np.testing.assert_array_equal(logits, tiny_model.apply(tiny_variables, images))


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_the_seeds_layer_names_are_the_block_outputs(tiny_model, tiny_variables, images,
                                                     layer):
    """Split at a block's module path, the features are the seed's named activation and
    the head from them reproduces the logits."""
    logits, acts = tiny_model.apply(tiny_variables, images, return_activations=True)
    path = CIFAR10CNN.layer_aliases[layer]
    features, head = xai_models.split(tiny_model, tiny_variables, path)
    np.testing.assert_array_equal(features(images), acts[layer])
    np.testing.assert_allclose(head(images, acts[layer]), logits, rtol=1e-5, atol=1e-5)


def test_logits_differentiate_with_respect_to_a_block_output(tiny_model, tiny_variables, images):
    features, head = xai_models.split(tiny_model, tiny_variables, "block3")
    conv3 = features(images)
    grads = jax.grad(lambda a: head(images, a)[:, 3].sum())(conv3)
    assert grads.shape == conv3.shape
    assert float(jnp.abs(grads).sum()) > 0
    # Examples are independent in eval mode: image 0's logit has no gradient in image 1.
    one = jax.grad(lambda a: head(images, a)[0, 3])(conv3)
    assert float(jnp.abs(one[1:]).max()) == 0.0


def test_eval_mode_is_deterministic_and_batch_independent(tiny_model, tiny_variables, images):
    batch = tiny_model.apply(tiny_variables, images)
    np.testing.assert_array_equal(batch, tiny_model.apply(tiny_variables, images))
    alone = tiny_model.apply(tiny_variables, images[2:3])
    np.testing.assert_allclose(alone[0], batch[2], rtol=1e-5, atol=1e-6)


def test_normalisation_happens_inside_the_model(tiny_model, tiny_variables):
    # An image equal to the dataset mean is standardised to zero; with bias-free convs
    # the first block's output is then the same at every pixel.
    from cifar10_cnn_model import CIFAR10_MEAN
    mean_image = jnp.broadcast_to(jnp.asarray(CIFAR10_MEAN), (1, 32, 32, 3))
    _, acts = tiny_model.apply(tiny_variables, mean_image, return_activations=True)
    conv1 = acts["conv1"][0]
    np.testing.assert_allclose(conv1, jnp.broadcast_to(conv1[16, 16], conv1.shape), atol=1e-6)


def test_train_mode_updates_batch_stats_and_uses_dropout(tiny_model, tiny_variables, images):
    def run(key):
        return tiny_model.apply(tiny_variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})

    logits_a, updates = run(jax.random.key(0))
    logits_b, _ = run(jax.random.key(1))
    changed = jax.tree.map(lambda new, old: bool(jnp.any(new != old)),
                           updates["batch_stats"], tiny_variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(logits_a, logits_b)  # dropout differs with the key
    np.testing.assert_array_equal(logits_a, run(jax.random.key(0))[0])


def test_pooling_equals_flax_max_pool_and_routes_the_gradient_to_the_maximum():
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    np.testing.assert_array_equal(cm.pool2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    grads = jax.grad(lambda x: jnp.sum(cm.pool2x2(x)))(x)
    np.testing.assert_array_equal(grads, jax.grad(
        lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2))))(x))
    assert grads.sum() == 2 * 4 * 4 * 3  # one 1 per window (no ties in random normals)
