"""``SSLOnlineEvaluator``: a classifier trained on detached encoder features *during* pretraining.

As pl_bolts' ``SSLOnlineEvaluator`` (and the online linear heads of BYOL, Grill et al. 2020,
arXiv:2006.07733, and solo-learn): after every optimizer step of the SSL method, the encoder
(in eval mode, no gradient, so neither its weights nor its BatchNorm statistics are touched) maps
the first view of the batch to features h, and a separate head g is trained one step on

    L = cross_entropy(g(h), y)

with its own optimizer. g is linear (``hidden_dim=None``) or an MLP with one hidden layer
(``hidden_dim=1024``, the seeds' fine-tuning head: Linear -> BatchNorm -> ReLU -> Dropout ->
Linear). It costs one extra forward of the encoder per step and never changes what the method
learns; it gives a label-based accuracy curve for free.

Distributed: each rank's head gradients are averaged over ranks before the step (one all-reduce
of a flat buffer), so every rank holds the same head, equal to one process training it on the
global batch (the MLP head's BatchNorm uses global-batch statistics). ``online_val_acc`` is counted over the whole validation split, split over ranks
(correct and total are summed over ranks). The head's weights, its optimizer state and the
accuracy history are the callback's ``state_dict``, saved in the checkpoint, so a resumed run
continues the head exactly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import convert_to_global_batchnorm
from scale_ssl.probes.eval_split import EvalSplit
from scale_ssl.probes.plots import log_accuracy_curves
from scale_ssl.trainer.callback import Callback

UNLABELLED_MESSAGE = (
    "SSLOnlineEvaluator needs labelled training batches, but a batch carries label -1 (the shards have no "
    "labels, or data.label_key is null): train without the online evaluator (e.g. model.online_ft=false for "
    "cpc_v2) or stream labelled shards"
)


def build_classifier_head(feature_dim: int, num_classes: int, hidden_dim: int | None = None, dropout: float = 0.0) -> nn.Module:
    """Linear head, or Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear with ``hidden_dim``."""
    if hidden_dim is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes)) if dropout else nn.Linear(feature_dim, num_classes)
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
    )


class SSLOnlineEvaluator(Callback):
    """Train a classifier head on detached features during pretraining; log ``online_train_acc``
    every ``log_every_n_steps`` steps and ``online_val_acc`` every ``every_n_epochs`` epochs (and at
    the end of training).

    Args:
        num_classes: classes of the labels in the training batches.
        feature_dim: the encoder's output width; ``None`` reads it from the first batch.
        hidden_dim: ``None`` for a linear head, e.g. 1024 for the MLP head.
        dropout: dropout before the (last) linear layer.
        learning_rate, weight_decay: of the head's Adam optimizer.
        val_source, transform: the validation split (shards) and its deterministic view
            (``EvalTransform``); without them only ``online_train_acc`` is logged.
        encoder_attr: the module attribute holding the encoder (pooled features).
        view_index: which view of a multi-view batch ``((v1, v2, ...), labels)`` the head sees.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        val_source: str | os.PathLike | Any | None = None,
        transform=None,
        every_n_epochs: int = 1,
        log_every_n_steps: int = 50,
        batch_size: int = 512,
        encoder_attr: str = "encoder",
        view_index: int = 0,
        cache: bool = True,
        log_plots: bool = True,
    ):
        for name, value in (("num_classes", num_classes), ("every_n_epochs", every_n_epochs), ("log_every_n_steps", log_every_n_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SSLOnlineEvaluator: {name} must be an int >= 1, got {value!r}")
        if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1):
            raise ValueError(f"SSLOnlineEvaluator: hidden_dim must be None (linear head) or an int >= 1, got {hidden_dim!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"SSLOnlineEvaluator: dropout must be in [0, 1), got {dropout!r}")
        if not learning_rate > 0:
            raise ValueError(f"SSLOnlineEvaluator: learning_rate must be > 0, got {learning_rate!r}")
        if (val_source is None) != (transform is None):
            raise ValueError("SSLOnlineEvaluator: pass val_source and transform together (or neither)")
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.hidden_dim, self.dropout = hidden_dim, dropout
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.val = EvalSplit(val_source, transform, batch_size, cache) if val_source is not None else None
        self.every_n_epochs, self.log_every_n_steps = every_n_epochs, log_every_n_steps
        self.encoder_attr, self.view_index = encoder_attr, view_index
        self.log_plots = log_plots
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[tuple[int, float]] = []  # (global_step, online_val_acc)
        self._correct = self._seen = self._unlabelled = 0
        self._pending_state: dict | None = None

    # -- the head -------------------------------------------------------------------------
    def _build(self, feature_dim: int, device: torch.device, collective=None) -> None:
        self.feature_dim = feature_dim
        head = build_classifier_head(feature_dim, self.num_classes, self.hidden_dim, self.dropout)
        if collective is not None and collective.world_size > 1:
            # The MLP head's BatchNorm normalises over the global batch, so N ranks train exactly
            # the head one process would train on the concatenated batch.
            head = convert_to_global_batchnorm(head, collective)
        self.head = head.to(device)
        if collective is not None and collective.world_size > 1:
            # Every rank starts from rank 0's head, as every replica of the model starts from rank 0's
            # weights: equal seeds alone do not guarantee it (XLA:CPU replicas are threads drawing
            # from one host RNG; a run may seed its ranks differently).
            with torch.no_grad():
                for t in list(self.head.parameters()) + list(self.head.buffers()):
                    t.copy_(collective.broadcast(t, src=0))
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if self._pending_state is not None:
            self._load_head_state(self._pending_state)
            self._pending_state = None

    def _encoder(self, module) -> nn.Module:
        encoder = getattr(module, self.encoder_attr, None)
        if not isinstance(encoder, nn.Module):
            raise AttributeError(
                f"SSLOnlineEvaluator: {type(module).__name__} has no module attribute {self.encoder_attr!r}; "
                f"pass encoder_attr= naming the module's pretrained encoder"
            )
        return encoder

    def _features(self, trainer, module, images: torch.Tensor) -> torch.Tensor:
        encoder = self._encoder(module)
        modes = {m: m.training for m in encoder.modules()}
        encoder.eval()  # no BatchNorm statistics update and no BN collective: the method is untouched
        try:
            with torch.no_grad(), trainer.precision.autocast():
                features = encoder(images)
        finally:
            for m, training in modes.items():
                m.train(training)
        return features.flatten(start_dim=1).float()

    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit" and self.head is None and self.feature_dim is not None:
            self._build(self.feature_dim, trainer.strategy.root_device, trainer.strategy.collective)

    # -- training -------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        inputs, labels = batch[0], batch[1]
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[self.view_index]
        features = self._features(trainer, module, inputs)
        if self.head is None:
            self._build(features.shape[1], features.device, trainer.strategy.collective)
        self.head.train()
        if trainer.strategy.host_reads_split_the_step:
            labels = labels.to(features.device).long()
            # XLA: counted on the device and checked with the accuracy counts at the logging
            # interval; reading it now would run it as a program of its own, every step.
            self._unlabelled = self._unlabelled + (labels < 0).sum().float()
        else:
            # Checked where the loader delivered the labels (the host, as a rule), before they move:
            # no device sync per step.
            if bool((labels < 0).any()):
                raise ValueError(UNLABELLED_MESSAGE)
            labels = labels.to(features.device).long()
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self._average_gradients(trainer.strategy.collective)
        self.optimizer.step()
        # Counted on the device and read only at the logging interval, through the strategy's
        # reduction: a host read every step would make XLA run the head's step as a program of its
        # own, outside the training step.
        self._correct = self._correct + (logits.argmax(dim=1) == labels).sum().float()
        self._seen += labels.shape[0]
        if trainer.global_step % self.log_every_n_steps == 0:
            seen = torch.full((1,), float(self._seen), device=features.device)
            unlabelled = torch.as_tensor(self._unlabelled, dtype=torch.float32, device=features.device).reshape(1)
            counts = trainer.strategy.reduce(torch.cat([self._correct.reshape(1), seen, unlabelled]), op="sum")
            if float(counts[2]) > 0:
                raise ValueError(UNLABELLED_MESSAGE)
            trainer.log_metrics({"online_train_acc": float(counts[0] / counts[1].clamp(min=1)),
                                 "online_train_loss": float(loss.detach())})  # fmt: skip
            self._correct = self._seen = self._unlabelled = 0

    def _average_gradients(self, collective) -> None:
        if collective.world_size == 1:
            return
        grads = [p.grad for p in self.head.parameters()]
        flat = collective.all_reduce(torch.cat([g.reshape(-1) for g in grads]), op="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- validation -----------------------------------------------------------------------
    def evaluate(self, trainer, module) -> float | None:
        """``online_val_acc`` over the whole validation split (all ranks take part)."""
        if self.val is None or self.head is None:
            return None
        strategy = trainer.strategy
        device = strategy.root_device
        correct = torch.zeros(2, dtype=torch.float64, device=device)
        self.head.eval()
        with torch.no_grad():
            for images, labels in self.val.batches(strategy.global_rank, strategy.world_size):
                logits = self.head(self._features(trainer, module, images.to(device)))
                correct[0] += (logits.argmax(dim=1) == labels.to(device)).sum()
                correct[1] += labels.shape[0]
        correct = strategy.collective.all_reduce(correct, op="sum")
        accuracy = float(correct[0] / correct[1])
        self.history.append((trainer.global_step, accuracy))
        trainer.log_metrics({"online_val_acc": accuracy})
        return accuracy

    def on_train_epoch_end(self, trainer, module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self.val is not None and (not self.history or self.history[-1][0] != trainer.global_step):
            self.evaluate(trainer, module)

    def on_fit_end(self, trainer, module) -> None:
        if self.log_plots and trainer.logger is not None and trainer.is_global_zero:
            log_accuracy_curves(trainer.logger, {"online_val_acc": self.history}, "plots/online_val_acc.png")

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"history": [[s, v] for s, v in self.history], "feature_dim": self.feature_dim}
        if self.head is not None:
            state["head"] = self.head.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        elif self._pending_state is not None:  # restored but not trained since: keep what was loaded
            state.update({k: self._pending_state[k] for k in ("head", "optimizer", "feature_dim")})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]
        if "head" not in state:
            return
        if self.head is None:
            # The head is built on the first batch, on the device the features come from; the
            # saved state is loaded into it then.
            self._pending_state = state
            return
        self._load_head_state(state)

    def _load_head_state(self, state: dict) -> None:
        if self.feature_dim is not None and state.get("feature_dim") not in (None, self.feature_dim):
            raise ValueError(
                f"SSLOnlineEvaluator: the checkpoint's head reads {state['feature_dim']}-D features but this "
                f"encoder gives {self.feature_dim}-D; resume with the same encoder"
            )
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
