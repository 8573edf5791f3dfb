/* Prints kvq_quantize_act + kvq_gemm and kvq_dequantize results for fixed pseudo-random blocks of
 * every format, so builds for different CPUs (x86 plain C / AVX2, ARM64 plain C / NEON /
 * dotprod under qemu) can be compared: tests/kernels/test_kvq_builds.py. */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kvq.h"
static uint32_t s = 12345;
static uint32_t rnd(void) { s = s * 1664525u + 1013904223u; return s >> 8; }
static uint16_t f16(float f) { /* small positive normals only */
  uint32_t u; memcpy(&u, &f, 4); int e = ((u >> 23) & 255) - 127 + 15; return (uint16_t)((e << 10) | ((u >> 13) & 1023)); }
int main(void) {
  int types[6] = {2, 3, 8, 12, 13, 14};
  const int N = 9, K = 512;
  for (int t = 0; t < 6; t++) {
    int q = types[t]; int64_t rb = kvq_row_bytes(q, K);
    uint8_t *w = malloc(N * rb);
    for (int64_t i = 0; i < N * rb; i++) w[i] = rnd() & 255;
    int bs = (q >= 12) ? 256 : 32, bb = rb / (K / bs);
    for (int64_t b = 0; b < N * (K / bs); b++) {
      uint8_t *blk = w + b * bb; uint16_t d = f16(0.001f + (rnd() % 1000) * 1e-5f), m = f16(0.0005f + (rnd() % 100) * 1e-5f);
      if (q == 14) memcpy(blk + bb - 2, &d, 2); else { memcpy(blk, &d, 2); if (q == 3 || q == 12 || q == 13) memcpy(blk + 2, &m, 2); }
    }
    for (int M = 1; M <= 5; M += 2) {
      float *x = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N);
      for (int i = 0; i < M * K; i++) x[i] = ((int)(rnd() % 2001) - 1000) / 500.0f;
      void *xq = malloc(kvq_act_bytes(q, M, K));
      kvq_quantize_act(q, x, K, xq, M, K);
      kvq_gemm(q, w, rb, xq, NULL, out, N, M, N, K);
      printf("q%d M%d", q, M); for (int i = 0; i < M * N; i++) printf(" %.6e", out[i]); printf("\n");
      free(x); free(out); free(xq);
    }
    float *deq = malloc(sizeof(float) * N * K); kvq_dequantize(q, w, rb, deq, N, K);
    double sum = 0; for (int i = 0; i < N * K; i++) sum += deq[i] * (i % 7 + 1); printf("q%d deq %.9e\n", q, sum);
    free(deq); free(w);
  }
  return 0;
}
