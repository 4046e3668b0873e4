"""Tests of the SBD / VOC2012 instance-segmentation loaders and their registration.

Fixtures are written in the real formats: SBD's MATLAB structs (GTinst, GTcls)
with scipy.io.savemat, VOC's palette PNGs with Pillow.
"""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import scipy.io
import scipy.sparse
import torch
from detectron2.structures import BitMasks
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, Instances

from mnc_d2.data.datasets.voc_sbd import (
    VOC_CLASSES,
    load_sbd_instances,
    load_voc_seg_instances,
    register_all_voc_sbd,
)
from mnc_d2.evaluation import MaskAPrEvaluator

H, W = 12, 16
PERSON, DOG, CAT, TRAIN = 15, 12, 8, 19  # VOC class ids 1..20


def label_maps():
    """Instance map, class map and per-instance classes of one 12 x 16 image.

    Instance 1: person, rows 1..5, cols 2..7; instance 2: dog, rows 7..10, cols 9..14,
    with a one-pixel void (255) band around it as in VOC.
    """
    instances = np.zeros((H, W), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    instances[1:6, 2:8], classes[1:6, 2:8] = 1, PERSON
    instances[6:12, 8:16], classes[6:12, 8:16] = 255, 255  # void band
    instances[7:11, 9:15], classes[7:11, 9:15] = 2, DOG
    return instances, classes, [PERSON, DOG]


def write_sbd(root, splits):
    """Write <root>/sbd/dataset with one image per id; `splits` maps split -> ids."""
    dataset_dir = root / "sbd" / "dataset"
    for sub in ("img", "inst", "cls"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    instances, classes, categories = label_maps()
    instances = np.where(instances == 255, 0, instances).astype(np.uint8)  # SBD has no void
    classes = np.where(classes == 255, 0, classes).astype(np.uint8)
    boundaries = np.empty((len(categories), 1), dtype=object)
    for i in range(len(categories)):
        boundaries[i, 0] = scipy.sparse.csc_matrix((instances == i + 1).astype(np.uint8))
    for image_id in sorted({i for ids in splits.values() for i in ids}):
        Image.new("RGB", (W, H)).save(dataset_dir / "img" / f"{image_id}.jpg")
        gt_inst = {
            "Segmentation": instances,
            "Categories": np.array(categories, np.uint8).reshape(-1, 1),
            "Boundaries": boundaries,
        }
        gt_cls = {
            "Segmentation": classes,
            "CategoriesPresent": np.array(sorted(set(categories)), np.uint8).reshape(-1, 1),
            "Boundaries": boundaries,
        }
        scipy.io.savemat(dataset_dir / "inst" / f"{image_id}.mat", {"GTinst": gt_inst})
        scipy.io.savemat(dataset_dir / "cls" / f"{image_id}.mat", {"GTcls": gt_cls})
    for split, ids in splits.items():
        (dataset_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return dataset_dir


def voc_palette():
    """The VOC colour map (bit-interleaved), 256 RGB entries."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def save_palette_png(array, path):
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def write_voc(root, splits):
    dataset_dir = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    instances, classes, _ = label_maps()
    # Instance 3: mostly cat, with a few train pixels: its class is the majority, cat.
    instances[0:4, 11:15] = 3
    classes[0:4, 11:15] = CAT
    classes[0, 11:14] = TRAIN
    for image_id in sorted({i for ids in splits.values() for i in ids}):
        Image.new("RGB", (W, H)).save(dataset_dir / "JPEGImages" / f"{image_id}.jpg")
        save_palette_png(instances, dataset_dir / "SegmentationObject" / f"{image_id}.png")
        save_palette_png(classes, dataset_dir / "SegmentationClass" / f"{image_id}.png")
    for split, ids in splits.items():
        (dataset_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    return dataset_dir


def decode(annotation):
    return mask_util.decode(annotation["segmentation"]).astype(bool)


def check_person_and_dog(record, annotations):
    person, dog = annotations
    assert (record["height"], record["width"]) == (H, W)
    assert person["category_id"] == VOC_CLASSES.index("person") == PERSON - 1
    assert dog["category_id"] == VOC_CLASSES.index("dog") == DOG - 1
    expected_person = np.zeros((H, W), bool)
    expected_person[1:6, 2:8] = True
    expected_dog = np.zeros((H, W), bool)
    expected_dog[7:11, 9:15] = True  # the void band is not part of the object
    np.testing.assert_array_equal(decode(person), expected_person)
    np.testing.assert_array_equal(decode(dog), expected_dog)
    assert person["bbox_mode"] == BoxMode.XYWH_ABS
    assert person["bbox"] == [2, 1, 6, 5] and dog["bbox"] == [9, 7, 6, 4]
    assert all(
        a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str) for a in annotations
    )


def test_load_sbd(tmp_path):
    dataset_dir = write_sbd(
        tmp_path, {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}
    )
    dicts = load_sbd_instances(str(dataset_dir), "train")
    assert [d["image_id"] for d in dicts] == ["2008_000001", "2008_000002"]
    assert dicts[0]["file_name"] == str(dataset_dir / "img" / "2008_000001.jpg")
    check_person_and_dog(dicts[0], dicts[0]["annotations"])
    assert len(load_sbd_instances(str(dataset_dir), "val")) == 1


def test_sbd_falls_back_to_class_map_and_skips_void(tmp_path):
    dataset_dir = write_sbd(tmp_path, {"train": ["a"]})
    instances, classes, _ = label_maps()  # with the 255 band this time
    classes = np.where(classes == 255, 0, classes).astype(np.uint8)
    # Only the person's category is listed: the dog's class comes from GTcls.
    scipy.io.savemat(
        dataset_dir / "inst" / "a.mat",
        {
            "GTinst": {
                "Segmentation": instances,
                "Categories": np.array([[PERSON]], np.uint8),
                "Boundaries": np.empty((0, 1), object),
            }
        },
    )
    scipy.io.savemat(dataset_dir / "cls" / "a.mat", {"GTcls": {"Segmentation": classes}})
    (record,) = load_sbd_instances(str(dataset_dir), "train")
    check_person_and_dog(record, record["annotations"])


def test_load_voc(tmp_path):
    dataset_dir = write_voc(
        tmp_path, {"train": ["2007_000032"], "val": ["2007_000033", "2007_000034"]}
    )
    with Image.open(dataset_dir / "SegmentationObject" / "2007_000032.png") as png:
        assert png.mode == "P"
    dicts = load_voc_seg_instances(str(dataset_dir), "val")
    assert [d["image_id"] for d in dicts] == ["2007_000033", "2007_000034"]
    assert dicts[0]["file_name"] == str(dataset_dir / "JPEGImages" / "2007_000033.jpg")
    person, dog, cat = dicts[0]["annotations"]
    check_person_and_dog(dicts[0], [person, dog])
    assert cat["category_id"] == CAT - 1
    assert cat["bbox"] == [11, 0, 4, 4] and decode(cat).sum() == 16


def test_missing_dataset_error_names_path_and_env(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_sbd_instances(str(tmp_path / "sbd" / "dataset"), "train")
    message = str(error.value)
    assert str(tmp_path / "sbd" / "dataset" / "train.txt") in message
    assert "DETECTRON2_DATASETS" in message and "inst/<id>.mat" in message
    with pytest.raises(FileNotFoundError, match="SegmentationObject"):
        load_voc_seg_instances(str(tmp_path / "VOC2012"), "val")


def test_missing_image_file_is_reported(tmp_path):
    dataset_dir = write_sbd(tmp_path, {"train": ["a"]})
    (dataset_dir / "inst" / "a.mat").unlink()
    with pytest.raises(FileNotFoundError, match="inst/a.mat"):
        load_sbd_instances(str(dataset_dir), "train")


def test_rgb_label_png_is_rejected(tmp_path):
    dataset_dir = write_voc(tmp_path, {"train": ["x"]})
    Image.new("RGB", (W, H)).save(dataset_dir / "SegmentationObject" / "x.png")
    with pytest.raises(ValueError, match="palette"):
        load_voc_seg_instances(str(dataset_dir), "train")


NAMES = ("sbd_2012_train", "sbd_2012_val", "voc_2012_seg_train", "voc_2012_seg_val")


def test_registration_is_lazy_and_idempotent(tmp_path, monkeypatch):
    missing_root = tmp_path / "nowhere"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing_root))
    register_all_voc_sbd()  # reads the variable now; touches no file
    register_all_voc_sbd()
    for name in NAMES:
        assert name in DatasetCatalog.list()
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == list(VOC_CLASSES) and len(metadata.thing_classes) == 20
        assert metadata.evaluator_type == "mapr"
        assert metadata.dirname.startswith(str(missing_root))
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS"):
        DatasetCatalog.get("sbd_2012_val")

    # Registering another root re-points the names.
    write_sbd(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    write_voc(tmp_path, {"train": ["d"], "val": ["e"]})
    register_all_voc_sbd(str(tmp_path))
    assert [d["image_id"] for d in DatasetCatalog.get("sbd_2012_train")] == ["a", "b"]
    assert [d["image_id"] for d in DatasetCatalog.get("voc_2012_seg_val")] == ["e"]
    assert MetadataCatalog.get("sbd_2012_val").split == "val"


def test_ground_truth_as_predictions_scores_full_mapr(tmp_path):
    write_sbd(tmp_path, {"train": ["a"], "val": ["b", "c"]})
    register_all_voc_sbd(str(tmp_path))
    evaluator = MaskAPrEvaluator("sbd_2012_val", distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get("sbd_2012_val"):
        annotations = record["annotations"]
        instances = Instances((record["height"], record["width"]))
        instances.pred_masks = torch.as_tensor(np.stack([decode(a) for a in annotations]))
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
        instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    metrics = evaluator.evaluate()["segm_mAPr"]
    assert metrics["mAP@0.5"] == pytest.approx(100.0) and metrics["mAP@0.7"] == pytest.approx(100.0)
    assert metrics["AP-person@0.5"] == pytest.approx(100.0) and np.isnan(metrics["AP-cat@0.5"])
