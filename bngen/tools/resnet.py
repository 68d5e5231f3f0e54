"""A small ResNet-style CNN for the end-to-end benchmark (``bngen bench --model``).

Defined here rather than taken from torchvision (whose wheels need not match the CPU
torch installed): a 3x3 stem, three stages of one basic block each (two 3x3
convolutions with batch norm, a 1x1 projection with batch norm where the shape
changes), global average pooling and a linear classifier; every batch norm is a
``torch.nn.BatchNorm2d``.  Imports torch: used only by the benchmark.
"""

import dataclasses
from typing import Tuple

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Size:
    """The benchmark's input and model size."""

    batch: int
    image: int  # height = width of the input images
    widths: Tuple[int, int, int]  # channels of the three stages
    classes: int = 10


SIZES = {
    # CIFAR-like training on a CPU: 32 images of 32x32, 32/64/128 channels (stage 1
    # activations of 32x32x32x32 floats, 4 MB each)
    "realistic": Size(batch=32, image=32, widths=(32, 64, 128)),
    # a functional check that runs in seconds
    "tiny": Size(batch=4, image=8, widths=(4, 8, 8)),
}


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the (projected) input, then relu."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem, three stages (strides 1, 2, 2), average pooling, linear classifier."""

    def __init__(self, size: Size):
        super().__init__()
        w1, w2, w3 = size.widths
        self.stem = nn.Sequential(nn.Conv2d(3, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(w1, w1, 1), BasicBlock(w1, w2, 2), BasicBlock(w2, w3, 2))
        self.head = nn.Linear(w3, size.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))


def without_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with every ``torch.nn.BatchNorm2d`` replaced by an identity, in place: the
    benchmark's reference for what batch norm adds to a step."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            without_batch_norm(child)
    return model
