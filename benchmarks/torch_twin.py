"""The shipped CIFAR10CNN rebuilt in PyTorch from its variables, for the side-by-side
benchmarks with Captum and Zennit. Imports numpy and torch only, so a peer's process
times no JAX import."""

import numpy as np
import torch


def torch_cnn(variables):
    """The CIFAR10CNN of `variables` as a torch.nn.Sequential on standardised NCHW images:
    conv → BN → ReLU blocks (as many convs as each block's params hold), 2 × 2 max
    pooling between and after them, global average pooling, Dense → ReLU → Dense."""
    params, stats = variables["params"], variables["batch_stats"]
    layers = []
    blocks = sorted(k for k in params if k.startswith("block"))
    for b, name in enumerate(blocks):
        block, block_stats = params[name], stats[name]
        if b:
            layers.append(torch.nn.MaxPool2d(2))
        for i in range(sum(k.startswith("Conv_") for k in block)):
            kernel = np.asarray(block[f"Conv_{i}"]["kernel"])  # (kh, kw, in, out)
            conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1, bias=False)
            conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            bn = torch.nn.BatchNorm2d(kernel.shape[3], eps=1e-5)
            bn.weight.data = torch.from_numpy(np.asarray(block[f"BatchNorm_{i}"]["scale"]))
            bn.bias.data = torch.from_numpy(np.asarray(block[f"BatchNorm_{i}"]["bias"]))
            bn.running_mean.data = torch.from_numpy(
                np.asarray(block_stats[f"BatchNorm_{i}"]["mean"]))
            bn.running_var.data = torch.from_numpy(
                np.asarray(block_stats[f"BatchNorm_{i}"]["var"]))
            layers += [conv, bn, torch.nn.ReLU()]
    layers += [torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    for i in range(2):
        dense = params["head"][f"Dense_{i}"]
        kernel = np.asarray(dense["kernel"])
        linear = torch.nn.Linear(*kernel.shape)
        linear.weight.data = torch.from_numpy(kernel.T.copy())
        linear.bias.data = torch.from_numpy(np.asarray(dense["bias"]))
        layers += [linear, torch.nn.ReLU()] if i == 0 else [linear]
    return torch.nn.Sequential(*layers).eval()


class Standardize(torch.nn.Module):
    """(x − mean) / std per channel of [0, 1] NCHW images."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def forward(self, x):
        return (x - self.mean) / self.std


def torch_model(variables, mean, std):
    """The CNN on [0, 1] NCHW images: its standardisation, then `torch_cnn`."""
    return torch.nn.Sequential(Standardize(mean, std), torch_cnn(variables)).eval()
