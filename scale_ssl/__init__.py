"""scale_ssl: a distributed-first trainer for self-supervised image pretraining."""

__version__ = "0.1.0"

from scale_ssl.trainer import Callback, SSLModule, Trainer  # noqa: E402

__all__ = ["Trainer", "SSLModule", "Callback", "__version__"]
