"""Sweeps: a base spec and axes of overrides (grid, zip, named variants), validated up front, run point by point
with resumable results (``titans-compose sweep``)."""

from __future__ import annotations

from titans_compose.sweep.plan import Plan, Point, load_plan
from titans_compose.sweep.report import plot, table
from titans_compose.sweep.run import SweepError, make_sweep_task, run_sweep

__all__ = ["Plan", "Point", "SweepError", "load_plan", "make_sweep_task", "plot", "run_sweep", "table"]
