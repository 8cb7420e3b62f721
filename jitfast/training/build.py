"""The trained objects of a run as ``python -m jitfast.train`` builds them from its arguments:
the Denoiser and the module the step calls (itself, or its DDP wrapper), with activation
checkpointing, FSDP2 sharding and torch.compile as asked. ``jitfast.measure.trace`` builds the
step it prices the same way."""
import torch
from torch.nn.parallel import DistributedDataParallel

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.from_checkpoint import sampler_settings
from jitfast.network.presets import JiT_models


def checkpointed(block):
    """Recompute `block` in the backward pass; state-dict keys stay unchanged."""
    forward = block.forward
    block.forward = lambda *a: torch.utils.checkpoint.checkpoint(forward, *a, use_reentrant=False)


def build(args, num_classes, device, world, net=None):
    """(denoiser, module to call for the loss); net: the JiT to train, else a new --model."""
    if net is None:
        net = JiT_models[args.model](input_size=args.image_size, num_classes=num_classes,
                                     backend=args.backend)
    net.check_values = False  # t and labels are ours; the range checks would sync every step
    # the sampler settings python -m jitfast.sample reads from this run's checkpoints
    settings = sampler_settings(vars(args), args.image_size)
    denoiser = Denoiser(net, P_mean=args.P_mean, P_std=args.P_std, label_drop_prob=0.0,
                        **settings).to(device)  # labels are dropped by StepDraws
    if args.activation_checkpointing:
        for block in net.blocks:
            checkpointed(block)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)  # not the Denoiser: sampling calls the net directly
    if args.compile:
        denoiser.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
    if world > 1 and not args.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        return denoiser, DistributedDataParallel(denoiser, device_ids=ids)
    return denoiser, denoiser
