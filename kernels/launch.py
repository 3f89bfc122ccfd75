"""A low-overhead way to launch ``triton.jit`` kernels.

Triton's own launch path (argument binding, specialization, cache-key hashing)
costs 18-30 microseconds per call on the H100 machines here (bench/kernels.py,
``env`` section) -- about what a 4-bit 8192x8192 GEMV takes on the GPU, and a
decode step launches hundreds of kernels.

``FastLauncher`` sends the first call for each specialization through Triton
(which compiles or fetches the kernel) and keeps the compiled kernel; later
calls hand the arguments straight to its C launcher. The cache key covers
everything Triton specializes a kernel on: constexpr values, launch options,
argument types, 16-byte alignment of pointers, and integers' divisibility by 16,
equality to 1 and width. Under the interpreter, or while a launch hook is
installed (profilers), every call takes Triton's normal path.

Kernels launched this way must declare their constexpr parameters last.
"""

from __future__ import annotations

import torch


_Tensor = torch.Tensor


def _launch_key(args) -> tuple:
    """What Triton specializes on, cheaply: tensors -> (dtype, 16-byte aligned); other values as they are.

    Integers go into the key by value (a superset of Triton's divisibility / ==1
    specialization), so a new value only costs one trip through Triton's path.
    """
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if type(a) is _Tensor else a for a in args])


def _hooks_active() -> bool:
    hook = _knobs().runtime.launch_enter_hook
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # newer Triton: a HookChain, empty unless a profiler is attached
    return bool(calls) if calls is not None else True


_KNOBS = None


def _knobs():
    global _KNOBS
    if _KNOBS is None:
        from triton import knobs

        _KNOBS = knobs
    return _KNOBS


def _current_stream(device: int) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(device)
    except AttributeError:  # a torch without the private accessor
        return torch.cuda.current_stream(device).cuda_stream


class FastLauncher:
    """Wraps one ``@triton.jit`` function; call as ``launcher(grid, *args, num_warps=, num_stages=, **constexprs)``.

    ``args`` are the kernel's non-constexpr parameters in order; constexprs go by name.
    """

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        params = getattr(fn, "params", None)  # an interpreted function has none
        self.interpret = params is None
        if params is not None:
            kinds = [p.is_constexpr for p in params]
            if kinds != sorted(kinds):
                raise TypeError(f"{fn.__name__}: FastLauncher needs the constexpr parameters last")
            self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)

    def __call__(self, grid, *args, num_warps: int = 4, num_stages: int = 2, maxnreg: int | None = None,
                 **constexprs):
        """``maxnreg``: cap on registers per thread (Triton's NVIDIA option; None: the compiler's choice)."""
        options = {} if maxnreg is None else {"maxnreg": maxnreg}
        if self.interpret:
            return self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        device = torch.cuda.current_device()
        cvals = tuple([constexprs[name] for name in self.constexpr_names])
        key = (cvals, num_warps, num_stages, maxnreg, device, _launch_key(args))
        kernel = self.cache.get(key)
        if kernel is None or _hooks_active():
            kernel = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **options, **constexprs)
            if not _hooks_active():
                self.cache[key] = kernel
            return
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, _current_stream(device), kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *cvals)
