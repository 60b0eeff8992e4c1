"""GN Mask R-CNN R50-FPN as a LazyConfig: configs/mask_rcnn_gn.yaml's model and schedule (GN in
the backbone, the FPN, a 4conv1fc box head and the mask head; ImageNet R-50-GN.pkl; 3x, 16
images per batch). Train with ``python tools/train_net.py --config configs/lazy/mask_rcnn_gn_R_50_FPN_3x.py``.

Every ``norm=fast_gn()`` builds with the ``gn`` settings below (``gn_det.GNSettings``' fields,
YAML's ``MODEL.GN.*``), and ``gn_model`` finishes the model with them (fused ReLUs, output
recomputation, channels_last), however it is built: detectron2's own
``tools/lazyconfig_train_net.py`` (``instantiate(cfg.model)``) too; ``gn.num_groups=16`` on
the command line counts. For one layer with its own settings use a factory instead:
``norm=L(gn_det.GroupNorm.factory)(num_groups=16, eps=1e-6)``.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from gn_det.train.evaluation import FastCOCOEvaluator
from gn_det.lazy import fast_gn, gn_model

model = gn_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model)  # finished with `gn`
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x  # milestones relative to max_iter
train = model_zoo.get_config("common/train.py").train
# 3x at 16 images per batch (common/data/coco.py's total_batch_size), as detectron2's 3x YAMLs'
# SOLVER.MAX_ITER: common/train.py's 90000 is 1x, and the scheduler only scales to max_iter (LR
# drops at 210000 and 250000, their STEPS). Scale both with dataloader.train.total_batch_size.
train.max_iter = 270000

# COCOEvaluator with a compiled COCOeval (detectron2's, else faster-coco-eval's)
dataloader.evaluator = L(FastCOCOEvaluator)(dataset_name="${..test.dataset.names}")

gn = dict(num_groups=32, channels_per_group=0, eps=1e-5, fuse_activation=True, channels_last=False)

# fmt: off
model.backbone.bottom_up.stem.norm = \
    model.backbone.bottom_up.stages.norm = \
    model.backbone.norm = \
    model.roi_heads.box_head.conv_norm = \
    model.roi_heads.mask_head.conv_norm = fast_gn()
# fmt: on
model.backbone.bottom_up.stages.stride_in_1x1 = False  # FAIR's GN weights: stride in the 3x3
model.backbone.bottom_up.freeze_at = 2  # stem and res2 frozen, as detectron2's ResNet default
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.pixel_std = [1.0, 1.0, 1.0]  # R-50-GN.pkl was trained on BGR 0-255 minus the mean, unscaled

train.init_checkpoint = "detectron2://ImageNetPretrained/FAIR/R-50-GN.pkl"
