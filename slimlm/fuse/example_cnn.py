"""A small ResNet-style CNN with BatchNorm, the worked example of BatchNorm folding (tests and bench/bench_fuse.py).

Not a model slimlm trains or serves: it exists to show `fold_conv_bn_` / `fold_linear_bn_` on forward code with a
skip connection, functional ReLUs, and a Linear -> BatchNorm1d head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))): the basic block of ResNet-18/34 (no downsampling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, C, H, W]
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    """Stem (conv-bn-relu, stride 2) -> `blocks` residual blocks -> global average pool -> Linear-BN1d-ReLU
    -> Linear."""

    def __init__(self, channels: int = 32, blocks: int = 2, n_classes: int = 10, hidden: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.fc = nn.Linear(channels, hidden)
        self.bn_fc = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 3, H, W] -> logits [N, n_classes]
        h = self.blocks(self.stem(x)).mean(dim=(2, 3))  # [N, C]
        return self.head(F.relu(self.bn_fc(self.fc(h))))


@torch.no_grad()
def randomize_batchnorms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, as training would."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model
