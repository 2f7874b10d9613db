"""Torch-free inference on an exported bundle: `runtime.Classifier(bundle).predict(images)`."""
from .classifier import Classifier, Prediction

__all__ = ["Classifier", "Prediction"]
