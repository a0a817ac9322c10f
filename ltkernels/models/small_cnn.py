"""Small CNN for the embedded 8×8 digits-LT default."""
from __future__ import annotations

import torch.nn as nn


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, bn: bool = True, in_channels: int = 1):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=not bn), norm(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=not bn), norm(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=not bn), norm(2 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = 2 * w

    def forward(self, x):
        return self.body(x)
