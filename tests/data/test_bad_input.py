"""Bad input gives a clear error (naming the file / key and the reason) or a clean, logged skip.

Cases: corrupt, truncated, missing and non-image files; grayscale, RGBA, palette and 16-bit images;
an image whose size disagrees with its annotation; empty / degenerate / NaN polygons, zero-area and
outside boxes, RLE of the wrong size or garbage, a missing segmentation, category ids out of range;
images without annotations (FILTER_EMPTY_ANNOTATIONS on and off); malformed COCO json files;
missing image files; an empty or unregistered dataset; config files and options with unknown keys,
wrong types, bad YAML; --eval-only without usable weights. Plus a property test of the
annotation -> Instances path and a short training run on a dataset holding several of these.
"""
import argparse
import copy
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_util

from conftest import REPO, small_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BitMasks, BoxMode

from mnc_d2.data.datasets.label_images import normalize_to_uint8
from mnc_d2.data.image_io import read_image
from mnc_d2.data.mapper import RobustDatasetMapper
from mnc_d2.data.validation import load_dataset_dicts
from mnc_d2.engine import Trainer, load_weights_for_eval, setup_cfg
from mnc_d2.utils.errors import (BadImageError, CheckpointError, CheckpointNotFoundError, ConfigError, CorruptImageError,
                           DatasetError, ImageNotFoundError, ImageSizeMismatchError, MNCError)

SIZE = 64  # side of the test images
NUM_CLASSES = 5


def _rgb_image(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image[16:48, 16:48] = (250, 30, 30)
    return image


def _square_annotation(category_id=0):
    return {"bbox": [16.0, 16.0, 32.0, 32.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id,
            "segmentation": [[16.0, 16.0, 48.0, 16.0, 48.0, 48.0, 16.0, 48.0]], "iscrowd": 0}


def _record(path, annotations=None, height=SIZE, width=SIZE):
    return {"file_name": str(path), "height": height, "width": width, "image_id": os.path.basename(str(path)),
            "annotations": [_square_annotation()] if annotations is None else annotations}


def _mapper(is_train=True, bad_image="skip", mask_format="bitmask", size=SIZE):
    return RobustDatasetMapper(is_train, augmentations=[T.ResizeShortestEdge(size, size)], image_format="BGR",
                               use_instance_mask=True, instance_mask_format=mask_format, bad_image=bad_image)


@pytest.fixture
def files(tmp_path):
    """One image file per kind of problem (and the good ones)."""
    paths = {}
    paths["good"] = tmp_path / "good.png"
    Image.fromarray(_rgb_image()).save(paths["good"])
    paths["gray"] = tmp_path / "gray.png"
    Image.fromarray(_rgb_image()[:, :, 0]).save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([_rgb_image(), np.full((SIZE, SIZE), 128, np.uint8)])).save(paths["rgba"])
    paths["palette"] = tmp_path / "palette.png"
    Image.fromarray(_rgb_image()).convert("P").save(paths["palette"])
    paths["16bit"] = tmp_path / "16bit.png"
    Image.fromarray((_rgb_image()[:, :, 0].astype(np.uint16) * 257)).save(paths["16bit"])
    paths["truncated"] = tmp_path / "truncated.png"
    paths["truncated"].write_bytes(paths["good"].read_bytes()[:300])
    paths["jpeg_truncated"] = tmp_path / "truncated.jpg"
    Image.fromarray(_rgb_image()).save(tmp_path / "full.jpg", quality=90)
    paths["jpeg_truncated"].write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    paths["not_an_image"] = tmp_path / "notes.png"
    paths["not_an_image"].write_text("this is not an image")
    paths["missing"] = tmp_path / "missing.png"
    paths["wrong_size"] = tmp_path / "wrong_size.png"
    Image.fromarray(_rgb_image()[:, : SIZE // 2]).save(paths["wrong_size"])  # 32 wide, annotated as 64
    return paths


@pytest.fixture
def register(request):
    """register(name, dicts or callable, **metadata): a dataset removed again after the test."""
    names = []

    def _register(name, dicts, **metadata):
        names.append(name)
        DatasetCatalog.register(name, dicts if callable(dicts) else (lambda: copy.deepcopy(dicts)))
        MetadataCatalog.get(name).set(thing_classes=[f"c{i}" for i in range(NUM_CLASSES)], **metadata)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("kind, error", [("missing", ImageNotFoundError), ("truncated", CorruptImageError),
                                         ("jpeg_truncated", CorruptImageError), ("not_an_image", CorruptImageError)])
def test_unreadable_image_errors_name_the_file(files, kind, error):
    with pytest.raises(error) as info:
        read_image(str(files[kind]), "BGR")
    assert str(files[kind]) in str(info.value) and info.value.file_name == str(files[kind])
    assert isinstance(info.value, (BadImageError, OSError))


@pytest.mark.parametrize("kind", ["good", "gray", "rgba", "palette", "16bit"])
def test_other_image_modes_load_as_8bit_bgr(files, kind):
    image = read_image(str(files[kind]), "BGR")
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    expected = _rgb_image()[:, :, 0]
    if kind == "16bit":  # the project's one rule for deeper images: percentile normalisation
        expected = normalize_to_uint8(expected.astype(np.uint16) * 257)
    if kind != "palette":  # a palette quantises colours
        assert np.array_equal(image[:, :, 2], expected), "red channel (BGR index 2) / gray value kept"


def test_16bit_microscopy_range_is_stretched_not_flat(tmp_path):
    """HeLa-like frames (values 33000-37000): a fixed 65535 -> 255 scaling made them flat grey (129-144),
    PIL alone all white; the percentile rule (the one that made the HeLa training crops) spreads them."""
    path = tmp_path / "frame16.png"
    frame = np.linspace(33000, 37000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(frame).save(path)
    image = read_image(str(path), "BGR")[:, :, 0]
    assert np.array_equal(image, normalize_to_uint8(frame))
    assert image.min() == 0 and image.max() == 255


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_an_image", "wrong_size"])
def test_training_skips_bad_image_with_log_and_count(files, kind, caplog):
    mapper = _mapper()
    with caplog.at_level(logging.WARNING, logger="mnc_d2.data.mapper"):
        assert mapper(_record(files[kind])) is None
        assert mapper(_record(files[kind])) is None
    assert mapper.num_skipped_images == 2
    assert str(files[kind]) in caplog.text and "2 skipped so far" in caplog.text
    assert mapper(_record(files["good"]))["instances"].gt_boxes.tensor.shape == (1, 4)


def test_training_raises_on_bad_image_when_configured(files):
    with pytest.raises(CorruptImageError, match="truncated.png"):
        _mapper(bad_image="raise")(_record(files["truncated"]))


@pytest.mark.parametrize("kind", ["missing", "truncated", "wrong_size"])
def test_evaluation_raises_on_bad_image(files, kind):
    with pytest.raises(BadImageError, match=str(files[kind].name)):
        _mapper(is_train=False)(_record(files[kind]))


def test_size_mismatch_names_file_and_both_sizes(files):
    with pytest.raises(ImageSizeMismatchError) as info:
        _mapper(bad_image="raise")(_record(files["wrong_size"]))
    message = str(info.value)
    assert "wrong_size.png" in message and "32x64" in message and "64x64" in message


def test_many_bad_images_in_a_row_stop_training(files):
    mapper = _mapper()
    with pytest.raises(BadImageError, match="in a row"):
        for _ in range(25):
            mapper(_record(files["missing"]))


# --------------------------------------------------------------------------- annotations


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def test_malformed_annotations_are_dropped(files):
    square = np.zeros((SIZE, SIZE), bool)
    square[16:48, 16:48] = True
    uncompressed = {"size": [SIZE, SIZE], "counts": [int(v) for v in _uncompressed_counts(square)]}
    good, bad = _square_annotation(), []
    bad.append(dict(good, segmentation=[]))  # empty polygon list
    bad.append(dict(good, segmentation=[[1.0, 2.0, 3.0, 4.0]]))  # 2 points
    bad.append(dict(good, segmentation=[[1.0, 2.0, 3.0, 4.0, 5.0]]))  # odd length
    bad.append(dict(good, segmentation=[[float("nan")] * 8]))
    bad.append(dict(good, bbox=[float("nan"), 0, 10, 10]))
    bad.append(dict(good, bbox="16 16 32 32"))
    bad.append(dict(good, segmentation=_rle(np.ones((SIZE + 1, SIZE), bool))))  # RLE of another size
    bad.append(dict(good, segmentation={"size": [SIZE, SIZE], "counts": "garbage!!"}))
    bad.append(dict(good, segmentation="not a mask"))
    bad.append({k: v for k, v in good.items() if k != "segmentation"})
    bad.append(dict(good, bbox=[32.0, 32.0, -64.0, 64.0]))  # negative width: D2 would make it [0, 32, 32, 96]
    degenerate = [dict(good, bbox=[20.0, 20.0, 0.0, 0.0]),  # zero area
                  dict(good, bbox=[200.0, 200.0, 10.0, 10.0], segmentation=[[200.0, 200, 210, 200, 210, 210]])]  # outside
    kept = [good, dict(good, segmentation=_rle(square)), dict(good, segmentation=uncompressed)]
    mapper = _mapper()
    out = mapper(_record(files["good"], bad + degenerate + kept))
    instances = out["instances"]
    assert len(instances) == len(kept) and mapper.num_dropped_annotations == len(bad)
    assert torch.isfinite(instances.gt_boxes.tensor).all()
    assert instances.gt_masks.tensor.shape == (len(kept), SIZE, SIZE)
    assert all(int(m.sum()) == 32 * 32 for m in instances.gt_masks.tensor)
    assert instances.gt_boxes.tensor.tolist() == [[16.0, 16.0, 48.0, 48.0]] * len(kept)  # no clipped negative box


def _uncompressed_counts(mask):
    """COCO's uncompressed RLE counts (column-major run lengths, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


@pytest.mark.parametrize("category_id", [7, -1])
def test_category_id_out_of_range_is_a_clear_error(files, register, category_id):
    name = register(f"bad_category_ids{category_id}", [_record(files["good"], [_square_annotation(category_id)])])
    with pytest.raises(DatasetError, match=rf"bad_category_ids.*good.png.*category_id {category_id}.*NUM_CLASSES"):
        load_dataset_dicts([name], is_train=True, num_classes=NUM_CLASSES)


def test_rle_with_polygon_mask_format_is_a_clear_error(files):
    square = np.zeros((SIZE, SIZE), bool)
    square[2:9, 2:9] = True
    with pytest.raises(DatasetError, match="MASK_FORMAT bitmask"):
        _mapper(mask_format="polygon")(_record(files["good"], [dict(_square_annotation(), segmentation=_rle(square))]))


def test_images_without_annotations(files, register):
    dicts = [_record(files["good"]), _record(files["gray"], []), _record(files["rgba"], [])]
    name = register("some_empty", dicts)
    assert len(load_dataset_dicts([name], is_train=True, filter_empty=True)) == 1
    kept = load_dataset_dicts([name], is_train=True, filter_empty=False)
    assert len(kept) == 3
    assert len(_mapper()(kept[1])["instances"]) == 0  # trains with zero instances (see the training test)
    all_empty = register("all_empty", [_record(files["gray"], [])])
    with pytest.raises(DatasetError, match="FILTER_EMPTY_ANNOTATIONS"):
        load_dataset_dicts([all_empty], is_train=True, filter_empty=True)


# --------------------------------------------------------------------------- datasets


def _coco(files):
    return {"images": [{"id": 1, "file_name": files["good"].name, "height": SIZE, "width": SIZE}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 16, 32, 32], "area": 1024,
                             "iscrowd": 0, "segmentation": [[16, 16, 48, 16, 48, 48, 16, 48]]}],
            "categories": [{"id": 1, "name": "square"}]}


def _break(key_path, value=None, delete=False):
    def apply(data):
        node = data
        for part in key_path[:-1]:
            node = node[part]
        if delete:
            del node[key_path[-1]]
        else:
            node[key_path[-1]] = value
        return data
    return apply


@pytest.mark.parametrize("case, change, expected", [
    ("no_images", _break(["images"], delete=True), "missing top-level key 'images'"),
    ("no_categories", _break(["categories"], delete=True), "missing top-level key 'categories'"),
    ("annotations_not_list", _break(["annotations"], {"id": 1}), "'annotations' must be a list"),
    ("image_without_height", _break(["images", 0, "height"], delete=True), "KeyError: 'height'"),
    ("annotation_without_bbox", _break(["annotations", 0, "bbox"], delete=True), "missing key 'bbox'"),
    ("bbox_is_a_string", _break(["annotations", 0, "bbox"], "16 16 32 32"), "key 'bbox' must be"),
    ("unknown_category", _break(["annotations", 0, "category_id"], 9), "category_id=9 but this id does not exist in 'categories'"),
    ("height_is_a_string", _break(["images", 0, "height"], "64"), "'height' must be a positive integer, got str '64'"),
])
def test_malformed_coco_json_names_file_and_key(tmp_path, files, case, change, expected):
    json_file = tmp_path / f"{case}.json"
    json_file.write_text(json.dumps(change(_coco(files))))
    name = f"malformed_{case}"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    try:
        with pytest.raises(DatasetError) as info:
            load_dataset_dicts([name], is_train=True, num_classes=NUM_CLASSES)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert str(json_file) in str(info.value) and expected in str(info.value), str(info.value)


def test_invalid_json_syntax(tmp_path):
    json_file = tmp_path / "broken.json"
    json_file.write_text('{"images": [{"id": 1,')
    register_coco_instances("broken_json", {}, str(json_file), str(tmp_path))
    try:
        with pytest.raises(DatasetError, match=r"broken.json: not valid JSON .*line 1"):
            load_dataset_dicts(["broken_json"], is_train=False)
    finally:
        DatasetCatalog.remove("broken_json")
        MetadataCatalog.remove("broken_json")


def test_missing_image_files(files, register, caplog):
    name = register("with_missing", [_record(files["good"]), _record(files["missing"])])
    with caplog.at_level(logging.WARNING, logger="mnc_d2.data.validation"):
        assert len(load_dataset_dicts([name], is_train=True)) == 1
    assert "missing.png" in caplog.text and "1 of 2 image files do not exist" in caplog.text
    with pytest.raises(DatasetError, match="missing.png"):
        load_dataset_dicts([name], is_train=False)  # evaluation: never silently smaller
    with pytest.raises(DatasetError, match="missing.png"):
        load_dataset_dicts([name], is_train=True, bad_image="raise")
    only_missing = register("only_missing", [_record(files["missing"])])
    with pytest.raises(DatasetError, match="image root"):
        load_dataset_dicts([only_missing], is_train=True)


def test_empty_or_unregistered_validation_set(tmp_path, register):
    cfg = small_cfg()
    empty_json = tmp_path / "empty.json"
    empty_json.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    register_coco_instances("empty_val", {}, str(empty_json), str(tmp_path))
    try:
        with pytest.raises(DatasetError, match=r"Dataset 'empty_val' has no images \(from .*empty.json\)"):
            Trainer.build_test_loader(cfg, "empty_val")
    finally:
        DatasetCatalog.remove("empty_val")
        MetadataCatalog.remove("empty_val")
    with pytest.raises(DatasetError, match="'no_such_val' is not registered"):
        Trainer.build_test_loader(cfg, "no_such_val")


# --------------------------------------------------------------------------- property test


_coords = st.one_of(st.floats(min_value=-40, max_value=120, width=32),
                    st.sampled_from([float("nan"), float("inf"), -float("inf")]))
_polygon = st.lists(_coords, min_size=0, max_size=12)


@st.composite
def _annotation(draw, height, width):
    mode = draw(st.sampled_from([BoxMode.XYWH_ABS, BoxMode.XYXY_ABS]))
    bbox = draw(st.lists(_coords, min_size=3, max_size=5))
    kind = draw(st.sampled_from(["polygons", "rle", "rle_wrong_size", "uncompressed_rle", "garbage"]))
    if kind == "polygons":
        segmentation = draw(st.lists(_polygon, min_size=0, max_size=3))
    elif kind == "garbage":
        segmentation = draw(st.sampled_from([None, "x", {"size": [height, width], "counts": "@@"}, [[]], 3]))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        mask = rng.random((height, width)) < draw(st.sampled_from([0.0, 0.1, 0.9]))
        if kind == "rle_wrong_size":
            mask = mask[:, : max(1, width - 1)]
        segmentation = {"size": [height, width], "counts": _uncompressed_counts(mask)} if kind == "uncompressed_rle" \
            else _rle(mask)
    return {"bbox": bbox, "bbox_mode": mode, "category_id": draw(st.integers(0, NUM_CLASSES - 1)),
            "segmentation": segmentation, "iscrowd": draw(st.sampled_from([0, 0, 0, 1]))}


@st.composite
def _image_record(draw):
    height, width = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    annotations = draw(st.lists(_annotation(height, width), max_size=5))
    return {"file_name": f"in-memory-{height}x{width}", "height": height, "width": width, "annotations": annotations}


class _InMemoryMapper(RobustDatasetMapper):
    def read_image(self, dataset_dict):
        return np.zeros((dataset_dict["height"], dataset_dict["width"], 3), np.uint8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_image_record(), flip=st.booleans(), short_side=st.integers(10, 40))
def test_mapper_output_is_always_valid(record, flip, short_side):
    """Random boxes / polygons / RLE, degenerate ones included -> valid Instances, no crash."""
    augmentations = [T.ResizeShortestEdge(short_side, 64)] + ([T.RandomFlip(prob=1.0)] if flip else [])
    mapper = _InMemoryMapper(True, augmentations=augmentations, image_format="BGR", use_instance_mask=True,
                             instance_mask_format="bitmask")
    out = mapper(record)
    height, width = out["image"].shape[1:]
    instances = out["instances"]
    boxes = instances.gt_boxes.tensor
    assert boxes.shape == (len(instances), 4) and torch.isfinite(boxes).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((instances.gt_classes >= 0) & (instances.gt_classes < NUM_CLASSES)).all()
    if len(instances):
        assert isinstance(instances.gt_masks, BitMasks)
        assert instances.gt_masks.tensor.shape == (len(instances), height, width)
        assert instances.gt_masks.tensor.flatten(1).any(dim=1).all(), "no empty masks"


# --------------------------------------------------------------------------- training


def test_training_on_a_dataset_with_bad_images(files, register, tmp_path, caplog):
    """Grayscale, RGBA, palette and 16-bit images train; a truncated and a non-image file are skipped
    and counted; images without annotations train with FILTER_EMPTY_ANNOTATIONS False."""
    kinds = ["good", "gray", "rgba", "palette", "16bit", "truncated", "not_an_image"]
    dicts = [_record(files[k]) for k in kinds] + [_record(files["good"], [])]
    name = register("bad_images_train", dicts)
    cfg = small_cfg("DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 6,
                    "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 0, "INPUT.MIN_SIZE_TRAIN", (SIZE,),
                    "INPUT.MAX_SIZE_TRAIN", SIZE, "DATALOADER.NUM_WORKERS", 0,
                    "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "OUTPUT_DIR", str(tmp_path / "out"))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with caplog.at_level(logging.WARNING, logger="mnc_d2.data.mapper"):
        trainer.train()
    assert trainer.iter == 6
    assert "Skipping training image" in caplog.text  # 12 of 8 images drawn: the bad ones come up
    skipped = {line.split(" cannot be decoded")[0].split()[-1] for line in caplog.text.splitlines() if "Skipping" in line}
    assert skipped <= {str(files["truncated"]), str(files["not_an_image"])}
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert max(m.get("data/skipped_images", 0) for m in metrics) >= 1


# --------------------------------------------------------------------------- config and weights


def _args(config_file, *opts, **flags):
    return argparse.Namespace(config_file=str(config_file), opts=list(opts), eval_only=False, resume=False, **flags)


@pytest.fixture
def config_files(tmp_path):
    base = tmp_path / "Base.yaml"
    base.write_text(f'_BASE_: "{os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml")}"\n'
                    "SOLVER:\n  MAX_ITER: 10\n  BASE_LRR: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "Base.yaml"\nSOLVER:\n  IMS_PER_BATCH: 2\n')
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text(f'_BASE_: "{os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml")}"\n'
                          'SOLVER:\n  MAX_ITER: "ten"\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("SOLVER:\n  MAX_ITER: [10\n")
    good = tmp_path / "good.yaml"
    good.write_text(f'_BASE_: "{os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml")}"\n')
    return dict(child=child, base=base, wrong_type=wrong_type, bad_yaml=bad_yaml, good=good)


def test_config_errors_name_file_and_key(config_files, tmp_path):
    with pytest.raises(ConfigError) as info:  # the unknown key is in the _BASE_ file, not the one passed
        setup_cfg(_args(config_files["child"]))
    assert str(config_files["base"]) in str(info.value) and "SOLVER.BASE_LRR" in str(info.value)
    assert "did you mean SOLVER.BASE_LR" in str(info.value)
    with pytest.raises(ConfigError, match=r"wrong_type.yaml: Type mismatch \(<class .int.> vs. <class .str.>\).* SOLVER.MAX_ITER"):
        setup_cfg(_args(config_files["wrong_type"]))
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        setup_cfg(_args(config_files["bad_yaml"]))
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        setup_cfg(_args(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="Command-line option MODEL.NOT_A_KEY 1: unknown config key MODEL.NOT_A_KEY"):
        setup_cfg(_args(config_files["good"], "MODEL.NOT_A_KEY", "1"))
    with pytest.raises(ConfigError, match="Command-line option SOLVER.MAX_ITER many: Type mismatch .* SOLVER.MAX_ITER"):
        setup_cfg(_args(config_files["good"], "SOLVER.MAX_ITER", "many"))
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        setup_cfg(_args(config_files["good"], "SOLVER.MAX_ITER"))
    with pytest.raises(ConfigError, match="BAD_TRAIN_IMAGE must be 'skip' or 'raise'"):
        setup_cfg(_args(config_files["good"], "MNC_RELIABILITY.BAD_TRAIN_IMAGE", "ignore"))


def test_eval_weights_errors(tmp_path):
    from detectron2.modeling import build_model

    cfg = small_cfg("OUTPUT_DIR", str(tmp_path))
    model = build_model(cfg)
    with pytest.raises(CheckpointNotFoundError, match="MODEL.WEIGHTS is empty"):
        load_weights_for_eval(cfg, model)  # D2 0.6 would evaluate a random model
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    with pytest.raises(CheckpointNotFoundError, match=r"MODEL.WEIGHTS=.*model_final.pth.*does not exist"):
        load_weights_for_eval(cfg, model)
    (tmp_path / "model_final.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint .*model_final.pth"):
        load_weights_for_eval(cfg, model)


def _train_net(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_train_net_reports_input_errors_without_traceback(tmp_path, config_files):
    """Through the entry point: exit status 2, one message naming the file / key, no traceback."""
    missing = tmp_path / "missing_model.pth"
    out = _train_net("--config-file", str(config_files["good"]), "--eval-only", "MODEL.WEIGHTS", str(missing),
                     "OUTPUT_DIR", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"MODEL.WEIGHTS='{missing}'" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout

    out = _train_net("--config-file", str(config_files["child"]), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "SOLVER.BASE_LRR" in out.stderr and str(config_files["base"]) in out.stderr


def test_mnc_errors_are_builtin_errors_too():
    """Callers catching the builtin error keep working."""
    assert issubclass(ImageNotFoundError, FileNotFoundError) and issubclass(DatasetError, ValueError)
    assert issubclass(CorruptImageError, OSError) and issubclass(ConfigError, MNCError)


def test_an_image_above_the_pixel_limit_is_refused_before_decoding(files, monkeypatch):
    from PIL import Image

    from mnc_d2.data.image_io import read_image
    from mnc_d2.utils.errors import CorruptImageError

    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(CorruptImageError, match=rf"{files['good'].name} is {SIZE}x{SIZE} pixels, more than "
                                                r"MNC_RELIABILITY.MAX_IMAGE_PIXELS=100"):
        read_image(str(files["good"]), "BGR", max_pixels=100)
