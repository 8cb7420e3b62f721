"""The flow-matching objective (Denoiser) and the samplers of its ODE."""
