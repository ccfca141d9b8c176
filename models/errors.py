"""Errors about models and weights (torch-free, so any process can catch them)."""

from __future__ import annotations

from collections.abc import Sequence

from models.specs import Level


class WeightsUnavailableError(RuntimeError):
    """Model weights could not be obtained (offline, no cache, bad path)."""

    def __init__(self, levels: Sequence[Level], cause: str, hint: str) -> None:
        self.levels, self.cause, self.hint = tuple(levels), cause, hint
        names = ", ".join(f"{lv.name} ({lv.model_id})" for lv in levels)
        super().__init__(f"cannot load model weights for {names}: {cause}\n{hint}")


class LevelMismatchError(ValueError):
    """A loaded model does not match the level it was declared as (e.g. artifact metadata)."""
