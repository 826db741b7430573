"""BYOL: an online network predicts a slowly moving target network's projection of another view.

Grill, Strub, Altché, Tallec, Richemond, et al. "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning", NeurIPS 2020 (arXiv:2006.07733).

    online:  y = f(x),  z = g(y),  p = q(z)           encoder, projector, predictor (trained)
    target:  z' = g'(f'(x))                           EMA of the online encoder and projector
    L = mean_b [ (2 - 2 cos(p_1, sg(z'_2))) + (2 - 2 cos(p_2, sg(z'_1))) ]   (``BYOLLoss``)
    after every optimizer step: theta' <- tau_k theta' + (1 - tau_k) theta,
        tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2   (k: index of the step just taken, K: total steps)

The target is a submodule without gradients, so it is in the ``state_dict`` (hence in every
checkpoint) and resume is exact. The EMA runs in ``on_train_batch_end``, after the optimizer
step, on every rank alike: no strategy-specific code. It reads the optimizer's fp32 weights
(``master_weights``) and the target stays fp32 and whole (``ema_target_modules``) whatever the
engine's precision or ZeRO stage. The loss is per sample: nothing to gather.

Arguments follow pl_bolts' ``BYOL``; world size and batch size come from the trainer and stream.
"""

from __future__ import annotations

import torch

from scale_ssl.data import BYOLViews
from scale_ssl.losses import BYOLLoss
from scale_ssl.methods.ema import cosine_tau, ema_step, frozen_copy
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import ProjectionHead, build_encoder
from scale_ssl.trainer import SSLModule


class BYOL(SSLModule):
    """BYOL with a torchvision ResNet encoder.

    Args:
        learning_rate / weight_decay: LARS (paper: 0.2 x batch / 256, 1.5e-6) under a per-step
            warmup-cosine schedule (``warmup_epochs`` or ``warmup_steps``; ``final_lr``).
        base_encoder / in_channels / first_conv / maxpool1 / encoder_options: the encoder (``build_encoder``:
            a ResNet, or a ViT ``vit_<size>_<patch>`` with ``encoder_options`` image_size/drop_path_rate/pool).
        encoder_out_dim: the encoder's feature size (2048 for resnet50, 512 for resnet10/18/34);
            ``None`` takes it from ``base_encoder``; a mismatch is an error.
        projector_hidden_dim / projector_out_dim: projector and predictor MLP sizes (4096 / 256).
        initial_tau: tau_0 of the target EMA (0.996), raised to 1 with a cosine over training.
        optimizer / momentum / exclude_bn_bias: LARS with biases and BN excluded, as in the paper.
        max_epochs: accepted for pl_bolts configs; the schedules span the trainer's steps.
    """

    def __init__(
        self,
        learning_rate: float = 0.2,
        weight_decay: float = 1.5e-6,
        warmup_epochs: float = 10,
        max_epochs: int = 1000,
        base_encoder: str = "resnet50",
        encoder_out_dim: int | None = 2048,
        projector_hidden_dim: int = 4096,
        projector_out_dim: int = 256,
        initial_tau: float = 0.996,
        in_channels: int = 3,
        first_conv: bool = True,
        maxpool1: bool = True,
        optimizer: str = "lars",
        momentum: float = 0.9,
        exclude_bn_bias: bool = True,
        warmup_steps: int | None = None,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_name("BYOL", optimizer)
        check_non_negative("BYOL", learning_rate=learning_rate, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, start_lr=start_lr, final_lr=final_lr)
        if not 0 <= initial_tau <= 1:
            raise ValueError(f"BYOL: initial_tau must be in [0, 1] (paper: 0.996), got {initial_tau!r}")
        self.encoder, feature_dim = build_encoder(base_encoder, in_channels=in_channels, first_conv=first_conv,
                                                  maxpool1=maxpool1, options=encoder_options, owner="BYOL")
        if encoder_out_dim is not None and encoder_out_dim != feature_dim:
            raise ValueError(
                f"BYOL: encoder_out_dim={encoder_out_dim} but {base_encoder} outputs {feature_dim} features; "
                f"set model.encoder_out_dim to {feature_dim} or null"
            )
        self.feature_dim = feature_dim
        self.projector = ProjectionHead(feature_dim, projector_hidden_dim, projector_out_dim)
        self.predictor = ProjectionHead(projector_out_dim, projector_hidden_dim, projector_out_dim)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projector = frozen_copy(self.projector)
        self.criterion = BYOLLoss()
        self._ema_step = 0
        self.current_tau = float(initial_tau)

    @classmethod
    def train_transform(cls, data):
        """BYOL's two asymmetric views (paper, appendix B): blur p=1.0 / 0.1 (when
        ``data.gaussian_blur`` is on), solarisation p=0 / 0.2, jitter (0.4, 0.4, 0.2, 0.1) at
        ``data.jitter_strength`` 0.5."""
        return BYOLViews.from_data_config(data, "BYOL")

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        return {"negatives_per_anchor": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Online encoder features y = f(x): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def training_step(self, batch, batch_idx: int):
        (x1, x2), _labels = batch
        both = torch.cat([x1, x2])
        p1, p2 = self.predictor(self.projector(self.encoder(both))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_encoder(both)).chunk(2)
        return {"p1": p1, "p2": p2, "z1": z1, "z2": z2}

    def training_step_end(self, outputs):
        # The mean over the whole batch (every dp part), not a mean of part means.
        loss = self.criterion(outputs["p1"], outputs["p2"], outputs["z1"], outputs["z2"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/tau", self.current_tau)
        return loss

    def tau_for_step(self, step: int) -> float:
        """tau of the EMA that follows optimizer step ``step`` (0-based)."""
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 0
        return cosine_tau(step, total, self.hparams["initial_tau"])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (not per accumulated micro-batch), after it.
        if self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.current_tau = self.tau_for_step(self.global_step - 1)
            # On the fp32 values (DeepSpeed: the master copy and the target's fp32 copy).
            ema_step(self, self.target_encoder, self.encoder, self.current_tau)
            ema_step(self, self.target_projector, self.projector, self.current_tau)

    def ema_target_modules(self) -> list:
        return [self.target_encoder, self.target_projector]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_step = int(checkpoint.get("global_step", 0))
        if self._ema_step > 0 and self.trainer is not None:
            self.current_tau = self.tau_for_step(self._ema_step - 1)

    def configure_optimizers(self):
        hp = self.hparams
        # Only the online network trains; the target follows by EMA.
        online = [(n, p) for n, p in self.named_parameters() if not n.startswith("target_")]
        return warmup_cosine_optimizer(
            self, online, optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], exclude_bn_bias=hp["exclude_bn_bias"],
            warmup_epochs=hp["warmup_epochs"], warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"],
            final_lr=hp["final_lr"],
        )
