"""What the views share: the settings, the pool and the metrics of the current app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app

from config import Config
from workerpool import WorkerPool

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


def services(app: Flask | None = None) -> Services:
    """The Services of ``app`` (default: the app handling the current request)."""
    return (app or current_app).extensions[EXTENSION]
