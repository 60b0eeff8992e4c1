"""The training application on top of the plugin: ``tools/train_net.py``'s engine (YAML trainer,
exact resume, divergence checks), the LazyConfig loop (``lazy_loop``), safe checkpoints,
stop signals held to a step's end, COCO evaluation, mmdetection weights, and the data
(the embedded shapes dataset, dataset checks, resumable loaders).

``import gn_det`` loads none of it (tests/test_package_structure.py); nothing is imported here,
so importing one of its modules loads only what that module needs.
"""
