"""The work ``python -m jitfast.bench trace`` prices: a training step as ``python -m jitfast.train``
builds and runs it, a sampling trajectory as ``python -m jitfast.sample`` runs it, and pMF's
one-step (or few-step) sampling. Models are built on the meta device and their tensors made fake
(``jitfast.measure.trace``): a JiT-H/16 step is traced in seconds, without its memory.

Each runs as on a CUDA device: backend "auto" is the Triton kernels, the training step runs under
bf16 autocast with fused AdamW, the samplers take a bf16 network.
"""
from copy import copy

import torch

from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.pmf_objective import PMFDraws, PMFObjective
from jitfast.diffusion.pmf_sampler import PMFSampler
from jitfast.diffusion.sampling.trajectory import check_settings, integrate, make_time_grid
from jitfast.measure.roofline import H200
from jitfast.measure.trace import fake_tensors, faked, record
from jitfast.network.attention import as_on_cuda
from jitfast.network.pmf import PMF
from jitfast.network.pmf_presets import pmf_preset_config
from jitfast.network.presets import build as build_network
from jitfast.training.build import build as build_training
from jitfast.training.build import build_ema, build_optimizer
from jitfast.training.step import train_step
from jitfast.util.markers import phase

META = torch.device("meta")
HOST = torch.device("cpu")  # the fake tensors' device (autograd runs fake CUDA tensors nowhere)
NUM_CLASSES = 1000


def on_cuda(backend):
    """The backend a CUDA device runs for this choice: "auto" is the Triton kernels."""
    return "triton" if backend == "auto" else backend


def training_step(args, num_classes=NUM_CLASSES, roofline=H200):
    """Trace of one step of the run `args` (``jitfast.train.parse_args``'s namespace: --model,
    --image-size, --batch-size as one process's batch, the recipe's EMA decays, clipping,
    weight decay and optimizer): the objective, backward, the optimizer and both EMAs, as
    ``train_step`` runs them in one CUDA process's graph. The step traced is the second: the first makes the optimizer's
    state. torch.compile, FSDP and DDP are not traced (the step is the eager one, as graphed)."""
    args = copy(args)
    args.backend, args.compile, args.fsdp = on_cuda(args.backend), False, False
    args.precision = "bf16"  # as the step below runs
    with META:
        denoiser, model = build_training(args, num_classes, META, world=1)
    size, batch = args.image_size, args.batch_size
    with fake_tensors(), as_on_cuda():
        faked(denoiser)
        ema = build_ema(args, denoiser)
        optimizer = build_optimizer(args, denoiser, ema, 1e-4, HOST, world=1, cuda=True)
        x, noise = (torch.empty(batch, 3, size, size) for _ in range(2))
        y, t = torch.zeros(batch, dtype=torch.long), torch.empty(batch)

        def step():
            train_step(model, denoiser, optimizer, ema, x, y, t, noise, clip_grad=args.clip_grad,
                       bf16=True)

        step()
        return record(step, f"train step {args.model} {size}px batch {batch} ({args.backend})",
                      roofline)


def sampling(preset, image_size, batch, method="heun", steps=50, cfg=2.9, interval=(0.1, 1.0),
             schedule="linear", backend="auto", num_classes=NUM_CLASSES, roofline=H200):
    """Trace of one sampling trajectory of a bf16 JiT, as ``Denoiser.generate`` runs it (and a
    CUDA graph captures it): conditioning, every evaluation and state update. notes["evaluations"]
    counts the network evaluations (output-head launches)."""
    backend = on_cuda(backend)
    with META:
        net = build_network(preset, input_size=image_size, num_classes=num_classes,
                            backend=backend).to(torch.bfloat16)
    denoiser = Denoiser(net)
    check_settings(steps, method, cfg, interval, schedule)
    # real tensors: the grid is computed on the host from its values (then sent to the device)
    time_grid = make_time_grid(denoiser, steps, method, cfg, interval, schedule, HOST)
    name = (f"sampling {preset} {image_size}px batch {batch}, {method} {steps} steps "
            f"({schedule}), cfg {cfg:g} on [{interval[0]:g}, {interval[1]:g}] ({backend})")
    net.eval()
    net.check_values = False  # as run_trajectory runs it: no host reads
    with fake_tensors(), torch.no_grad():
        faked(net)
        y = torch.zeros(batch, dtype=torch.long)
        z = torch.empty(batch, 3, image_size, image_size)
        trace = record(lambda: integrate(denoiser, y, z, time_grid, method), name, roofline)
    return with_evaluations(trace)


def pmf_sampling(preset, image_size, batch, steps=1, backend="auto", num_classes=NUM_CLASSES,
                 roofline=H200):
    """Trace of a pMF preset's sampling run (bf16, its README guidance as network inputs), as
    ``PMFSampler.generate`` runs it."""
    backend = on_cuda(backend)
    config = {**pmf_preset_config(preset), "input_size": image_size, "num_classes": num_classes}
    with META:
        net = PMF(**config, backend=backend).to(torch.bfloat16)
    with fake_tensors():
        sampler = PMFSampler(faked(net))
        y = torch.zeros(batch, dtype=torch.long)
        z = torch.empty(batch, 3, image_size, image_size)
        name = f"sampling {preset} {image_size}px batch {batch}, {steps} step(s) ({backend})"
        trace = record(lambda: sampler.run(y, z, steps, sampler.omega, sampler.interval,
                                           cuda_graphs=False), name, roofline)
    return with_evaluations(trace)


def with_evaluations(trace):
    """The trace with notes["evaluations"]: its network evaluations (one output head each)."""
    trace.notes["evaluations"] = sum(
        launch.op == "_output_head_fwd" or (launch.op == "aten::addmm"
                                            and launch.site.endswith(" output_head"))
        for launch in trace.launches)
    return trace


def pmf_loss_step(preset, image_size, batch, backend="auto", num_classes=NUM_CLASSES,
                  roofline=H200):
    """Trace of pMF's objective (the v-head's guidance pass, the JVP pass with tangents through
    the fused ops) and its backward for a preset with its v-head, under bf16 autocast as on
    CUDA, with the official defaults; no optimizer (``python -m jitfast.train`` for pMF is not
    built yet). notes["passes"]: the examples of each network pass."""
    backend = on_cuda(backend)
    config = {**pmf_preset_config(preset), "input_size": image_size, "num_classes": num_classes}
    with META:
        net = PMF(**config, v_head=True, backend=backend)
    net.check_values = False
    with fake_tensors(), as_on_cuda():
        objective = PMFObjective(faked(net))
        images = torch.empty(batch, 3, image_size, image_size)
        labels = torch.zeros(batch, dtype=torch.long)
        t = torch.empty(batch)
        draws = PMFDraws(t, t, torch.zeros(batch, dtype=torch.bool), torch.empty_like(images),
                         t, t, t, torch.zeros(batch, dtype=torch.bool))

        def step():
            with phase("forward"), torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
                loss = objective.loss(images, labels, draws)[0]
            with phase("backward"):
                loss.backward()

        name = f"pMF loss + backward {preset} {image_size}px batch {batch} ({backend})"
        trace = record(step, name, roofline)
    trace.notes["passes"] = objective.passes(batch)
    return trace
