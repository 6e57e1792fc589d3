"""Every public entry point refuses bad input in words: one table of (call, exception,
fragment of the message) across the model, the data, training, the explainers, the
metrics and the three command lines.

Each call fails in argument checking, before anything is compiled, so the whole table
costs about a second.
"""

import pickle
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cifar10_data
import demo_xai
import evaluate_xai
import train_cifar10 as tc
import xai_core
import xai_metrics as xm
import xai_lrp
import xai_visualizations as xv
from cifar10_cnn_model import CIFAR10CNN

OK = np.full((32, 32, 3), 0.5, np.float32)
NAN, INF = OK.copy(), OK.copy()
NAN[0, 0, 0], INF[1, 1, 1] = np.nan, np.inf


class NoReLU(nn.Module):
    """A linear model: no ReLU for Guided Backprop's rule to act on."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Payload:
    """Unpickling this would create a file; safe loaders must refuse the global."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def env(tiny_model, tiny_variables, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "short.bin").write_bytes(bytes(100))
    (folder / "not_a_batch").write_bytes(b"hello")
    (folder / "evil").write_bytes(pickle.dumps({b"data": Payload(str(folder / "pwned"))}))
    variables = tiny_variables
    params, stats = variables["params"], variables["batch_stats"]
    gradcam, saliency = xv.GradCAM(tiny_model, target_layer="conv3"), xv.SaliencyMap(tiny_model)
    images, maps = jnp.full((2, 32, 32, 3), 0.5), jnp.zeros((2, 32, 32))
    targets = jnp.zeros((2,), jnp.int32)

    def explain(method, **kwargs):
        compute = {"gradcam": gradcam.compute_gradcam, "saliency": saliency.compute_saliency,
                   "smooth": saliency.compute_smooth_saliency}[method]
        return compute(**{"params": params, "batch_stats": stats, "image": OK, **kwargs})

    def curves(**kwargs):
        return xm.deletion_insertion(tiny_model, variables, **{
            "images": images, "maps": maps, "targets": targets, **kwargs})

    wide = jax.jit(CIFAR10CNN(width=8).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    linear = NoReLU().init(jax.random.key(0), images)
    return SimpleNamespace(model=tiny_model, variables=variables, folder=folder,
                           explain=explain, curves=curves, images=images, wide=wide,
                           linear=linear)


def _apply(e, x):
    return e.model.apply(e.variables, x)


def _init(**fields):
    return CIFAR10CNN(**fields).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


CASES = [
    # ---------------------------------------------------------------- model
    ("model: one image without a batch axis", lambda e: _apply(e, jnp.zeros((32, 32, 3))),
     ValueError, "x must be a batch of RGB images (N, H, W, 3) with N >= 1, got shape (32, 32, 3)"),
    ("model: grayscale", lambda e: _apply(e, jnp.zeros((1, 32, 32, 1))),
     ValueError, "got shape (1, 32, 32, 1)"),
    ("model: empty batch", lambda e: _apply(e, jnp.zeros((0, 32, 32, 3))),
     ValueError, "with N >= 1, got shape (0, 32, 32, 3)"),
    ("model: size not a multiple of 8", lambda e: _apply(e, jnp.zeros((1, 28, 28, 3))),
     ValueError, "multiples of 8 (three 2x2 poolings), got 28x28"),
    ("model: uint8 images", lambda e: _apply(e, jnp.zeros((1, 32, 32, 3), jnp.uint8)),
     TypeError, "got dtype uint8 (divide uint8 images by 255 first)"),
    ("model: a list", lambda e: _apply(e, [[0.5]]),
     TypeError, "x must be an array (N, H, W, 3), got list"),
    ("model: width 0", lambda e: _init(width=0),
     ValueError, "CIFAR10CNN width must be an int >= 1, got 0"),
    ("model: dropout 1", lambda e: _init(dropout_rate=1.0),
     ValueError, "dropout_rate must be a number in [0, 1), got 1.0"),
    ("model: no classes", lambda e: _init(num_classes=0),
     ValueError, "num_classes must be an int >= 1, got 0"),
    ("layers: unknown layer", lambda e: xv.GradCAM(e.model, target_layer="conv9"),
     ValueError, "target_layer 'conv9' is not a module of CIFAR10CNN; its layers are "
                 "block1 (32×32×4), block1/Conv_0 (32×32×4)"),
    # ---------------------------------------------------------------- data
    ("data: no CIFAR-10 in the folder", lambda e: cifar10_data.load_folder(e.folder / "none"),
     cifar10_data.DataError, "holds no CIFAR-10 data: expected the binary layout"),
    ("data: truncated binary batch", lambda e: cifar10_data.read_binary_batch(e.folder / "short.bin"),
     cifar10_data.DataError, "size is 100 bytes, expected 30,730,000"),
    ("data: not a python batch", lambda e: cifar10_data.read_python_batch(e.folder / "not_a_batch"),
     cifar10_data.DataError, "not a readable CIFAR-10 python batch"),
    ("data: pickle with code", lambda e: cifar10_data.read_python_batch(e.folder / "evil"),
     cifar10_data.DataError, "not a readable CIFAR-10 python batch"),
    ("data: validation fraction 1", lambda e: cifar10_data.split_train_val(OK, OK, 1.0),
     ValueError, "val_fraction must be in [0, 1), got 1.0"),
    # ---------------------------------------------------------------- training API
    ("train: epochs as text", lambda e: tc.TrainConfig(epochs="5"),
     TypeError, "epochs must be int, got '5'"),
    ("train: learning rate as text", lambda e: tc.TrainConfig(lr="fast"),
     TypeError, "lr must be float or None, got 'fast'"),
    ("train: unknown recipe", lambda e: tc.TrainConfig(recipe="adam"),
     ValueError, "recipe must be one of ('seed', 'default', 'adversarial'), got 'adam'"),
    ("train: unknown precision", lambda e: tc.TrainConfig(precision="fp16"),
     ValueError, "precision must be one of ('fp32', 'bf16'), got 'fp16'"),
    ("train: resume without a folder", lambda e: tc.TrainConfig(resume=True),
     ValueError, "resume must be used with a checkpoint_dir, got True"),
    ("train: negative steps per call", lambda e: tc.TrainConfig(steps_per_call=-1),
     ValueError, "steps_per_call must be >= 0 or None, got -1"),
    ("train: missing checkpoint", lambda e: tc.load_checkpoint(e.folder / "nope.pkl"),
     FileNotFoundError, "nope.pkl' does not exist; train one with"),
    ("train: checkpoint with code", lambda e: tc.load_checkpoint(e.folder / "evil"),
     ValueError, "is not a readable cifar10-xai checkpoint"),
    # ---------------------------------------------------------------- command lines
    ("train CLI: epochs 0", lambda e: tc.parse_args(["--epochs", "0"]),
     SystemExit, "epochs must be >= 1, got 0"),
    ("train CLI: batch -2", lambda e: tc.parse_args(["--batch-size", "-2"]),
     SystemExit, "batch_size must be >= 1, got -2"),
    ("train CLI: val fraction 1", lambda e: tc.parse_args(["--val-fraction", "1"]),
     SystemExit, "val_fraction must be in [0, 1), got 1.0"),
    ("train CLI: lr 0", lambda e: tc.parse_args(["--lr", "0"]),
     SystemExit, "lr must be > 0, got 0.0"),
    ("train CLI: keep 0", lambda e: tc.parse_args(["--keep", "0"]),
     SystemExit, "keep must be >= 1, got 0"),
    ("train CLI: precision", lambda e: tc.parse_args(["--precision", "fp16"]),
     SystemExit, "invalid choice: 'fp16'"),
    ("train CLI: epochs not a number", lambda e: tc.parse_args(["--epochs", "ten"]),
     SystemExit, "invalid int value: 'ten'"),
    ("evaluate CLI: step 0", lambda e: evaluate_xai.parse_args(["--step", "0"]),
     SystemExit, "argument --step: must be an int >= 1, got 0"),
    ("evaluate CLI: no images", lambda e: evaluate_xai.parse_args(["--num-images", "0"]),
     SystemExit, "argument --num-images: must be an int >= 1, got 0"),
    ("evaluate CLI: patch 33", lambda e: evaluate_xai.parse_args(["--occlusion-patch", "33"]),
     SystemExit, "--occlusion-patch: patch must be at most the image side 32, got 33"),
    ("evaluate CLI: unknown method", lambda e: evaluate_xai.parse_args(["--methods", "deeplift"]),
     SystemExit, "invalid choice: 'deeplift'"),
    ("evaluate CLI: unknown baseline",
     lambda e: evaluate_xai.parse_args(["--insertion-baseline", "noise"]),
     SystemExit, "invalid choice: 'noise'"),
    ("demo CLI: no images", lambda e: demo_xai.main(["--num-images", "0"]),
     SystemExit, "argument --num-images: must be an int >= 1, got 0"),
    ("demo CLI: negative seed", lambda e: demo_xai.main(["--seed", "-1"]),
     SystemExit, "argument --seed: must be an int >= 0, got -1"),
    # ---------------------------------------------------------------- seed explainers
    ("gradcam: 2-D image", lambda e: e.explain("gradcam", image=np.zeros((32, 32))),
     ValueError, "image must be one image (H, W, C) or a batch (N, H, W, C), got shape (32, 32)"),
    ("gradcam: one channel", lambda e: e.explain("gradcam", image=np.zeros((32, 32, 1))),
     ValueError, "image of shape (32, 32, 1) does not fit CIFAR10CNN"),
    ("saliency: 28 px", lambda e: e.explain("saliency", image=np.zeros((2, 28, 28, 3))),
     ValueError, "image of shape (28, 28, 3) does not fit CIFAR10CNN: ValueError: "
                 "CIFAR10CNN input height and width must be positive multiples of 8"),
    ("gradcam: params and batch_stats swapped",
     lambda e: e.explain("gradcam", params=e.variables["batch_stats"],
                         batch_stats=e.variables["params"]),
     ValueError, "variables do not fit CIFAR10CNN: params/block1/BatchNorm_0/bias is missing "
                 "(params and batch_stats are swapped)"),
    ("saliency: another width", lambda e: e.explain("saliency", params=e.wide["params"],
                                                    batch_stats=e.wide["batch_stats"]),
     ValueError, "params/block1/BatchNorm_0/bias is (8,), the model needs (4,)"),
    ("saliency: no batch_stats", lambda e: e.explain("saliency", batch_stats=None),
     ValueError, "variables do not fit CIFAR10CNN: batch_stats/block1/BatchNorm_0/mean is "
                 "missing"),
    ("saliency: 5-D", lambda e: e.explain("saliency", image=np.zeros((1, 1, 32, 32, 3))),
     ValueError, "got shape (1, 1, 32, 32, 3)"),
    ("gradcam: empty batch", lambda e: e.explain("gradcam", image=np.zeros((0, 32, 32, 3))),
     ValueError, "at least one image"),
    ("gradcam: a file name", lambda e: e.explain("gradcam", image="cat.png"),
     TypeError, "image must be an array"),
    ("gradcam: int32 image", lambda e: e.explain("gradcam", image=np.zeros((32, 32, 3), np.int32)),
     TypeError, "got dtype int32"),
    ("saliency: NaN", lambda e: e.explain("saliency", image=NAN),
     ValueError, "image must be finite"),
    ("smoothgrad: inf", lambda e: e.explain("smooth", image=INF),
     ValueError, "image must be finite"),
    ("gradcam: 0..255 floats", lambda e: e.explain("gradcam", image=OK * 255),
     ValueError, "values must be in [0, 1]"),
    ("saliency: negative", lambda e: e.explain("saliency", image=OK - 1),
     ValueError, "got range [-0.5, -0.5]"),
    ("gradcam: class 10", lambda e: e.explain("gradcam", target_class=10),
     ValueError, "target_class must be in [0, 10), got 10"),
    ("saliency: class -1", lambda e: e.explain("saliency", target_class=-1),
     ValueError, "target_class must be in [0, 10), got -1"),
    ("gradcam: float class", lambda e: e.explain("gradcam", target_class=1.5),
     TypeError, "target_class must be None, an int"),
    ("gradcam: bool class", lambda e: e.explain("gradcam", target_class=True),
     TypeError, "got True"),
    ("saliency: two classes, one image", lambda e: e.explain("saliency", target_class=[1, 2]),
     ValueError, "got shape (2,)"),
    ("smoothgrad: class 11", lambda e: e.explain("smooth", target_class=[11]),
     ValueError, "got 11"),
    ("smoothgrad: no samples", lambda e: e.explain("smooth", n_samples=0),
     ValueError, "n_samples must be an int >= 1, got 0"),
    ("smoothgrad: fractional samples", lambda e: e.explain("smooth", n_samples=2.5),
     ValueError, "n_samples must be an int >= 1, got 2.5"),
    ("smoothgrad: negative noise", lambda e: e.explain("smooth", noise_level=-0.1),
     ValueError, "noise_level must be a number"),
    ("smoothgrad: NaN noise", lambda e: e.explain("smooth", noise_level=float("nan")),
     ValueError, "got nan"),
    ("smoothgrad: batch 0", lambda e: e.explain("smooth", batch_size=0),
     ValueError, "batch_size must be an int >= 1, got 0"),
    ("smoothgrad: negative seed", lambda e: e.explain("smooth", seed=-1),
     ValueError, "seed must be an int >= 0, got -1"),
    ("gradcam: params not a dict", lambda e: e.explain("gradcam", params=[1, 2]),
     TypeError, "params must be the dict of model parameters"),
    ("gradcam: unknown layer", lambda e: xv.GradCAM(e.model, target_layer="fc1"),
     ValueError, "target_layer 'fc1' is not a module of CIFAR10CNN; its layers are"),
    # ---------------------------------------------------------------- other explainers
    ("explain: unknown method", lambda e: xv.Explainer(e.model, "deeplift"),
     ValueError, "method must be one of"),
    ("lrp: unknown composite", lambda e: xv.Explainer(e.model, "lrp", composite="zennit"),
     ValueError, "composite must be one of ('epsilon_gamma_box', 'epsilon_plus_flat'"),
    ("lrp: a rule that is not one", lambda e: xai_lrp.composite({"conv": "gamma"}),
     TypeError, "layers must map a module path or kind (str) to a rule"),
    ("lime: unknown segmentation",
     lambda e: xv.Explainer(e.model, "lime", segmentation="watershed"),
     ValueError, "segmentation must be one of ('slic', 'quickshift'), got 'watershed'"),
    ("kernel_shap: one segment", lambda e: xv.Explainer(e.model, "kernel_shap", n_segments=1),
     ValueError, "n_segments must be an int >= 2, got 1"),
    ("gradcam: foreign option", lambda e: xv.Explainer(e.model, "gradcam", steps=4),
     TypeError, "gradcam takes the options ('layer',)"),
    ("saliency: any option", lambda e: xv.Explainer(e.model, "saliency", steps=4),
     TypeError, "saliency takes the options none"),
    ("gradcam++: unknown layer", lambda e: xv.Explainer(e.model, "gradcam++", layer="fc"),
     ValueError, "layer 'fc' is not a module of CIFAR10CNN; its layers are"),
    ("saliency: a layer", lambda e: xv.Explainer(e.model, "saliency", layer="block3"),
     TypeError, "saliency takes no layer, got layer='block3'"),
    ("IG: no steps", lambda e: xv.Explainer(e.model, "integrated_gradients", steps=0),
     ValueError, "steps must be an int >= 1, got 0"),
    ("IG: channels-first baseline",
     lambda e: xv.Explainer(e.model, "integrated_gradients", baseline=np.zeros((3, 32, 32))),
     ValueError, "baseline must have the images' shape (32, 32, 3), got (3, 32, 32)"),
    ("IG: baseline above 1",
     lambda e: xv.Explainer(e.model, "integrated_gradients", baseline=np.full((32, 32, 3), 2.0)),
     ValueError, "baseline values must be in [0, 1]"),
    ("smoothgrad: negative noise option",
     lambda e: xv.Explainer(e.model, "smoothgrad", noise_level=-1.0),
     ValueError, "noise_level must be a number"),
    ("RISE: keep nothing", lambda e: xv.Explainer(e.model, "rise", keep_prob=0.0),
     ValueError, "keep_prob must be a number in (0, 1]"),
    ("RISE: fractional masks", lambda e: xv.Explainer(e.model, "rise", n_masks=2.5),
     ValueError, "n_masks must be an int >= 1, got 2.5"),
    ("RISE: batch 0", lambda e: xv.Explainer(e.model, "rise", batch_size=0),
     ValueError, "batch_size must be an int >= 1, got 0"),
    ("occlusion: baseline 1.5", lambda e: xv.Explainer(e.model, "occlusion", baseline=1.5),
     ValueError, "baseline must be a number in [0, 1]"),
    ("occlusion: stride 0", lambda e: xv.Explainer(e.model, "occlusion", stride=0),
     ValueError, "stride must be an int >= 1, got 0"),
    ("Grad x Input: negative seed",
     lambda e: xv.Explainer(e.model, "grad_x_input").explain(
         e.variables["params"], e.variables["batch_stats"], OK, seed=-1),
     ValueError, "seed must be an int >= 0, got -1"),
    ("guided backprop: no ReLU",
     lambda e: xv.guided_backprop(NoReLU(), e.linear, e.images, jnp.zeros(2, jnp.int32)),
     TypeError, "Guided Backprop needs a ReLU network, and the model's program has no ReLU"),
    ("overlay: heatmap above 1", lambda e: xv.overlay(OK, np.full((32, 32), 2.0)),
     ValueError, "heatmap values must be in [0, 1]"),
    ("overlay: heatmap size", lambda e: xv.overlay(OK, np.zeros((16, 16))),
     ValueError, "got image (32, 32, 3) and heatmap (16, 16)"),
    ("overlay: alpha 1.5", lambda e: xv.overlay(OK, np.zeros((32, 32)), alpha=1.5),
     ValueError, "alpha must be a number in [0, 1]"),
    ("overlay: unknown colormap", lambda e: xv.overlay(OK, np.zeros((32, 32)), colormap="x"),
     ValueError, "colormap must be a matplotlib colormap name"),
    # ---------------------------------------------------------------- metrics
    ("deletion: one image without a batch axis", lambda e: e.curves(images=OK),
     ValueError, "images must be a batch (N, H, W, C) with N >= 1, got shape (32, 32, 3)"),
    ("deletion: maps of another size", lambda e: e.curves(maps=jnp.zeros((2, 16, 16))),
     ValueError, "maps must be (N, H, W) = (2, 32, 32) to match the images, got shape (2, 16, 16)"),
    ("deletion: one target for two images", lambda e: e.curves(targets=jnp.zeros((1,), int)),
     ValueError, "targets must be one class per image, shape (2,), got shape (1,)"),
    ("deletion: step 0", lambda e: e.curves(step=0),
     ValueError, "step must be an int >= 1, got 0"),
    ("deletion: fractional step", lambda e: e.curves(step=2.5),
     ValueError, "step must be an int >= 1, got 2.5"),
    ("deletion: unknown baseline", lambda e: e.curves(deletion_baseline="noise"),
     ValueError, "deletion_baseline must be one of ('zero', 'blur', 'mean'), got 'noise'"),
    ("insertion: unknown baseline", lambda e: e.curves(insertion_baseline=None),
     ValueError, "insertion_baseline must be one of ('zero', 'blur', 'mean'), got None"),
    ("deletion: batch 0", lambda e: e.curves(batch_size=0),
     ValueError, "batch_size must be an int >= 1, got 0"),
    ("baseline: unknown kind", lambda e: xm.baseline_images(e.images, "noise"),
     ValueError, "baseline must be one of ('zero', 'blur', 'mean'), got 'noise'"),
    ("blur: sigma 0", lambda e: xai_core.gaussian_blur(e.images, sigma=0),
     ValueError, "sigma must be a number > 0, got 0"),
    ("blur: even window", lambda e: xai_core.gaussian_blur(e.images, size=4),
     ValueError, "size must be odd, got 4"),
    ("random maps: 1-D shape", lambda e: xm.random_maps(jax.random.key(0), (32,)),
     ValueError, "shape must be a tuple (..., H, W) of positive ints, got (32,)"),
    ("spearman: shapes differ", lambda e: xm.spearman(jnp.zeros((2, 8, 8)), jnp.zeros((8, 8))),
     ValueError, "a and b must be maps (..., H, W) of the same shape, got (2, 8, 8) and (8, 8)"),
    ("spearman: not an array", lambda e: xm.spearman([[0.0]], jnp.zeros((1, 1))),
     TypeError, "a must be an array, got list"),
    ("ssim: maps smaller than the window", lambda e: xm.ssim(jnp.zeros((4, 4)), jnp.zeros((4, 4))),
     ValueError, "maps must be at least size x size = 7x7 for the SSIM window, got 4x4"),
    ("similarity: reference of another size",
     lambda e: xm.similarity(jnp.zeros((3, 2, 32, 32)), jnp.zeros((2, 16, 16))),
     ValueError, "got maps (3, 2, 32, 32) and reference (2, 16, 16)"),
    ("randomization: variables without params",
     lambda e: xm.randomization_levels(e.model, {"batch_stats": {}}),
     ValueError, "variables must be the model's variables, a dict with 'params'"),
    ("randomization: random params of another model",
     lambda e: xm.cascading_randomization(e.model, e.variables, {"Dense_0": {}}),
     ValueError, "random_variables must be a fresh initialisation of the same model"),
    ("random logit: one class", lambda e: xm.random_other_classes(jax.random.key(0),
                                                                 jnp.zeros(2, int), 1),
     ValueError, "num_classes must be an int >= 2, got 1"),
]


@pytest.mark.parametrize("call, error, fragment", [pytest.param(*case[1:], id=case[0])
                                                   for case in CASES])
def test_bad_input_is_refused_in_words(call, error, fragment, env, capsys):
    with pytest.raises(error) as info:
        call(env)
    # argparse prints its message and exits; everything else carries it in the exception.
    message = capsys.readouterr().err if error is SystemExit else str(info.value)
    assert fragment in message


def test_no_payload_ran(env):
    """The code-carrying pickles in the table never ran their payload."""
    for case in ("data: pickle with code", "train: checkpoint with code"):
        call, error, _ = next(c[1:] for c in CASES if c[0] == case)
        with pytest.raises(error):
            call(env)
    assert not (env.folder / "pwned").exists()
