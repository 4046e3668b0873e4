"""Training and evaluation: the reliable ``Trainer`` (and ``LazyTrainer`` for Python configs), its train loop and
hooks, multi-process launch, the run directory's lock, and the setup ``train_net.py`` shares with the tools."""
from ..config import build_cfg  # kept here for one release (CHANGELOG.md): import it from mnc_d2.config
from .defaults import MNCPredictor, eval_output_dir, load_weights, load_weights_for_eval, setup_cfg, trainer_class
from .lazy_trainer import LazyTrainer
from .trainer import AtomicCOCOEvaluator, Trainer, build_evaluator, ensure_dataset_files, training_seed

__all__ = ["AtomicCOCOEvaluator", "LazyTrainer", "MNCPredictor", "Trainer", "load_weights", "build_cfg", "build_evaluator", "ensure_dataset_files",
           "eval_output_dir", "load_weights_for_eval", "setup_cfg", "trainer_class", "training_seed"]
