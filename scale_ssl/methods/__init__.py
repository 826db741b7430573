"""Self-supervised methods: ``SSLModule`` subclasses that own their encoder, head, loss and recipe."""

from scale_ssl.methods.amdim import AMDIM
from scale_ssl.methods.byol import BYOL
from scale_ssl.methods.cpc_v2 import CPCV2
from scale_ssl.methods.dino import DINO
from scale_ssl.methods.moco import MoCoV2
from scale_ssl.methods.simclr import SimCLR
from scale_ssl.methods.simsiam import SimSiam
from scale_ssl.methods.swav import SwAV

METHODS = {"simclr": SimCLR, "swav": SwAV, "moco": MoCoV2, "byol": BYOL, "simsiam": SimSiam, "amdim": AMDIM, "cpc_v2": CPCV2, "dino": DINO}

__all__ = ["SimCLR", "SwAV", "MoCoV2", "BYOL", "SimSiam", "AMDIM", "CPCV2", "DINO", "METHODS"]
