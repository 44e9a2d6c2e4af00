"""GPU-endpoint classifiers: which requests to a service need the GPU."""

from gpubroker.plugins.classifiers.base import Classifier, RouteClassifier

__all__ = ["Classifier", "RouteClassifier"]
