"""Optical flow: torchvision's RAFT converted into DEQ-Flow (:func:`raft_to_deq_flow`), with synthetic and real data
(:mod:`integrations.flow.data`), metrics and losses (:mod:`integrations.flow.metrics`) and the commands
``python -m integrations.flow train | eval | demo``."""

from .model import DEFAULTS, PRESETS, DEQFlow, raft_to_deq_flow

__all__ = ["DEFAULTS", "PRESETS", "DEQFlow", "raft_to_deq_flow"]
