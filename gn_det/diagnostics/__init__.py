"""Diagnostics: ``python -m gn_det.check`` (the kernels against PyTorch on this machine, with
times), ``python -m gn_det.env`` (the report to attach to a bug), and ``bench`` (support for
tools/ and tests: layer shapes, kernel inspection without a GPU, memory counters, timers).

``import gn_det`` loads none of it; nothing is imported here.
"""
