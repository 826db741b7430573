"""What of a run's params MLflow already holds, and what a new ``log_hyperparams`` must send.

MLflow params are write-once. A key already logged with the same value is skipped; with another
value (a resumed run whose config changed) it is warned about once and recorded as the tag
``scale_ssl.changed_param.<key>``; keys cut to MLflow's length limit are listed in the tag
``scale_ssl.truncated_params``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

TRUNCATED_PARAMS_TAG = "scale_ssl.truncated_params"
CHANGED_PARAM_TAG_PREFIX = "scale_ssl.changed_param."


class ParamLedger:
    def __init__(self) -> None:
        self.logged: dict[str, str] | None = None  # as MLflow holds them; loaded once, then kept in step
        self.truncated: set[str] = set()
        self._warned_changed: set[str] = set()

    def to_send(self, flat: dict[str, str], truncated: set[str], load_logged: Callable[[], dict], run_id: str):
        """``(params, tags)`` to send for ``flat`` (already stringified and cut); ``load_logged``
        reads the run's params from the server the first time."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        if self.logged is None:
            self.logged = dict(load_logged())
        new = {key: value for key, value in flat.items() if key not in self.logged}
        changed = {key: value for key, value in flat.items() if key in self.logged and self.logged[key] != value}
        tags = [RunTag(CHANGED_PARAM_TAG_PREFIX + key, value[:MAX_TAG_VAL_LENGTH]) for key, value in changed.items()]
        if truncated - self.truncated:
            self.truncated |= truncated
            listing = ", ".join(sorted(self.truncated))
            tags.append(RunTag(TRUNCATED_PARAMS_TAG, listing[:MAX_TAG_VAL_LENGTH]))
        self._warn_changed(changed, run_id)
        return [Param(key, value) for key, value in new.items()], tags, new

    def record(self, new: Mapping[str, str]) -> None:
        """``new`` was accepted by the server."""
        self.logged.update(new)

    def _warn_changed(self, changed: Mapping[str, str], run_id: str) -> None:
        unwarned = sorted(set(changed) - self._warned_changed)
        if not unwarned:
            return
        self._warned_changed.update(unwarned)
        warnings.warn(
            f"MLflowLogger: run {run_id} already has different values for params {unwarned}; "
            f"MLflow params cannot change, so the new values are recorded as tags "
            f"'{CHANGED_PARAM_TAG_PREFIX}<key>'",
            stacklevel=4,
        )
