"""GN + Weight Standardization Mask R-CNN R50-FPN as a LazyConfig, the twin of
configs/mask_rcnn_gn_ws.yaml: mask_rcnn_gn_R_50_FPN_3x.py's model (GN in the backbone, FPN, box
and mask heads) with every convolution before a GN standardizing its weight as mmcv's ConvWS2d
(``gn.weight_standardization="mmcv"``), 2x at 16 images per batch (mmdetection's GN+WS Mask
R-CNN), from mmdetection's ImageNet GN+WS ResNet-50 converted to detectron2's names:

    # download https://download.openmmlab.com/pretrain/third_party/resnet50_gn_ws-15beedd8.pth, then
    python tools/convert_mmdet_backbone.py resnet50_gn_ws-15beedd8.pth weights/R-50-GN-WS.pkl
    python tools/train_net.py --config configs/lazy/mask_rcnn_gn_ws_R_50_FPN_2x.py

One layer with its own variant instead: ``conv_norm=L(gn_det.ws_norm)(norm="FastGN", variant="timm")``.
"""
from detectron2 import model_zoo

from .mask_rcnn_gn_R_50_FPN_3x import dataloader, model, optimizer, train  # noqa: F401

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x  # milestones relative to max_iter
train.max_iter = 180000  # 2x at 16 images per batch (the scheduler is scaled to this)

gn = dict(num_groups=32, channels_per_group=0, eps=1e-5, fuse_activation=True, channels_last=False,
          weight_standardization="mmcv")

# mmdetection's ImageNet weights: RGB input normalized with ImageNet's mean and std
model.input_format = dataloader.train.mapper.image_format = dataloader.test.mapper.image_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]

train.init_checkpoint = "weights/R-50-GN-WS.pkl"
