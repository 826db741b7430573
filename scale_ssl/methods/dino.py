"""DINO: self-distillation with no labels, a student matching a momentum teacher across crops.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294).

    student:  P_s = softmax(g_s(f_s(x)) / tau_s)       every crop (2 global + n local), trained
    teacher:  P_t = softmax((g_t(f_t(x)) - c) / tau_t)  the 2 global crops only, no gradient
    L = cross-entropy of every student crop against every *other* crop's teacher (``DINOLoss``)
    c <- 0.9 c + 0.1 mean over the GLOBAL batch of the teacher logits (all-reduced over ranks)
    after every optimizer step: theta_t <- m_k theta_t + (1 - m_k) theta_s,
        m_k = 1 - (1 - m_0)(cos(pi k / K) + 1) / 2         (m_0 = 0.996 -> 1 at the last step K)

f is a ViT (``vit_s_16`` by default; any ``build_encoder`` arch works, the paper also trains a
ResNet-50) and g the DINO head (``DINOHead``: 3-layer MLP, bottleneck, weight-normalised last
layer). The recipe of the paper, all per optimizer step:

* tau_t warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
  ``warmup_teacher_temp_epochs`` (the paper's code steps it per epoch; here per step, the same
  line sampled finer);
* AdamW, lr = 0.0005 x B / 256 warmed up over 10 epochs, cosine to ``min_lr``; weight decay on
  weights only (not on biases, norms, the ViT's position embedding and class token), following
  a cosine from ``weight_decay`` (0.04) to ``weight_decay_end`` (0.4);
* each parameter's gradient is clipped to norm ``clip_grad`` (3.0) separately, as the paper's
  code does (``trainer.gradient_clip_val`` adds global-norm clipping if wanted);
* the head's last layer gets no update during the first ``freeze_last_layer`` epochs.

State: the teacher (``teacher_encoder``, ``teacher_head``) and the center (``criterion.center``)
are in the ``state_dict``, so every checkpoint holds them and resume is exact; both stay fp32
(design contract 9). The schedules are functions of the optimizer step, restored with it.

Distributed: the center averages the teacher logits over the global batch through the
``Collective`` (N ranks give the center, the loss and the update of one process on N x b); the
cross-entropy is per image. Everything else is per-rank arithmetic that is identical on every rank.
DINO needs the gradients in ``on_before_optimizer_step`` (per-parameter clipping, the last-layer
freeze): a strategy that keeps them partitioned inside its engine (DeepSpeed ZeRO) is refused
at the first step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from scale_ssl.data import MultiCropViews
from scale_ssl.losses import DINOLoss
from scale_ssl.methods.ema import cosine_tau, ema_update_, frozen_copy
from scale_ssl.optim.method_optimizer import check_non_negative, check_optimizer_name, warmup_cosine_optimizer
from scale_ssl.models import DINOHead, build_encoder
from scale_ssl.trainer import SSLModule

_VIEW_OPTIONS = ("num_crops", "size_crops", "min_scale_crops", "max_scale_crops")
# The marker DINO puts on optimizer groups whose weight decay follows its schedule; it is saved
# with the optimizer state, so a resumed run schedules the same groups.
WEIGHT_DECAY_SCHEDULED = "weight_decay_scheduled"


class DINO(SSLModule):
    """DINO (see the module docstring).

    Args:
        arch / in_channels / first_conv / maxpool1 / encoder_options: the backbone
            (``scale_ssl.models.build_encoder``); for a ViT ``encoder_options`` takes
            ``image_size``, ``drop_path_rate`` (paper: 0.1) and ``pool`` (``cls``/``mean``).
        out_dim / hidden_dim / bottleneck_dim / head_layers / use_bn_in_head / norm_last_layer:
            the DINO head (paper: 65536 / 2048 / 256 / 3 / False / True).
        num_crops: crops per resolution, (global, local) = (2, 10) in the paper's best ViT-S run;
            the first entry is what the teacher sees. Must match ``data.views.num_crops``.
        student_temp / teacher_temp / warmup_teacher_temp / warmup_teacher_temp_epochs: tau_s
            and tau_t's warmup (paper: 0.1; 0.04 -> 0.07 over 30 epochs for ViT-S/16 300 ep);
            ``warmup_teacher_temp_steps`` overrides the epochs with a count of optimizer steps.
        center_momentum: m of the center (0.9).
        momentum_teacher: m_0 of the teacher EMA (0.996), raised to 1 with a cosine.
        optimizer / learning_rate / min_lr / warmup_epochs / warmup_steps / momentum: AdamW
            (paper; ``sgd``/``lars``/``adam`` also accepted, ``momentum`` for SGD and LARS) with
            ``learning_rate`` as the peak (paper: 0.0005 x B / 256), ``min_lr`` the final lr.
        weight_decay / weight_decay_end: the cosine weight-decay schedule (0.04 -> 0.4).
        clip_grad: per-parameter gradient norm bound (3.0; 0 disables).
        freeze_last_layer: epochs during which the head's last layer is not updated (1).
    """

    def __init__(
        self,
        arch: str = "vit_s_16",
        in_channels: int = 3,
        first_conv: bool = True,
        maxpool1: bool = True,
        encoder_options: dict | None = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        num_crops: Sequence[int] = (2, 10),
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 0,
        warmup_teacher_temp_steps: int | None = None,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.996,
        optimizer: str = "adamw",
        learning_rate: float = 0.0005,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        warmup_steps: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams["num_crops"] = list(num_crops)
        check_optimizer_name("DINO", optimizer)
        check_non_negative("DINO", learning_rate=learning_rate, min_lr=min_lr, warmup_epochs=warmup_epochs,
                           weight_decay=weight_decay, weight_decay_end=weight_decay_end, clip_grad=clip_grad,
                           freeze_last_layer=freeze_last_layer, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs)
        for name, value in (("teacher_temp", teacher_temp), ("warmup_teacher_temp", warmup_teacher_temp)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"DINO: {name} must be a number > 0 (paper: 0.04-0.07), got {value!r}")
        if not 0 <= momentum_teacher <= 1:
            raise ValueError(f"DINO: momentum_teacher must be in [0, 1] (paper: 0.996), got {momentum_teacher!r}")
        num_crops = tuple(num_crops)
        if (len(num_crops) < 1 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_crops)
                or num_crops[0] < 1 or sum(num_crops) < 2):
            raise ValueError(
                f"DINO: num_crops must list crop counts per resolution, global crops first (>= 1) and >= 2 crops in "
                f"all, e.g. [2, 10]; got {list(num_crops)}"
            )
        self.num_crops = num_crops
        self.encoder, self.feature_dim = build_encoder(arch, in_channels=in_channels, first_conv=first_conv,
                                                       maxpool1=maxpool1, options=encoder_options, owner="DINO")
        self.head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, use_bn_in_head,
                             norm_last_layer)
        self.teacher_encoder = frozen_copy(self.encoder)
        self.teacher_head = frozen_copy(self.head)
        self.criterion = DINOLoss(out_dim, num_crops[0], student_temp, center_momentum)
        self._ema_step = 0
        self._gradients_checked = False
        self.current_momentum = float(momentum_teacher)

    # -- data --------------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, data):
        """Multi-crop (paper, sec. 3.1; SwAV's views). ``data.views`` takes ``num_crops``,
        ``size_crops``, ``min_scale_crops`` and ``max_scale_crops`` (one entry per resolution,
        global first); ``num_crops`` must equal ``model.num_crops`` (write
        ``num_crops: ${model.num_crops}``). Every crop gets our SimCLR-style augmentation (jitter,
        grayscale, optional blur); the paper's per-crop blur/solarisation probabilities are not
        reproduced."""
        views = dict(data.get("views") or {})
        unknown = sorted(set(views) - set(_VIEW_OPTIONS))
        if unknown:
            raise ValueError(f"data.views has unknown key(s) {unknown} for DINO; valid keys: {list(_VIEW_OPTIONS)}")
        size = data["image_size"]
        options = {"num_crops": (2, 0), "size_crops": (size, size), "min_scale_crops": tuple(data["crop_scale"])[:1] * 2,
                   "max_scale_crops": tuple(data["crop_scale"])[1:] * 2}
        options.update({k: tuple(v) for k, v in views.items()})
        return MultiCropViews(channels=data["channels"], normalize_mean=tuple(data["mean"]),
                              normalize_std=tuple(data["std"]), jitter_strength=data["jitter_strength"],
                              blur=data["gaussian_blur"], **options)

    @classmethod
    def derived_run_figures(cls, model: dict, global_batch_size: int) -> dict:
        """DINO compares no negatives; its center averages the teacher's global crops of the whole
        global batch."""
        global_crops = int(list(model.get("num_crops", (2, 10)))[0])
        return {"negatives_per_anchor": 0, "center_rows": global_crops * global_batch_size}

    # -- schedules (functions of the optimizer step, so a resumed run continues them exactly) --
    def _total_steps(self) -> int:
        return self.trainer.estimated_stepping_batches if self.trainer is not None else 0

    def teacher_temp_for_step(self, step: int) -> float:
        hp = self.hparams
        warmup = hp["warmup_teacher_temp_steps"]
        if warmup is None:
            per_epoch = (self.trainer.steps_per_epoch or 0) if self.trainer is not None else 0
            warmup = int(math.floor(hp["warmup_teacher_temp_epochs"] * per_epoch))
        if step >= warmup:
            return float(hp["teacher_temp"])
        return hp["warmup_teacher_temp"] + (hp["teacher_temp"] - hp["warmup_teacher_temp"]) * step / warmup

    def weight_decay_for_step(self, step: int) -> float:
        """Cosine from ``weight_decay`` at step 0 to ``weight_decay_end`` at the last step."""
        hp, total = self.hparams, self._total_steps()
        progress = min(step, total) / total if total > 0 else 0.0
        end, start = hp["weight_decay_end"], hp["weight_decay"]
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2

    def momentum_for_step(self, step: int) -> float:
        """m of the EMA that follows optimizer step ``step`` (0-based)."""
        return cosine_tau(step, self._total_steps(), self.hparams["momentum_teacher"])

    # -- steps -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.criterion.collective = self.collective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student backbone features f_s(x): what kNN, linear probes and fine-tuning use
        (``teacher_encoder`` holds the teacher's, which the paper evaluates)."""
        return self.encoder(x)

    def multicrop_features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Student features of all crops, (V*b, D): one backbone pass per crop resolution."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.encoder(torch.cat(list(crops[start:end]))))
            start = end
        return torch.cat(features)

    def training_step(self, batch, batch_idx: int):
        crops, _labels = batch
        total = sum(self.num_crops)
        if not isinstance(crops, (tuple, list)) or len(crops) != total:
            got = len(crops) if isinstance(crops, (tuple, list)) else type(crops).__name__
            raise ValueError(
                f"DINO expects {total} crops per image (model.num_crops={list(self.num_crops)}), got {got}; "
                "set data.views.num_crops to model.num_crops"
            )
        b = crops[0].shape[0]
        student = self.head(self.multicrop_features(crops))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(list(crops[: self.num_crops[0]]))))
        # Per crop, so that strategy=dp's gather (concatenation along dim 0) rebuilds each crop's
        # full batch rather than interleaving the parts' crops.
        return {"student": list(student.split(b)), "teacher": list(teacher.split(b))}

    def training_step_end(self, outputs):
        """The loss and the center update on the whole batch: this rank's part under
        single/ddp/xla (the center's sum is all-reduced), every part under dp."""
        student, teacher = torch.cat(outputs["student"]), torch.cat(outputs["teacher"])
        teacher_temp = self.teacher_temp_for_step(self.global_step)
        loss = self.criterion(student, teacher, teacher_temp)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/teacher_temp", teacher_temp)
        self.log("train/teacher_momentum", self.momentum_for_step(self.global_step))
        self.log("train/teacher_entropy", self.criterion.last_teacher_entropy, sync_dist=True)
        return loss

    def on_fit_start(self) -> None:
        # Groups built by an `optim:` recipe carry no marker: its decayed groups (weight decay > 0)
        # follow DINO's schedule, whose start value must then be the recipe's, or one of the two
        # settings would be silently ignored.
        for optimizer in self.trainer.optimizers:
            for i, group in enumerate(optimizer.param_groups):
                if WEIGHT_DECAY_SCHEDULED in group:
                    continue
                decayed = group.get("weight_decay", 0.0) > 0
                if decayed and not math.isclose(group["weight_decay"], self.hparams["weight_decay"]):
                    raise ValueError(
                        f"DINO: optimizer group {i} has weight_decay={group['weight_decay']:g} but DINO schedules the weight "
                        f"decay from model.weight_decay={self.hparams['weight_decay']:g} to model.weight_decay_end="
                        f"{self.hparams['weight_decay_end']:g}; set optim.optimizer.weight_decay to model.weight_decay"
                    )
                group[WEIGHT_DECAY_SCHEDULED] = decayed

    def on_before_optimizer_step(self, optimizer) -> None:
        hp = self.hparams
        student = [p for p in (*self.encoder.parameters(), *self.head.parameters()) if p.requires_grad]
        if not self._gradients_checked:
            self._gradients_checked = True
            if (hp["clip_grad"] or hp["freeze_last_layer"]) and all(p.grad is None for p in student):
                raise RuntimeError(
                    "DINO: no parameter gradient is visible before the optimizer step, so the per-parameter clipping "
                    "(model.clip_grad) and the last-layer freeze (model.freeze_last_layer) cannot act; this strategy "
                    "keeps gradients inside its engine (DeepSpeed ZeRO-2/3 partitions them): use strategy single, ddp, dp or "
                    "xla"
                )
        decay = self.weight_decay_for_step(self.global_step)
        for group in optimizer.param_groups:
            if group.get(WEIGHT_DECAY_SCHEDULED):
                group["weight_decay"] = decay
        grads = [p.grad for p in student if p.grad is not None]
        if hp["clip_grad"] and grads:
            # Each tensor on its own (the paper's clip_gradients), without a host sync: scale by
            # min(1, clip / (norm + 1e-6)).
            norms = torch._foreach_norm(grads)
            scales = [torch.clamp(hp["clip_grad"] / (n + 1e-6), max=1.0) for n in norms]
            torch._foreach_mul_(grads, scales)
        if self.current_epoch < hp["freeze_last_layer"]:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step (not per accumulated micro-batch), after it.
        if self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.current_momentum = self.momentum_for_step(self.global_step - 1)
            ema_update_(self.teacher_encoder, self.encoder, self.current_momentum)
            ema_update_(self.teacher_head, self.head, self.current_momentum)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_step = int(checkpoint.get("global_step", 0))
        if self._ema_step > 0 and self.trainer is not None:
            self.current_momentum = self.momentum_for_step(self._ema_step - 1)

    def configure_optimizers(self):
        hp = self.hparams
        student = [(n, p) for n, p in self.named_parameters() if n.startswith(("encoder.", "head."))]
        config = warmup_cosine_optimizer(
            self, student, optimizer=hp["optimizer"], learning_rate=hp["learning_rate"],
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], exclude_bn_bias=True,
            warmup_epochs=hp["warmup_epochs"], warmup_steps=hp["warmup_steps"], start_lr=0.0, final_lr=hp["min_lr"],
        )
        for group in config["optimizer"].param_groups:
            # exclude_bn_bias_groups: the weights group (decayed) and the biases/norms/tokens one
            group[WEIGHT_DECAY_SCHEDULED] = bool(group["lars_adaptation"])
        return config
