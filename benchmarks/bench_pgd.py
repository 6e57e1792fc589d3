"""Our PGD against Captum's on the same weights: the shipped CNN rebuilt in PyTorch.

    pip install -r benchmarks/requirements.txt   # torch and captum (optional peers)
    python benchmarks/bench_pgd.py --num-images 200

Both run L∞ PGD with the same settings (ε = 8/255, --steps steps of 2.5 ε / steps,
cross-entropy of the true label, no random start, so the two are the same algorithm and
should find the same images), on all the images in one batch, side by side in one run.
It prints each library's images per second (each step is a forward and a backward pass,
so this follows the convolution speed), the ratio, both robust accuracies and how far
the two adversarial batches differ.
"""

import argparse
import importlib.metadata
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import xai_attacks  # noqa: E402
import cifar10_data  # noqa: E402
import xai_cli as cli  # noqa: E402
from checkpoints import PRETRAINED, load_checkpoint  # noqa: E402
from cifar10_cnn_model import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=cli.int_at_least(1), default=200)
    parser.add_argument("--steps", type=cli.int_at_least(1), default=20)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415
    from captum.robust import PGD  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count())
    model, variables = load_checkpoint(PRETRAINED)
    data = cifar10_data.load_cifar10(args.data_dir)
    images = jnp.asarray(data.test_images[:args.num_images], jnp.float32) / 255.0
    labels = jnp.asarray(data.test_labels[:args.num_images], jnp.int32)
    eps = 8 / 255
    step = 2.5 * eps / args.steps
    run = lambda: jax.block_until_ready(xai_attacks.pgd(  # noqa: E731
        model, variables, images, labels, None, eps=eps, step_size=step, steps=args.steps,
        random_init=False))
    run()  # compiles the step
    start = time.perf_counter()
    ours = run()
    ours_s = time.perf_counter() - start

    from torch_twin import torch_model  # noqa: PLC0415 (torch is a peer)

    net = torch_model(variables, CIFAR10_MEAN, CIFAR10_STD)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    pgd = PGD(net, lower_bound=0.0, upper_bound=1.0)
    pgd.perturb(x[:2], radius=eps, step_size=step, step_num=1, target=y[:2])  # warm-up
    start = time.perf_counter()
    theirs = pgd.perturb(x, radius=eps, step_size=step, step_num=args.steps, target=y)
    theirs_s = time.perf_counter() - start

    f = jax.jit(lambda v, x: model.apply(v, x))
    ours_acc = float(jnp.mean(jnp.argmax(f(variables, ours), -1) == labels))
    with torch.no_grad():
        theirs_acc = float((net(theirs).argmax(1) == y).float().mean())
    theirs_nhwc = theirs.detach().numpy().transpose(0, 2, 3, 1)
    differ = np.mean(np.abs(np.asarray(ours) - theirs_nhwc) > 1e-4)
    print(f"{args.num_images} test images, the shipped CNN, PGD-{args.steps} at 8/255, "
          f"{cli.describe_device()}, torch {torch.__version__}, captum "
          f"{importlib.metadata.version('captum')}")
    print("| | ours (JAX) | Captum |")
    print("| --- | --- | --- |")
    print(f"| img/s | {args.num_images / ours_s:.1f} | {args.num_images / theirs_s:.1f} |")
    print(f"| seconds | {ours_s:.1f} | {theirs_s:.1f} |")
    print(f"| robust accuracy | {100 * ours_acc:.1f} % | {100 * theirs_acc:.1f} % |")
    print(f"ours / Captum speed: {theirs_s / ours_s:.2f}x; pixels differing by > 1e-4: "
          f"{100 * differ:.2f} %")


if __name__ == "__main__":
    main()
