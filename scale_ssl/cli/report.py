"""``scale-ssl eval report``: is the pretrained encoder worth anything? Scored against two baselines.

An SSL encoder earns its keep only if its frozen features beat what needs no pretraining at all:
the raw pixels, and a randomly initialised encoder of the same architecture (built with the fit's
seed). All three representations are scored two ways on the test split, with the train split as
the labelled data:

* weighted kNN (k = ``eval.knn_k``, T = ``eval.knn_temperature``, cosine; ``scale_ssl.eval.knn``);
* a linear probe on the precomputed, standardised features (``scale_ssl.eval.feature_probe``: SGD
  momentum 0.9, lr 0.5, cosine, 10 epochs, batch 256).

It prints a table with the encoder's margin over each baseline and, when the checkpoint belongs to
an MLflow run, adds to that run: the figures as metrics (``eval/knn_top1/<representation>``, ...,
at the checkpoint's step, so repeated reports draw a curve), the table (``report/report.md`` and
``report/scores.json``) and pictures: the training loss and learning-rate curves, the scores as
bars, and a 2-D PCA map of the test features coloured by class, encoder next to raw pixels.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from scale_ssl.cli.assembly import config_for_checkpoint, load_split, pretraining_tracking_uri
from scale_ssl.config import ConfigError
from scale_ssl.data import EvalTransform
from scale_ssl.data.full_pass import load_labelled_index
from scale_ssl.eval import extract_features, knn_accuracy, raw_pixel_features
from scale_ssl.eval.feature_probe import PROBE_BATCH_SIZE, PROBE_EPOCHS, PROBE_LEARNING_RATE, probe_features
from scale_ssl.probes.plots import embedding_pair_figure, log_figure, score_bars_figure, training_curves_figure
from scale_ssl.methods import METHODS
from scale_ssl.checkpoint import read_checkpoint
from scale_ssl.tracking import MLflowLogger

ENCODER, RAW_PIXELS, RANDOM_INIT = "ssl_encoder", "raw_pixels", "random_init_encoder"
MEASURES = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1"}


def _row_names(config, checkpoint: dict) -> dict[str, str]:
    return {ENCODER: f"{config.method} encoder (step {checkpoint.get('global_step')})",
            RAW_PIXELS: "raw pixels", RANDOM_INIT: "random-init encoder (same arch)"}  # fmt: skip


def format_report(scores: dict[str, dict[str, float]], names: dict[str, str]) -> str:
    """The table as Markdown: one row per representation (kNN and linear top-1, in %), then the
    encoder's margin over each baseline in points (positive: the encoder is better)."""
    lines = ["| representation | kNN top-1 (%) | linear top-1 (%) |", "|---|---|---|"]
    for key, values in scores.items():
        lines.append(f"| {names[key]} | {100 * values['knn_top1']:.2f} | {100 * values['linear_top1']:.2f} |")
    for baseline in (RAW_PIXELS, RANDOM_INIT):
        if baseline in scores and ENCODER in scores:
            margins = [100 * (scores[ENCODER][m] - scores[baseline][m]) for m in MEASURES]
            lines.append(f"| margin over {names[baseline]} | {margins[0]:+.2f} | {margins[1]:+.2f} |")
    return "\n".join(lines)


def encoder_beats_baselines(scores: dict[str, dict[str, float]]) -> bool:
    """True when the encoder is above every scored baseline on every measure."""
    return all(scores[ENCODER][m] > scores[b][m] for b in (RAW_PIXELS, RANDOM_INIT) if b in scores for m in MEASURES)


def run_report(args) -> dict[str, dict[str, float]]:
    checkpoint = read_checkpoint(args.ckpt)
    config = config_for_checkpoint(args, checkpoint)
    if config.data.val_shards is None:
        raise ConfigError("data.val_shards is null: the report needs a test split to score")
    d, e = config.data, config.eval
    label_key = d.label_key if d.label_key is not None else "auto"  # scoring needs labels whatever pretraining used
    bank_index, _, _ = load_labelled_index(d.train_shards, "the report (kNN bank and probe training split)", label_key)
    load_labelled_index(d.val_shards, "the report (the scored split)", label_key)
    classes = list(bank_index.classes)
    method_cls = METHODS[config.method]
    transform = EvalTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std))
    # Features in the precision the model trained in; similarities, vote and probe run in fp32.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=str(config.trainer.precision) == "bf16-mixed")

    start = time.perf_counter()
    bank_batches = load_split(d.train_shards, transform, e.batch_size, label_key)
    test_batches = load_split(d.val_shards, transform, e.batch_size, label_key)

    def encoder_features(encoder):
        with autocast:
            return extract_features(encoder, bank_batches), extract_features(encoder, test_batches)

    features = {ENCODER: encoder_features(method_cls.load_from_checkpoint(args.ckpt, strict=False).encoder)}
    if args.baselines:
        features[RAW_PIXELS] = raw_pixel_features(bank_batches), raw_pixel_features(test_batches)
        torch.manual_seed(config.trainer.seed)  # the fit's seed: the encoder's own starting point
        features[RANDOM_INIT] = encoder_features(method_cls(**dict(checkpoint.get("hyper_parameters", {}))).encoder)

    names = _row_names(config, checkpoint)
    print(f"scale-ssl eval report: features of {len(features)} representations in {time.perf_counter() - start:.0f} s",
          flush=True)  # fmt: skip
    scores: dict[str, dict[str, float]] = {}
    for key, ((bank, bank_labels), (test, test_labels)) in features.items():
        knn = knn_accuracy(test, test_labels, bank, bank_labels, len(classes), k=e.knn_k, temperature=e.knn_temperature)
        scores[key] = {"knn_top1": knn, **probe_features((bank, bank_labels), (test, test_labels), len(classes),
                                                         seed=config.trainer.seed)}  # fmt: skip
        print(f"  {names[key]}: kNN {100 * knn:.2f} %, linear {100 * scores[key]['linear_top1']:.2f} % "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - start

    table = format_report(scores, names)
    protocol = (f"kNN: k={e.knn_k}, T={e.knn_temperature}, cosine, weighted vote; linear probe: standardised frozen "
                f"features, SGD momentum 0.9, lr {PROBE_LEARNING_RATE}, cosine, {PROBE_EPOCHS} epochs, batch "
                f"{PROBE_BATCH_SIZE}. Scored on {d.val_shards}; labelled data {d.train_shards}.")  # fmt: skip
    print(f"\n{protocol}\n{elapsed:.0f} s on {torch.get_num_threads()} threads\n\n{table}\n", flush=True)
    if args.baselines:
        verdict = "beats" if encoder_beats_baselines(scores) else "does NOT beat"
        print(f"The encoder {verdict} both baselines on both measures.", flush=True)

    run_id = checkpoint.get("mlflow_run_id")
    if run_id and config.tracking.enabled:
        logger = MLflowLogger(tracking_uri=pretraining_tracking_uri(config, checkpoint),
                              default_root_dir=config.trainer.default_root_dir, run_id=run_id)  # fmt: skip
        _log_to_mlflow(logger, scores, names, table, protocol, features, classes, int(checkpoint.get("global_step", 0)))
        logger.finalize("FINISHED")
        print(f"Logged to MLflow run {run_id} (metrics eval/*, artifacts report/); look with: {logger.ui_command()}",
              flush=True)  # fmt: skip
    return scores


def _log_to_mlflow(logger, scores, names, table, protocol, features, classes, step: int) -> None:
    metrics = {f"eval/{measure}/{key}": value for key, values in scores.items() for measure, value in values.items()}
    for baseline in (RAW_PIXELS, RANDOM_INIT):
        if baseline in scores:
            for measure in MEASURES:
                metrics[f"eval/margin_{measure}/{baseline}"] = scores[ENCODER][measure] - scores[baseline][measure]
    logger.log_metrics(metrics, step=step)
    logger.log_text(f"# Encoder against baselines\n\n{protocol}\n\n{table}\n", "report/report.md")
    logger.log_dict({"step": step, "protocol": protocol, "scores": scores, "names": names}, "report/scores.json")

    curves = {"train/loss": logger.metric_history("train/loss"), "learning rate": logger.metric_history("lr")}
    if any(curves.values()):
        log_figure(logger, training_curves_figure(curves), "report/training_curves.png")
    bars = {names[key]: {label: values[m] for m, label in MEASURES.items()} for key, values in scores.items()}
    log_figure(logger, score_bars_figure(bars, f"step {step}"), f"report/scores_step_{step}.png")
    panels = [(names[ENCODER], *features[ENCODER][1])]
    if RAW_PIXELS in features:
        panels.append((names[RAW_PIXELS], *features[RAW_PIXELS][1]))
    log_figure(logger, embedding_pair_figure(panels, classes), "report/test_embedding_pca.png")
