"""The trained objects of a run as ``python -m jitfast.train`` builds them from its arguments:
the objective of --model's family (JiT's Denoiser, pMF's PMFObjective:
``jitfast.training.families``) and the module the step calls (itself, or its DDP wrapper), with
activation checkpointing, FSDP2 sharding and torch.compile as asked, the EMAs, the optimizer and
the step (eager, or replayed from one CUDA graph).
``jitfast.measure.traced`` builds the step it prices the same way."""
import functools

import torch
from torch.nn.parallel import DistributedDataParallel

from jitfast.training.ema import EMA
from jitfast.training.errors import TrainingError
from jitfast.training.families import family_of
from jitfast.training.muon import muon_for
from jitfast.training.optimizer import AdamWEMA
from jitfast.training.step import GraphedTrainStep, lr_on_device, make_optimizer, train_step


def checkpointed(block):
    """Recompute `block` in the backward pass, through whichever of its methods the network
    calls (forward, and those it calls instead: pMF's JVP pass, ``forward_dual``); state-dict
    keys stay unchanged."""
    for name in ("forward", *getattr(block, "forward_methods", ())):
        setattr(block, name, functools.partial(torch.utils.checkpoint.checkpoint,
                                               getattr(block, name), use_reentrant=False))


def shard(net):
    """FSDP2 over `net`: each of its sharding units, then the rest as the root (not the
    objective: sampling calls the net directly). The methods a module is called by instead of
    forward (pMF's JVP pass: ``forward_dual``, ``velocities``) gather its weights as forward
    does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    net.fuse_across_blocks = False  # a block's weights exist only inside its forward
    for module in (*net.sharding_units, net):
        fully_shard(module)
        for name in getattr(module, "forward_methods", ()):
            register_fsdp_forward_method(module, name)


def build(args, num_classes, device, world, net=None):
    """(objective, module to call for the loss): --model's family's objective (JiT's Denoiser,
    pMF's PMFObjective) around net (a JiT to train), else a new --model."""
    family = family_of(args.model)
    if net is None:
        net = family.presets[args.model](input_size=args.image_size, num_classes=num_classes,
                                         backend=args.backend, **family.network_options)
    net.check_values = False  # t and labels are ours; the range checks would sync every step
    denoiser = family.objective(net, args, device).to(device)
    if args.activation_checkpointing:
        for block in net.sharding_units:
            checkpointed(block)
    if args.fsdp:
        shard(net)
    if args.compile:
        denoiser.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
    if world > 1 and not args.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        return denoiser, DistributedDataParallel(denoiser, device_ids=ids)
    return denoiser, denoiser


def base_lr(args):
    """The run's learning rate before its schedule: --lr, else --blr scaled by the batch."""
    return args.lr if args.lr is not None else args.blr * args.batch_size / 256


def build_ema(args, denoiser):
    """The run's EMAs: EDM-style ones at --ema-halflives (kimg, the global batch's images),
    else constant --ema-decays."""
    return EMA(denoiser, args.ema_decays, halflives_kimg=args.ema_halflives,
               batch=args.batch_size)


def computes_bf16(args, cuda):
    """Whether the run computes in bf16 (the forward and backward under bf16 autocast, Muon's
    Newton–Schulz): --precision, whose auto is bf16 on CUDA (`cuda`) and float32 elsewhere."""
    return cuda if args.precision == "auto" else args.precision == "bf16"


def build_optimizer(args, denoiser, ema, lr, device, world, cuda=None):
    """The run's optimizer: --optimizer muon: Muon for the family's matrices and Adam for the
    rest (``training.muon``, optax's, pMF's recipe; Newton–Schulz in bf16 in a bf16 run); on
    one CUDA process computing in bf16 without FSDP, with EMAs of constant decays, ``AdamWEMA``
    (AdamW, the EMA `ema` and bf16 compute copies of the weights in one pass per weight); else
    ``make_optimizer``'s (torch's fused AdamW on CUDA, AdamW elsewhere, or apex's with
    --optimizer apex). The EMA is then updated by the step.
    cuda: whether the run is on CUDA (default: `device`'s type; the trace prices a CUDA run on
    fake CPU tensors)."""
    cuda = device.type == "cuda" if cuda is None else cuda
    bf16 = computes_bf16(args, cuda)
    if args.optimizer == "muon":
        optimizer = muon_for(denoiser, lr, family_of(args.model).muon_blocks,
                             weight_decay=args.weight_decay,
                             ns_dtype=torch.bfloat16 if bf16 else torch.float32)
        lr_on_device(optimizer, device)
        return optimizer
    if cuda and bf16 and world == 1 and not args.fsdp and args.optimizer == "adamw" and \
            ema.decays is not None and len(ema.decays) <= 2:
        optimizer = AdamWEMA(denoiser, lr, ema, weight_decay=args.weight_decay)
        lr_on_device(optimizer, device)
        return optimizer
    return make_optimizer(denoiser.parameters(), lr, device, args.weight_decay, args.optimizer,
                          fused=cuda)


def build_step(args, model, denoiser, optimizer, ema, device, world):
    """step(*inputs) -> the loss and its extras: ``train_step``, replayed from one CUDA graph
    when --cuda-graph asks (auto: wherever the graph can hold the whole step)."""
    conflicts = [why for why, present in (
        ("it needs a CUDA device", device.type != "cuda"),
        ("it holds one process's step, not a distributed one", world > 1 or args.fsdp),
        ("--activation-checkpointing recomputes outside it", args.activation_checkpointing),
        (f"--compile-mode {args.compile_mode} captures graphs of its own",
         args.compile and args.compile_mode in ("reduce-overhead", "max-autotune")),
        ("--optimizer apex cannot be captured", args.optimizer == "apex")) if present]
    if args.cuda_graph == "on" and conflicts:
        raise TrainingError(f"--cuda-graph on: {'; '.join(conflicts)}. Use --cuda-graph off "
                            f"(or auto)")
    bf16 = computes_bf16(args, device.type == "cuda")
    if args.cuda_graph == "off" or conflicts:
        return lambda *batch: train_step(model, denoiser, optimizer, ema, *batch,
                                         clip_grad=args.clip_grad, bf16=bf16)
    return GraphedTrainStep(model, denoiser, optimizer, ema, args.clip_grad, bf16=bf16)
