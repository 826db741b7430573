"""Strategy backends behind the one trainer."""

from scale_ssl.strategies.base import Strategy
from scale_ssl.strategies.step_settings import StepSettings
from scale_ssl.runtime import ClusterEnvironment, LaunchError
from scale_ssl.strategies.ddp import DDPStrategy
from scale_ssl.strategies.deepspeed import DeepSpeedStrategy
from scale_ssl.strategies.dp import DPStrategy
from scale_ssl.strategies.fsdp import FSDPStrategy
from scale_ssl.strategies.single import SingleDeviceStrategy
from scale_ssl.strategies.xla import XLAStrategy, launch_xla

STRATEGIES = {
    "single": SingleDeviceStrategy,
    "ddp": DDPStrategy,
    "dp": DPStrategy,
    "deepspeed": DeepSpeedStrategy,  # deepspeed is imported only when the engine is built
    "fsdp": FSDPStrategy,
    "xla": XLAStrategy,  # torch_xla is imported only when it sets up
}


def build_strategy(strategy, **options) -> Strategy:
    """``"ddp"`` / ``"single"`` / a ``Strategy`` instance -> a ``Strategy``."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(
            f"trainer.strategy={strategy!r} is not a known strategy; use one of {sorted(STRATEGIES)}"
        )
    return STRATEGIES[strategy](**options)


__all__ = ["DeepSpeedStrategy", "DPStrategy", "FSDPStrategy", "Strategy", "SingleDeviceStrategy", "DDPStrategy", "ClusterEnvironment", "LaunchError", "XLAStrategy", "launch_xla", "STRATEGIES", "StepSettings", "build_strategy"]
