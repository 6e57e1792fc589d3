"""Every method's raw maps on the shipped checkpoint, saved or compared with a saved run.

    python benchmarks/compare_maps.py --save xai_results/maps_before.npz
    python benchmarks/compare_maps.py --against xai_results/maps_before.npz

Explains the first --num-images test records (the exact ones) for their predicted class
with every method of `xai_visualizations.METHODS` that fits the model at its default
options (key 0), LRP with each composite, and the seed's `GradCAM(model,
target_layer='conv3')`. `--against` prints, per method, the largest absolute difference from the saved maps and that difference relative to the
largest |value| of the saved maps, and exits 1 when one exceeds --tolerance. This is how
a refactoring of the explainers shows that it changed no map.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import cifar10_data  # noqa: E402
import xai_cli as cli  # noqa: E402
import xai_visualizations as xv  # noqa: E402

try:  # where checkpoints are loaded from, before and after they got their own module
    from checkpoints import PRETRAINED, load_checkpoint  # noqa: E402
except ImportError:
    from train_cifar10 import PRETRAINED, load_checkpoint  # noqa: E402


def raw_maps(model, variables, images, quiet=False):
    """{method: raw (N, H, W) maps} for every method, and the seed class's GradCAM."""
    targets = jnp.full((len(images),), -1, jnp.int32)
    maps = {}
    for name in tqdm(list(xv.METHODS), desc="methods", disable=quiet):
        if xv.unsupported(name, model):  # e.g. attention rollout on a network without attention
            continue
        explain = jax.jit(lambda v, x, t, k, name=name: xv.explain(name, model, v, x, t, k))
        out = explain(variables, images, targets, jax.random.key(0))
        maps[name] = np.asarray(out.maps if hasattr(out, "maps") else out[0])
    for composite in xv.xai_lrp.COMPOSITES:  # every LRP composite, not only the default
        explain = jax.jit(lambda v, x, t, c=composite: xv.explain("lrp", model, v, x, t,
                                                                   composite=c))
        maps[f"lrp {composite}"] = np.asarray(explain(variables, images, targets).maps)
    gradcam = xv.GradCAM(model, target_layer="conv3")
    maps["GradCAM class"] = gradcam.compute_gradcam(
        variables["params"], variables["batch_stats"], images, normalize=False)[0]
    return maps


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", help="write the maps to this .npz")
    action.add_argument("--against", help="compare with the maps in this .npz")
    parser.add_argument("--num-images", type=cli.int_at_least(1), default=16)
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed absolute difference (default: %(default)s)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    model, variables = load_checkpoint(PRETRAINED)
    data = cifar10_data.load_cifar10(args.data_dir)
    images = data.test_images[:args.num_images] / np.float32(255)
    maps = raw_maps(model, variables, images, args.quiet)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.save, **maps)
        print(f"wrote {len(maps)} methods' maps for {len(images)} images to {args.save}")
        return
    saved = np.load(args.against)
    worst = 0.0
    print(f"| method | max |difference| | relative to max |map| | shape |")
    print("| --- | --- | --- | --- |")
    for name, now in maps.items():
        before = saved[name]
        if before.shape != now.shape:
            raise ValueError(f"{name}: shape {now.shape}, saved {before.shape}")
        diff = float(np.max(np.abs(now - before)))
        worst = max(worst, diff)
        print(f"| {name} | {diff:.3g} | {diff / max(float(np.max(np.abs(before))), 1e-30):.3g}"
              f" | {now.shape} |")
    if worst > args.tolerance:
        raise SystemExit(f"largest difference {worst:.3g} exceeds --tolerance {args.tolerance}")


if __name__ == "__main__":
    main()
