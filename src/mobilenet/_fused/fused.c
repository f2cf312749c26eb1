/* mobilenet._fused_kernels: a whole MobileNet block in one pass over its input (V2 paper section 5.1, "memory
 * efficient inference"): the t-times expanded tensor of an inverted residual block (V2 paper Table 1) only ever
 * exists as a few rows in a ring buffer, the depthwise output only as one tile of output rows. The same kernel runs
 * V1's depthwise separable block (V1 paper Figure 3) with no expansion.
 *
 * Three builds of the kernels (fused_impl.h): AVX-512 (F/BW/VL), AVX2 + FMA and portable C, chosen at run time by
 * __builtin_cpu_supports, so the module runs on any x86-64 CPU (or any CPU, where only the portable one exists).
 * The "int8" precision (fused_int8.h) runs the 1x1 convs as int8 GEMMs: AVX512-VNNI micro-kernels in the AVX-512 build
 * where the CPU has avx512vnni, portable C otherwise (the AVX2 build included).
 * Work is split by output rows over a small persistent pthread pool. Arguments arrive as raw addresses from
 * mobilenet.fused, which validates every shape and pointer first. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define FUSED_X86 1
#include <immintrin.h>
#endif

/* 1x1 weights come in panels of PANEL output channels (mobilenet.fused packs them): K rows of PANEL floats each,
 * contiguous. PANEL is a multiple of every build's micro-kernel width (NB * VW). */
#define PANEL 32
/* The depthwise tile's pixel stride: cpad, plus one vector where cpad is a multiple of 256, so the 12 rows a
 * micro-kernel broadcasts from are not a large power of two apart (V1's 512 and 1024 channels would put them in one
 * or two L1 sets). */
#define DW_LD(cpad) ((long)(cpad) + ((cpad) % 256 == 0 ? 16 : 0))

/* A 1x1 conv's weights in int8 (the "int8" precision, mobilenet.fused.pack_int8): panels of PANEL output channels,
 * each KPAD4(K) / 4 groups of PANEL x 4 bytes (four consecutive input channels of one output channel are the four
 * bytes one VNNI lane multiplies and sums), panel_bytes apart; per output channel the sum of its int8 weights (the
 * zero-point correction; NULL: summed when needed, for a call over a slice of K) and its scale. */
typedef struct {
    const int8_t *w;
    long panel_bytes;
    const int32_t *colsum;
    const float *scale;
} qmat_t;
#define KPAD4(k) (((long)(k) + 3) & ~3L)
/* The int8 micro-kernels' most pixel rows, and the slack rows after a quantized A they may read. */
#define QROWS 12

typedef struct {
    const float *in; /* n x h x w x cin */
    float *out;      /* n x hout x wout x cout */
    int n, h, w, cin, hout, wout, cout, stride, cexp, cpad, coutpad;
    const float *we, *be; /* cin x cpad, cpad (NULL: no expansion, cexp == cin) */
    const float *wd, *bd; /* 9 x cpad, cpad */
    const float *wp, *bp; /* cexp x coutpad, coutpad */
    float lo1, hi1, lo2, hi2, lo3, hi3;
    int residual;
    /* The network's stem as this block's producer (NULL ws: none): a 3x3 conv, padding 1, stride sstride, of the
     * NCHW image img (n x cimg x himg x wimg) into the block's input rows (h x w x cin), computed row by row into
     * the ring so the stem's output never exists in full. ws is (cimg * 9) x cpad, bs cpad. */
    const float *img, *ws, *bs;
    int cimg, himg, wimg, sstride;
    float los, his;
    /* int8 (NULL qs.w: fp32): the stem's GEMM from these weights, its im2col quantized per row (quantize_span). */
    qmat_t qs;
    /* Per image of the batch (NULL: not tracked): set to 1 where the stem read a NaN or an infinity, which its clamps
     * would otherwise turn into confident logits. A 3x3 conv with padding 1 and stride 1 or 2 reads every pixel. */
    int *nonfinite;
    /* Channel-split mode (see run_chunk): chunk k writes n x hout x wout x coutpad partial sums at
     * partial + k * (that size); zero_bias is coutpad zeros. */
    int split;
    float *partial;
    const float *zero_bias;
    /* int8: the expansion (qe, when we) and the projection (qp) run as int8 GEMMs from these weights. */
    int int8;
    qmat_t qe, qp;
} block_t;

/* Where a projection goes: the block's output (bias, clamp, shortcut) or a partial sum (no bias, no clamp). */
typedef struct {
    float *out;
    long ldo;
    const float *bias;
    float lo, hi;
    int residual;
} target_t;

/* Whether the depthwise conv reads the block's input rows in place (fused_impl.h, run_rows): no expansion, no stem,
 * input channels already padded. Then the ring is unused. */
static int block_reads_in_place(const block_t *B) { return !B->we && !B->ws && B->cin == B->cpad; }

/* Chunk k of count's slice [c0, c0 + cw) of the expanded channels: whole weight panels, none empty. */
static int split_groups(const block_t *B) { return (B->cexp + PANEL - 1) / PANEL; }
static void split_slice(const block_t *B, int k, int count, int *c0, int *cw) {
    int groups = split_groups(B);
    int begin = PANEL * (groups * k / count), end = PANEL * (groups * (k + 1) / count);
    *c0 = begin;
    *cw = (end < B->cexp ? end : B->cexp) - begin;
}

/* The head: a 1x1 conv (+ clamp) and the global average pool of an NHWC tensor (n x p pixels x k channels) into
 * out (n x nout), tile by tile so the conv's output never exists in full; w NULL: the pool alone (nout == k). */
typedef struct {
    const float *in, *w, *b;
    float *out;
    int n, p, k, nout, npad;
    float lo, hi;
    int int8; /* the conv runs as an int8 GEMM from q */
    qmat_t q;
    /* int8: the input quantized once per step (fused_impl.h, head_quantize) */
    const uint8_t *qa;
    const float *qsa;
    const int *qzp;
} head_t;
#define HEAD_COLS 64 /* a multiple of PANEL */
#define HEAD_PIX 64

typedef struct {
    float *ring;           /* ring_rows x (w + 2) x cpad */
    float *dw;             /* tile_rows x wout pixels, DW_LD(cpad) floats apart */
    float *apad;           /* MR x max K */
    float *col;            /* the stem's im2col of one row: w x cimg * 9 */
    const float *zero_row; /* (w + 2) x cpad zeros, shared */
    int ring_rows, tile_rows;
    uint8_t *qa;   /* int8: a GEMM's quantized A, (P + QROWS) x KPAD4(K) bytes */
    int32_t *qsum; /* int8: column sums of a slice of K rows */
    long *qoff;    /* int8: each pixel's output offset in a GEMM call */
} scratch_t;

/* Whether the CPU runs AVX512-VNNI (the int8 GEMM's fast micro-kernel); set when the module loads. */
static int cpu_has_vnni;

/* ---- portable C ------------------------------------------------------------------------------------------ */
#define SFX(name) name##_portable
#define TARGET
#define VEC float
#define VW 1
#define MR 4
#define NB 16
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VLOAD_PART(p, n) (*(p))
#define VSTORE_PART(p, v, n) (*(p) = (v))
#define VSET1(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
#define VMUL(a, b) ((a) * (b))
#define VMAX(a, b) ((a) > (b) ? (a) : (b))
#define VMIN(a, b) ((a) < (b) ? (a) : (b))
#include "fused_impl.h"
#include "fused_undef.h"

#ifdef FUSED_X86
/* ---- AVX2 + FMA: 6 pixels x 2 vectors of 8 = 12 accumulators of 16 ymm registers -------------------------- */
#define SFX(name) name##_avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VEC __m256
#define VW 8
#define MR 6
#define NB 2
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps((p), (v))
#define VLOAD_PART(p, n) _mm256_maskload_ps((p), avx2_mask(n))
#define VSTORE_PART(p, v, n) _mm256_maskstore_ps((p), avx2_mask(n), (v))
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VMAX(a, b) _mm256_max_ps((a), (b))
#define VMIN(a, b) _mm256_min_ps((a), (b))
TARGET static inline __m256i avx2_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#include "fused_impl.h"
#include "fused_undef.h"

/* ---- AVX-512: 12 pixels x 2 vectors of 16 = 24 accumulators of 32 zmm registers --------------------------- */
#define SFX(name) name##_avx512
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define VEC __m512
#define VW 16
#define MR 12
#define NB 2
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps((p), (v))
#define VLOAD_PART(p, n) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1u), (p))
#define VSTORE_PART(p, v, n) _mm512_mask_storeu_ps((p), (__mmask16)((1u << (n)) - 1u), (v))
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VMAX(a, b) _mm512_max_ps((a), (b))
#define VMIN(a, b) _mm512_min_ps((a), (b))
#define FUSED_VNNI 1 /* the int8 GEMM's AVX512-VNNI micro-kernels, used where cpu_has_vnni */
#define QTARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#include "fused_impl.h"
#endif

/* ---- instruction sets ---------------------------------------------------------------------------------- */
enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
#define MAX_MR 12

static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#ifdef FUSED_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

static int best_isa(void) {
    if (isa_supported(ISA_AVX512)) return ISA_AVX512;
    if (isa_supported(ISA_AVX2)) return ISA_AVX2;
    return ISA_PORTABLE;
}

/* ---- the thread pool ------------------------------------------------------------------------------------
 * The output rows are cut into chunks that threads claim from an atomic counter, so a worker the OS has not
 * scheduled yet (the machine may be shared) costs nothing: the calling thread takes its chunks. A worker joins a
 * job only while it is open (under job_lock); the caller closes it when every chunk is claimed and waits only for
 * the workers that joined. Workers spin a while after a job (blocks follow each other closely), then sleep. */
#define MAX_THREADS 64
/* How long an idle worker spins before it sleeps. A sleeping worker takes milliseconds to wake on a virtual
 * machine, which a forward of a few milliseconds cannot afford when the next image comes a little later; ONNX
 * Runtime's workers spin likewise by default. */
#define SPIN_SECONDS 0.05

enum { JOB_BLOCK = 0, JOB_HEAD = 1 };
typedef struct {
    int kind;
    const void *task; /* block_t or head_t */
    scratch_t *scratch;
    int isa, chunks, threads; /* workers with tid >= threads sit this job out: they have no scratch in it */
    atomic_int next_chunk;
} job_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;  /* joining vs closing the job */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static atomic_int job_generation;
static atomic_int job_active; /* workers that joined and have not finished */
static job_t *current_job;    /* NULL when closed */
static int pool_workers;
/* A worker starts from the generation current when it was created (passed in, not read: a job posted between its
 * creation and its first instruction would otherwise be missed). */
static int worker_start_generation[MAX_THREADS];

static void run_chunk(const job_t *job, int tid, int chunk) {
    const block_t *B = job->task;
    scratch_t *S = &job->scratch[tid];
    if (job->kind == JOB_HEAD) {
        const head_t *H = job->task;
#ifdef FUSED_X86
        if (job->isa == ISA_AVX512) {
            head_chunk_avx512(H, S, chunk);
            return;
        }
        if (job->isa == ISA_AVX2) {
            head_chunk_avx2(H, S, chunk);
            return;
        }
#endif
        head_chunk_portable(H, S, chunk);
        return;
    }
#ifdef FUSED_X86
    if (job->isa == ISA_AVX512) {
        run_chunk_avx512(B, S, chunk, job->chunks);
        return;
    }
    if (job->isa == ISA_AVX2) {
        run_chunk_avx2(B, S, chunk, job->chunks);
        return;
    }
#endif
    run_chunk_portable(B, S, chunk, job->chunks);
}

static void claim_chunks(job_t *job, int tid) {
    int chunk;
    while ((chunk = atomic_fetch_add(&job->next_chunk, 1)) < job->chunks) run_chunk(job, tid, chunk);
}

static inline void cpu_relax(void) {
#ifdef FUSED_X86
    _mm_pause();
#endif
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    int seen = worker_start_generation[tid];
    for (;;) {
        int spins = 0;
        double spin_until = now_seconds() + SPIN_SECONDS;
        while (atomic_load_explicit(&job_generation, memory_order_acquire) == seen) {
            cpu_relax();
            if (++spins % 64 == 0) {
                sched_yield(); /* on a shared machine, spinning must not starve the others */
                if (now_seconds() > spin_until) break;
            }
        }
        if (atomic_load_explicit(&job_generation, memory_order_acquire) == seen) {
            pthread_mutex_lock(&wake_lock);
            while (atomic_load(&job_generation) == seen) pthread_cond_wait(&wake_cond, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
        }
        pthread_mutex_lock(&job_lock);
        seen = atomic_load(&job_generation);
        job_t *job = current_job && tid < current_job->threads ? current_job : NULL;
        if (job) atomic_fetch_add(&job_active, 1);
        pthread_mutex_unlock(&job_lock);
        if (job) {
            claim_chunks(job, tid);
            atomic_fetch_sub_explicit(&job_active, 1, memory_order_release);
        }
    }
    return NULL;
}

static int ensure_workers(int nt) {
    while (pool_workers < nt - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        worker_start_generation[pool_workers + 1] = atomic_load(&job_generation);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) return -1;
        pool_workers++;
    }
    return 0;
}

/* Two chunks per thread where each is at least 8 rows (a chunk boundary costs the depthwise conv's overlap rows
 * of expansion again), else one. */
static int chunk_count(const block_t *B, int nt) {
    if (B->split) return nt < split_groups(B) ? nt : split_groups(B);
    long rows = (long)B->n * B->hout;
    long chunks = rows >= 16L * nt ? 2L * nt : nt;
    return (int)(chunks < rows ? chunks : rows);
}

static void run_job(int kind, const void *task, int chunks, scratch_t *scratch, int isa, int nt) {
    job_t job = {kind, task, scratch, isa, chunks, nt, 0};
    if (nt > 1 && job.chunks > 1) {
        pthread_mutex_lock(&job_lock);
        current_job = &job;
        pthread_mutex_unlock(&job_lock);
        pthread_mutex_lock(&wake_lock);
        atomic_fetch_add_explicit(&job_generation, 1, memory_order_release);
        pthread_cond_broadcast(&wake_cond);
        pthread_mutex_unlock(&wake_lock);
    }
    claim_chunks(&job, 0);
    pthread_mutex_lock(&job_lock);
    current_job = NULL;
    pthread_mutex_unlock(&job_lock);
    for (int spins = 0; atomic_load_explicit(&job_active, memory_order_acquire) > 0; spins++) {
        if (spins < 4096)
            cpu_relax();
        else
            sched_yield(); /* the worker may be waiting for this core */
    }
}

/* ---- scratch memory: per thread, kept between calls and grown when a block needs more ------------------- */
typedef struct {
    float *ptr;
    size_t floats;
} buffer_t;

static buffer_t ring_buf[MAX_THREADS], dw_buf[MAX_THREADS], apad_buf[MAX_THREADS], col_buf[MAX_THREADS], zero_buf, partial_buf;
static buffer_t qa_buf[MAX_THREADS], qsum_buf[MAX_THREADS], qoff_buf[MAX_THREADS], head_qa_buf, head_qs_buf;

static float *grow(buffer_t *buf, size_t floats) {
    if (buf->floats >= floats) return buf->ptr;
    float *fresh = NULL;
    size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    if (posix_memalign((void **)&fresh, 64, bytes) != 0) return NULL;
    memset(fresh, 0, bytes); /* never-written lanes are read (and discarded): keep them finite and normal */
    free(buf->ptr);
    buf->ptr = fresh;
    buf->floats = floats;
    return fresh;
}

static size_t scratch_bytes_total(void) {
    size_t total = zero_buf.floats + partial_buf.floats + head_qa_buf.floats + head_qs_buf.floats;
    for (int i = 0; i < MAX_THREADS; i++) {
        total += ring_buf[i].floats + dw_buf[i].floats + apad_buf[i].floats + col_buf[i].floats;
        total += qa_buf[i].floats + qsum_buf[i].floats + qoff_buf[i].floats;
    }
    return total * sizeof(float);
}

/* The most output rows per tile whose ring and depthwise tile fit the cache budget (at least one): every tile
 * streams all of the block's 1x1 weights once, so fewer tiles mean less weight traffic. */
static int pick_tile_rows(const block_t *B, int nt, long budget_bytes) {
    if (B->split) nt = 1; /* every thread runs every row of its channel slice */
    long per_thread = ((long)B->n * B->hout + nt - 1) / nt;
    int rows = 1;
    while (rows < B->hout && rows < per_thread) {
        int next = rows + 1;
        long ring = block_reads_in_place(B) ? 0 : (long)((next - 1) * B->stride + 3) * (B->w + 2) * B->cpad;
        long dw = (long)next * B->wout * DW_LD(B->cpad);
        if ((ring + dw) * (long)sizeof(float) > budget_bytes) break;
        rows = next;
    }
    return rows;
}

/* int8: thread t's quantized A (the most pixels of one GEMM call, plus the rows a micro-kernel may read past them,
 * times the most K) and its column sums of a K slice; 0 pixels: neither. */
static int prepare_int8_scratch(scratch_t *S, int t, long pixels, int kmax, int nmax) {
    S->qa = NULL;
    S->qsum = NULL;
    S->qoff = NULL;
    if (pixels == 0) return 0;
    S->qa = (uint8_t *)grow(&qa_buf[t], (size_t)((pixels + QROWS) * KPAD4(kmax) / 4 + 1));
    S->qsum = (int32_t *)grow(&qsum_buf[t], (size_t)nmax + PANEL);
    S->qoff = (long *)grow(&qoff_buf[t], (size_t)(pixels + QROWS) * sizeof(long) / sizeof(float));
    return S->qa && S->qsum && S->qoff ? 0 : -1;
}

/* The most pixels of one int8 GEMM call of a block: a run of ring rows (expansion) or a tile (projection). */
static long int8_pixels(const block_t *B, int ring_rows, int tile) {
    long stem = B->ws && B->qs.w ? B->w : 0;
    if (!B->int8) return stem;
    long expand = B->we ? (long)ring_rows * B->w : 0, project = (long)tile * B->wout;
    long most = expand > project ? expand : project;
    return most > stem ? most : stem;
}

static int prepare_scratch(block_t *B, scratch_t *S, int nt, long budget_bytes) {
    int tile = pick_tile_rows(B, nt, budget_bytes);
    int ring_rows = (tile - 1) * B->stride + 3;
    long row_floats = (long)(B->w + 2) * B->cpad;
    int kmax = B->cin > B->cexp ? B->cin : B->cexp;
    int kstem = B->ws ? B->cimg * 9 : 0;
    if (kstem > kmax) kmax = kstem;
    const float *zero = grow(&zero_buf, (size_t)(row_floats > B->coutpad ? row_floats : B->coutpad));
    if (!zero) return -1;
    for (int t = 0; t < nt; t++) {
        int in_place = block_reads_in_place(B); /* no ring */
        S[t].ring = in_place ? NULL : grow(&ring_buf[t], (size_t)(ring_rows * row_floats));
        S[t].dw = grow(&dw_buf[t], (size_t)(tile * B->wout * DW_LD(B->cpad)));
        S[t].apad = grow(&apad_buf[t], (size_t)MAX_MR * kmax);
        S[t].col = B->ws ? grow(&col_buf[t], (size_t)B->w * kstem) : NULL;
        if ((!in_place && !S[t].ring) || !S[t].dw || !S[t].apad || (B->ws && !S[t].col)) return -1;
        int nmax = B->cpad > B->coutpad ? B->cpad : B->coutpad;
        if (prepare_int8_scratch(&S[t], t, int8_pixels(B, ring_rows, tile), kmax, nmax) != 0) return -1;
        S[t].zero_row = zero;
        B->zero_bias = zero;
        S[t].ring_rows = ring_rows;
        S[t].tile_rows = tile;
    }
    return 0;
}

/* Channel-split mode: the partial sums of every chunk. */
static int prepare_partials(block_t *B, int chunks) {
    if (!B->split) return 0;
    B->partial = grow(&partial_buf, (size_t)chunks * B->n * B->hout * B->wout * B->coutpad);
    return B->partial ? 0 : -1;
}

/* Channel-split mode: out = clamp(bias + the chunks' partial sums) (+ the shortcut). */
static void reduce_partials(const block_t *B, int chunks) {
    long pixels = (long)B->n * B->hout * B->wout, stride = pixels * B->coutpad;
    for (long p = 0; p < pixels; p++) {
        const float *part = B->partial + p * B->coutpad;
        float *out = B->out + p * B->cout;
        /* channel loops without a carried dependence, so the compiler vectorizes them */
        for (int c = 0; c < B->cout; c++) out[c] = B->bp[c] + part[c];
        for (int k = 1; k < chunks; k++)
            for (int c = 0; c < B->cout; c++) out[c] += part[k * stride + c];
        for (int c = 0; c < B->cout; c++) out[c] = out[c] < B->lo3 ? B->lo3 : (out[c] > B->hi3 ? B->hi3 : out[c]);
        if (B->residual) {
            const float *res = B->in + p * B->cin;
            for (int c = 0; c < B->cout; c++) out[c] += res[c];
        }
    }
}

static int prepare_head_scratch(const head_t *H, scratch_t *S, int nt) {
    for (int t = 0; t < nt; t++) {
        S[t].dw = grow(&dw_buf[t], (size_t)HEAD_PIX * HEAD_COLS);
        S[t].apad = grow(&apad_buf[t], (size_t)MAX_MR * H->k);
        if (!S[t].dw || !S[t].apad) return -1;
        if (prepare_int8_scratch(&S[t], t, H->int8 ? HEAD_PIX : 0, H->k, H->npad) != 0) return -1;
    }
    return 0;
}

/* int8: the head's whole input quantized (by the calling thread) before the chunks share it. */
static int quantize_head(head_t *H, int isa) {
    if (!H->int8) return 0;
    long tiles = (long)H->n * ((H->p + HEAD_PIX - 1) / HEAD_PIX);
    uint8_t *qa = (uint8_t *)grow(&head_qa_buf, (size_t)((((long)H->n * H->p + QROWS) * KPAD4(H->k)) / 4 + 1));
    float *qs = grow(&head_qs_buf, (size_t)(2 * tiles));
    if (!qa || !qs) return -1;
    int *zp = (int *)(qs + tiles);
#ifdef FUSED_X86
    if (isa == ISA_AVX512)
        head_quantize_avx512(H, qa, qs, zp);
    else if (isa == ISA_AVX2)
        head_quantize_avx2(H, qa, qs, zp);
    else
#endif
        head_quantize_portable(H, qa, qs, zp);
    H->qa = qa, H->qsa = qs, H->qzp = zp;
    return 0;
}

/* ---- Python API -------------------------------------------------------------------------------------- */
static const char *ISA_NAMES[] = {"auto", "portable", "avx2", "avx512"};

static int check_pool_args(int threads, int *isa, const char *what) {
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "%s: threads must be in 1..%d", what, MAX_THREADS);
        return -1;
    }
    if (*isa == ISA_AUTO) *isa = best_isa();
    if (*isa < ISA_PORTABLE || *isa > ISA_AVX512 || !isa_supported(*isa)) {
        PyErr_Format(PyExc_ValueError, "%s: instruction set %d is not supported by this CPU", what, *isa);
        return -1;
    }
    return 0;
}

static int parse_quant(PyObject *quant, int count, qmat_t *first, qmat_t *second, int *int8);

/* The optional stem tuple (img, cimg, himg, wimg, sstride, ws, bs, los, his[, (qw, cs, sw) or None[, nonfinite]]):
 * its int8 weights, and the address of n ints that flag images holding a NaN or an infinity (0: not tracked); None
 * leaves the stem off. */
static int parse_stem(PyObject *stem, block_t *B) {
    B->img = B->ws = B->bs = NULL;
    B->cimg = B->himg = B->wimg = B->sstride = 0;
    B->los = B->his = 0.0f;
    memset(&B->qs, 0, sizeof(B->qs));
    B->nonfinite = NULL;
    if (stem == Py_None) return 0;
    unsigned long long img, ws, bs, nonfinite = 0;
    PyObject *quant = Py_None;
    qmat_t unused;
    int int8;
    if (!PyArg_ParseTuple(stem, "KiiiiKKff|OK", &img, &B->cimg, &B->himg, &B->wimg, &B->sstride, &ws, &bs, &B->los,
                          &B->his, &quant, &nonfinite) ||
        parse_quant(quant, 3, &B->qs, &unused, &int8) != 0)
        return -1;
    if (int8 && !B->qs.w) {
        PyErr_SetString(PyExc_ValueError, "run_block: the stem's int8 weights are null pointers");
        return -1;
    }
    B->qs.panel_bytes = KPAD4((long)B->cimg * 9) * PANEL;
    B->img = (const float *)(uintptr_t)img;
    B->ws = (const float *)(uintptr_t)ws;
    B->bs = (const float *)(uintptr_t)bs;
    B->nonfinite = (int *)(uintptr_t)nonfinite;
    if (!B->img || !B->ws || !B->bs || B->cimg < 1 || B->himg < 1 || B->wimg < 1 ||
        (B->sstride != 1 && B->sstride != 2) || B->h != (B->himg - 1) / B->sstride + 1 ||
        B->w != (B->wimg - 1) / B->sstride + 1 || B->we || B->residual) {
        PyErr_SetString(PyExc_ValueError, "run_block: inconsistent stem shapes or null pointers");
        return -1;
    }
    return 0;
}

/* The optional int8 weights of a block, (qwe, cse, swe, qwp, csp, swp) (the expansion's three 0 where it has
 * none), or of a head, (qw, cs, sw); None: fp32. */
static int parse_quant(PyObject *quant, int count, qmat_t *first, qmat_t *second, int *int8) {
    unsigned long long a[6] = {0};
    *int8 = 0;
    if (quant == Py_None) return 0;
    const char *format = count == 6 ? "KKKKKK" : "KKK";
    if (!PyArg_ParseTuple(quant, format, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5])) return -1;
    qmat_t *mats[2] = {first, second};
    for (int i = 0; i < count / 3; i++) {
        mats[i]->w = (const int8_t *)(uintptr_t)a[3 * i];
        mats[i]->colsum = (const int32_t *)(uintptr_t)a[3 * i + 1];
        mats[i]->scale = (const float *)(uintptr_t)a[3 * i + 2];
        if (!mats[i]->w != !mats[i]->colsum || !mats[i]->w != !mats[i]->scale) {
            PyErr_SetString(PyExc_ValueError, "int8 weights: null pointers");
            return -1;
        }
    }
    *int8 = 1;
    return 0;
}

/* One step of a run: a block or a head, with its pool settings, parsed and checked while the GIL is held. */
typedef struct {
    int is_head, threads, isa;
    long budget;
    block_t block;
    head_t head;
} step_t;

static int parse_block(PyObject *args, step_t *step) {
    unsigned long long in, out, we, be, wd, bd, wp, bp;
    block_t *B = &step->block;
    PyObject *stem = Py_None, *quant = Py_None;
    int split_rows = 0;
    step->is_head = 0;
    if (!PyArg_ParseTuple(args, "KKiiiiiiiiiiiKKKKKKffffffiiil|OiO", &in, &out, &B->n, &B->h, &B->w, &B->cin,
                          &B->hout, &B->wout, &B->cout, &B->stride, &B->cexp, &B->cpad, &B->coutpad, &we, &be, &wd,
                          &bd, &wp, &bp, &B->lo1, &B->hi1, &B->lo2, &B->hi2, &B->lo3, &B->hi3, &B->residual,
                          &step->threads, &step->isa, &step->budget, &stem, &split_rows, &quant))
        return -1;
    B->in = (const float *)(uintptr_t)in;
    B->out = (float *)(uintptr_t)out;
    B->we = (const float *)(uintptr_t)we;
    B->be = (const float *)(uintptr_t)be;
    B->wd = (const float *)(uintptr_t)wd;
    B->bd = (const float *)(uintptr_t)bd;
    B->wp = (const float *)(uintptr_t)wp;
    B->bp = (const float *)(uintptr_t)bp;
    /* The Python wrapper validates everything; these checks only keep a wrong direct call from writing wild. */
    if (B->n < 1 || B->h < 1 || B->w < 1 || B->cin < 1 || B->cout < 1 || B->cexp < 1 ||
        (B->stride != 1 && B->stride != 2) || B->hout != (B->h - 1) / B->stride + 1 ||
        B->wout != (B->w - 1) / B->stride + 1 || B->cpad < B->cexp || B->cpad % 16 || B->coutpad < B->cout ||
        B->coutpad % 16 || !B->in || !B->out || !B->wd || !B->bd || !B->wp || !B->bp || (B->we && !B->be) ||
        (!B->we && B->cexp != B->cin) || (B->residual && (B->stride != 1 || B->cin != B->cout))) {
        PyErr_SetString(PyExc_ValueError, "run_block: inconsistent shapes or null pointers");
        return -1;
    }
    if (parse_stem(stem, B) != 0 || check_pool_args(step->threads, &step->isa, "run_block") != 0) return -1;
    if (parse_quant(quant, 6, &B->qe, &B->qp, &B->int8) != 0) return -1;
    if (B->int8 && (!B->qp.w || !B->qe.w != !B->we)) {
        PyErr_SetString(PyExc_ValueError, "run_block: int8 weights do not match the block");
        return -1;
    }
    B->qe.panel_bytes = KPAD4(B->cin) * PANEL;
    B->qp.panel_bytes = KPAD4(B->cexp) * PANEL;
    /* Channel split where the batch has at most split_rows output rows (and more than one thread shares them). */
    B->split = step->threads > 1 && B->we && B->cexp > PANEL && (long)B->n * B->hout <= split_rows;
    B->partial = NULL;
    B->zero_bias = NULL;
    return 0;
}

static int parse_head(PyObject *args, step_t *step) {
    unsigned long long in, out, w, b;
    head_t *H = &step->head;
    PyObject *quant = Py_None;
    qmat_t unused;
    step->is_head = 1;
    step->budget = 0;
    if (!PyArg_ParseTuple(args, "KKiiiiiKKffii|O", &in, &out, &H->n, &H->p, &H->k, &H->nout, &H->npad, &w, &b, &H->lo,
                          &H->hi, &step->threads, &step->isa, &quant))
        return -1;
    if (parse_quant(quant, 3, &H->q, &unused, &H->int8) != 0) return -1;
    H->q.panel_bytes = KPAD4(H->k) * PANEL;
    H->in = (const float *)(uintptr_t)in;
    H->out = (float *)(uintptr_t)out;
    H->w = (const float *)(uintptr_t)w;
    H->b = (const float *)(uintptr_t)b;
    if (H->n < 1 || H->p < 1 || H->k < 1 || H->nout < 1 || !H->in || !H->out ||
        (H->w ? (!H->b || H->npad < H->nout || H->npad % 16) : H->nout != H->k) || (H->int8 && (!H->w || !H->q.w))) {
        PyErr_SetString(PyExc_ValueError, "run_head: inconsistent shapes or null pointers");
        return -1;
    }
    return check_pool_args(step->threads, &step->isa, "run_head");
}

/* Runs one step on the pool (pool_lock held, GIL released); -1 when scratch memory ran out, else the number of
 * images the step's stem found a NaN or an infinity in (0 where it has no stem or does not track them). */
static int execute_step(step_t *step) {
    scratch_t scratch[MAX_THREADS];
    int nt = step->threads;
    if (ensure_workers(nt) != 0) return -1;
    if (step->is_head) {
        if (prepare_head_scratch(&step->head, scratch, nt) != 0 || quantize_head(&step->head, step->isa) != 0)
            return -1;
        run_job(JOB_HEAD, &step->head, (step->head.nout + HEAD_COLS - 1) / HEAD_COLS, scratch, step->isa, nt);
        return 0;
    }
    block_t *B = &step->block;
    int chunks = chunk_count(B, nt);
    if (prepare_scratch(B, scratch, nt, step->budget) != 0 || prepare_partials(B, chunks) != 0) return -1;
    if (B->nonfinite) memset(B->nonfinite, 0, sizeof(int) * (size_t)B->n);
    run_job(JOB_BLOCK, B, chunks, scratch, step->isa, nt);
    if (B->split) reduce_partials(B, chunks);
    int flagged = 0;
    for (int img = 0; B->nonfinite && img < B->n; img++) flagged += B->nonfinite[img] != 0;
    return flagged;
}

/* Runs the steps in order; returns the number of images flagged non-finite (see execute_step). */
static PyObject *run_steps(step_t *steps, Py_ssize_t count) {
    int failed = 0;
    long flagged = 0;
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&pool_lock);
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        int result = execute_step(&steps[i]);
        failed = result < 0;
        flagged += result > 0 ? result : 0;
    }
    pthread_mutex_unlock(&pool_lock);
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    return PyLong_FromLong(flagged);
}

static PyObject *py_run_block(PyObject *self, PyObject *args) {
    step_t step;
    if (parse_block(args, &step) != 0) return NULL;
    return run_steps(&step, 1);
}

static PyObject *py_run_head(PyObject *self, PyObject *args) {
    step_t step;
    if (parse_head(args, &step) != 0) return NULL;
    return run_steps(&step, 1);
}

/* A whole network in one call: no Python (and no GIL hand-off) between the blocks, so the pool's workers, spinning
 * between jobs, are still on their cores when the next block starts. */
static PyObject *py_run_plan(PyObject *self, PyObject *args) {
    PyObject *list;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list)) return NULL;
    Py_ssize_t count = PyList_Size(list);
    step_t *steps = count > 0 ? PyMem_Calloc((size_t)count, sizeof(step_t)) : NULL;
    if (count > 0 && !steps) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GetItem(list, i);
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "run_plan: every step is a run_block or run_head argument tuple");
            PyMem_Free(steps);
            return NULL;
        }
        int ok = PyTuple_Size(item) <= 14 ? parse_head(item, &steps[i]) : parse_block(item, &steps[i]);
        if (ok != 0) {
            PyMem_Free(steps);
            return NULL;
        }
    }
    PyObject *result = run_steps(steps, count);
    PyMem_Free(steps);
    return result;
}

/* One int8 GEMM on its own (the calling thread, fresh scratch), for checking it against an emulation of the
 * quantization: out (P x N) = the int8 1x1 conv of a (P x K floats) with weights (w, colsum (0: summed per call,
 * as for a slice of K), scale), bias, clamped to [lo, hi]. */
static PyObject *py_gemm_int8(PyObject *self, PyObject *args) {
    unsigned long long a, out, w, colsum, scale, bias;
    int P, K, N, isa;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "KKiiiKKKKffi", &a, &out, &P, &K, &N, &w, &colsum, &scale, &bias, &lo, &hi, &isa))
        return NULL;
    if (P < 1 || K < 1 || N < 1 || !a || !out || !w || !scale || !bias) {
        PyErr_SetString(PyExc_ValueError, "gemm_int8: inconsistent shapes or null pointers");
        return NULL;
    }
    if (check_pool_args(1, &isa, "gemm_int8") != 0) return NULL;
    qmat_t W = {(const int8_t *)(uintptr_t)w, KPAD4(K) * PANEL, (const int32_t *)(uintptr_t)colsum,
                (const float *)(uintptr_t)scale};
    scratch_t S = {0};
    S.qa = malloc((size_t)((P + QROWS) * KPAD4(K)));
    S.qsum = malloc(sizeof(int32_t) * (size_t)(N + PANEL));
    S.qoff = malloc(sizeof(long) * (size_t)P);
    if (!S.qa || !S.qsum || !S.qoff) {
        free(S.qa);
        free(S.qsum);
        free(S.qoff);
        return PyErr_NoMemory();
    }
    const float *A = (const float *)(uintptr_t)a, *b = (const float *)(uintptr_t)bias;
    float *C = (float *)(uintptr_t)out;
    Py_BEGIN_ALLOW_THREADS;
#ifdef FUSED_X86
    if (isa == ISA_AVX512)
        gemm_q_avx512(A, K, P, K, &W, b, N, lo, hi, C, N, P, 0, NULL, 0, NULL, &S);
    else if (isa == ISA_AVX2)
        gemm_q_avx2(A, K, P, K, &W, b, N, lo, hi, C, N, P, 0, NULL, 0, NULL, &S);
    else
#endif
        gemm_q_portable(A, K, P, K, &W, b, N, lo, hi, C, N, P, 0, NULL, 0, NULL, &S);
    Py_END_ALLOW_THREADS;
    free(S.qa);
    free(S.qsum);
    free(S.qoff);
    Py_RETURN_NONE;
}

static PyObject *py_has_vnni(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_has_vnni); }

static PyObject *py_supported_isas(PyObject *self, PyObject *unused) {
    PyObject *names = PyList_New(0);
    if (!names) return NULL;
    for (int isa = ISA_PORTABLE; isa <= ISA_AVX512; isa++) {
        if (!isa_supported(isa)) continue;
        PyObject *name = PyUnicode_FromString(ISA_NAMES[isa]);
        if (!name || PyList_Append(names, name) != 0) {
            Py_XDECREF(name);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(name);
    }
    return names;
}

static PyObject *py_best_isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(ISA_NAMES[best_isa()]); }

static PyObject *py_spin_seconds(PyObject *self, PyObject *unused) { return PyFloat_FromDouble(SPIN_SECONDS); }

static PyObject *py_scratch_bytes(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&pool_lock);
    size_t bytes = scratch_bytes_total();
    pthread_mutex_unlock(&pool_lock);
    return PyLong_FromSize_t(bytes);
}

static PyMethodDef methods[] = {
    {"run_block", py_run_block, METH_VARARGS,
     "run_block(in, out, n, h, w, cin, hout, wout, cout, stride, cexp, cpad, coutpad, we, be, wd, bd, wp, "
     "bp, lo1, hi1, lo2, hi2, lo3, hi3, residual, threads, isa, cache_budget_bytes[, stem[, split_rows]]): one fused block, NHWC "
     "float32 (addresses as ints; stem: None or (img, cimg, himg, wimg, stride, ws, bs, lo, hi[, int8 or None[, nonfinite]]), the stem conv "
     "of an NCHW image as the block's input, nonfinite the address of n ints set to 1 for images holding a NaN or an "
     "infinity (the call returns their count); split_rows: at most that many output rows in the batch split the expanded "
     "channels between threads instead of the rows; see mobilenet.fused)."},
    {"run_plan", py_run_plan, METH_VARARGS,
     "run_plan(steps): run_block and run_head argument tuples (a head's has 13 items), in order, in one call; returns "
     "the number of images a stem found a NaN or an infinity in (where its tuple gives a nonfinite address)."},
    {"run_head", py_run_head, METH_VARARGS,
     "run_head(in, out, n, pixels, k, nout, npad, w, b, lo, hi, threads, isa): 1x1 conv + clamp (w = 0: none) and "
     "global average pool of an NHWC tensor into n x nout (addresses as ints; see mobilenet.fused)."},
    {"gemm_int8", py_gemm_int8, METH_VARARGS,
     "gemm_int8(a, out, P, K, N, w, colsum, scale, bias, lo, hi, isa): one int8 1x1 conv GEMM (addresses as ints; "
     "colsum 0: summed per call; see mobilenet.fused.pack_int8)."},
    {"has_vnni", py_has_vnni, METH_NOARGS, "Whether the avx512 build's int8 GEMM runs AVX512-VNNI micro-kernels."},
    {"supported_isas", py_supported_isas, METH_NOARGS, "The instruction sets this CPU runs: portable, avx2, avx512."},
    {"best_isa", py_best_isa, METH_NOARGS, "The instruction set chosen when none is forced."},
    {"scratch_bytes", py_scratch_bytes, METH_NOARGS, "Bytes of ring, tile and padding buffers held by the pool."},
    {"spin_seconds", py_spin_seconds, METH_NOARGS, "Seconds an idle worker spins before it sleeps."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_kernels",
                                    "Fused MobileNet block kernels (see mobilenet.fused).", -1, methods};

PyMODINIT_FUNC PyInit__fused_kernels(void) {
#ifdef FUSED_X86
    __builtin_cpu_init();
    cpu_has_vnni = isa_supported(ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
#endif
    return PyModule_Create(&module);
}
