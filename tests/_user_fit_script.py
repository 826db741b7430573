"""A user's script in the Lightning habit: ``Trainer(strategy="ddp").fit(model, DataLoader(...))``
and nothing after it, no teardown of its own. Run by tests/test_clean_exit.py under torchrun.

``--fail`` makes step 2 raise, so the script ends in an uncaught exception instead. Before anything
else the script registers an exit hook that reports which gloo threads are still alive when the
interpreter exits; it is registered first, so it runs after every hook scale_ssl registers.
"""

import atexit
import os
import sys


def gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


atexit.register(lambda: print(f"rank {os.environ['RANK']} gloo threads at exit: {gloo_threads()}", flush=True))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from scale_ssl.trainer import SSLModule, Trainer  # noqa: E402

FAIL = "--fail" in sys.argv


class Net(SSLModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        if FAIL and batch_idx == 2:
            raise ValueError("a bug in training_step")
        x, _ = batch
        z = self.all_gather(self.net(x), sync_grads=True)
        loss = z.pow(2).mean()
        self.log("loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
Trainer(strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        log_every_n_steps=2).fit(Net(), DataLoader(data, batch_size=8, shuffle=True))
print(f"rank {os.environ['RANK']} fit done", flush=True)
