"""Micro-benchmarks: each module runs with ``python -m benchmarks.<name>`` and ends with
a ``RESULT {json}`` line."""
