"""One rank of the hang-safety test, started by the test with torchrun's environment variables.

argv: <fault: stall|exit> <collective timeout seconds> <root dir>. Rank 1 injects the fault at
batch 3; rank 0 must fail with a CollectiveFailure naming itself and the step, and exit non-zero.
"""

import sys

import torch

from scale_ssl.trainer import Trainer
from tests.reliability._modules import FaultyRegressor, regression_batches

if __name__ == "__main__":
    fault, timeout_s, root = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    trainer = Trainer(strategy="ddp", strategy_options={"timeout_s": timeout_s}, max_steps=8, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, default_root_dir=root)
    module = FaultyRegressor(fault=fault, fault_rank=1, fault_batches=(3,))
    rank = int(__import__("os").environ["RANK"])
    try:
        trainer.fit(module, regression_batches(8, rank=rank))
    finally:
        trainer.strategy.teardown()
