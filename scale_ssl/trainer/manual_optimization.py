"""Optimizers as a module sees them: ``self.optimizers()`` returns these wrappers.

With ``automatic_optimization = False`` the module drives ``opt.zero_grad()``,
``self.manual_backward(loss)`` and ``opt.step()`` itself; the wrapper routes the step through the
trainer (precision scaler, strategy, step counting) so the same code runs on every strategy.
``.optimizer`` is the raw ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class WrappedOptimizer:
    def __init__(self, optimizer: torch.optim.Optimizer, trainer, index: int):
        self._optimizer = optimizer
        self._trainer = trainer
        self.index = index

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None, **kwargs):
        return self._trainer.manual_optimizer_step(self, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state):
        self._optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"WrappedOptimizer({self._optimizer!r})"


class OptimizerToggle:
    """Make only one optimizer's parameters require grad, so a step on optimizer i computes
    gradients for its parameters alone (GANs: the generator step must not train the
    discriminator). ``untoggle`` restores every flag exactly as it was."""

    def __init__(self) -> None:
        self._saved: dict[int, bool] | None = None

    def toggle(self, module: torch.nn.Module, optimizers: list, index: int) -> None:
        if self._saved is not None:
            self.untoggle(module)
        own = {id(p) for group in optimizers[index].param_groups for p in group["params"]}
        others = {id(p) for i, opt in enumerate(optimizers) if i != index for g in opt.param_groups for p in g["params"]}
        self._saved = {}
        for p in module.parameters():
            self._saved[id(p)] = p.requires_grad
            if id(p) in others and id(p) not in own:
                p.requires_grad_(False)

    def untoggle(self, module: torch.nn.Module) -> None:
        if self._saved is None:
            return
        for p in module.parameters():
            if id(p) in self._saved:
                p.requires_grad_(self._saved[id(p)])
        self._saved = None
