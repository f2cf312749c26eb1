/* One instruction set's kernels. fused.c includes this file once per instruction set, with SFX (the name suffix),
 * TARGET (the function attribute), VEC/VW (vector type and width in floats), MR/NB (the GEMM micro-kernel's pixel
 * rows and output vectors) and the vector operations defined.
 *
 * Layout: NHWC. A "ring" row holds one row of the expanded tensor (V2) or of the block input (t = 1 and V1) with a
 * zero pixel on each side (the depthwise conv's padding) and cpad floats per pixel; the depthwise output of a tile
 * of output rows is dense (pixels x cpad). */

/* C[p][n] = clamp(bias[n] + sum_k A[p][k] B[k][n]) (+ R[p][n]) for MR pixels and NBV vectors of output channels
 * starting at column 0 of b/bias and of the pointers; only `valid` floats of the block are stored, only m rows. */
#define DEFINE_MICROKERNEL(NAME, NBV, ROWS)                                                                               \
    TARGET static void NAME(const float *a, long lda, int K, const float *b, long ldb, const float *bias, int m,     \
                            int valid, float lo, float hi, float *const *cptr, const float *const *rptr) {          \
        VEC acc[ROWS][NBV];                                                                                         \
        for (int j = 0; j < NBV; j++) {                                                                             \
            VEC bv = VLOAD(bias + j * VW);                                                                          \
            for (int i = 0; i < ROWS; i++) acc[i][j] = bv;                                                          \
        }                                                                                                           \
        for (int k = 0; k < K; k++) {                                                                               \
            VEC bv[NBV];                                                                                            \
            for (int j = 0; j < NBV; j++) bv[j] = VLOAD(b + (long)k * ldb + j * VW);                                \
            for (int i = 0; i < ROWS; i++) {                                                                        \
                VEC av = VSET1(a[(long)i * lda + k]);                                                               \
                for (int j = 0; j < NBV; j++) acc[i][j] = VFMA(av, bv[j], acc[i][j]);                               \
            }                                                                                                       \
        }                                                                                                           \
        VEC vlo = VSET1(lo), vhi = VSET1(hi);                                                                       \
        for (int i = 0; i < ROWS; i++) {                                                                            \
            if (i >= m) break;                                                                                      \
            for (int j = 0; j < NBV; j++) {                                                                         \
                int left = valid - j * VW;                                                                          \
                if (left <= 0) break;                                                                               \
                VEC v = VMIN(VMAX(acc[i][j], vlo), vhi);                                                            \
                if (left >= VW) {                                                                                   \
                    if (rptr) v = VADD(v, VLOAD(rptr[i] + j * VW));                                                 \
                    VSTORE(cptr[i] + j * VW, v);                                                                    \
                } else {                                                                                            \
                    if (rptr) v = VADD(v, VLOAD_PART(rptr[i] + j * VW, left));                                      \
                    VSTORE_PART(cptr[i] + j * VW, v, left);                                                         \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }

DEFINE_MICROKERNEL(SFX(micro_full), NB, MR)
DEFINE_MICROKERNEL(SFX(micro_one), 1, MR)
/* A last block of m < MR pixels (a 7-pixel row is 49 = 4 x 12 + 1 pixels, a 14-pixel row 14 = 12 + 2) computes the
 * fewest rows of 1, 2, 4, 8 or MR that hold it: no FMAs on padded rows. */
DEFINE_MICROKERNEL(SFX(micro_full_1), NB, 1)
DEFINE_MICROKERNEL(SFX(micro_one_1), 1, 1)
DEFINE_MICROKERNEL(SFX(micro_full_2), NB, 2)
DEFINE_MICROKERNEL(SFX(micro_one_2), 1, 2)
#if MR > 4
DEFINE_MICROKERNEL(SFX(micro_full_4), NB, 4)
DEFINE_MICROKERNEL(SFX(micro_one_4), 1, 4)
#endif
#if MR > 8
DEFINE_MICROKERNEL(SFX(micro_full_8), NB, 8)
DEFINE_MICROKERNEL(SFX(micro_one_8), 1, 8)
#endif

typedef void (*SFX(micro_t))(const float *, long, int, const float *, long, const float *, int, int, float, float,
                             float *const *, const float *const *);

/* The micro-kernels (NB vectors wide, or one vector wide) with the fewest rows that hold m pixels; *rows gets that
 * row count. */
TARGET static void SFX(pick_micro)(int m, int *rows, SFX(micro_t) *full, SFX(micro_t) *one) {
    *rows = MR, *full = SFX(micro_full), *one = SFX(micro_one);
    if (m <= 1) *rows = 1, *full = SFX(micro_full_1), *one = SFX(micro_one_1);
    else if (m <= 2) *rows = 2, *full = SFX(micro_full_2), *one = SFX(micro_one_2);
#if MR > 4
    else if (m <= 4) *rows = 4, *full = SFX(micro_full_4), *one = SFX(micro_one_4);
#endif
#if MR > 8
    else if (m <= 8) *rows = 8, *full = SFX(micro_full_8), *one = SFX(micro_one_8);
#endif
}

/* The 1x1 conv of P pixels as a GEMM: A pixel p at a + p*lda (K floats), B in panels of PANEL columns (each K rows
 * of PANEL floats, contiguous, zero padded; bpanel floats from one panel to the next: no power-of-two row stride
 * that would map a panel's rows onto a few cache sets), output
 * pixel p at c + (p / cw) * c_row + (p % cw) * ldc (N floats), residual pixel p at r + p*ldr. Column blocks outer so
 * a K x NB*VW panel of B is reused by every pixel of the tile; a last partial block of pixels is copied into apad
 * (MR x K) so the micro-kernel always reads whole blocks (MR rows, or the fewest rows that hold a short last block,
 * see pick_micro). */
TARGET static void SFX(gemm)(const float *a, long lda, int P, int K, const float *b, long bpanel, const float *bias,
                             int N, float lo, float hi, float *c, long ldc, int cw, long c_row, const float *r,
                             long ldr, float *apad) {
    float *cptr[MR];
    const float *rptr[MR];
    for (int n0 = 0; n0 < N; n0 += NB * VW) {
        int valid = N - n0 < NB * VW ? N - n0 : NB * VW;
        const float *bblock = b + (long)(n0 / PANEL) * bpanel + n0 % PANEL;
        for (int p0 = 0; p0 < P; p0 += MR) {
            int m = P - p0 < MR ? P - p0 : MR;
            const float *ablock = a + (long)p0 * lda;
            long lda_block = lda;
            int rows;
            SFX(micro_t) full, one;
            SFX(pick_micro)(m, &rows, &full, &one);
            if (m < rows) {
                for (int i = 0; i < rows; i++) {
                    if (i < m)
                        memcpy(apad + (long)i * K, a + (long)(p0 + i) * lda, sizeof(float) * (size_t)K);
                    else
                        memset(apad + (long)i * K, 0, sizeof(float) * (size_t)K);
                }
                ablock = apad;
                lda_block = K;
            }
            for (int i = 0; i < m; i++) {
                int p = p0 + i;
                cptr[i] = c + (long)(p / cw) * c_row + (long)(p % cw) * ldc + n0;
                rptr[i] = r ? r + (long)p * ldr + n0 : NULL;
            }
            if (valid > (NB - 1) * VW) {
                full(ablock, lda_block, K, bblock, PANEL, bias + n0, m, valid, lo, hi, cptr, r ? rptr : NULL);
            } else {
                for (int j = 0; j * VW < valid; j++) {
                    float *cj[MR];
                    const float *rj[MR];
                    for (int i = 0; i < m; i++) {
                        cj[i] = cptr[i] + j * VW;
                        rj[i] = r ? rptr[i] + j * VW : NULL;
                    }
                    one(ablock, lda_block, K, bblock + j * VW, PANEL, bias + n0 + j * VW, m,
                                   valid - j * VW, lo, hi, cj, r ? rj : NULL);
                }
            }
        }
    }
}

#include "fused_int8.h"

/* One output pixel at an edge of the row: only the taps inside the win-pixel input row (the padding is zeros). */
TARGET static VEC SFX(depthwise_edge)(const float *const r[3], int ox, int stride, int cpad, int win, const VEC w[9],
                                      VEC acc) {
    for (int ky = 0; ky < 3; ky++) {
        for (int kx = 0; kx < 3; kx++) {
            int x = ox * stride - 1 + kx;
            if (x >= 0 && x < win) acc = VFMA(VLOAD(r[ky] + (long)(x + 1) * cpad), w[ky * 3 + kx], acc);
        }
    }
    return acc;
}

/* One output row of the 3x3 depthwise conv (pad 1): rows[ky] are the three input rows, pixel 0 being the column left
 * of the image, out gets wout pixels ldo floats apart. From the ring (edges 0) that column and the one right of the image are
 * zeros, so no pixel needs a bounds check; read straight from the block's input (edges 1) they are the neighbouring
 * rows' pixels (or outside the tensor) and the first and last output pixels take only the taps inside the image.
 * The nine weights of a channel vector stay in registers while the row is swept. Where range is not NULL, the
 * smallest and largest output go into range[0] and range[1] too (the int8 projection's quantization range). */
TARGET static inline __attribute__((always_inline)) void SFX(depthwise_row_impl)(
    const float *const rows[3], int wout, int stride, int C, int cpad, int win, int edges, const float *wd,
    const float *bd, float lo, float hi, long ldo, float *out, VEC *range) {
    VEC vlo = VSET1(lo), vhi = VSET1(hi);
    VEC rmin = VSET1(0.0f), rmax = VSET1(0.0f); /* in registers: range may alias out */
    int x_lo = edges ? 1 : 0;
    int x_hi = edges && (wout - 1) * stride + 1 >= win ? wout - 1 : wout;
    for (int c0 = 0; c0 < C; c0 += VW) {
        VEC w0 = VLOAD(wd + 0 * cpad + c0), w1 = VLOAD(wd + 1 * cpad + c0), w2 = VLOAD(wd + 2 * cpad + c0);
        VEC w3 = VLOAD(wd + 3 * cpad + c0), w4 = VLOAD(wd + 4 * cpad + c0), w5 = VLOAD(wd + 5 * cpad + c0);
        VEC w6 = VLOAD(wd + 6 * cpad + c0), w7 = VLOAD(wd + 7 * cpad + c0), w8 = VLOAD(wd + 8 * cpad + c0);
        VEC bias = VLOAD(bd + c0);
        long step = (long)stride * cpad;
        const float *r0 = rows[0] + c0 + x_lo * step, *r1 = rows[1] + c0 + x_lo * step;
        const float *r2 = rows[2] + c0 + x_lo * step;
        for (int ox = x_lo; ox < x_hi; ox++) {
            VEC acc = bias;
            acc = VFMA(VLOAD(r0), w0, acc);
            acc = VFMA(VLOAD(r0 + cpad), w1, acc);
            acc = VFMA(VLOAD(r0 + 2 * cpad), w2, acc);
            acc = VFMA(VLOAD(r1), w3, acc);
            acc = VFMA(VLOAD(r1 + cpad), w4, acc);
            acc = VFMA(VLOAD(r1 + 2 * cpad), w5, acc);
            acc = VFMA(VLOAD(r2), w6, acc);
            acc = VFMA(VLOAD(r2 + cpad), w7, acc);
            acc = VFMA(VLOAD(r2 + 2 * cpad), w8, acc);
            acc = VMIN(VMAX(acc, vlo), vhi);
            VSTORE(out + (long)ox * ldo + c0, acc);
            if (range) rmin = VMIN(rmin, acc), rmax = VMAX(rmax, acc);
            r0 += step;
            r1 += step;
            r2 += step;
        }
        if (edges) {
            const VEC w[9] = {w0, w1, w2, w3, w4, w5, w6, w7, w8};
            const float *r[3] = {rows[0] + c0, rows[1] + c0, rows[2] + c0};
            VEC first = VMIN(VMAX(SFX(depthwise_edge)(r, 0, stride, cpad, win, w, bias), vlo), vhi);
            VSTORE(out + c0, first);
            if (range) rmin = VMIN(rmin, first), rmax = VMAX(rmax, first);
            if (x_hi < wout && wout > 1) {
                VEC end = VMIN(VMAX(SFX(depthwise_edge)(r, wout - 1, stride, cpad, win, w, bias), vlo), vhi);
                VSTORE(out + (long)(wout - 1) * ldo + c0, end);
                if (range) rmin = VMIN(rmin, end), rmax = VMAX(rmax, end);
            }
        }
    }
    if (range) range[0] = VMIN(range[0], rmin), range[1] = VMAX(range[1], rmax);
}

/* The two instances of depthwise_row_impl: without the range (float32, no trace of it left) and with it (int8). */
TARGET static void SFX(depthwise_row)(const float *const rows[3], int wout, int stride, int C, int cpad, int win,
                                      int edges, const float *wd, const float *bd, float lo, float hi, long ldo,
                                      float *out) {
    SFX(depthwise_row_impl)(rows, wout, stride, C, cpad, win, edges, wd, bd, lo, hi, ldo, out, NULL);
}

TARGET static void SFX(depthwise_row_range)(const float *const rows[3], int wout, int stride, int C, int cpad,
                                            int win, int edges, const float *wd, const float *bd, float lo, float hi,
                                            long ldo, float *out, VEC *range) {
    SFX(depthwise_row_impl)(rows, wout, stride, C, cpad, win, edges, wd, bd, lo, hi, ldo, out, range);
}

/* One row (image row y of the block's input) of the network's stem (V1 paper Table 1, V2 paper Table 2: a 3x3
 * conv, padding 1, stride 2, of the RGB image): an im2col of the w output pixels (cimg * 9 taps each, read straight
 * from the NCHW image) into S->col, then the same GEMM as a 1x1 conv with K = cimg * 9, into dst: in int8 where
 * B->qs holds its weights (the columns quantized per row over their span, see quantize_span). */
TARGET static void SFX(stem_row)(const block_t *B, const scratch_t *S, int img, int y, float *dst) {
    int K = B->cimg * 9, s = B->sstride;
    const float *image = B->img + (long)img * B->cimg * B->himg * B->wimg;
    for (int c = 0; c < B->cimg; c++) {
        for (int ky = 0; ky < 3; ky++) {
            int iy = y * s - 1 + ky;
            float *col = S->col + (c * 3 + ky) * 3;
            const float *row = (iy < 0 || iy >= B->himg) ? NULL : image + ((long)c * B->himg + iy) * B->wimg;
            for (int x = 0; x < B->w; x++, col += K) {
                int ix = x * s - 1;
                if (!row) {
                    col[0] = col[1] = col[2] = 0.0f;
                } else if (ix >= 0 && ix + 2 < B->wimg) {
                    col[0] = row[ix];
                    col[1] = row[ix + 1];
                    col[2] = row[ix + 2];
                } else {
                    for (int kx = 0; kx < 3; kx++)
                        col[kx] = (ix + kx >= 0 && ix + kx < B->wimg) ? row[ix + kx] : 0.0f;
                }
            }
        }
    }
    if (B->nonfinite && !B->qs.w) {
        float mn, mx;
        if (!SFX(scan_range)(S->col, K, B->w, K, &mn, &mx)) __atomic_store_n(&B->nonfinite[img], 1, __ATOMIC_RELAXED);
    }
    if (B->qs.w) {
        int zp;
        float sa = SFX(quantize_span)(S->col, B->w, K, S->qa, &zp);
        if (B->nonfinite && isnan(sa)) __atomic_store_n(&B->nonfinite[img], 1, __ATOMIC_RELAXED);
        SFX(gemm_q_run)(S->qa, B->w, K, sa, zp, &B->qs, B->bs, B->cin, B->los, B->his, dst, B->cpad, B->w, 0, NULL, 0,
                        S);
    } else
        SFX(gemm)(S->col, K, B->w, K, B->ws, (long)K * PANEL, B->bs, B->cin, B->los, B->his, dst, B->cpad, B->w, 0,
                  NULL, 0, S->apad);
}

/* Fill ring rows [first, last] (image rows, all inside the image) of image `img`, channels [c0, c0 + cw) of the
 * expanded tensor: the expansion 1x1 conv (V2), the stem (the network's first block) or a copy of the input rows
 * (t = 1, V1), in runs of rows whose ring slots are consecutive. */
TARGET static void SFX(fill_rows)(const block_t *B, const scratch_t *S, int img, int first, int last, int c0, int cw) {
    long row_floats = (long)(B->w + 2) * B->cpad;
    while (first <= last) {
        int slot = first % S->ring_rows;
        int count = last - first + 1;
        if (count > S->ring_rows - slot) count = S->ring_rows - slot;
        const float *src = B->in + ((long)img * B->h + first) * B->w * B->cin;
        float *dst = S->ring + slot * row_floats + B->cpad;
        if (B->ws) { /* only in row mode: all channels */
            for (int y = 0; y < count; y++) SFX(stem_row)(B, S, img, first + y, dst + y * row_floats);
        } else if (B->we && B->int8) {
            qmat_t W = {B->qe.w + (long)(c0 / PANEL) * B->qe.panel_bytes, B->qe.panel_bytes, B->qe.colsum + c0,
                        B->qe.scale + c0};
            SFX(gemm_q)(src, B->cin, count * B->w, B->cin, &W, B->be + c0, cw, B->lo1, B->hi1, dst + c0, B->cpad, B->w,
                        row_floats, NULL, 0, NULL, S);
        } else if (B->we) {
            SFX(gemm)(src, B->cin, count * B->w, B->cin, B->we + (long)(c0 / PANEL) * B->cin * PANEL,
                      (long)B->cin * PANEL, B->be + c0, cw, B->lo1, B->hi1,
                      dst + c0, B->cpad, B->w, row_floats, NULL, 0, S->apad);
        } else {
            for (int y = 0; y < count; y++)
                for (int x = 0; x < B->w; x++)
                    memcpy(dst + y * row_floats + (long)x * B->cpad + c0, src + ((long)y * B->w + x) * B->cin + c0,
                           sizeof(float) * (size_t)cw);
        }
        first += count;
    }
}

/* Output rows [oy_begin, oy_end) of image img, tile by tile (V2 paper section 5.1), for channels [c0, c0 + cw) of
 * the expanded tensor: expand only the input rows the tile's depthwise conv needs that are not in the ring yet, run
 * the depthwise conv into the tile buffer, project the tile into T (the output plus the shortcut, or a partial sum
 * over this channel slice). */
TARGET static void SFX(run_rows)(const block_t *B, const scratch_t *S, int img, int oy_begin, int oy_end, int c0,
                                 int cw, const target_t *T) {
    long row_floats = (long)(B->w + 2) * B->cpad;
    /* Without expansion, and with the input's channels already padded, the depthwise conv reads the input rows where
     * they are: copying them into the ring would only move the whole tensor once more through the caches. */
    int direct = block_reads_in_place(B);
    for (int slot = 0; slot < S->ring_rows && !direct; slot++) { /* the side padding: another block may have left
                                                                     data here */
        memset(S->ring + slot * row_floats, 0, sizeof(float) * (size_t)B->cpad);
        memset(S->ring + slot * row_floats + (long)(B->w + 1) * B->cpad, 0, sizeof(float) * (size_t)B->cpad);
    }
    int s = B->stride;
    int next_row = oy_begin * s - 1; /* the first image row not yet in the ring */
    for (int oy0 = oy_begin; oy0 < oy_end; oy0 += S->tile_rows) {
        int t = oy_end - oy0 < S->tile_rows ? oy_end - oy0 : S->tile_rows;
        int need_last = (oy0 + t - 1) * s + 1;
        int first = next_row < 0 ? 0 : next_row;
        int last = need_last < B->h - 1 ? need_last : B->h - 1;
        if (first <= last && !direct) SFX(fill_rows)(B, S, img, first, last, c0, cw);
        next_row = need_last + 1;
        VEC range[2] = {VSET1(0.0f), VSET1(0.0f)}; /* int8: the tile's range, 0 included (as quantize scans it) */
        for (int i = 0; i < t; i++) {
            const float *rows[3];
            for (int ky = 0; ky < 3; ky++) {
                int y = (oy0 + i) * s - 1 + ky;
                if (y < 0 || y >= B->h)
                    rows[ky] = S->zero_row + c0;
                else if (direct) /* pixel 0 is the one left of the row: never read (edges) */
                    rows[ky] = B->in + (((long)img * B->h + y) * B->w - 1) * B->cin + c0;
                else
                    rows[ky] = S->ring + (y % S->ring_rows) * row_floats + c0;
            }
            float *dw = S->dw + (long)i * B->wout * DW_LD(B->cpad) + c0;
            if (B->int8)
                SFX(depthwise_row_range)(rows, B->wout, s, cw, B->cpad, B->w, direct, B->wd + c0, B->bd + c0, B->lo2,
                                         B->hi2, DW_LD(B->cpad), dw, range);
            else
                SFX(depthwise_row)(rows, B->wout, s, cw, B->cpad, B->w, direct, B->wd + c0, B->bd + c0, B->lo2,
                                   B->hi2, DW_LD(B->cpad), dw);
        }
        long out_pixel = ((long)img * B->hout + oy0) * B->wout;
        const float *res = T->residual ? B->in + out_pixel * B->cin : NULL;
        int P = t * B->wout;
        if (B->int8) {
            /* a slice of the expanded channels (channel-split mode) needs its own column sums */
            const int32_t *colsum = cw == B->cexp ? B->qp.colsum : NULL;
            qmat_t W = {B->qp.w + (long)c0 * PANEL, B->qp.panel_bytes, colsum, B->qp.scale};
            float known[2];
            SFX(reduce_range)(range, known);
            SFX(gemm_q)(S->dw + c0, DW_LD(B->cpad), P, cw, &W, T->bias, B->cout, T->lo, T->hi,
                        T->out + out_pixel * T->ldo, T->ldo, P, 0, res, B->cin, known, S);
        } else {
            SFX(gemm)(S->dw + c0, DW_LD(B->cpad), P, cw, B->wp + (long)c0 * PANEL, (long)B->cexp * PANEL, T->bias,
                      B->cout, T->lo, T->hi, T->out + out_pixel * T->ldo, T->ldo, P, 0, res, B->cin, S->apad);
        }
    }
}

/* One chunk of the batch's output rows (images one after another): chunk `index` of `count` equal ranges. In
 * channel-split mode (small feature maps, where cutting rows would re-expand the depthwise overlap and make every
 * thread read all the weights) chunk `index` is instead a slice of the expanded channels over every row, projected
 * into its own partial sum; the caller adds the slices up (fused.c, reduce_partials). */
TARGET static void SFX(run_chunk)(const block_t *B, const scratch_t *S, int index, int count) {
    if (B->split) {
        int c0, cw;
        split_slice(B, index, count, &c0, &cw);
        long pixels = (long)B->n * B->hout * B->wout;
        target_t T = {B->partial + (long)index * pixels * B->coutpad, B->coutpad, B->zero_bias, -INFINITY, INFINITY, 0};
        for (int img = 0; img < B->n; img++) SFX(run_rows)(B, S, img, 0, B->hout, c0, cw, &T);
        return;
    }
    target_t T = {B->out, B->cout, B->bp, B->lo3, B->hi3, B->residual};
    long total = (long)B->n * B->hout;
    long begin = total * index / count, end = total * (index + 1) / count;
    while (begin < end) {
        int img = (int)(begin / B->hout);
        int oy = (int)(begin % B->hout);
        int stop = end - (long)img * B->hout < B->hout ? (int)(end - (long)img * B->hout) : B->hout;
        SFX(run_rows)(B, S, img, oy, stop, 0, B->cexp, &T);
        begin = (long)img * B->hout + stop;
    }
}

/* One pixel's 1x1 conv over n <= PANEL output channels (one panel of b) into c (HEAD_COLS floats, whole vectors stored): for
 * a few pixels (the classifier on a pooled vector) the MR-pixel micro-kernel would compute mostly padding. */
TARGET static void SFX(gemv)(const float *a, int K, const float *b, const float *bias, int n, float lo,
                             float hi, float *c) {
    VEC acc[PANEL / VW];
    int nv = (n + VW - 1) / VW;
    for (int j = 0; j < PANEL / VW; j++) acc[j] = VSET1(0.0f);
    for (int j = 0; j < nv; j++) acc[j] = VLOAD(bias + j * VW);
    for (int k = 0; k < K; k++) {
        VEC av = VSET1(a[k]);
        const float *bk = b + (long)k * PANEL;
        for (int j = 0; j < nv; j++) acc[j] = VFMA(av, VLOAD(bk + j * VW), acc[j]);
    }
    VEC vlo = VSET1(lo), vhi = VSET1(hi);
    for (int j = 0; j < nv; j++) VSTORE(c + j * VW, VMIN(VMAX(acc[j], vlo), vhi));
}

/* Chunk `chunk` (HEAD_COLS output channels) of the head: V2's last 1x1 conv (+ ReLU6) and the global average pool
 * (V2 paper Table 2: conv2d 1x1, avgpool 7x7), HEAD_PIX pixels at a time into the tile buffer, summed per channel
 * as they come, so the conv's output never exists in full. Without weights (V1), the pool alone. */
TARGET static void SFX(head_chunk)(const head_t *H, const scratch_t *S, int chunk) {
    int n0 = chunk * HEAD_COLS;
    int cols = H->nout - n0 < HEAD_COLS ? H->nout - n0 : HEAD_COLS;
    for (int img = 0; img < H->n; img++) {
        float sum[HEAD_COLS] = {0};
        const float *in = H->in + (long)img * H->p * H->k;
        for (int p0 = 0; p0 < H->p; p0 += HEAD_PIX) {
            int m = H->p - p0 < HEAD_PIX ? H->p - p0 : HEAD_PIX;
            const float *tile = in + (long)p0 * H->k + n0;
            long ld = H->k;
            if (H->w && H->int8) {
                qmat_t W = {H->q.w + (long)(n0 / PANEL) * H->q.panel_bytes, H->q.panel_bytes, H->q.colsum + n0,
                            H->q.scale + n0};
                int tile_index = img * ((H->p + HEAD_PIX - 1) / HEAD_PIX) + p0 / HEAD_PIX;
                SFX(gemm_q_run)(H->qa + ((long)img * H->p + p0) * KPAD4(H->k), m, H->k, H->qsa[tile_index],
                                H->qzp[tile_index], &W, H->b + n0, cols, H->lo, H->hi, S->dw, HEAD_COLS, m, 0, NULL, 0,
                                S);
                tile = S->dw;
                ld = HEAD_COLS;
            } else if (H->w && m < MR / 2) {
                for (int p = 0; p < m; p++)
                    for (int q = 0; q * PANEL < cols; q++)
                        SFX(gemv)(in + (long)(p0 + p) * H->k, H->k, H->w + (long)(n0 / PANEL + q) * H->k * PANEL,
                                  H->b + n0 + q * PANEL, cols - q * PANEL < PANEL ? cols - q * PANEL : PANEL, H->lo,
                                  H->hi, S->dw + (long)p * HEAD_COLS + q * PANEL);
                tile = S->dw;
                ld = HEAD_COLS;
            } else if (H->w) {
                SFX(gemm)(in + (long)p0 * H->k, H->k, m, H->k, H->w + (long)(n0 / PANEL) * H->k * PANEL,
                          (long)H->k * PANEL, H->b + n0, cols, H->lo, H->hi,
                          S->dw, HEAD_COLS, m, 0, NULL, 0, S->apad);
                tile = S->dw;
                ld = HEAD_COLS;
            }
            for (int p = 0; p < m; p++)
                for (int j = 0; j < cols; j++) sum[j] += tile[(long)p * ld + j];
        }
        for (int j = 0; j < cols; j++) H->out[(long)img * H->nout + n0 + j] = sum[j] / (float)H->p;
    }
}

