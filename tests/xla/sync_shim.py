"""TEST-ONLY: a thread-safe ``torch_xla.sync`` for several XLA:CPU devices in one process.

Never import this from the package. On a TPU pod every process owns its chips and none of this
applies; it exists because torch_xla 2.9 runs XLA:CPU replicas as threads of one process, and
there out of the box every collective hangs and XLA aborts the process after 10 s ("Expected 2
threads to join the rendezvous, but only 1 of them arrived"; pytorch/xla#9089). Found here:

1. each thread compiles the step separately, and XLA:CPU then gives each copy's collective its
   own op id, so the replicas never meet in the rendezvous;
2. ``torch_xla.sync`` drops the device's all-reduce token, and freeing it blocks while holding
   the GIL, so the other device threads cannot dispatch their half of the collective.

The replacement (installed process-wide; it serves every device thread):
* waits for this device's previous step first (the wait releases the GIL), then for every other
  device thread to get that far (a step is dispatched only when all replicas are ready for it);
* traces, compiles and dispatches the step under one process-wide lock, so the replicas after the
  first hit the first one's compile cache and run the *same* executable;
* keeps the old all-reduce token referenced until this device's next sync, when its work is done
  and dropping it no longer blocks;
* waits (GIL released) for the dispatched step to finish before returning, so no replica blocks
  in a device wait with the GIL held while the step waits in the rendezvous for the others.
* serialises the *tracing* of collectives (``xm.all_reduce``/``all_gather``/``reduce_scatter``),
  which touch the device's all-reduce token: concurrent calls crashed the process (segfault).
* turns off parameter buffer donation (``XLA_ENABLE_PARAM_ALIASING=0``). With donation on, the
  step program donates the old parameter buffers to its outputs, and PJRT:CPU confirms a donation
  only when the program has finished. Once a step is dispatched, dropping torch_xla's last
  reference to a donated buffer waits for that confirmation, and that last reference is often
  dropped inside ``_xla_step_marker`` itself (when the execution thread let go of it first).
  The dispatching replica then waits, holding the lock above, for a program that waits in a
  rendezvous for the replicas queued behind that lock: the ResNet + global-BatchNorm Trainer
  hung exactly so (stack: ``StepMarker`` -> ``~Async`` -> ``CommonPjRtBuffer::ReleaseBuffer``,
  the other device threads in ``_threaded_sync``'s lock, the running replicas in
  ``InProcessCommunicator::AllGather``; the small-graph scenarios happened not to drop the
  reference there). Donation only saves memory: the program computes the same values without it.
The price is that a sync no longer overlaps the next step's tracing: fine for tests.

None of this is needed, or happens, on a TPU pod: there each replica is a process that owns its
chip, no lock is shared between replicas, and a replica waiting for its own step to finish only
waits for the other processes, which run on.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch_xla
import torch_xla.core.xla_model as xm

_LOCK = threading.Lock()
_OLD_TOKENS: dict[str, object] = {}
_original_sync = torch_xla.sync
# Replicas dispatch a step only once every replica's earlier work (e.g. parameter transfers) has
# finished; otherwise on 2 cores the first replicas' collectives, blocked in the rendezvous, can
# occupy the execution threads the others' transfers are queued behind. A replica that never comes
# breaks the barrier after this long (an error, not a hang).
_READY: threading.Barrier | None = None
_READY_TIMEOUT_S = 120.0


def _threaded_sync(wait: bool = False, reset_scope: bool = True) -> None:
    C = torch_xla._XLAC
    device = C._xla_get_default_device()
    _trace(device, "sync: waiting for previous step")
    real_devices = C._xla_real_devices([device])  # the wait wants "CPU:1", not "xla:1"
    C._xla_wait_device_ops(devices=real_devices)
    _all_replicas_ready().wait()
    _trace(device, "sync: all replicas ready")
    with _LOCK:
        _trace(device, "sync: dispatching")
        C._xla_step_marker(device, [], wait=wait, reset_scope=reset_scope)
        _trace(device, "sync: dispatched")
        xm._run_step_closures()
        _OLD_TOKENS[device] = C._get_all_reduce_token(device)
        C._set_all_reduce_token(device, None)
    # ...and wait for it, GIL released, before returning to Python: anything the replica does next
    # that waits on the device (a host-to-device transfer queues behind the running step) would
    # otherwise block with the GIL held while the step sits in the rendezvous for the others.
    C._xla_wait_device_ops(devices=real_devices)
    _trace(device, "sync: done")


def _all_replicas_ready() -> threading.Barrier:
    global _READY
    with _LOCK:
        if _READY is None:
            _READY = threading.Barrier(torch_xla._XLAC._xla_num_devices(), timeout=_READY_TIMEOUT_S)
        return _READY


def _trace(device: str, what: str) -> None:
    if os.environ.get("SCALE_SSL_SHIM_TRACE"):
        print(f"{time.monotonic():.3f} {device} {what}", file=sys.stderr, flush=True)


# Tracing a collective reads and replaces the device's all-reduce token; two device threads doing
# it at the same moment crashed the process (a segfault inside ``xm.all_reduce``, caught with
# faulthandler, about once in 25 runs of the Sinkhorn scenario). Only one thread traces a
# collective at a time. Re-entrant: ``all_reduce`` of a list goes through the same entry points.
_TRACE_LOCK = threading.RLock()
_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
_original_collectives = {name: getattr(xm, name) for name in _COLLECTIVES}


def _serialised(function):
    def traced_alone(*args, **kwargs):
        with _TRACE_LOCK:
            return function(*args, **kwargs)

    traced_alone.__wrapped__ = function
    return traced_alone


def install() -> None:
    """Replace ``torch_xla.sync`` (and so ``xm.mark_step``), serialise the tracing of collectives and
    turn off parameter buffer donation in this process (before its first sync: torch_xla reads the
    variable once)."""
    os.environ["XLA_ENABLE_PARAM_ALIASING"] = "0"
    torch_xla.sync = _threaded_sync
    for name, function in _original_collectives.items():
        setattr(xm, name, _serialised(function))


def uninstall() -> None:
    torch_xla.sync = _original_sync
    for name, function in _original_collectives.items():
        setattr(xm, name, function)
