"""Benchmarks of mnc_d2: MNC against Detectron2's Mask R-CNN, side by side (``run_benchmark.py``).

``run_benchmark`` is the command, ``worker`` trains / evaluates / times one model in its own process,
``report`` turns the per-model results into ``benchmark.json``, ``benchmark.md`` and ``benchmark.png``.
"""
