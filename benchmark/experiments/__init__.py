"""One-off measurements (``python -m adbench.benchmark.experiments.bench_<name>``) whose figures
live in ``results/``."""
