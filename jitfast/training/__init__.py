"""What a training run is made of: the step (eager or one CUDA graph), the EMAs, the per-step draws,
datasets, run folders and progress/metrics."""
