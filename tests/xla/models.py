"""Small networks for the XLA equivalence tests."""

from torch import nn


class TinyEncoderHead(nn.Module):
    """Conv encoder + 2-layer projection on 12x12 inputs, no BatchNorm (per-replica statistics cannot
    differ). The 6x6 maps pool evenly to 2x2: an uneven adaptive pool falls back to the host in
    torch_xla, which executes the graph mid-step."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.head(self.encoder(x))
