"""Benchmarks of ltkernels (pytest-benchmark suites ``bench_*.py`` and the report generator
``python -m bench.report``). Not part of the installed package; see bench/README.md."""
