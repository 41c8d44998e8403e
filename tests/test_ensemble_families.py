"""Ensemble families built on one expert or one run: bagging, MC-dropout, checkpoint averaging."""

from __future__ import annotations
