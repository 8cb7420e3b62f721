"""A training run's checkpoints: written (rank 0, the full tensors of a sharded run gathered
first) as checkpoint-<step>.safetensors, the weights, then checkpoint-<step>.pt, the whole state,
through the one checkpoint writer (``io/checkpoint.write_checkpoint``); and read back into a
run, whose settings must match the ones it was trained with."""
import os

from jitfast.io.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from jitfast.io.weight_files import save_training_weights
from jitfast.training.errors import TrainingError
from jitfast.training.step import lr_on_device, optimizer_state
from jitfast.util.sharded import full_tensor, is_sharded

CHECKPOINT_NAME = "checkpoint-{:08d}.pt"
MUST_MATCH = ("model", "image_size", "dataset")  # the args a resumed run must share


def full_state(denoiser, ema, optimizer, fsdp):
    """The official entries model, model_ema1, ... and optimizer as plain (unsharded) state
    dicts; under FSDP2 a collective, every rank takes part."""
    states = {"model": denoiser.state_dict(),
              **{f"model_ema{k}": ema.state_dict(k) for k in range(1, ema.sets + 1)}}
    if not fsdp:
        return {**states, "optimizer": optimizer_state(optimizer.state_dict())}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    states = {key: {k: full_tensor(v, "cpu") for k, v in sd.items()}
              for key, sd in states.items()}
    states["optimizer"] = optimizer_state(get_optimizer_state_dict(
        denoiser, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    return states


def save_run_checkpoint(args, step, steps_per_epoch, denoiser, ema, optimizer, rank, folder):
    """Write checkpoint-<step>.safetensors and .pt atomically (rank 0) into args.out; delete
    this run's beyond --keep-checkpoints. Returns the .pt's path (None on other ranks)."""
    if rank != 0 and not args.fsdp:
        return None
    states = full_state(denoiser, ema, optimizer, args.fsdp)  # a collective under FSDP
    if rank != 0:
        return None
    epoch = step // steps_per_epoch
    path = os.path.join(args.out, CHECKPOINT_NAME.format(step))
    # the weights first: a checkpoint-<step>.pt, written last, always has its .safetensors
    weights = path[:-len(".pt")] + ".safetensors"
    save_training_weights(weights, states, denoiser.net.config)
    try:
        write_checkpoint(path, states, denoiser.net.config, epoch, dict(vars(args)), step=step,
                         run_id=folder.run_id,
                         data={"epoch": epoch, "batch_in_epoch": step % steps_per_epoch,
                               "images_seen": step * args.batch_size})
    except Exception:
        os.remove(weights)  # no weights of a step whose checkpoint failed
        raise
    folder.prune(args.keep_checkpoints, path)
    return path


def restore(path, denoiser, ema, optimizer, args):
    """Load a checkpoint into the run (its parent record into args.parent); returns its step."""
    ckpt = read_checkpoint(path)
    needed = ("model", *(f"model_ema{k}" for k in range(1, ema.sets + 1)), "optimizer", "step")
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path!r} cannot be resumed: it lacks {', '.join(missing)}")
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    differ = [f"--{k.replace('_', '-')} {saved[k]}" for k in MUST_MATCH
              if k in saved and saved[k] != getattr(args, k) and not (k == "dataset" and
                                                                      args.data_path)]
    if differ:
        raise TrainingError(f"{path!r} was trained with {', '.join(differ)}: pass the same to "
                            f"resume it (the defaults may have changed since)")
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(denoiser, optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        denoiser.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    lr_on_device(optimizer, next(denoiser.parameters()).device)  # the file holds floats
    if saved.get("noise_scale", args.noise_scale) != args.noise_scale:
        raise TrainingError(f"{path!r} was trained with noise scale {saved['noise_scale']:g}, "
                            f"this run has {args.noise_scale:g}: pass --noise-scale "
                            f"{saved['noise_scale']:g}")
    args.parent = saved.get("parent")
    for k in range(1, ema.sets + 1):
        state = ckpt[f"model_ema{k}"]
        ema.load_state_dict(sharded_like(state, denoiser) if args.fsdp else state, k)
    return ckpt["step"]


def sharded_like(state, model):
    """The full tensors of `state` laid out like the (FSDP2-sharded) parameters of `model`."""
    from torch.distributed.tensor import distribute_tensor
    params = dict(model.named_parameters())
    return {k: distribute_tensor(v, params[k].device_mesh, params[k].placements)
            if is_sharded(params.get(k)) else v for k, v in state.items()}
