"""Deployable student bundles: export a distilled student, load it, classify images.

``kdprompt.load_bundle(path).predict(images, k)`` needs no teacher, no text tower, no network and
no pickle.
"""

from kdprompt.bundle.classifier import Bundle, Prediction, load_bundle
from kdprompt.bundle.export import export_bundle

__all__ = ["Bundle", "Prediction", "export_bundle", "load_bundle"]
