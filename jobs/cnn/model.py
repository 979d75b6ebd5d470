"""A small ResNet on 8x8 digit images, in plain torch (no torchvision).

A stem convolution, ``blocks`` residual blocks (conv-BN-ReLU-conv-BN plus the input), global
average pooling and a linear head. The blocks are ``model.layers``: FSDP makes each its own
unit (parallel/fsdp.py), as it does a transformer's blocks.
"""

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(*[Residual(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().view(-1, 1, 8, 8)  # the digits rows: 64 pixels in [0, 1]
        x = self.layers(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))
