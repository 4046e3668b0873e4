"""Shared fixtures: small MNC configs and hand-built inputs (two images, GT boxes with BitMasks)."""
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import mnc_d2  # noqa: E402  (registers everything)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml")
INSTANT_CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
# small_cfg's shrinking as KEY VALUE options, for a checkpoint and the command line (score threshold 0: random weights)
SMALL_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
              "MODEL.MNC.MASK_HEAD.FC_DIM", 64, "MODEL.MNC.MASK_HEAD.CONV_DIM", 16,
              "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, "MODEL.MNC.MASK_HEAD.MASK_SIZE", 14,
              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 5]

# train_net.py options that make the instant test smaller (64 px images, a thinner model); test files
# add their own schedule (SOLVER.MAX_ITER, CHECKPOINT_PERIOD, ...).
TINY_TRAIN_NET_OPTS = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.MNC.MASK_HEAD.FC_DIM", "64",
    "MODEL.MNC.MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
    "MODEL.MNC.MASK_HEAD.MASK_SIZE", "14", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "TEST.DETECTIONS_PER_IMAGE", "20", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
]

LAZY_INSTANT_CONFIG = os.path.join(REPO, "configs", "lazy", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.py")
# TINY_TRAIN_NET_OPTS for a .py config (key=value): the same shrinking, as LazyConfig overrides
TINY_LAZY_OPTS = [
    "model.backbone.out_channels=32", "model.roi_heads.box_pathway.fc_dims=[64,64]",
    "model.roi_heads.box_predictor.input_shape.channels=128", "model.roi_heads.mask_head.fc_dim=64",
    "model.roi_heads.roi_pooler.output_size=8", "model.roi_heads.mask_head.input_shape.height=8",
    "model.roi_heads.mask_head.input_shape.width=8", "model.roi_heads.box_pathway.input_shape.height=8",
    "model.roi_heads.box_pathway.input_shape.width=8", "model.roi_heads.mask_head.mask_size=14",
    "model.roi_heads.final_mask_head.conv_dims=[16,16,16,16,16]",
    "model.proposal_generator.pre_nms_topk=[200,200]", "model.proposal_generator.post_nms_topk=[50,50]",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]", "dataloader.train.mapper.augmentations.0.max_size=64",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64", "dataloader.test.mapper.augmentations.0.max_size=64",
    "model.roi_heads.box_predictor.test_topk_per_image=20", "train.eval_period=0",
]


# train_net.py whose torch.save of one iteration writes a few bytes, touches SAVE_MARKER and waits for
# CONTINUE_MARKER before finishing the save: a run caught in the middle of saving a checkpoint
# (kill it there, or let it finish by creating CONTINUE_MARKER).
PAUSED_SAVE_RUNNER = """
import os, pathlib, runpy, sys, time
import torch
_save = torch.save
def paused_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == int(os.environ["PAUSE_AT"]):
        f.write(b"the first bytes")
        f.flush()
        pathlib.Path(os.environ["SAVE_MARKER"]).touch()
        while not os.path.exists(os.environ["CONTINUE_MARKER"]):
            time.sleep(0.05)
        f.seek(0)
        f.truncate()
    return _save(obj, f, *args, **kwargs)
torch.save = paused_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# The cascade's own output path (the authors'), without MNC's output mask head on the final boxes: the stage-2
# head (one 3x3 conv) predicts the output masks, merged by voting. The unit tests of the cascade's mechanics (and
# its reference-equivalence test) run on it.
CASCADE_OUTPUT_OPTS = (
    "MODEL.MNC.FINAL_MASK_HEAD.ENABLED", False,
    "MODEL.MNC.REFINED_MASK_LOSS", False, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", False,
    "MODEL.MNC.TEST.MASK_VOTING", True, "MODEL.MNC.PATHWAY_POOL", 2, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.3,
    "MODEL.MNC.MASK_HEAD.NUM_CONV", 1, "MODEL.MNC.TEST.MASK_THRESHOLD", 0.4,
)


def small_cfg(*opts, mnc_default: bool = False):
    """The CPU config, made smaller for unit tests, with extra ``opts`` merged in: on the cascade's own
    output path (CASCADE_OUTPUT_OPTS), or with ``mnc_default`` as the config is (MNC's default)."""
    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    cfg.merge_from_file(CPU_CONFIG)
    cfg.merge_from_list([
        *(() if mnc_default else CASCADE_OUTPUT_OPTS),
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.MNC.MASK_HEAD.FC_DIM", 64,
        "MODEL.MNC.MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 8,
        "MODEL.MNC.MASK_HEAD.MASK_SIZE", 14, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        *opts,
    ])
    return cfg


def make_targets(image_size=(200, 250), boxes=((20, 30, 120, 140), (100, 60, 230, 180)), classes=(0, 3)):
    """GT Instances with rectangular-ish masks (an ellipse inside each box)."""
    h, w = image_size
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    inst.gt_masks = BitMasks(masks)
    return inst


def make_batch(with_gt=(True, True), image_size=(200, 250), seed=0):
    """Two random images as D2 model inputs; ``with_gt`` False gives an image without annotations."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for has_gt in with_gt:
        image = (torch.rand((3, *image_size), generator=g) * 255).to(torch.uint8).float()
        targets = make_targets(image_size) if has_gt else make_targets(image_size, boxes=(), classes=())
        batch.append({"image": image, "instances": targets, "height": image_size[0], "width": image_size[1]})
    return batch


@pytest.fixture
def cfg():
    return small_cfg()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the train_net.py / demo subprocesses of one test module: its own dataset cache; one
    thread (bit-exact comparisons need the same thread count in every run, and the machine is shared)."""
    cache = tmp_path_factory.mktemp("mnc_d2_cache")
    return dict(os.environ, MNC_D2_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture
def register_tiny_shapes(tmp_path):
    """Factory: register a small 64-px synthetic-shapes dataset under ``<prefix>_<pid>`` (generated into
    tmp_path on first use); every dataset it registered is removed from D2's catalogs afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mnc_d2.data.datasets.builtin import register_mnc_shapes

    names = []

    def register(prefix: str, num_images: int, seed: int) -> str:
        name = f"{prefix}_{os.getpid()}"
        register_mnc_shapes(name, str(tmp_path / "data"), num_images=num_images, seed=seed, image_size=64)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run shared by the entry-point tests of weights loading: the instant config with
    TINY_TRAIN_NET_OPTS, 2 iterations, 5 classes. Returns (run directory, its env)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_run")
    env = dict(os.environ, MNC_D2_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", INSTANT_CONFIG,
                          *TINY_TRAIN_NET_OPTS, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()",
                          "OUTPUT_DIR", str(root / "run")], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", env


class Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what a hostile weights file does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
