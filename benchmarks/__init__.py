"""Measurement scripts (not tests): each prints its figures. Run them as modules from the repository root,
e.g. `python -m benchmarks.gpu_throughput --smoke-cpu`, so the recipe's packages import as they do in the jobs.
"""
