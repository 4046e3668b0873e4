"""Checkpoints: atomic saving and loading with errors that name the file (``AtomicCheckpointer``), warm starts from
Detectron2 checkpoints with a report of what loaded, and the restricted unpickler for ``.pkl`` weights."""
from .checkpointer import AtomicCheckpointer, trim_metrics_json
from .warm_start import MNCWarmStartCheckpointer, warm_start_report

__all__ = ["AtomicCheckpointer", "MNCWarmStartCheckpointer", "trim_metrics_json",
           "warm_start_report"]
