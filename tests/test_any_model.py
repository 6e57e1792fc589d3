"""Every method on models the project has never seen: a residual network with BatchNorm
and shortcuts, a network without BatchNorm, a model whose `__call__` requires
`train=False`, a patch-embedding token model (ViT-like, mean-pooled), a plain function
and a Flax NNX model; all on 16x16 images, a size the seed's CNN never takes.

Against definitions computed by hand: Grad-CAM at a residual stage through an explicit
split and `jax.vjp`, and Guided Backprop through a hand-written guided backward pass.
"""

from typing import Callable, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex

import xai_models
import xai_visualizations as xv
from cifar10_cnn_model import CIFAR10CNN

ATOL = 1e-5  # batched and single-image convolutions differ in the last float bits
SHAPE = (16, 16, 3)
OPTIONS = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4},
           "rise": {"n_masks": 16}, "occlusion": {"patch": 4, "stride": 4},
           "lime": {"n_samples": 32, "n_segments": 8}, "kernel_shap": {"n_samples": 32, "n_segments": 8}}


class ResidualBlock(nn.Module):
    """conv-BN-act-conv-BN plus the shortcut (a strided 1x1 conv when the shape changes),
    then act."""

    features: int
    strides: int = 1
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train=False):
        norm = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
        y = self.act(norm()(nn.Conv(self.features, (3, 3), self.strides)(x)))
        y = norm()(nn.Conv(self.features, (3, 3))(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = norm()(nn.Conv(self.features, (1, 1), self.strides)(x))
        return self.act(x + y)


class ResNet(nn.Module):
    """stem -> stage1 -> stage2 (stride 2) -> GAP -> Dense. `trunk` and `rest` split it at
    stage2 by hand, for the reference Grad-CAM."""

    act: Callable = nn.relu
    explanation_layer: ClassVar[str] = "stage2"

    def setup(self):
        self.stem = nn.Conv(4, (3, 3))
        self.stage1 = ResidualBlock(4, act=self.act)
        self.stage2 = ResidualBlock(8, strides=2, act=self.act)
        self.head = nn.Dense(5)

    def trunk(self, x):
        return self.stage2(self.stage1(self.act(self.stem(x))))

    def rest(self, acts):
        return self.head(jnp.mean(acts, axis=(1, 2)))

    def __call__(self, x):
        return self.rest(self.trunk(x))


class PlainNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> Dense: no BatchNorm, no batch_stats."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="conv2")(x))
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


class NeedsTrainFlag(nn.Module):
    """A model whose `__call__` requires `train`, with BatchNorm and Dropout."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(6, (3, 3), name="features")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.5, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(5)(x)


class Encoder(nn.Module):
    """Pre-norm token mixing by self-attention, then a GELU MLP, each residual."""

    @nn.compact
    def __call__(self, tokens):
        tokens = tokens + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(tokens))
        hidden = nn.gelu(nn.Dense(16)(nn.LayerNorm()(tokens)))
        return tokens + nn.Dense(tokens.shape[-1])(hidden)


class TinyViT(nn.Module):
    """4x4 patches -> 16 tokens of width 8 with learned positions -> an encoder block ->
    mean over tokens -> Dense."""

    explanation_layer: ClassVar[str] = "block_0"

    @nn.compact
    def __call__(self, x):
        tokens = nn.Conv(8, (4, 4), strides=(4, 4), name="embed")(x)
        tokens = tokens.reshape(x.shape[0], -1, 8)
        tokens = tokens + self.param("position", nn.initializers.normal(0.02),
                                     (1, tokens.shape[1], 8))
        tokens = Encoder(name="block_0")(tokens)
        return nn.Dense(5)(jnp.mean(nn.LayerNorm()(tokens), axis=1))


def _init(model, **kwargs):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, **kwargs))(
        jnp.zeros((1,) + SHAPE))


# (model, apply_kwargs, layer, methods that do not apply). None of them sows its
# attention, which attention rollout reads (tests/test_architectures.py runs it on the ViT).
NO_ATTENTION = ("attention_rollout",)
# LIME and KernelSHAP only run the model forward, on perturbed images: whatever the
# architecture, that path is the same, so they run on the model with the most unusual
# call (its train flag) and on the ViT, not on every model.
FORWARD_ONLY = ("lime", "kernel_shap")
MODELS = {
    "resnet": (ResNet(), {}, "stage2", NO_ATTENTION + FORWARD_ONLY),
    "no batchnorm": (PlainNet(), {}, "conv2", NO_ATTENTION + FORWARD_ONLY),
    "train flag": (NeedsTrainFlag(), {"train": False}, "features", NO_ATTENTION),
    "vit": (TinyViT(), {}, "block_0", ("guided_backprop", "guided_gradcam", "lrp") + NO_ATTENTION),
}


@pytest.fixture(scope="module")
def zoo():
    return {name: _init(model, **kwargs) for name, (model, kwargs, _, _) in MODELS.items()}


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (4,) + SHAPE)


def _pb(variables):
    return variables["params"], variables.get("batch_stats")


CASES = [(name, method) for name in MODELS for method in xv.METHODS
         if method not in MODELS[name][3]]


@pytest.mark.slow
@pytest.mark.parametrize("name, method", CASES)
def test_every_method_explains_every_model_alone_as_in_a_batch(name, method, zoo, images,
                                                               monkeypatch, request):
    """Each image explained without batch-mates (a batch of its copies, the same shape,
    so one compiled program serves every call) equals it inside the batch."""
    if method == "smoothgrad":  # vmapped draws equal per-key draws only under threefry
        request.getfixturevalue("threefry")
    model, kwargs, layer, _ = MODELS[name]
    spec = xv.METHODS[method]
    chex.clear_trace_counter()
    # one input shape, so one trace
    xv.register(method, spec._replace(fn=chex.assert_max_traces(spec.fn, n=1)), replace=True)
    request.addfinalizer(lambda: xv.register(method, spec, replace=True))
    layer_option = {"layer": layer} if "layer" in spec.options else {}
    explainer = xv.Explainer(model, method, apply_kwargs=kwargs, batch_size=64,
                             **layer_option, **OPTIONS.get(method, {}))
    params, stats = _pb(zoo[name])
    maps, preds, scores = explainer.explain(params, stats, images, normalize=False)
    assert maps.shape == (4, 16, 16) and np.isfinite(maps).all()
    if not spec.signed:
        assert maps.min() >= 0
    logits = model.apply(zoo[name], images, **kwargs)
    np.testing.assert_array_equal(preds, np.argmax(logits, -1))
    for i in (0, 2):
        alone, alone_preds, alone_scores = explainer.explain(
            params, stats, jnp.repeat(images[i:i + 1], 4, axis=0), normalize=False)
        for k in range(4):
            np.testing.assert_allclose(alone[k], maps[i], atol=ATOL, rtol=1e-4)
        assert np.all(alone_preds == preds[i])
        np.testing.assert_allclose(alone_scores, scores[i], rtol=1e-5, atol=1e-6)
    again, _, _ = explainer.explain(params, stats, images[::-1], normalize=False)
    np.testing.assert_allclose(again, maps[::-1], atol=ATOL, rtol=1e-4)


def test_grad_cam_at_a_residual_stage_equals_its_definition(zoo, images):
    model, variables = MODELS["resnet"][0], zoo["resnet"]
    targets = jnp.asarray([0, 1, 2, 3])
    acts = model.apply(variables, images, method=ResNet.trunk)  # the explicit split
    logits, vjp = jax.vjp(lambda a: model.apply(variables, a, method=ResNet.rest), acts)
    (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1]))
    cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", acts, grads.mean(axis=(1, 2))))
    expected = jax.image.resize(cam, (4, 16, 16), "bilinear")
    got = xv.grad_cam(model, variables, images, targets, layer="stage2")
    np.testing.assert_allclose(got.maps, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.logits, logits, rtol=1e-6)
    # the default layer is the one the model declares
    np.testing.assert_array_equal(xv.grad_cam(model, variables, images, targets).maps,
                                  got.maps)


def test_guided_backprop_on_the_residual_net_equals_a_hand_written_guided_pass(zoo, images):
    """The reference swaps every ReLU for `guided_relu` by hand (the model's `act` field);
    the explainer rewrites the traced program of the unchanged model."""
    model, variables = MODELS["resnet"][0], zoo["resnet"]
    targets = jnp.asarray([4, 3, 2, 1])
    by_hand = model.clone(act=xv.guided_relu)
    logits, vjp = jax.vjp(lambda x: by_hand.apply(variables, x), images)
    (expected,) = vjp(jax.nn.one_hot(targets, 5))
    got = xv.guided_backprop(model, variables, images, targets)
    np.testing.assert_allclose(got.maps, expected, rtol=1e-5, atol=1e-8)
    plain = xv.saliency(model, variables, images, targets).maps
    assert not np.allclose(got.maps, plain)  # the rule really changed the gradient
    np.testing.assert_allclose(got.logits, model.apply(variables, images), rtol=1e-6)


def test_guided_backprop_refuses_a_model_without_relu(zoo, images):
    with pytest.raises(TypeError, match="needs a ReLU network"):
        xv.Explainer(MODELS["vit"][0], "guided_backprop").explain(*_pb(zoo["vit"]), images)


def test_lrp_refuses_a_transformer_naming_the_operation(zoo, images):
    """LayerNorm divides by the activations' own statistics and attention multiplies two
    activations: no rule here, so LRP says so instead of explaining wrongly."""
    with pytest.raises(TypeError, match=r"LRP cannot propagate relevance through `\w+` at "
                                        r"block_0/LayerNorm_0"):
        xv.Explainer(MODELS["vit"][0], "lrp").explain(*_pb(zoo["vit"]), images)


def test_layers_list_module_paths_and_token_layers_lie_on_a_grid(zoo):
    found = xv.layers(ResNet(), zoo["resnet"], SHAPE)
    assert found["stage1"] == (16, 16, 4) and found["stage2"] == (8, 8, 8)
    assert found["stage2/Conv_0"] == (8, 8, 8)
    assert "head" not in found  # (N, 5) logits cannot be mapped onto the image
    tokens = xv.layers(TinyViT(), zoo["vit"], SHAPE)
    assert tokens["block_0"] == (16, 8) and tokens["embed"] == (4, 4, 8)
    grid = np.arange(2 * 17 * 3).reshape(2, 17, 3)  # a class token, then 16 tokens
    np.testing.assert_array_equal(xai_models.as_grid(grid), grid[:, 1:].reshape(2, 4, 4, 3))
    np.testing.assert_array_equal(xai_models.as_grid(grid[:, 1:]),
                                  grid[:, 1:].reshape(2, 4, 4, 3))
    with pytest.raises(ValueError, match="s² or s² \\+ 1 tokens .* got 7"):
        xai_models.as_grid(grid[:, :7])


def test_an_unknown_or_missing_layer_lists_the_real_ones(zoo, images):
    with pytest.raises(ValueError, match=r"layer 'stage9' is not a module of ResNet; its "
                                         r"layers are stem \(16×16×4\), stage1 "):
        xv.Explainer(ResNet(), "gradcam", layer="stage9").explain(*_pb(zoo["resnet"]), images)
    with pytest.raises(ValueError, match=r"layer must be given: PlainNet declares no "
                                         r"explanation_layer; its layers are conv1 "
                                         r"\(16×16×6\), conv2 \(16×16×6\)"):
        xv.explain("gradcam", PlainNet(), zoo["no batchnorm"], images)


def test_a_model_that_needs_its_train_flag_gets_it_through_apply_kwargs(zoo, images):
    model, variables = MODELS["train flag"][0], zoo["train flag"]
    with pytest.raises(ValueError, match="image of shape \\(16, 16, 3\\) does not fit "
                                         "NeedsTrainFlag: TypeError: .*train"):
        xv.Explainer(model, "saliency").explain(*_pb(variables), images)
    maps = xv.Explainer(model, "saliency", apply_kwargs={"train": False}).explain(
        *_pb(variables), images, normalize=False)[0]
    grads = jax.grad(lambda x: model.apply(variables, x, train=False)[:, 1].sum())(images)
    np.testing.assert_allclose(
        xv.Explainer(model, "saliency", apply_kwargs={"train": False}).explain(
            *_pb(variables), images, target_class=1, normalize=False)[0],
        np.abs(grads).max(-1), rtol=1e-5, atol=1e-8)
    assert maps.shape == (4, 16, 16)


def test_a_plain_function_and_an_nnx_model_explain_without_layers(images):
    from flax import nnx

    class Linear(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(16 * 16 * 3, 5, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.reshape(x.shape[0], -1))

    graphdef, state = nnx.split(Linear(nnx.Rngs(0)))
    f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731 - the documented recipe
    # the saliency of a linear model is its weight row
    maps, preds, _ = xv.Explainer(f, "saliency").explain(None, None, images, target_class=3,
                                                         normalize=False)
    kernel = np.asarray(state["dense"]["kernel"][...])[:, 3].reshape(SHAPE)
    np.testing.assert_allclose(maps, np.broadcast_to(np.abs(kernel).max(-1), maps.shape),
                               rtol=1e-6)
    np.testing.assert_array_equal(preds, np.argmax(f(images), -1))
    with pytest.raises(TypeError, match="layer methods need a flax.linen Module"):
        xv.explain("gradcam", f, None, images)


def live_convolutions(jaxpr, live_outputs=None):
    """(convolutions the outputs of `jaxpr` depend on, indices of the inputs they read),
    by a backward liveness pass over the traced program and its inner programs: what a
    compiler keeps after dead-code elimination, whatever the compiler."""
    live = {v for i, v in enumerate(jaxpr.outvars) if isinstance(v, jex.Var)
            and (live_outputs is None or i in live_outputs)}
    count = 0
    for eqn in reversed(jaxpr.eqns):
        used = {i for i, v in enumerate(eqn.outvars) if v in live}
        if not used:
            continue
        inner = xai_models.inner_programs(eqn)
        reads = set(range(len(eqn.invars)))
        if len(inner) == 1 and len(xai_models.closed(inner[0])[0].invars) == len(eqn.invars):
            found, reads = live_convolutions(xai_models.closed(inner[0])[0], used)
            count += found
        else:
            count += sum(live_convolutions(xai_models.closed(j)[0])[0] for j in inner)
            count += eqn.primitive.name == "conv_general_dilated"
        live |= {eqn.invars[i] for i in reads if isinstance(eqn.invars[i], jex.Var)}
    return count, {i for i, v in enumerate(jaxpr.invars) if v in live}


def test_layer_methods_compute_only_the_part_of_the_network_they_use():
    """Grad-CAM at block3 needs the 7 forward convolutions of the CIFAR CNN and no other;
    at block1 it needs block 1 forward (2), and blocks 2 and 3 forward and backward to
    their input (5 + 5). Counted on the traced program, so that it holds whatever XLA
    does with dead code."""
    model = CIFAR10CNN(width=4)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x, t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    for layer, convolutions in (("block3", 7), ("block2", 10), ("block1", 12)):
        program = jax.make_jaxpr(lambda v, x, t: xv.grad_cam(model, v, x, t, layer=layer).maps)
        assert live_convolutions(program(variables, x, t).jaxpr)[0] == convolutions, layer
