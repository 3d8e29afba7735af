"""The load generator behind ``gazsi bench`` (reused by the benchmarks/ scripts)."""

from gazsi_cluster.bench.loadgen import BenchResult, LoadSpec, run_load

__all__ = ["BenchResult", "LoadSpec", "run_load"]
