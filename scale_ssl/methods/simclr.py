"""SimCLR: contrastive learning of two augmented views with the global NT-Xent loss.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709).

    h = f(x)            encoder (ResNet, pooled features: what downstream tasks use)
    z = g(h)            projection MLP (discarded after pretraining)
    L = NT-Xent(z(x1), z(x2)) over the *global* batch: every view of every rank other than the
                        anchor and its positive is a negative (2B - 2 per anchor).

Arguments follow pl_bolts' ``SimCLR`` so configs and habits carry over, except that world size,
per-device batch and the number of samples come from the trainer and the data stream, never
from ``gpus``/``num_nodes``/``batch_size``/``num_samples`` arguments.
"""

from __future__ import annotations


import torch

from scale_ssl.data import SimCLRViews
from scale_ssl.losses import NTXentLoss
from scale_ssl.models import ProjectionHead, build_encoder
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.trainer import SSLModule



class SimCLR(SSLModule):
    """SimCLR with a torchvision ResNet encoder and a 2-layer projection head.

    Args:
        arch: torchvision ResNet name (``resnet18``, ``resnet50``, ...; ``resnet10`` for CPU demos), or a ViT
            ``vit_<size>_<patch>`` (``vit_b_16``, ``vit_s_16``, ``vit_mini_4``; see ``scale_ssl.models.vit``).
        encoder_options: extra encoder arguments (``build_encoder``): a ViT's ``image_size``,
            ``drop_path_rate`` and ``pool``.
        in_channels: 1 for grayscale images (built into the stem; no fake RGB), 3 for colour.
        first_conv / maxpool1: False/False is the small-image (CIFAR, 28-32 px) variant.
        hidden_mlp / feat_dim: projection head widths (paper: 2048 / 128).
        temperature: NT-Xent temperature (paper: 0.1 at batch 4096; 0.5 for CIFAR-sized runs).
        optimizer: ``lars`` (paper), ``sgd``, ``adam`` or ``adamw``.
        learning_rate / start_lr / final_lr: peak, warmup-start and final lr of the per-step linear
            warmup + cosine schedule. The paper's LARS rule is lr = 0.3 x global_batch / 256.
        warmup_epochs: warmup length in epochs of the training stream (may be fractional);
            ``warmup_steps`` overrides it with an exact count of optimizer steps.
        exclude_bn_bias: biases and norm weights get no weight decay and no LARS adaptation.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_channels: int = 3,
        first_conv: bool = True,
        maxpool1: bool = True,
        hidden_mlp: int = 2048,
        feat_dim: int = 128,
        temperature: float = 0.1,
        optimizer: str = "adam",
        learning_rate: float = 1e-3,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 10,
        warmup_steps: int | None = None,
        exclude_bn_bias: bool = False,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_name("SimCLR", optimizer)
        check_non_negative("SimCLR", learning_rate=learning_rate, start_lr=start_lr, final_lr=final_lr,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs)
        self.encoder, self.feature_dim = build_encoder(arch, in_channels=in_channels, first_conv=first_conv,
                                                       maxpool1=maxpool1, options=encoder_options, owner="SimCLR")
        self.projection = ProjectionHead(self.feature_dim, hidden_mlp, feat_dim)
        self.criterion = NTXentLoss(temperature)

    @classmethod
    def train_transform(cls, data):
        """Two independently augmented views per image (paper, appendix A)."""
        return SimCLRViews.from_data_config(data, "SimCLR")

    def setup(self, stage: str) -> None:
        # The loss gathers over the strategy's world (DDP group, XLA replicas, ...), never over
        # whatever group happens to be the process default.
        self.criterion.collective = self.collective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h = f(x): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def training_step(self, batch, batch_idx: int):
        (x1, x2), _labels = batch
        # One encoder pass over both views: BatchNorm sees all 2b images, as in the paper.
        z = self.projection(self.encoder(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return {"z1": z1, "z2": z2}

    def training_step_end(self, outputs):
        # The loss lives here so that under strategy=dp it sees every device's part of the batch;
        # under single/ddp/deepspeed/xla this is the same call on this rank's part.
        z1, z2 = outputs["z1"], outputs["z2"]
        loss = self.criterion(z1, z2)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        # Contract 1: report the negatives each anchor really sees (global, not per device).
        self.log("train/negatives_per_anchor", 2 * z1.shape[0] * self.collective.world_size - 2)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], exclude_bn_bias=hp["exclude_bn_bias"],
            warmup_epochs=hp["warmup_epochs"], warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"],
            final_lr=hp["final_lr"],
        )
