"""Errors every layer may raise or catch: a launch that does not fit the strategy, a collective
that failed because a peer died or stalled."""

from __future__ import annotations

import torch.distributed as dist


class LaunchError(RuntimeError):
    """The process was not started the way the strategy needs (e.g. ddp without torchrun)."""


class CollectiveFailure(RuntimeError):
    """A collective failed on this rank because a peer died or stalled past the timeout; the
    message names this rank and the step. The process exits non-zero so the elastic agent
    (``torchrun --max-restarts``) restarts the group from the last checkpoint."""


# What gloo/nccl/the TCP store say when a peer is gone or silent (their errors are plain
# RuntimeErrors in several torch versions, so the message is the only reliable signal).
_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                         "broken pipe", "nccl", "gloo", "socket", "watchdog")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed/timed-out collective (as opposed to a bug in the step)."""
    if isinstance(err, CollectiveFailure):
        return False  # already explained
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    if type(err) is not RuntimeError:
        return False
    text = str(err).lower()
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)
