"""Image classification: a timm HRNet converted into a multiscale DEQ classifier (:func:`hrnet_to_mdeq`), its
stacked-stage baseline (:func:`hrnet_classifier`), data (:mod:`integrations.vision.data`: scikit-learn's digits,
CIFAR-10 from disk) and the commands ``python -m integrations.vision train | eval | analyse``."""

from .model import DEFAULTS, HEADS, STAGES, HRNetClassifier, MDEQClassifier, hrnet_classifier, hrnet_to_mdeq

__all__ = ["DEFAULTS", "HEADS", "STAGES", "HRNetClassifier", "MDEQClassifier", "hrnet_classifier", "hrnet_to_mdeq"]
