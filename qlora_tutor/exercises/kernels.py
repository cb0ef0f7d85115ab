"""Checks for notebook 10 (making it fast): the bytes a one-pass dequantize must move, and a Triton kernel that
unpacks nibbles.

The kernel check launches the learner's kernel on fresh random bytes, on the GPU when there is one and the kernel
was compiled for it, else on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by the notebook before
Triton is imported). Output buffers are longer than needed and pre-filled with a sentinel, so a store past the end
is caught (and harms nothing) instead of corrupting memory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..triton_kernels import dequantize_bytes
from .base import Verdict, check, compare, expect, run, wrong

_SENTINEL = 0xAB  # not a 4-bit value: any byte still holding it was not written


def _interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _device_for(kernel: Any) -> str:
    if _interpreted(kernel):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    wrong("this kernel was compiled for a GPU, and there is none here: set os.environ['TRITON_INTERPRET'] = '1' "
          "before `import triton` (the notebook's second cell does), restart the kernel and run again")


def _is_todo(err: BaseException) -> bool:
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, NotImplementedError) or "NotImplementedError" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _launch(kernel: Any, packed: torch.Tensor, n_bytes: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    import triton
    high = torch.full((n_bytes + block,), _SENTINEL, dtype=torch.uint8, device=packed.device)
    low = torch.full_like(high, _SENTINEL)
    try:
        kernel[(triton.cdiv(n_bytes, block),)](packed, high, low, n_bytes, BLOCK=block)
    except Exception as err:  # the interpreter and the compiler wrap the learner's exception
        if _is_todo(err):
            raise NotImplementedError from None
        raise
    return high, low


@check("Triton nibble unpacking")
def check_unpack_kernel(kernel: Any) -> None:
    """`kernel(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK)`: high[i] = packed[i] >> 4, low[i] = packed[i] & 15."""
    if not hasattr(kernel, "__getitem__"):
        wrong(f"expected a Triton kernel (a function decorated with @triton.jit), got {type(kernel).__name__}")
    device = _device_for(kernel)
    g = torch.Generator().manual_seed(10)
    for n_bytes, block in ((1037, 128), (5, 64), (256, 256)):  # a partial last program, one mostly-masked, exact
        packed = torch.randint(0, 256, (n_bytes + block,), generator=g, dtype=torch.uint8).to(device)
        high, low = run(_launch, kernel, packed, n_bytes, block)
        want_high, want_low = packed[:n_bytes] >> 4, packed[:n_bytes] & 15
        if torch.equal(high[:n_bytes], want_low) and torch.equal(low[:n_bytes], want_high):
            wrong("high and low are swapped: the first value of each pair is the high nibble, packed >> 4")
        if (high[:n_bytes] == _SENTINEL).any():
            first = int((high[:n_bytes] == _SENTINEL).nonzero()[0])
            wrong(f"byte {first} of {n_bytes} was never written (BLOCK={block}): does each program start at "
                  "tl.program_id(0) * BLOCK, and does the grid cover every byte?")
        compare(f"high nibbles (n_bytes={n_bytes}, BLOCK={block})", high[:n_bytes], want_high)
        compare(f"low nibbles (n_bytes={n_bytes}, BLOCK={block})", low[:n_bytes], want_low)
        expect(bool((high[n_bytes:] == _SENTINEL).all() and (low[n_bytes:] == _SENTINEL).all()),
               f"the kernel wrote past the end of the {n_bytes} bytes: mask the loads and stores with "
               "offsets < n_bytes (the last program is only partly full)")
    return "matches packed >> 4 and packed & 15 on fresh bytes, partial last blocks masked" + \
        (" (on the GPU)" if device == "cuda" else " (under Triton's interpreter)")


@check("bytes a one-pass dequantize moves")
def check_bytes_moved(fn: Callable[..., Any]) -> None:
    """`fn(n_values, blocksize, out_bytes, double_quant)`: bytes read plus bytes written, at least."""
    cases = [(4096 * 4096, 64, 2, False), (4096 * 4096, 64, 2, True), (8192 * 8192, 64, 4, True),
             (1001, 64, 2, True), (7, 32, 2, False)]
    for n, bs, out_bytes, dq in cases:
        got = run(fn, n, bs, out_bytes, dq)
        expect(isinstance(got, (int, float)) and not isinstance(got, bool),
               f"return a number of bytes, got {type(got).__name__}")
        want = dequantize_bytes(n, bs, out_bytes, dq)
        if got == want:
            continue
        packed, written = (n + 1) // 2, n * out_bytes
        if got == packed + written:
            wrong(f"for {n:,} values you count the codes and the output but not the block constants "
                  f"(absmax: {-(-n // bs):,} of them, {'1 byte' if dq else '4 bytes'} each"
                  f"{', plus the nested fp32 constants and the offset' if dq else ''})")
        if dq and got == dequantize_bytes(n, bs, out_bytes, False):
            wrong("with double quantization each block constant is 1 byte (uint8), plus one fp32 per 256 blocks "
                  "and the fp32 offset; you counted 4 bytes per block")
        blocks = -(-n // bs)
        if dq and got == want - 4 * -(-blocks // 256) - 4:
            wrong("you left out the nested constants: one fp32 per 256 blocks, and the fp32 offset")
        if got == dequantize_bytes(n, bs, 4, dq) and out_bytes != 4:
            wrong(f"the output is {out_bytes} bytes per value here (the out_bytes argument), not 4")
        wrong(f"n_values={n:,}, blocksize={bs}, out_bytes={out_bytes}, double_quant={dq}: got {got:,}, "
              f"expected {want:,} (packed codes + constants read, output written)")
    return "matches for plain and double-quantized constants, 16- and 32-bit outputs, odd sizes"


__all__ = ["Verdict", "check_bytes_moved", "check_unpack_kernel"]
