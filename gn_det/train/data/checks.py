"""Checks of a dataset's images before training, and the settings of what to do with a bad
image, declared once (``DataSettings``' fields, each a config key).

``check_images`` reads each image's header (format and size, with PIL, which reads no pixels)
and its last bytes (a JPEG ends with its end-of-image marker, a PNG with its IEND chunk: a
truncated file does not), in parallel threads; ``DATALOADER.CHECK_IMAGES decode`` decodes
every image fully instead (minutes on COCO), ``none`` checks only that the files exist.
What it finds is a ``DatasetError`` naming the dataset, the files and what is wrong with
each, before step 0. What goes bad later (a file changed during training) is met by the
training mapper (``gn_det.train.data.mapper``): an error naming the file and the dataset, or with
``DATALOADER.BAD_IMAGES skip`` the image is left out with a warning.

``check_annotations`` checks a COCO dict's annotations for what cannot be right (a box of
non-positive width or height, a box outside its image, a duplicate image or annotation id, a
polygon of fewer than 3 points, a segmentation far from its box, an RLE mask of another size
than its image, an image without a positive size, detectron2's unsupported ``ignore`` flag):
``DATALOADER.CHECK_ANNOTATIONS error`` (the default) makes them a ``DatasetError`` naming the
file and the entries, ``warn`` one warning (training goes on, with detectron2's handling of
each), ``none`` skips the check. What detectron2 leaves out silently (annotations of an
image the file does not list) is one summarized warning.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
import math
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...errors import ConfigError

__all__ = ["BOX_TOLERANCE_FRACTION", "BOX_TOLERANCE_PX", "DataSettings", "SEGMENTATION_MIN_IOU", "add_data_config",
           "annotation_problems", "check_images", "image_problem", "summarize_problems"]

_TAIL_BYTES = 1024  # a JPEG's end marker is looked for in its last KiB (some writers pad after it)


def _key(default, meaning: str, key: str, choices: Tuple[str, ...]):
    return dataclasses.field(default=default, metadata={"meaning": meaning, "key": key, "choices": choices})


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """How gn_det checks training images and treats a bad one. Checked when constructed."""

    check_images: str = _key(
        "headers", "before training, each image's header, size and last bytes are read (a truncated or non-image "
                   "file, a size that differs from the annotations' is an error naming it); `decode` decodes every "
                   "image fully, `none` checks only that the files exist.",
        key="DATALOADER.CHECK_IMAGES", choices=("headers", "decode", "none"))
    bad_images: str = _key(
        "error", "an image that cannot be read during training (corrupted after the check) stops the run naming "
                 "the file and the dataset (`error`), or is left out with a warning (`skip`).",
        key="DATALOADER.BAD_IMAGES", choices=("error", "skip"))
    check_annotations: str = _key(
        "error", "before training, each COCO annotation is checked for what cannot be right (a box of non-positive "
                 "width or height, a box outside its image by more than 2 px or 1% of the image side, a duplicate "
                 "image or annotation id, a polygon of fewer than 3 points, a polygon whose extent and box overlap "
                 "less than IoU 0.25, an RLE mask of another size than its image): `error` names the file and the "
                 "entries; `warn` says so in one warning and trains with them as detectron2 takes them (boxes clipped "
                 "or dropped, bad polygons dropped, a duplicate image id's annotations on one image); `none` skips "
                 "the check.",
        key="DATALOADER.CHECK_ANNOTATIONS", choices=("error", "warn", "none"))

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value, choices = getattr(self, field.name), field.metadata["choices"]
            if value not in choices:
                raise ConfigError(f"{field.metadata['key']}={value!r}: expected one of {', '.join(choices)}")

    @classmethod
    def from_cfg(cls, cfg) -> "DataSettings":
        values = {}
        for field in dataclasses.fields(cls):
            section, leaf = field.metadata["key"].split(".")
            node = cfg.get(section)
            if node is not None and leaf in node:
                values[field.name] = node[leaf]
        return cls(**values)

    @classmethod
    def keys_markdown(cls) -> str:
        return "\n".join(f"  - `{f.metadata['key']}` ({f.default!r}): {f.metadata['meaning']}"
                         for f in dataclasses.fields(cls))


def add_data_config(cfg):
    """Add ``DataSettings``' keys (with their defaults) to a detectron2 config, in place."""
    for field in dataclasses.fields(DataSettings):
        section, leaf = field.metadata["key"].split(".")
        if leaf not in cfg[section]:
            cfg[section][leaf] = field.default
    return cfg


def image_problem(path: str, width: Optional[int] = None, height: Optional[int] = None,
                  decode: bool = False) -> Optional[str]:
    """What is wrong with the image file at ``path`` ("" never; None when nothing is), reading
    its header and last bytes (``decode``: all of it). ``width``/``height``: the size the
    annotations give it (EXIF rotation allowed for)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size, kind = image.size, image.format
            rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: width and height swap
            if decode:
                image.load()
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if not decode and kind in ("JPEG", "PNG"):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            tail = f.read()
        if kind == "JPEG" and b"\xff\xd9" not in tail:
            return "truncated (no JPEG end-of-image marker)"
        if kind == "PNG" and b"IEND" not in tail[-32:]:
            return "truncated (no PNG IEND chunk)"
    if width and height:
        w, h = (size[1], size[0]) if rotated else size
        if (w, h) != (width, height):
            return f"is {w}x{h}, the annotations say {width}x{height}"
    return None


def check_images(records: Sequence[Dict], image_root: str, mode: str = "headers",
                 workers: int = 16) -> List[Tuple[str, str]]:
    """``(file_name, problem)`` for each bad image among COCO ``images`` records (``file_name``,
    ``width``, ``height``) under ``image_root``; ``mode``: ``headers``, ``decode`` or ``none``
    (existence only). Threads read files in parallel (I/O waits overlap)."""
    def one(record: Dict) -> Optional[Tuple[str, str]]:
        name = record.get("file_name", "")
        path = os.path.join(image_root or "", name)
        if mode == "none":
            return None if os.path.exists(path) else (name, "missing")
        problem = image_problem(path, record.get("width"), record.get("height"), decode=mode == "decode")
        return (name, problem) if problem else None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [found for found in pool.map(one, records, chunksize=64) if found]


# A box may stick out of its image by this much (annotation tools round, and clip late) before
# it is an error: the larger of the two, per axis.
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.01
# A polygon's extent and its annotation's box overlapping less than this (intersection over
# union) is a wild disagreement: one of them is wrong (a mirrored box, another entry's polygon).
SEGMENTATION_MIN_IOU = 0.25

_ERROR_KINDS = {
    "box size": "box of non-positive width or height",
    "box values": "bbox that is not 4 finite numbers",
    "box outside": "box outside its image",
    "image id": "duplicate image id",
    "annotation id": "duplicate annotation id",
    "image size": "image without a positive width and height",
    "polygon": "polygon of fewer than 3 points (or an odd count of numbers)",
    "segmentation": "segmentation far from its box",
    "rle size": "RLE mask of another size than its image",
    "ignore": "annotation with detectron2's unsupported 'ignore' flag",
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_problems(coco: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """``(errors, filtered)`` for a COCO dict (``images``, ``annotations`` lists): each a
    ``(kind, entry: what is wrong)`` pair. ``errors``: what cannot be right (``_ERROR_KINDS``);
    ``filtered``: what detectron2 leaves out silently (an annotation whose image_id is not among
    the images)."""
    errors: List[Tuple[str, str]] = []
    filtered: List[Tuple[str, str]] = []
    images: Dict[Any, Tuple[Any, Any, Any]] = {}
    for image in coco["images"]:
        if not isinstance(image, dict):
            continue
        image_id, width, height = image.get("id"), image.get("width"), image.get("height")
        name = image.get("file_name")
        if image_id in images:
            errors.append(("image id", f"image id {image_id!r} ({name}) is also the id of {images[image_id][2]}"))
            continue
        images[image_id] = (width, height, name)
        if not (_number(width) and _number(height) and width > 0 and height > 0):
            errors.append(("image size", f"image id {image_id!r} ({name}): width {width!r}, height {height!r}"))
    annotation_ids: Dict[Any, Any] = {}
    number = (int, float)

    def where(ann: Dict[str, Any]) -> str:
        image = images.get(ann.get("image_id"))
        return f"annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r}{', ' + str(image[2]) if image else ''})"

    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        image = images.get(image_id)
        if ann_id in annotation_ids:
            errors.append(("annotation id", f"{where(ann)}: annotation id also used in image id {annotation_ids[ann_id]!r}"))
        else:
            annotation_ids[ann_id] = image_id
        if image is None:
            filtered.append(("no image", f"{where(ann)}: image_id is not among the file's images"))
            continue
        if ann.get("ignore", 0):
            errors.append(("ignore", f"{where(ann)}: 'ignore': {ann['ignore']!r}"))
        width, height = image[0], image[1]
        box = ann.get("bbox")
        if not (type(box) is list and len(box) == 4 and all(type(v) in number and math.isfinite(v) for v in box)) \
                and not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_number(v) for v in box)):
            errors.append(("box values", f"{where(ann)}: bbox {box!r}"))
            box = None
        else:
            x, y, w, h = box
            if w <= 0 or h <= 0:
                errors.append(("box size", f"{where(ann)}: bbox {list(box)} has width {w} and height {h}"))
                box = None
            elif _number(width) and _number(height):
                tx = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * width)
                ty = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * height)
                if x < -tx or y < -ty or x + w > width + tx or y + h > height + ty:
                    errors.append(("box outside", f"{where(ann)}: bbox {list(box)} (x {x:g} to {x + w:g}, y {y:g} to "
                                                  f"{y + h:g}) is outside the {width}x{height} image"))
        segmentation = ann.get("segmentation")
        if type(segmentation) is list and segmentation:
            left = top = math.inf
            right = bottom = -math.inf
            for k, polygon in enumerate(segmentation):
                if type(polygon) is not list or len(polygon) < 6 or len(polygon) % 2:
                    count = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
                    errors.append(("polygon", f"{where(ann)}: polygon {k} has {count} numbers (3 points are 6)"))
                    box = None
                    continue
                if box is not None:
                    xs, ys = polygon[0::2], polygon[1::2]
                    lo, hi = min(xs), max(xs)
                    left, right = (lo if lo < left else left), (hi if hi > right else right)
                    lo, hi = min(ys), max(ys)
                    top, bottom = (lo if lo < top else top), (hi if hi > bottom else bottom)
            if box is not None and right >= left:
                x, y, w, h = box
                iw = min(x + w, right) - max(x, left)
                ih = min(y + h, bottom) - max(y, top)
                inter = iw * ih if iw > 0 and ih > 0 else 0.0
                union = w * h + (right - left) * (bottom - top) - inter
                if union > 0 and inter < SEGMENTATION_MIN_IOU * union:
                    errors.append(("segmentation", f"{where(ann)}: its polygons span x {left:g} to {right:g}, y {top:g} "
                                                   f"to {bottom:g}, its bbox x {x:g} to {x + w:g}, y {y:g} to {y + h:g}"))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("size"), list):
            if _number(width) and _number(height) and list(segmentation["size"]) != [height, width]:
                errors.append(("rle size", f"{where(ann)}: RLE size {segmentation['size']} (height, width), the image is "
                                           f"{width}x{height}"))
    return errors, filtered


def summarize_problems(problems: List[Tuple[str, str]], kinds: Optional[Dict[str, str]] = None, shown: int = 5) -> str:
    """``3 box of non-positive width or height, 1 duplicate image id: <first entries>``."""
    counts = Counter(kind for kind, _ in problems)
    names = ", ".join(f"{n} {(kinds or {}).get(kind, kind)}" for kind, n in counts.items())
    listed = "; ".join(entry for _, entry in problems[:shown]) + (" ..." if len(problems) > shown else "")
    return f"{names} ({listed})"
