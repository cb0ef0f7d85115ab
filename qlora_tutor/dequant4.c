/* 4-bit blockwise dequantization in one pass: the optional native fast path of qlora_tutor.quant.

   What it computes is exactly what QuantizedTensor.dequantize(backend="torch") computes in PyTorch, and the tests
   hold the two (and bitsandbytes) equal bit for bit:

       scale[b]   = absmax[b]                                          (fp32 constants), or
       scale[b]   = (dynamic_map[qabsmax[b]] * nested[b / nested_bs]) + offset     (double quantization)
       out[i]     = round_to(out dtype, code[c_i] * scale[i / blocksize])          (one fp32 multiply, one rounding)

   where c_i is the high nibble of byte i/2 for even i and the low nibble for odd i. Every fp32 operation is done
   separately and rounded (built with -ffp-contract=off: a fused multiply-add would round once and differ).

   Why C: PyTorch has no single op that looks up 4-bit codes and scales them, so the PyTorch version makes several
   memory passes (a lookup, a multiply, and for 16-bit output a cast); bitsandbytes' CPU kernel makes one. This
   file makes one too. On x86-64 with AVX-512 it scales the 16 code values once per block, keeps them in one vector
   register and looks 16 codes up at once with a permute (vpermps); for bf16/fp16 output it rounds those 16 values
   once per block and looks 32 codes up at once (vpermw). Elsewhere a plain loop does the same arithmetic.

   No Python headers, no torch headers: Python loads it with ctypes and passes data pointers. */

#define _DEFAULT_SOURCE  /* madvise and MADV_HUGEPAGE under -std=c99 */
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

/* fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (what PyTorch's conversion gives). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* fp32 -> IEEE fp16, round to nearest even, with subnormals, overflow to Inf and NaN kept quiet. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return sign | 0x7E00;           /* NaN */
    if (ax >= 0x477FF000u) return sign | 0x7C00;          /* >= 65520 rounds to Inf (as does Inf) */
    if (ax < 0x38800000u) {                               /* below 2^-14: an fp16 subnormal (or zero) */
        /* adding 0.5 (whose fp32 ulp is 2^-24, the fp16 subnormal step) lets the FPU round to nearest even */
        float v, half = 0.5f, sum;
        uint32_t s, h;
        memcpy(&v, &ax, 4);
        sum = v + half;
        memcpy(&s, &sum, 4);
        memcpy(&h, &half, 4);
        return sign | (uint16_t)(s - h);
    }
    ax += ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((ax >> 13) & 1u);  /* rebias, round to nearest even */
    return sign | (uint16_t)(ax >> 13);
}

static inline void store(void *out, int kind, int64_t i, float v) {
    if (kind == OUT_F32) ((float *)out)[i] = v;
    else if (kind == OUT_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((uint16_t *)out)[i] = f32_to_f16(v);
}

/* Index of the nested constant of block b: a shift when nested_bs is a power of two (always, in practice), since
   a 64-bit division per block would cost about as much as dequantizing the block. */
static inline int64_t nested_index(int64_t b, int64_t nested_bs, int shift) {
    return shift >= 0 ? b >> shift : b / nested_bs;
}

static int power_of_two_shift(int64_t v) {
    for (int k = 0; k < 63; k++)
        if (((int64_t)1 << k) == v) return k;
    return -1;
}

static inline float block_scale(const float *absmax, const uint8_t *qabsmax, const float *dynamic_map,
                                const float *nested, int64_t nested_bs, int shift, float offset, int64_t b) {
    if (absmax) return absmax[b];
    float v = dynamic_map[qabsmax[b]];
    v = v * nested[nested_index(b, nested_bs, shift)];
    return v + offset;
}

/* Values [start, stop) of one block whose scale is s; start is even (blocks start on a byte). */
static void block_scalar(const uint8_t *packed, const float *code, float s, void *out, int kind,
                         int64_t start, int64_t stop) {
    float t[16];
    for (int k = 0; k < 16; k++) t[k] = code[k] * s;
    int64_t i = start;
    for (; i + 1 < stop; i += 2) {
        uint8_t byte = packed[i >> 1];
        store(out, kind, i, t[byte >> 4]);
        store(out, kind, i + 1, t[byte & 15]);
    }
    if (i < stop) store(out, kind, i, t[packed[i >> 1] >> 4]);  /* odd total size: the last high nibble */
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512_PATH 1

/* 16 fp32 values rounded to bf16 or fp16 (16-bit lanes), as f32_to_bf16 / f32_to_f16 do one at a time. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m256i to_16bit(__m512 v, int kind) {
    if (kind == OUT_BF16) {  /* the integer rounding of f32_to_bf16 */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0)));
    }
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* nearest even, with subnormals */
}

/* Blocks [block_start, block_stop), each whole block 32 values at a time (bs is a multiple of 32).
   stream: non-temporal stores, which write whole cache lines to memory without first reading them in. That saves
   a third of the memory traffic when the output's pages are already mapped; on fresh pages it is slower (measured
   on the 2-core test machine), so the caller decides. `out` must then be 64-byte aligned. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void run_avx512(const uint8_t *packed, const float *code, const float *absmax, const uint8_t *qabsmax,
                       const float *dynamic_map, const float *nested, int64_t nested_bs, float offset,
                       void *out, int kind, int64_t n, int64_t bs, int64_t block_start, int64_t block_stop,
                       int stream) {
    const __m512 code_v = _mm512_loadu_ps(code);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i low4 = _mm512_set1_epi32(15);
    const int shift = power_of_two_shift(nested_bs);
    for (int64_t b = block_start; b < block_stop; b++) {
        float s = block_scale(absmax, qabsmax, dynamic_map, nested, nested_bs, shift, offset, b);
        int64_t start = b * bs;
        if (start + bs > n) {  /* the partial last block */
            block_scalar(packed, code, s, out, kind, start, n);
            continue;
        }
        const __m512 t = _mm512_mul_ps(code_v, _mm512_set1_ps(s));  /* the 16 scaled values, as in block_scalar */
        if (kind == OUT_F32) {
            for (int64_t i = start; i < start + bs; i += 32) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + (i >> 1))));
                __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), t);   /* values at even positions */
                __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), t);  /* values at odd positions */
                __m512 even = _mm512_permutex2var_ps(hi, first, lo), odd = _mm512_permutex2var_ps(hi, second, lo);
                if (stream) {
                    _mm512_stream_ps((float *)out + i, even);
                    _mm512_stream_ps((float *)out + i + 16, odd);
                } else {
                    _mm512_storeu_ps((float *)out + i, even);
                    _mm512_storeu_ps((float *)out + i + 16, odd);
                }
            }
        } else {
            /* 16-bit output: round the 16 scaled values once per block (the same rounding each element would get),
               then look 32 codes up at once in 16-bit lanes. Byte k becomes the 32-bit lane (low << 16) | high,
               i.e. the 16-bit lanes 2k = high nibble and 2k + 1 = low nibble: already in output order. */
            const __m512i table = _mm512_castsi256_si512(to_16bit(t, kind));
            for (int64_t i = start; i < start + bs; i += 32) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + (i >> 1))));
                __m512i codes = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                                _mm512_slli_epi32(_mm512_and_si512(bytes, low4), 16));
                __m512i values = _mm512_permutexvar_epi16(codes, table);
                if (stream) _mm512_stream_si512((void *)((uint16_t *)out + i), values);
                else _mm512_storeu_si512((void *)((uint16_t *)out + i), values);
            }
        }
    }
    if (stream) _mm_sfence();  /* non-temporal stores are weakly ordered: finish them before returning */
}
#endif

/* 1 if this build has the AVX-512 path and the CPU can run it. */
int qt_has_avx512(void) {
#ifdef HAVE_AVX512_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

/* Blocks [block_start, block_stop) on the calling thread. */
static void run(const uint8_t *packed, const float *code, const float *absmax, const uint8_t *qabsmax,
                const float *dynamic_map, const float *nested, int64_t nested_bs, float offset, void *out, int kind,
                int64_t n, int64_t bs, int64_t block_start, int64_t block_stop, int use_avx512, int stream) {
#ifdef HAVE_AVX512_PATH
    if (use_avx512 && bs % 32 == 0) {
        run_avx512(packed, code, absmax, qabsmax, dynamic_map, nested, nested_bs, offset, out, kind, n, bs,
                   block_start, block_stop, stream);
        return;
    }
#endif
    (void)use_avx512;
    (void)stream;
    const int shift = power_of_two_shift(nested_bs);
    for (int64_t b = block_start; b < block_stop; b++) {
        float s = block_scale(absmax, qabsmax, dynamic_map, nested, nested_bs, shift, offset, b);
        int64_t start = b * bs, stop = start + bs < n ? start + bs : n;
        block_scalar(packed, code, s, out, kind, start, stop);
    }
}

/* 1 if built with OpenMP (threads), else 0. */
int qt_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Dequantize all n values: absmax (fp32 per block) or, when it is NULL, qabsmax + dynamic_map + nested + offset
   (double quantization). use_avx512 = 0 forces the plain loop; stream = 1 uses non-temporal stores in the AVX-512
   loop (see run_avx512). The blocks are split into `threads` contiguous ranges, one per OpenMP thread; built with
   OpenMP, this library uses the OpenMP runtime PyTorch already loaded (same libgomp), so its threads are PyTorch's
   own and do not compete with them for the cores. */
void qt_dequantize_4bit(const uint8_t *packed, const float *code, const float *absmax, const uint8_t *qabsmax,
                        const float *dynamic_map, const float *nested, int64_t nested_bs, float offset,
                        void *out, int kind, int64_t n, int64_t bs, int use_avx512, int stream, int threads) {
    const int64_t blocks = (n + bs - 1) / bs;
    if (threads > blocks) threads = (int)blocks;
    if (threads <= 1) {  /* no parallel region at all (also safe in a forked child whose parent used OpenMP) */
        run(packed, code, absmax, qabsmax, dynamic_map, nested, nested_bs, offset, out, kind, n, bs, 0, blocks,
            use_avx512, stream);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int t = 0; t < threads; t++) {
        int64_t lo = blocks * t / threads, hi = blocks * (t + 1) / threads;
        run(packed, code, absmax, qabsmax, dynamic_map, nested, nested_bs, offset, out, kind, n, bs, lo, hi,
            use_avx512, stream);
    }
}

/* 1 if the page holding the first 2 MiB boundary inside [p, p + nbytes) is mapped (resident), 0 if not (fresh
   memory: the first write will fault), -1 if it cannot be told (not Linux, range smaller than 2 MiB, error). */
int qt_is_resident(void *p, int64_t nbytes) {
#if defined(__linux__)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    unsigned char resident = 0;
    if (nbytes < 0 || start + huge > (uintptr_t)p + (uintptr_t)nbytes) return -1;
    if (mincore((void *)start, 4096, &resident) != 0) return -1;
    return resident & 1;
#else
    (void)p;
    (void)nbytes;
    return -1;
#endif
}

/* Ask Linux to back [p, p + nbytes) with 2 MiB pages (transparent huge pages) before it is first written. A fresh
   64 MiB output otherwise costs 16,384 page faults of 4 KiB, which take most of the time of a dequantize here.
   Only fresh memory is advised (memory the allocator recycled is already mapped and costs no faults), and only its
   2 MiB-aligned inside. Returns 0 when advised, 1 when skipped (resident), -1 where unsupported or on error. */
int qt_advise_huge_pages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1), stop = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    int resident = qt_is_resident(p, nbytes);
    if (resident != 0) return resident;
    return madvise((void *)start, stop - start, MADV_HUGEPAGE) == 0 ? 0 : -1;
#else
    (void)p;
    (void)nbytes;
    return -1;
#endif
}
