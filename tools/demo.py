#!/usr/bin/env python
"""`make demo`: a few training steps and one inference of GN Mask R-CNN on CPU with
gn_det's GroupNorm (until the training issue turns this into train + evaluate on the
embedded dataset)."""
import argparse
import time

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.data import synthetic_batch


def swap_group_norms(model: torch.nn.Module) -> int:
    """Replace every nn.GroupNorm in place by gn_det.GroupNorm with the same parameters."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.GroupNorm:
                gn = gn_det.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                gn.load_state_dict(child.state_dict())
                setattr(parent, name, gn)
                swapped += 1
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    print(f"GN Mask R-CNN R50-FPN: {swap_group_norms(model)} GroupNorm layers run on gn_det")
    batch = synthetic_batch(2, args.size, args.size, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    with EventStorage(0):
        for step in range(args.steps):
            start = time.perf_counter()
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            parts = "  ".join(f"{k}={v.item():.3f}" for k, v in sorted(losses.items()))
            print(f"step {step}: total_loss={total.item():.3f}  {parts}  ({time.perf_counter() - start:.1f} s)")
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": args.size, "width": args.size}])
    print(f"inference: {len(out[0]['instances'])} detections on a {args.size}x{args.size} image")


if __name__ == "__main__":
    main()
