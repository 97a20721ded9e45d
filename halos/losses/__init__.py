"""The loss registry: `@register_loss("name")` on a subclass of `AlignmentLoss`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from halos.losses.base import (
    AlignmentLoss,
    LossOutput,
    PairedLogps,
    SFTLogps,
    TokenLogps,
    UnpairedLogps,
    preference_metrics,
)

LOSSES: dict[str, type[AlignmentLoss]] = {}


def register_loss(name: str) -> Callable[[type[AlignmentLoss]], type[AlignmentLoss]]:
    def decorate(cls: type[AlignmentLoss]) -> type[AlignmentLoss]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name]} and {cls})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return decorate


def get_loss_class(name: str) -> type[AlignmentLoss]:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str, params: Mapping[str, Any] | None = None) -> AlignmentLoss:
    """Instantiate loss `name`; unknown hyperparameters are an error naming the valid ones."""
    cls = get_loss_class(name)
    params = dict(params or {})
    known = cls.hyperparameters()
    unknown = sorted(set(params) - set(known))
    if unknown:
        valid = ", ".join(f"{k}={p.default!r}" for k, p in known.items()) or "none"
        raise ValueError(f"loss {name!r} has no hyperparameter(s) {unknown}; valid: {valid}")
    return cls(**params)


# Importing the modules registers their losses.
from halos.losses import cpo, csft, dpo, kto, offline_ppo, rm, sft, slic  # noqa: E402, F401

__all__ = [
    "LOSSES", "AlignmentLoss", "LossOutput", "PairedLogps", "SFTLogps", "TokenLogps",
    "UnpairedLogps",
    "build_loss", "get_loss_class", "preference_metrics", "register_loss",
]
