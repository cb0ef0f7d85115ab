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
except Exception as err:  # not installed (the default on macOS and Windows), or an install that fails to load
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


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def has_bf16(device: torch.device) -> bool:
    """Can the kernels write bfloat16 on `device`? (Ampere and newer GPUs, and the CPU interpreter.)"""
    return device.type != "cuda" or _capability(device)[0] >= 8


def check_output_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A clear error for an output dtype the kernel cannot write here (bf16 on a GPU older than Ampere)."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"the Triton dequantize writes float32, bfloat16 or float16, not {dtype}")
    if dtype == torch.bfloat16 and not has_bf16(device):
        major, minor = _capability(device)
        if major < 8:
            raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) "
                             "has no bfloat16: dequantize to dtype=torch.float16 (T4, V100), or use "
                             "backend='torch'")


def dequantize_bytes(n_values: int, blocksize: int, out_bytes: int, double_quant: bool,
                     nested_blocksize: int = 256) -> int:
    """The least memory traffic of a dequantize: packed codes and block constants read once, the output written once.

    Codes: half a byte per value. Constants: one fp32 per block, or with double quantization one uint8 per block
    plus one fp32 per `nested_blocksize` blocks and the fp32 offset. (The 16- and 256-entry tables are left out:
    they stay in cache.) Divided by the copy bandwidth this is the fastest a dequantize can possibly run.
    """
    blocks = -(-n_values // blocksize)
    constants = blocks + 4 * -(-blocks // nested_blocksize) + 4 if double_quant else 4 * blocks
    return (n_values + 1) // 2 + constants + n_values * out_bytes


def dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         n_values: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantize formula in plain PyTorch, as notebook 01 writes it: unpack, look up, scale, cast.

    Five passes over memory with a temporary after each; the rung of notebook 10's ladder that torch.compile can
    fuse. `absmax` is the fp32 scale per block (`QuantizedTensor.scales()`); same bits as the kernel.
    """
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n_values]   # high nibble first
    values = code[codes.long()]                                                      # fp32 code values
    padded = torch.nn.functional.pad(values, (0, -n_values % blocksize)).view(-1, blocksize)
    return (padded * absmax[:, None]).reshape(-1)[:n_values].to(dtype)              # fp32 product, one rounding


if tl is not None:
    # The kernels use primitives only (tl.full, not tl.zeros; tl.reduce, not tl.max): the others are jitted
    # functions, which the interpreter runs only if Triton was imported with TRITON_INTERPRET=1 already set,
    # and here it may be set later (tests, notebooks). tl.reduce knows Triton's own max combiner.
    _MAX = getattr(getattr(tl, "standard", None), "_elementwise_max", None)
    if _MAX is None:
        @triton.jit
        def _MAX(a, b):
            return tl.maximum(a, b)

    def _dequantize_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, out_ptr,
                                n_values,
                                HALF_BLOCK: tl.constexpr,     # blocksize // 2: packed bytes per quantization block
                                NESTED_BLOCK: tl.constexpr,   # blocks per nested constant (256), double quant only
                                DOUBLE_QUANT: tl.constexpr,
                                ROWS: tl.constexpr, COLS: tl.constexpr,  # this program's ROWS x COLS packed bytes
                                WIDE: tl.constexpr,           # 64-bit indices (tensors of 2^31 values and more)
                                EVEN: tl.constexpr,           # every program's tile is full: no masks needed
                                MANUAL_BF16: tl.constexpr):   # round to bf16 with integer ops (the interpreter)
        # 1. Which bytes: program p owns rows p*ROWS ... p*ROWS + ROWS-1, each row COLS consecutive bytes.
        #    COLS divides HALF_BLOCK (or equals it), so all bytes of one row share one block constant.
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        row = pid * ROWS + tl.arange(0, ROWS)                       # (ROWS,)
        byte = row[:, None] * COLS + tl.arange(0, COLS)[None, :]    # (ROWS, COLS) flat byte index
        n_bytes = (n_values + 1) // 2
        block = (row * COLS) // HALF_BLOCK                          # (ROWS,) the block of each row
        if EVEN:
            packed = tl.load(packed_ptr + byte)                     # uint8: two 4-bit codes each
        else:
            packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
        # 2. The block constant (c2) of each row, in float32.
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
        if MANUAL_BF16:  # round to nearest even by hand, as the GPU's cvt.rn.bf16.f32 and torch's cast do:
            bits = values.to(tl.uint32, bitcast=True)  # Triton's interpreter casts to bf16 by truncating
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:  # round to nearest even (bf16, fp16) or exact (fp32)
            rounded = values.to(out_ptr.dtype.element_ty)
        if EVEN:
            tl.store(out_ptr + index, rounded)
        else:
            tl.store(out_ptr + index, rounded, mask=index < n_values)


    def _quantize_4bit_kernel(w_ptr, midpoints_ptr, order_ptr, packed_ptr, absmax_ptr, n_values,
                              BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,  # ROWS whole blocks per program
                              N_MID: tl.constexpr,        # midpoints between the used code values (15; 14 for int4)
                              WIDE: tl.constexpr):
        # One row = one block of BLOCKSIZE values, read as (even, odd) pairs: the two halves of each output byte.
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        row = pid * ROWS + tl.arange(0, ROWS)                                  # block number
        pair = row[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]   # byte number
        first, second = 2 * pair, 2 * pair + 1
        x0 = tl.load(w_ptr + first, mask=first < n_values, other=0.0).to(tl.float32)
        x1 = tl.load(w_ptr + second, mask=second < n_values, other=0.0).to(tl.float32)
        # absmax per block (c2). NaN counts as +inf, so that a NaN anywhere leaves a non-finite absmax behind
        # (Triton's max skips NaN) and the caller's finiteness check catches it.
        a0 = tl.where(x0 == x0, tl.abs(x0), float("inf"))
        a1 = tl.where(x1 == x1, tl.abs(x1), float("inf"))
        absmax = tl.reduce(tl.maximum(a0, a1), 1, _MAX)                         # (ROWS,)
        # Scale as the PyTorch code does, bit for bit: whole blocks multiply by the correctly rounded 1/absmax,
        # the last, partial block divides (and stores its absmax clamped to 1e-38, as bitsandbytes does).
        clamped = tl.maximum(absmax, tl.full((ROWS,), 1e-38, tl.float32))  # 1e-38 is below fp32's normal range:
        # as a bare literal Triton would make it (and everything after it) float64
        partial = (row + 1) * BLOCKSIZE > n_values
        inverse = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), clamped)
        s0 = tl.where(partial[:, None], tl.math.div_rn(x0, clamped[:, None]), x0 * inverse[:, None])
        s1 = tl.where(partial[:, None], tl.math.div_rn(x1, clamped[:, None]), x1 * inverse[:, None])
        # Nearest code value: the number of midpoints below the value is its position in sorted order (a value
        # exactly on a midpoint goes to the lower one); `order` maps positions to codes (FP4, Int4).
        p0 = tl.full((ROWS, BLOCKSIZE // 2), 0, tl.int32)
        p1 = tl.full((ROWS, BLOCKSIZE // 2), 0, tl.int32)
        for i in tl.static_range(N_MID):
            mid = tl.load(midpoints_ptr + i)
            p0 += (s0 > mid).to(tl.int32)
            p1 += (s1 > mid).to(tl.int32)
        c0 = tl.load(order_ptr + p0).to(tl.int32)
        c1 = tl.load(order_ptr + p1).to(tl.int32)
        n_bytes = (n_values + 1) // 2
        tl.store(packed_ptr + pair, ((c0 << 4) | c1).to(tl.uint8), mask=pair < n_bytes)
        n_blocks = (n_values + BLOCKSIZE - 1) // BLOCKSIZE
        tl.store(absmax_ptr + row, tl.where(partial, clamped, absmax), mask=row < n_blocks)

    def _matmul_4bit_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, bias_ptr,
                            out_ptr, M, N, stride_xm, stride_om,
                            K: tl.constexpr,  # in_features: one compile per layer width (a model has two or three)
                            BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, WIDE: tl.constexpr, IEEE: tl.constexpr,
                            INTERPRET_BF16: tl.constexpr):
        # out[m, n] = sum_k x[m, k] * W[n, k], W dequantized tile by tile in registers and never written out.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if WIDE:
            rn = rn.to(tl.int64)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            e = rn[None, :] * K + rk[:, None]                     # (BLOCK_K, BLOCK_N): flat index of W[n, k]
            valid = (rk[:, None] < K) & (rn[None, :] < N)
            byte = tl.load(packed_ptr + (e >> 1), mask=valid, other=0)
            nibble = (byte >> (4 - 4 * (e & 1)).to(tl.uint8)) & 15   # even index: high nibble
            block = e // BLOCKSIZE
            if DOUBLE_QUANT:
                q = tl.load(absmax_ptr + block, mask=valid, other=0)
                scale = tl.load(dmap_ptr + q) * tl.load(nested_ptr + block // NESTED_BLOCK, mask=valid,
                                                        other=0.0) + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
            w = tl.load(code_ptr + nibble) * scale
            if INTERPRET_BF16:  # round to nearest even by hand, as the dequantize kernel does there
                bits = w.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                w = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                w = w.to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                         other=0.0)
            if INTERPRET_BF16:  # Triton's interpreter has no bf16 dot: the same exact products, in fp32
                acc += tl.dot(xt.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(xt, w, input_precision="ieee")
            else:
                acc += tl.dot(xt, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if INTERPRET_BF16:  # round to nearest even by hand (see the dequantize kernel)
            bits = acc.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            result = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], result, mask=(rm[:, None] < M) & (rn[None, :] < N))

    def _quantize_constants_kernel(absmax_ptr, offset_ptr, grid_ptr, q_ptr, nested_ptr, n_blocks,
                                   NESTED_BLOCK: tl.constexpr):
        # Double quantization: the fp32 absmax minus their mean, in blocks of 256, to 8-bit codes of the dynamic
        # map, with bitsandbytes' CPU rule as quant._quantize_8bit_cpu_rule writes it (one op at a time, same bits):
        # scale by 1/absmax, clamp to [-1, 1], round onto a grid of 65,536 points and look the code up there.
        pid = tl.program_id(0)
        index = pid * NESTED_BLOCK + tl.arange(0, NESTED_BLOCK)
        valid = index < n_blocks
        x = tl.load(absmax_ptr + index, mask=valid, other=0.0) - tl.load(offset_ptr)
        x = tl.where(valid, x, 0.0)                                  # padding counts as 0, as the PyTorch pad
        nested = tl.reduce(tl.abs(x), 0, _MAX)                       # c1 of this block of constants
        inverse = tl.where(nested > 0, tl.math.div_rn(1.0, nested), 0.0)
        scaled = tl.minimum(tl.maximum(x * inverse, -1.0), 1.0)
        point = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)  # truncates, as .to(torch.int32)
        code = tl.load(grid_ptr + point)
        code = tl.where(nested == 0, 0, code).to(tl.uint8)           # an all-zero block is stored as code 0
        tl.store(q_ptr + index, code, mask=valid)
        tl.store(nested_ptr + pid, nested)


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
                    out: torch.Tensor | None = None, tile_bytes: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """A flat tensor of `n_values` weights in `dtype` from packed 4-bit codes, in one kernel launch.

    Pass `absmax` (fp32, one per block), or for double quantization `qabsmax` (uint8 per block), `dynamic_map`
    (fp32, 256), `nested_absmax` (fp32 per `nested_blocksize` blocks) and `offset` (fp32, one value). `code` is the
    16-entry fp32 table. All tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1), contiguous.
    tile_bytes / num_warps: packed bytes and warps per program (default TILE_BYTES, NUM_WARPS).
    """
    tile_bytes = TILE_BYTES if tile_bytes is None else tile_bytes
    num_warps = NUM_WARPS if num_warps is None else num_warps
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
                 ROWS=rows, COLS=cols, WIDE=n_values > _INT32_LIMIT,
                 EVEN=n_values % (2 * tile_bytes) == 0,
                 MANUAL_BF16=dtype == torch.bfloat16 and device.type == "cpu",
                 num_warps=num_warps, enable_fp_fusion=False)  # no FMA: multiply and add round separately
    return out


def quantize_4bit(flat: torch.Tensor, midpoints: torch.Tensor, order: torch.Tensor, blocksize: int,
                  values_per_program: int = 4096, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes (uint8) and fp32 absmax of a flat fp32/bf16/fp16 tensor, in one kernel launch.

    `midpoints` (fp32, sorted) lie halfway between the used code values; `order` (uint8, 16 entries, padded) maps a
    value's sorted position to its code. Same arithmetic and same bits as `quant._quantize_flat`. A NaN or Inf in a
    block leaves a non-finite absmax, which the caller checks.
    """
    device = flat.device
    why = _why_not(device)
    if why is not None:
        raise RuntimeError(f"the Triton quantize cannot run on {device}: {why}")
    if flat.dtype not in OUT_DTYPES or not flat.is_contiguous() or flat.dim() != 1:
        raise ValueError(f"quantize_4bit needs a flat, contiguous float32/bfloat16/float16 tensor, got {flat.dtype} "
                         f"{tuple(flat.shape)}")
    n = flat.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    rows = max(1, values_per_program // blocksize)
    kernel = _kernel("_quantize_4bit_kernel", device.type == "cpu")
    kernel[(triton.cdiv(blocks, rows),)](flat, midpoints, order, packed, absmax, n, BLOCKSIZE=blocksize, ROWS=rows,
                                         N_MID=midpoints.numel(), WIDE=n > _INT32_LIMIT, num_warps=num_warps,
                                         enable_fp_fusion=False)
    return packed, absmax


# Fused dequantize + matmul for up to SMALL_M tokens. Off (0): on the H200 it measured 213-630 us for one token of a
# 4096x4096 layer, several times slower than dequantize + cuBLAS (the per-element lookups of the flat index and the
# tl.dot on a 16-row tile padded from one token; results/triton/kernels_gpu.md). Kept, tested, for study.
SMALL_M = 0
MATMUL_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, n_out: int, blocksize: int,
                absmax: torch.Tensor | None = None, qabsmax: torch.Tensor | None = None,
                dynamic_map: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                offset: torch.Tensor | None = None, nested_blocksize: int = 256, bias: torch.Tensor | None = None,
                **config) -> torch.Tensor:
    """x @ dequant(W)ᵀ (+ bias) for a few rows of x (generation), without writing the dense W anywhere.

    W is (n_out, x.shape[-1]) stored as the flat packed codes; the weights are dequantized tile by tile in
    registers, rounded to x's dtype and multiplied with fp32 accumulation (the order of the sums differs from
    cuBLAS, so results agree to rounding, not bit for bit).
    """
    device = x.device
    why = _why_not(device)
    if why is not None:
        raise RuntimeError(f"the Triton matmul cannot run on {device}: {why}")
    check_output_dtype(x.dtype, device)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_values = n_out * k
    blocks = -(-n_values // blocksize)
    _check_tensor(packed, "packed", torch.uint8, (n_values + 1) // 2, device)
    _check_tensor(code, "code", torch.float32, 16, device)
    double_quant = absmax is None
    if double_quant:
        _check_tensor(qabsmax, "qabsmax", torch.uint8, blocks, device)
        _check_tensor(nested_absmax, "nested_absmax", torch.float32, -(-blocks // nested_blocksize), device)
        constants, dmap, nested, off = qabsmax, dynamic_map, nested_absmax, offset.reshape(1)
    else:
        _check_tensor(absmax, "absmax", torch.float32, blocks, device)
        constants, dmap, nested, off = absmax, absmax, absmax, absmax
    cfg = {**MATMUL_CONFIG, **config}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    out = torch.empty(m, n_out, dtype=x.dtype, device=device)
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(m, block_m))
    kernel = _kernel("_matmul_4bit_kernel", device.type == "cpu")
    kernel[grid](x2, packed, code, constants, dmap, nested, off, bias if bias is not None else x2, out, m, n_out,
                 x2.stride(0), out.stride(0), K=k, BLOCKSIZE=blocksize, NESTED_BLOCK=nested_blocksize,
                 DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], WIDE=n_values > _INT32_LIMIT, IEEE=x.dtype == torch.float32,
                 INTERPRET_BF16=device.type == "cpu" and x.dtype == torch.bfloat16,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    return out.view(*x.shape[:-1], n_out)


def quantize_constants(absmax: torch.Tensor, offset: torch.Tensor, grid_codes: torch.Tensor,
                       nested_blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 block constants: uint8 codes and fp32 nested absmax, in one kernel launch.

    `offset` is the mean already subtracted by the caller's rule (a 0-d fp32 tensor); `grid_codes` (uint8, 65,536)
    is the code of the dynamic-map value for each grid point. Same bits as `quant._quantize_8bit_cpu_rule`.
    """
    n = absmax.numel()
    q = torch.empty(n, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(-(-n // nested_blocksize), dtype=torch.float32, device=absmax.device)
    kernel = _kernel("_quantize_constants_kernel", absmax.device.type == "cpu")
    kernel[(nested.numel(),)](absmax, offset.reshape(1), grid_codes, q, nested, n, NESTED_BLOCK=nested_blocksize,
                              enable_fp_fusion=False)
    return q, nested
