"""Benchmarks of the ctloop loop: how fast each part is, and how its cost grows.

``python -m bench [--quick] [--only NAME] [--rows-max N]`` runs the suites (``loop``, ``scaling``, ``trigger``,
``serving``, ``compile``) and prints one table; every figure is a ratio against a baseline measured in the same
run. Results (Markdown, JSON, SVG plots, machine description) go to ``bench/results/`` for a full run.
"""
