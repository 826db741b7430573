"""DINO's self-distillation loss with a centred, sharpened teacher and a global-batch center.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294), eq. (1)-(4) and Algorithm 1.

For b images seen as V crops (the first G global, the rest local), with student logits s^v_b
(all V crops) and teacher logits t^g_b (the G global crops only, no gradient):

    P_s^v  = softmax(s^v / tau_s)                             student, tau_s = 0.1
    P_t^g  = softmax((t^g - c) / tau_t)                       teacher: centred, then sharpened
    L      = 1 / #pairs  sum_{g < G} sum_{v != g}  mean_b  -<P_t^g_b, log P_s^v_b>
    c     <- m c + (1 - m) (1 / (G B)) sum_{g, images of the GLOBAL batch} t^g     m = 0.9

#pairs = G (V - 1). The loss uses the center *before* this step's update. Centering keeps one
dimension from dominating, sharpening (tau_t < tau_s) keeps the output from going uniform;
together they avoid collapse without negatives or a predictor (sec. 3.1).

Distributed: the center is the mean over the global batch B = N x b, so the sum of the teacher
logits is all-reduced through the ``Collective`` (as Algorithm 1's ``batch_center``): every rank
holds the same center, equal to one process on the concatenated batch. The cross-entropy is
per image, so the local mean plus the strategy's gradient averaging equals the global mean. The
center is a buffer (``center``, in every checkpoint) kept in fp32 whatever the module is cast to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import Collective, default_collective


class DINOLoss(nn.Module):
    """``loss(student_logits, teacher_logits, teacher_temp)``; updates ``center`` after the loss.

    ``student_logits`` is (V * b, K): crop 0 of every image, then crop 1, ...; ``teacher_logits``
    is (G * b, K) for the G global crops in the same order. ``teacher_temp`` is tau_t for this step
    (DINO warms it up; ``DINO.teacher_temp_for_step``).

    Args:
        out_dim: K, the logits' width (the DINO head's ``out_dim``).
        num_global_crops: G, crops the teacher sees (DINO: 2).
        student_temp: tau_s > 0 (DINO: 0.1).
        center_momentum: m in [0, 1) of the center's EMA (DINO: 0.9).
        collective: the world the center averages over (``None``: default process group, else local).

    After each call ``last_teacher_entropy`` holds the mean entropy of this rank's teacher
    distributions (a collapse monitor: ~log K when uniform, 0 when one-hot).
    """

    def __init__(
        self,
        out_dim: int,
        num_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        collective: Collective | None = None,
    ):
        super().__init__()
        for name, value in (("out_dim", out_dim), ("num_global_crops", num_global_crops)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOLoss: {name} must be a positive int, got {value!r}")
        if isinstance(student_temp, bool) or not isinstance(student_temp, (int, float)) or student_temp <= 0:
            raise ValueError(f"DINOLoss: student_temp must be a number > 0 (DINO: 0.1), got {student_temp!r}")
        if isinstance(center_momentum, bool) or not isinstance(center_momentum, (int, float)) or not 0 <= center_momentum < 1:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1) (DINO: 0.9), got {center_momentum!r}")
        self.out_dim = out_dim
        self.num_global_crops = num_global_crops
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.collective = collective
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))
        self.last_teacher_entropy: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # .to(bfloat16)/.half() of the whole method must not turn the running center into a
        # 16-bit average (design contract 9): devices move, the dtype stays fp32.
        super()._apply(fn, recurse)
        if self.center.dtype != torch.float32:
            self.center = self.center.float()
        return self

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp) -> torch.Tensor:
        g, k = self.num_global_crops, self.out_dim
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != k or teacher_logits.shape[0] % g:
            raise ValueError(
                f"DINOLoss: teacher_logits must be (num_global_crops * batch, out_dim) = ({g} * b, {k}), "
                f"got {tuple(teacher_logits.shape)}"
            )
        b = teacher_logits.shape[0] // g
        if student_logits.dim() != 2 or student_logits.shape[1] != k or b == 0 or student_logits.shape[0] % b:
            raise ValueError(
                f"DINOLoss: student_logits must be (num_crops * {b}, {k}) for teacher_logits of {g} crops x {b} images, "
                f"got {tuple(student_logits.shape)}"
            )
        v = student_logits.shape[0] // b
        if v < g or v < 2:
            raise ValueError(f"DINOLoss: the student sees {v} crop(s) but needs the {g} global ones and at least 2 in all")
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            log_student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1).view(v, b, k)
            teacher = teacher_logits.detach().float()
            probs = F.softmax((teacher - self.center) / teacher_temp, dim=-1)
            # cross[g, v] = mean_b -<P_t^g_b, log P_s^v_b>: every (teacher crop, student crop) pair at once
            cross = -torch.einsum("gbk,vbk->gv", probs.view(g, b, k), log_student) / b
            same_crop = torch.eye(g, v, dtype=torch.bool, device=cross.device)
            loss = cross.masked_fill(same_crop, 0.0).sum() / (g * (v - 1))
            with torch.no_grad():
                self.last_teacher_entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """c <- m c + (1 - m) x mean of ``teacher_logits`` over the rows of every rank."""
        collective = self.collective or default_collective()
        rows_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        if collective.world_size > 1:
            rows_sum = collective.all_reduce(rows_sum, "sum")
        batch_center = rows_sum / (teacher_logits.shape[0] * collective.world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
