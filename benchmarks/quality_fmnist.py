"""Representation quality on Fashion-MNIST: every SSL method against raw pixels, a random-init
encoder and a supervised encoder of the same architecture and budget. Slow, not in CI.

For each method of ``--methods`` (configs ``configs/<method>/fmnist_cpu.yaml``: resnet10, 1-channel
28 px stem, global batch 256, ``--precision`` (default auto: fp32 on a CPU without native bf16);
DINO: a ViT-mini/7 in fp32), in one process on this machine's cores:

1. budget: ``--steps`` fixes every encoder's steps (a load-independent, equal budget); otherwise
   a few steps are timed and ``max_steps`` set so pretraining fits ``--budget-minutes`` (the
   warmup-cosine schedule then spans the real run, not a run cut short);
2. pretrain (trainer ``single``; the data stream and losses are the distributed ones at world 1);
3. kNN top-1 (k=200, T=0.1, cosine, weighted; bank = the 60k train split, scored = the 10k test
   split) and a linear probe (top-1/top-5): ``scale_ssl.eval.feature_probe`` (the probe
   ``scale-ssl eval report`` runs too), a linear head trained through our ``Trainer`` on the frozen
   encoder's standardised features of the train split, precomputed once without augmentation (SGD,
   momentum 0.9, lr 0.5, cosine, batch 256, ``--linear-epochs``). Precomputing is what makes a probe affordable on a
   CPU; ``scale-ssl eval linear`` is the augmented protocol.

Baselines: raw pixels (kNN and linear on the 784 normalised pixels), a randomly initialised
encoder of each architecture in the table (the ResNet-10, the ViT of a ViT method, AMDIM's and
CPC v2's own encoders, each built by its method with its config's seed), and a supervised encoder (the same arch trained with labels for the same budget, crop +
flip augmentation, then probed the same way).

    .venv/bin/python benchmarks/quality_fmnist.py --steps 240     # the table at the demo's budget
    .venv/bin/python benchmarks/quality_fmnist.py --smoke          # end to end in a few minutes

Writes ``<out>/results.json`` and prints the Markdown table for ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from omegaconf import OmegaConf
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scale_ssl import Trainer  # noqa: E402
from scale_ssl.cli.assembly import build_train_stream  # noqa: E402
from scale_ssl.config import load_config  # noqa: E402
from scale_ssl.data import EvalTransform, ShardedImageStream, make_fashion_mnist_shards  # noqa: E402
from scale_ssl.data.supervised_transform import ClassifierTrainTransform  # noqa: E402
from scale_ssl.eval import EncoderClassifier, EvalSplit, extract_features, knn_accuracy, raw_pixel_features  # noqa: E402
from scale_ssl.eval.feature_probe import probe_features  # noqa: E402  (the demo report's probe too)
from scale_ssl.methods import METHODS  # noqa: E402
from scale_ssl.models import build_resnet_encoder  # noqa: E402
from scale_ssl.strategies import build_strategy  # noqa: E402
from scale_ssl.trainer import Callback  # noqa: E402

ALL_METHODS = ("simclr", "swav", "byol", "moco", "simsiam", "amdim", "cpc_v2", "dino")


class StopAfter(Callback):
    """Stop a fit after ``steps`` optimizer steps (used to time calibration steps)."""

    def __init__(self, steps: int):
        self.steps, self.started = steps, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.started = time.perf_counter()  # the first step pays one-off costs: not timed
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _config(method: str, shards: str, root: str, overrides=()):
    config = load_config(os.path.join(REPO, "configs", method, "fmnist_cpu.yaml"), [
        "trainer.strategy=single", f"trainer.default_root_dir={root}", f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/test", "trainer.enable_progress_bar=false", "tracking.enabled=false", *overrides])  # fmt: skip
    return config


def _fit(module, stream, config, max_steps: int, callbacks=()):
    trainer = Trainer(strategy="single", max_steps=max_steps, precision=config.trainer.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, callbacks=list(callbacks),
                      default_root_dir=config.trainer.default_root_dir, seed=config.trainer.seed)  # fmt: skip
    trainer.fit(module, stream)
    return trainer


def _seconds_per_step(make_module, make_stream, config, steps: int) -> float:
    timer = StopAfter(steps)
    _fit(make_module(), make_stream(), config, max_steps=steps, callbacks=[timer])
    return (time.perf_counter() - timer.started) / max(steps - 1, 1)


def _budgeted_fit(name, make_module, make_stream, config, budget_s: float, smoke: bool,
                  fixed_steps: int | None = None) -> tuple[nn.Module, dict]:
    if smoke:
        steps, per_step = 2, float("nan")
    elif fixed_steps:
        steps, per_step = fixed_steps, float("nan")
    else:
        per_step = _seconds_per_step(make_module, make_stream, config, steps=6)
        steps = max(10, int(budget_s / per_step))
    budget = "fixed" if per_step != per_step else f"{per_step:.2f} s/step measured"  # NaN: not measured
    print(f"[{name}] {steps} steps ({budget})", flush=True)
    module = make_module()
    start = time.perf_counter()
    _fit(module, make_stream(), config, max_steps=steps)
    return module, {"steps": steps, "pretrain_s": round(time.perf_counter() - start, 1)}


def _features(encoder, split: EvalSplit, precision: str):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        return extract_features(encoder, split.batches(0, 1))


def _score(name: str, train, test, num_classes: int, args) -> dict:
    start = time.perf_counter()
    knn = knn_accuracy(test[0], test[1], train[0], train[1], num_classes, k=args.knn_k, temperature=0.1)
    scores = {"knn_top1": knn, **probe_features(train, test, num_classes, epochs=args.linear_epochs)}
    scores["eval_s"] = round(time.perf_counter() - start, 1)
    print(f"[{name}] kNN {100 * knn:.2f} %, linear {100 * scores['linear_top1']:.2f} %", flush=True)
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="pretraining budget per encoder")
    parser.add_argument("--steps", type=int, default=None,
                        help="train every encoder (the supervised one too) for exactly this many steps instead of "
                             "--budget-minutes (on a shared machine a wall-clock budget buys fewer steps than on an idle "
                             "one)")
    parser.add_argument("--linear-epochs", type=int, default=10)
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--shards", default=os.path.join(REPO, "data", "fashion-mnist"))
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "quality_fmnist"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="auto",
                        help="trainer.precision for every fit: 32, bf16-mixed, or auto (bf16-mixed where the CPU runs "
                             "bf16 natively, fp32 where bf16 would be emulated and slower)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and 2 steps per encoder: checks the script runs")
    parser.add_argument("--skip-supervised", action="store_true",
                        help="leave out the supervised baseline (it costs one more budget); raw pixels and "
                             "random init are always scored")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    os.makedirs(args.out, exist_ok=True)
    shards = args.shards
    if args.smoke:
        shards = os.path.join(args.out, "smoke_shards")
        if not os.path.exists(os.path.join(shards, "test", "shards.json")):
            make_fashion_mnist_shards(shards, shard_size=300, limit=600, overwrite=True)
        args.linear_epochs, args.knn_k = 1, 20
    elif not os.path.exists(os.path.join(shards, "test", "shards.json")):
        make_fashion_mnist_shards(shards, shard_size=5000, overwrite=True)
    budget_s = 60 * args.budget_minutes

    # Smoke: small batches and no loader workers, so the 2 steps per encoder take seconds; every run: --precision.
    overrides = ["trainer.global_batch_size=64", "data.num_workers=0"] if args.smoke else []
    overrides.append(f"trainer.precision={args.precision}")
    base = _config("simclr", shards, args.out, overrides)
    d = base.data
    view = EvalTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std))
    bank, test = EvalSplit(f"{shards}/train", view, 1024), EvalSplit(f"{shards}/test", view, 1024)
    num_classes = len(bank.classes)
    results: dict[str, dict] = {}

    pixels = raw_pixel_features(bank.batches(0, 1)), raw_pixel_features(test.batches(0, 1))
    results["raw pixels"] = _score("raw pixels", *pixels, num_classes, args)

    model_args = OmegaConf.to_container(base.model, resolve=True)
    encoder_args = {k: model_args[k] for k in ("arch", "in_channels", "first_conv", "maxpool1")}
    torch.manual_seed(0)
    random_encoder, feature_dim = build_resnet_encoder(**encoder_args)
    feats = _features(random_encoder, bank, "32"), _features(random_encoder, test, "32")
    results["random-init encoder"] = _score("random init", *feats, num_classes, args)

    def supervised_module():
        torch.manual_seed(0)
        encoder, _ = build_resnet_encoder(**encoder_args)
        return EncoderClassifier(encoder, feature_dim, num_classes, freeze_encoder=False, learning_rate=0.1,
                                 encoder_learning_rate=0.1, weight_decay=5e-4, warmup_steps=0)  # fmt: skip

    def supervised_stream():
        return ShardedImageStream(f"{shards}/train", batch_size=base.trainer.global_batch_size, num_workers=d.num_workers,
                                  transform=ClassifierTrainTransform(d.image_size, d.channels, tuple(d.mean), tuple(d.std),
                                                                     crop_scale=(0.5, 1.0)), seed=0)  # fmt: skip

    if not args.skip_supervised:
        # --steps is the budget of every row, the supervised ceiling included.
        module, info = _budgeted_fit("supervised", supervised_module, supervised_stream, base, budget_s, args.smoke,
                                     args.steps)
        feats = (_features(module.encoder, bank, base.trainer.precision),
                 _features(module.encoder, test, base.trainer.precision))
        results["supervised encoder (same budget)"] = {**info, **_score("supervised", *feats, num_classes, args)}

    for method in methods:
        config = _config(method, shards, os.path.join(args.out, method), overrides)
        resolved = OmegaConf.to_container(config, resolve=True)
        strategy = build_strategy("single")

        def make_module(config=config, resolved=resolved):
            torch.manual_seed(config.trainer.seed)
            return METHODS[config.method](**resolved["model"])

        def make_stream(config=config):
            return build_train_stream(config, strategy, config.trainer.global_batch_size)

        precision = config.trainer.precision
        # AMDIM and CPC v2 ship their own encoders (no `arch`): each gets its own random-init row.
        arch = resolved["model"].get("arch") or resolved["model"].get("base_encoder") or f"{method} encoder"
        if arch != encoder_args["arch"] and f"random-init encoder ({arch})" not in results:
            # A method with another backbone (a ViT) gets its own random-init baseline.
            random_module = make_module()
            feats = _features(random_module.encoder, bank, precision), _features(random_module.encoder, test, precision)
            results[f"random-init encoder ({arch})"] = _score(f"random init {arch}", *feats, num_classes, args)
        module, info = _budgeted_fit(method, make_module, make_stream, config, budget_s, args.smoke, args.steps)
        feats = _features(module.encoder, bank, precision), _features(module.encoder, test, precision)
        results[method] = {**info, **_score(method, *feats, num_classes, args)}
        if hasattr(module, "teacher_encoder"):  # DINO's paper evaluates the EMA teacher
            teacher = module.teacher_encoder
            feats = _features(teacher, bank, precision), _features(teacher, test, precision)
            results[f"{method} (teacher)"] = {**info, **_score(f"{method} teacher", *feats, num_classes, args)}

    meta = {"smoke": args.smoke, "budget_minutes": args.budget_minutes, "steps": args.steps, "threads": args.threads,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "linear_epochs": args.linear_epochs, "knn_k": args.knn_k, "methods": methods, "precision": args.precision,
            "skip_supervised": args.skip_supervised}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=2)
    print("\n| encoder | pretrain steps (s) | kNN top-1 | linear top-1 | linear top-5 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        steps = f"{r['steps']} ({r['pretrain_s']:.0f} s)" if "steps" in r else "-"
        print(f"| {name} | {steps} | {100 * r['knn_top1']:.2f} | {100 * r['linear_top1']:.2f} | {100 * r['linear_top5']:.2f} |")
    print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
