"""``scale-ssl export --ckpt PATH --out encoder.pt``: the encoder as a torchvision state dict."""

from __future__ import annotations

from scale_ssl.eval.export import export_encoder


def run_export(args) -> dict:
    description = export_encoder(args.ckpt, args.out, method=args.method)
    print(f"wrote {args.out}: {description['method']} encoder ({description['arch']}, {description['num_tensors']} tensors, "
          f"{description['feature_dim']}-D features) from step {description['global_step']}\n"
          f"  load it with: {description['load_with']}")  # fmt: skip
    return description
