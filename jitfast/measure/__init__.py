"""Measuring speed: FLOP and throughput arithmetic, the benchmark report, the profiler grouping, the
benchmarked workloads, FID."""
