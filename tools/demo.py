#!/usr/bin/env python
"""`make demo`: train the CPU-sized GN Mask R-CNN (configs/demo/mask_rcnn_gn_shapes.yaml) from
scratch on gn_det's embedded shapes dataset, evaluate it with COCOEvaluator (box and mask AP
tables), and draw its predictions on a few validation images with detectron2's Visualizer
under <output>/visualizations/.

    python tools/demo.py                     # the full demo (a few minutes on CPU)
    python tools/demo.py --max-iter 20       # a quick look
    python tools/demo.py KEY VALUE ...       # config overrides
"""
import argparse
import os

import cv2
import torch

import train_net

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.utils.visualizer import Visualizer

import gn_det
from gn_det.train.checkpoint import SafeCheckpointer
from gn_det.train.data import SHAPES_VAL, register_shapes_dataset
from gn_det.train.engine import final_ap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")


def draw_predictions(cfg, weights: str, out_dir: str, num_images: int, threshold: float = 0.5) -> list:
    """Run the trained model on the first validation images; draw its detections scoring at
    least ``threshold`` (at 2x scale: the images are small); write the drawings as PNG."""
    model = gn_det.build_model(cfg).eval()
    SafeCheckpointer(model).load(weights)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    metadata = MetadataCatalog.get(SHAPES_VAL)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for record in DatasetCatalog.get(SHAPES_VAL)[:num_images]:
        image = cv2.imread(record["file_name"])  # BGR, as the model's PIXEL_MEAN expects
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            instances = model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        drawing = Visualizer(image[:, :, ::-1], metadata, scale=2.0).draw_instance_predictions(instances).get_image()
        path = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(record['file_name']))[0]}.png")
        cv2.imwrite(path, drawing[:, :, ::-1])
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--max-iter", type=int, default=0, help="override SOLVER.MAX_ITER (0: the config's)")
    parser.add_argument("--num-vis", type=int, default=4, help="validation images to draw")
    parser.add_argument("--vis-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    opts = ["OUTPUT_DIR", args.output] + list(args.opts)
    if args.max_iter:
        opts += ["SOLVER.MAX_ITER", args.max_iter, "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", min(100, args.max_iter)]
    register_shapes_dataset()
    train_args = train_net.argument_parser().parse_args(["--config", CONFIG] + [str(o) for o in opts])
    train_net.main(train_args)
    cfg = gn_det.get_config(CONFIG, opts)
    drawings = draw_predictions(cfg, os.path.join(args.output, "model_final.pth"),
                                os.path.join(args.output, "visualizations"), args.num_vis,
                                args.vis_threshold)
    ap = final_ap(args.output)
    summary = f"box AP = {ap['box_AP']:.1f}, mask AP = {ap['mask_AP']:.1f}"
    print(f"\ngn_det demo: {summary}\npredictions drawn: {', '.join(os.path.relpath(p) for p in drawings)}")


if __name__ == "__main__":
    main()
