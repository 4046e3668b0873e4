import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BitMasks, BoxMode, Instances

from mnc_d2.data.datasets.label_images import (
    label_image_to_annotations,
    load_label_image_pairs,
    normalize_to_uint8,
    read_label_image,
    register_label_image_dataset,
)

tifffile = pytest.importorskip("tifffile")


def _label_image():
    """(12, 10) labels: a rectangle, an L on the border, one pixel, two blobs of one id."""
    label = np.zeros((12, 10), dtype=np.uint16)
    label[1:4, 2:6] = 3  # 3 x 4 rectangle
    label[6:12, 0] = 7  # L shape touching left and bottom borders
    label[11, 0:4] = 7
    label[5, 8] = 9  # one pixel
    label[0, 9] = 20  # two separate components, one instance
    label[3, 9] = 20
    return label


@pytest.fixture
def dataset_name():
    name = f"test_label_images_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_annotations_tight_boxes_and_rle():
    label = _label_image()
    annotations = label_image_to_annotations(label, category_id=2)

    expected_boxes = {3: [2, 1, 6, 4], 7: [0, 6, 4, 12], 9: [8, 5, 9, 6], 20: [9, 0, 10, 4]}
    assert len(annotations) == len(expected_boxes)
    for annotation, (value, box) in zip(annotations, sorted(expected_boxes.items())):
        assert annotation["bbox"] == box
        assert annotation["bbox_mode"] == BoxMode.XYXY_ABS
        assert annotation["category_id"] == 2
        assert annotation["iscrowd"] == 0
        rle = annotation["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [12, 10]
        mask = mask_util.decode(rle)
        np.testing.assert_array_equal(mask, label == value)
        assert mask_util.area(rle) == (label == value).sum()


def test_min_area_mapping_and_empty():
    label = _label_image()
    kept = label_image_to_annotations(label, min_area=3)
    assert [a["bbox"] for a in kept] == [
        [2, 1, 6, 4],
        [0, 6, 4, 12],
    ]  # areas 12, 9; 1 and 2 dropped

    mapped = label_image_to_annotations(label, label_to_category={3: 0, 7: 1, 9: 1, 20: 0})
    assert [a["category_id"] for a in mapped] == [0, 1, 1, 0]
    with pytest.raises(ValueError, match=r"\[9, 20\]"):
        label_image_to_annotations(label, label_to_category={3: 0, 7: 1})

    assert label_image_to_annotations(np.zeros((4, 5), np.int32)) == []
    # integral floats are accepted (some tif label images are float32)
    assert len(label_image_to_annotations(label.astype(np.float32))) == 4


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 4), np.int32), "2-D"),
        (np.ones((3, 3), bool), "boolean"),
        (np.full((3, 3), -1, np.int32), "negative"),
        (np.full((3, 3), 0.5, np.float32), "non-integer"),
    ],
)
def test_invalid_label_images(bad, message):
    with pytest.raises(ValueError, match=message):
        label_image_to_annotations(bad)


def _write_pairs(tmp_path):
    """A 16-bit tif image + tif label, an 8-bit png image + 16-bit png label."""
    rng = np.random.default_rng(0)
    label = _label_image()
    image16 = rng.integers(1000, 3000, size=label.shape, dtype=np.uint16)
    image8 = rng.integers(0, 255, size=label.shape + (3,), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image16)
    tifffile.imwrite(tmp_path / "a_label.tif", label)
    cv2.imwrite(str(tmp_path / "b.png"), image8)
    cv2.imwrite(str(tmp_path / "b_label.png"), label)
    images = [tmp_path / "a.tif", tmp_path / "b.png"]
    labels = [tmp_path / "a_label.tif", tmp_path / "b_label.png"]
    return images, labels, image16


def test_load_pairs_from_files_and_arrays(tmp_path):
    images, labels, image16 = _write_pairs(tmp_path)
    label = _label_image()
    dicts = load_label_image_pairs(
        images + [image16], labels + [label], min_area=2, converted_dir=tmp_path / "converted"
    )
    assert [d["image_id"] for d in dicts] == [0, 1, 2]
    for d in dicts:
        assert (d["height"], d["width"]) == (12, 10)
        assert len(d["annotations"]) == 3
    # the 8-bit png is used as it is; tif and array are converted to 8-bit RGB png
    assert dicts[1]["file_name"] == str(images[1].resolve())
    for d in (dicts[0], dicts[2]):
        assert d["file_name"].startswith(str(tmp_path / "converted"))
        converted = cv2.imread(d["file_name"], cv2.IMREAD_UNCHANGED)
        assert converted.shape == (12, 10, 3) and converted.dtype == np.uint8
        np.testing.assert_array_equal(converted[..., 0], normalize_to_uint8(image16, (1.0, 99.8)))
    np.testing.assert_array_equal(read_label_image(labels[1]), label)


def test_normalize_to_uint8():
    image = np.arange(1000, dtype=np.uint16).reshape(10, 100) + 5000
    out = normalize_to_uint8(image, (0.0, 100.0))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert normalize_to_uint8(np.full((3, 3), 7, np.uint16)).max() == 0  # constant image
    same = np.arange(9, dtype=np.uint8).reshape(3, 3)
    assert normalize_to_uint8(same) is same


def test_errors_name_the_files(tmp_path):
    images, labels, _ = _write_pairs(tmp_path)
    with pytest.raises(ValueError, match="2 images but 1 label"):
        load_label_image_pairs(images, labels[:1])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_label_image_pairs([tmp_path / "missing.png"], labels[:1])
    with pytest.raises(FileNotFoundError, match="nolabel.tif"):
        load_label_image_pairs(images[:1], [tmp_path / "nolabel.tif"])
    tifffile.imwrite(tmp_path / "small_label.tif", np.zeros((5, 6), np.uint16))
    with pytest.raises(ValueError) as error:
        load_label_image_pairs(images[1:], [tmp_path / "small_label.tif"])
    for part in ("b.png", "12x10", "small_label.tif", "5x6"):
        assert part in str(error.value)


def test_register_and_mapper_bitmask(tmp_path, dataset_name):
    images, labels, _ = _write_pairs(tmp_path)
    register_label_image_dataset(
        dataset_name,
        images,
        labels,
        thing_classes=("nucleus",),
        min_area=2,
        converted_dir=tmp_path / "c",
    )
    metadata = MetadataCatalog.get(dataset_name)
    assert metadata.thing_classes == ["nucleus"] and metadata.evaluator_type == "coco"
    dicts = DatasetCatalog.get(dataset_name)
    assert len(dicts) == 2

    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    mapped = mapper(dicts[0])
    assert mapped["image"].shape == (3, 12, 10)
    instances = mapped["instances"]
    assert isinstance(instances, Instances) and isinstance(instances.gt_masks, BitMasks)
    label = _label_image()
    expected = torch.from_numpy(np.stack([label == v for v in (3, 7, 20)]))
    assert torch.equal(instances.gt_masks.tensor, expected)
    assert instances.gt_boxes.tensor.tolist() == [[2, 1, 6, 4], [0, 6, 4, 12], [9, 0, 10, 4]]
    assert instances.gt_classes.tolist() == [0, 0, 0]


def test_coco_evaluator_converts_rle_dataset(tmp_path, dataset_name):
    """D2 0.6's COCOEvaluator builds the COCO json from RLE dicts: perfect masks give AP 100."""
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes

    images, labels, _ = _write_pairs(tmp_path)
    register_label_image_dataset(
        dataset_name, images, labels, min_area=2, converted_dir=tmp_path / "c"
    )
    evaluator = COCOEvaluator(dataset_name, output_dir=str(tmp_path / "eval"))
    assert (tmp_path / "eval" / f"{dataset_name}_coco_format.json").is_file()
    evaluator.reset()
    for d in DatasetCatalog.get(dataset_name):
        masks = np.stack([mask_util.decode(a["segmentation"]) for a in d["annotations"]])
        instances = Instances((d["height"], d["width"]))
        instances.pred_boxes = Boxes(
            torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        )
        instances.pred_masks = torch.from_numpy(masks).bool()
        instances.scores = torch.ones(len(masks))
        instances.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
