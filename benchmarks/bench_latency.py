"""What a REPL user waits for: the seed snippet's first maps, in fresh processes, side by
side with Captum on the same architecture and weights.

    pip install -r benchmarks/requirements.txt   # torch and captum (optional peers)
    python benchmarks/bench_latency.py --runs 3

Each run is a new Python process that times, from its first line:
- the seed snippet's first maps on one test image: GradCAM(model, 'conv3'), the
  saliency map and SmoothGrad with 50 samples, imports and checkpoint loading included;
- a second GradCAM object's first map (ours shares the first one's compiled program);
- one image in the steady state (the median of 30 calls of each of the three).
Ours runs with the compilation cache the library turns on in one call
(`xv.enable_compilation_cache(folder)`): cold, an empty folder each run; warm, a folder
that an earlier process filled. Captum (LayerGradCam at the last ReLU of block 3,
Saliency, NoiseTunnel's SmoothGrad with σ = 0.15 · (max − min)) explains the same
CNN rebuilt in PyTorch from the same checkpoint. Medians of the runs are printed.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = r'''
import time
start = time.perf_counter()
import sys, pickle, json
sys.path.insert(0, ROOT)
import numpy as np
import jax.numpy as jnp
import xai_visualizations as xv
from cifar10_cnn_model import CIFAR10CNN
from xai_visualizations import GradCAM, SaliencyMap
xv.enable_compilation_cache(CACHE)
with open(CHECKPOINT, 'rb') as f:
    checkpoint = pickle.load(f)
params, batch_stats = checkpoint['params'], checkpoint['batch_stats']
model = CIFAR10CNN(num_classes=10)
image = np.load(IMAGE)
gradcam = GradCAM(model, target_layer='conv3')
heatmap, pred_class, score = gradcam.compute_gradcam(params, batch_stats, image)
saliency = SaliencyMap(model)
saliency_map, _, _ = saliency.compute_saliency(params, batch_stats, image)
smooth, _, _ = saliency.compute_smooth_saliency(params, batch_stats, image, n_samples=50)
first = time.perf_counter() - start
t = time.perf_counter()
GradCAM(model, target_layer='conv3').compute_gradcam(params, batch_stats, image)
second = time.perf_counter() - t
steady = {"gradcam": median(lambda: gradcam.compute_gradcam(params, batch_stats, image)),
          "saliency": median(lambda: saliency.compute_saliency(params, batch_stats, image)),
          "smoothgrad": median(lambda: saliency.compute_smooth_saliency(
              params, batch_stats, image, n_samples=50))}
print(json.dumps({"first": first, "second": second, "steady": steady, "pred": pred_class}))
'''

CAPTUM = r'''
import time
start = time.perf_counter()
import pickle, json, sys
import numpy as np
import torch
from captum.attr import LayerGradCam, LayerAttribution, NoiseTunnel, Saliency
with open(CHECKPOINT, 'rb') as f:
    checkpoint = pickle.load(f)
params, stats = checkpoint['params'], checkpoint['batch_stats']

sys.path.insert(0, BENCHMARKS)
from torch_twin import Standardize, torch_cnn
body = torch_cnn({"params": params, "batch_stats": stats})
net = torch.nn.Sequential(Standardize(MEAN, STD), *body).eval()
conv3 = [m for m in net if isinstance(m, torch.nn.ReLU)][-2]  # block 3's last ReLU
x = torch.from_numpy(np.load(IMAGE).transpose(2, 0, 1)[None].copy())

def gradcam_map(explainer):
    with torch.no_grad():
        probs = torch.softmax(net(x), 1)
    pred = int(probs.argmax())
    cam = explainer.attribute(x, target=pred, relu_attributions=True)
    return LayerAttribution.interpolate(cam, (32, 32), "bilinear"), pred

def saliency_map(explainer):
    pred = int(net(x).argmax())
    return explainer.attribute(x, target=pred, abs=True).amax(1), pred

sigma = 0.15 * float(x.max() - x.min())
def smooth_map(tunnel):
    pred = int(net(x).argmax())
    return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=50, stdevs=sigma,
                            nt_samples_batch_size=50, target=pred, abs=True).amax(1), pred

gradcam = LayerGradCam(net, conv3)
_, pred_class = gradcam_map(gradcam)
saliency = Saliency(net)
saliency_map(saliency)
tunnel = NoiseTunnel(saliency)
smooth_map(tunnel)
first = time.perf_counter() - start
t = time.perf_counter()
gradcam_map(LayerGradCam(net, conv3))
second = time.perf_counter() - t
steady = {"gradcam": median(lambda: gradcam_map(gradcam)),
          "saliency": median(lambda: saliency_map(saliency)),
          "smoothgrad": median(lambda: smooth_map(tunnel))}
print(json.dumps({"first": first, "second": second, "steady": steady, "pred": pred_class}))
'''


# Both scripts end with this: the median of 30 calls of each explainer on one image.
STEADY = r'''
def median(fn):
    times = []
    for _ in range(30):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return float(np.median(times))
'''


def run(script, values):
    code = "".join(f"{name} = {value!r}\n" for name, value in values.items()) + script
    head, tail = code.split("steady = {", 1)
    code = head + STEADY + "steady = {" + tail
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"a run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--record", type=int, default=0, help="the test record explained")
    args = parser.parse_args(argv)
    import numpy as np  # noqa: PLC0415

    import cifar10_data  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import xai_cli as cli  # noqa: PLC0415
    from checkpoints import PRETRAINED  # noqa: PLC0415
    from cifar10_cnn_model import CIFAR10_MEAN, CIFAR10_STD  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="bench_latency_"))
    image = work / "image.npy"
    np.save(image, cifar10_data.load_cifar10().test_images[args.record] / np.float32(255))
    shared = {"ROOT": str(ROOT), "CHECKPOINT": str(PRETRAINED), "IMAGE": str(image)}
    rows = {"ours, cold cache": [], "ours, warm cache": [], "Captum": []}
    for r in range(args.runs):
        rows["ours, cold cache"].append(run(OURS, {**shared, "CACHE": str(work / f"cold{r}")}))
        rows["ours, warm cache"].append(run(OURS, {**shared, "CACHE": str(work / "cold0")}))
        rows["Captum"].append(run(CAPTUM, {**shared, "MEAN": CIFAR10_MEAN, "STD": CIFAR10_STD,
                                           "BENCHMARKS": str(ROOT / "benchmarks")}))
    import captum  # noqa: PLC0415

    print(f"the shipped CNN, test record {args.record}, {args.runs} fresh processes each "
          f"(medians), {cli.describe_device()}, torch {torch.__version__}, "
          f"captum {captum.__version__}")
    print("| | first Grad-CAM + saliency + SmoothGrad-50 maps (s) | a second GradCAM's "
          "first map (ms) | steady Grad-CAM / saliency / SmoothGrad-50, one image (ms) |")
    print("| --- | --- | --- | --- |")
    for name, runs in rows.items():
        steady = " / ".join(f"{median([r['steady'][k] for r in runs]) * 1e3:.1f}"
                            for k in ("gradcam", "saliency", "smoothgrad"))
        print(f"| {name} | {median([r['first'] for r in runs]):.2f} | "
              f"{median([r['second'] for r in runs]) * 1e3:.1f} | {steady} |")
    captum_first = median([r["first"] for r in rows["Captum"]])
    print(f"ratios to Captum's first maps: cold "
          f"{median([r['first'] for r in rows['ours, cold cache']]) / captum_first:.2f}, "
          f"warm {median([r['first'] for r in rows['ours, warm cache']]) / captum_first:.2f}; "
          f"predicted classes {sorted({r['pred'] for runs in rows.values() for r in runs})}")


if __name__ == "__main__":
    main()
