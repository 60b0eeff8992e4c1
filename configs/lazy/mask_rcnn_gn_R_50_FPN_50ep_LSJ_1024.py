"""Large images, small batches, as a LazyConfig in the style of detectron2's new_baselines:
GN Mask R-CNN R50-FPN from scratch with large-scale jitter (LSJ: scale 0.1-2.0, 1024 x 1024
crops), 2 images per GPU (16 on 8 GPUs), mixed precision (detectron2's AMPTrainer: fp16 with
loss scaling), GN in the backbone, the FPN, the 4conv1fc box head and the mask head, 50 epochs.

GN needs no cross-GPU statistics, so where new_baselines uses SyncBN, each GPU here normalizes
its own 2 images; the schedule holds for any number of GPUs at 2 images each if
``dataloader.train.total_batch_size`` and ``optimizer.lr`` are scaled together.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .mask_rcnn_gn_R_50_FPN_3x import dataloader, gn, model, optimizer, train  # GN everywhere, 4conv1fc

gn["recompute_output"] = True  # GN outputs recomputed in backward, not kept: at large images memory decides

model.backbone.bottom_up.freeze_at = 0  # from scratch: everything trains
model.pixel_std = [57.375, 57.120, 58.395]  # from scratch: ImageNet's std, as new_baselines
model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convs in the RPN head, as new_baselines

image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.recompute_boxes = True  # crops cut boxes: recompute them from the masks
dataloader.train.total_batch_size = 16  # 2 images per GPU on 8 GPUs

train.init_checkpoint = ""
train.amp.enabled = True
train.ddp.fp16_compression = True
# 50 epochs of COCO train2017 (118k images) at 16 images per iteration
train.max_iter = 368750
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[327778, 355092], num_updates=train.max_iter),
    warmup_length=2000 / train.max_iter,  # 4x new_baselines' 500: the same images seen in warm-up
    warmup_factor=0.067,
)
optimizer.lr = 0.025  # new_baselines' 0.1 at 64 images, scaled linearly to 16
optimizer.weight_decay = 4e-5
