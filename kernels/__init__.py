"""Fused Triton kernels for JiT, with the names and signatures of ``jitfast.functional.ops``.

Installed as ``jitfast.kernels``. Every op is a torch.library custom op with a fake (meta)
implementation and a registered backward, so ``torch.compile(fullgraph=True)`` traces through
it; CPU tensors fall back to the PyTorch reference unless ``TRITON_INTERPRET=1``.
Beyond ``jitfast.functional.ops``: ``output_head_v_loss`` (kernels/v_loss.py), the head with
JiT's v-loss in its epilogue, and ``output_head_velocity`` and ``output_head_step``, the head
with the sampler's (guided) velocity, or that velocity and the sampler's Euler/Heun update of
the ODE state; ``adamw_ema_`` (kernels/adamw_ema.py), the training optimizer's one-pass update
of a weight; ``swiglu_mlp`` (kernels/swiglu_matmul.py), the SwiGLU MLP with SwiGLU in its
matmuls' epilogues. Forward-mode derivatives for pMF's objective: each op's ``*_dual`` carries the
tangents of its inputs in the same pass (the gradient flows through the values only), and
``attention_tangent`` (kernels/attention_jvp.py) is attention's, flash-style.
"""
from .adamw_ema import adamw_ema_
from .attention_jvp import attention_tangent
from .norm import (gated_residual, gated_residual_dual, gated_residual_rms_norm_modulate,
                   gated_residual_rms_norm_modulate_dual, rms_norm, rms_norm_modulate,
                   rms_norm_modulate_dual)
from .output_head import output_head, output_head_step, output_head_velocity, pmf_head_dual
from .patch_embed import patch_embed, patch_embed_dual
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_dual
from .swiglu import swiglu, swiglu_dual
from .swiglu_matmul import swiglu_mlp
from .v_loss import output_head_v_loss

__all__ = ["adamw_ema_", "attention_tangent", "gated_residual", "gated_residual_dual",
           "gated_residual_rms_norm_modulate", "gated_residual_rms_norm_modulate_dual",
           "output_head", "output_head_step", "output_head_v_loss", "output_head_velocity",
           "patch_embed", "patch_embed_dual", "pmf_head_dual", "qk_norm_rope", "qk_norm_rope_dual",
           "rms_norm", "rms_norm_modulate", "rms_norm_modulate_dual", "swiglu", "swiglu_dual",
           "swiglu_mlp"]
