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
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import ConfigError

__all__ = ["DataSettings", "add_data_config", "check_images", "image_problem"]

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
