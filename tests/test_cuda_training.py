"""gn_det's GN Mask R-CNN on CUDA: the Triton kernels inside a whole detectron2 model. Runs
only where a GPU is; its CPU twins are tests/test_detectron2_integration.py and
tests/test_train_net.py (the same models and training on CPU)."""
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.train.data import synthetic_batch
from gn_det.policy import backend, set_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(channels_last: bool = False):
    cfg = gn_det.get_config(os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"),
                            ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda", "MODEL.CHANNELS_LAST", channels_last])
    torch.manual_seed(0)
    return gn_det.build_model(cfg)


def _batch(height=384, width=512):
    batch = synthetic_batch(2, height, width, boxes_per_image=6, num_classes=80)
    for item in batch:
        item["image"] = item["image"].cuda()
    return batch


@pytest.fixture
def torch_backend():
    """Switch gn_det to its PyTorch path for the rest of the test (set_backend("torch")); until
    then every layer runs the kernels (no tuning)."""
    previous, tuning = backend(), gn_det.set_autotune(False)
    yield lambda: set_backend("torch")
    set_backend(previous)
    gn_det.set_autotune(tuning[0], on_cpu=tuning[1])


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in float32: with TF32 (cuDNN's default for
    convolutions) a last-bit difference in a GN output can flip the 10-bit rounding of the next
    convolution's input, and a deep network amplifies those flips past any GN tolerance."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("channels_last", [False, True])
def test_backbone_matches_pytorch_path(torch_backend, no_tf32, channels_last):
    # The FPN backbone (ResNet + FPN, GN with fused ReLU throughout) through the Triton kernels
    # against the PyTorch path: features and weight gradients, float32.
    model = _model(channels_last)
    images = model.preprocess_image(_batch())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = images.tensor.contiguous(memory_format=memory_format)
    # The first trained weight (the config freezes the stem and res2, BACKBONE.FREEZE_AT).
    first_trained = next(p for p in model.backbone.parameters() if p.requires_grad and p.dim() == 4)

    def run():
        model.zero_grad(set_to_none=True)
        features = model.backbone(x)
        sum(f.float().square().mean() for f in features.values()).backward()
        return {k: v.detach().clone() for k, v in features.items()}, first_trained.grad.clone()

    triton_features, triton_grad = run()
    torch_backend()
    torch_features, torch_grad = run()
    for name in torch_features:
        torch.testing.assert_close(triton_features[name], torch_features[name], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(triton_grad, torch_grad, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_bf16(channels_last):
    # Three SGD steps of the whole Mask R-CNN under bf16 autocast: finite losses, no error.
    model = _model(channels_last)
    model.train()
    batch = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage(0):  # (detectron2's training-mode heads log to it, as under a trainer)
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses = model(batch)
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        (out,) = model([{"image": batch[0]["image"], "height": 384, "width": 512}])
    assert out["instances"].image_size == (384, 512)
