"""AMDIM: mutual information between feature maps of two views, at several scales.

Bachman, Hjelm, Buchwalter. "Learning Representations by Maximizing Mutual Information Across
Views", NeurIPS 2019 (arXiv:1906.00910).

    (m0, m1, m2) = f(x)     encoder: embedded maps at 1x1, 5x5, 7x7 (``AMDIMEncoder``)
    L = FeatureMapContrastiveTask(f(x1), f(x2))   NCE between the maps named by the comparisons
                            ("01, 02, 11" = 1->5, 1->7, 5->5 as in the paper), both directions,
                            soft-clipped scores (``tclip``) + score regulariser; negatives are the
                            maps of every other image of the *global* batch.

Arguments follow pl_bolts' ``AMDIM``; the encoder may also be a torchvision ResNet name (maps from
layer3/layer4, see ``ResNetFeatureMaps``) or any ``nn.Module`` with ``forward(x) -> (N, D)``
features and ``feature_maps(x) -> tuple of (N, E, h, w)`` maps. World size and batch size come
from the trainer and the data stream.
"""

from __future__ import annotations

import torch
from torch import nn

from scale_ssl.data import SimCLRViews
from scale_ssl.losses import FeatureMapContrastiveTask
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import RESNET_ARCHITECTURES, is_vit_arch
from scale_ssl.models.amdim_encoder import AMDIMEncoder
from scale_ssl.models.feature_map_resnet import ResNetFeatureMaps
from scale_ssl.trainer import SSLModule


def check_feature_map_encoder(owner: str, encoder: nn.Module) -> None:
    if not callable(getattr(encoder, "feature_maps", None)):
        raise TypeError(
            f"{owner}: the encoder module {type(encoder).__name__} has no feature_maps(x) method; give it "
            "forward(x) -> (N, D) features and feature_maps(x) -> a tuple of (N, E, h, w) maps"
        )


def build_contrastive_task(owner: str, contrastive_task, tclip: float, num_maps: int) -> nn.Module:
    """A comparisons string -> ``FeatureMapContrastiveTask``; a task object is used as given.
    Either way, a comparison naming a map the encoder does not produce is an error now."""
    if isinstance(contrastive_task, str):
        task = FeatureMapContrastiveTask(contrastive_task, tclip=tclip, bidirectional=True)
    elif isinstance(contrastive_task, nn.Module):
        task = contrastive_task
    else:
        raise TypeError(
            f"{owner}: contrastive_task must be a comparisons string such as '01, 02, 11' or a task module "
            f"(FeatureMapContrastiveTask(...)), got {contrastive_task!r}"
        )
    if isinstance(task, FeatureMapContrastiveTask):
        task.check_num_maps(num_maps, owner=owner)
    return task


def drop_module_hparams(hparams: dict, *names: str) -> None:
    """Module objects do not belong in a checkpoint's hyper-parameters (checkpoints are read with
    ``weights_only=True``): keep only names, and pass the objects again to ``load_from_checkpoint``."""
    for name in names:
        if isinstance(hparams.get(name), nn.Module):
            del hparams[name]


class AMDIM(SSLModule):
    """AMDIM (see the module docstring).

    Args:
        encoder: ``"amdim_encoder"``, a ResNet name (``resnet18``, ...), or an ``nn.Module``.
        contrastive_task: comparisons string (``"01, 02, 11"``) or a task module.
        image_channels / image_height: input images (square), e.g. 1 / 28 for Fashion-MNIST.
        encoder_feature_dim / embedding_fx_dim / conv_block_depth / use_bn: the AMDIM encoder
            (width, embedding width of the maps, 1x1 residual blocks at 7x7, BatchNorm).
        tclip: soft-clip bound of the NCE scores (pl_bolts: 20) when the task is a string.
        optimizer / learning_rate / weight_decay / warmup / start_lr / final_lr: the shared
            warmup-cosine recipe (AMDIM: Adam, lr 2e-4).
        first_conv / maxpool1: stem of a ResNet encoder (False/False for 28-32 px images).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "amdim_encoder",
        contrastive_task: str | nn.Module = "01, 02, 11",
        image_channels: int = 3,
        image_height: int = 32,
        encoder_feature_dim: int = 320,
        embedding_fx_dim: int = 1280,
        conv_block_depth: int = 10,
        use_bn: bool = False,
        tclip: float = 20.0,
        optimizer: str = "adam",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        warmup_epochs: float = 0,
        warmup_steps: int | None = None,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        first_conv: bool = False,
        maxpool1: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        drop_module_hparams(self.hparams, "encoder", "contrastive_task")
        check_optimizer_name("AMDIM", optimizer)
        check_non_negative("AMDIM", learning_rate=learning_rate, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                           start_lr=start_lr, final_lr=final_lr)
        if isinstance(encoder, nn.Module):
            check_feature_map_encoder("AMDIM", encoder)
            self.encoder = encoder
        elif encoder == "amdim_encoder":
            self.encoder = AMDIMEncoder(image_channels, image_height, encoder_feature_dim, embedding_fx_dim,
                                        conv_block_depth, use_bn)
        elif encoder in RESNET_ARCHITECTURES:
            self.encoder = ResNetFeatureMaps(encoder, image_channels, embedding_fx_dim, first_conv=first_conv,
                                             maxpool1=maxpool1)
        elif is_vit_arch(encoder):
            raise ValueError(
                f"AMDIM: encoder={encoder!r} is a Vision Transformer, but AMDIM contrasts a convolutional encoder's "
                "feature maps at several spatial scales (its 1x1, 5x5 and 7x7 maps), which a ViT's one grid of patch "
                "tokens does not provide; use 'amdim_encoder' or a ResNet name (ViTs: simclr, moco, byol, simsiam, swav, dino)"
            )
        else:
            raise ValueError(
                f"AMDIM: encoder={encoder!r} is not known; use 'amdim_encoder', a ResNet name "
                f"({', '.join(RESNET_ARCHITECTURES)}) or an nn.Module with feature_maps(x)"
            )
        with torch.no_grad():
            probe = torch.zeros(2, image_channels, image_height, image_height)
            was_training = self.encoder.training
            self.encoder.eval()
            self.num_maps = len(self.encoder.feature_maps(probe))
            self.encoder.train(was_training)
        self.contrastive_task = build_contrastive_task("AMDIM", contrastive_task, tclip, self.num_maps)

    @classmethod
    def train_transform(cls, data):
        """Two augmented views (random resized crop, flip, colour jitter; the paper's augmentation
        is of this family)."""
        return SimCLRViews.from_data_config(data, "AMDIM")

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        # Each anchor is scored against every location of the other B - 1 images' maps.
        return {"negatives_per_anchor": global_batch_size - 1}

    def setup(self, stage: str) -> None:
        if hasattr(self.contrastive_task, "collective"):
            self.contrastive_task.collective = self.collective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features: what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def training_step(self, batch, batch_idx: int):
        (x1, x2), _labels = batch
        maps = self.encoder.feature_maps(torch.cat([x1, x2]))
        halves = [m.chunk(2) for m in maps]
        return {"maps1": tuple(h[0] for h in halves), "maps2": tuple(h[1] for h in halves)}

    def training_step_end(self, outputs):
        # Under strategy=dp this sees every part's maps: the negatives are the whole batch's.
        loss = self.contrastive_task(outputs["maps1"], outputs["maps2"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in getattr(self.contrastive_task, "last_terms", {}).items():
            self.log(f"train/{name}", value, sync_dist=True)
        self.log("train/negatives_per_anchor", outputs["maps1"][0].shape[0] * self.collective.world_size - 1)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], warmup_epochs=hp["warmup_epochs"],
            warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"], final_lr=hp["final_lr"],
        )
