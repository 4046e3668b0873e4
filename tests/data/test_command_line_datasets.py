"""``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR`` (and ``NAME=IMAGE_DIR:LABEL_DIR``): your own data from the
command line, through train_net.py and the demo, with an ERROR line for a bad path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer

from mnc_d2.config import build_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from mnc_d2.data.datasets import generate_split
from mnc_d2.data.datasets.command_line import parse_dataset_spec, register_datasets
from mnc_d2.utils.errors import ConfigError
from conftest import INSTANT_CONFIG as DEMO_CONFIG, SMALL_OPTS

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """A COCO json + image folder of 6 synthetic images (written like any user's dataset)."""
    root = tmp_path_factory.mktemp("mine")
    json_file = generate_split(root, num_images=6, seed=11, image_size=96, progress=False)
    return json_file, str(root / "images")


def test_spec_errors_name_the_spec_and_the_path(tmp_path, coco_split):
    json_file, images = coco_split
    for spec, message in [("mine", "expected NAME="), (f"mine={json_file}", "expected NAME="),
                          (f"mine={tmp_path}/none.json:{images}", "none.json does not exist"),
                          (f"mine={json_file}:{tmp_path}/nothing", "image directory"),
                          (f"mine={tmp_path}/a:{tmp_path}/b", "image directory")]:
        with pytest.raises(ConfigError, match=message) as info:
            parse_dataset_spec(spec)
        assert spec in str(info.value)
    assert parse_dataset_spec(f"mine={json_file}:{images}") == ("mine", "coco", json_file, images)


def test_registering_twice_and_a_builtin_name(coco_split):
    json_file, images = coco_split
    spec = f"cli_twice={json_file}:{images}"
    assert register_datasets([spec, spec]) == ["cli_twice", "cli_twice"]
    dicts = DatasetCatalog.get("cli_twice")
    assert len(dicts) == 6 and MetadataCatalog.get("cli_twice").thing_classes[0] == "disc"
    with pytest.raises(ConfigError, match="already a registered dataset"):
        register_datasets([f"mnc_shapes_val={json_file}:{images}"])


def test_label_image_folders(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    label = np.zeros((40, 50), np.uint8)
    label[5:15, 5:20], label[20:35, 25:45] = 1, 2
    for stem in ("a", "b"):
        Image.fromarray(np.full((40, 50), 120, np.uint8)).save(tmp_path / "img" / f"{stem}.png")
        Image.fromarray(label).save(tmp_path / "lab" / f"{stem}.png")
    (name,) = register_datasets([f"cli_labels={tmp_path / 'img'}:{tmp_path / 'lab'}"])
    dicts = DatasetCatalog.get(name)
    assert [len(d["annotations"]) for d in dicts] == [2, 2]
    assert MetadataCatalog.get(name).thing_classes == ["object"]
    Image.fromarray(label).save(tmp_path / "lab" / "c.png")  # a label without its image
    with pytest.raises(ConfigError, match="without a partner: c"):
        register_datasets([f"cli_labels2={tmp_path / 'img'}:{tmp_path / 'lab'}"])


def _train_net(*args, tmp_path):
    env = dict(os.environ, MNC_D2_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-W", "ignore", os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_train_and_evaluate_through_the_option_only(tmp_path, coco_split):
    json_file, images = coco_split
    out = _train_net("--dataset", f"mine_train={json_file}:{images}", "--dataset", f"mine_val={json_file}:{images}",
                     "DATASETS.TRAIN", '("mine_train",)', "DATASETS.TEST", '("mine_val",)', "SOLVER.MAX_ITER", "4",
                     "TEST.EVAL_PERIOD", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1",
                     "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(tmp_path / "out"), tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "copypaste: Task: segm" in log and "Evaluated 6 images of mine_val" in log
    results = json.load(open(tmp_path / "out" / "inference" / "mine_val" / "coco_instances_results.json"))
    assert results and {r["category_id"] for r in results} <= {1, 2, 3, 4, 5}  # the json's own category ids


@pytest.mark.slow
def test_a_bad_path_is_an_error_line(tmp_path):
    out = _train_net("--dataset", f"mine={tmp_path}/missing.json:{tmp_path}", "DATASETS.TRAIN", '("mine",)',
                     "OUTPUT_DIR", str(tmp_path / "out"), tmp_path=tmp_path)
    assert out.returncode == 2
    assert f"ERROR: --dataset 'mine={tmp_path}/missing.json:{tmp_path}': annotation file" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_takes_the_class_ids_of_a_command_line_dataset(tmp_path, coco_split):
    """The demo's --dataset: DATASETS.TEST names it, and the results carry its json's category ids."""
    json_file, images = coco_split
    data = json.load(open(json_file))
    for category in data["categories"]:
        category["id"] += 10
    for annotation in data["annotations"]:
        annotation["category_id"] += 10
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(data))
    root = tmp_path / "weights"
    root.mkdir()
    cfg = build_cfg(DEMO_CONFIG, [str(o) for o in SMALL_OPTS])  # the config the demo's command line builds
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("model")
    cmd = [sys.executable, "-m", "mnc_d2.demo", "--config-file", DEMO_CONFIG, "--input", images,
           "--output", str(tmp_path / "out"), "--confidence-threshold", "0.0", "--dataset", f"mine={shifted}:{images}",
           "--opts", "MODEL.WEIGHTS", str(root / "model.pth"), "DATASETS.TEST", '("mine",)', *map(str, SMALL_OPTS)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {11, 12, 13, 14, 15}
