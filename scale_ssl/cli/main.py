"""``scale-ssl`` / ``python -m scale_ssl``: fit, make-shards, index-shards, eval.

Bad input (config keys, types, paths) and bad data (more damaged samples than
``data.max_corrupt_fraction`` allows, an unreachable or stale shard set) end with one line
``scale-ssl: error: ...`` and exit code 2; set ``SCALE_SSL_TRACEBACK=1`` to see the traceback as
well.
"""

from __future__ import annotations

import argparse
import os
import sys

from scale_ssl.config import ConfigError
from scale_ssl.data.shard_source import ShardIndexMismatchError, ShardSourceError
from scale_ssl.data.stream import DataCorruptionError
from scale_ssl.runtime import LaunchError

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scale-ssl", description="Distributed-first self-supervised pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="pretrain a method from a YAML config (add key=value overrides)")
    fit.add_argument("--config", required=True, help="YAML run config, e.g. configs/simclr/fmnist_cpu.yaml")
    fit.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.max_steps=50")

    shards = sub.add_parser("make-shards", help="pack a data set into webdataset tar shards")
    shards.add_argument("source", choices=["fashion-mnist", "imagefolder"], help="what to pack")
    shards.add_argument("src_dir", nargs="?", default=None, help="imagefolder: the ImageFolder tree (SRC_DIR/<class>/<image>)")
    shards.add_argument("--out", required=True, help="output directory (fashion-mnist: gets train/ and test/)")
    shards.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    shards.add_argument("--max-shard-bytes", type=int, default=None, help="imagefolder: also close a shard before it passes this size")
    shards.add_argument("--workers", type=int, default=0, help="imagefolder: processes reading and checking images")
    shards.add_argument("--root", default=None, help="Fashion-MNIST idx directory (default: the Debian package's)")
    shards.add_argument("--overwrite", action="store_true", help="replace existing shards")
    shards.add_argument("--skip-existing", action="store_true", help="do nothing if complete shards already exist")

    from scale_ssl.cli.index_shards import add_parser as add_index_shards

    add_index_shards(sub)

    plan = sub.add_parser("plan", help="resolve a config at a world size without launching: batch, steps, memory, communication")
    plan.add_argument("--config", required=True, help="YAML run config, e.g. configs/swav/imagenet_64gpu.yaml")
    plan.add_argument("--world-size", type=int, default=None, help="ranks / XLA devices (default: the config's plan.world_size)")
    plan.add_argument("--bandwidth-gbps", type=float, default=12.5,
                      help="bus bandwidth in GB/s for the time estimate (default 12.5: a 100 Gb/s inter-node link)")
    plan.add_argument("--no-measure", action="store_true", help="skip the memory and communication measurement (fast)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.global_batch_size=2048")

    ev = sub.add_parser("eval", help="evaluate a pretrained encoder")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    knn = ev_sub.add_parser("knn", help="weighted kNN accuracy of the encoder on the test split")
    knn.add_argument("--ckpt", required=True, help="checkpoint written by scale-ssl fit (a .ckpt file, or a DeepSpeed checkpoint directory)")
    knn.add_argument("--config", default=None, help="config (default: the one stored in the checkpoint)")
    knn.add_argument("--baselines", action="store_true", help="also score raw pixels and a random-init encoder")
    knn.add_argument("overrides", nargs="*", help="dotted overrides such as eval.knn_k=20")
    report = ev_sub.add_parser("report", help="kNN and linear probe of the encoder against raw pixels and a random-init "
                               "encoder: a table with margins, logged to the run's MLflow with figures")
    report.add_argument("--ckpt", required=True, help="checkpoint written by scale-ssl fit (a .ckpt file, or a DeepSpeed checkpoint directory)")
    report.add_argument("--config", default=None, help="config (default: the one stored in the checkpoint)")
    report.add_argument("--no-baselines", dest="baselines", action="store_false", help="score the encoder only")
    report.add_argument("overrides", nargs="*", help="dotted overrides such as eval.knn_k=20")
    for mode, help_text in (("linear", "train a linear head on the frozen encoder; top-1/top-5 on the test split"),
                            ("finetune", "fine-tune the whole network (encoder at a lower lr); top-1/top-5 on the test split")):
        cls = ev_sub.add_parser(mode, help=help_text)
        cls.add_argument("--ckpt", required=True, help="checkpoint written by scale-ssl fit (a .ckpt file, or a DeepSpeed checkpoint directory)")
        cls.add_argument("--config", default=None, help="config (default: the one stored in the checkpoint)")
        cls.add_argument("--num_epochs", type=int, default=None, help="epochs over the training split")
        cls.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
        cls.add_argument("--batch_size", type=int, default=None, help="global batch (default: trainer.global_batch_size)")
        cls.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd")
        cls.add_argument("--learning_rate", type=float, default=0.1 if mode == "linear" else 0.3, help="peak lr (cosine decay)")
        cls.add_argument("--momentum", type=float, default=0.9)
        cls.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
        cls.add_argument("--weight_decay", type=float, default=0.0 if mode == "linear" else 1e-6)
        cls.add_argument("--crop_min_scale", type=float, default=0.08, help="random resized crop area range is [this, 1]")
        if mode == "finetune":
            cls.add_argument("--encoder_learning_rate", type=float, default=None, help="encoder peak lr (default: learning_rate / 10)")
            cls.add_argument("--hidden_dim", type=int, default=None, help="MLP head with this hidden width (e.g. 1024); default linear")
            cls.add_argument("--dropout", type=float, default=0.0)
        cls.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.strategy=single")

    export = sub.add_parser("export", help="write the pretrained encoder as a torchvision-loadable state dict")
    export.add_argument("--ckpt", required=True, help="checkpoint written by scale-ssl fit (a .ckpt file, or a DeepSpeed checkpoint directory)")
    export.add_argument("--out", required=True, help="output file, e.g. encoder.pt (a .json description goes beside it)")
    export.add_argument("--method", default=None, help="fail unless the checkpoint holds this method (e.g. simclr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fit":
            from scale_ssl.cli.fit import run_fit
            from scale_ssl.config import load_config

            config = load_config(args.config, args.overrides)
            if config.trainer.strategy == "xla":
                # One replica per TPU chip (one thread per XLA:CPU device), each running run_fit.
                from scale_ssl.strategies.xla import launch_xla

                launch_xla(run_fit, config)
            else:
                run_fit(config)
        elif args.command == "plan":
            from scale_ssl.cli.plan import run_plan

            run_plan(args)
        elif args.command == "index-shards":
            from scale_ssl.cli.index_shards import run_index_shards

            run_index_shards(args)
        elif args.command == "make-shards":
            from scale_ssl.cli.make_shards import run_make_shards

            run_make_shards(args)
        elif args.command == "eval" and args.eval_command == "knn":
            from scale_ssl.cli.evaluate import run_knn_eval

            run_knn_eval(args)
        elif args.command == "eval" and args.eval_command == "report":
            from scale_ssl.cli.report import run_report

            run_report(args)
        elif args.command == "eval" and args.eval_command in ("linear", "finetune"):
            from scale_ssl.cli.classifier_eval import run_classifier_eval

            run_classifier_eval(args, args.eval_command)
        elif args.command == "export":
            from scale_ssl.cli.export import run_export

            run_export(args)
    except (ConfigError, LaunchError, FileNotFoundError, FileExistsError, ValueError,
            DataCorruptionError, ShardIndexMismatchError, ShardSourceError) as err:
        if os.environ.get("SCALE_SSL_TRACEBACK"):
            raise
        print(f"scale-ssl: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
