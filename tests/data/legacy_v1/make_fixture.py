"""Writes the fixture of ``tests/config/test_config_upgrade.py``: two runs' ``config.yaml`` as mnc_d2 0.1 (config
format 1: ``ROI_MASK_HEAD.NAME`` = the stage-2 head, ``MODEL.MNC.FINAL_MASK_HEAD.NAME`` = the output head) dumped
them, and what ``train_net.py --eval-only`` gave on deterministic weights (``checkpoint_weights``).

It ran once, at the last commit of config format 1 (git d34eeae), from the repository root:
``python tests/data/legacy_v1/make_fixture.py``. Running it at a later commit writes today's format instead.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(REPO, "tests"))

# the instant test's data, 64 px images and thin heads (conftest.TINY_TRAIN_NET_OPTS at d34eeae)
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.MNC.MASK_HEAD.FC_DIM", "64",
    "MODEL.MNC.MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
    "MODEL.MNC.MASK_HEAD.MASK_SIZE", "14", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "TEST.DETECTIONS_PER_IMAGE", "20", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('mnc_shapes_tiny_train',)", "DATASETS.TEST", "('mnc_shapes_tiny_val',)",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
]
RUNS = {
    "default": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",  # MNC's default (output head on the final boxes)
    "paper": "configs/mnc_R18_GN_FPN_shapes_cpu_paper.yaml",  # the authors' output path (5 stages, voting)
}


def checkpoint_weights(model: torch.nn.Module) -> dict:
    """Deterministic weights for every tensor of ``model``'s state dict, seeded by the tensor's name (no
    dependence on construction order), scaled so that a forward pass stays finite."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            weights[name] = tensor.clone()
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        noise = torch.randn(tensor.shape, generator=g)
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * noise
        elif tensor.dim() <= 1:
            weights[name] = 0.01 * noise
        else:
            weights[name] = noise / max(1, tensor[0].numel()) ** 0.5
    return weights


def eval_only(config_file: str, weights_file: str, output_dir: str) -> dict:
    """``train_net.py --eval-only``; returns {"bbox": {...}, "segm": {...}} parsed from D2's copypaste lines."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file, "--eval-only",
         "MODEL.WEIGHTS", weights_file, "OUTPUT_DIR", output_dir],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    lines = re.findall(r"copypaste: (.*)", proc.stdout + proc.stderr)
    results, task = {}, None
    for line in lines:
        if line.startswith("Task: "):
            task = line[len("Task: "):].strip()
        elif line.startswith("AP,"):
            names = line.split(",")
        elif task:
            results[task] = dict(zip(names, map(float, line.split(","))))
    return results


def detections(output_dir: str) -> list:
    """[image id, category id, box (x, y, w, h), score, mask area] of each detection ``eval_only`` wrote."""
    from pycocotools import mask as mask_util

    found = [os.path.join(d, f) for d, _, files in os.walk(output_dir) for f in files
             if f == "coco_instances_results.json"]
    with open(found[0]) as f:
        results = json.load(f)
    return sorted([r["image_id"], r["category_id"], [round(v, 2) for v in r["bbox"]], round(r["score"], 5),
                   int(mask_util.area(r["segmentation"]))] for r in results)


def main():
    import mnc_d2  # noqa: F401
    from detectron2.modeling import build_model
    from mnc_d2.config import build_cfg

    expected = {}
    for name, config in RUNS.items():
        run_dir = os.path.join(HERE, name)
        os.makedirs(run_dir, exist_ok=True)
        cfg = build_cfg(os.path.join(REPO, config), TINY + ["OUTPUT_DIR", "./output/legacy_v1_" + name])
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        torch.manual_seed(0)
        model = build_model(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            weights_file = os.path.join(tmp, "model_final.pth")
            torch.save({"model": checkpoint_weights(model)}, weights_file)
            expected[name] = {
                "state_dict_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
                "eval": eval_only(os.path.join(run_dir, "config.yaml"), weights_file, os.path.join(tmp, "out")),
                "detections": detections(os.path.join(tmp, "out")),
            }
        print(name, expected[name]["eval"])
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
