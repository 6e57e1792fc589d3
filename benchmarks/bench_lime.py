"""Our LIME against the `lime` package, side by side in one run, on the shipped CNN.

    pip install -r benchmarks/requirements.txt   # lime (an optional peer)
    python benchmarks/bench_lime.py --num-images 100 --samples 1000
    python benchmarks/bench_lime.py --num-images 100 --samples 1000 --linear-model

Both explain the first --num-images test records for their predicted class with the
same superpixels (scikit-image SLIC, 64 segments asked, compactness 10), off segments
filled with their mean colour, 1,000 samples per image, lime's kernel (width 0.25 on
cosine distance) and its ridge surrogate (λ = 1). The `lime` package gets the same
jitted JAX model through its `classifier_fn` callback, which it calls on batches of
--lime-batch-size (default 10, lime's own default); ours runs batches of --batch-size.
Prints images per second of each, their ratio, and
how far the two maps agree (Spearman ρ of the segment coefficients per image; the two
draw different random patterns, so they agree only statistically).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import cifar10_data  # noqa: E402
import xai_cli as cli  # noqa: E402
import xai_surrogates as xs  # noqa: E402
import xai_visualizations as xv  # noqa: E402
from checkpoints import PRETRAINED, load_checkpoint  # noqa: E402


class Linear(nn.Module):
    """10 logits, each a linear function of the pixels."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def ours(model, variables, images, samples, batch_size, chunk, quiet):
    """Our LIME maps (N, H, W), `chunk` images per jitted call; and the seconds taken
    after compilation."""
    explain = jax.jit(lambda v, x, k: xv.explain("lime", model, v, x, None, k,
                                                 n_samples=samples, batch_size=batch_size).maps)
    key = jax.random.key(0)
    jax.block_until_ready(explain(variables, images[:chunk], key))  # compiles
    start = time.perf_counter()
    maps = [np.asarray(explain(variables, images[i:i + chunk], key))
            for i in tqdm(range(0, len(images), chunk), desc="ours", disable=quiet)]
    return np.concatenate(maps), time.perf_counter() - start


def theirs(model, variables, images, samples, batch_size, quiet):
    """The `lime` package's maps (N, H, W) through a callback to the same jitted model,
    and the seconds taken."""
    from lime import lime_image  # noqa: PLC0415

    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))

    def classifier_fn(batch):  # padded to one shape, so it compiles once
        n = len(batch)
        padded = np.concatenate([batch, np.repeat(batch[:1], batch_size - n, 0)]) \
            if n < batch_size else batch
        return np.asarray(forward(variables, jnp.asarray(padded, jnp.float32)))[:n]

    classifier_fn(np.asarray(images[:1]))  # compiles
    explainer = lime_image.LimeImageExplainer(random_state=0)
    segment = lambda image: xs.segment_numpy(image[None])[0]  # noqa: E731
    maps = []
    start = time.perf_counter()
    for image in tqdm(np.asarray(images, np.float64), desc="lime", disable=quiet):
        pred = int(np.argmax(classifier_fn(image[None])))
        explanation = explainer.explain_instance(
            image, classifier_fn, labels=(pred,), top_labels=None, hide_color=None,
            num_samples=samples, batch_size=batch_size, segmentation_fn=segment,
            random_seed=0)
        coef = dict(explanation.local_exp[pred])
        maps.append(np.vectorize(lambda s: coef.get(s, 0.0))(explanation.segments))
    return np.stack(maps), time.perf_counter() - start


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=cli.int_at_least(1), default=100)
    parser.add_argument("--samples", type=cli.int_at_least(2), default=1000)
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=256,
                        help="model inputs per call, ours (default: %(default)s)")
    parser.add_argument("--lime-batch-size", type=cli.int_at_least(1), default=10,
                        help="model inputs per call, lime's (default: %(default)s, lime's)")
    parser.add_argument("--chunk", type=cli.int_at_least(1), default=10,
                        help="images per call of ours (default: %(default)s)")
    parser.add_argument("--linear-model", action="store_true",
                        help="explain a linear model (random weights) instead of the CNN: "
                             "its forward pass costs next to nothing, so what is timed is "
                             "each library's own machinery")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    import scipy.stats  # noqa: PLC0415

    model, variables = load_checkpoint(PRETRAINED)
    if args.linear_model:
        model = Linear()
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    data = cifar10_data.load_cifar10(args.data_dir)
    images = jnp.asarray(data.test_images[:args.num_images], jnp.float32) / 255.0
    our_maps, our_s = ours(model, variables, images, args.samples, args.batch_size,
                           min(args.chunk, args.num_images), args.quiet)
    their_maps, their_s = theirs(model, variables, images, args.samples,
                                 args.lime_batch_size, args.quiet)
    segments = xs.segment_numpy(np.asarray(images))
    rho = []
    for n in range(args.num_images):
        labels = np.unique(segments[n])
        first = [np.flatnonzero(segments[n].ravel() == s)[0] for s in labels]
        a, b = our_maps[n].ravel()[first], their_maps[n].ravel()[first]
        rho.append(scipy.stats.spearmanr(a, b).statistic)
    n = args.num_images
    print(f"LIME, {n} test images x {args.samples} samples, "
          f"{'a linear model' if args.linear_model else 'the shipped CNN'}, "
          f"{cli.describe_device()}, batches of {args.batch_size} (ours) and "
          f"{args.lime_batch_size} (lime)")
    print(f"ours: {n / our_s:.2f} img/s ({our_s:.1f} s); lime: {n / their_s:.2f} img/s "
          f"({their_s:.1f} s); ours is {their_s / our_s:.2f}x faster")
    print(f"agreement: Spearman rho of the segment coefficients, median "
          f"{np.median(rho):.3f}, quartiles {np.percentile(rho, 25):.3f}-"
          f"{np.percentile(rho, 75):.3f}")


if __name__ == "__main__":
    main()
