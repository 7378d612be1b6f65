"""Benchmarks of syncengine against diffusers' MultiDiffusion pipeline: ``python -m benchmarks --help``.

``model`` builds the SD-2-shaped random-weight model, ``worker`` makes one measurement in a fresh process,
``__main__`` runs the suite and writes ``benchmarks/results/<name>.json``; docs/performance.md reads the numbers.
"""
