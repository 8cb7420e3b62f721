"""Support code with no jitfast imports: atomic file writes, CUDA-graph capture, profiler phase
markers, CPU thread settings."""
