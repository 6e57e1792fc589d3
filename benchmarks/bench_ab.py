"""The seed's explainers of this checkout against another checkout's, in one process.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab.py --before /tmp/before [--repeats 30]

Loads `cifar10_cnn_model` and `xai_visualizations` from both folders as separate modules,
builds the width-64 CNN of each on the same random weights, and times the public
`GradCAM` and `SaliencyMap.compute_saliency` (batch 64 and one image) and
`compute_smooth_saliency` (50 samples, one image) of both, round-robin after a compiling
call, so that the machine's drift falls on both alike. Prints the median of each and the
ratio after / before (above 1: this checkout is faster).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import xai_cli as cli  # noqa: E402
from bench_xai import time_round_robin  # noqa: E402


def load(folder, name, alias):
    """Module `name` from `folder`, registered as `alias` (its own copy)."""
    spec = importlib.util.spec_from_file_location(alias, Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def calls(model_module, xv, images, tag):
    """{name: call} of the seed's explainers of one checkout."""
    model = model_module.CIFAR10CNN()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    gradcam, saliency = xv.GradCAM(model, target_layer="conv3"), xv.SaliencyMap(model)
    return {
        f"{tag} GradCAM, batch 64": lambda: gradcam.compute_gradcam(params, stats, images),
        f"{tag} GradCAM, one image": lambda: gradcam.compute_gradcam(params, stats, images[0]),
        f"{tag} saliency, batch 64": lambda: saliency.compute_saliency(params, stats, images),
        f"{tag} saliency, one image": lambda: saliency.compute_saliency(params, stats,
                                                                         images[0]),
        f"{tag} SmoothGrad-50, one image": lambda: saliency.compute_smooth_saliency(
            params, stats, images[0], n_samples=50),
    }


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the other checkout's folder")
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=30)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.before) / "xai_visualizations.py").is_file():
        raise FileNotFoundError(f"--before {args.before!r} holds no xai_visualizations.py")

    images = jax.random.uniform(jax.random.key(1), (64, 32, 32, 3))
    before_model = load(args.before, "cifar10_cnn_model", "cifar10_cnn_model")
    before = calls(before_model, load(args.before, "xai_visualizations", "xv_before"),
                   images, "before")
    for name in ("cifar10_cnn_model", "xai_visualizations"):
        sys.modules.pop(name, None)
    after_model = load(ROOT, "cifar10_cnn_model", "cifar10_cnn_model")
    after = calls(after_model, load(ROOT, "xai_visualizations", "xai_visualizations"),
                  images, "after")
    _, seconds = time_round_robin({**before, **after}, args.repeats, args.quiet)
    print(f"device: {cli.describe_device()}; median of {args.repeats} interleaved rounds")
    print("| call | before, ms | after, ms | after / before speed |")
    print("| --- | --- | --- | --- |")
    for name in before:
        what = name.removeprefix("before ")
        b, a = seconds[name], seconds["after " + what]
        print(f"| {what} | {1000 * b:.2f} | {1000 * a:.2f} | {b / a:.3f}× |")


if __name__ == "__main__":
    main()
