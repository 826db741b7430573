"""The fit loop: epochs of batches until a stop bound, with what runs between batches.

Per batch: train it (``stepping.py``) -> metrics at logging intervals only -> ``last.ckpt`` every
``checkpoint_every_n_steps`` -> validation at its interval. Per epoch end: validation, the epoch
hooks, epoch metrics, the stream's data counts, epoch-interval schedulers. A run resumed in the
middle of an epoch starts after the batches already trained on.
"""

from __future__ import annotations

import os

from scale_ssl.trainer.data_distribution import batch_size_of, lockstep_batches, set_loader_epoch
from scale_ssl.trainer.progress import ProgressDisplay


class FitLoop:
    def __init__(self, trainer):
        self.trainer = trainer
        self.batches_to_skip = 0  # set by a mid-epoch resume
        self.end_epoch_early = False  # on_train_batch_start returned -1
        self.progress = ProgressDisplay(False, None)

    def run(self, module) -> None:
        trainer = self.trainer
        settings = trainer.settings
        total_steps = settings.max_steps if settings.max_steps > 0 else trainer.estimated_stepping_batches
        with ProgressDisplay(settings.enable_progress_bar and trainer.is_global_zero, total_steps) as progress:
            self.progress = progress
            progress.update(trainer.global_step)
            trainer.metrics.restart_window()
            while not self.done():
                self.run_epoch(module)

    def run_epoch(self, module) -> None:
        trainer = self.trainer
        settings, strategy = trainer.settings, trainer.strategy
        loader = trainer.train_dataloader
        set_loader_epoch(loader, trainer.current_epoch)
        module._stage = "train"
        trainer.callbacks.call_with_module("on_train_epoch_start", trainer, module)
        num_batches = trainer.num_training_batches
        val_every = trainer.evaluation.in_epoch_every(num_batches)
        # Mid-epoch resume: a stream that can seek (``skip_batches``) starts after the batches
        # already trained on; any other iterable is replayed without compute.
        skip, self.batches_to_skip = self.batches_to_skip, 0
        start = 0
        if skip and hasattr(loader, "skip_batches"):
            loader.skip_batches(skip)
            start, skip = skip, 0
        exhausted, batch_idx = True, -1
        batches = strategy.device_batches(loader)
        if not trainer.loaders.batches_equal_by_construction and not strategy.host_reads_split_the_step:
            # Equal per-rank batches are not guaranteed by how this loader is built: every rank
            # learns every rank's batch size before the step (one small all-gather per step).
            batches = lockstep_batches(batches, strategy.collective, strategy.root_device, num_batches,
                                       start, self.describe_batch)
        for batch_idx, batch in enumerate(batches, start=start):
            if num_batches is not None and batch_idx >= num_batches:
                break
            if batch_idx < skip:
                continue
            trainer.metrics.count_images(batch_size_of(batch) * trainer.world_size)
            stepped = trainer.stepping.train_batch(module, batch, batch_idx, num_batches)
            trainer.batch_in_epoch = batch_idx + 1
            if stepped and trainer.global_step % settings.log_every_n_steps == 0:
                trainer.nonfinite.check_deferred()
                trainer.metrics.log_step_metrics(module)
            if stepped and settings.checkpoint_every_n_steps and trainer.global_step % settings.checkpoint_every_n_steps == 0:
                trainer.save_checkpoint(os.path.join(trainer.checkpoint_dir, "last.ckpt"))
            if val_every and (batch_idx + 1) % val_every == 0:
                trainer.evaluation.validation_run(module)
            if self.end_epoch_early:
                self.end_epoch_early = False
                break
            if self.done():
                exhausted = num_batches is not None and batch_idx + 1 >= num_batches
                break
        if batch_idx < start:
            if num_batches is not None and start >= num_batches:  # resumed after the epoch's last batch
                self.end_epoch(module)
                return
            raise RuntimeError(
                f"the training stream yielded no batch in epoch {trainer.current_epoch}; check the shard "
                "paths and that global_batch_size is not larger than the data set"
            )
        if exhausted:
            self.end_epoch(module)

    def describe_batch(self, batch_idx: int) -> str:
        return f"global step {self.trainer.global_step} (epoch {self.trainer.current_epoch}, batch {batch_idx})"

    def end_epoch(self, module) -> None:
        trainer = self.trainer
        if trainer.evaluation.due_at_epoch_end():
            trainer.evaluation.validation_run(module)
        module._stage = "train"
        trainer.callbacks.call_with_module("on_train_epoch_end", trainer, module)
        trainer.metrics.log_epoch_metrics(module)
        trainer.metrics.log_data_stats()
        trainer.stepping.step_epoch_schedulers(trainer.current_epoch)
        trainer.current_epoch += 1
        trainer.batch_in_epoch = 0

    def done(self) -> bool:
        trainer, settings = self.trainer, self.trainer.settings
        minimums_met = trainer.current_epoch >= settings.min_epochs and trainer.global_step >= settings.min_steps
        if trainer.should_stop and minimums_met:
            return True
        if settings.max_steps > 0 and trainer.global_step >= settings.max_steps:
            return True
        return settings.max_epochs is not None and trainer.current_epoch >= settings.max_epochs
