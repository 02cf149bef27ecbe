"""Deployment: export a distilled student as a bundle, load it, classify images, serve it over HTTP.

``kdprompt.load_bundle(path).predict(images, k)`` needs no teacher, no text tower, no network and
no pickle. Modules: ``encoder`` (the shipped image encoder), ``export`` (the bundle format),
``bundle`` (loading and prediction), ``onnx`` (ONNX export and onnxruntime), ``serve`` (the HTTP API).
"""

from kdprompt.deploy.bundle import Bundle, Prediction, load_bundle
from kdprompt.deploy.export import export_bundle

__all__ = ["Bundle", "Prediction", "export_bundle", "load_bundle"]
