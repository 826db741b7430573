"""Writes a small good checkpoint, then a large one; the test SIGKILLs it during the large write.

argv: <checkpoint path> <megabytes of the large state>
"""

import sys

import torch

from scale_ssl.checkpoint.files import save_checkpoint_file

if __name__ == "__main__":
    path, megabytes = sys.argv[1], int(sys.argv[2])
    save_checkpoint_file({"state_dict": {"w": torch.arange(10.0)}, "global_step": 1}, path)
    big = torch.ones(megabytes * 1024 * 1024 // 4)
    print("saving-large", flush=True)
    save_checkpoint_file({"state_dict": {"w": big}, "global_step": 2}, path)
    print("saved-large", flush=True)
