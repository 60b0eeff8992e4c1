"""paths.decide's kernel steps where the Triton kernels run (here: the interpreter on CPU):
the kernels, and gn_det's PyTorch path once a bucket's kernels failed verification. The other
steps: tests/test_paths.py."""
import torch

import gn_det
from gn_det.policy import paths, switches, tuning
from gn_det.ops.activation import ACT_NONE, ACT_RELU
from gn_det.policy.verification import verify_key_of
from gn_cases import make_input

CL = torch.channels_last


def test_the_kernels_and_the_verification_fallback():
    x = make_input((2, 8, 5, 6), memory_format=CL)
    assert paths.decide(x, 4, ACT_RELU) == (paths.KERNELS, "the Triton kernels (verified at the bucket's first use)")
    assert paths.decide(x, 4, ACT_RELU, explain=True) == (paths.KERNELS, "one program per group")
    assert paths.dispatch_path(x, 4, "relu") == "Triton: one program per group"
    # Under the interpreter even plain NCHW float32 GN takes the kernels (step 1 is off).
    assert paths.decide(x.contiguous(), 4, ACT_NONE).path == paths.KERNELS
    previous = switches.set_backend("torch")
    try:
        assert paths.decide(x, 4, ACT_RELU).path == paths.TORCH
    finally:
        switches.set_backend(previous)
    # A bucket whose kernels failed verification (as verification.py records it).
    key = verify_key_of(x, 4, ACT_RELU, False)
    tuning.record_verification(tuning.Verification(key, "forward", False, "output: a test's failure", "verified",
                                                   tuple(x.shape)))
    try:
        assert paths.decide(x, 4, ACT_RELU, explain=True) == (
            paths.FALLBACK, "the kernels failed verification here: output: a test's failure")
        assert paths.dispatch_path(x, 4, "relu") == (
            "PyTorch: gn_det's PyTorch path (the kernels failed verification here: output: a test's failure)")
        assert paths.decide(x, 4, ACT_NONE, explain=True).path == paths.KERNELS  # another bucket
    finally:
        tuning.clear_decisions()  # (a recorded failure would fail this directory's fixture)
    assert gn_det.decisions() == []
