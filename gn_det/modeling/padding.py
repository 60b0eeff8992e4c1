"""detectron2's side of ``MODEL.GN.IGNORE_PADDING``: an image's features, proposals and
detections depend on that image only, not on the images padded into its batch.

``ignore_padding(model)`` (what ``build_model`` runs on a model built with the setting; call it
yourself on a model built otherwise, e.g. from a LazyConfig without ``gn.ignore_padding``), in
place, on a detectron2 meta-architecture (``GeneralizedRCNN``, ``ProposalNetwork``,
``RetinaNet``, ``PanopticFPN``, ``SemanticSegmentor`` and models built like them):

1. **Marks the GN layers over the images' own feature maps**: every gn_det ``GroupNorm`` under
   the model's ``backbone``, ``proposal_generator``, ``head`` and ``sem_seg_head`` (those that
   exist) gets ``ignore_padding = True``; by construction none under ``roi_heads`` (box, mask,
   keypoint heads: their batch is the ROIs), nor anywhere else. torch's own ``nn.GroupNorm``
   there (detectron2's "GN" without ``MODEL.GN.REPLACE_GN``) cannot: a warning counts them.
2. **Opens the image regions during the forward**, by module hooks only (the model's code, class
   and methods are untouched; the hooks are module-level functions, so the model deep-copies
   (EMA) and pickles (``torch.save``) with them, and they act on the copy):

   - a forward pre-hook on the meta-architecture records the images' sizes before padding, the
     (H, W) of each ``batched_inputs[i]["image"]`` ``(C, H, W)`` (exactly what
     ``ImageList.from_tensors`` records as ``image_sizes``);
   - a forward pre-hook on ``model.backbone`` opens ``gn_det.image_regions(sizes, x.shape[-2:])``
     when the backbone's input ``x`` is the padded batch of those images (batch size the number
     of images, each image within ``x``'s height and width);
   - the meta-architecture's forward hook (``always_call``: it runs when forward raises too)
     closes it, so the regions stay open for the dense heads that run after the backbone inside
     the meta-architecture's forward (RPN head, RetinaNet head, semantic-segmentation head).

   The forwards in progress are a stack per thread: a model called inside another's forward
   (or inside its own) gets its own regions, restored on return; one that a ``BaseException``
   (KeyboardInterrupt) ended without its forward hook is found stale (its Python frame is no
   longer running) and closed by the next hooked forward or backbone call (until then its
   regions stay open: a GN layer called by itself would still see them). A backbone called outside its
   meta-architecture's forward (``model.backbone(x)``, ``model.inference(...)`` called
   directly, as detectron2's ``GeneralizedRCNNWithTTA`` does), or inside an ``image_regions``
   block the project opened itself, gets no regions from the hooks: GN normalizes the whole
   tensor, as today, or uses the project's block. Inputs without an ``"image"`` tensor, and a
   backbone input that is not the images' padded batch, get no regions either, with a warning
   (``warnings.warn``, shown once per message).
3. **Excludes the anchors outside an image's region**: an anchor is outside image i (of size
   ``(h_i, w_i)``, ``ImageList.image_sizes`` / ``gt_instances[i].image_size``) when its centre
   ``(x, y)`` has ``x >= w_i`` or ``y >= h_i``. With detectron2's default anchor offset 0, the
   anchor at map position j has centre ``j * s``, inside exactly when ``j < ceil(w_i / s)``: the
   anchors kept are those over the image's GN region (with offset 0.5, a subset of them). The
   image's anchors inside keep their order (level by level, row-major), which is the same alone
   and in any batch. detectron2's ``RPN`` (``model.proposal_generator``) and ``RetinaNet`` (the
   model) become instances of gn_det subclasses (``PaddingRPN``, ``PaddingRetinaNet``; as
   ``fuse.py`` does to ResNet blocks: the instance's class, never detectron2's classes) whose
   methods call detectron2's, one image at a time, with that image's inside anchors only:

   - ``RPN.label_and_sample_anchors``: the image's inside anchors are matched and subsampled
     (positives and negatives drawn from them only, in their order, so with the same RNG state
     an image samples the same anchors alone and batched); the anchors outside get label -1
     (ignored) and take no part in matching (so no outside anchor can be a gt's best match);
   - ``RPN.predict_proposals``: ``find_top_rpn_proposals`` (per-level top-k, NMS, post-NMS
     top-k) sees the image's inside anchors only, so an outside anchor never becomes a proposal,
     and an image's proposals are exactly those it has alone, given the same head outputs over
     its region (no sentinel score, no dependence on the other images' anchor counts);
   - ``RetinaNet.label_anchors``: the same as the RPN's matching, outside anchors -1 (ignored);
   - ``RetinaNet.inference_single_image``: score threshold, per-level top-k and NMS over the
     image's inside anchors only.

   A subclass of ``RPN`` or ``RetinaNet`` gets the same, as an instance of a gn_det subclass of
   its own class, unless it overrides one of the methods named in ``_RPN_METHODS`` /
   ``_RETINANET_METHODS`` (then its code may not take the anchors through them): it is left as
   it is, with a warning naming it; its GN layers still ignore padding. So is any other
   proposal generator or dense detector (RRPN, FCOS, a project's own): a warning names it; an
   image's proposals or detections there may still come from anchors in its padding.
   Instances of these subclasses pickle as their detectron2 (or project) class plus
   ``_excluding_instance`` (``__reduce_ex__``), so a subclass made for a project's class loads
   back too (with gn_det importable, as its GN layers need anyway).

4. **Makes the layers other than GN see, beyond each image's region, what they see at the end
   of a map**: an image alone whose map at some level ends at its region (its size, padded to
   ``size_divisibility``, a multiple of the level's stride) has nothing beyond the region there,
   while batched with a larger image it has the batch's padding, which GN sets to 0 but other
   layers do not, and which a 3x3 convolution (its own padding: 0), ROIAlign and bilinear
   upsampling (the map's last row or column, repeated) read differently. So, while the regions
   are open (forward hooks of the modules named; each a no-op for an image whose region fills
   the map, so an image needing no padding gets detectron2's own result):

   - ResNet's stem (``BasicStem``: conv, GN, ReLU, 3x3 max pool with stride 2) writes the
     largest value of the region's last rows or columns into the first position beyond it
     (when the pool's input region has an even size): 0 is written outside each image's region
     of its output, so the first block reads 0 there as at a map's end;
   - RetinaNet's (and FCOS's) P6 and P7 come from convolutions without a norm
     (``LastLevelP6P7``): 0 is written outside each image's region of ``p6``'s and ``p7``'s
     outputs, so P7 and the head's 3x3 convolutions read 0 there. (Mask R-CNN's P6, a stride-2
     subsample of P5, keeps P5's zeros.) Another FPN top block gets a warning;
   - the ROI poolers (``ROIPooler`` under ``roi_heads``: box, mask, keypoint heads) get each map
     with every position beyond an image's region set to the region's nearest edge value (a
     pre-hook): ROIAlign's samples of a box at an image's right or bottom edge reach up to one
     position beyond the region (``x <= w / s - 0.5`` with ``aligned=True``), where at a map's
     end ROIAlign repeats the last column, and now does in the batch too. No layer of the ROI
     heads ignores padding (their batch is the ROIs);
   - detectron2's ``SemSegFPNHead`` (PanopticFPN, SemanticSegmentor): each bilinear
     ``nn.Upsample`` gets its input with the region's edge repeated beyond it (what upsampling
     reads at a map's end) and its output with 0 beyond twice the input's region (the end of
     that upsampled map, where the next 3x3 convolution reads 0), and the predictor's output
     (upsampled by ``F.interpolate`` to the image's resolution) gets the region's edge repeated
     beyond it. Another semantic-segmentation head gets a warning naming it.

5. **Opens the regions in ``inference`` too**: detectron2's ``GeneralizedRCNN.inference``
   (and a subclass's, PanopticFPN's included), which test-time augmentation
   (``GeneralizedRCNNWithTTA``) calls without the forward, records its inputs' sizes as the
   forward's pre-hook does: the model becomes an instance of a gn_det subclass of its class
   whose ``inference`` wraps its own (pickled and copied as above).

A model with none of ``backbone``, ``proposal_generator``, ``head``, ``sem_seg_head`` or
without a ``backbone`` module (not built like a detectron2 meta-architecture) raises
``ConfigError`` naming them: such a model opens ``gn_det.image_regions`` around its own
backbone call and sets ``ignore_padding`` on its dense-map GN layers itself.
"""
from __future__ import annotations

import copyreg
import sys
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes
from torch import nn

from .. import padding as _padding
from ..errors import ConfigError
from ..layers.group_norm import GroupNorm

__all__ = ["DENSE_ATTRIBUTES", "PaddingRPN", "PaddingRetinaNet", "anchors_inside", "ignore_padding"]

# The meta-architecture's attributes whose modules run on the images' own (padded) feature maps.
DENSE_ATTRIBUTES = ("backbone", "proposal_generator", "head", "sem_seg_head")

# The methods of detectron2's classes that the gn_det subclasses replace, and those that call
# them: a subclass overriding any of them is left as it is (module docstring, 3).
_RPN_METHODS = ("forward", "label_and_sample_anchors", "predict_proposals")
_RETINANET_METHODS = ("forward_training", "forward_inference", "label_anchors", "inference_single_image")


# ----------------------------------------------------------------------------- anchors


def anchors_inside(anchors: Sequence[Boxes], image_size: Tuple[int, int]) -> List[torch.Tensor]:
    """Per level, which anchors have their centre inside an image of ``image_size`` (h, w):
    ``x < w and y < h`` (bool, one per anchor)."""
    h, w = image_size
    inside = []
    for level in anchors:
        centres = level.get_centers()
        inside.append((centres[:, 0] < w) & (centres[:, 1] < h))
    return inside


def _scatter(inside: torch.Tensor, values: torch.Tensor, fill) -> torch.Tensor:
    """``values`` of the anchors inside at their places among all anchors, ``fill`` elsewhere."""
    full = values.new_full((inside.shape[0],) + tuple(values.shape[1:]), fill)
    full[inside] = values
    return full


def _labels_per_image(label, anchors, gt_instances):
    """detectron2's ``label(anchors, [gt])`` (labels and matched boxes) one image at a time, on
    the anchors inside its region; the others get label -1 (ignored) and box 0."""
    gt_labels, matched_gt_boxes = [], []
    for gt in gt_instances:
        inside = anchors_inside(anchors, gt.image_size)
        labels, boxes = label([a[m] for a, m in zip(anchors, inside)], [gt])
        inside = torch.cat(inside)
        gt_labels.append(_scatter(inside, labels[0], -1))
        matched_gt_boxes.append(_scatter(inside, boxes[0], 0))
    return gt_labels, matched_gt_boxes


class _Excluding:
    """What the gn_det subclasses of detectron2's classes share: how they pickle and copy (as
    their original class, ``_gn_det_padding_base``, rebuilt by ``_excluding_instance``), so a
    subclass made at run time for a project's class is never looked up by name."""

    _gn_det_padding_base: type

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        # object's reduction for protocol >= 2 (pickle, torch.save, copy.deepcopy):
        # (copyreg.__newobj__, (cls, *args), state, ...)
        if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is copyreg.__newobj__ \
                and reduced[1][:1] == (type(self),):
            return (_excluding_instance, (self._gn_det_padding_base,) + tuple(reduced[1][1:])) + tuple(reduced[2:])
        return reduced


class _RPNExcluding(_Excluding):
    """An RPN whose anchors outside an image's region take no part in its labels or proposals."""

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors, gt_instances):
        # (in order: each image draws its samples as detectron2's loop does)
        return _labels_per_image(super().label_and_sample_anchors, anchors, gt_instances)

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        proposals = []
        for i, image_size in enumerate(image_sizes):
            inside = anchors_inside(anchors, image_size)
            proposals.extend(super().predict_proposals(
                [a[m] for a, m in zip(anchors, inside)],
                [x[i:i + 1][:, m] for x, m in zip(pred_objectness_logits, inside)],
                [x[i:i + 1][:, m] for x, m in zip(pred_anchor_deltas, inside)],
                [image_size]))
        return proposals


class _RetinaNetExcluding(_Excluding):
    """A RetinaNet whose anchors outside an image's region take no part in its labels or
    detections."""

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        return _labels_per_image(super().label_anchors, anchors, gt_instances)

    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        inside = anchors_inside(anchors, image_size)
        return super().inference_single_image(
            [a[m] for a, m in zip(anchors, inside)], [x[m] for x, m in zip(box_cls, inside)],
            [x[m] for x, m in zip(box_delta, inside)], image_size)


class _InferenceWithRegions(_Excluding):
    """A GeneralizedRCNN whose ``inference``, called without the forward (test-time
    augmentation), opens its images' regions as the forward does (module docstring, 5)."""

    def inference(self, batched_inputs, *args, **kwargs):
        stack = _forwards()
        _drop_stale(stack)
        if stack and stack[-1].model is self:  # called by its own forward, whose hooks hold the sizes
            return super().inference(batched_inputs, *args, **kwargs)
        _meta_pre_hook(self, (batched_inputs,), {})  # what the forward's hooks do around it
        try:
            return super().inference(batched_inputs, *args, **kwargs)
        finally:
            _meta_hook(self, (batched_inputs,), None)


class PaddingRPN(_RPNExcluding, RPN):
    """detectron2's ``RPN`` with the anchors outside each image's region excluded (module
    docstring, 3); what ``ignore_padding`` makes of an ``RPN`` instance."""

    _gn_det_padding_base = RPN


class PaddingRetinaNet(_RetinaNetExcluding, RetinaNet):
    """detectron2's ``RetinaNet`` with the anchors outside each image's region excluded (module
    docstring, 3); what ``ignore_padding`` makes of a ``RetinaNet`` instance."""

    _gn_det_padding_base = RetinaNet


_EXCLUDING: Dict[type, type] = {RPN: PaddingRPN, RetinaNet: PaddingRetinaNet}
_EXCLUDING_LOCK = threading.Lock()


def _excluding_class(base: type) -> type:
    """The gn_det subclass of ``base`` (an RPN, RetinaNet or GeneralizedRCNN class), made once
    per class."""
    with _EXCLUDING_LOCK:
        cls = _EXCLUDING.get(base)
        if cls is None:
            mixin = (_RPNExcluding if issubclass(base, RPN) else _RetinaNetExcluding if issubclass(base, RetinaNet)
                     else _InferenceWithRegions)
            cls = type(f"Padding{base.__name__}", (mixin, base), {
                "__module__": __name__, "_gn_det_padding_base": base,
                "__doc__": f"{base.__module__}.{base.__qualname__} with the anchors outside each image's region "
                           f"excluded (gn_det.modeling.padding)."})
            _EXCLUDING[base] = cls
        return cls


def _excluding_instance(base: type, *args):
    """An empty instance of ``base``'s gn_det subclass (unpickling, deep copies)."""
    cls = _excluding_class(base)
    return cls.__new__(cls, *args)


def _overridden(cls: type, base: type, methods: Sequence[str]) -> List[str]:
    return [name for name in methods if getattr(cls, name) is not getattr(base, name)]


def _exclude_anchors(module: nn.Module, base: type, methods: Sequence[str], role: str) -> bool:
    """Make ``module`` an instance of the gn_det subclass of its class (an RPN or RetinaNet);
    False, with a warning, where it cannot."""
    cls = type(module)
    if isinstance(module, _Excluding):
        return True
    overridden = _overridden(cls, base, methods)
    if overridden:
        warnings.warn(f"gn_det ignore_padding: the {role} {cls.__module__}.{cls.__qualname__} overrides "
                      f"{', '.join(overridden)} of detectron2's {base.__name__}: its anchors in an image's padding are "
                      f"not excluded (its GN layers still ignore the padding)", stacklevel=3)
        return False
    module.__class__ = _excluding_class(cls)
    return True


# ----------------------------------------------------------------------------- the forward's hooks


class _Forward:
    """A hooked meta-architecture's forward in progress on this thread: the images' sizes, and
    the regions its backbone call opened."""

    __slots__ = ("model", "backbone", "sizes", "caller", "context", "regions")

    def __init__(self, model, backbone, sizes, caller):
        self.model, self.backbone, self.sizes, self.caller = model, backbone, sizes, caller
        self.context = self.regions = None


_LOCAL = threading.local()


def _forwards() -> List[_Forward]:
    stack = getattr(_LOCAL, "forwards", None)
    if stack is None:
        stack = _LOCAL.forwards = []
    return stack


def _close(forward: _Forward) -> None:
    context, forward.context, forward.regions = forward.context, None, None
    if context is not None:
        context.__exit__(None, None, None)


def _unwind(stack: List[_Forward], depth: int) -> None:
    """Close and drop the forwards from ``depth`` up, innermost first (the order they opened)."""
    while len(stack) > depth:
        _close(stack.pop())


def _drop_stale(stack: List[_Forward]) -> None:
    """Drop the forwards whose Python frame is no longer running: ended without their forward
    hook (a BaseException such as KeyboardInterrupt; torch runs ``always_call`` hooks on an
    Exception). They lie above every running one."""
    if not stack:
        return
    running = set()
    frame = sys._getframe(1)
    while frame is not None:
        running.add(id(frame))  # (each recorded frame is held by its _Forward: its id is its own)
        frame = frame.f_back
    depth = len(stack)
    while depth and id(stack[depth - 1].caller) not in running:
        depth -= 1
    _unwind(stack, depth)


def _image_sizes(batched_inputs) -> Optional[List[Tuple[int, int]]]:
    """Each input's (H, W) from its ``"image"`` ``(C, H, W)``; None when one has none."""
    if not isinstance(batched_inputs, (list, tuple)) or not batched_inputs:
        return None
    sizes = []
    for item in batched_inputs:
        image = item.get("image") if hasattr(item, "get") else None
        if not isinstance(image, torch.Tensor) or image.dim() < 2:
            return None
        sizes.append((int(image.shape[-2]), int(image.shape[-1])))
    return sizes


def _meta_pre_hook(model: nn.Module, args, kwargs):
    """Before the meta-architecture's forward: record its images' sizes (module docstring, 2)."""
    stack = _forwards()
    _drop_stale(stack)
    batched_inputs = args[0] if args else kwargs.get("batched_inputs")
    sizes = _image_sizes(batched_inputs)
    if sizes is None:
        warnings.warn(f"gn_det ignore_padding: {type(model).__name__}'s inputs have no \"image\" tensor each: "
                      f"no image regions, GN normalizes the whole padded batch in this forward", stacklevel=3)
    stack.append(_Forward(model, getattr(model, "backbone", None), sizes, sys._getframe(1)))
    return None


def _meta_hook(model: nn.Module, args, output):
    """After the meta-architecture's forward (also when it raised): close its regions."""
    stack = _forwards()
    for depth in range(len(stack) - 1, -1, -1):
        if stack[depth].model is model:
            _unwind(stack, depth)
            break
    return None


def _same_module(a, b) -> bool:
    """a is b, either possibly a torch.compile wrapper of the other."""
    return a is b or getattr(a, "_orig_mod", None) is b or getattr(b, "_orig_mod", None) is a


def _backbone_pre_hook(backbone: nn.Module, args):
    """Before the backbone's forward: open its meta-architecture's image regions over its input
    (module docstring, 2)."""
    stack = _forwards()
    _drop_stale(stack)
    forward = next((f for f in reversed(stack) if _same_module(f.backbone, backbone)), None)
    if forward is None or forward.sizes is None or not args:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    padded = (int(x.shape[-2]), int(x.shape[-1]))
    if forward.regions is not None:
        if forward.regions.padded_size == padded and len(forward.regions) == x.shape[0]:
            return None  # (the backbone again on the same batch)
        if _padding.current_regions() is not forward.regions:
            return None  # a block opened inside this forward's: leave it
        _close(forward)
    current = _padding.current_regions()
    if current is not None and not any(f.regions is current for f in stack):
        return None  # inside an image_regions block of the project's own: it decides
    sizes = forward.sizes
    if x.shape[0] != len(sizes) or any(h > padded[0] or w > padded[1] for h, w in sizes):
        warnings.warn(f"gn_det ignore_padding: {type(forward.model).__name__}'s backbone got a batch "
                      f"{tuple(x.shape)} that is not the padded batch of its {len(sizes)} input images: no image "
                      f"regions, GN normalizes the whole tensor in this call", stacklevel=3)
        return None
    context = _padding.image_regions(sizes, padded)
    forward.regions = context.__enter__()
    forward.context = context
    return None


# ----------------------------------------------------------------------------- maps made without GN, ROI pooling


def _valid(regions, x, module: nn.Module) -> Optional[torch.Tensor]:
    """x's regions when the image regions are open and x is a map of their images, else None."""
    if regions is None or not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != len(regions):
        return None
    return regions.valid_sizes(x, f"{type(module).__name__} (gn_det ignore_padding)")


def _zero_padding_hook(module: nn.Module, args, output):
    """After a layer that makes a dense map without GN (ResNet's stem, RetinaNet's P6, P7): 0
    outside each image's region, as GN writes there."""
    valid = _valid(_padding.current_regions(), output, module)
    return None if valid is None else _padding.zero_outside(output, valid)


def _edge_padding_hook(module: nn.Module, args, output):
    """After a layer whose output is upsampled bilinearly (SemSegFPNHead's predictor): the
    region's edge repeated beyond it."""
    valid = _valid(_padding.current_regions(), output, module)
    return None if valid is None else _padding.edge_replicated(output, valid)


def _upsample_pre_hook(module: nn.Module, args):
    """Before a bilinear upsampling: its input with the region's edge repeated beyond it."""
    valid = _valid(_padding.current_regions(), args[0] if args else None, module)
    return None if valid is None else (_padding.edge_replicated(args[0], valid),) + tuple(args[1:])


def _upsample_hook(module: nn.Module, args, output):
    """After a bilinear upsampling: 0 beyond the upsampled input's region."""
    regions = _padding.current_regions()
    valid = _valid(regions, args[0] if args else None, module)
    if valid is None or not isinstance(output, torch.Tensor) or output.dim() != 4:
        return None
    scale = torch.tensor([output.shape[-2] // args[0].shape[-2], output.shape[-1] // args[0].shape[-1]],
                         device=valid.device, dtype=valid.dtype)
    return _padding.zero_outside(output, valid * scale)


def _pooler_pre_hook(module: nn.Module, args, kwargs):
    """Before an ROI pooler: each map with the region's edge repeated beyond each image's region."""
    regions = _padding.current_regions()
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, list) or not x or _valid(regions, x[0], module) is None:
        return None
    x = [_padding.edge_replicated(level, _valid(regions, level, module)) for level in x]
    if args:
        return (x,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, x=x)


def _hook(module: nn.Module, fn, pre: bool = False, **kwargs) -> None:
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    if not any(hook is fn for hook in hooks.values()):
        (module.register_forward_pre_hook if pre else module.register_forward_hook)(fn, **kwargs)


def _hook_layers_beside_gn(model: nn.Module, parts: Dict[str, nn.Module]) -> None:
    """Module docstring, 4."""
    for module in parts["backbone"].modules():
        if isinstance(module, BasicStem):
            _hook(module, _zero_padding_hook)
        if isinstance(module, FPN) and module.top_block is not None:
            top = module.top_block
            if isinstance(top, LastLevelP6P7):
                _hook(top.p6, _zero_padding_hook)
                _hook(top.p7, _zero_padding_hook)
            elif not isinstance(top, LastLevelMaxPool):
                cls = type(top)
                warnings.warn(f"gn_det ignore_padding: the FPN top block {cls.__module__}.{cls.__qualname__} is neither "
                              f"of detectron2's (LastLevelMaxPool, LastLevelP6P7): the values its layers leave in an "
                              f"image's padding reach the image's region through the next 3x3 convolutions",
                              stacklevel=3)
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(roi_heads, nn.Module):
        for module in roi_heads.modules():
            if isinstance(module, ROIPooler):
                _hook(module, _pooler_pre_hook, pre=True, with_kwargs=True)
    head = parts.get("sem_seg_head")
    if isinstance(head, SemSegFPNHead):
        for module in head.modules():
            if isinstance(module, nn.Upsample) and module.mode in ("bilinear", "bicubic"):
                _hook(module, _upsample_pre_hook, pre=True)
                _hook(module, _upsample_hook)
        _hook(head.predictor, _edge_padding_hook)
    elif head is not None:
        cls = type(head)
        warnings.warn(f"gn_det ignore_padding: the semantic-segmentation head {cls.__module__}.{cls.__qualname__} is "
                      f"not detectron2's SemSegFPNHead: where it upsamples bilinearly it reads an image's padding, so "
                      f"its logits within one position of an image's right and bottom edges may depend on the batch",
                      stacklevel=3)


# ----------------------------------------------------------------------------- the entry


def ignore_padding(model: nn.Module) -> nn.Module:
    """Make ``model``, a detectron2 meta-architecture, batch-independent in place (module
    docstring): GN layers over its dense feature maps marked ``ignore_padding``, the image
    regions opened around them by module hooks, anchors outside an image's region excluded
    from its RPN's and RetinaNet's labels, proposals and detections, and the layers beside GN
    that read or write beyond a region (ResNet's stem pool, P6/P7, ROI poolers, the
    semantic-segmentation head's upsampling) made to treat it as a map's end. Idempotent.
    Returns ``model``. ``ConfigError`` for a model with no ``backbone`` module."""
    parts = {name: getattr(model, name, None) for name in DENSE_ATTRIBUTES}
    parts = {name: part for name, part in parts.items() if isinstance(part, nn.Module)}
    if not isinstance(parts.get("backbone"), nn.Module):
        has = ", ".join(sorted(parts)) or "none of " + ", ".join(DENSE_ATTRIBUTES)
        raise ConfigError(
            f"gn_det ignore_padding: {type(model).__module__}.{type(model).__qualname__} is not built like a detectron2 "
            f"meta-architecture: it has no `backbone` module (it has {has}); the hooks read each input's \"image\" "
            f"in its forward and open the regions around `model.backbone`. For such a model, open "
            f"`gn_det.image_regions(image_sizes, padded_tensor.shape[-2:])` around its backbone and dense heads, and "
            f"set `ignore_padding = True` on the gn_det GroupNorm layers over its feature maps")

    # 1. the GN layers over the images' own maps (never the ROI heads', even if shared)
    roi_heads = getattr(model, "roi_heads", None)
    excluded = {id(m) for m in roi_heads.modules()} if isinstance(roi_heads, nn.Module) else set()
    foreign = 0
    for part in parts.values():
        for module in part.modules():
            if id(module) in excluded:
                continue
            if isinstance(module, GroupNorm):
                module.ignore_padding = True
            elif isinstance(module, nn.GroupNorm):
                foreign += 1
    if foreign:
        warnings.warn(f"gn_det ignore_padding: {foreign} torch.nn.GroupNorm layer(s) (not gn_det's) over "
                      f"{type(model).__name__}'s feature maps keep the padding in their statistics: build them as "
                      f"gn_det's (norm \"FastGN\", MODEL.GN.REPLACE_GN, or gn_det.modeling.convert_to_group_norm)",
                      stacklevel=2)

    # 2. the hooks that open the regions during the forward; 4. those of the layers beside GN
    _hook(model, _meta_pre_hook, pre=True, with_kwargs=True, prepend=True)
    _hook(model, _meta_hook, always_call=True)
    _hook(parts["backbone"], _backbone_pre_hook, pre=True)
    _hook_layers_beside_gn(model, parts)

    # 3. the anchors outside an image's region
    generator = parts.get("proposal_generator")
    if generator is not None:
        if isinstance(generator, RPN):
            _exclude_anchors(generator, RPN, _RPN_METHODS, "proposal generator")
        else:
            cls = type(generator)
            warnings.warn(f"gn_det ignore_padding: the proposal generator {cls.__module__}.{cls.__qualname__} is not "
                          f"detectron2's RPN: its proposals may still come from anchors in an image's padding",
                          stacklevel=2)
    if isinstance(model, RetinaNet):
        _exclude_anchors(model, RetinaNet, _RETINANET_METHODS, "meta-architecture")
    elif isinstance(model, GeneralizedRCNN) and not isinstance(model, _Excluding):
        model.__class__ = _excluding_class(type(model))  # 5. inference() called alone
    elif "head" in parts:
        cls = type(model)
        warnings.warn(f"gn_det ignore_padding: the dense detector {cls.__module__}.{cls.__qualname__} is not "
                      f"detectron2's RetinaNet: its detections may still come from anchors or points in an image's "
                      f"padding", stacklevel=2)
    return model
