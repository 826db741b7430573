"""Self-supervised methods: ``SSLModule`` subclasses that own their encoder, head, loss and recipe."""

from scale_ssl.methods.simclr import SimCLR

METHODS = {"simclr": SimCLR}

__all__ = ["SimCLR", "METHODS"]
