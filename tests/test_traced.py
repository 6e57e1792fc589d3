"""Every method of the registry, with each of its option sets, gives the same maps when
the user jits it with the variables as arguments (traced) as when it runs on concrete
variables: on a small ResNet-20 every method it takes, and on a small ViT the one
ResNet-20 refuses (attention rollout).

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

pytestmark = pytest.mark.slow  # every method and option set, on three architectures

INSTANCES = {
    "resnet20": dict(width=32, blocks_per_stage=1),
    "vit": dict(width=32, depth=1, heads=2),
}
# The methods run on an instance, where not all that it takes (each program costs
# compilation: the CNN and the ViT's gradient methods repeated ResNet-20's cases).
ONLY = {"vit": {"attention_rollout"}}
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
REFUSED = {"resnet20": {"attention_rollout"},
           "vit": {"guided_backprop", "guided_gradcam", "lrp"}}


def test_every_method_has_option_sets_here_and_runs_on_an_instance():
    assert set(OPTION_SETS) == set(xv.METHODS)
    run = (set(xv.METHODS) - REFUSED["resnet20"]) | (ONLY["vit"] - REFUSED["vit"])
    assert run == set(xv.METHODS)


@pytest.fixture(scope="module", params=list(INSTANCES))
def instance(request):
    model = MODELS[request.param].build(**INSTANCES[request.param])
    # smooth images, so that SLIC finds segments for LIME and KernelSHAP
    images = jax.image.resize(jax.random.uniform(jax.random.key(11), (2, 8, 8, 3)),
                              (2, 32, 32, 3), "linear")
    variables = jax.jit(model.init)(jax.random.key(12), images)
    return request.param, model, variables, images


def _cases(name, model, images):
    """{(method, options as text): options} of every method the registry lets explain
    this architecture, after checking what it refuses."""
    cases = {}
    for method, option_sets in OPTION_SETS.items():
        why = xv.unsupported(method, model)
        assert (why is not None) == (method in REFUSED[name]), (name, method, why)
        if name in ONLY and method not in ONLY[name]:
            continue
        for options in option_sets if why is None else ():
            if options.get("baseline") == "grey":
                options = {**options, "baseline": jnp.full(images.shape[1:], 0.5)}
            shown = ", ".join(f"{k}={'an image' if k == 'baseline' else v!r}"
                              for k, v in options.items())
            cases[f"{method}({shown})"] = method, options
    return cases


def test_traced_variables_give_the_concrete_maps(instance):
    """All the cases of one architecture as one program with the variables as
    arguments, against one with them as constants (as `explain` sees concrete ones),
    within 1e-4 of each map's largest value: float32 noise stays below that (LRP-ε on
    the ResNet differs by 6e-5 of it between the two, where z + ε is near 0), while the
    miscompiled LRP-flat maps were off by factors of 1e6 to 1e25."""
    name, model, variables, images = instance
    cases = _cases(name, model, images)
    key = jax.random.key(13)

    def every_map(v, x, k):
        return {case: xv.explain(method, model, v, x, TARGETS, k, batch_size=8,
                                 **options).maps
                for case, (method, options) in cases.items()}

    traced = jax.jit(every_map)(variables, images, key)
    concrete = jax.jit(lambda x, k: every_map(variables, x, k))(images, key)
    for case, want in concrete.items():
        scale = float(jnp.max(jnp.abs(want)))
        assert np.isfinite(scale) and scale > 0, case
        np.testing.assert_allclose(traced[case], want, rtol=0, atol=1e-4 * scale,
                                   err_msg=f"{name} {case}")
