"""Our LRP against Zennit's on the same weights: the shipped CNN rebuilt in PyTorch.

    pip install -r benchmarks/requirements.txt   # torch and zennit (optional peers)
    python benchmarks/compare_zennit.py --num-images 100

The CNN's parameters are copied into an equivalent `torch.nn.Sequential` (conv → BN →
ReLU blocks, 2 × 2 max pooling, global average pooling, Dense → ReLU → Dense). Zennit
explains it with its composites of the same names, its `SequentialMergeBatchNorm`
canonizer, z^B's bounds (0 − mean)/std and (1 − mean)/std, and the output relevance our
LRP starts from: the predicted class's logit, one-hot. Zennit's model takes the
standardised image, so its relevance there is compared with ours at the image (our
standardisation passes relevance unchanged). It prints, per composite, the largest
difference relative to the largest |relevance|, the mean relevance sum over the
predicted logit, and both libraries' images per second, side by side in one run.
"""

import argparse
import importlib.metadata
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cifar10_data  # noqa: E402
import xai_cli as cli  # noqa: E402
import xai_visualizations as xv  # noqa: E402
from checkpoints import PRETRAINED, load_checkpoint  # noqa: E402
from cifar10_cnn_model import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

COMPOSITES = xv.xai_lrp.COMPOSITES


def import_zennit():
    """Zennit, without its torchvision glue: PyPI's torchvision need not match the CPU
    torch wheel (`operator torchvision::nms does not exist`), and the rules need none."""
    if "torchvision" not in sys.modules:
        fake = types.ModuleType("torchvision")
        fake.models = types.ModuleType("torchvision.models")
        fake.models.resnet = types.ModuleType("torchvision.models.resnet")
        fake.models.resnet.Bottleneck = type("Bottleneck", (), {})
        fake.models.resnet.BasicBlock = type("BasicBlock", (), {})
        for name, module in (("torchvision", fake), ("torchvision.models", fake.models),
                             ("torchvision.models.resnet", fake.models.resnet)):
            sys.modules[name] = module
    import zennit.attribution  # noqa: PLC0415
    import zennit.canonizers  # noqa: PLC0415
    import zennit.composites  # noqa: PLC0415
    import zennit.rules  # noqa: PLC0415
    import zennit.types  # noqa: PLC0415

    return zennit


def zennit_relevance(zennit, net, composite, images):
    """Zennit's relevance at the standardised NHWC `images`, started at the predicted
    logit; NHWC numpy."""
    import torch  # noqa: PLC0415

    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()) - mean) / std
    canonizers = [zennit.canonizers.SequentialMergeBatchNorm()]
    kinds = {"epsilon_gamma_box": lambda: zennit.composites.EpsilonGammaBox(
                 low=(0 - mean) / std, high=(1 - mean) / std, canonizers=canonizers),
             "epsilon_plus_flat": lambda: zennit.composites.EpsilonPlusFlat(
                 canonizers=canonizers),
             "epsilon_plus": lambda: zennit.composites.EpsilonPlus(canonizers=canonizers),
             "epsilon_alpha2_beta1": lambda: zennit.composites.EpsilonAlpha2Beta1(
                 canonizers=canonizers),
             "epsilon_alpha2_beta1_flat": lambda: zennit.composites.EpsilonAlpha2Beta1Flat(
                 canonizers=canonizers),
             "epsilon": lambda: zennit.composites.LayerMapComposite(
                 zennit.composites.layer_map_base() + [
                     (zennit.types.Linear, zennit.rules.Epsilon(1e-6))],
                 canonizers=canonizers)}
    with zennit.attribution.Gradient(net, kinds[composite]()) as attributor:
        out, relevance = attributor(
            x, lambda logits: torch.nn.functional.one_hot(
                logits.argmax(1), logits.shape[1]) * logits)
    return relevance.detach().numpy().transpose(0, 2, 3, 1), out.detach().numpy()


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=cli.int_at_least(1), default=100)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415

    zennit = import_zennit()
    torch.set_num_threads(max(1, len(jax.devices("cpu")) and __import__("os").cpu_count()))
    model, variables = load_checkpoint(PRETRAINED)
    data = cifar10_data.load_cifar10(args.data_dir)
    images = jnp.asarray(data.test_images[:args.num_images], jnp.float32) / 255.0
    from torch_twin import torch_cnn  # noqa: PLC0415 (torch is a peer, imported late)

    net = torch_cnn(variables)
    print(f"{args.num_images} test images, the shipped CNN, {cli.describe_device()}, "
          f"torch {torch.__version__}, zennit {importlib.metadata.version('zennit')}")
    print("| composite | max \\|ours − Zennit's\\| / max \\|Zennit's\\| | Pearson r per image "
          "(min, mean) | Σ R / logit (ours, Zennit's) | `LRP` object vs `xv.explain` (max "
          "difference / max \\|map\\|) | ours img/s | Zennit's img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in COMPOSITES:
        explain = jax.jit(lambda v, x, name=name: xv.explain("lrp", model, v, x, None,
                                                              composite=name))
        ours = jax.block_until_ready(explain(variables, images))  # compiles
        start = time.perf_counter()
        ours = jax.block_until_ready(explain(variables, images))
        ours_s = time.perf_counter() - start
        raw = jax.jit(lambda v, x, name=name: xv.METHODS["lrp"].fn(
            model, v, x, jnp.full((len(x),), -1, jnp.int32), composite=name))(variables, images)
        start = time.perf_counter()
        theirs, logits = zennit_relevance(zennit, net, name, images)
        theirs_s = time.perf_counter() - start
        ours_raw = np.asarray(raw.maps)
        diff = np.max(np.abs(ours_raw - theirs)) / np.max(np.abs(theirs))
        logit = np.max(logits, axis=1)
        r = [np.corrcoef(a.sum(-1).ravel(), b.sum(-1).ravel())[0, 1]
             for a, b in zip(ours_raw, theirs)]
        # the class path (variables as arguments of its jitted function) against the
        # plain call with concrete variables, as a user runs each
        objects = xv.LRP(model, composite=name).explain(
            variables["params"], variables["batch_stats"], images, normalize=False)[0]
        plain = np.asarray(xv.explain("lrp", model, variables, images, composite=name).maps)
        path = np.max(np.abs(objects - plain)) / np.max(np.abs(plain))
        print(f"| {name} | {diff:.2e} | {min(r):.4f}, {np.mean(r):.4f} | "
              f"{np.mean(ours_raw.sum((1, 2, 3)) / logit):.3f}, "
              f"{np.mean(theirs.sum((1, 2, 3)) / logit):.3f} | {path:.1e} | "
              f"{args.num_images / ours_s:.0f} | {args.num_images / theirs_s:.0f} |")


if __name__ == "__main__":
    main()
