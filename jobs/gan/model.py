"""A small GAN on 8x8 digit images: an MLP generator (noise -> 64 pixels in [0, 1]) and an MLP
discriminator (64 pixels -> one logit), and the two losses of one training step."""

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    def __init__(self, noise: int = 16, hidden: int = 64):
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(noise, hidden), nn.ReLU(), nn.Linear(hidden, 64), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def d_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Real rows labelled 1, generated rows 0 (``fake`` detached: this loss trains D only)."""
    scores = discriminator(torch.cat([real, fake.detach()]))
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
    return F.binary_cross_entropy_with_logits(scores, labels)


def g_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The generator's (non-saturating) loss: its rows scored as real."""
    return F.binary_cross_entropy_with_logits(discriminator(fake), torch.ones(len(fake), 1))
