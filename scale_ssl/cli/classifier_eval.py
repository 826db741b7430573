"""``scale-ssl eval linear`` and ``scale-ssl eval finetune``: supervised evaluation of a checkpoint.

Assembled like ``fit``: the strategy from the config (so ``torchrun ... eval linear`` runs on N
ranks), the training split streamed with equal steps per rank under the standard crop + flip
augmentation, the test split read once over all ranks, our ``Trainer`` underneath. The run is
logged to MLflow in the pretraining run's experiment, tagged with (and nested under) that run;
the test figures are also added to the pretraining run as ``eval/<mode>_top1`` / ``_top5``.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from scale_ssl.cli.assembly import (build_strategy_from_config, config_for_checkpoint, pretraining_tracking_uri,
                                    set_cpu_threads)
from scale_ssl.config import ConfigError, per_device_batch_size
from scale_ssl.data import EvalTransform, ShardedImageStream
from scale_ssl.data.sample_fields import require_labels
from scale_ssl.data.supervised_transform import ClassifierTrainTransform
from scale_ssl.eval.classifier import infer_feature_dim
from scale_ssl.probes.eval_split import EvalSplit
from scale_ssl.eval.finetune import finetune
from scale_ssl.eval.linear_probe import linear_probe
from scale_ssl.methods import METHODS
from scale_ssl.checkpoint.reader import read_checkpoint
from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.seed import seed_everything

PRETRAINING_RUN_TAG = "scale_ssl.pretraining_run_id"
EVAL_KIND_TAG = "scale_ssl.eval"


def _pretraining_experiment(tracking_uri: str, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    return client.get_experiment(experiment_id).name


def _logger(config, checkpoint: dict, mode: str, rank: int):
    if not config.tracking.enabled:
        return False, None
    tracking = config.tracking
    root = config.trainer.default_root_dir
    pretrain_run = checkpoint.get("mlflow_run_id")
    tracking_uri = pretraining_tracking_uri(config, checkpoint)
    probe = MLflowLogger(tracking_uri=tracking_uri, default_root_dir=root)  # resolves the store only
    experiment = tracking.experiment_name
    if pretrain_run and rank == 0:
        found = _pretraining_experiment(probe.tracking_uri, pretrain_run)
        if found is None:
            print(f"scale-ssl eval {mode}: pretraining run {pretrain_run} is not in {probe.tracking_uri}; "
                  f"logging to experiment {experiment!r} without a link", flush=True)  # fmt: skip
            pretrain_run = None
        else:
            experiment = found
    tags = {EVAL_KIND_TAG: mode}
    if pretrain_run:
        # mlflow.parentRunId nests the evaluation under the pretraining run in the MLflow UI.
        tags.update({PRETRAINING_RUN_TAG: pretrain_run, "mlflow.parentRunId": pretrain_run})
    logger = MLflowLogger(tracking_uri=tracking_uri, experiment_name=experiment, run_name=f"eval_{mode}",
                          tags=tags, default_root_dir=root, rank=rank)  # fmt: skip
    return logger, pretrain_run


def run_classifier_eval(args, mode: str) -> dict[str, float]:
    """``mode``: ``"linear"`` (frozen encoder) or ``"finetune"`` (whole network)."""
    checkpoint = read_checkpoint(args.ckpt)
    config = config_for_checkpoint(args, checkpoint)
    d, t = config.data, config.trainer
    if d.val_shards is None:
        raise ConfigError(f"data.val_shards is null: eval {mode} needs a test split to report top-1/top-5")
    if args.num_epochs is None and args.max_steps is None:
        raise ConfigError(f"eval {mode}: pass --num_epochs N or --max_steps N")
    batch = args.batch_size if args.batch_size is not None else t.global_batch_size

    seed_everything(t.seed)
    # A checkpoint of another method than the config names fails here, with both names.
    model = METHODS[config.method].load_from_checkpoint(args.ckpt, strict=False)
    encoder = model.encoder
    feature_dim = infer_feature_dim(encoder, d.channels, d.image_size)

    strategy = build_strategy_from_config(config)
    strategy.setup_environment()
    set_cpu_threads(config, strategy)
    per_device = per_device_batch_size(batch, strategy.world_size, 1)
    train_stream = ShardedImageStream(
        d.train_shards, batch_size=per_device, rank=strategy.global_rank, world_size=strategy.world_size,
        transform=ClassifierTrainTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std),
                                           crop_scale=(args.crop_min_scale, 1.0)),
        num_workers=d.num_workers, seed=t.seed, shuffle_buffer=d.shuffle_buffer,
        image_keys=list(d.image_keys) or None, label_key=d.label_key if d.label_key is not None else "auto",
    )  # fmt: skip
    require_labels(train_stream.fields.label_key, str(d.train_shards), f"eval {mode} (it trains a classifier on the labels)")
    test_split = EvalSplit(d.val_shards, EvalTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std)),
                           batch_size=config.eval.batch_size, cache=False)  # fmt: skip
    test_data = test_split.batches(strategy.global_rank, strategy.world_size)
    num_classes = len(train_stream.index.classes)

    logger, pretrain_run = _logger(config, checkpoint, mode, strategy.global_rank)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "eval_command", "overrides", "config")}
    run_config = OmegaConf.to_container(config, resolve=True)
    run_config["eval_" + mode] = {**options, "global_batch_size": batch, "per_device_batch_size": per_device,
                                  "world_size": strategy.world_size, "feature_dim": feature_dim,
                                  "pretraining_run_id": pretrain_run}  # fmt: skip
    trainer = Trainer(
        strategy=strategy, max_epochs=args.num_epochs, max_steps=args.max_steps if args.max_steps is not None else -1,
        precision=t.precision, log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar,
        default_root_dir=os.path.join(t.default_root_dir, f"eval_{mode}"), seed=t.seed, logger=logger,
        num_sanity_val_steps=0, run_config=run_config,
    )  # fmt: skip
    common = dict(optimizer=args.optimizer, learning_rate=args.learning_rate, momentum=args.momentum,
                  nesterov=args.nesterov, weight_decay=args.weight_decay)  # fmt: skip
    if mode == "linear":
        figures, _ = linear_probe(encoder, feature_dim, num_classes, train_stream, test_data, trainer, **common)
    else:
        figures, _ = finetune(encoder, feature_dim, num_classes, train_stream, test_data, trainer,
                              encoder_learning_rate=args.encoder_learning_rate, hidden_dim=args.hidden_dim,
                              dropout=args.dropout, **common)  # fmt: skip
    strategy.teardown()  # on success; after an error the strategy's exit hook does it (strategies/ddp.py)

    if strategy.is_global_zero:
        print(f"\neval {mode}: {config.method} encoder (step {checkpoint.get('global_step')}) on {d.val_shards}: "
              f"top-1 = {100 * figures['test/top1']:.2f} %, top-5 = {100 * figures['test/top5']:.2f} % "
              f"over {int(figures['test/samples'])} test images", flush=True)  # fmt: skip
        if logger:
            logger.finalize("FINISHED")
            if pretrain_run:
                linked = MLflowLogger(tracking_uri=logger.tracking_uri, default_root_dir=t.default_root_dir, run_id=pretrain_run)
                linked.log_metrics({f"eval/{mode}_top1": figures["test/top1"], f"eval/{mode}_top5": figures["test/top5"]},
                                   step=int(checkpoint.get("global_step", 0)))  # fmt: skip
                linked.finalize("FINISHED")
            print(f"  logged to MLflow run {logger.run_id}; look with: {logger.ui_command()}", flush=True)
    return figures
