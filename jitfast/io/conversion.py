"""Weights written in another published layout: the family of the weights says which layouts it
has and writes its official one; the folder layouts go through ``save_pretrained``."""
from jitfast.io.checkpoint import (WEIGHT_KEYS, CheckpointError, model_from_checkpoint,
                                   select_weights, weights_in_use)
from jitfast.io.families import family_of_state
from jitfast.io.pretrained import save_pretrained


def convert_weights(ckpt, dst, layout, weights=None, source="the source", **overrides):
    """Write the `weights` set of a read checkpoint (None: "ema1" of a training checkpoint, a
    one-set file's own) to `dst` in `layout`, with everything it holds (pMF's v-head); the
    official layout also takes the file's other sets where the family's file has room for
    them. Returns (the path written, the sets that hold a copy of `weights`' for want of their
    own)."""
    state = select_weights(ckpt, weights)
    family = family_of_state(state)
    if layout not in family.layouts:
        raise CheckpointError(f"{source!r} holds {family.describe(state)}, which has no "
                              f"{layout!r} layout: convert it to one of {list(family.layouts)}")
    net = model_from_checkpoint(ckpt, weights, **{**family.keep_all(state), **overrides})
    if layout != "official":
        return save_pretrained(net, dst, layout, weights_in_use(ckpt, weights)), []
    return family.write_official(net, weight_sets(ckpt), dst)


def weight_sets(ckpt):
    """{weights name: state dict} of every set the checkpoint holds."""
    sets = {}
    for name in WEIGHT_KEYS:
        try:
            sets[name] = select_weights(ckpt, name)
        except CheckpointError:
            pass
    return sets
