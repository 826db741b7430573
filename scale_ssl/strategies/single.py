"""One process, one device: plain PyTorch."""

from __future__ import annotations

from scale_ssl.collectives import Collective, LocalCollective
from scale_ssl.strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    name = "single"

    def __init__(self, accelerator: str = "auto"):
        super().__init__(accelerator)
        self._collective = LocalCollective()

    def setup_environment(self) -> None:
        return None

    @property
    def collective(self) -> Collective:
        return self._collective
