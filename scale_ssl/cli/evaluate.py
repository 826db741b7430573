"""``scale-ssl eval knn``: score a pretrained encoder with weighted kNN on the test split.

With ``--baselines`` the same kNN runs on raw pixels and on a randomly initialised encoder of the
same architecture: an SSL encoder is only worth something if it beats both.
"""

from __future__ import annotations

import time

import torch

from scale_ssl.config import ConfigError
from scale_ssl.data import EvalTransform
from scale_ssl.cli.assembly import config_for_checkpoint, load_split, pretraining_tracking_uri
from scale_ssl.data.full_pass import load_labelled_index
from scale_ssl.eval import extract_features, knn_accuracy, raw_pixel_features
from scale_ssl.methods import METHODS
from scale_ssl.checkpoint.reader import read_checkpoint
from scale_ssl.tracking import MLflowLogger


def run_knn_eval(args) -> dict[str, float]:
    checkpoint = read_checkpoint(args.ckpt)
    config = config_for_checkpoint(args, checkpoint)
    if config.data.val_shards is None:
        raise ConfigError("data.val_shards is null: kNN needs a test split to score")
    method_cls = METHODS[config.method]
    d, e = config.data, config.eval
    transform = EvalTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std))
    label_key = d.label_key if d.label_key is not None else "auto"  # kNN needs labels whatever pretraining used
    bank_index, _, _ = load_labelled_index(d.train_shards, "kNN evaluation (the bank's labels vote)", label_key)
    load_labelled_index(d.val_shards, "kNN evaluation (the scored split)", label_key)
    num_classes = len(bank_index.classes)
    threads = torch.get_num_threads()
    # Features in the precision the model trained in (bf16 is 2x faster on this CPU); the
    # similarity and the vote are computed in fp32 by knn_accuracy.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=str(config.trainer.precision) == "bf16-mixed")

    start = time.perf_counter()
    bank_batches = load_split(d.train_shards, transform, e.batch_size, label_key)
    test_batches = load_split(d.val_shards, transform, e.batch_size, label_key)
    decode_s = time.perf_counter() - start

    def knn(bank, bank_labels, test, test_labels) -> float:
        return knn_accuracy(test, test_labels, bank, bank_labels, num_classes, k=e.knn_k, temperature=e.knn_temperature)

    def score(encoder) -> float:
        with autocast:
            bank, bank_labels = extract_features(encoder, bank_batches)
            test, test_labels = extract_features(encoder, test_batches)
        return knn(bank, bank_labels, test, test_labels)

    results: dict[str, float] = {}
    model = method_cls.load_from_checkpoint(args.ckpt, strict=False)
    results["ssl_encoder"] = score(model.encoder)
    if args.baselines:
        results["raw_pixels"] = knn(*raw_pixel_features(bank_batches), *raw_pixel_features(test_batches))
        torch.manual_seed(config.trainer.seed)
        random_init = method_cls(**dict(checkpoint.get("hyper_parameters", {})))
        results["random_init_encoder"] = score(random_init.encoder)
    elapsed = time.perf_counter() - start

    print(f"\nkNN evaluation (k={e.knn_k}, T={e.knn_temperature}, cosine, weighted vote) on {d.val_shards}; "
          f"bank = {d.train_shards}; {elapsed:.0f} s on {threads} threads ({decode_s:.0f} s decoding)")
    names = {"ssl_encoder": f"{config.method} encoder (step {checkpoint.get('global_step')})",
             "raw_pixels": "raw pixels", "random_init_encoder": "random-init encoder (same arch)"}
    for key, value in results.items():
        print(f"  {names[key]:<40} top-1 = {100 * value:6.2f} %")

    run_id = checkpoint.get("mlflow_run_id")
    if run_id and config.tracking.enabled:
        logger = MLflowLogger(tracking_uri=pretraining_tracking_uri(config, checkpoint),
                              default_root_dir=config.trainer.default_root_dir, run_id=run_id)  # fmt: skip
        logger.log_metrics({f"eval/knn_top1/{k}": v for k, v in results.items()}, step=int(checkpoint.get("global_step", 0)))
        logger.finalize("FINISHED")
        print(f"  logged to MLflow run {run_id}; look with: {logger.ui_command()}")
    return results
