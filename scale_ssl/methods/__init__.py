"""Self-supervised methods: ``SSLModule`` subclasses that own their encoder, head, loss and recipe."""

from scale_ssl.methods.byol import BYOL
from scale_ssl.methods.moco import MoCoV2
from scale_ssl.methods.simclr import SimCLR
from scale_ssl.methods.simsiam import SimSiam
from scale_ssl.methods.swav import SwAV

METHODS = {"simclr": SimCLR, "swav": SwAV, "moco": MoCoV2, "byol": BYOL, "simsiam": SimSiam}

__all__ = ["SimCLR", "SwAV", "MoCoV2", "BYOL", "SimSiam", "METHODS"]
