"""Predictable scaling: exact accounting, law fits with intervals, compute-optimal planning."""

from nanogpt4.scaling.predictable import PredictableScaling

__all__ = ["PredictableScaling"]
