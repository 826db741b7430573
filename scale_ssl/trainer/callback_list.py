"""The callbacks of a run, and the one place their hooks are called from.

A ``list`` (``trainer.callbacks.append(...)`` works as before), with ``call``: the hook of that
name on every callback, in order, each receiving ``(trainer, module, *args)``. The module's own
hook of the same name, where it has one, is called first by ``call_with_module``, as Lightning
does."""

from __future__ import annotations


class CallbackList(list):
    def call(self, hook: str, trainer, module, *args) -> None:
        for callback in self:
            getattr(callback, hook)(trainer, module, *args)

    def call_with_module(self, hook: str, trainer, module) -> None:
        """``module.<hook>()``, then every callback's ``<hook>(trainer, module)``."""
        getattr(module, hook)()
        self.call(hook, trainer, module)
