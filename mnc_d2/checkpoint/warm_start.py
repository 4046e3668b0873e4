"""Warm-starting MNC from a Detectron2 Mask R-CNN / Faster R-CNN checkpoint, with an explicit report.

MNC keeps D2's parameter names where its parts are D2's (``backbone.*``, ``proposal_generator.*``,
``roi_heads.mask_head.*`` when the mask head is a D2 one); D2's box head ``roi_heads.box_head.*`` is
MNC's box pathway ``roi_heads.box_pathway.*`` and is renamed on load (as are the old pathway names
of mnc_d2's own checkpoints), so a D2 checkpoint loads into them. What cannot load is initialised
fresh (D2 logs which), for these reasons:

* ``roi_heads.segment_pathway.*`` has no counterpart in D2. When the checkpoint has none it is
  initialised from the checkpoint's box head (same architecture; the paper initialises both pathways
  from the same pre-trained fc layers).
* ``roi_heads.box_predictor.{cls_score,bbox_pred}``: their input is box pathway ++ segment pathway,
  twice as wide as D2's, so they are fresh.
* ``roi_heads.box_pathway.fc1``: its input is C * P * P; it loads only if the MNC config's
  ``ROI_BOX_HEAD.POOLER_RESOLUTION / MODEL.MNC.PATHWAY_POOL`` (14 / 2 = 7 in MNC's configs) equals the
  checkpoint's box pooler resolution (7 in D2's).
* ``roi_heads.mask_head.predictor``: MNC's stage 2 predicts one class-agnostic mask, D2 one per class.
* ``roi_heads.final_mask_head.*`` (MNC's default: D2's conv mask head on the final boxes) has no
  counterpart in D2. When the checkpoint has none it is initialised from the checkpoint's mask head
  (the same architecture in a Mask R-CNN checkpoint): its convs and deconv load; its predictor is
  class-agnostic, so it is fresh when the checkpoint's is per class.

D2's checkpointer logs what does not load (a warning per shape-mismatched tensor, missing and unused
keys by module); :func:`warm_start_report` returns the same as a dict for programs and tests.

Files: a ``.pth`` (written by D2's checkpointer: the model's tensors, the trainer's state
(iteration, LR scheduler and, with mnc_d2's Trainer, optimizer) and an ``iteration`` int) is read with ``torch.load(weights_only=True)``, which executes no
pickled code. Legacy ``.pkl`` files (Detectron1 / Caffe2 ImageNet models such as ``R-50.pkl``, and
D2 model-zoo ``model_final_*.pkl``) are pickled numpy arrays: they go through D2's loader with an
unpickler that builds only containers, numbers, strings and numpy arrays (:mod:`mnc_d2.safe_pickle`;
``MNC_D2_TRUST_PICKLE=1`` for a trusted file that needs more).
"""
import pickle
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from ..utils.errors import CheckpointError, UnsafeCheckpointError
from .safe_pickle import weights_only_pickles
from ..modeling.roi_heads import rename_legacy_pathway_keys

__all__ = [
    "MNCWarmStartCheckpointer",
    "add_final_mask_head_from_mask_head",
    "add_segment_pathway_from_box_head",
    "warm_start_report",
]


BOX_HEAD_PREFIX = "roi_heads.box_pathway."
SEG_HEAD_PREFIX = "roi_heads.segment_pathway."
MASK_HEAD_PREFIX = "roi_heads.mask_head."
FINAL_MASK_PREFIX = "roi_heads.final_mask_head."
# Model parts a D2 checkpoint lacks, initialised from a part it has: (target, source, why it may).
DERIVED_PARTS = (
    (SEG_HEAD_PREFIX, BOX_HEAD_PREFIX, "the checkpoint has no segment pathway; same architecture"),
    (FINAL_MASK_PREFIX, MASK_HEAD_PREFIX, "the checkpoint has no final mask head; where the names and shapes "
                                          "match, the same architecture"),
)
# Buffers D2 sets from the config, never from a checkpoint (D2's checkpointer ignores them too).
_FROM_CONFIG = ("pixel_mean", "pixel_std")


def _strip_module_prefix(state_dict: Dict[str, object]) -> None:
    """Checkpoints saved from a (Distributed)DataParallel model prefix every key with ``module.``."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        for key in list(state_dict):
            state_dict[key[len("module."):]] = state_dict.pop(key)


def _copy_part(model: nn.Module, state_dict: Dict[str, torch.Tensor], target: str, source: str) -> Dict[str, str]:
    """Add ``target + X`` = checkpoint ``source + X`` to ``state_dict`` (in place) for every ``target + X`` the
    model has, when the checkpoint has no ``target`` entries. Tensors are copied whatever their shape; a
    mismatch is reported like any other. Returns {model name: checkpoint name} of the added entries."""
    if any(k.startswith(target) for k in state_dict):
        return {}
    model_keys = model.state_dict().keys()
    copied = OrderedDict()
    for key in list(state_dict):
        if key.startswith(source) and target + key[len(source):] in model_keys:
            copied[target + key[len(source):]] = key
            state_dict[target + key[len(source):]] = state_dict[key].clone()
    return dict(copied)


def add_segment_pathway_from_box_head(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Add ``roi_heads.segment_pathway.X`` = checkpoint ``roi_heads.box_pathway.X`` to ``state_dict`` (in place)
    when the model has a segment pathway and the checkpoint none (a D2 checkpoint). Tensors are
    copied whatever their shape; a mismatch (e.g. other pooler resolution) is reported like any other.

    Returns:
        {model name: checkpoint name} of the added entries (empty if nothing was added).
    """
    return _copy_part(model, state_dict, SEG_HEAD_PREFIX, BOX_HEAD_PREFIX)


def add_final_mask_head_from_mask_head(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Add ``roi_heads.final_mask_head.X`` = checkpoint ``roi_heads.mask_head.X`` (in place) when the model has
    a final mask head (``MODEL.MNC.FINAL_MASK_HEAD.ENABLED``) and the checkpoint none: a D2 Mask R-CNN's conv mask
    head is the final head's architecture. Returns {model name: checkpoint name} of the added entries."""
    return _copy_part(model, state_dict, FINAL_MASK_PREFIX, MASK_HEAD_PREFIX)


def warm_start_report(model: nn.Module, checkpoint_state_dict: Mapping[str, object],
                      copied: Optional[Mapping[str, str]] = None) -> dict:
    """What loading ``checkpoint_state_dict`` into ``model`` does (nothing is loaded here).

    Args:
        model: the MNC model (any nn.Module works).
        checkpoint_state_dict: name -> tensor (or numpy array), after any key conversion.
        copied: {model name: checkpoint name} of entries that were not in the file but derived from
            other entries (:func:`add_segment_pathway_from_box_head`).
    Returns:
        dict with
          ``loaded``: names loaded from the checkpoint (including the copied ones),
          ``copied``: the ``copied`` argument,
          ``missing``: (name, model shape) initialised fresh: the checkpoint lacks them,
          ``shape_mismatch``: (name, checkpoint shape, model shape) initialised fresh,
          ``fresh``: the names in ``missing`` and ``shape_mismatch``,
          ``unused``: checkpoint names the model does not have,
          ``from_config``: buffers set from the config (pixel_mean/std) that the checkpoint lacks.
    """
    copied = dict(copied or {})
    model_state = model.state_dict()
    loaded, missing, mismatch, from_config = [], [], [], []
    for name, value in model_state.items():
        model_shape = tuple(value.shape)
        if name not in checkpoint_state_dict:
            if name.split(".")[-1] in _FROM_CONFIG:
                from_config.append(name)
            else:
                missing.append((name, model_shape))
            continue
        checkpoint_shape = tuple(checkpoint_state_dict[name].shape)
        if model_shape == checkpoint_shape:
            loaded.append(name)
        else:
            mismatch.append((name, checkpoint_shape, model_shape))
    copied_sources = set(copied.values())
    unused = [k for k in checkpoint_state_dict if k not in model_state and k not in copied_sources
              and "anchor_generator.cell_anchors" not in k]  # old D2 files saved anchors; now non-persistent
    return {
        "loaded": loaded,
        "copied": copied,
        "missing": missing,
        "shape_mismatch": mismatch,
        "fresh": [m[0] for m in missing] + [m[0] for m in mismatch],
        "unused": unused,
        "from_config": from_config,
    }


class MNCWarmStartCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that (1) reads ``.pth`` files with ``torch.load(weights_only=True)``,
    (2) initialises the segment pathway from the checkpoint's box head when the checkpoint has none
    (and the final mask head from its mask head: :func:`add_final_mask_head_from_mask_head`),
    and (3) keeps what loaded and what is fresh in ``self.last_report`` (:func:`warm_start_report`; D2 logs
    the per-key warnings). Saving is D2's.

    Args:
        segment_pathway_from_box_head: do (2); False leaves the segment pathway at its random init.
        other arguments: as :class:`DetectionCheckpointer`.
    """

    def __init__(self, model, save_dir="", *, segment_pathway_from_box_head: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.segment_pathway_from_box_head = segment_pathway_from_box_head
        self.last_report: Optional[dict] = None
        self._source = "the checkpoint"

    def load(self, path, *args, **kwargs):
        self._source = path or "the checkpoint"
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith((".pkl", ".pyth")):
            # legacy pickles: D2's loader and format handling; .pkl through an unpickler that builds only
            # weights (.pyth is torch.load, weights-only by default on torch >= 2.6)
            from detectron2.checkpoint import detection_checkpoint

            try:
                with weights_only_pickles(detection_checkpoint, filename):
                    loaded = super()._load_file(filename)
                if not isinstance(loaded.get("model"), dict):
                    raise TypeError(f"its weights are a {type(loaded.get('model')).__name__}, not a dict")
                return loaded
            except (UnsafeCheckpointError, FileNotFoundError):
                raise
            except Exception as e:  # D2 assumes the layout of a weights file: say what was found instead
                raise CheckpointError(f"{filename} is not a Detectron2 / Detectron weights file "
                                      f"({type(e).__name__}: {e}).") from e
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's weights-only unpickler refuses a global ("Unsupported global", "unsupported GLOBAL"
            # in torch 2.14); anything else is a truncated or foreign file
            if "global" not in str(e).lower():
                raise
            raise UnsafeCheckpointError(
                f"{filename} contains code or objects that are not weights, so it was NOT loaded (read with "
                f"torch.load(weights_only=True), which runs no code; it refused: {str(e).splitlines()[0][:200]}). "
                "Use weights from a source you trust; to keep only the tensors of a file you trust, re-save them: "
                "torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)"
            ) from None
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_model(self, checkpoint):
        state_dict = checkpoint["model"]
        self._convert_ndarray_to_tensor(state_dict)
        _strip_module_prefix(state_dict)
        if any(k.startswith(BOX_HEAD_PREFIX) for k in self.model.state_dict()):  # an MNC model
            rename_legacy_pathway_keys(state_dict, "roi_heads.")  # D2's box head, mnc_d2's old names
        if checkpoint.get("matching_heuristics", False):
            # Caffe2 / pycls names -> ours, done here (not in D2's _load_model) so the report sees ours
            state_dict = align_and_update_state_dicts(self.model.state_dict(), state_dict,
                                                      c2_conversion=checkpoint.get("__author__") == "Caffe2")
            checkpoint["matching_heuristics"] = False
        copied = add_segment_pathway_from_box_head(self.model, state_dict) if self.segment_pathway_from_box_head else {}
        copied.update(add_final_mask_head_from_mask_head(self.model, state_dict))
        checkpoint["model"] = state_dict
        self.last_report = warm_start_report(self.model, state_dict, copied)
        for target, source, why in DERIVED_PARTS:  # D2 reports what is missing, unused or of another shape
            n = sum(name.startswith(target) for name in copied)
            if n:
                self.logger.info(f"{target}* ({n} tensors) initialised from the checkpoint's {source}* ({why}).")
        return super()._load_model(checkpoint)
