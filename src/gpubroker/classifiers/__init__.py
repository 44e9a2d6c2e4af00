"""GPU-endpoint classifiers: which requests to a service need the GPU."""

from .base import Classifier, RouteClassifier

__all__ = ["Classifier", "RouteClassifier"]
