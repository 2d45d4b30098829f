"""Benchmarks of FramePack UI at full size (random weights, real configs): see bench/README.md.

Run each as `python -m bench.NAME ...` from the repo root. Shared code lives in bench/common.py; no script
imports another.
"""
