"""The demo CLI (``python -m mnc_d2.tools.demo``) on images and a video, with a checkpoint the test writes."""
import json
import os
from pathlib import Path
import subprocess
import sys

import cv2
import numpy as np
import pytest

from detectron2.checkpoint import DetectionCheckpointer

from mnc_d2.config import build_cfg
from detectron2.modeling import build_model

from conftest import INSTANT_CONFIG, SMALL_OPTS, REPO
from detectron2.data import Metadata

from mnc_d2.tools.demo import _image_ids, dataset_category_ids, expand_inputs

pytestmark = pytest.mark.slow  # the demo's command line on a trained checkpoint

CONFIG = INSTANT_CONFIG
SIZE = (96, 128)  # h, w


def _image(seed):
    rng = np.random.default_rng(seed)
    image = np.full((*SIZE, 3), 40, np.uint8)
    cv2.circle(image, (40, 50), 25, tuple(int(c) for c in rng.integers(100, 255, 3)), -1)
    cv2.rectangle(image, (70, 20), (115, 70), tuple(int(c) for c in rng.integers(100, 255, 3)), -1)
    return image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"shape_{i}.png"), _image(i))
    video = str(root / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (SIZE[1], SIZE[0]))
    for i in range(3):
        writer.write(_image(10 + i))
    writer.release()
    cfg = build_cfg(CONFIG, [str(o) for o in SMALL_OPTS])  # the config the demo's command line builds
    weights = root / "model.pth"
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("model")
    return root, str(images), video, str(weights)


def test_cli_on_images_and_video(inputs, tmp_path):
    root, images, video, weights = inputs
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mnc_d2.tools.demo", "--config-file", CONFIG, "--input", images, video,
           "--output", str(out), "--confidence-threshold", "0.01", "--opts", "MODEL.WEIGHTS", weights,
           *map(str, SMALL_OPTS)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading from " + weights in proc.stdout + proc.stderr

    for name in ("shape_0.png", "shape_1.png"):
        vis = cv2.imread(str(out / name))
        assert vis is not None and vis.shape == (*SIZE, 3)
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 3

    results = json.loads((out / "coco_results.json").read_text())
    assert isinstance(results, list) and results
    for r in results:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
        assert r["score"] >= 0.01 and len(r["bbox"]) == 4 and set(r["segmentation"]) == {"size", "counts"}
        assert list(r["segmentation"]["size"]) == list(SIZE)
    ids = json.loads((out / "image_ids.json").read_text())
    assert sorted(ids.values()) == list(range(5))  # 2 images, then 3 frames
    assert {r["image_id"] for r in results} <= set(ids.values())


def test_expand_inputs(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt", "v.mp4"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([str(tmp_path)]) == ([str(tmp_path / "a.png"), str(tmp_path / "b.jpg")], [])
    assert expand_inputs([str(tmp_path / "*.mp4"), str(tmp_path / "b.jpg")]) == (
        [str(tmp_path / "b.jpg")], [str(tmp_path / "v.mp4")])
    with pytest.raises(FileNotFoundError):
        expand_inputs([str(tmp_path / "missing*.jpg")])


def test_coco_style_names_keep_their_ids():
    assert _image_ids(["x/000000000139.jpg", "y/000000000285.jpg"]) == {"x/000000000139.jpg": 139,
                                                                          "y/000000000285.jpg": 285}
    assert _image_ids(["a.jpg", "000000000139.jpg"]) == {"a.jpg": 0, "000000000139.jpg": 1}


def test_dataset_category_ids(tmp_path):
    assert dataset_category_ids(Metadata(thing_dataset_id_to_contiguous_id={1: 0, 3: 1})) == {0: 1, 1: 3}
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"categories": [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}]}))
    assert dataset_category_ids(Metadata(json_file=str(json_file))) == {0: 2, 1: 7}
    assert dataset_category_ids(Metadata(evaluator_type="lvis", thing_classes=["a", "b"])) == {0: 1, 1: 2}
    assert dataset_category_ids(Metadata(json_file=str(tmp_path / "missing.json"))) is None


# ---------------------------------------------------------------------------------------- bad input (round two)
def _demo(inputs_, out, weights, *extra):
    cmd = [sys.executable, "-m", "mnc_d2.tools.demo", "--config-file", CONFIG, "--input", *map(str, inputs_),
           "--output", str(out), "--confidence-threshold", "0.01", *extra, "--opts", "MODEL.WEIGHTS", weights,
           *map(str, SMALL_OPTS)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_corrupt_image_is_skipped_and_the_others_are_written(inputs, tmp_path):
    root, images, _, weights = inputs
    broken = tmp_path / "broken.jpg"
    ok, jpeg = cv2.imencode(".jpg", np.full((*SIZE, 3), 90, np.uint8))
    broken.write_bytes(jpeg.tobytes()[: len(jpeg) // 2])  # a truncated JPEG
    good = sorted(str(p) for p in Path(images).iterdir())
    proc = _demo([good[0], broken, good[1]], tmp_path / "out", weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 input(s) done, 1 skipped" in proc.stdout and str(broken) in proc.stdout + proc.stderr
    ids = json.loads((tmp_path / "out" / "image_ids.json").read_text())
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {ids[good[0]], ids[good[1]]}
    assert sorted(os.listdir(tmp_path / "out")) == ["coco_results.json", "image_ids.json", "shape_0.png", "shape_1.png"]


def test_nothing_processable_exits_1_and_command_line_errors_exit_2(inputs, tmp_path):
    root, images, _, weights = inputs
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    proc = _demo([notes], tmp_path / "out", weights)
    assert proc.returncode == 1 and "0 input(s) done, 1 skipped" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for args, expected in (([tmp_path / "missing*.png"], "matches no image"),
                           ([images], "cannot write there")):
        out = blocker / "sub" if expected == "cannot write there" else tmp_path / "out2"
        proc = _demo(args, out, weights)
        error = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        assert proc.returncode == 2 and len(error) == 1 and expected in error[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mnc_d2.tools.demo", "--config-file", CONFIG, "--input", images,
                           "--output", str(tmp_path / "out3"), "--opts", "MODEL.WEIGHTS"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "KEY VALUE" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_16_bit_images_are_read_by_the_training_rule(inputs, tmp_path):
    """A HeLa-range 16-bit frame gives the detections of its percentile-normalised 8-bit twin, the way the
    HeLa training crops were made (before: read as all white)."""
    from mnc_d2.data.datasets.label_images import normalize_to_uint8
    from mnc_d2.data.image_io import read_image

    _, _, _, weights = inputs
    rng = np.random.default_rng(0)
    frame = (33000 + rng.integers(0, 4000, SIZE)).astype(np.uint16)
    frame[20:60, 30:90] += 20000  # a bright object
    sixteen = tmp_path / "frame16.png"
    cv2.imwrite(str(sixteen), frame)
    eight = tmp_path / "frame8.png"
    cv2.imwrite(str(eight), normalize_to_uint8(frame))
    assert np.array_equal(read_image(str(sixteen), "BGR"), read_image(str(eight), "BGR"))
    assert read_image(str(sixteen), "BGR").std() > 20  # not flat
    # one demo process for both files: two processes are not bit-identical on CPU, and this untrained model's
    # scores nearly tie (seen in CI: 0.186400 vs 0.186406, and two detections swapping places)
    proc = _demo([sixteen, eight], tmp_path / "out", weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads((tmp_path / "out" / "image_ids.json").read_text())
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    first, second = ([{k: v for k, v in r.items() if k != "image_id"} for r in results if r["image_id"] == ids[str(p)]]
                     for p in (sixteen, eight))
    assert len(first) > 0 and first == second
