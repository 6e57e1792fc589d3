"""Every method of the registry, with each of its option sets, gives the same maps when
the user jits it with the variables as arguments (traced) as when it runs eagerly on
concrete variables, on small instances of the CNN, ResNet-20 and the ViT.

The instances' first layers have 32 channels and the images are 32 × 32: XLA:CPU
miscomputed LRP-flat's all-ones kernel only from 17 output channels and at that size,
and only in one compiled program (traced variables), not in the eager one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_lrp
import xai_visualizations as xv
from architectures import MODELS

INSTANCES = {
    "cnn": dict(width=32),
    "resnet20": dict(width=32, blocks_per_stage=1),
    "vit": dict(width=32, depth=1, heads=2),
}
# Each method's option sets: the discrete choices each one, sample counts small.
OPTION_SETS = {
    "gradcam": [{}],
    "gradcam++": [{}],
    "saliency": [{}],
    "smoothgrad": [{"n_samples": 3}],
    "grad_x_input": [{}],
    "integrated_gradients": [{"steps": 4}, {"steps": 4, "baseline": "grey"}],
    "occlusion": [{"patch": 16, "stride": 16, "baseline": 0.5}],
    "rise": [{"n_masks": 8}],
    "guided_backprop": [{}],
    "guided_gradcam": [{}],
    "lrp": [{"composite": name} for name in xai_lrp.COMPOSITES],
    "lime": [{"n_samples": 8, "n_segments": 8},
             {"n_samples": 8, "segmentation": "quickshift", "fill": "blur",
              "score": "logit", "ridge": 0.5}],
    "kernel_shap": [{"n_samples": 8, "n_segments": 8, "fill": "blur"}],
    "attention_rollout": [{"head_fusion": fusion} for fusion in ("mean", "max", "min")],
}
TARGETS = jnp.array([xv.PREDICTED, 3], jnp.int32)
# What the registry refuses on each architecture (checked, not skipped).
REFUSED = {"cnn": {"attention_rollout"}, "resnet20": {"attention_rollout"},
           "vit": {"guided_backprop", "guided_gradcam", "lrp"}}


def test_every_method_has_option_sets_here():
    assert set(OPTION_SETS) == set(xv.METHODS)


@pytest.fixture(scope="module", params=list(INSTANCES))
def instance(request):
    model = MODELS[request.param].build(**INSTANCES[request.param])
    images = jax.random.uniform(jax.random.key(11), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(12), images)
    return request.param, model, variables, images


def _options(options, images):
    if options.get("baseline") == "grey":
        return {**options, "baseline": jnp.full(images.shape[1:], 0.5)}
    return options


@pytest.mark.parametrize("method", list(OPTION_SETS))
def test_traced_variables_give_the_concrete_maps(instance, method):
    name, model, variables, images = instance
    if method in REFUSED[name]:
        assert xv.unsupported(method, model)
        return
    assert xv.unsupported(method, model) is None
    key = jax.random.key(13)
    for options in OPTION_SETS[method]:
        options = _options(options, images)

        def maps(v, x, k, options=options):
            out = xv.explain(method, model, v, x, TARGETS, k, batch_size=8, **options)
            return out.maps, out.logits

        concrete, logits = maps(variables, images, key)
        traced, traced_logits = jax.jit(maps)(variables, images, key)
        scale = float(jnp.max(jnp.abs(concrete)))
        assert np.isfinite(scale) and scale > 0, (method, options)
        np.testing.assert_allclose(traced_logits, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(traced, concrete, rtol=0, atol=1e-5 * scale,
                                   err_msg=f"{name} {method} {options}")
