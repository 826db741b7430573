"""SwAV: online clustering with swapped predictions of Sinkhorn codes, with multi-crop.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020 (arXiv:2006.09882).

    h = f(x)                          encoder (ResNet), run once per crop resolution
    z = normalize(g(h))               projection MLP, L2-normalised
    s = C^T z                         scores against K prototypes C (L2-normalised every step)
    q = Sinkhorn(s of a global crop)  equipartitioned codes over the global batch (+ global queue)
    L = swapped prediction of q from the other crops' softmax(s / T)   (``SwAVLoss``)

Distributed: Sinkhorn sums over all ranks (``distributed_sinkhorn``); the queue is one logical
global queue sharded over ranks and checkpointed as such (``SwAVQueue``). The prototypes take no
update during the first ``freeze_prototypes_epochs`` epochs (paper, appendix A.1): the
``on_before_optimizer_step`` hook asks the strategy to ``skip_update`` them, so they stay bitwise
unchanged on every strategy, also where ZeRO keeps its own flattened gradients and fp32 master
copy. Their normalisation writes that master copy too (``set_master_weights``).

Gradient accumulation: each micro-batch is one Sinkhorn batch (its rows on every rank, plus the
queue), and it pushes its rows into the queue after its loss, as a run whose global batch is the
micro-batch would. Unlike MoCo's per-sample InfoNCE, no queue policy can make accumulation equal
one process on the whole optimizer batch: the equipartition couples the rows Sinkhorn is given,
so the codes of one micro-batch depend on which rows share it (``derived_run_figures`` reports
``sinkhorn_rows`` per micro-batch). N ranks still equal one process accumulating the same
micro-batches, queue included (``tests/test_swav_method.py``).

Arguments follow pl_bolts' ``SwAV``, except that world size, per-device batch and sample counts
come from the trainer and the data stream (no ``gpus``/``nodes``/``batch_size``/``num_samples``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.data import MultiCropViews
from scale_ssl.losses import SwAVLoss
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.methods.swav_queue import SwAVQueue
from scale_ssl.models import ProjectionHead, build_encoder
from scale_ssl.trainer import SSLModule

_VIEW_OPTIONS = ("num_crops", "size_crops", "min_scale_crops", "max_scale_crops")


class SwAV(SSLModule):
    """SwAV with a torchvision ResNet encoder, an MLP projection and K prototypes.

    Args:
        arch / in_channels / first_conv / maxpool1 / encoder_options: the encoder (see ``build_encoder``: a
            ResNet, or a ViT ``vit_<size>_<patch>``, whose position embedding is resized for local crops).
        hidden_mlp: hidden width of the projection MLP (0: a single linear layer); paper 2048.
        feat_dim: embedding size (paper: 128).
        num_prototypes: K (paper: 3000 on ImageNet).
        freeze_prototypes_epochs: epochs during which the prototypes get no update.
        temperature: softmax temperature of the predictions (paper: 0.1).
        sinkhorn_iterations / epsilon: Sinkhorn-Knopp iterations and entropic regularisation.
        queue_length: global queue rows per assigned crop (0: no queue); must be a multiple of the
            global batch. Paper: 3840 at batch 256.
        epoch_queue_starts: first epoch that fills the queue; it enters Sinkhorn once full.
        crops_for_assign: crops whose codes are predicted (paper: the two global crops).
        num_crops: crops per resolution, matching the data's multi-crop (``data.views.num_crops``).
        optimizer / learning_rate / start_lr / final_lr / weight_decay / momentum /
        warmup_epochs / warmup_steps / exclude_bn_bias: as for ``SimCLR`` (paper: LARS, lr 4.8 at
            batch 4096, final_lr 0.0048, wd 1e-6, 10 warmup epochs).
        max_epochs: accepted for pl_bolts configs; the schedule spans the trainer's steps.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_channels: int = 3,
        hidden_mlp: int = 2048,
        feat_dim: int = 128,
        warmup_epochs: float = 10,
        max_epochs: int = 100,
        num_prototypes: int = 3000,
        freeze_prototypes_epochs: int = 1,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        crops_for_assign: Sequence[int] = (0, 1),
        num_crops: Sequence[int] = (2, 6),
        first_conv: bool = True,
        maxpool1: bool = True,
        optimizer: str = "adam",
        exclude_bn_bias: bool = False,
        start_lr: float = 0.0,
        learning_rate: float = 1e-3,
        final_lr: float = 0.0,
        weight_decay: float = 1e-6,
        epsilon: float = 0.05,
        momentum: float = 0.9,
        warmup_steps: int | None = None,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams["crops_for_assign"] = list(crops_for_assign)
        self.hparams["num_crops"] = list(num_crops)
        check_optimizer_name("SwAV", optimizer)
        check_non_negative("SwAV", learning_rate=learning_rate, start_lr=start_lr, final_lr=final_lr,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs, hidden_mlp=hidden_mlp,
                           freeze_prototypes_epochs=freeze_prototypes_epochs, queue_length=queue_length,
                           epoch_queue_starts=epoch_queue_starts)
        for name, value in (("num_prototypes", num_prototypes), ("feat_dim", feat_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SwAV: {name} must be a positive int, got {value!r}")
        self.encoder, self.feature_dim = build_encoder(arch, in_channels=in_channels, first_conv=first_conv,
                                                       maxpool1=maxpool1, options=encoder_options, owner="SwAV")
        if hidden_mlp == 0:
            self.projection = nn.Linear(self.feature_dim, feat_dim)
        else:
            self.projection = ProjectionHead(self.feature_dim, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, num_prototypes, bias=False)
        self.criterion = SwAVLoss(temperature, crops_for_assign, num_crops, sinkhorn_iterations, epsilon)
        self.queue = SwAVQueue(queue_length, len(crops_for_assign), feat_dim) if queue_length > 0 else None
        self._normalize_prototypes()

    @classmethod
    def train_transform(cls, data):
        """Multi-crop (paper, sec. 3.2). ``data.views`` takes ``num_crops``, ``size_crops``,
        ``min_scale_crops`` and ``max_scale_crops`` (one entry per resolution); ``num_crops``
        must equal ``model.num_crops`` (write ``num_crops: ${model.num_crops}`` in the YAML)."""
        views = dict(data.get("views") or {})
        unknown = sorted(set(views) - set(_VIEW_OPTIONS))
        if unknown:
            raise ValueError(f"data.views has unknown key(s) {unknown} for SwAV; valid keys: {list(_VIEW_OPTIONS)}")
        size = data["image_size"]
        options = {"num_crops": (2, 0), "size_crops": (size, size), "min_scale_crops": tuple(data["crop_scale"])[:1] * 2,
                   "max_scale_crops": tuple(data["crop_scale"])[1:] * 2}
        options.update({k: tuple(v) for k, v in views.items()})
        return MultiCropViews(
            channels=data["channels"],
            normalize_mean=tuple(data["mean"]),
            normalize_std=tuple(data["std"]),
            jitter_strength=data["jitter_strength"],
            blur=data["gaussian_blur"],
            augment_on=data.get("augment_on", "cpu"),
            **options,
        )

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        """What ``scale-ssl fit`` reports and logs: rows Sinkhorn balances each step (global batch
        plus the full queue); SwAV compares no negatives."""
        queue_length = int(model.get("queue_length", 0))
        if queue_length and queue_length % global_batch_size:
            raise ValueError(
                f"model.queue_length={queue_length} is not divisible by trainer.global_batch_size={global_batch_size}; "
                f"set it to a multiple of {global_batch_size}"
            )
        return {"negatives_per_anchor": 0, "queue_length": queue_length, "sinkhorn_rows": global_batch_size + queue_length}

    def setup(self, stage: str) -> None:
        self.criterion.collective = self.collective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h = f(x): what kNN, linear probes and fine-tuning use."""
        return self.encoder(x)

    def multicrop_forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings (V*b, feat_dim) and prototype scores (V*b, K) of all crops.

        Crops of one resolution go through the encoder together (one pass per size, as in the
        paper); the projection then sees every crop at once."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.encoder(torch.cat(list(crops[start:end]))))
            start = end
        embedding = F.normalize(self.projection(torch.cat(features)), dim=1)
        return embedding, self.prototypes(embedding)

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        """C <- C / ||C|| row-wise, on the optimizer's fp32 weights (under DeepSpeed its master
        copy: a write to the module's bf16 copy would be overwritten by the next step)."""
        weight = self.prototypes.weight
        (master,) = self.master_weights([weight])
        self.set_master_weights([weight], [F.normalize(master.float(), dim=1)])

    def training_step(self, batch, batch_idx: int):
        crops, _labels = batch
        total = self.criterion.total_crops
        if not isinstance(crops, (tuple, list)) or len(crops) != total:
            got = len(crops) if isinstance(crops, (tuple, list)) else type(crops).__name__
            raise ValueError(
                f"SwAV expects {total} crops per image (model.num_crops={self.hparams['num_crops']}), got {got}; "
                "set data.views.num_crops to model.num_crops"
            )
        b = crops[0].shape[0]
        embedding, scores = self.multicrop_forward(crops)
        # Per crop, so that strategy=dp's gather (concatenation along dim 0) rebuilds each crop's
        # full batch rather than interleaving the parts' crops.
        return {"embedding": list(embedding.split(b)), "scores": list(scores.split(b))}

    def _prototypes_frozen(self) -> bool:
        return self.current_epoch < self.hparams["freeze_prototypes_epochs"]

    def on_train_batch_start(self, batch, batch_idx: int):
        # Once per (micro-)batch before any forward: under dp the parts then share one normalised
        # weight instead of each thread rewriting it while another reads it. Not while frozen:
        # they have not moved since the last normalisation (at construction or after the last
        # update), and normalising a unit vector again changes its last bits.
        if not self._prototypes_frozen():
            self._normalize_prototypes()

    def training_step_end(self, outputs):
        """Sinkhorn codes, the swapped-prediction loss and the queue push, on the whole batch:
        this rank's part under single/ddp/deepspeed/xla (Sinkhorn's sums are all-reduced), every
        device's parts under dp (one process, so the same code sees the full batch)."""
        b = outputs["embedding"][0].shape[0]
        embedding, scores = torch.cat(outputs["embedding"]), torch.cat(outputs["scores"])
        queue_scores = None
        queue = self.queue
        if queue is not None and self.current_epoch >= self.hparams["epoch_queue_starts"]:
            if not queue.allocated:
                queue.allocate(b, self.collective, embedding.device)
            if queue.is_full:
                with torch.no_grad():
                    prototypes = self.prototypes.weight.detach().float()
                    queue_scores = [queue.embeddings[i] @ prototypes.t() for i in range(queue.num_assign)]
        loss = self.criterion(scores, b, queue_scores)
        if queue is not None and queue.allocated:
            assign = self.criterion.crops_for_assign
            queue.push(torch.stack([embedding[c * b : (c + 1) * b].detach().float() for c in assign]))

        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/sinkhorn_marginal_deviation", self.criterion.last_marginal_deviation)
        if queue is not None:
            self.log("train/queue_fill", queue.filled / queue.length if queue.allocated else 0.0)
            self.log("train/queue_in_use", float(queue_scores is not None))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Paper, appendix A.1: the prototypes stay fixed at first, which helps the codes settle.
        # skip_update, not p.grad = None: ZeRO's partitions hold their own reduced gradients.
        if self._prototypes_frozen():
            self.skip_update(self.prototypes.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank runs this (the gather is a collective); rank zero writes the one logical queue.
        if self.queue is not None:
            checkpoint["swav_queue"] = self.queue.logical_state(self.collective)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.queue is not None and checkpoint.get("swav_queue"):
            self.queue.load_logical_state(checkpoint["swav_queue"])

    def configure_optimizers(self):
        hp = self.hparams
        return warmup_cosine_optimizer(
            self, self.named_parameters(), optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], exclude_bn_bias=hp["exclude_bn_bias"],
            warmup_epochs=hp["warmup_epochs"], warmup_steps=hp["warmup_steps"], start_lr=hp["start_lr"],
            final_lr=hp["final_lr"],
        )
