"""Pure tensor math, below everything that computes it: the PyTorch reference of every fused op
(what jitfast.kernels must equal), the sampling ODE's update math, the position tables."""
