"""A low-overhead way to launch ``triton.jit`` kernels.

Triton's own launch path (argument binding, specialization, cache-key hashing)
costs about 30 microseconds per call on the H100 machine (bench/kernels.py,
``env`` section) -- more than a 4-bit 8192x8192 GEMV takes on the GPU. Decode
steps launch hundreds of kernels, so that overhead would dominate.

``FastLauncher`` sends the first call for each specialization through Triton
(which compiles or fetches the kernel) and keeps the compiled kernel; later
calls hand the arguments straight to its C launcher. The cache key covers
everything Triton specializes a kernel on: constexpr values, launch options,
argument types, 16-byte alignment of pointers, and integers' divisibility by 16,
equality to 1 and width. Under the interpreter, or when a launch hook is
installed (profilers), every call takes Triton's normal path.
"""

from __future__ import annotations

import torch

from . import triton_ops


def _spec(arg):
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        return (arg % 16 == 0, arg == 1, -(2**31) <= arg < 2**31)
    return type(arg)


class FastLauncher:
    """Wraps one ``@triton.jit`` function; call as ``launcher(grid, *args, num_warps=, num_stages=, **constexprs)``.

    ``args`` are the kernel's non-constexpr parameters in order; constexprs go by name.
    """

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        params = getattr(fn, "params", None)  # an interpreted function has none; it always takes Triton's path
        self.names = [p.name for p in params] if params is not None else []
        self.constexpr_names = [p.name for p in params if p.is_constexpr] if params is not None else []

    def __call__(self, grid, *args, num_warps: int = 4, num_stages: int = 2, **constexprs):
        if triton_ops.interpreting():
            return self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        from triton import knobs

        cvals = tuple(constexprs[n] for n in self.constexpr_names)
        key = (cvals, num_warps, num_stages, torch.cuda.current_device(), tuple(_spec(a) for a in args))
        entry = self.cache.get(key)
        if entry is None or knobs.runtime.launch_enter_hook is not None:
            kernel = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            if knobs.runtime.launch_enter_hook is None:
                self.cache[key] = (kernel, self._merge_order(constexprs))
            return
        kernel, order = entry
        it = iter(args)
        full = [next(it) if name is None else constexprs[name] for name in order]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = torch.cuda.current_stream().cuda_stream
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *full)

    def _merge_order(self, constexprs):
        # None = next positional argument; a name = that constexpr's value
        return [name if name in constexprs else None for name in self.names]
