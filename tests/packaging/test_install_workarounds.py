"""Each workaround that scripts/patch_detectron2_sdist.sh applies to pb1-detectron2==0.6 is checked
against the INSTALLED detectron2 by doing what fails without it. With an official detectron2 (real
C++ ops), the stub-specific checks are skipped."""
import os
import subprocess
import sys

import numpy as np
import PIL
import pytest

import detectron2
from detectron2 import _C

STUB = not hasattr(_C, "nms_rotated")  # the real extension has rotated NMS; our stub does not


def test_1_stub_extension_keeps_collect_env_and_default_setup_working():
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()  # calls _C.get_compiler_version / get_cuda_version / has_cuda


@pytest.mark.skipif(not STUB, reason="official detectron2 build: its C++ extension is real")
def test_1_the_patched_build_is_pure_python():
    from importlib import metadata

    assert _C.__file__.endswith(".py"), _C.__file__  # no compiled stub: nothing to build, no ABI to match
    dist = metadata.distribution("pb1-detectron2")
    wheel = dist.read_text("WHEEL") or ""
    assert "Root-Is-Purelib: true" in wheel and "py3-none-any" in wheel, wheel
    assert not [f for f in dist.files if str(f).endswith((".so", ".pyd"))]


def test_2_model_zoo_configs_are_packaged():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(path)


def test_3_pillow_10_has_no_image_linear_and_transforms_import():
    from PIL import Image

    if int(PIL.__version__.split(".")[0]) >= 10:
        assert not hasattr(Image, "LINEAR")
    from detectron2.data.transforms import ResizeTransform

    img = np.zeros((20, 30, 3), dtype=np.uint8)
    assert ResizeTransform(20, 30, 10, 15).apply_image(img).shape == (10, 15, 3)


@pytest.mark.slow
def test_4_model_zoo_works_without_pkg_resources():
    code = ("import sys; sys.modules['pkg_resources'] = None\n"
            "from detectron2 import model_zoo\n"
            "print(model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_5_numpy_removed_aliases_are_not_used():
    assert not hasattr(np, "float") and not hasattr(np, "int")  # numpy >= 1.24
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.structures.masks import polygons_to_bitmask

    # uses np.int (class histogram) and np.bool (masks) in the unpatched sdist
    print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])
    assert polygons_to_bitmask([], 4, 4).dtype == bool
    root = os.path.dirname(detectron2.__file__)
    offenders = subprocess.run(["grep", "-rlE", r"\bnp\.(int|float|str|object)\b", "--include=*.py", root],
                               capture_output=True, text=True).stdout.split()
    assert offenders == [], offenders


@pytest.mark.skipif(not STUB, reason="official detectron2 build: the C++ COCOeval is present")
def test_6_fast_coco_eval_falls_back_to_pycocotools():
    from pycocotools.coco import COCO

    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25,
                                   "iscrowd": 0}]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    ev = COCOeval_opt(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_7_map_dataset_falls_back_on_python_3_11():
    from detectron2.data.common import MapDataset

    dataset = MapDataset(list(range(8)), lambda x: None if x == 3 else x)  # a mapper that skips item 3
    assert dataset[3] in set(range(8)) - {3}  # random.sample(set) raised TypeError on Python >= 3.11


def test_8_legacy_mask_paste_on_numpy_2():
    import torch

    from detectron2.layers.mask_ops import paste_mask_in_image_old

    # With Pillow 12 the PIL -> numpy conversion here needs no copy, so the old line happens to work; other
    # Pillow/numpy pairs need one, and numpy >= 2 then raises. The source must not hold the pattern.
    pasted = paste_mask_in_image_old(torch.rand(14, 14), torch.tensor([2, 3, 20, 25]), 32, 32, threshold=0.5)
    assert pasted.shape == (32, 32) and pasted.dtype == torch.uint8
    root = os.path.dirname(detectron2.__file__)
    offenders = subprocess.run(["grep", "-rnE", r"np\.array\([^)]*copy=False", "--include=*.py", root],
                               capture_output=True, text=True).stdout.splitlines()
    assert offenders == [], offenders


def test_9_export_and_flop_counting_import_without_caffe2():
    import importlib.util

    import torch

    from detectron2.export import TracingAdapter
    from detectron2.utils.analysis import FlopCountAnalysis

    assert importlib.util.find_spec("caffe2") is None or not STUB  # torch >= 1.10 ships no caffe2
    model = torch.nn.Conv2d(3, 4, 3)
    flops = FlopCountAnalysis(model, (torch.rand(1, 3, 8, 8),)).total()
    assert flops == 4 * 3 * 9 * 6 * 6  # multiply-adds of the 6x6 output, as fvcore counts them
    assert TracingAdapter.__name__ == "TracingAdapter"
