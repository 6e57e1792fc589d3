"""The model zoo (`architectures.py`): ResNet-20 and the ViT as their papers define them,
every method on every architecture, checkpoints of each, and attention rollout against
a hand-computed fixture."""

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_metrics as xm
import xai_visualizations as xv
from architectures import CCT, MODELS, BasicBlock, EfficientNet, ResNet20, ViT, registry_name
from checkpoints import load_checkpoint, save_checkpoint

# Tiny members of each family, for the tests that run them.
TINY = {"resnet20": ResNet20(width=4), "vit": ViT(width=8, depth=2, heads=2),
        # two stages: no expansion and 6x, 3x3 and 5x5, strides 1 and 2, a residual block
        "efficientnet": EfficientNet(width=8, head_width=16,
                                     stages=((1, 3, 1, 16, 1), (6, 5, 2, 24, 2))),
        "cct": CCT(width=8, depth=1, heads=2, tokenizer=(4,))}
# What each architecture refuses, by name (the reasons are tested in test_layers.py).
REFUSED = {"resnet20": ["attention_rollout"], "vit": ["guided_backprop", "guided_gradcam", "lrp"],
           "efficientnet": ["attention_rollout", "guided_backprop", "guided_gradcam", "lrp"],
           "cct": ["lrp"]}
OPTIONS = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 2},
           "rise": {"n_masks": 8}, "occlusion": {"patch": 16, "stride": 16},
           "lime": {"n_samples": 16, "n_segments": 8}, "kernel_shap": {"n_samples": 16, "n_segments": 8}}


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def zoo():
    """{name: (model, variables)} of the tiny models, initialised once."""
    x = jnp.zeros((1, 32, 32, 3))
    return {name: (model, jax.jit(model.init)(jax.random.key(i), x))
            for i, (name, model) in enumerate(TINY.items())}


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(7), (2, 32, 32, 3))


def test_parameter_counts_are_pinned():
    # He et al. 2016 (section 4.2) give 0.27 M for ResNet-20; option A adds none.
    assert count(abstract(ResNet20())["params"]) == 269_722
    assert count(abstract(ViT())["params"]) == 811_146
    assert count(abstract(MODELS["cnn"].build())["params"]) == 1_873_354
    assert "batch_stats" not in abstract(ViT())  # LayerNorm only
    # Hassani et al. 2021 give 0.28 M for CCT-2/3x2
    assert count(abstract(CCT())["params"]) == 284_491
    assert count(abstract(EfficientNet())["params"]) == 285_908


def test_resnet20_has_twenty_weight_layers_and_the_papers_shapes():
    params = abstract(ResNet20())["params"]
    kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if path[-1].key == "kernel"]
    assert len(kernels) == 20  # 1 + 3 x 3 x 2 convolutions + the Dense layer
    assert params["stage2"]["block1"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert params["stage3"]["block3"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    found = xv.layers(ResNet20(), abstract(ResNet20()), (1, 32, 32, 3))
    assert found["stage1"] == (32, 32, 16) and found["stage3"] == (8, 8, 64)


@pytest.mark.parametrize("stride, channels", [(1, 4), (2, 8)])
def test_a_residual_block_is_its_branch_plus_its_shortcut(stride, channels):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    block = BasicBlock(channels, stride)
    variables = block.init(jax.random.key(1), x)
    branch = block.apply(variables, x, method=lambda m, x: m.branch(x, train=False))
    # Option A, by hand: every stride-th pixel, the new channels zero on both sides.
    shortcut = np.asarray(x)[:, ::stride, ::stride]
    extra = channels - 4
    shortcut = np.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    out = block.apply(variables, x)
    assert out.shape == (2, 8 // stride, 8 // stride, channels)
    np.testing.assert_allclose(out, np.maximum(branch + shortcut, 0), atol=1e-6)
    assert not np.allclose(out, np.maximum(branch, 0))  # the shortcut contributes


def test_the_vit_uses_its_position_embeddings(zoo, images):
    """Permuting an image's 4x4 patches changes the logits; with the position embeddings
    zeroed it does not (attention and the MLPs are permutation-equivariant, and the
    class token reads a permutation-invariant sum)."""
    model, variables = zoo["vit"]
    patches = images.reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, 4, 4, 3)
    order = jax.random.permutation(jax.random.key(3), 64)
    shuffled = patches[:, order].reshape(2, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
        images.shape)
    apply = jax.jit(model.apply)
    assert not np.allclose(apply(variables, images), apply(variables, shuffled), atol=1e-4)
    flat = dict(variables["params"], pos_embed=jnp.zeros_like(variables["params"]["pos_embed"]))
    np.testing.assert_allclose(apply({"params": flat}, images),
                               apply({"params": flat}, shuffled), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TINY if name != "resnet20"])
def test_every_method_explains_every_architecture_or_says_why_not(name, zoo, images):
    """One compiled program per architecture runs every method that applies; the others
    are refused by name, with the reason. (ResNet-20's program of every method and option
    set is tests/test_traced.py's.)"""
    model, variables = zoo[name]
    fits = [m for m in xv.METHODS if not xv.unsupported(m, model)]
    refused = sorted(set(xv.METHODS) - set(fits))
    assert refused == REFUSED[name]
    for method in refused:
        with pytest.raises(ValueError, match=f"method '{method}' cannot explain {type(model).__name__}"):
            xv.Explainer(model, method)

    @jax.jit
    def run_all(variables, images):
        return {m: xv.explain(m, model, variables, images, None, jax.random.key(0),
                              **OPTIONS.get(m, {})) for m in fits}

    out = run_all(variables, images)
    logits = model.apply(variables, images)
    for method, attribution in out.items():
        maps = np.asarray(attribution.maps)
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all(), method
        if not xv.METHODS[method].signed:
            assert maps.min() >= 0, method
        np.testing.assert_array_equal(attribution.targets, np.argmax(logits, -1))
    # The explanation layer reaches the logits: its gradients are not all zero (the
    # ViT's last-layer *output* tokens, which the head never reads, would be).
    _, grads, _, _ = jax.jit(xv.layer_gradients, static_argnums=0)(
        model, variables, images, jnp.full((2,), xv.PREDICTED))
    assert grads.shape[1:3] == {"efficientnet": (16, 16)}.get(name, (8, 8))


def test_resnet20s_refusals_and_its_explanation_layers_gradients(zoo, images):
    model, variables = zoo["resnet20"]
    assert [m for m in xv.METHODS if xv.unsupported(m, model)] == REFUSED["resnet20"]
    _, grads, _, _ = jax.jit(xv.layer_gradients, static_argnums=0)(
        model, variables, images, jnp.full((2,), xv.PREDICTED))
    assert grads.shape[1:3] == (8, 8) and np.abs(grads).max() > 0
    assert np.abs(grads).max() > 0


@pytest.mark.parametrize("name", list(TINY))
def test_load_checkpoint_rebuilds_each_architecture(name, tmp_path):
    model = TINY[name]
    variables = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype),
                             abstract(model))
    path = tmp_path / f"{name}.pkl"
    save_checkpoint(path, model, variables)
    loaded, got = load_checkpoint(path)
    assert type(loaded) is type(model) and registry_name(loaded) == name
    assert MODELS[name].config(loaded) == MODELS[name].config(model)
    jax.tree.map(np.testing.assert_array_equal, got["params"], variables["params"])
    assert set(got) == set(variables)  # the ViT has no batch_stats
    jax.tree.map(np.testing.assert_array_equal, got.get("batch_stats"), variables.get("batch_stats"))


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"params": {}, "batch_stats": {}, "metrics": {},
                     "config": {"architecture": "ConvNeXt", "model": {}}}, f)
    with pytest.raises(ValueError, match="holds a 'ConvNeXt'.*it knows.*'ResNet20',"):
        load_checkpoint(path)


class FixedAttention(nn.Module):
    """Two 'layers' of one head over a class token and a 2x2 grid of patches (one pixel
    each), sowing the attention matrices given, in the order given."""

    attentions: tuple

    def __call__(self, x):
        for a in self.attentions:
            self.sow("intermediates", "attention", jnp.broadcast_to(
                jnp.asarray(a)[None, None], (x.shape[0], 1, 5, 5)))
        return jnp.sum(x, axis=(1, 2))  # logits (N, 3) from the channels


def test_attention_rollout_matches_a_hand_computed_flow():
    """A1: the class token attends only to patch 2; A2: only to patch 1; every other
    token to itself. With Â = ½A + ½I, row 0 of Â2·Â1 is ¼e0 + ½e1 + ¼e2, so the patches
    (row-major on the 2x2 grid) get ½, ¼, 0, 0. In the other order: ¼, ½, 0, 0."""
    eye = np.eye(5, dtype=np.float32)
    first, second = eye.copy(), eye.copy()
    first[0], second[0] = np.eye(5)[2], np.eye(5)[1]
    x = jnp.ones((1, 2, 2, 3)) / 2
    for order, expected in (((first, second), [[0.5, 0.25], [0, 0]]),
                            ((second, first), [[0.25, 0.5], [0, 0]])):
        model = FixedAttention(order)
        out = xv.attention_rollout(model, {}, x, jnp.array([xv.PREDICTED]))
        np.testing.assert_allclose(out.maps[0], expected, atol=1e-6)


def test_attention_rollout_explains_an_image_alone_as_in_a_batch(zoo, images):
    model, variables = zoo["vit"]
    rollout = jax.jit(lambda v, x: xv.explain("attention_rollout", model, v, x).maps)
    maps = rollout(variables, images)
    alone = rollout(variables, jnp.repeat(images[1:], 2, axis=0))  # same shape, one program
    np.testing.assert_allclose(alone, jnp.repeat(maps[1:], 2, axis=0), atol=1e-6)
    assert maps.min() >= 0 and not np.allclose(maps[0], maps[1])


def test_attention_rollout_refuses_a_model_without_attention(zoo):
    with pytest.raises(ValueError, match="sows its attention probabilities.*ResNet20 sows none"):
        xv.Explainer(zoo["resnet20"][0], "attention_rollout")


def test_the_vits_randomisation_cascade_ends_with_its_own_parameters(zoo):
    """The cascade runs from the head down to the patch embedding; the last level
    re-initialises the parameters the ViT holds itself (class token, position
    embeddings), and only those."""
    model, variables = zoo["vit"]
    levels = xm.randomization_levels(model, variables)
    assert levels[0][0] == "head" and levels[-2][0] == "patch_embed"
    assert levels[-1] == ("(top level)", ((),))
    zeros = jax.tree.map(jnp.zeros_like, variables["params"])  # "random" = 0, to see what moved
    _, stacked = xm.cascading_randomization(model, variables, zeros)
    stacked = stacked["params"]
    before_last = jax.tree.map(lambda a: a[-2], stacked)
    np.testing.assert_array_equal(before_last["pos_embed"], variables["params"]["pos_embed"])
    assert not any(np.any(leaf) for key, leaf in before_last.items() if key != "pos_embed"
                   for leaf in jax.tree.leaves(leaf))
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(jax.tree.map(lambda a: a[-1], stacked)))
