"""Export (``python -m mnc_d2.tools.export``): TorchScript and ONNX, traced on one image size, checked on another
against eager PyTorch, with a fixed-seed checkpoint the test writes."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO
from mnc_d2.config import build_cfg
from mnc_d2.tools.export import ExportedPredictor, compare_instances, export_model, export_settings, preprocessed

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
# MNC's default, shrunk; score threshold 0: random weights still give DETECTIONS_PER_IMAGE detections
SMALL_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
              "MODEL.MNC.MASK_HEAD.FC_DIM", 64, "MODEL.MNC.MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
              "MODEL.RPN.POST_NMS_TOPK_TEST", 100, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
              "TEST.DETECTIONS_PER_IMAGE", 12]
SIZES = ((96, 128), (120, 90))  # (h, w): traced on the first, checked on both (landscape, then portrait)


def _image(size, seed):
    rng = np.random.default_rng(seed)
    image = np.full((*size, 3), 40, np.uint8)
    cv2.circle(image, (40, 50), 25, tuple(int(c) for c in rng.integers(100, 255, 3)), -1)
    cv2.rectangle(image, (60, 20), (85, 70), tuple(int(c) for c in rng.integers(100, 255, 3)), -1)
    return image


def _cfg(*opts):
    return build_cfg(CONFIG, [str(o) for o in (*SMALL_OPTS, *opts)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    images = []
    for i, size in enumerate(SIZES):
        images.append(str(root / f"image_{i}.png"))
        cv2.imwrite(images[-1], _image(size, i))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(_cfg()), save_dir=str(root)).save("model")
    return root, images, str(root / "model.pth")


def _export_cli(files, fmt, out, *extra_opts, images=None, threads="2"):
    root, sample_images, weights = files
    cmd = [sys.executable, "-m", "mnc_d2.tools.export", "--config-file", CONFIG, "--format", fmt,
           "--sample-image", *(images or sample_images), "--output", str(out), "MODEL.WEIGHTS", weights,
           *map(str, SMALL_OPTS), *map(str, extra_opts)]
    # two threads, as the CPU machine runs it (the export must not depend on the thread count)
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_on_another_image_size(files, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / fmt
    proc = _export_cli(files, fmt, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "matches eager PyTorch on 2 image(s)" in proc.stdout
    check = json.loads((out / "export_check.json").read_text())
    settings = json.loads((out / "mnc_export.json").read_text())
    traced, other = (check["images"][p] for p in files[1])
    assert traced["input_size"] == settings["traced_image_size"] != other["input_size"]
    for result in (traced, other):
        assert result["ok"] and result["same_classes"] and result["min_mask_iou"] >= 0.99
        assert result["box_max_rel_diff"] <= 1e-4 and result["score_max_rel_diff"] <= 1e-4
    assert other["masked_detections"] >= 5

    # the artifact + the documented post-processing, in this process: D2-standard Instances at image size
    root, images, weights = files
    exported = ExportedPredictor(str(out))
    eager = DefaultPredictor(_cfg("MODEL.WEIGHTS", weights))
    image = cv2.imread(images[1])
    got, want = exported(image)["instances"], eager(image)["instances"]
    assert got.image_size == want.image_size == image.shape[:2]
    assert set(got.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    assert got.pred_masks.dtype == torch.bool and got.pred_masks.shape[1:] == image.shape[:2]
    assert compare_instances(want, got)["ok"]


def test_five_stages_with_voting_export(files, tmp_path):
    """The paper's output path: five stages (the refined boxes are traced) and voting (in the Python step)."""
    opts = ["MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.FINAL_MASK_HEAD.ENABLED", False, "MODEL.MNC.REFINED_MASK_LOSS", False, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", False,
            "MODEL.MNC.TEST.MASK_VOTING", True]
    cfg = _cfg(*opts)
    torch.manual_seed(1)
    eager = DefaultPredictor(cfg)  # MODEL.WEIGHTS empty: the random weights of the seed
    images = [_image(size, 5 + i) for i, size in enumerate(SIZES)]
    traced_on = preprocessed(eager, images[0])
    export_model(eager.model, traced_on, "torchscript", str(tmp_path / "model.ts"))
    (tmp_path / "mnc_export.json").write_text(json.dumps(export_settings(cfg, "torchscript", traced_on.shape[-2:])))
    exported = ExportedPredictor(str(tmp_path))
    assert exported.model.settings["postprocess"]["mask_voting"] is True
    result = compare_instances(eager(images[1])["instances"], exported(images[1])["instances"])
    assert result["ok"], result
    assert result["masked_detections"] >= 5


def _instances(boxes, scores, classes, masks):
    inst = Instances((8, 8))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    inst.pred_masks = torch.tensor(masks)
    return inst


def test_compare_instances_finds_each_kind_of_difference():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:6, 2:6] = True
    ref = _instances([[1, 1, 6, 6]], [0.9], [2], mask)
    assert compare_instances(ref, ref)["ok"]
    assert compare_instances(ref, _instances([[1, 1, 6, 6.01]], [0.9], [2], mask))["reason"] == "boxes differ"
    assert compare_instances(ref, _instances([[1, 1, 6, 6]], [0.8], [2], mask))["reason"] == "scores differ"
    assert compare_instances(ref, _instances([[1, 1, 6, 6]], [0.9], [1], mask))["reason"] == "classes differ"
    other = mask.copy()
    other[0, 2, 2] = False  # IoU 15/16 < 0.99
    assert compare_instances(ref, _instances([[1, 1, 6, 6]], [0.9], [2], other))["reason"] == "masks differ"
    assert not compare_instances(ref, ref[[]])["ok"]


@pytest.mark.slow
def test_missing_sample_image_is_one_error_line(files, tmp_path):
    missing = str(tmp_path / "nope.png")
    proc = _export_cli(files, "torchscript", tmp_path / "out", images=[missing], threads="1")
    assert proc.returncode == 2
    assert f"ERROR: Image file {missing} does not exist." in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_python_config_is_refused_by_name(tmp_path, capsys):
    from mnc_d2.tools import export

    lazy = os.path.join(REPO, "configs", "lazy", "mnc_R18_GN_FPN_shapes_cpu.py")
    assert export.main(["--config-file", lazy, "--format", "torchscript", "--sample-image", "a.png",
                        "--output", str(tmp_path)]) == 2
    assert "mnc_d2.export takes a yaml config" in capsys.readouterr().err
