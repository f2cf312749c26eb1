/* One instruction set's int8 1x1 conv (the "int8" precision), included by fused_impl.h with its macros defined
 * (FUSED_VNNI and QTARGET only in the AVX-512 build). The weights are symmetric per output channel (int8, scale
 * max|W[:, n]| / 127, packed by mobilenet.fused.pack_int8); A is quantized per GEMM call from the values present
 * (dynamic quantization, no calibration): all >= 0 (after a ReLU/ReLU6) gives u8 = round(A / s), s = max / 255, and
 * otherwise u8 = round(A / s) + 128, s = max|A| / 127, the zero point 128 taken back in the epilogue with 128 times
 * the column sum of the weights. The products are summed exactly in int32 (four u8 x s8 products per lane and step:
 * AVX512-VNNI's vpdpbusd, or portable C), then C = (acc - zp * colsum[n]) * (s * scale[n]) + bias[n], clamped, plus
 * the shortcut, stored as float like the fp32 GEMM's. */

/* The dequantization of one call: pointers already at the block's first column. */
typedef struct {
    float sa;
    int zp;
    const int32_t *colsum; /* unused where zp is 0 */
    const float *scale, *bias;
    float lo, hi;
} SFX(qepi_t);

/* The smallest and largest value of A (P rows of K floats, lda apart; 0 counts too) and whether all are finite. */
TARGET static int SFX(scan_range)(const float *a, long lda, int P, int K, float *mn, float *mx) {
    VEC lo = VSET1(0.0f), hi = VSET1(0.0f), poison = VSET1(0.0f), zero = VSET1(0.0f);
    for (int p = 0; p < P; p++) {
        const float *row = a + (long)p * lda;
        int k = 0;
        for (; k + VW <= K; k += VW) {
            VEC v = VLOAD(row + k);
            lo = VMIN(lo, v), hi = VMAX(hi, v);
            poison = VADD(poison, VMUL(v, zero)); /* NaN from a NaN or an infinity, else 0 */
        }
        if (k < K) {
            VEC v = VLOAD_PART(row + k, K - k);
            lo = VMIN(lo, v), hi = VMAX(hi, v);
            poison = VADD(poison, VMUL(v, zero));
        }
    }
    float l[VW], h[VW], z[VW];
    VSTORE(l, lo);
    VSTORE(h, hi);
    VSTORE(z, poison);
    int finite = 1;
    *mn = l[0], *mx = h[0];
    for (int i = 0; i < VW; i++) {
        *mn = l[i] < *mn ? l[i] : *mn;
        *mx = h[i] > *mx ? h[i] : *mx;
        finite &= z[i] == 0.0f;
    }
    return finite;
}

/* The smallest and largest lane of range[0] and range[1] into known[0] and known[1]. */
TARGET static void SFX(reduce_range)(const VEC range[2], float known[2]) {
    float l[VW], h[VW];
    VSTORE(l, range[0]);
    VSTORE(h, range[1]);
    known[0] = l[0], known[1] = h[0];
    for (int i = 1; i < VW; i++) {
        known[0] = l[i] < known[0] ? l[i] : known[0];
        known[1] = h[i] > known[1] ? h[i] : known[1];
    }
}

/* One row of K floats to u8 (q = round-half-even(x * inv) clamped to [qlo, qhi], plus zp), zp up to kpad bytes. */
TARGET static void SFX(quantize_row)(const float *row, int K, long kpad, float inv, float qlo, float qhi, int zp,
                                     uint8_t *q) {
    int k = 0;
#ifdef FUSED_VNNI
    __m512 vinv = _mm512_set1_ps(inv), vlo = _mm512_set1_ps(qlo), vhi = _mm512_set1_ps(qhi);
    __m512i vzp = _mm512_set1_epi32(zp);
    /* cvtps rounds half to even (MXCSR default); a masked narrowing store (vpmovdb to memory) is slow, so 64 values
     * at a time are packed to bytes in registers (the packs interleave 128-bit lanes; the permute undoes it) */
#define QUANTIZE16(p)                                                                                                  \
    _mm512_add_epi32(                                                                                                  \
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(p), vinv), vlo), vhi)), vzp)
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; k + 64 <= K; k += 64) {
        __m512i v0 = QUANTIZE16(row + k), v1 = QUANTIZE16(row + k + 16);
        __m512i v2 = QUANTIZE16(row + k + 32), v3 = QUANTIZE16(row + k + 48);
        __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(v0, v1), _mm512_packs_epi32(v2, v3));
        _mm512_storeu_si512(q + k, _mm512_permutexvar_epi32(order, bytes));
    }
    for (; k + 16 <= K; k += 16) _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(QUANTIZE16(row + k)));
#undef QUANTIZE16
    if (k < K) {
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), vinv);
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t, vlo), vhi)), vzp);
        _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtepi32_epi8(v));
        k = K;
    }
#else
    for (; k < K; k++) {
        float t = row[k] * inv;
        t = t > qlo ? t : qlo;
        t = t < qhi ? t : qhi;
        q[k] = (uint8_t)((int)nearbyintf(t) + zp);
    }
#endif
    for (; k < kpad; k++) q[k] = (uint8_t)zp;
}

/* Quantizes A (P rows of K floats, lda apart) into q (P rows of KPAD4(K) bytes); returns the scale (NaN where A
 * holds a NaN or an infinity: every output of the call is then NaN before its clamp, as in the fp32 GEMM), *zp the
 * zero point. An all-zero A (or one whose largest magnitude is subnormal) has scale 0: every u8 is the zero point.
 * known: A's smallest and largest value (0 included) where its producer tracked them (clamped values: no NaN),
 * else NULL and A is scanned. */
TARGET static float SFX(quantize)(const float *a, long lda, int P, int K, const float *known, uint8_t *q, int *zp) {
    float mn, mx;
    int finite = known ? isfinite(known[0]) && isfinite(known[1]) : SFX(scan_range)(a, lda, P, K, &mn, &mx);
    if (known) mn = known[0], mx = known[1];
    int is_signed = mn < 0.0f;
    float amax = is_signed ? (mx > -mn ? mx : -mn) : mx;
    float scale = amax / (is_signed ? 127.0f : 255.0f);
    float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (!(inv <= FLT_MAX)) scale = inv = 0.0f;
    *zp = is_signed ? 128 : 0;
    long kpad = KPAD4(K);
    if (!finite) {
        memset(q, *zp, (size_t)(P * kpad));
        return NAN;
    }
    float qlo = is_signed ? -127.0f : 0.0f, qhi = is_signed ? 127.0f : 255.0f;
    if (lda == K && kpad == K && (long)P * K <= INT_MAX) /* rows back to back on both sides: one long row */
        SFX(quantize_row)(a, P * K, (long)P * K, inv, qlo, qhi, *zp, q);
    else
        for (int p = 0; p < P; p++) SFX(quantize_row)(a + (long)p * lda, K, kpad, inv, qlo, qhi, *zp, q + p * kpad);
    return scale;
}

/* quantize's asymmetric twin for an input of either sign (the stem's im2col of the normalized image): A's whole
 * span [min, max] (0 included, so the zero padding stays exact) over the 256 levels, s = (max - min) / 255 and u8 =
 * round(A / s) + zp, zp = round(-min / s); a symmetric scale would leave half the levels to the side of 0 that the
 * image barely reaches. Same NaN, zero and overflow handling as quantize. */
TARGET static float SFX(quantize_span)(const float *a, int P, int K, uint8_t *q, int *zp) {
    float mn, mx;
    int finite = SFX(scan_range)(a, K, P, K, &mn, &mx);
    float scale = mx / 255.0f - mn / 255.0f; /* no overflow where max - min would */
    float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (!(inv <= FLT_MAX)) scale = inv = 0.0f;
    long kpad = KPAD4(K);
    if (!finite) { /* mn or mx may be NaN: no zero point from them */
        *zp = 0;
        memset(q, 0, (size_t)(P * kpad));
        return NAN;
    }
    float shift = nearbyintf(-mn * inv); /* mn <= 0, so within [0, 255] but for rounding */
    *zp = shift > 255.0f ? 255 : shift < 0.0f ? 0 : (int)shift;
    for (int p = 0; p < P; p++)
        SFX(quantize_row)(a + (long)p * K, K, kpad, inv, (float)-*zp, (float)(255 - *zp), *zp, q + p * kpad);
    return scale;
}

/* One pixel's dequantized output (valid columns of the block): scalar, shared by the portable micro-kernel. */
static inline void SFX(qstore)(const int32_t *acc, const SFX(qepi_t) *E, int valid, float *c, const float *r) {
    for (int n = 0; n < valid; n++) {
        int32_t corrected = acc[n] - (E->zp ? E->zp * E->colsum[n] : 0);
        float v = (float)corrected * (E->sa * E->scale[n]) + E->bias[n];
        v = v > E->lo ? v : E->lo; /* max then min, as the vector clamps: NaN becomes lo */
        v = v < E->hi ? v : E->hi;
        c[n] = r ? v + r[n] : v;
    }
}

/* m <= 4 pixels x one panel (PANEL columns) in portable C: every build has it; the AVX2 build and an AVX-512 CPU
 * without VNNI run the int8 precision on it. */
#define QROWS_PORTABLE 4
TARGET static void SFX(qmicro_portable)(const uint8_t *a, long lda, int groups, const int8_t *w, const SFX(qepi_t) *E,
                                        int m, int valid, float *const *cptr, const float *const *rptr) {
    int32_t acc[QROWS_PORTABLE][PANEL] = {{0}};
    for (int g = 0; g < groups; g++) {
        const int8_t *wg = w + (long)g * PANEL * 4;
        for (int i = 0; i < m; i++) {
            const uint8_t *ai = a + (long)i * lda + 4 * g;
            int32_t a0 = ai[0], a1 = ai[1], a2 = ai[2], a3 = ai[3];
            for (int n = 0; n < PANEL; n++)
                acc[i][n] += a0 * wg[4 * n] + a1 * wg[4 * n + 1] + a2 * wg[4 * n + 2] + a3 * wg[4 * n + 3];
        }
    }
    for (int i = 0; i < m; i++) SFX(qstore)(acc[i], E, valid, cptr[i], rptr ? rptr[i] : NULL);
}

typedef void (*SFX(qmicro_t))(const uint8_t *, long, int, const int8_t *, const SFX(qepi_t) *, int, int,
                              float *const *, const float *const *);

#ifdef FUSED_VNNI
/* Accumulators are named variables, one pair per row (VNNI_ROWS lists the rows): GCC 12 keeps an array of them that
 * vpdpbusd updates in memory, copying and spilling every accumulator on every step. */
#define VNNI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define VNNI_DECLARE(i) __m512i acc##i##_0 = _mm512_setzero_si512(), acc##i##_1 = _mm512_setzero_si512();
/* Row i of the group at byte offset four_g: broadcast its four u8 and add their products with w0 (and w1) (vpdpbusd:
 * per int32 lane, the sum of four u8 x s8 products, without saturation). */
#define VNNI_STEP(i)                                                                                                   \
    if (i < vnni_rows) {                                                                                               \
        int32_t four;                                                                                                  \
        memcpy(&four, a + (long)(i) * lda + four_g, 4);                                                                \
        __m512i av = _mm512_set1_epi32(four);                                                                          \
        acc##i##_0 = _mm512_dpbusd_epi32(acc##i##_0, av, w0);                                                          \
        if (vnni_vecs > 1) acc##i##_1 = _mm512_dpbusd_epi32(acc##i##_1, av, w1);                                       \
    }
#define VNNI_SAVE(i)                                                                                                   \
    if (i < vnni_rows) acc[i][0] = acc##i##_0, acc[i][1] = acc##i##_1;

/* The dequantization of columns [16j, 16j + 16) of a panel: scale (sa * scale[n]), bias, the zero point's correction
 * (zp * colsum[n]) and the mask of the valid columns (0: none). */
typedef struct {
    __m512 scale, bias;
    __m512i corr;
    __mmask16 mask;
} SFX(vnni_epi_t);

QTARGET static inline SFX(vnni_epi_t) SFX(vnni_epilogue)(const SFX(qepi_t) *E, int valid, int j) {
    SFX(vnni_epi_t) D;
    int left = valid - j * 16;
    D.mask = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
    D.scale = _mm512_mul_ps(_mm512_set1_ps(E->sa), _mm512_loadu_ps(E->scale + j * 16));
    D.bias = _mm512_maskz_loadu_ps(D.mask, E->bias + j * 16);
    D.corr = E->zp ? _mm512_mullo_epi32(_mm512_set1_epi32(E->zp), _mm512_loadu_si512(E->colsum + j * 16))
                   : _mm512_setzero_si512();
    return D;
}

/* ROWS_ pixels x VECS_ vectors of 16 int32 of one panel (VECS_ 1: its first 16 columns, for a panel with no more
 * valid): vpdpbusd adds, per lane, the four u8 x s8 products of one group of four input channels; at most 24
 * accumulators, 2 weight vectors and the broadcast of 32 zmm registers. */
#define DEFINE_VNNI_MICROKERNEL(NAME, ROWS_, VECS_)                                                                    \
    QTARGET static void NAME(const uint8_t *a, long lda, int groups, const int8_t *w, const SFX(qepi_t) *E, int m,    \
                             int valid, float *const *cptr, const float *const *rptr) {                               \
        enum { vnni_rows = ROWS_, vnni_vecs = VECS_ };                                                                 \
        VNNI_ROWS(VNNI_DECLARE)                                                                                        \
        for (int g = 0; g < groups; g++) {                                                                             \
            __m512i w0 = _mm512_loadu_si512(w + (long)g * PANEL * 4);                                                  \
            __m512i w1 = vnni_vecs > 1 ? _mm512_loadu_si512(w + (long)g * PANEL * 4 + 64) : w0;                        \
            int four_g = 4 * g;                                                                                        \
            VNNI_ROWS(VNNI_STEP)                                                                                       \
        }                                                                                                              \
        __m512i acc[QROWS][2];                                                                                         \
        VNNI_ROWS(VNNI_SAVE)                                                                                           \
        SFX(vnni_epi_t) D[2] = {SFX(vnni_epilogue)(E, valid, 0), SFX(vnni_epilogue)(E, valid, 1)};                   \
        __m512 vlo = _mm512_set1_ps(E->lo), vhi = _mm512_set1_ps(E->hi);                                              \
        for (int i = 0; i < ROWS_; i++) {                                                                              \
            if (i >= m) break;                                                                                         \
            for (int j = 0; j < vnni_vecs; j++) {                                                                      \
                if (!D[j].mask) break;                                                                                 \
                __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], D[j].corr));                                 \
                v = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(v, D[j].scale, D[j].bias), vlo), vhi);                \
                if (rptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(D[j].mask, rptr[i] + j * 16));                    \
                _mm512_mask_storeu_ps(cptr[i] + j * 16, D[j].mask, v);                                                 \
            }                                                                                                          \
        }                                                                                                              \
    }
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni), QROWS, 2)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_8), 8, 2)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_4), 4, 2)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_2), 2, 2)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_1), 1, 2)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_one), QROWS, 1)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_one_8), 8, 1)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_one_4), 4, 1)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_one_2), 2, 1)
DEFINE_VNNI_MICROKERNEL(SFX(qmicro_vnni_one_1), 1, 1)
#endif

/* The micro-kernel for a block of at most m pixels and `valid` columns of a panel, and its pixel rows: VNNI where
 * the CPU has it (the fewest rows of 1, 2, 4, 8 or QROWS that hold m; one vector wide where valid <= 16), else the
 * portable one. */
TARGET static SFX(qmicro_t) SFX(pick_qmicro)(int m, int valid, int *rows) {
#ifdef FUSED_VNNI
    if (cpu_has_vnni) {
        static const SFX(qmicro_t) two[5] = {SFX(qmicro_vnni_1), SFX(qmicro_vnni_2), SFX(qmicro_vnni_4),
                                              SFX(qmicro_vnni_8), SFX(qmicro_vnni)};
        static const SFX(qmicro_t) one[5] = {SFX(qmicro_vnni_one_1), SFX(qmicro_vnni_one_2), SFX(qmicro_vnni_one_4),
                                              SFX(qmicro_vnni_one_8), SFX(qmicro_vnni_one)};
        int index = m <= 1 ? 0 : m <= 2 ? 1 : m <= 4 ? 2 : m <= 8 ? 3 : 4;
        static const int row_counts[5] = {1, 2, 4, 8, QROWS};
        *rows = row_counts[index];
        return valid <= 16 ? one[index] : two[index];
    }
#endif
    *rows = QROWS_PORTABLE;
    return SFX(qmicro_portable);
}

/* Column sums of N columns over all of W's (KPAD4(K)) rows into sum: for a call over a slice of K rows. */
TARGET static void SFX(qcolsum)(const qmat_t *W, int K, int N, int32_t *sum) {
    long groups = KPAD4(K) / 4;
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        const int8_t *panel = W->w + (long)(n0 / PANEL) * W->panel_bytes;
        for (int n = 0; n < PANEL; n++) sum[n0 + n] = 0;
        for (long g = 0; g < groups; g++)
            for (int n = 0; n < PANEL; n++) {
                const int8_t *four = panel + (g * PANEL + n) * 4;
                sum[n0 + n] += four[0] + four[1] + four[2] + four[3];
            }
    }
}

/* The int8 GEMM of an A already quantized (qa: P rows of KPAD4(K) bytes, scale sa, zero point zp; QROWS readable
 * rows after them): each panel of W swept over every block of pixels, output as gemm's. */
TARGET static void SFX(gemm_q_run)(const uint8_t *qa, int P, int K, float sa, int zp, const qmat_t *W,
                                   const float *bias, int N, float lo, float hi, float *c, long ldc, int cw,
                                   long c_row, const float *r, long ldr, const scratch_t *S) {
    SFX(qepi_t) E;
    E.sa = sa, E.zp = zp;
    E.lo = lo, E.hi = hi;
    const int32_t *colsum = W->colsum;
    if (E.zp && !colsum) {
        SFX(qcolsum)(W, K, N, S->qsum);
        colsum = S->qsum;
    }
    long ldq = KPAD4(K);
    for (int p = 0, x = 0; p < P; p++, x = x + 1 == cw ? 0 : x + 1) /* no division per pixel and panel */
        S->qoff[p] = x ? S->qoff[p - 1] + ldc : (long)(p / cw) * c_row;
    float *cptr[QROWS];
    const float *rptr[QROWS];
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        int valid = N - n0 < PANEL ? N - n0 : PANEL;
        const int8_t *panel = W->w + (long)(n0 / PANEL) * W->panel_bytes;
        E.colsum = colsum ? colsum + n0 : NULL;
        E.scale = W->scale + n0;
        E.bias = bias + n0;
        for (int p0 = 0; p0 < P;) {
            int rows;
            SFX(qmicro_t) micro = SFX(pick_qmicro)(P - p0, valid, &rows);
            int m = P - p0 < rows ? P - p0 : rows;
            for (int i = 0; i < m; i++) {
                int p = p0 + i;
                cptr[i] = c + S->qoff[p] + n0;
                rptr[i] = r ? r + (long)p * ldr + n0 : NULL;
            }
            micro(qa + (long)p0 * ldq, ldq, (int)(ldq / 4), panel, &E, m, valid, cptr, r ? rptr : NULL);
            p0 += m;
        }
    }
}

/* The int8 twin of gemm (same A, output and shortcut addressing, same result up to quantization): A quantized once
 * into S->qa (known: its range, see quantize), then gemm_q_run. */
TARGET static void SFX(gemm_q)(const float *a, long lda, int P, int K, const qmat_t *W, const float *bias, int N,
                               float lo, float hi, float *c, long ldc, int cw, long c_row, const float *r, long ldr,
                               const float *known, const scratch_t *S) {
    int zp;
    float sa = SFX(quantize)(a, lda, P, K, known, S->qa, &zp);
    SFX(gemm_q_run)(S->qa, P, K, sa, zp, W, bias, N, lo, hi, c, ldc, cw, c_row, r, ldr, S);
}

/* The head's input quantized once, before its chunks (each a slice of the output channels) share it: tile t of
 * HEAD_PIX pixels of image img as one GEMM call's A, at H->qa + (img * p + t * HEAD_PIX) * KPAD4(k), its scale and
 * zero point at H->qsa[img * tiles + t], H->qzp[...]. */
TARGET static void SFX(head_quantize)(const head_t *H, uint8_t *qa, float *qsa, int *qzp) {
    int tiles = (H->p + HEAD_PIX - 1) / HEAD_PIX;
    long kpad = KPAD4(H->k);
    for (int img = 0; img < H->n; img++) {
        for (int t = 0; t < tiles; t++) {
            int p0 = t * HEAD_PIX, m = H->p - p0 < HEAD_PIX ? H->p - p0 : HEAD_PIX;
            qsa[img * tiles + t] = SFX(quantize)(H->in + ((long)img * H->p + p0) * H->k, H->k, m, H->k, NULL,
                                                  qa + ((long)img * H->p + p0) * kpad, &qzp[img * tiles + t]);
        }
    }
}
