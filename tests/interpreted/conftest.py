import pytest

import gn_det
from gn_det.policy import tuning, verification


@pytest.fixture(autouse=True)
def kernels_verified_without_a_false_alarm(request):
    """Every test here also verifies the kernels at each bucket's first use, as on a GPU, and
    fails if a verification did (the kernels agree with the PyTorch path on every shape these
    tests run: no false alarm; a real fault fails the test even though the call fell back).
    Tests of verification itself (test_verification.py) set their own state."""
    if request.module.__name__.endswith("test_verification"):
        yield
        return
    previous = verification.set_verification(True, on_cpu=True), gn_det.set_tuning_cache(None)  # (this test's own)
    tuning.clear_decisions()
    yield
    failed = [row for row in tuning.decisions() if row["kind"] == "verification" and not row["passed"]]
    tuning.clear_decisions()
    verification.set_verification(previous[0][0], on_cpu=previous[0][1])
    gn_det.set_tuning_cache(previous[1])
    assert not failed, f"the kernels failed verification: {failed}"
