"""Benchmark and inspection support, for tools/, tests and ``python -m gn_det.check``: never
imported by the library (``import gn_det`` loads none of it; tests/test_package_structure.py).

- ``layer_shapes``: the GN layer shapes gn_det is measured at (one table for the tools);
- ``inspection``: the kernels' launches, specialisations, PTX access widths and occupancy,
  without a GPU (stands in for Triton's GPU driver; tools/compile_kernels.py);
- ``memory``: activation memory of a training step, saved-tensor counters
  (tools/benchmark_memory.py);
- ``cocoeval``: a COCO-sized synthetic set and COCOeval timings (tools/benchmark_eval.py);
- ``classification``: the embedded classification set of tools/batch_size_study.py.
- ``timing``: the timer of tools/benchmark_norm.py and ``python -m gn_det.check`` (CUDA
  events with the host's launch time hidden; wall time on CPU).

Nothing is imported here, so that importing one of them loads only what it needs.
"""
