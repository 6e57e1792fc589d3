"""ROAD's noisy linear imputation: ours (`xai_metrics.road_impute`, all images' systems
solved at once by conjugate gradients under jit and vmap) against pytorch-grad-cam's
`NoisyLinearImputer` (one SciPy sparse solve per image), side by side in one run.

    pip install -r benchmarks/requirements.txt     # torch and grad-cam, in a separate venv
    python benchmarks/bench_road.py [--num-images 1000] [--peer-images 200] [--fraction 0.5]

The masks remove the `--fraction` most relevant pixels of the shipped CNN's Grad-CAM maps
of the first test records (ROAD's MoRF order). Only the imputation is timed, on both
sides: the model's forward pass is a different framework's there. Ours runs in chunks of
--chunk images after a compiling warm-up; the peer runs image by image on the first
--peer-images images (it is slow), and the ratio compares images per second, each side's
best of --repeats runs. With the noise off, both imputations of the peer's images are
compared.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import cifar10_data  # noqa: E402
import xai_cli as cli  # noqa: E402
import xai_core  # noqa: E402
import xai_metrics as xm  # noqa: E402
import xai_visualizations as xv  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402


def masks_of(checkpoint, images, fraction, chunk):
    """(N, H, W) bool: the `fraction` most relevant pixels of each Grad-CAM map."""
    model, variables = load_checkpoint(checkpoint)
    explain = jax.jit(lambda x: xv.explain("gradcam", model, variables, x).maps)
    maps = xai_core.map_batches(explain, [images], chunk)
    n, h, w = maps.shape
    return np.asarray(xm.pixel_ranks(jnp.asarray(maps)) < round(fraction * h * w))


def best_of(repeats, run):
    """(the last output, the least seconds of `repeats` runs of `run()`)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return out, min(times)


def time_ours(images, removed, chunk, noise, repeats=1):
    impute = jax.jit(lambda x, m: xm.road_impute(x, m, jax.random.key(0), noise=noise))
    jax.block_until_ready(impute(images[:chunk], removed[:chunk]))  # compiles
    return best_of(repeats, lambda: xai_core.map_batches(impute, [images, removed], chunk))


def peer_imputer():
    """pytorch-grad-cam's `NoisyLinearImputer`, imported without the package's
    `__init__`: that imports torchvision, and PyPI's torchvision need not match the CPU
    torch wheel (`operator torchvision::nms does not exist`). The imputer needs neither."""
    import importlib.util  # noqa: PLC0415
    import types  # noqa: PLC0415

    if "pytorch_grad_cam" not in sys.modules:
        spec = importlib.util.find_spec("pytorch_grad_cam")
        package = types.ModuleType("pytorch_grad_cam")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["pytorch_grad_cam"] = package
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer  # noqa: PLC0415
    return NoisyLinearImputer


def time_peer(images, removed, noise, quiet, repeats=1):
    import torch  # noqa: PLC0415 (a benchmark-only peer)

    NoisyLinearImputer = peer_imputer()

    imputer = NoisyLinearImputer(noise=noise)

    def run():
        out = []
        for image, mask in tqdm(zip(images, removed), total=len(images), desc="grad-cam",
                                disable=quiet, leave=False):
            # grad-cam's mask is 1 where a pixel is kept and 0 where it is imputed
            filled = imputer(torch.from_numpy(image.transpose(2, 0, 1).copy()),
                             torch.from_numpy((~mask).astype(np.float32)))
            out.append(filled.numpy().transpose(1, 2, 0))
        return np.stack(out)

    return best_of(repeats, run)


def run(args):
    data = cifar10_data.load_cifar10(args.data_dir)
    images = np.asarray(data.test_images[:args.num_images], np.float32) / 255.0
    removed = masks_of(args.checkpoint, images, args.fraction, args.chunk)
    ours, ours_s = time_ours(images, removed, args.chunk, args.noise, args.repeats)
    p = min(args.peer_images, len(images))
    peer, peer_s = time_peer(images[:p], removed[:p], args.noise, args.quiet, args.repeats)
    exact_ours, _ = time_ours(images[:p], removed[:p], min(args.chunk, p), 0.0)
    exact_peer, _ = time_peer(images[:p], removed[:p], 0.0, True)
    ours_rate, peer_rate = len(images) / ours_s, p / peer_s
    print(f"ROAD imputation, {args.fraction:.0%} of the pixels removed (MoRF of Grad-CAM), "
          f"noise {args.noise}; {cli.describe_device()}")
    print(f"  best of {args.repeats} runs each")
    print(f"  ours ({len(images)} images, chunks of {args.chunk}): {ours_s:.2f} s, "
          f"{ours_rate:,.0f} images/s")
    print(f"  pytorch-grad-cam NoisyLinearImputer ({p} images, one by one): {peer_s:.2f} s, "
          f"{peer_rate:,.1f} images/s")
    print(f"  ratio: {ours_rate / peer_rate:,.1f}x")
    print(f"  noise off, max |ours - grad-cam| over {p} images: "
          f"{np.abs(exact_ours - exact_peer).max():.2e}")
    return ours, peer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="pretrained/cifar10_cnn.pkl")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-images", type=cli.int_at_least(1), default=1000)
    parser.add_argument("--peer-images", type=cli.int_at_least(1), default=200)
    parser.add_argument("--chunk", type=cli.int_at_least(1), default=100)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=3)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction must be in (0, 1), got {args.fraction}")
    return args


@cli.entry_point
def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
