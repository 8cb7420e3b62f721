"""The trained objects of a run as ``python -m jitfast.train`` builds them from its arguments:
the Denoiser and the module the step calls (itself, or its DDP wrapper), with activation
checkpointing, FSDP2 sharding and torch.compile as asked, and the optimizer.
``jitfast.measure.traced`` builds the step it prices the same way."""
import torch
from torch.nn.parallel import DistributedDataParallel

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.from_checkpoint import sampler_settings
from jitfast.network.presets import JiT_models
from jitfast.training.optimizer import AdamWEMA
from jitfast.training.step import lr_on_device, make_optimizer


def checkpointed(block):
    """Recompute `block` in the backward pass; state-dict keys stay unchanged."""
    forward = block.forward
    block.forward = lambda *a, **k: torch.utils.checkpoint.checkpoint(forward, *a,
                                                                      use_reentrant=False, **k)


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
        net.residual_across_blocks = False  # a block's weights are freed after its forward
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)  # not the Denoiser: sampling calls the net directly
    if args.compile:
        denoiser.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
    if world > 1 and not args.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        return denoiser, DistributedDataParallel(denoiser, device_ids=ids)
    return denoiser, denoiser


def build_optimizer(args, denoiser, ema, lr, device, world, cuda=None):
    """The run's optimizer: on one CUDA process without FSDP, ``AdamWEMA`` (AdamW, the EMA `ema`
    and bf16 compute copies of the weights in one pass per weight); else ``make_optimizer``'s
    (torch's fused AdamW on CUDA, AdamW elsewhere, or apex's with --optimizer apex), the EMA
    then updated by the step. cuda: whether the run is on CUDA (default: `device`'s type; the
    trace prices a CUDA run on fake CPU tensors)."""
    cuda = device.type == "cuda" if cuda is None else cuda
    if cuda and world == 1 and not args.fsdp and args.optimizer == "adamw":
        optimizer = AdamWEMA(denoiser, lr, ema, weight_decay=args.weight_decay)
        lr_on_device(optimizer, device)
        return optimizer
    return make_optimizer(denoiser.parameters(), lr, device, args.weight_decay, args.optimizer,
                          fused=cuda)
