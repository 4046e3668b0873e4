"""Stage 2 of MNC: the class-agnostic mask head (paper: RoI features -> FC 256 -> M x M mask).

Shape shorthand: R = RoIs, C = channels, P = RoI feature side, M = mask side.
"""
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
import fvcore.nn.weight_init as weight_init


@ROI_MASK_HEAD_REGISTRY.register()
class MNCMaskHead(BaseMaskRCNNHead):
    """
    [k x k conv + ReLU] x NUM_CONV -> FC(FC_DIM) + ReLU -> FC(M*M): one class-agnostic mask per RoI
    (k = CONV_KERNEL: 3, or 1 for a channel reduction).
    Only ``layers`` is used by :class:`MNCROIHeads` (losses are computed there, with MNC's targets).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dim: int, mask_size: int,
                 conv_norm: str = "", conv_kernel: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.mask_size = mask_size
        self.convs = nn.ModuleList()
        channels = input_shape.channels
        for i, dim in enumerate(conv_dims):
            conv = Conv2d(channels, dim, conv_kernel, padding=conv_kernel // 2, bias=not conv_norm,
                          norm=get_norm(conv_norm, dim), activation=F.relu)
            weight_init.c2_msra_fill(conv)
            self.convs.append(conv)
            channels = dim
        self.fc = nn.Linear(channels * input_shape.height * input_shape.width, fc_dim)
        self.predictor = nn.Linear(fc_dim, mask_size * mask_size)
        weight_init.c2_xavier_fill(self.fc)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.MNC.MASK_HEAD
        ret.update(input_shape=input_shape, conv_dims=[head.CONV_DIM] * head.NUM_CONV, fc_dim=head.FC_DIM,
                   mask_size=head.MASK_SIZE, conv_norm=cfg.MODEL.ROI_MASK_HEAD.NORM, conv_kernel=head.CONV_KERNEL)
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) RoI features -> (R, 1, M, M) mask logits."""
        for conv in self.convs:
            x = conv(x)
        x = F.relu(self.fc(torch.flatten(x, start_dim=1)))
        return self.predictor(x).view(-1, 1, self.mask_size, self.mask_size)
