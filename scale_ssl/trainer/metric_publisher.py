"""Metrics from the device to the logger, the progress bar and ``callback_metrics``, and the
logger's life (created or continued at ``fit``, finalised with the run's status).

Values a module logs stay on the device until a log interval; then every rank reduces them at the
same step (so the ``sync_dist`` all-reduce cannot deadlock) and they are fetched once.
"""

from __future__ import annotations

import time

from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer.metrics import reduce_and_fetch, reduce_epoch_and_fetch


class MetricPublisher:
    def __init__(self, trainer, logger_arg):
        self.trainer = trainer
        self.logger_arg = logger_arg  # as given: a logger, None (the default MLflow logger) or False
        self.window = [time.perf_counter(), 0]  # (start, images) of the images/s window

    # -- values ----------------------------------------------------------------------------
    def restart_window(self) -> None:
        self.window = [time.perf_counter(), 0]

    def count_images(self, images: int) -> None:
        self.window[1] += images

    def log_step_metrics(self, module) -> None:
        trainer = self.trainer
        step_values = module._metrics.pop_step()
        values = reduce_and_fetch(step_values, trainer.strategy)
        for i, opt in enumerate(trainer.optimizers):
            values[f"lr-{i}" if len(trainer.optimizers) > 1 else "lr"] = float(opt.param_groups[0]["lr"])
        start, images = self.window
        values["images_per_s"] = images / max(time.perf_counter() - start, 1e-9)
        self.restart_window()
        values["epoch"] = float(trainer.current_epoch)
        self.publish(values, shown=[n for n, (_, o) in step_values.items() if o.prog_bar])

    def log_epoch_metrics(self, module) -> None:
        epoch_values = module._metrics.pop_epoch()
        if not epoch_values:
            return
        values = reduce_epoch_and_fetch(epoch_values, self.trainer.strategy)
        self.publish(values, shown=[n for n, (_, _, o) in epoch_values.items() if o.prog_bar])

    def log_data_stats(self) -> None:
        """The stream's per-epoch counts (dropped, corrupt skipped, re-seen after resume) to the
        progress bar and the logger, when the loader reports them (``epoch_stats()``)."""
        stats = getattr(self.trainer.train_dataloader, "epoch_stats", None)
        if not callable(stats):
            return
        numbers = {f"data/{k}": float(v) for k, v in stats().items() if isinstance(v, (int, float))}
        if numbers:
            # samples_lost (undecodable + missing from damaged or short shards) is the one figure shown.
            self.publish(numbers, shown=[k for k in numbers if k in ("data/samples_lost", "data/samples_dropped")])

    def publish(self, values: dict[str, float], shown: list[str]) -> None:
        trainer = self.trainer
        trainer.callback_metrics.update(values)
        trainer.logged_metrics.update(values)
        trainer.history.append({"step": trainer.global_step, **values})
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=trainer.global_step)
        bar = {n: values[n] for n in shown if n in values}
        if "images_per_s" in values:
            bar["img/s"] = values["images_per_s"]
        trainer.progress_bar_metrics.update(bar)
        trainer.fit_loop.progress.update(trainer.global_step, bar or None)

    # -- the logger's life -----------------------------------------------------------------
    def start_logger(self, checkpoint: dict | None, module):
        """The run's logger: a new run, or (resuming) the checkpoint's MLflow run continued; a new
        run gets the config as params, the effective lr and the resolved config file."""
        trainer = self.trainer
        logger = self._build_logger(checkpoint)
        if logger is not None and checkpoint is None:
            logger.log_hyperparams(self._params_to_log(module))
            if trainer.recipe is not None:
                logger.log_metrics({"effective_lr": trainer.recipe.effective_lr}, step=0)
            if trainer.run_config is not None:
                logger.log_dict(trainer.run_config, "config/resolved_config.yaml")
        return logger

    def _build_logger(self, checkpoint: dict | None):
        if self.logger_arg is False or not self.trainer.settings.logger_enabled:
            return None
        run_id = checkpoint.get("mlflow_run_id") if checkpoint else None
        logger = self.logger_arg
        if logger is None:
            logger = MLflowLogger(default_root_dir=self.trainer.settings.default_root_dir,
                                  rank=self.trainer.strategy.global_rank)
        if run_id is not None:
            logger.continue_run(run_id)
        return logger

    def logger_for_evaluation(self):
        """``validate``/``test`` outside ``fit`` log to a logger that was passed in, never to a
        default one created for them."""
        if self.trainer.logger is None and self.logger_arg is not None and self.logger_arg is not False \
                and self.trainer.settings.logger_enabled:
            return self.logger_arg
        return self.trainer.logger

    def finish_logger(self, status: str) -> None:
        logger = self.trainer.logger
        if logger is None:
            return
        if status == "FINISHED":
            keys = tuple(sorted({k for row in self.trainer.history for k in row if "loss" in k}))
            if keys:
                logger.log_metric_curves(keys=keys)
        logger.finalize(status)

    def _params_to_log(self, module) -> dict:
        """The run config as given (flattened by the logger), plus what only the trainer knows."""
        trainer = self.trainer
        params = dict(trainer.run_config or {})
        params["module"] = {"class": type(module).__name__, **module.hparams}
        params["strategy"] = {"name": trainer.strategy.name, "world_size": trainer.world_size}
        return params
