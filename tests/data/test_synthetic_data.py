"""Tests of the synthetic shapes dataset: generator, COCO files, D2 registration."""

import collections
import importlib
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.structures import BitMasks

from mnc_d2.data.datasets import builtin, synthetic
from mnc_d2.data.datasets.synthetic import SHAPE_CLASSES, generate_image, generate_split

SIZE = 96  # small images keep the suite fast
NUM_IMAGES = 6


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def _split_files(split_dir):
    """{relative path: bytes} of everything in a split directory."""
    files = {}
    for dirpath, _, names in os.walk(split_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, split_dir)] = f.read()
    return files


def _single_object(class_name, max_tries=200):
    """(image, mask) of the first one-object image of ``class_name``."""
    for seed in range(max_tries):
        image, instances = generate_image(np.random.default_rng(seed), SIZE, num_objects=(1, 1))
        if instances and SHAPE_CLASSES[instances[0][0]] == class_name:
            return image, instances[0][1]
    raise AssertionError(f"no {class_name} in {max_tries} images")


@pytest.fixture(scope="module")
def split_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_split(root / "train", NUM_IMAGES, seed=0, image_size=SIZE, progress=False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Builtin datasets re-registered under a temporary MNC_D2_CACHE, restored afterwards."""
    monkeypatch.setenv("MNC_D2_CACHE", str(tmp_path))
    builtin.register_all_mnc_shapes()
    yield tmp_path
    monkeypatch.undo()
    builtin.register_all_mnc_shapes()


# --------------------------------------------------------------------------- generator


def test_same_seed_is_identical_and_other_seed_differs(split_json, tmp_path):
    first = _split_files(os.path.dirname(split_json))
    again = generate_split(tmp_path / "again", NUM_IMAGES, seed=0, image_size=SIZE, progress=False)
    assert _split_files(os.path.dirname(again)) == first  # byte-identical json and PNGs

    other = generate_split(tmp_path / "other", NUM_IMAGES, seed=1, image_size=SIZE, progress=False)
    other_files = _split_files(os.path.dirname(other))
    assert other_files.keys() == first.keys()
    assert all(other_files[name] != first[name] for name in first)


def test_json_is_valid_coco(split_json):
    coco = COCO(split_json)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert len(coco.getImgIds()) == NUM_IMAGES
    image_root = os.path.join(os.path.dirname(split_json), synthetic.IMAGES_DIR)
    for image_info in coco.loadImgs(coco.getImgIds()):
        assert (image_info["width"], image_info["height"]) == (SIZE, SIZE)
        image = detection_utils.read_image(os.path.join(image_root, image_info["file_name"]), format="RGB")
        assert image.shape == (SIZE, SIZE, 3)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
        assert annotations
        for annotation in annotations:
            assert isinstance(annotation["segmentation"]["counts"], str)
            mask = coco.annToMask(annotation).astype(bool)
            assert mask.shape == (SIZE, SIZE)
            assert annotation["area"] == mask.sum() >= synthetic.MIN_VISIBLE_PIXELS
            assert annotation["bbox"] == _tight_box(mask)
            assert annotation["iscrowd"] == 0
            assert 1 <= annotation["category_id"] <= len(SHAPE_CLASSES)


def test_visible_masks_are_disjoint(split_json):
    coco = COCO(split_json)
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() == 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), image_size=st.integers(48, 128))
def test_generate_image_properties(seed, image_size):
    image, instances = generate_image(np.random.default_rng(seed), image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert len(instances) <= 6  # at >= 80 px there is always one; tiny triangles may be skipped
    coverage = np.zeros((image_size, image_size), dtype=int)
    for class_index, mask in instances:
        assert 0 <= class_index < len(SHAPE_CLASSES)
        assert mask.shape == (image_size, image_size) and mask.dtype == bool
        assert mask.sum() >= synthetic.MIN_VISIBLE_PIXELS
        coverage += mask
    assert coverage.max() == 1


def test_objects_overlap():
    # Visible masks that touch can only come from one object drawn over another.
    def touching(a, b):
        grown = a.copy()
        grown[1:] |= a[:-1]
        grown[:-1] |= a[1:]
        grown[:, 1:] |= a[:, :-1]
        grown[:, :-1] |= a[:, 1:]
        return bool((grown & b).any())

    touching_pairs = 0
    for seed in range(10):
        _, instances = generate_image(np.random.default_rng(seed), SIZE, num_objects=(6, 6))
        masks = [m for _, m in instances]
        touching_pairs += sum(touching(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :])
    assert touching_pairs >= 5


@pytest.mark.parametrize("hollow, filled", [("ring", "disc"), ("square_frame", "square")])
def test_hollow_shapes_have_a_hole(hollow, filled):
    for class_name, centre_inside in ((hollow, False), (filled, True)):
        _, mask = _single_object(class_name)
        x, y, w, h = _tight_box(mask)
        assert mask[y + h // 2, x + w // 2] == centre_inside, class_name
    # Same box, different mask: the hole costs area.
    _, hollow_mask = _single_object(hollow)
    x, y, w, h = _tight_box(hollow_mask)
    assert hollow_mask.sum() < 0.85 * w * h * (np.pi / 4 if hollow == "ring" else 1)


def test_every_class_appears():
    counts = collections.Counter()
    for seed in range(30):
        _, instances = generate_image(np.random.default_rng(seed), SIZE)
        counts.update(SHAPE_CLASSES[c] for c, _ in instances)
    assert set(counts) == set(SHAPE_CLASSES)


# --------------------------------------------------------------------------- splits on disk


def test_existing_split_is_reused_other_parameters_refused(split_json, tmp_path):
    mtime = os.path.getmtime(split_json)
    split_dir = os.path.dirname(split_json)
    assert generate_split(split_dir, NUM_IMAGES, seed=0, image_size=SIZE, progress=False) == split_json
    assert os.path.getmtime(split_json) == mtime
    with pytest.raises(FileExistsError):
        generate_split(split_dir, NUM_IMAGES, seed=5, image_size=SIZE, progress=False)

    replaced = generate_split(tmp_path / "s", 2, seed=0, image_size=SIZE, progress=False)
    generate_split(tmp_path / "s", 3, seed=0, image_size=SIZE, progress=False, overwrite=True)
    assert len(COCO(replaced).getImgIds()) == 3


def test_interrupted_generation_leaves_nothing_complete(tmp_path, monkeypatch):
    calls = []

    def failing_generate_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate_image(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_image", failing_generate_image)
    with pytest.raises(KeyboardInterrupt):
        generate_split(tmp_path / "train", 5, seed=0, image_size=SIZE, progress=False)
    assert os.listdir(tmp_path) == []  # no split, no temporary directory


def test_leftovers_are_not_taken_as_complete(tmp_path):
    # A killed run leaves a temporary sibling; a foreign copy may lack the json.
    leftover = tmp_path / ".train.tmp-killed" / synthetic.IMAGES_DIR
    leftover.mkdir(parents=True)
    (leftover / "000000.png").write_bytes(b"partial")
    partial = tmp_path / "val" / synthetic.IMAGES_DIR
    partial.mkdir(parents=True)
    (partial / "000000.png").write_bytes(b"partial")

    for split in ("train", "val"):
        json_path = generate_split(tmp_path / split, 2, seed=0, image_size=SIZE, progress=False)
        assert len(COCO(json_path).getImgIds()) == 2
        assert sorted(os.listdir(tmp_path / split / synthetic.IMAGES_DIR)) == ["000000.png", "000001.png"]
    assert (tmp_path / "val" / synthetic.IMAGES_DIR / "000000.png").read_bytes() != b"partial"


def test_concurrent_generation_keeps_the_first_published(tmp_path, monkeypatch):
    out_dir = tmp_path / "train"
    real_write_split = synthetic._write_split

    def write_then_lose_race(*args, **kwargs):
        real_write_split(*args, **kwargs)
        # Another process publishes the same split while we were writing ours.
        monkeypatch.setattr(synthetic, "_write_split", real_write_split)
        generate_split(out_dir, 2, seed=0, image_size=SIZE, progress=False)

    monkeypatch.setattr(synthetic, "_write_split", write_then_lose_race)
    json_path = generate_split(out_dir, 2, seed=0, image_size=SIZE, progress=False)
    assert len(COCO(json_path).getImgIds()) == 2
    assert os.listdir(tmp_path) == ["train"]  # the loser's temporary directory is gone


def test_cli_writes_train_and_val(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "64", "--seed", "7"]
    assert synthetic.main(args + ["--quiet"]) == 0
    for split, num_images, seed in (("train", 3, 7), ("val", 2, 8)):
        with open(tmp_path / split / synthetic.ANNOTATIONS_FILE) as f:
            dataset = json.load(f)
        assert len(dataset["images"]) == num_images
        assert dataset["images"][0]["width"] == 64
        assert dataset["info"]["seed"] == seed
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "train" / "annotations.json"),
        str(tmp_path / "val" / "annotations.json"),
    ]


# --------------------------------------------------------------------------- detectron2


def test_builtin_datasets_are_registered_lazily_in_the_cache(cache_dir):
    for name in ("mnc_shapes_train", "mnc_shapes_val", "mnc_shapes_tiny_train", "mnc_shapes_tiny_val"):
        assert name in DatasetCatalog.list()
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == list(SHAPE_CLASSES)
        assert len(metadata.thing_colors) == len(SHAPE_CLASSES)
        assert metadata.evaluator_type == "coco"
        assert metadata.json_file.startswith(str(cache_dir / "datasets" / "mnc_shapes_v1"))
    assert MetadataCatalog.get("mnc_shapes_tiny_val").image_root == str(
        cache_dir / "datasets" / "mnc_shapes_v1" / "tiny_val" / "images"
    )
    assert not (cache_dir / "datasets").exists()  # nothing generated at registration

    json_file = builtin.ensure_mnc_shapes("mnc_shapes_tiny_val")
    assert json_file == MetadataCatalog.get("mnc_shapes_tiny_val").json_file
    assert len(COCO(json_file).getImgIds()) == 8


def test_registration_is_idempotent(tmp_path):
    importlib.reload(builtin)  # registers the builtin names again
    builtin.register_mnc_shapes("mnc_shapes_test_small", tmp_path / "small", 2, 3, SIZE)
    builtin.register_mnc_shapes("mnc_shapes_test_small", tmp_path / "small", 2, 3, SIZE)
    builtin.register_mnc_shapes("mnc_shapes_test_small", tmp_path / "other", 3, 3, SIZE)  # replaces
    try:
        assert len(DatasetCatalog.get("mnc_shapes_test_small")) == 3
        assert MetadataCatalog.get("mnc_shapes_test_small").image_root == str(tmp_path / "other" / "images")
    finally:
        DatasetCatalog.remove("mnc_shapes_test_small")
        MetadataCatalog.remove("mnc_shapes_test_small")


def test_ensure_leaves_other_datasets_alone():
    DatasetCatalog.register("mnc_test_not_shapes", list)
    try:
        assert builtin.ensure_mnc_shapes("mnc_test_not_shapes") is None
    finally:
        DatasetCatalog.remove("mnc_test_not_shapes")
        MetadataCatalog.remove("mnc_test_not_shapes")
    with pytest.raises(KeyError):
        builtin.ensure_mnc_shapes("mnc_test_never_registered")


def test_dataset_dicts_map_to_bitmask_instances(cache_dir):
    dataset_dicts = DatasetCatalog.get("mnc_shapes_tiny_val")  # generated here, on first use
    assert len(dataset_dicts) == 8
    mapper = DatasetMapper(
        is_train=True, augmentations=[], image_format="BGR", use_instance_mask=True, instance_mask_format="bitmask"
    )
    for dataset_dict in dataset_dicts[:3]:
        expected_masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in dataset_dict["annotations"]]
        expected_classes = [a["category_id"] for a in dataset_dict["annotations"]]  # contiguous after loading
        mapped = mapper(dataset_dict)
        instances = mapped["instances"]
        assert mapped["image"].shape == (3, 160, 160)
        assert isinstance(instances.gt_masks, BitMasks)
        assert instances.gt_masks.tensor.shape == (len(expected_masks), 160, 160)
        assert np.array_equal(instances.gt_masks.tensor.numpy(), np.stack(expected_masks))
        assert instances.gt_classes.tolist() == expected_classes
        assert all(0 <= c < len(SHAPE_CLASSES) for c in expected_classes)

    instances = detection_utils.annotations_to_instances(
        dataset_dicts[0]["annotations"], (160, 160), mask_format="bitmask"
    )
    assert isinstance(instances.gt_masks, BitMasks)
