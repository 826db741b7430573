"""SimSiam: a Siamese network with a predictor and a stop-gradient, no negatives, no EMA.

Chen, He. "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv:2011.10566).

    z = h(f(x))     encoder + 3-layer projection MLP (BN on every layer, incl. the output)
    p = q(z)        2-layer bottleneck predictor (hidden width ``predictor_hidden_dim``)
    L = -cos(p_1, sg(z_2)) / 2 - cos(p_2, sg(z_1)) / 2        (``NegativeCosineLoss``)

Per-sample loss, nothing to gather: under any strategy N ranks x b equal one process on N x b
once BatchNorm is global (``trainer.sync_batchnorm``); with local BN each rank normalises its own
rows, as in the paper's multi-GPU runs.

Arguments follow pl_bolts' ``SimSiam``; world size and batch size come from the trainer and stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from scale_ssl.data import SimCLRViews
from scale_ssl.losses import NegativeCosineLoss
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import ProjectionHead, build_encoder
from scale_ssl.optim import exclude_bn_bias_groups
from scale_ssl.trainer import SSLModule


class SimSiam(SSLModule):
    """SimSiam with a torchvision ResNet encoder.

    Args:
        arch / in_channels / first_conv / maxpool1 / encoder_options: the encoder (``build_encoder``: a
            ResNet, or a ViT ``vit_<size>_<patch>`` with ``encoder_options`` image_size/drop_path_rate/pool).
        hidden_mlp / feat_dim: projection MLP width and output size (paper: 2048 / 2048).
        predictor_hidden_dim: predictor bottleneck (paper: 512).
        optimizer / learning_rate / momentum / weight_decay: SGD, lr = 0.05 x batch / 256, 0.9,
            1e-4 (paper), under a per-step warmup-cosine schedule (``warmup_epochs`` /
            ``warmup_steps``, ``start_lr``, ``final_lr``).
        exclude_bn_bias: no weight decay on biases and BN parameters.
        max_epochs: accepted for pl_bolts configs; the schedule spans the trainer's steps.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_channels: int = 3,
        first_conv: bool = True,
        maxpool1: bool = True,
        hidden_mlp: int = 2048,
        feat_dim: int = 2048,
        predictor_hidden_dim: int = 512,
        optimizer: str = "sgd",
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        exclude_bn_bias: bool = False,
        warmup_epochs: float = 0,
        warmup_steps: int | None = None,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        max_epochs: int = 100,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_name("SimSiam", optimizer)
        check_non_negative("SimSiam", learning_rate=learning_rate, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, start_lr=start_lr, final_lr=final_lr)
        self.encoder, self.feature_dim = build_encoder(arch, in_channels=in_channels, first_conv=first_conv,
                                                       maxpool1=maxpool1, options=encoder_options, owner="SimSiam")
        self.projector = ProjectionHead(self.feature_dim, hidden_mlp, feat_dim, num_layers=3, last_bn=True)
        self.predictor = ProjectionHead(feat_dim, predictor_hidden_dim, feat_dim, num_layers=2)
        self.criterion = NegativeCosineLoss()

    @staticmethod
    def exclude_from_weight_decay(
        named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float, skip_list: tuple[str, ...] = ("bias", "bn")
    ) -> list[dict]:
        """pl_bolts' helper: two parameter groups, the second (1-D tensors and names containing an
        entry of ``skip_list``) without weight decay. See ``scale_ssl.optim.exclude_bn_bias_groups``."""
        return exclude_bn_bias_groups(named_params, weight_decay, skip_list=skip_list)

    @classmethod
    def train_transform(cls, data):
        """Two views with SimCLR-style augmentation (paper, sec. 4: the same as MoCo v2)."""
        return SimCLRViews.from_data_config(data, "SimSiam")

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        return {"negatives_per_anchor": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features f(x): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def training_step(self, batch, batch_idx: int):
        (x1, x2), _labels = batch
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        p = self.predictor(z)
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        return {"p1": p1, "p2": p2, "z1": z1, "z2": z2}

    def training_step_end(self, outputs):
        # The mean over the whole batch (every dp part), not a mean of part means.
        p1, p2, z1, z2 = outputs["p1"], outputs["p2"], outputs["z1"], outputs["z2"]
        loss = self.criterion(p1, p2, z1, z2)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        # Collapse monitor (paper, fig. 2): the per-dimension std of normalised z, ~1/sqrt(d) when healthy.
        self.log("train/z_std", torch.nn.functional.normalize(z1.detach().float(), dim=1).std(dim=0).mean())
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], exclude_bn_bias=hp["exclude_bn_bias"],
            warmup_epochs=hp["warmup_epochs"], warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"],
            final_lr=hp["final_lr"],
        )
