"""Triton on a machine without a GPU: compile the kernels for a GPU target, or record which
variants a piece of work would launch, without touching a device. The CPU test suite uses it
(every variant compiles for sm_90; nothing captured in a CUDA graph meets a variant for the first
time), and so do sizing a GPU run before it starts (benchmarks/precompile.py) and the dispatch
trace of a step (``jitfast.measure.trace``).

Relies on Triton 3 internals: the active driver, ``JITFunction.run`` and its binder,
``InterpretedFunction.run``, ``Autotuner.run``.
"""
from contextlib import contextmanager

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, compute_cache_key

from . import _common


class CompileOnlyDriver:
    """Enough of a Triton driver to compile for a target: no device is touched."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def variant_key(kernel, args, kwargs):
    """Triton's own cache key of the variant a launch would run: the kernel's name, the
    specialisation of each argument (dtype, 16-byte alignment of pointers, integers equal to 1 or
    divisible by 16, constexpr values) and the compile options."""
    _, _, _, _, binder = kernel.device_caches[0]
    _, specialization, options = binder(*args, **kwargs)
    return kernel.fn.__name__, compute_cache_key({}, specialization, options)


def tuning_key(tuner, args, kwargs):
    """The autotune cache key as Triton's Autotuner forms it: the key arguments' values, then the
    dtype of every tensor argument."""
    named = dict(zip(tuner.arg_names, args), **kwargs)
    return (tuner.base_fn.__name__, tuple(named[k] for k in tuner.keys),
            tuple(str(a.dtype) for a in named.values() if hasattr(a, "dtype")))


def _patch(on_launch, on_tune=None, every_config=False):
    """Route every Triton launch, compiled or interpreted, to ``on_launch(kernel, args, kwargs)``;
    an autotuned kernel launches its first config, or each of them with every_config, after
    ``on_tune(tuning_key)``; nothing is timed."""
    def launch(self, *args, grid, warmup, **kwargs):
        return on_launch(self, args, kwargs)

    def tune(self, *args, **kwargs):
        if on_tune is not None:
            on_tune(tuning_key(self, args, kwargs))
        for config in self.configs if every_config else self.configs[:1]:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = launch
    InterpretedFunction.run = launch
    Autotuner.run = tune


def intercept(arch, on_launch, on_tune=None, every_config=False):
    """Make every Triton launch call ``on_launch(kernel, args, kwargs)`` instead of running
    (``compile_variant`` compiles it), with a compile-only driver for sm_`arch`, for the rest of
    the process. An autotuned kernel launches its first config, or each of them with
    every_config, after ``on_tune(tuning_key)``; nothing is timed."""
    triton.runtime.driver.set_active(CompileOnlyDriver(arch))
    _patch(on_launch, on_tune, every_config)


@contextmanager
def recording(on_launch, sms):
    """Within the block, the kernels take tensors of any device (fake ones included) and every
    launch calls ``on_launch(kernel, args, kwargs)`` instead of running; partial-sum kernels size
    their grids for a GPU of `sms` SMs. Everything is put back after."""
    saved = (JITFunction.run, InterpretedFunction.run, Autotuner.run, _common.INTERPRET,
             _common.RECORDED_SMS)
    _patch(on_launch)
    _common.INTERPRET, _common.RECORDED_SMS = True, sms
    try:
        yield
    finally:
        (JITFunction.run, InterpretedFunction.run, Autotuner.run, _common.INTERPRET,
         _common.RECORDED_SMS) = saved


_run = JITFunction.run


def compile_variant(kernel, args, kwargs):
    """Compile (or find in Triton's cache) the variant of this launch, without running it."""
    return _run(kernel, *args, grid=None, warmup=True, **kwargs)
