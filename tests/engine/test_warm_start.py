"""Warm start of MNC from D2 Mask R-CNN / Faster R-CNN checkpoints that the tests write themselves."""
import logging
import os
import pickle

import pytest
import torch

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import mnc_d2
from conftest import REPO, small_cfg
from mnc_d2.data.datasets.builtin import register_mnc_shapes
from mnc_d2.engine import Trainer
from mnc_d2.modeling.roi_heads import rename_legacy_pathway_keys
from mnc_d2.checkpoint.warm_start import (MNCWarmStartCheckpointer, add_final_mask_head_from_mask_head,
                               add_segment_pathway_from_box_head, warm_start_report)

NUM_CLASSES = 5  # the small config's


def d2_cfg(*opts):
    """A small D2 Mask R-CNN (GeneralizedRCNN + StandardROIHeads) with the same backbone/RPN as small_cfg."""
    return small_cfg(
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, *opts,
    )


def mnc_cfg(*opts):
    """Small MNC whose stage-2 head is D2's conv mask head (so its convs can load from Mask R-CNN)."""
    return small_cfg("MODEL.MNC.MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
                     "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 14, *opts)


def write_checkpoint(cfg, path):
    torch.manual_seed(123)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[:-4], iteration=7)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mask_rcnn_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("d2") / "mask_rcnn.pth")
    return path, write_checkpoint(d2_cfg(), path)


def warm_start(cfg, path):
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = MNCWarmStartCheckpointer(model)
    checkpointer.load(path)
    return model, before, checkpointer.last_report


def assert_loaded(model, ckpt, prefixes, source_prefix=None):
    state = model.state_dict()
    names = [k for k in state if k.startswith(prefixes)]
    assert names
    for name in names:
        # D2 calls the box pathway "box_head"
        source = name.replace("roi_heads.box_pathway.", "roi_heads.box_head.") if source_prefix is None \
            else source_prefix + name.split(".", 2)[2]
        assert torch.equal(state[name], ckpt[source]), name
    return names


def test_mask_rcnn_same_resolution(mask_rcnn_checkpoint, caplog):
    """MNC's 14x14 RoI features max-pooled 2x2 (PATHWAY_POOL, as the reference) give 7x7 pathway inputs,
    like D2's 7x7 box pooler: backbone, RPN, box head, mask convs load; the segment
    pathway comes from the box head; the predictors' weights are fresh, and D2's log names them."""
    path, ckpt = mask_rcnn_checkpoint
    with caplog.at_level(logging.INFO):
        model, before, report = warm_start(mnc_cfg(), path)
    assert_loaded(model, ckpt, ("backbone.", "proposal_generator.", "roi_heads.box_pathway."))
    assert_loaded(model, ckpt, ("roi_heads.mask_head.mask_fcn", "roi_heads.mask_head.deconv"))
    seg = assert_loaded(model, ckpt, ("roi_heads.segment_pathway.",), source_prefix="roi_heads.box_head.")
    assert set(report["copied"]) == set(seg)

    mismatch = {name: (c, m) for name, c, m in report["shape_mismatch"]}
    assert set(mismatch) == {
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias",
    }
    assert mismatch["roi_heads.box_predictor.cls_score.weight"] == ((NUM_CLASSES + 1, 64), (NUM_CLASSES + 1, 128))
    assert mismatch["roi_heads.mask_head.predictor.weight"][0][0] == NUM_CLASSES  # per class there, 1 here
    assert mismatch["roi_heads.mask_head.predictor.weight"][1][0] == 1
    assert report["missing"] == []
    state = model.state_dict()
    for name in report["fresh"]:  # fresh = untouched by the load
        assert torch.equal(state[name], before[name]), name
    assert set(report["loaded"]) | set(report["fresh"]) | set(report["from_config"]) == set(state)

    log = caplog.text
    assert "Skip loading parameter 'roi_heads.box_predictor.cls_score.weight'" in log  # D2's warning
    assert "roi_heads.segment_pathway.* (4 tensors) initialised from the checkpoint's roi_heads.box_pathway.*" in log


def test_mask_rcnn_other_resolution_is_reported(mask_rcnn_checkpoint, caplog):
    """MNC's 14x14 RoI features unpooled (PATHWAY_POOL 1): fc1 of both pathways cannot load, and the
    log says so with both shapes."""
    path, ckpt = mask_rcnn_checkpoint
    with caplog.at_level(logging.INFO):
        model, before, report = warm_start(mnc_cfg("MODEL.MNC.PATHWAY_POOL", 1), path)
    assert_loaded(model, ckpt, ("backbone.", "proposal_generator."))
    mismatch = {name: (c, m) for name, c, m in report["shape_mismatch"]}
    fc_dim, channels = 64, 32
    for head in ("box_pathway", "segment_pathway"):
        name = f"roi_heads.{head}.fc1.weight"
        assert mismatch[name] == ((fc_dim, channels * 7 * 7), (fc_dim, channels * 14 * 14))
        assert torch.equal(model.state_dict()[name], before[name])
        assert torch.equal(model.state_dict()[f"roi_heads.{head}.fc2.weight"], ckpt["roi_heads.box_head.fc2.weight"])
    for head in ("box_pathway", "segment_pathway"):
        assert f"Skip loading parameter 'roi_heads.{head}.fc1.weight'" in caplog.text
        assert f"{(fc_dim, channels * 7 * 7)} in the checkpoint but {(fc_dim, channels * 14 * 14)}" in caplog.text


def test_faster_rcnn_into_paper_mask_head(tmp_path):
    """Faster R-CNN (no masks) into MNC with its own FC mask head: the mask head is all fresh."""
    path = str(tmp_path / "faster_rcnn.pth")
    ckpt = write_checkpoint(d2_cfg("MODEL.MASK_ON", False), path)
    assert not any(k.startswith("roi_heads.mask_head.") for k in ckpt)
    model, before, report = warm_start(small_cfg("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 14), path)  # MNCMaskHead
    assert_loaded(model, ckpt, ("backbone.", "proposal_generator.", "roi_heads.box_pathway."))
    mask_head = [k for k in model.state_dict() if k.startswith("roi_heads.mask_head.")]
    assert {name for name, _ in report["missing"]} == set(mask_head)
    assert report["unused"] == []


def test_mnc_checkpoint_loads_completely(tmp_path):
    """An MNC checkpoint (resume / eval) loads everything; nothing is copied or fresh."""
    path = str(tmp_path / "mnc.pth")
    ckpt = write_checkpoint(small_cfg(), path)
    model, _, report = warm_start(small_cfg(), path)
    assert report["fresh"] == [] and report["copied"] == {} and report["unused"] == []
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt[name]), name


def test_report_without_loading():
    model = build_model(mnc_cfg())
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("roi_heads.segment_pathway.")}
    state["roi_heads.extra.weight"] = torch.zeros(2)
    report = warm_start_report(model, state)
    assert sorted(report["fresh"]) == sorted(k for k in model.state_dict() if k.startswith("roi_heads.segment_pathway."))
    assert report["missing"][0][0].startswith("roi_heads.segment_pathway.")
    assert report["unused"] == ["roi_heads.extra.weight"]


def test_refuses_pickled_objects(tmp_path):
    """.pth files are read with weights_only=True: arbitrary pickled objects are refused."""
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": pickle.PickleError("not a tensor")}, path)
    checkpointer = MNCWarmStartCheckpointer(build_model(small_cfg()))
    with pytest.raises(RuntimeError, match="weights_only"):
        checkpointer.load(path)
    garbage = tmp_path / "truncated.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(pickle.UnpicklingError):  # torch's own error, not the message above
        checkpointer.load(str(garbage))


@pytest.fixture
def tiny_train_cfg(tmp_path):
    """small_cfg training 1 iteration on 2 generated shapes images (a dataset registered for the test)."""
    name = "test_warm_start_shapes"
    register_mnc_shapes(name, str(tmp_path / "data"), num_images=2, seed=3, image_size=96)
    yield lambda *opts: small_cfg(
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 1,
        "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.WARMUP_ITERS", 0, "TEST.EVAL_PERIOD", 0,
        "INPUT.MIN_SIZE_TRAIN", (96,), "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"), *opts)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_trainer_checkpoint_is_weights_only(tmp_path, tiny_train_cfg):
    """A checkpoint written by mnc_d2's Trainer (model, trainer state with optimizer and scheduler,
    iteration) loads with torch.load(weights_only=True), and the warm-start checkpointer reads it."""
    trainer = Trainer(tiny_train_cfg())
    trainer.resume_or_load(resume=False)
    trainer.train()
    path = str(tmp_path / "out" / "model_final.pth")
    data = torch.load(path, weights_only=True)
    assert data["iteration"] == 0 and set(data) == {"model", "trainer", "iteration"}
    assert "LRScheduler" in data["trainer"]["hooks"]

    checkpointer = MNCWarmStartCheckpointer(build_model(small_cfg()))
    checkpointer.load(path)
    assert checkpointer.last_report["fresh"] == []


def test_trainer_warm_starts_model_weights(mask_rcnn_checkpoint, tiny_train_cfg):
    """Trainer.resume_or_load reads MODEL.WEIGHTS through MNCWarmStartCheckpointer (once integrated)."""
    trainer = Trainer(tiny_train_cfg("MODEL.WEIGHTS", mask_rcnn_checkpoint[0]))
    if not isinstance(trainer.checkpointer, MNCWarmStartCheckpointer):
        pytest.skip(f"Trainer's checkpointer is {type(trainer.checkpointer).__name__}, not yet an "
                    "MNCWarmStartCheckpointer (docs/workflows.md, section 2)")
    trainer.resume_or_load(resume=False)
    report = trainer.checkpointer.last_report
    assert "roi_heads.box_predictor.cls_score.weight" in report["fresh"]
    assert report["copied"]  # segment pathway from the D2 box head


def test_legacy_pickles(tmp_path, mask_rcnn_checkpoint):
    """.pkl files go through D2's pickle loader: a D2 model-zoo file (numpy arrays + __author__) and
    a Caffe2 / Detectron1 ImageNet file (C2 blob names, converted by D2's matching heuristics)."""
    _, ckpt = mask_rcnn_checkpoint
    zoo_path = str(tmp_path / "model_final_zoo.pkl")
    with open(zoo_path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in ckpt.items()}, "__author__": "Detectron2"}, f)
    model, _, report = warm_start(mnc_cfg(), zoo_path)
    assert_loaded(model, ckpt, ("backbone.", "proposal_generator.", "roi_heads.box_pathway."))
    assert len(report["shape_mismatch"]) == 4

    stem = ckpt["backbone.bottom_up.stem.conv1.weight"] + 1
    c2_path = str(tmp_path / "R-18.pkl")
    with open(c2_path, "wb") as f:
        pickle.dump({"conv1_w": stem.numpy(), "fc1000_w": torch.zeros(1000, 512).numpy()}, f)
    model, _, report = warm_start(mnc_cfg(), c2_path)
    assert torch.equal(model.state_dict()["backbone.bottom_up.stem.conv1.weight"], stem)
    assert report["loaded"] == ["backbone.bottom_up.stem.conv1.weight"]
    assert report["unused"] == ["fc1000.weight"]  # C2 name converted by D2, unused by MNC


def test_d2_model_zoo_mask_rcnn_into_mnc():
    """The flagship path, D2's R50-FPN Mask R-CNN -> MNC, compared on state dicts (no file): the D2 config
    switched to MNC with the two keys and mnc_d2's R50-FPN config both build MNC's default (7x7 RoI features,
    the paper's FC mask head at stage 2, D2's conv head on the final boxes): the box head loads, the stage-2
    mask head is fresh and the final mask head loads from D2's, but its predictor."""
    def zoo_cfg(path, *opts):
        cfg = get_cfg()
        mnc_d2.add_mnc_config(cfg)
        cfg.merge_from_file(path)
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        return cfg

    d2_yaml = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    d2_state = build_model(zoo_cfg(d2_yaml)).state_dict()

    switched = build_model(zoo_cfg(d2_yaml, "MODEL.META_ARCHITECTURE", "MNC", "MODEL.ROI_HEADS.NAME", "MNCROIHeads"))
    reports = []
    for mnc in (switched, build_model(zoo_cfg(os.path.join(REPO, "configs", "mnc_R_50_FPN_1x.yaml")))):
        state = dict(d2_state)
        rename_legacy_pathway_keys(state, "roi_heads.")  # as the checkpointer does: D2's box head is the box pathway
        copied = add_segment_pathway_from_box_head(mnc, state)
        copied.update(add_final_mask_head_from_mask_head(mnc, state))
        reports.append((mnc, copied, warm_start_report(mnc, state, copied)))
    assert sorted(reports[0][2]["fresh"]) == sorted(reports[1][2]["fresh"])
    mnc, copied, report = reports[0]
    fresh = set(report["fresh"])
    assert not fresh & {"roi_heads.box_pathway.fc1.weight", "roi_heads.segment_pathway.fc1.weight"}
    assert {k for k in mnc.state_dict() if k.startswith("roi_heads.mask_head.")} <= fresh  # the paper's FC head
    # the final mask head is D2's: its 4 convs and deconv load from Mask R-CNN's, its predictor is class-agnostic
    final = {k for k in mnc.state_dict() if k.startswith("roi_heads.final_mask_head.")}
    assert final & fresh == {"roi_heads.final_mask_head.predictor.weight", "roi_heads.final_mask_head.predictor.bias"}
    assert final <= set(copied) and len(final - fresh) == 10  # mask_fcn1-4, deconv: weight and bias
    assert all(k.startswith(("roi_heads.mask_head.", "roi_heads.box_predictor.", "roi_heads.final_mask_head.predictor."))
               for k in fresh)
    assert not any(k.startswith(("backbone.", "proposal_generator.")) for k in report["fresh"] + report["unused"])


def test_checkpoint_with_the_old_pathway_names_loads(tmp_path):
    """Checkpoints written before the pathways were renamed (``box_head`` / ``seg_head``) load completely,
    through the checkpointer and through a plain ``load_state_dict``."""
    model = build_model(small_cfg())
    old = {k.replace("roi_heads.box_pathway.", "roi_heads.box_head.").replace(
        "roi_heads.segment_pathway.", "roi_heads.seg_head."): v.clone() + 1 for k, v in model.state_dict().items()}
    assert any(".seg_head." in k for k in old) and not any("pathway" in k for k in old)
    path = str(tmp_path / "old_names.pth")
    torch.save({"model": old}, path)
    loaded, _, report = warm_start(small_cfg(), path)
    assert report["fresh"] == [] and report["unused"] == [] and report["copied"] == {}
    fresh = build_model(small_cfg())
    assert not fresh.load_state_dict(old, strict=True).missing_keys
    for model_ in (loaded, fresh):
        for name, value in model_.state_dict().items():
            if name not in ("pixel_mean", "pixel_std"):
                assert torch.equal(value, model.state_dict()[name] + 1), name
