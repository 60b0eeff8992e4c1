#!/usr/bin/env python
"""Convert an mmdetection ImageNet ResNet GN or GN+WS checkpoint (torchvision-style names with
mmcv's GN layers: conv1, gn1, layer1.0.conv1, ..., layer1.0.downsample.0/1) to detectron2's
names, as detectron2's tools/convert-torchvision-to-d2.py does for BN models
(gn_det.train.mmdet_weights). The output .pkl loads as MODEL.WEIGHTS (configs/mask_rcnn_gn_ws.yaml).

    # mmdetection's open-mmlab://jhu/resnet50_gn_ws (downloaded by you; nothing here downloads):
    #   https://download.openmmlab.com/pretrain/third_party/resnet50_gn_ws-15beedd8.pth
    python tools/convert_mmdet_backbone.py resnet50_gn_ws-15beedd8.pth weights/R-50-GN-WS.pkl
"""
from __future__ import annotations

import argparse

from gn_det.errors import exit_on_user_error
from gn_det.train.mmdet_weights import convert_mmdet_resnet, load_mmdet_checkpoint, save_detectron2_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="mmdetection/mmcv checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights to write (.pkl)")
    parser.add_argument("--trust-file", action="store_true",
                        help="read the checkpoint with torch.load(weights_only=False) (runs code a file may hold)")
    args = parser.parse_args()
    with exit_on_user_error("convert_mmdet_backbone"):
        weights, dropped = convert_mmdet_resnet(load_mmdet_checkpoint(args.source, trust_file=args.trust_file))
        save_detectron2_weights(weights, args.output)
    left_out = f"; left out {', '.join(dropped)} (the ImageNet classifier)" if dropped else ""
    print(f"wrote {len(weights)} arrays in detectron2's names to {args.output}{left_out}")


if __name__ == "__main__":
    main()
