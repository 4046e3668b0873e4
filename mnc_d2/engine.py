"""Training/evaluation entry points shared by ``train_net.py`` and the benchmarks."""
import logging
import os

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from .config import add_mnc_config

logger = logging.getLogger(__name__)


def ensure_dataset_files(dataset_name: str) -> None:
    """Materialise a lazily generated dataset (synthetic shapes, HeLa crops) before an evaluator reads
    ``metadata.json_file``: their loaders write the files on first call. A no-op for other datasets."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file and not os.path.exists(json_file):
        DatasetCatalog.get(dataset_name)


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """COCO bbox+segm for "coco" datasets; MNC's mAP^r (plus COCO where a json exists) for "mapr"."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    ensure_dataset_files(dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type == "coco":
        # use_fast_impl=False: the fast COCOeval needs detectron2's C++ ops, absent in a CPU build
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                             use_fast_impl=False)
    if evaluator_type == "mapr":
        from .evaluation import MaskAPrEvaluator

        return DatasetEvaluators([MaskAPrEvaluator(dataset_name, iou_thresholds=tuple(cfg.TEST.MAPR.IOU_THRESHOLDS),
                                                    output_dir=output_folder, interpolation=cfg.TEST.MAPR.INTERPOLATION)])
    raise NotImplementedError(
        f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; mnc_d2 evaluates 'coco' and 'mapr'"
    )


class Trainer(DefaultTrainer):
    """D2's DefaultTrainer with MNC's evaluators."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def setup_cfg(args):
    """get_cfg -> add_mnc_config -> merge file -> merge opts -> freeze -> default_setup."""
    cfg = get_cfg()
    add_mnc_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
