"""What the views share: the settings, the pool and the metrics of the current app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, current_app

from config import Config
from workerpool import WorkerPool

from .schema import TaskLimits

if TYPE_CHECKING:
    from .live import LiveFigures
    from .metrics import Metrics

EXTENSION = "workerpool"


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    pool: WorkerPool
    metrics: Metrics
    live: LiveFigures
    limits: TaskLimits = field(init=False)  # the config's, built once rather than on every submission

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", TaskLimits.of(self.config))  # frozen: set once, here


def services(app: Flask | None = None) -> Services:
    """The Services of ``app`` (default: the app handling the current request)."""
    return (app or current_app).extensions[EXTENSION]
