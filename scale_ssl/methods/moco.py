"""MoCo v2: contrast queries against a momentum encoder's keys and a global queue of old keys.

He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020 (arXiv:1911.05722); Chen, Fan, Girshick, He. "Improved Baselines with Momentum
Contrastive Learning", 2020 (arXiv:2003.04297): MLP head, stronger augmentation, cosine lr.

    q  = normalize(g_q(f_q(x_1)))         query: online encoder + head (trained)
    k  = normalize(g_k(f_k(x_2)))         key: momentum encoder + head (EMA of the online one)
    L  = InfoNCE(q, k+, queue)            (``InfoNCEQueueLoss``)
    enqueue the keys of the whole global batch; theta_k <- m theta_k + (1 - m) theta_q

Distributed: keys are gathered from every rank (no gradient) and enqueued into one global queue,
identical on every rank and saved once in the checkpoint (``MoCoQueue``). The queue changes once per
optimizer step, after it: with ``accumulate_grad_batches > 1`` every micro-batch is scored against
the same queue and the step enqueues all micro-batches' keys in order, so accumulation equals one
process on the whole batch (as far as the encoders' BatchNorm allows: its statistics are the
micro-batch's). BatchNorm in the key
encoder would let a query find its key by batch statistics; MoCo prevents it with *shuffling BN*:
the key batch is gathered, permuted with a permutation broadcast from rank 0, encoded in shards
and un-shuffled, so each rank's key BN sees a random mix of images (``shuffle_bn``, used when the
world has more than one rank). ``sync_bn`` instead normalises both encoders with global-batch
statistics (``GlobalBatchNorm``, on any collective).

Arguments follow pl_bolts' ``Moco_v2`` (``base_encoder``, ``emb_dim``, ``num_negatives``, ...);
world size and batch size come from the trainer and the stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import convert_to_global_batchnorm
from scale_ssl.data import SimCLRViews
from scale_ssl.losses import InfoNCEQueueLoss
from scale_ssl.methods.ema import ema_step, frozen_copy
from scale_ssl.methods.moco_queue import MoCoQueue
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import build_encoder
from scale_ssl.trainer import SSLModule


def _moco_head(feature_dim: int, emb_dim: int, use_mlp: bool) -> nn.Module:
    if not use_mlp:  # MoCo v1: the fc layer
        return nn.Linear(feature_dim, emb_dim)
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, emb_dim))


class MoCoV2(SSLModule):
    """MoCo v2 with a torchvision ResNet.

    Args:
        base_encoder: ResNet name (``resnet18``, ``resnet50``, ...; ``resnet10`` for CPU demos).
        in_channels / first_conv / maxpool1 / encoder_options: the encoder (see ``build_encoder``; a ViT
            ``vit_<size>_<patch>`` has no BatchNorm, so it needs ``shuffle_bn=False``).
        emb_dim: key/query size (128).
        num_negatives: K, the global queue length (65536); a multiple of the global batch.
        encoder_momentum: m of the momentum encoder (0.999).
        softmax_temperature: T (MoCo v2 paper: 0.2; pl_bolts default 0.07).
        learning_rate / momentum / weight_decay: SGD (0.03 at batch 256, 0.9, 1e-4), under a
            per-step warmup-cosine schedule (``warmup_epochs`` / ``warmup_steps``, default none).
        use_mlp: the MoCo v2 MLP head (a 2-layer MLP) instead of MoCo v1's linear one.
        shuffle_bn: shuffle the key batch across ranks around the key encoder (no effect on one rank).
        sync_bn: use global-batch BatchNorm in both encoders (then shuffling is not needed).
    """

    def __init__(
        self,
        base_encoder: str = "resnet18",
        emb_dim: int = 128,
        num_negatives: int = 65536,
        encoder_momentum: float = 0.999,
        softmax_temperature: float = 0.07,
        learning_rate: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        use_mlp: bool = False,
        in_channels: int = 3,
        first_conv: bool = True,
        maxpool1: bool = True,
        shuffle_bn: bool = True,
        sync_bn: bool = False,
        optimizer: str = "sgd",
        warmup_epochs: float = 0,
        warmup_steps: int | None = None,
        final_lr: float = 0.0,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_name("MoCoV2", optimizer)
        check_non_negative("MoCoV2", learning_rate=learning_rate, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, final_lr=final_lr)
        if not 0 <= encoder_momentum <= 1:
            raise ValueError(f"MoCoV2: encoder_momentum must be in [0, 1] (MoCo: 0.999), got {encoder_momentum!r}")
        self.encoder, self.feature_dim = build_encoder(base_encoder, in_channels=in_channels, first_conv=first_conv,
                                                       maxpool1=maxpool1, options=encoder_options, owner="MoCoV2")
        self.projection = _moco_head(self.feature_dim, emb_dim, use_mlp)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in (*self.encoder.modules(), *self.projection.modules()))
        if shuffle_bn and not sync_bn and not has_bn:
            # Shuffling BN exists to hide the key batch's statistics from the key BatchNorm; with none
            # in the key path it would gather and scatter every key image for an identical result.
            raise ValueError(
                f"MoCoV2: shuffle_bn=true guards the key encoder's BatchNorm, but {base_encoder!r} with this head has no "
                "BatchNorm (a ViT normalises with LayerNorm, per image), so shuffling would only move every key image "
                "between ranks for the same keys; set model.shuffle_bn=false"
            )
        self.momentum_encoder = frozen_copy(self.encoder)
        self.momentum_projection = frozen_copy(self.projection)
        self.criterion = InfoNCEQueueLoss(softmax_temperature)
        self.queue = MoCoQueue(num_negatives, emb_dim)
        self._ema_step = 0

    @classmethod
    def train_transform(cls, data):
        """Two views with SimCLR's augmentation, as MoCo v2 (arXiv:2003.04297, sec. 3)."""
        return SimCLRViews.from_data_config(data, "MoCoV2")

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        negatives = int(model.get("num_negatives", 65536))
        _check_queue_divides(negatives, global_batch_size)
        return {"negatives_per_anchor": negatives, "queue_length": negatives}

    def setup(self, stage: str) -> None:
        collective = self.collective
        if self.hparams["sync_bn"]:
            for name in ("encoder", "momentum_encoder", "projection", "momentum_projection"):
                setattr(self, name, convert_to_global_batchnorm(getattr(self, name), collective))
        # Every rank must start from the same queue, whatever RNG state built it.
        if collective.world_size > 1:
            self.queue.keys = collective.broadcast(self.queue.keys.to(self.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h = f_q(x): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        collective = self.collective
        shuffle = self.hparams["shuffle_bn"] and not self.hparams["sync_bn"] and collective.world_size > 1
        if not shuffle:
            return F.normalize(self.momentum_projection(self.momentum_encoder(x)).float(), dim=1)
        b = x.shape[0]
        everyone = collective.all_gather(x, grad=False)
        order = collective.broadcast(torch.randperm(everyone.shape[0], device=x.device))
        # This rank's rows of the global batch, the rank entering as device data: a Python slice
        # would bake the rank into the traced step, and XLA replicas would compile different
        # programs whose collectives never meet.
        mine = collective.rank_offset(b, device=x.device) + torch.arange(b, device=x.device)
        keys = self.momentum_projection(self.momentum_encoder(everyone[order[mine]]))
        keys = collective.all_gather(F.normalize(keys.float(), dim=1), grad=False)
        unshuffled = torch.empty_like(keys)
        unshuffled[order] = keys  # row order[i] of the global batch was encoded at position i
        return unshuffled[mine]

    def training_step(self, batch, batch_idx: int):
        (x_q, x_k), _labels = batch
        return {"q": self.projection(self.encoder(x_q)), "k": self._keys(x_k)}

    def _accumulation(self) -> int:
        return getattr(self.trainer, "accumulate_grad_batches", 1) if self.trainer is not None else 1

    def on_train_batch_start(self, batch, batch_idx: int):
        # First micro-batch of an optimizer step: keys still held belong to a step that was
        # skipped (non-finite loss), and are dropped with it.
        if batch_idx % self._accumulation() == 0:
            self.queue.drop_held()

    def training_step_end(self, outputs):
        # The loss and the keys to enqueue are taken here so that under strategy=dp every part's
        # keys enter the queue once (a per-part stash from threads would keep only one part's).
        q, k = outputs["q"], outputs["k"]
        if self._ema_step == 0 and self.global_step == 0 and self.queue.held == 0:
            # q holds this rank's whole micro-batch here (all dp parts); one optimizer step
            # enqueues the keys of every micro-batch of every rank: the global batch
            _check_queue_divides(self.queue.length, q.shape[0] * self.collective.world_size * self._accumulation())
        loss, top1 = self.criterion(q, k, self.queue.keys.to(q.device))
        # Enqueued after the optimizer step (on_train_batch_end): every micro-batch of the step
        # is scored against the same queue, as one process on the whole batch would be.
        self.queue.hold(self.collective.all_gather(k, grad=False))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/top1_positive", top1, sync_dist=True)
        self.log("train/negatives_per_anchor", self.queue.length)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (not per accumulated micro-batch), after it.
        if self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.queue.enqueue_held()
            m = self.hparams["encoder_momentum"]
            # On the fp32 values (DeepSpeed: the master copy and the target's fp32 copy).
            ema_step(self, self.momentum_encoder, self.encoder, m)
            ema_step(self, self.momentum_projection, self.projection, m)

    def ema_target_modules(self) -> list:
        return [self.momentum_encoder, self.momentum_projection]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Identical on every rank (every rank enqueues the same global keys): stored once.
        checkpoint["moco_queue"] = self.queue.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "moco_queue" in checkpoint:
            self.queue.load_state_dict(checkpoint["moco_queue"])
        self._ema_step = int(checkpoint.get("global_step", 0))

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], warmup_epochs=hp["warmup_epochs"],
            warmup_steps=hp["warmup_steps"], final_lr=hp["final_lr"],
        )


def _check_queue_divides(num_negatives: int, global_batch: int) -> None:
    if num_negatives % global_batch:
        raise ValueError(
            f"MoCo: model.num_negatives={num_negatives} is not a multiple of the global batch {global_batch}; "
            f"pick a multiple of {global_batch} so every key stays in the queue for the same number of steps"
        )
