"""Export an MNC model to TorchScript or ONNX with Detectron2's ``TracingAdapter``, and check it against
eager PyTorch on sample images::

    python -m mnc_d2.tools.export --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml --format torchscript \\
        --sample-image a.png [b.png ...] --output exported/ MODEL.WEIGHTS output/.../model_final.pth

What is exported: the network from one resized image to MNC's *candidates*
(``MNC.inference(..., do_postprocess=False)``): preprocessing, backbone, RPN, the cascade, NMS and the
masks on the final boxes, for any image size. What stays in Python: :func:`mnc_postprocess` (pasting the
kept masks into the original image, or mask voting), as Detectron2 exports ``GeneralizedRCNN`` without its
``detector_postprocess``. Mask voting is a data-dependent loop over the kept detections; tracing would
unroll it for the sample image's detections, so it is not exported.

The exported model takes ``image``: (3, H, W) float32, channels in ``INPUT.FORMAT`` order, resized as
``DefaultPredictor`` resizes (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``), and returns the tensors
:data:`OUTPUT_NAMES` (C = candidates, M = mask side):
``pred_boxes`` (C, 4), ``scores`` (C,), ``pred_classes`` (C,) int64, ``pred_masks`` (C, 1, M, M) soft,
``mask_boxes`` (C, 4) the box each mask was predicted in, ``kept_rank`` (C,) int64 rank after NMS (-1: not kept).

``--output`` receives ``model.ts`` or ``model.onnx``, ``mnc_export.json`` (the input and post-processing
settings, so that :class:`ExportedPredictor` needs no config) and ``export_check.json`` (the comparison).
The exit status is 0 if every sample image matches eager PyTorch (boxes and scores within 1e-4
relative, the same classes, masks with IoU >= 0.99), 1 if one does not, 2 for bad input (one ERROR line).
ONNX needs ``onnx`` and ``onnxruntime`` (``pip install onnx onnxruntime``) and torch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``).
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances

from ..utils.file_io import atomic_write_json, check_output_dir
from ..utils.errors import ConfigError, MNCError
from ..modeling.postprocessing import mnc_postprocess

__all__ = ["OUTPUT_NAMES", "ExportedMNC", "ExportedPredictor", "compare_instances", "export_model", "main"]

logger = logging.getLogger("mnc_d2.export")

OUTPUT_NAMES = ("pred_boxes", "scores", "pred_classes", "pred_masks", "mask_boxes", "kept_rank")
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
SETTINGS_FILE = "mnc_export.json"
ONNX_OPSET = 17


def candidate_tensors(model, inputs: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
    """TracingAdapter's ``inference_func``: one image's MNC candidates as the tensors of OUTPUT_NAMES."""
    candidates = model.inference(inputs, do_postprocess=False)[0]
    return tuple(getattr(candidates, name).tensor if name.endswith("boxes") else getattr(candidates, name)
                 for name in OUTPUT_NAMES)


def candidates_from_outputs(outputs: Sequence[torch.Tensor], image_size: Tuple[int, int]) -> Instances:
    """The exported model's outputs (in OUTPUT_NAMES order) -> the candidates ``mnc_postprocess`` takes."""
    fields = dict(zip(OUTPUT_NAMES, outputs))
    for name in ("pred_boxes", "mask_boxes"):
        fields[name] = Boxes(fields[name])
    return Instances(tuple(int(s) for s in image_size), **fields)


def export_model(model, image: torch.Tensor, fmt: str, path: str) -> None:
    """Trace ``model`` (eval mode) on one preprocessed (3, H, W) image and write it to ``path``."""
    from detectron2.export import TracingAdapter

    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], inference_func=candidate_tensors).eval()
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            traced.save(path)
        else:
            import onnx  # noqa: F401  (torch.onnx needs it; fail here with a clear ImportError)

            torch.onnx.export(adapter, adapter.flattened_inputs, path, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={"image": {1: "height", 2: "width"},
                                            **{name: {0: "candidates"} for name in OUTPUT_NAMES}})
    model.eval()  # the exporters may restore the adapter's (training) mode onto the model


class ExportedMNC:
    """An exported MNC + its Python post-processing, called as a Detectron2 model in eval mode:
    ``[{"image": (3, H, W), "height": h, "width": w}] -> [{"instances": Instances}]``."""

    def __init__(self, export_dir: str):
        with open(os.path.join(export_dir, SETTINGS_FILE)) as f:
            self.settings = json.load(f)
        path = os.path.join(export_dir, self.settings["file"])
        if self.settings["format"] == "torchscript":
            module = torch.jit.load(path, map_location="cpu")
            self._run = lambda image: module(image)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self._run = lambda image: [torch.from_numpy(o) for o in session.run(None, {"image": image.numpy()})]

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        post = self.settings["postprocess"]
        results = []
        with torch.no_grad():
            for inputs in batched_inputs:
                image = inputs["image"].to(torch.float32).cpu()  # (3, H, W)
                candidates = candidates_from_outputs(self._run(image), image.shape[-2:])
                height, width = inputs.get("height", image.shape[-2]), inputs.get("width", image.shape[-1])
                results.append({"instances": mnc_postprocess(candidates, height, width, post["mask_threshold"],
                                                             post["mask_voting"], post["voting_iou"])})
        return results


class ExportedPredictor(DefaultPredictor):
    """D2's ``DefaultPredictor`` (the same resizing and channel order) running an exported model:
    ``predictor(bgr_image)["instances"]``. Needs only the export folder, no config or weights."""

    def __init__(self, export_dir: str):  # DefaultPredictor.__init__ builds the eager model: not called
        self.model = ExportedMNC(export_dir)
        resize = self.model.settings["input"]
        self.aug = T.ResizeShortestEdge([resize["min_size_test"]] * 2, resize["max_size_test"])
        self.input_format = resize["format"]


def preprocessed(predictor: DefaultPredictor, bgr_image: np.ndarray) -> torch.Tensor:
    """(3, H, W) float32: the image DefaultPredictor gives the model (channel order, test-time resize)."""
    image = bgr_image[:, :, ::-1] if predictor.input_format == "RGB" else bgr_image
    return torch.as_tensor(predictor.aug.get_transform(image).apply_image(image).astype("float32").transpose(2, 0, 1))


def _mask_ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(D, H, W) bool x 2 -> (D,) IoU per instance (1 where both masks are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def compare_instances(eager: Instances, exported: Instances, rtol: float = 1e-4, min_mask_iou: float = 0.99) -> Dict:
    """Does ``exported`` reproduce ``eager``: the same detections in the same order, boxes and scores within
    ``rtol`` relative, the same classes, every mask with IoU >= ``min_mask_iou``?"""
    eager, exported = eager.to("cpu"), exported.to("cpu")
    out = {"detections": len(eager), "exported_detections": len(exported),
           "masked_detections": int((eager.pred_masks.flatten(1).sum(1) > 0).sum()) if len(eager) else 0}
    if len(eager) != len(exported):
        return {**out, "ok": False, "reason": f"{len(exported)} detections, eager has {len(eager)}"}
    if not len(eager):
        return {**out, "ok": True}

    def rel(x, y):  # max |x - y| / max(|y|, 1e-6): relative, but 0 stays comparable
        return float(((x - y).abs() / y.abs().clamp(min=1e-6)).max())

    box_rel = rel(exported.pred_boxes.tensor, eager.pred_boxes.tensor)
    score_rel = rel(exported.scores, eager.scores)
    same_classes = bool(torch.equal(exported.pred_classes, eager.pred_classes))
    min_iou = float(_mask_ious(eager.pred_masks, exported.pred_masks).min())
    out.update(box_max_rel_diff=box_rel, score_max_rel_diff=score_rel, same_classes=same_classes,
               min_mask_iou=min_iou)
    problems = [name for name, bad in (("boxes", box_rel > rtol), ("scores", score_rel > rtol),
                                       ("classes", not same_classes), ("masks", min_iou < min_mask_iou)) if bad]
    return {**out, "ok": not problems, **({"reason": f"{', '.join(problems)} differ"} if problems else {})}


def export_settings(cfg, fmt: str, traced_size: Tuple[int, int]) -> Dict:
    test = cfg.MODEL.MNC.TEST
    return {
        "format": fmt, "file": FILES[fmt], "output_names": list(OUTPUT_NAMES),
        "input": {"name": "image", "layout": "(3, H, W) float32", "format": cfg.INPUT.FORMAT,
                  "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST},
        "postprocess": {"mask_threshold": test.MASK_THRESHOLD, "mask_voting": test.MASK_VOTING,
                        "voting_iou": test.VOTING_IOU},
        "traced_image_size": list(traced_size), "torch": torch.__version__,
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
    }


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnc_d2.tools.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="an mnc_d2 yaml config")
    parser.add_argument("--format", choices=sorted(FILES), default="torchscript")
    parser.add_argument("--sample-image", nargs="+", required=True, metavar="IMAGE",
                        help="images to check the export on; the first one is traced")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="export even when MODEL.WEIGHTS is empty (a randomly initialised model)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options, KEY VALUE pairs (MODEL.WEIGHTS ...)")
    return parser


def run(args) -> Dict:
    """Export, then compare eager and exported on every sample image; returns the check's summary."""
    import mnc_d2  # noqa: F401  (registers the model parts)
    from ..data.image_io import read_image
    from ..config import build_cfg
    from ..engine.defaults import MNCPredictor

    if str(args.config_file).endswith(".py"):
        raise ConfigError(f"{args.config_file}: mnc_d2.export takes a yaml config (DefaultPredictor needs one)")
    cfg = build_cfg(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "MNC":
        raise ConfigError(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; "
                          "mnc_d2.export exports MNC models (use Detectron2's tools/deploy for the others)")
    images = [read_image(path, "BGR") for path in args.sample_image]  # DefaultPredictor's input; named errors
    eager = MNCPredictor(cfg, allow_untrained=args.allow_untrained)
    check_output_dir(args.output)
    traced_on = preprocessed(eager, images[0])
    export_model(eager.model, traced_on, args.format, os.path.join(args.output, FILES[args.format]))
    atomic_write_json(os.path.join(args.output, SETTINGS_FILE),
                      export_settings(cfg, args.format, tuple(traced_on.shape[-2:])))
    exported = ExportedPredictor(args.output)
    checks = {}
    for path, image in zip(args.sample_image, images):
        checks[path] = compare_instances(eager(image)["instances"], exported(image)["instances"])
        checks[path]["input_size"] = list(preprocessed(eager, image).shape[-2:])
        logger.info(f"{path}: {json.dumps(checks[path])}")
    summary = {"ok": all(c["ok"] for c in checks.values()), "format": args.format, "images": checks}
    atomic_write_json(os.path.join(args.output, "export_check.json"), summary)
    return summary


def main(argv=None) -> int:
    from detectron2.utils.logger import setup_logger

    args = get_parser().parse_args(argv)
    setup_logger(name="mnc_d2")
    try:
        summary = run(args)
    except MNCError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    verdict = "matches" if summary["ok"] else "DOES NOT match"
    print(f"{args.format} model in {args.output}: {verdict} eager PyTorch on {len(summary['images'])} image(s) "
          f"(details: {os.path.join(args.output, 'export_check.json')})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
