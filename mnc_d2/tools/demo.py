"""MNC demo: run a trained model on images, a directory, a glob or a video; write visualisations and
COCO-format results.

    python -m mnc_d2.tools.demo --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml \\
        --input images/ "more/*.jpg" clip.mp4 --output demo_out --confidence-threshold 0.5 \\
        --opts MODEL.WEIGHTS output/mnc_R18_GN_FPN_shapes_cpu/model_final.pth

Writes into ``--output``: ``<image name>.png`` per image, ``<video name>.mp4`` per video (mp4v),
``coco_results.json`` (all detections scoring >= the threshold, COCO result format, category ids of
the dataset ``cfg.DATASETS.TEST[0]`` where they can be known: :func:`dataset_category_ids`) and ``image_ids.json`` (input image or ``video#frame`` -> the
``image_id`` used in the results). Images named by a number (COCO's ``000000000139.jpg``) keep that
number as their id, so results on COCO val images can be scored against the official annotations.
Uses D2's DefaultPredictor (resizing to INPUT.MIN_SIZE_TEST, MODEL.DEVICE) with mnc_d2's weights loader
(:func:`mnc_d2.engine.load_weights`: no code from the file; a checkpoint that does not fit the config, or no
``MODEL.WEIGHTS`` without ``--allow-untrained``, is an error). Images are
read as training reads them (16-bit microscopy frames by the same percentile rule). An input that cannot
be read is skipped with a warning naming it; the results are written (atomically) after every input, so a failure
later (a full disk) keeps those of the inputs before it; a one-line summary ends the run. The exit status is 0 unless nothing could be
processed (1) or the command line, config, weights or output directory cannot be used (2, one ERROR line).
"""
import argparse
import glob
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

import cv2
import torch
import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..utils.file_io import atomic_write_json, check_output_dir
from ..data.datasets.command_line import add_dataset_argument, register_datasets
from ..data.image_io import read_image
from ..utils.errors import BadImageError, ConfigError, MissingInputError, MNCError

__all__ = ["MNCDemo", "dataset_category_ids", "expand_inputs", "get_parser", "main", "setup_cfg"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")

logger = logging.getLogger("mnc_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnc_d2.tools.demo",
                                     description="MNC demo (Detectron2): visualise predictions, write COCO results")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="an mnc_d2 (or switched D2) config")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, directories, quoted globs ('imgs/*.jpg') and/or video files")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="keep detections scoring at least this (drawn and written to the json)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty (a randomly initialised model)")
    add_dataset_argument(parser)  # DATASETS.TEST[0] gives the class names and the json's category ids
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu")
    return parser


def setup_cfg(args):
    """The config of ``--config-file`` and ``--opts`` (errors name the file or the option, as train_net's)."""
    from ..config import build_cfg

    if len(args.opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {args.opts}")
    register_datasets(getattr(args, "dataset", []))
    cfg = build_cfg(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: add --opts MODEL.DEVICE cpu")
    return cfg


def expand_inputs(patterns: List[str]) -> Tuple[List[str], List[str]]:
    """``--input`` items -> (image paths, video paths), in the given order; directories give their
    images sorted by name, globs their matches sorted. Raises FileNotFoundError for an item that
    matches nothing."""
    images, videos = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(pattern):
            paths = sorted(glob.glob(os.path.expanduser(pattern)))
        elif os.path.isfile(pattern):
            paths = [pattern]
        else:
            paths = []
        if not paths:
            raise MissingInputError(f"--input {pattern!r} matches no image or video file")
        for path in paths:
            (videos if path.lower().endswith(VIDEO_EXTENSIONS) else images).append(path)
    return images, videos


def _image_ids(images: List[str]) -> Dict[str, int]:
    """COCO-style numeric names keep their number when all are numeric and distinct; else 0, 1, ..."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(s) for p, s in zip(images, stems)}
    return {p: i for i, p in enumerate(images)}


def _unique_name(path: str, extension: str, taken: set) -> str:
    """``dir/a.jpg`` -> ``a.png``; a second ``a`` from another folder becomes ``a_1.png``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem + extension, 1
    while name in taken:
        name, k = f"{stem}_{k}{extension}", k + 1
    taken.add(name)
    return name


def dataset_category_ids(metadata) -> Optional[Dict[int, int]]:
    """contiguous class index -> the dataset's category id, as D2's evaluators map them: from
    ``thing_dataset_id_to_contiguous_id`` (D2's builtin COCO), else from the categories of the
    dataset's COCO json when it exists (sorted ids, as ``load_coco_json``), else +1 for LVIS;
    None (contiguous ids are written) otherwise."""
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    json_file = metadata.get("json_file", None)
    if not id_map and json_file and os.path.isfile(json_file):
        with open(json_file) as f:
            category_ids = sorted(c["id"] for c in json.load(f).get("categories", []))
        id_map = {dataset_id: i for i, dataset_id in enumerate(category_ids)}
    if id_map:
        return {contiguous: dataset_id for dataset_id, contiguous in id_map.items()}
    if metadata.get("evaluator_type", None) == "lvis":
        return {i: i + 1 for i in range(len(metadata.get("thing_classes", [])))}
    return None


class MNCDemo:
    """DefaultPredictor + Visualizer for one config. Detections below ``confidence_threshold`` are
    dropped after prediction (not through SCORE_THRESH_TEST, which also decides which candidates
    take part in MNC's mask voting)."""

    def __init__(self, cfg, confidence_threshold: float = 0.5, allow_untrained: bool = False):
        from ..engine.defaults import MNCPredictor

        self.cfg = cfg
        self.predictor = MNCPredictor(cfg, allow_untrained=allow_untrained)
        name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        self.metadata = MetadataCatalog.get(name)
        if name in DatasetCatalog.list() and not self.metadata.get("thing_classes", None):
            DatasetCatalog.get(name)  # a COCO json sets its class names when loaded (load_coco_json)
        self.confidence_threshold = confidence_threshold
        self.contiguous_to_dataset_id = dataset_category_ids(self.metadata)

    def predict(self, image_bgr) -> Instances:
        """(H, W, 3) uint8 BGR -> Instances on the CPU at image resolution, above the threshold."""
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]

    def coco_results(self, instances: Instances, image_id: int) -> List[dict]:
        results = instances_to_coco_json(instances, image_id)
        if self.contiguous_to_dataset_id:
            for r in results:
                r["category_id"] = self.contiguous_to_dataset_id[r["category_id"]]
        return results

    def draw(self, image_bgr, instances: Instances):
        """BGR visualisation of ``instances`` drawn on ``image_bgr``."""
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
        return visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]

    def run_on_video(self, video_path: str, output_path: str, first_image_id: int, image_ids: Dict[str, int]):
        """Visualise every frame into an mp4v file; returns the frames' COCO results."""
        capture = cv2.VideoCapture(video_path)
        if not capture.isOpened():
            raise RuntimeError(f"OpenCV cannot read video {video_path}")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        writer = cv2.VideoWriter(output_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        video_visualizer = VideoVisualizer(self.metadata, ColorMode.IMAGE)  # stable colours across frames
        results, frame_index = [], 0
        try:
            with tqdm.tqdm(total=num_frames, desc=os.path.basename(video_path), unit="frame") as bar:
                while True:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    instances = self.predict(frame)
                    vis = video_visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
                    writer.write(vis.get_image()[:, :, ::-1])
                    image_id = first_image_id + frame_index
                    image_ids[f"{video_path}#{frame_index}"] = image_id
                    results.extend(self.coco_results(instances, image_id))
                    frame_index += 1
                    bar.update(1)
        finally:
            capture.release()
            writer.release()
        return results


def run(args) -> Tuple[List[dict], int, List[str]]:
    """The demo on ``args``: (COCO results, inputs done, inputs skipped with their reasons)."""
    cfg = setup_cfg(args)
    images, videos = expand_inputs(args.input)
    check_output_dir(args.output)
    demo = MNCDemo(cfg, args.confidence_threshold, args.allow_untrained)

    image_ids = _image_ids(images)
    results, taken, done, skipped = [], set(), 0, []

    def save():  # after every input, atomically: a failure later keeps what was done so far
        try:
            atomic_write_json(os.path.join(args.output, "coco_results.json"), results)
            atomic_write_json(os.path.join(args.output, "image_ids.json"), image_ids)
        except OSError as e:
            raise ConfigError(f"--output {args.output}: cannot write its results ({e.strerror or e}); "
                              f"coco_results.json holds those of the inputs before this one ({done} done).") from None

    for path in tqdm.tqdm(images, desc="images", unit="image", disable=not images):
        try:
            image = read_image(path, format="BGR", max_pixels=cfg.MNC_RELIABILITY.MAX_IMAGE_PIXELS)
        except BadImageError as e:
            skipped.append(f"{path}: {e}")
            logger.warning(f"Skipping {path}: {e}")
            continue
        instances = demo.predict(image)
        out_file = os.path.join(args.output, _unique_name(path, ".png", taken))
        if not cv2.imwrite(out_file, demo.draw(image, instances)):
            raise ConfigError(f"--output {args.output}: cannot write {out_file} (a full disk?); coco_results.json "
                              f"holds the results of the inputs before it ({done} done).")
        results.extend(demo.coco_results(instances, image_ids[path]))
        done += 1
        save()
    next_id = max(image_ids.values(), default=-1) + 1
    for path in videos:
        frames_before = len(image_ids)
        try:
            results.extend(demo.run_on_video(path, os.path.join(args.output, _unique_name(path, ".mp4", taken)),
                                             next_id, image_ids))
            done += 1
        except RuntimeError as e:
            skipped.append(f"{path}: {e}")
            logger.warning(f"Skipping {path}: {e}")
        next_id += len(image_ids) - frames_before
        save()
    save()
    return results, done, skipped


def main(argv=None) -> List[dict]:
    """Command line: exit status 0 (something processed), 1 (nothing could be), 2 (an ERROR line)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="mnc_d2")
    setup_logger(name="fvcore")
    try:
        results, done, skipped = run(args)
    except MNCError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"{done} input(s) done, {len(skipped)} skipped, {len(results)} detections -> {args.output}", flush=True)
    if skipped:
        print("skipped: " + "; ".join(skipped), flush=True)
    if not done:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
