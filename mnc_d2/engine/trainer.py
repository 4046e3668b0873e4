"""``Trainer``: D2's DefaultTrainer made reliable (see its docstring), with MNC's evaluators."""
import logging
import os
import shutil
import tempfile
import weakref

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer, trim_metrics_json
from ..data.build import build_mnc_test_loader, build_mnc_train_loader
from ..data.mapper import RobustDatasetMapper
from ..data.sampler import ResumableTrainingStream, RNGNeutralIterator
from ..data.validation import load_dataset_dicts
from ..evaluation import MaskAPrEvaluator
from ..utils.errors import CheckpointError, ConfigError, MNCError
from .hooks import PromoteCheckpoints, ReproducibleRNG
from .launch import check_replicas_in_sync, ddp_device_kwargs, lost_peer
from .train_loop import GuardedAMPTrainer, GuardedSimpleTrainer

__all__ = ["Trainer", "build_evaluator", "ensure_dataset_files", "training_seed", "AtomicCOCOEvaluator"]

logger = logging.getLogger(__name__)


def ensure_dataset_files(dataset_name: str) -> None:
    """Materialise a lazily generated dataset (synthetic shapes, HeLa crops) before an evaluator reads
    ``metadata.json_file``: their loaders write the files on first call. A no-op for other datasets."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file and not os.path.exists(json_file):
        DatasetCatalog.get(dataset_name)


class AtomicCOCOEvaluator(COCOEvaluator):
    """D2's COCOEvaluator with ``coco_instances_results.json`` and ``instances_predictions.pth`` written into a
    hidden folder and then renamed into ``output_dir`` (D2 0.6 writes them in place: a kill leaves a truncated
    file), and logging how many images each process evaluated (a check that the distributed gather saw the
    whole dataset)."""

    def reset(self):
        super().reset()
        self._num_images = 0

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        self._num_images += len(inputs)

    def evaluate(self, img_ids=None):
        counts = comm.all_gather(self._num_images) if self._distributed else [self._num_images]
        if not comm.is_main_process():
            return super().evaluate(img_ids)
        expected = len(self._coco_api.getImgIds()) if img_ids is None else len(img_ids)
        message = (f"Evaluated {sum(counts)} images of {self._metadata.name} "
                   f"(per process: {', '.join(map(str, counts))}; the dataset has {expected})")
        (self._logger.info if sum(counts) == expected else self._logger.warning)(message)
        final = self._output_dir
        if not final:
            return super().evaluate(img_ids)
        os.makedirs(final, exist_ok=True)
        self._output_dir = tempfile.mkdtemp(prefix=".writing-", dir=final)
        try:
            results = super().evaluate(img_ids)
            for name in os.listdir(self._output_dir):
                os.replace(os.path.join(self._output_dir, name), os.path.join(final, name))
            return results
        finally:
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._output_dir = final


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """COCO bbox+segm for "coco" datasets; MNC's mAP^r (plus COCO where a json exists) for "mapr"."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    ensure_dataset_files(dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type == "coco":
        # use_fast_impl=False: the fast COCOeval needs detectron2's C++ ops, absent in a CPU build
        return AtomicCOCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                                   use_fast_impl=False)
    if evaluator_type == "mapr":
        return DatasetEvaluators([MaskAPrEvaluator(dataset_name, iou_thresholds=tuple(cfg.TEST.MAPR.IOU_THRESHOLDS),
                                                    output_dir=output_folder, interpolation=cfg.TEST.MAPR.INTERPOLATION)])
    raise NotImplementedError(
        f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; mnc_d2 evaluates 'coco' and 'mapr'"
    )


def _find_stream(data_loader):
    """The ResumableTrainingStream inside a loader built by Trainer.build_train_loader, or None."""
    node = data_loader
    for _ in range(4):  # AspectRatioGroupedDataset -> DataLoader -> stream
        if isinstance(node, ResumableTrainingStream):
            return node
        node = getattr(node, "dataset", None)
    return None


def training_seed(cfg) -> int:
    """SEED, or (SEED < 0) one random seed shared by all processes."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


class Trainer(DefaultTrainer):
    """D2's DefaultTrainer with MNC's evaluators, made reliable:

    * data: datasets are loaded and checked by :func:`~mnc_d2.data.validation.load_dataset_dicts`
      and mapped by :class:`~mnc_d2.data.mapper.RobustDatasetMapper` (bad images skipped or
      reported by name); the training order is a :class:`~mnc_d2.data.sampler.ResumableTrainingStream`;
    * resumption: :class:`~mnc_d2.checkpoint.AtomicCheckpointer` writes checkpoints atomically; a
      resumed run continues the data stream and (with :class:`~mnc_d2.engine.hooks.ReproducibleRNG`)
      the random numbers of the interrupted one, so on CPU it ends with bit-identical weights;
    * NaN/Inf: :mod:`mnc_d2.train_loop` stops before a non-finite update is applied;
    * multi-process: DDP also on CPU (Gloo; D2 0.6 passes GPU device ids); after training every
      process checks that all replicas hold identical weights.
    """

    def __init__(self, cfg):
        # D2 0.6's DefaultTrainer.__init__, with the trainer, DDP and checkpointer classes replaced
        # (its __init__ hard-codes them and builds the hooks from them).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)  # first: the model checks its config keys
        for name in cfg.DATASETS.TEST:  # the test sets are evaluated after training: check them before it
            load_dataset_dicts([name], is_train=False, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False, **ddp_device_kwargs(model))
        trainer_class = GuardedAMPTrainer if cfg.SOLVER.AMP.ENABLED else GuardedSimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self._rng_hook = ReproducibleRNG(training_seed(cfg))
        self.register_hooks([self._rng_hook, PromoteCheckpoints()] + self.build_hooks())
        self._position_train_stream()

    @classmethod
    def build_train_loader(cls, cfg):
        """D2's training loader over checked dataset dicts, a RobustDatasetMapper and a resumable stream."""
        if cfg.MODEL.LOAD_PROPOSALS:
            raise ConfigError("MODEL.LOAD_PROPOSALS is not supported: MNC computes its proposals with its RPN.")
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ConfigError(f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported by "
                              "mnc_d2's resumable training stream; use 'TrainingSampler'.")
        return build_mnc_train_loader(
            cfg.DATASETS.TRAIN, RobustDatasetMapper(cfg, is_train=True), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            bad_image=cfg.MNC_RELIABILITY.BAD_TRAIN_IMAGE, require_masks=cfg.MODEL.MASK_ON, seed=training_seed(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """D2's test loader over checked dataset dicts and a RobustDatasetMapper (bad images raise)."""
        return build_mnc_test_loader(dataset_name, RobustDatasetMapper(cfg, is_train=False),
                                     num_workers=cfg.DATALOADER.NUM_WORKERS, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def _position_train_stream(self) -> None:
        """Point the training stream at this run's seed and at the first image of ``start_iter``."""
        stream = _find_stream(self.data_loader)
        if stream is None:  # a subclass built another loader
            return
        position = (self._rng_hook.seed, self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH)
        iterator = self._trainer._data_loader_iter
        if (stream.seed, stream.start_position) != position:
            stream.seed, stream.start_position = position
            iterator = iter(self.data_loader)  # the old one was made for the old position (and not read yet)
        if not isinstance(iterator, RNGNeutralIterator):
            iterator = RNGNeutralIterator(iterator)
        self._trainer._data_loader_iter = iterator

    def state_dict(self):
        # D2 0.6's DefaultTrainer saves only the iteration and the hooks: not the optimizer, so a
        # resumed run restarts SGD momentum from zero. Later D2 versions add this same "_trainer" entry.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state (written by D2 0.6's DefaultTrainer): "
                           "the optimizer (SGD momentum) restarts from zero.")

    def resume_or_load(self, resume=True):
        """D2's resume_or_load (see there), plus: the data stream continues where the checkpoint was
        taken, ``metrics.json`` loses the lines of the iterations being repeated, the partial files of killed
        saves are removed, and a bad ``MODEL.WEIGHTS`` raises an error naming the key."""
        resuming = resume and self.checkpointer.has_checkpoint()
        if comm.is_main_process():
            self.checkpointer.remove_partial_files()
        try:
            self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        except CheckpointError as e:
            if resuming:
                raise
            raise type(e)(f"MODEL.WEIGHTS={self.cfg.MODEL.WEIGHTS!r}: {e}") from e
        if resuming:
            self.start_iter = self.iter + 1  # the checkpoint stores the iteration that just finished
            logger.info(f"Resuming at iteration {self.start_iter} from {self.checkpointer.get_checkpoint_file()}")
            if comm.is_main_process():
                trim_metrics_json(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)
        self._position_train_stream()

    def train(self):
        """D2's DefaultTrainer.train, plus the replica check in multi-process runs."""
        train_logger = logging.getLogger("detectron2.engine.train_loop")
        quiet = _MNCErrorWithoutTraceback(self)
        train_logger.addFilter(quiet)
        try:
            results = super().train()
        finally:
            train_logger.removeFilter(quiet)
        if comm.get_world_size() > 1 and self.iter >= self.max_iter:
            check_replicas_in_sync(self.model)
        return results


class _MNCErrorWithoutTraceback(logging.Filter):
    """D2's TrainerBase.train logs any exception with its traceback; an MNCError (bad data, NaN loss) or a lost
    process of the job is logged as its message instead: it names the problem, a traceback would only bury it."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, MNCError) or (error is not None and lost_peer(error)):
            record.msg = f"Training stopped at iteration {self.trainer.iter}: {error}"
            record.args, record.exc_info = (), None
        return True
