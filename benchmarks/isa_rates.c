/* How many AVX-512 FMAs (vfmadd231ps zmm, 16 float multiply-adds) and VNNI dot products (vpdpbusd zmm, 64 u8 x s8
 * multiply-adds) one core issues per nanosecond, each on 12 independent accumulators so that latency does not
 * bound the loop: the instruction-throughput limits behind benchmarks/int8_ceiling.py's floors (the float32
 * depthwise convs are FMAs in both precisions; the int8 GEMMs are vpdpbusd).
 *
 *     cc -O2 -mavx512f -mfma -mavx512vnni benchmarks/isa_rates.c -o /tmp/isa_rates && /tmp/isa_rates
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ACCUMULATORS 12
#define ITERATIONS 200000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double fma_rate(void) {
    __m512 acc[ACCUMULATORS];
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_set1_ps(1.0f + i * 1e-7f);
    __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
    double start = now();
    for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 12
        for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
    }
    double seconds = now() - start;
    float sink = 0;
    for (int i = 0; i < ACCUMULATORS; i++) sink += _mm512_reduce_add_ps(acc[i]);
    if (sink == 12345.0f) puts(""); /* keeps the results alive */
    return ITERATIONS * ACCUMULATORS / seconds * 1e-9;
}

static double vnni_rate(void) {
    __m512i acc[ACCUMULATORS];
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_set1_epi32(i);
    __m512i a = _mm512_set1_epi32(0x01010101), w = _mm512_set1_epi32(0x01020304);
    double start = now();
    for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 12
        for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, w);
    }
    double seconds = now() - start;
    int sink = 0;
    for (int i = 0; i < ACCUMULATORS; i++) sink += _mm512_reduce_add_epi32(acc[i]);
    if (sink == 12345) puts("");
    return ITERATIONS * ACCUMULATORS / seconds * 1e-9;
}

int main(void) {
    for (int round = 0; round < 3; round++) {
        double f = fma_rate(), v = vnni_rate();
        printf("vfmadd231ps zmm %.2f per ns (%.1f G multiply-adds/s), vpdpbusd zmm %.2f per ns (%.1f G/s)\n", f,
               16 * f, v, 64 * v);
    }
    return 0;
}
