import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests' shared helpers (gn_cases)

# tests/interpreted runs the Triton kernels on CPU; TRITON_INTERPRET must be set before
# triton is imported, so those tests run in their own process (test_triton_interpreted.py).
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]
