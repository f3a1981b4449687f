"""Multi-scale RoIAlign with a choice of RoIAlign's pixel model. torchvision's MultiScaleRoIAlign always
uses aligned=False; mmdetection (the authors' code) uses aligned=True, the half-pixel offset of
Detectron2. The level assignment and scales are torchvision's."""
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


class RoIAlignPooler(MultiScaleRoIAlign):
    def __init__(self, featmap_names, output_size, sampling_ratio, *, aligned=False, **kwargs):
        super().__init__(featmap_names, output_size, sampling_ratio, **kwargs)
        self.aligned = aligned

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        else:
            levels = self.map_levels(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            result[idx] = pooled.to(result.dtype)
        return result

    def extra_repr(self):
        return f"aligned={self.aligned}"
