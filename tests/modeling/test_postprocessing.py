"""MNC's image-space post-processing: threshold 0.4, masks pasted in the box they were predicted in."""
import torch

from detectron2.structures import Boxes, Instances
from mnc_d2.modeling.postprocessing import mnc_postprocess


def candidates(mask_value=0.45):
    c = Instances((100, 100))
    c.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]]))
    c.mask_boxes = Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]]))
    c.scores = torch.tensor([0.9, 0.8])
    c.pred_classes = torch.tensor([0, 1])
    c.pred_masks = torch.full((2, 1, 4, 4), mask_value)
    c.kept_rank = torch.tensor([0, -1])  # only the first is kept
    return c


def test_mask_is_pasted_in_its_mask_box_not_the_refined_box():
    out = mnc_postprocess(candidates(), 100, 100, mask_threshold=0.4, mask_voting=False)
    assert len(out) == 1
    mask = out.pred_masks[0]
    assert mask[5, 5] and mask[35, 35]  # inside the mask box (0..40)
    assert not mask[45, 45]  # inside the refined box (10..50) but outside the mask box
    assert torch.equal(out.pred_boxes.tensor, torch.tensor([[10.0, 10.0, 50.0, 50.0]]))


def test_threshold_is_0_4_not_d2s_0_5():
    out = mnc_postprocess(candidates(0.45), 100, 100, mask_threshold=0.4, mask_voting=False)
    assert out.pred_masks.any()
    out = mnc_postprocess(candidates(0.45), 100, 100, mask_threshold=0.5, mask_voting=False)
    assert not out.pred_masks.any()


def test_rescaling_to_output_resolution():
    out = mnc_postprocess(candidates(), 200, 50, mask_threshold=0.4, mask_voting=False)
    assert out.pred_masks.shape == (1, 200, 50)
    assert torch.allclose(out.pred_boxes.tensor, torch.tensor([[5.0, 20.0, 25.0, 100.0]]))


def test_voting_output_box_is_the_tight_box_of_the_voted_mask():
    out = mnc_postprocess(candidates(0.9), 100, 100, mask_threshold=0.4, mask_voting=True)
    ys, xs = torch.nonzero(out.pred_masks[0], as_tuple=True)
    assert torch.allclose(out.pred_boxes.tensor[0], torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
