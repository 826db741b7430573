"""Small networks for the XLA equivalence tests."""

import torch
from torch import nn

from scale_ssl.losses import NTXentLoss
from scale_ssl.trainer import SSLModule


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


class TinyContrastiveModule(SSLModule):
    """TinyEncoderHead trained with the global NT-Xent through the Trainer (loss in
    ``training_step_end``, as every method): the XLA column of the strategy equivalence matrix."""

    def __init__(self, lr: float = 0.5):
        super().__init__()
        self.net = TinyEncoderHead()
        self.criterion = NTXentLoss(0.2)
        self.lr = lr

    def setup(self, stage):
        self.criterion.collective = self.collective

    def training_step(self, batch, batch_idx):
        (x1, x2), _ = batch
        return {"z1": self.net(x1), "z2": self.net(x2)}

    def training_step_end(self, outputs):
        loss = self.criterion(outputs["z1"], outputs["z2"])
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
