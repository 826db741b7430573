"""CPC v2: contrastive predictive coding over a grid of image patches.

Hénaff et al. "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020
(arXiv:1905.09272); Oord et al. 2018 (arXiv:1807.03748).

    z = f(patches(x))       every overlapping p x p patch encoded on its own -> (N, D, g, g) grid
    L = CPCTask(z)          InfoNCE: a causal context over the rows above predicts the patch
                            vectors k rows below; negatives are every patch of the global batch

The task is interchangeable (the seeds' mix-and-match): ``task="amdim"`` or
``contrastive_task=FeatureMapContrastiveTask("01, 11, 02")`` trains the same patch encoder with
AMDIM's NCE between two views' maps (0: the grid's mean, 1: the grid pooled to half its side,
2: the full grid). With the CPC task both augmented views are used as independent images (twice
the images, and so the negatives, per step).

``online_ft=True`` trains pl_bolts' online linear classifier (``SSLOnlineEvaluator``) on the
detached pooled features after every step; its head and optimizer are saved in the checkpoint.

Arguments follow pl_bolts' ``CPC_v2``; world size and batch size come from the trainer and stream.
"""

from __future__ import annotations

import torch
from torch import nn

from scale_ssl.data import SimCLRViews
from scale_ssl.data.patches import patch_grid_size
from scale_ssl.losses import CPCTask
from scale_ssl.methods.amdim import build_contrastive_task, drop_module_hparams
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import RESNET_ARCHITECTURES, build_resnet_encoder, is_vit_arch
from scale_ssl.probes.online_evaluator import SSLOnlineEvaluator
from scale_ssl.models.cpc_encoder import CPCEncoder, CPCPatchEncoder
from scale_ssl.trainer import SSLModule

TASKS = ("cpc", "amdim")
ONLINE_EVALUATOR_KEY = "cpc_v2_online_evaluator"


class CPCV2(SSLModule):
    """CPC v2 (see the module docstring).

    Args:
        encoder_name: ``"cpc_encoder"`` (``CPCPatchEncoder``, layer norm), a ResNet name (applied
            to every patch, small-image stem), or an ``nn.Module`` mapping (n, C, p, p) patches to
            (n, D) vectors.
        patch_size / patch_overlap: the patch grid; they must tile ``image_height``.
        online_ft: train an online linear classifier on the pooled features (``num_classes``).
        task: ``"cpc"`` or ``"amdim"`` (comparisons ``amdim_comparisons``), or a task module.
        contrastive_task: a task module; overrides ``task`` (``FeatureMapContrastiveTask(...)``
            for AMDIM's NCE between two views, anything with ``forward(grid)`` for a CPC-style one).
        image_channels / image_height: input images (square).
        encoder_width / encoder_depth: ``CPCPatchEncoder`` width (features are 2x) and blocks per stage.
        target_dim / embed_scale / steps_to_ignore / steps_to_predict / context_blocks: ``CPCTask``.
        amdim_comparisons / tclip: the AMDIM task built by ``task="amdim"``.
        optimizer / learning_rate / weight_decay / warmup / start_lr / final_lr: the shared
            warmup-cosine recipe (pl_bolts: Adam, lr 1e-4).
    """

    def __init__(
        self,
        encoder_name: str | nn.Module = "cpc_encoder",
        patch_size: int = 8,
        patch_overlap: int = 4,
        online_ft: bool = True,
        task: str | nn.Module = "cpc",
        contrastive_task: nn.Module | None = None,
        num_classes: int = 10,
        image_channels: int = 3,
        image_height: int = 32,
        encoder_width: int = 64,
        encoder_depth: int = 2,
        target_dim: int = 64,
        embed_scale: float = 0.1,
        steps_to_ignore: int = 2,
        steps_to_predict: int = 3,
        context_blocks: int = 2,
        amdim_comparisons: str = "01, 02, 11",
        tclip: float = 10.0,
        optimizer: str = "adam",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        warmup_epochs: float = 0,
        warmup_steps: int | None = None,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        drop_module_hparams(self.hparams, "encoder_name", "task", "contrastive_task")
        check_optimizer_name("CPCV2", optimizer)
        check_non_negative("CPCV2", learning_rate=learning_rate, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                           start_lr=start_lr, final_lr=final_lr)
        grid = patch_grid_size(image_height, patch_size, patch_overlap, owner="CPCV2")
        patch_encoder, feature_dim = self._patch_encoder(encoder_name, image_channels, patch_size, encoder_width, encoder_depth)
        self.encoder = CPCEncoder(patch_encoder, feature_dim, image_height, patch_size, patch_overlap)

        chosen = contrastive_task if contrastive_task is not None else task
        if isinstance(chosen, str):
            if chosen not in TASKS:
                raise ValueError(f"CPCV2: task={chosen!r} is not known; use one of {TASKS} or pass contrastive_task=<module>")
            if chosen == "cpc":
                chosen = CPCTask(feature_dim, target_dim=target_dim, embed_scale=embed_scale, steps_to_ignore=steps_to_ignore,
                                 steps_to_predict=steps_to_predict, context_blocks=context_blocks)
            else:
                chosen = amdim_comparisons
        if isinstance(chosen, CPCTask):
            chosen.check_grid(grid, owner="CPCV2")
        # A string here is AMDIM's comparisons; modules with feature-map comparisons are checked too.
        self.contrastive_task = build_contrastive_task("CPCV2", chosen, tclip, num_maps=3)
        self.uses_feature_maps = not isinstance(self.contrastive_task, CPCTask) and hasattr(self.contrastive_task, "comparisons")

        if not isinstance(online_ft, bool):
            raise TypeError(f"CPCV2: online_ft must be True or False, got {online_ft!r}")
        self.online_evaluator = None
        if online_ft:
            # Not a submodule: the head never enters the method's optimizer or state dict.
            self.online_evaluator = SSLOnlineEvaluator(num_classes, feature_dim=feature_dim)

    @staticmethod
    def _patch_encoder(encoder_name, channels: int, patch_size: int, width: int, depth: int) -> tuple[nn.Module, int]:
        if isinstance(encoder_name, nn.Module):
            with torch.no_grad():
                was_training = encoder_name.training
                encoder_name.eval()
                out = encoder_name(torch.zeros(2, channels, patch_size, patch_size))
                encoder_name.train(was_training)
            return encoder_name, out.flatten(start_dim=1).shape[1]
        if encoder_name == "cpc_encoder":
            encoder = CPCPatchEncoder(channels, width, depth)
            return encoder, encoder.feature_dim
        if encoder_name in RESNET_ARCHITECTURES:
            # Patches are tiny (8 px): the small-image stem, no max-pool.
            return build_resnet_encoder(encoder_name, in_channels=channels, first_conv=False, maxpool1=False)
        if is_vit_arch(encoder_name):
            raise ValueError(
                f"CPCV2: encoder_name={encoder_name!r} is a Vision Transformer, but CPC v2 encodes every small patch of its "
                "grid on its own into one vector and predicts rows of those vectors from the rows above; a ViT cuts "
                "the image into patches itself and is no per-patch encoder; use 'cpc_encoder' or a ResNet name "
                "(ViTs: simclr, moco, byol, simsiam, swav, dino)"
            )
        raise ValueError(
            f"CPCV2: encoder_name={encoder_name!r} is not known; use 'cpc_encoder', a ResNet name "
            f"({', '.join(RESNET_ARCHITECTURES)}) or an nn.Module mapping patches to vectors"
        )

    @classmethod
    def train_transform(cls, data):
        """Two augmented views; patching happens in the encoder so evaluation sees whole images."""
        return SimCLRViews.from_data_config(data, "CPCV2")

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        task = model.get("task", "cpc")
        if task == "cpc":
            from scale_ssl.data.patches import patch_grid_size as grid_of

            g = grid_of(model.get("image_height", 32), model.get("patch_size", 8), model.get("patch_overlap", 4), owner="CPCV2")
            return {"negatives_per_anchor": 2 * global_batch_size * g * g - 1}  # both views, every patch
        return {"negatives_per_anchor": global_batch_size - 1}

    def setup(self, stage: str) -> None:
        if hasattr(self.contrastive_task, "collective"):
            self.contrastive_task.collective = self.collective
        if self.online_evaluator is not None and self.trainer is not None:
            # The online accuracy is logged at the trainer's logging interval.
            self.online_evaluator.log_every_n_steps = getattr(self.trainer, "log_every_n_steps", self.online_evaluator.log_every_n_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled patch features (N, D): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def training_step(self, batch, batch_idx: int):
        (x1, x2), _labels = batch
        if self.uses_feature_maps:
            maps = self.encoder.feature_maps(torch.cat([x1, x2]))
            halves = [m.chunk(2) for m in maps]
            return {"maps1": tuple(h[0] for h in halves), "maps2": tuple(h[1] for h in halves)}
        return {"grid": self.encoder.feature_grid(torch.cat([x1, x2]))}

    def training_step_end(self, outputs):
        # The loss lives here so that under strategy=dp it sees every part (global negatives).
        if self.uses_feature_maps:
            loss = self.contrastive_task(outputs["maps1"], outputs["maps2"])
        else:
            loss = self.contrastive_task(outputs["grid"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.online_evaluator is not None and self.trainer is not None:
            self.online_evaluator.on_train_batch_end(self.trainer, self, outputs, batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.online_evaluator is not None:
            checkpoint[ONLINE_EVALUATOR_KEY] = self.online_evaluator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.online_evaluator is not None and ONLINE_EVALUATOR_KEY in checkpoint:
            self.online_evaluator.load_state_dict(checkpoint[ONLINE_EVALUATOR_KEY])

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], warmup_epochs=hp["warmup_epochs"],
            warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"], final_lr=hp["final_lr"],
        )
