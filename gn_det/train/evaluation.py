"""COCO evaluation with a compiled COCOeval wherever one is installed.

detectron2's ``COCOEvaluator`` runs its C++ ``COCOeval_opt`` when detectron2 was built with its
compiled ops (``detectron2._C``). detectron2 installed from PyPI's Python sources has none, and
then COCOEvaluator runs pycocotools' Python ``COCOeval``, which takes minutes per IoU type on
COCO val2017. ``FastCOCOEvaluator`` is COCOEvaluator (same arguments, same results dict, same
printed and logged tables) that runs, in this order of preference:

1. detectron2's ``COCOeval_opt``, when ``detectron2._C`` imports;
2. faster-coco-eval's ``COCOeval`` (a PyPI wheel with a C++ evaluate/accumulate, a declared
   requirement of gn_det);
3. pycocotools' ``COCOeval``, when neither is importable (with a warning that says what to
   install).

The hook: COCOEvaluator's ``_eval_predictions`` passes the module-level name ``COCOeval_opt`` of
``detectron2.evaluation.coco_evaluation`` to detectron2's ``_evaluate_predictions_on_coco`` when
its ``_use_fast_impl`` is set. While one FastCOCOEvaluator evaluates, that name is bound to the
chosen class (under a lock, restored afterwards); everything else is detectron2's own code.
Which implementation ran is logged and kept in ``FastCOCOEvaluator.cocoeval_name``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional, Tuple

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as _d2_coco_evaluation

__all__ = ["IMPLEMENTATIONS", "FastCOCOEvaluator", "cocoeval_class", "detectron2_cocoeval", "faster_cocoeval"]

# What ``implementation=`` accepts: "auto" picks the first importable of the three.
IMPLEMENTATIONS = ("auto", "detectron2", "faster-coco-eval", "pycocotools")

_logger = logging.getLogger(__name__)
_BIND_LOCK = threading.Lock()  # one evaluator at a time rebinds detectron2's module-level name


def detectron2_cocoeval() -> Tuple[Optional[type], str]:
    """Returns ``(COCOeval_opt, name)`` when detectron2's C++ COCOeval imports, else ``(None,
    why not)``."""
    try:
        # Imports detectron2._C: raises ImportError on a build without compiled ops.
        from detectron2.evaluation.fast_eval_api import COCOeval_opt
    except ImportError as exc:
        why = str(exc).replace(f" ({exc.path})", "") if exc.path else str(exc)  # no local paths in reports
        return None, f"detectron2's C++ COCOeval_opt is not importable ({why})"
    return COCOeval_opt, "detectron2 COCOeval_opt (C++)"


def faster_cocoeval() -> Tuple[Optional[type], str]:
    """Returns ``(COCOeval, name with version)`` of faster-coco-eval when it imports, else
    ``(None, why not)``."""
    try:
        import faster_coco_eval
        # faster-coco-eval's pycocotools-compatible class: prints its summary with print(),
        # as pycocotools' and detectron2's do (COCOeval_faster sends it to logging instead).
        from faster_coco_eval.core.faster_eval_api import COCOeval
    except ImportError as exc:
        return None, f"faster-coco-eval is not importable ({exc}); pip install 'faster-coco-eval>=1.8'"
    return COCOeval, f"faster-coco-eval {faster_coco_eval.__version__} (C++)"


def cocoeval_class(implementation: str = "auto") -> Tuple[Optional[type], str]:
    """The COCOeval class ``FastCOCOEvaluator`` runs for ``implementation`` (one of
    ``IMPLEMENTATIONS``).

    Returns ``(cls, name)``: ``cls`` is detectron2's ``COCOeval_opt`` or faster-coco-eval's
    ``COCOeval``, and ``name`` says which and its version; ``cls`` is ``None`` where
    pycocotools' Python COCOeval (COCOEvaluator's own fallback) is to run, and ``name`` then
    says why. Raises ``ValueError`` for an unknown implementation and ``ImportError`` when
    one named explicitly is not importable.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown COCOeval implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "pycocotools":
        return None, "pycocotools COCOeval (Python), as asked"
    if implementation in ("auto", "detectron2"):
        cls, name = detectron2_cocoeval()
        if cls is not None or implementation == "detectron2":
            if cls is None:
                raise ImportError(name + "; build detectron2 with its ops, or use implementation='auto'")
            return cls, name
        d2_missing = name
    cls, name = faster_cocoeval()
    if cls is None:
        if implementation == "faster-coco-eval":
            raise ImportError(name)
        return None, f"pycocotools COCOeval (Python): {d2_missing}, and {name}"
    return cls, name


@contextlib.contextmanager
def _detectron2_fast_cocoeval_bound_to(cls: type) -> Iterator[None]:
    """Binds ``coco_evaluation.COCOeval_opt`` (what COCOEvaluator runs when ``_use_fast_impl``
    is set) to ``cls`` for the duration, then restores it."""
    with _BIND_LOCK:
        saved = _d2_coco_evaluation.COCOeval_opt
        _d2_coco_evaluation.COCOeval_opt = cls
        try:
            yield
        finally:
            _d2_coco_evaluation.COCOeval_opt = saved


class FastCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` that runs a compiled COCOeval wherever one is installed
    (see the module's docstring for the order).

    Takes COCOEvaluator's arguments, plus ``implementation`` (one of ``IMPLEMENTATIONS``,
    default ``"auto"``). ``use_fast_impl=False`` asks for pycocotools' official Python
    COCOeval, as in COCOEvaluator. ``evaluate()`` returns COCOEvaluator's results dict
    (``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}``, in points, 0-100).
    ``cocoeval_name`` names the implementation that runs, and ``cocoeval_cls`` is its class
    (``None`` for pycocotools').
    """

    def __init__(self, dataset_name: str, tasks=None, distributed: bool = True, output_dir: Optional[str] = None,
                 *, use_fast_impl: bool = True, implementation: str = "auto", **kwargs) -> None:
        cls, name = cocoeval_class(implementation if use_fast_impl else "pycocotools")
        if cls is None and use_fast_impl:
            _logger.warning("COCO evaluation runs %s; it is slow on COCO-sized sets", name)
        # COCOEvaluator is told use_fast_impl=False (so that it logs no "Fast COCO eval is not
        # built" when detectron2._C is missing); _eval_predictions switches to ``cls``.
        super().__init__(dataset_name, tasks, distributed, output_dir, use_fast_impl=False, **kwargs)
        if cls is not None and self._max_dets_per_image[2] != 100:
            # detectron2 evaluates a custom max_dets_per_image with its own pycocotools subclass
            # (COCOevalMaxDets), whatever class it is given.
            cls, name = None, f"pycocotools COCOevalMaxDets (Python): max_dets_per_image={self._max_dets_per_image[2]}"
        self.cocoeval_cls: Optional[type] = cls
        self.cocoeval_name: str = name

    def _eval_predictions(self, predictions, img_ids=None) -> None:
        """COCOEvaluator's ``_eval_predictions`` (fills ``self._results``), run with
        ``cocoeval_cls``."""
        self._logger.info("COCOeval implementation: %s", self.cocoeval_name)
        if self.cocoeval_cls is None:
            return super()._eval_predictions(predictions, img_ids=img_ids)
        self._use_fast_impl = True
        try:
            with _detectron2_fast_cocoeval_bound_to(self.cocoeval_cls):
                return super()._eval_predictions(predictions, img_ids=img_ids)
        finally:
            self._use_fast_impl = False
