"""JiT weights: the architecture read from a state dict in the official layout (its stored config,
else the tensor shapes and the official args), and the network built and loaded from it."""
from jitfast.io.configs import check_config_fits, shape_facts
from jitfast.io.errors import CheckpointError
from jitfast.io.layouts import foreign_keys_note, state_dict_problems
from jitfast.network.model import JiT
from jitfast.network.presets import ARCHITECTURES, preset_config


def infer_config(state, ckpt=None, **overrides):
    """JiT constructor keywords: the stored config, else the tensor shapes (plus the official
    args); `overrides` win over both."""
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(stored, dict):  # a config.json may leave fields to the shapes
        check_config_fits(stored, state)
        return infer_config(state, {"args": ckpt.get("args")}, **{**stored, **overrides})
    facts = {k: value for k, (value, _) in shape_facts(state).items()}
    hidden, mlp_hidden = facts["hidden_size"], facts.pop("mlp_hidden")
    config = dict(facts, mlp_ratio=mlp_hidden * 1.5 / hidden)
    if int(int(hidden * 4.0) * 2 / 3) == mlp_hidden:
        config["mlp_ratio"] = 4.0
    config.update(overrides)
    if "in_context_start" not in config:
        config["in_context_start"] = _in_context_start(config, ckpt)
    return config


def _in_context_start(config, ckpt):
    """Not visible in the shapes: from the official args' preset name, else a matching preset."""
    if config["in_context_len"] == 0:
        return 0
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    name = getattr(args, "model", None) or (args.get("model") if isinstance(args, dict) else None)
    if isinstance(name, str):
        try:
            return preset_config(name)["in_context_start"]
        except KeyError:
            pass
    shape = (config["depth"], config["hidden_size"], config["num_heads"],
             config["bottleneck_dim"], config["in_context_len"])
    for arch in ARCHITECTURES.values():
        if arch[:5] == shape:
            return arch[5]
    raise CheckpointError(f"cannot infer in_context_start for a model of depth {shape[0]}, "
                          f"hidden {shape[1]}: pass it, load_checkpoint(path, "
                          f"in_context_start=N)")


def check_state_dict(model, state):
    """Raise one error naming every missing/unexpected key and every shape mismatch."""
    problems = state_dict_problems(model.state_dict(), state, foreign_keys_note)
    if problems:
        raise CheckpointError("the state dict does not fit the model — " + " | ".join(problems))


def jit_model_from_state(state, ckpt=None, device="cpu", backend="auto", **overrides):
    """A ready JiT (eval mode) from an official-layout state dict and the checkpoint it came
    from (its config and args); overrides win."""
    if "v_head" in overrides:
        raise CheckpointError("v_head is pMF's training head; the file holds a JiT network")
    model = JiT(**infer_config(state, ckpt, **overrides), backend=backend)
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model.to(device).eval()
