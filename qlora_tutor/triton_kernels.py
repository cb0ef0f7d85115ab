"""Triton kernels for 4-bit weights: dequantize (NF4/FP4/Int4, with or without double quantization) in one pass.

The PyTorch dequantize in `quant.py` is the one the notebooks teach: a table lookup, a multiply and a cast, each a
separate pass over memory with temporaries in between. The kernel here does the same arithmetic in one pass: it
reads the packed bytes and the block constants once and writes the 16-bit (or 32-bit) weights once, so its speed is
set by memory bandwidth. It gives the same bits as the PyTorch code (tests hold them equal): each value is
code value x block absmax in float32, rounded once to the output dtype (round to nearest even, as torch's cast);
with double quantization the absmax is first decoded as dynamic_map[q] x nested_absmax + offset, a multiply and an
add rounded separately (the kernel is compiled without fused multiply-add, which would round once).

Nothing here needs a recent GPU: no bf16-only or Hopper-only instructions, so it runs on a T4 (fp16 output; a GPU
without bfloat16 gets a clear error if bf16 is asked for). On a CPU tensor the kernels run under Triton's
interpreter when TRITON_INTERPRET=1 is set (slow, exact; that is how the tests and notebook 10 run them in CI).
Triton is optional: where it is missing (macOS, Windows) `available()` is False, `status()` says why, and
`QuantizedTensor.dequantize` uses the PyTorch path. QLORA_TUTOR_TRITON=0 turns the kernels off.
"""

import os
from functools import lru_cache

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as err:  # not installed (the default on macOS and Windows), or a broken install
    triton = tl = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE_BYTES = 2048  # packed bytes per program (4,096 weights); tuned on an H200, see benchmarks/bench_triton.py
NUM_WARPS = 4
_INT32_LIMIT = 2**31 - 2 * 65536  # flat indices above this need 64-bit arithmetic in the kernel


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 is set: kernels may then run on CPU tensors, through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _why_not(device: torch.device) -> str | None:
    """None if the kernels can run on `device`, else the reason (in words a learner can act on)."""
    if triton is None:
        return f"Triton is not installed ({_IMPORT_ERROR}); `pip install triton` (Linux) enables it"
    if _off("QLORA_TUTOR_TRITON"):
        return "turned off by QLORA_TUTOR_TRITON=0"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return None if interpreting() else ("Triton compiles for GPUs; on the CPU it runs only under its "
                                            "interpreter: set TRITON_INTERPRET=1 (slow, for tests and teaching)")
    return f"Triton kernels here support CUDA (and the CPU interpreter), not {device.type}"


def available(device: torch.device | str = "cuda") -> bool:
    """Can the Triton kernels run on `device` ("cuda" by default; "cpu" needs TRITON_INTERPRET=1)?"""
    return _why_not(torch.device(device)) is None


def status(device: torch.device | str | None = None) -> str:
    """One line: whether `dequantize()` uses the Triton kernel on `device` (default: cuda if present), and why."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    why = _why_not(dev)
    if why is not None:
        return f"Triton kernels off on {dev.type}: {why}; dequantize() uses the PyTorch path"
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU, through Triton's interpreter"
    return f"Triton {triton.__version__} kernels on {where}"


def check_output_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A clear error for an output dtype the kernel cannot write here (bf16 on a GPU older than Ampere)."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"the Triton dequantize writes float32, bfloat16 or float16, not {dtype}")
    if dtype == torch.bfloat16 and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) "
                             "has no bfloat16: dequantize to dtype=torch.float16 (T4, V100), or use "
                             "backend='torch'")


if tl is not None:
    def _dequantize_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, out_ptr,
                                n_values,
                                HALF_BLOCK: tl.constexpr,     # blocksize // 2: packed bytes per quantization block
                                NESTED_BLOCK: tl.constexpr,   # blocks per nested constant (256), double quant only
                                DOUBLE_QUANT: tl.constexpr,
                                ROWS: tl.constexpr, COLS: tl.constexpr,  # this program's ROWS x COLS packed bytes
                                WIDE: tl.constexpr,           # 64-bit indices (tensors of 2^31 values and more)
                                OUT_BF16: tl.constexpr):
        # 1. Which bytes: program p owns rows p*ROWS ... p*ROWS + ROWS-1, each row COLS consecutive bytes.
        #    COLS divides HALF_BLOCK (or equals it), so all bytes of one row share one block constant.
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        row = pid * ROWS + tl.arange(0, ROWS)                       # (ROWS,)
        byte = row[:, None] * COLS + tl.arange(0, COLS)[None, :]    # (ROWS, COLS) flat byte index
        n_bytes = (n_values + 1) // 2
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)  # uint8: two 4-bit codes each
        # 2. The block constant (c2) of each row, in float32.
        block = (row * COLS) // HALF_BLOCK
        in_range = row * COLS < n_bytes
        if DOUBLE_QUANT:  # 8-bit code -> dynamic map value, times its nested absmax (c1), plus the mean
            q = tl.load(absmax_ptr + block, mask=in_range, other=0)
            nested = tl.load(nested_ptr + block // NESTED_BLOCK, mask=in_range, other=0.0)
            scale = tl.load(dmap_ptr + q) * nested + tl.load(offset_ptr)  # two roundings: no FMA (see launch)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        # 3. Unpack: the first value of each pair is the high nibble. Look both codes up in the 16-entry table.
        high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (packed & 15)) * scale[:, None]
        # 4. Interleave (high0, low0, high1, low1, ...), round once to the output dtype, store (odd sizes: masked).
        values = tl.reshape(tl.join(high, low), (ROWS, 2 * COLS))
        index = row[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
        if OUT_BF16:  # round to nearest even by hand: what cvt.rn.bf16.f32 and torch's cast do, and the same
            bits = values.to(tl.uint32, bitcast=True)  # bits under Triton's interpreter, whose own cast truncates
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:  # float16 (round to nearest even) or float32 (exact)
            rounded = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + index, rounded, mask=index < n_values)


@lru_cache(maxsize=None)
def _kernel(name: str, interpret: bool):
    """A kernel compiled by Triton (CUDA) or wrapped by its interpreter (CPU), built on first use."""
    fn = globals()[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(fn)
    return triton.jit(fn)


def _check_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, size: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the packed codes are on {device}: move the whole "
                         "QuantizedTensor with .to(device)")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (a strided view): pass {name}.contiguous()")
    if t.numel() != size:
        raise ValueError(f"{name} has {t.numel()} values, expected {size}")


def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, n_values: int, blocksize: int, dtype: torch.dtype,
                    absmax: torch.Tensor | None = None, qabsmax: torch.Tensor | None = None,
                    dynamic_map: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None, nested_blocksize: int = 256,
                    out: torch.Tensor | None = None, tile_bytes: int = TILE_BYTES,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:
    """A flat tensor of `n_values` weights in `dtype` from packed 4-bit codes, in one kernel launch.

    Pass `absmax` (fp32, one per block), or for double quantization `qabsmax` (uint8 per block), `dynamic_map`
    (fp32, 256), `nested_absmax` (fp32 per `nested_blocksize` blocks) and `offset` (fp32, one value). `code` is the
    16-entry fp32 table. All tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1), contiguous.
    """
    device = packed.device
    why = _why_not(device)
    if why is not None:
        raise RuntimeError(f"the Triton dequantize cannot run on {device}: {why}")
    check_output_dtype(dtype, device)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two (32 ... 4096), got {blocksize}")
    if nested_blocksize < 1 or nested_blocksize & (nested_blocksize - 1):
        raise ValueError(f"nested_blocksize must be a power of two, got {nested_blocksize}")
    if tile_bytes < 16 or tile_bytes & (tile_bytes - 1):
        raise ValueError(f"tile_bytes must be a power of two >= 16, got {tile_bytes}")
    n_values = int(n_values)
    n_bytes, blocks = (n_values + 1) // 2, -(-n_values // blocksize)
    _check_tensor(packed, "packed", torch.uint8, n_bytes, device)
    _check_tensor(code, "code", torch.float32, 16, device)
    double_quant = absmax is None
    if double_quant:
        if qabsmax is None or dynamic_map is None or nested_absmax is None or offset is None:
            raise ValueError("pass absmax, or qabsmax, dynamic_map, nested_absmax and offset (double quantization)")
        _check_tensor(qabsmax, "qabsmax", torch.uint8, blocks, device)
        _check_tensor(dynamic_map, "dynamic_map", torch.float32, 256, device)
        _check_tensor(nested_absmax, "nested_absmax", torch.float32, -(-blocks // nested_blocksize), device)
        _check_tensor(offset.reshape(1), "offset", torch.float32, 1, device)
        constants, dmap, nested, off = qabsmax, dynamic_map, nested_absmax, offset.reshape(1)
    else:
        _check_tensor(absmax, "absmax", torch.float32, blocks, device)
        constants, dmap, nested, off = absmax, absmax, absmax, absmax  # unused pointers
    if out is None:
        out = torch.empty(n_values, dtype=dtype, device=device)
    else:
        _check_tensor(out, "out", dtype, n_values, device)
    if n_values == 0:
        return out
    cols = min(blocksize // 2, tile_bytes)
    rows = tile_bytes // cols
    grid = (triton.cdiv(n_bytes, tile_bytes),)
    kernel = _kernel("_dequantize_4bit_kernel", device.type == "cpu")
    kernel[grid](packed, code, constants, dmap, nested, off, out, n_values,
                 HALF_BLOCK=blocksize // 2, NESTED_BLOCK=nested_blocksize, DOUBLE_QUANT=double_quant,
                 ROWS=rows, COLS=cols, WIDE=n_values > _INT32_LIMIT, OUT_BF16=dtype == torch.bfloat16,
                 num_warps=num_warps, enable_fp_fusion=False)  # no FMA: multiply and add round separately
    return out
