#include <stdint.h>
#include <math.h>

#define DIST 12

/* One touched row at a time: rows[i] (unique) gets gradient g[i*d .. i*d+d). */
/* base**e from a table of base**0..N (libm's pow costs more than the rest of a row's update). The
   table ends where base**N < 1e-18, below which 1 - base**e == 1 in double: beyond it, 0. */
static inline double pw(const double* tab, int64_t N, double base, int64_t e) {
  if (e <= N) return tab[e];
  return tab[N] < 1e-18 ? 0.0 : pow(base, (double)e);
}

void engram_sparse_adam(float* w, float* m, float* v, int32_t* row_step, int32_t* last_step,
                        const int64_t* rows, const float* g, int64_t U, int64_t d, int64_t t,
                        double lr, double b1, double b2, double eps, double wd,
                        const double* tail, int64_t tail_len, const double* powers, int64_t N) {
  const double* p1 = powers;            /* b1**e */
  const double* p2 = powers + (N + 1);  /* b2**e */
  const double* pr = powers + 2 * (N + 1);  /* (b1/sqrt(b2))**e */
  const double r = b1 / sqrt(b2);
  const int64_t last_idx = tail_len - 1;
  const float feps = (float)eps, fb2 = (float)b2, om_b2 = (float)(1.0 - b2);
  const float lerp_w = (float)(1.0 - b1);
  const float decay1 = (float)(1.0 - lr * wd);
  for (int64_t i = 0; i < U; i++) {
    /* Touched rows are scattered over tables of GiBs: the loop is bound by memory latency, so the
       five lines of a row DIST rows ahead are requested now (first two lines of each row). */
    if (i + DIST < U) {
      const int64_t q = rows[i + DIST];
      __builtin_prefetch(w + q * d, 1, 0);
      __builtin_prefetch(m + q * d, 1, 0);
      __builtin_prefetch(v + q * d, 1, 0);
      if (d > 16) {
        __builtin_prefetch(w + q * d + 16, 1, 0);
        __builtin_prefetch(m + q * d + 16, 1, 0);
        __builtin_prefetch(v + q * d + 16, 1, 0);
      }
      __builtin_prefetch(row_step + q, 1, 0);
      __builtin_prefetch(last_step + q, 1, 0);
    }
    const int64_t row = rows[i];
    float* wr = w + row * d;
    float* mr = m + row * d;
    float* vr = v + row * d;
    const float* gr = g + i * d;
    const int64_t last = last_step[row];
    const int64_t k = last > 0 ? t - 1 - last : 0;
    const int64_t n_prev = row_step[row];
    const int64_t n = n_prev + k + 1;
    /* "ahead" applied the whole momentum tail at the last touch: take back the part beyond k steps. */
    const int64_t ib = n_prev + k < last_idx ? n_prev + k : last_idx;
    const float a_back = (float)(lr * (pw(pr, N, r, k) * tail[ib]));
    const float dm = (float)pw(p1, N, b1, k), dv = (float)pw(p2, N, b2, k);
    const float dwk = wd != 0.0 && k > 0 ? powf(decay1, (float)k) : 1.0f;
    const double bc1 = 1.0 - pw(p1, N, b1, n), bc2 = 1.0 - pw(p2, N, b2, n);
    const float step = (float)(lr / bc1), sbc2 = (float)sqrt(bc2);
    const int64_t ia = n < last_idx ? n : last_idx;
    const float a_ahead = (float)(lr * tail[ia]);
    for (int64_t j = 0; j < d; j++) {
      float mj = mr[j], vj = vr[j], wj = wr[j];
      wj += (mj / (sqrtf(vj) + feps)) * a_back;
      mj *= dm;
      vj *= dv;
      if (wd != 0.0) { wj *= dwk; wj *= decay1; }
      const float gj = gr[j];
      /* torch.lerp's two-sided formula */
      mj = lerp_w < 0.5f ? mj + lerp_w * (gj - mj) : gj - (gj - mj) * (1.0f - lerp_w);
      vj = vj * fb2 + om_b2 * gj * gj;
      const float sv = sqrtf(vj);
      wj -= step * (mj / (sv / sbc2 + feps));
      wj -= (mj / (sv + feps)) * a_ahead;
      mr[j] = mj;
      vr[j] = vj;
      wr[j] = wj;
    }
    row_step[row] = (int32_t)n;
    last_step[row] = (int32_t)t;
  }
}
