"""Self-supervised methods: ``SSLModule`` subclasses that own their encoder, head, loss and recipe."""

from scale_ssl.methods.simclr import SimCLR
from scale_ssl.methods.swav import SwAV

METHODS = {"simclr": SimCLR, "swav": SwAV}

__all__ = ["SimCLR", "SwAV", "METHODS"]
