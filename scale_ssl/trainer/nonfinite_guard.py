"""What a NaN/inf loss on any rank does (``trainer.on_nonfinite_loss``).

Every rank takes the same decision: before backward, one all-gather of every rank's flag.
"stop" (default): the step is skipped on all ranks; after ``max_consecutive_nonfinite``
consecutive skipped steps the last good state is checkpointed and ``NonFiniteLossError`` names
the step and ranks. "skip": skip such steps and keep going. "off": no check. On XLA (where a host
read mid-step would split the compiled step program) the flag stays on the device and is read at
each log interval: "stop" then stops there, naming the steps and ranks, without skipping (the last
checkpoint is the last good state); "skip" is refused there.
"""

from __future__ import annotations

import os
import warnings

import torch


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for ``max_consecutive_nonfinite`` steps (on_nonfinite_loss="stop")."""


class NonFiniteGuard:
    def __init__(self, trainer):
        self.trainer = trainer
        self.policy = trainer.settings.on_nonfinite_loss
        self.max_consecutive = trainer.settings.max_consecutive_nonfinite
        self.steps_skipped = 0
        self.consecutive = 0
        self.skip_window = False  # a micro-batch of this optimizer step had a non-finite loss
        self._ranks: list[int] = []
        self._deferred: torch.Tensor | None = None  # device-side flag count (XLA)
        self._deferred_since_step = 0

    def loss_is_nonfinite(self, loss: torch.Tensor) -> bool:
        """All ranks decide together: one all-gather of every rank's flag, so every rank sees the
        same verdict and which ranks went bad. The gather (not a rank-indexed write) keeps the
        step's program identical on every replica, which XLA needs: a ``flags[rank] = ...`` bakes
        the rank into each replica's graph and their collectives never meet."""
        if self.policy == "off":
            return False
        strategy = self.trainer.strategy
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        flags = strategy.collective.all_gather(flag, grad=False) if strategy.world_size > 1 else flag
        bad = [int(r) for r in flags.nonzero().flatten().tolist()]
        if bad:
            self._ranks = sorted(set(self._ranks) | set(bad))
        return bool(bad)

    def note_on_device(self, loss: torch.Tensor) -> None:
        """Deferred check (XLA): count non-finite losses on the device, no host read here."""
        if self.policy == "off":
            return
        if self.policy == "skip":
            raise ValueError(
                f"trainer.on_nonfinite_loss='skip' is not supported with strategy={self.trainer.strategy.name}: deciding "
                "per step needs a host read that splits the compiled step; use 'stop' (checked at each log interval) or 'off'"
            )
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self._deferred is None:
            self._deferred_since_step = self.trainer.global_step
            self._deferred = flag
        else:
            self._deferred = self._deferred + flag

    def check_deferred(self) -> None:
        """Read the deferred count (every rank, at the same step: the gather is a collective)."""
        if self._deferred is None:
            return
        trainer, strategy = self.trainer, self.trainer.strategy
        counts, self._deferred = self._deferred, None
        if strategy.world_size > 1:
            # This rank's slot of a world-sized vector, the rank entering as device data (one
            # program for every replica), then the same all-reduce the metrics use.
            collective = strategy.collective
            ranks = torch.arange(strategy.world_size, device=counts.device)
            mine = (ranks == collective.rank_offset(1, device=counts.device)).float()
            counts = strategy.reduce(mine * counts, op="sum")
        # A host list, then Python: nonzero() has a data-dependent shape that XLA cannot trace.
        bad = [rank for rank, count in enumerate(counts.cpu().tolist()) if count > 0]
        if bad:
            raise NonFiniteLossError(
                f"loss was NaN/inf on rank(s) {bad} between steps {self._deferred_since_step} and {trainer.global_step} "
                f"(strategy={strategy.name} checks at each log interval, trainer.log_every_n_steps="
                f"{trainer.settings.log_every_n_steps}); the last checkpoint written is the last good state; lower the "
                "learning rate or check the data"
            )

    def skip_step(self, optimizer, batch_idx: int) -> None:
        """The optimizer step whose window saw a non-finite loss: dropped on every rank; under
        "stop", the run ends after ``max_consecutive`` such steps with the last good state saved."""
        trainer = self.trainer
        optimizer.zero_grad(set_to_none=True)
        self.skip_window = False
        self.consecutive += 1
        self.steps_skipped += 1
        where = (f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}); non-finite on "
                 f"rank(s) {self._ranks}")
        self._ranks = []
        if self.policy == "stop" and self.consecutive >= self.max_consecutive:
            path = None
            if trainer.settings.enable_checkpointing:
                # Skipped steps changed no weight: this is the last good state. Resume starts after
                # the bad batches.
                trainer.batch_in_epoch = batch_idx + 1
                path = os.path.join(trainer.checkpoint_dir, "last.ckpt")
                trainer.save_checkpoint(path)
            raise NonFiniteLossError(
                f"loss was NaN/inf for {self.consecutive} consecutive steps, the last at {where}; "
                + (f"the last good state is in {path}" if path else "checkpointing is off, nothing was saved")
                + "; lower the learning rate or check the data, or set trainer.on_nonfinite_loss=skip"
            )
        if trainer.is_global_zero:
            warnings.warn(f"non-finite loss at {where}: step skipped on every rank", stacklevel=4)
