#include <stdint.h>
#include <string.h>
#include <pthread.h>

/* The Python wrapper defines both first (its constants are the ones in force). */
#ifndef DIST
#define DIST 16
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 64
#endif
#define PREFETCH_MAX_BYTES 512

typedef long long v16 __attribute__((vector_size(16), aligned(1), may_alias));

typedef struct {
  const char* weight; const int64_t* rows; const int64_t* offsets; const int64_t* sizes;
  int64_t heads, n, row_bytes, chunk_rows; char* out; int64_t* next_chunk; int64_t bad;
} job_t;

/* Rows [start, end) of the flat [n] id array; id i belongs to head i % heads. Returns the
   position of the first id outside its head's range (the chunk stops there), or -1. */
static inline __attribute__((always_inline))
int64_t run(const job_t* j, int64_t start, int64_t end, const int64_t rb) {
  const int64_t heads = j->heads, n = j->n;
  const int64_t pf_bytes = rb < PREFETCH_MAX_BYTES ? rb : PREFETCH_MAX_BYTES;
  int64_t h = start % heads, hp = (start + DIST) % heads;
  for (int64_t i = start; i < end; i++) {
    if (i + DIST < n) {  /* a prefetch never faults, so an invalid id here is harmless */
      const char* p = j->weight + ((uint64_t)j->rows[i + DIST] + (uint64_t)j->offsets[hp]) * (uint64_t)rb;
      for (int64_t b = 0; b < pf_bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
    }
    if (++hp == heads) hp = 0;
    const int64_t r = j->rows[i];
    if ((uint64_t)r >= (uint64_t)j->sizes[h]) return i;
    const char* src = j->weight + (r + j->offsets[h]) * rb;
    char* dst = j->out + i * rb;
    if (rb % 16 == 0 && rb <= 1024) {
      _Pragma("GCC unroll 64")
      for (int64_t k = 0; k < rb / 16; k++) ((v16*)dst)[k] = ((const v16*)src)[k];
    } else {
      memcpy(dst, src, (size_t)rb);
    }
    if (++h == heads) h = 0;
  }
  return -1;
}

static int64_t run_any(const job_t* j, int64_t start, int64_t end) {
  switch (j->row_bytes) {  /* fixed sizes: the copy becomes straight-line vector moves */
    case 64: return run(j, start, end, 64);
    case 128: return run(j, start, end, 128);
    case 256: return run(j, start, end, 256);
    case 512: return run(j, start, end, 512);
    case 1024: return run(j, start, end, 1024);
    default: return run(j, start, end, j->row_bytes);
  }
}

/* Each thread takes the next chunk of chunk_rows rows until none is left, so a thread that the
   OS schedules out (busy machine) delays the call by one chunk, not by half the work. */
static void* work(void* arg) {
  job_t* j = (job_t*)arg;
  for (;;) {
    const int64_t c = __atomic_fetch_add(j->next_chunk, 1, __ATOMIC_RELAXED);
    const int64_t start = c * j->chunk_rows;
    if (start >= j->n) break;
    const int64_t end = start + j->chunk_rows < j->n ? start + j->chunk_rows : j->n;
    const int64_t bad = run_any(j, start, end);
    if (bad >= 0 && (j->bad < 0 || bad < j->bad)) j->bad = bad;
  }
  return NULL;
}

int64_t engram_gather(const char* weight, const int64_t* rows, const int64_t* offsets,
                      const int64_t* sizes, int64_t heads, int64_t n, int64_t row_bytes,
                      char* out, int64_t threads, int64_t chunk_rows) {
  job_t jobs[MAX_THREADS];
  pthread_t tids[MAX_THREADS];
  int started[MAX_THREADS];
  int64_t next_chunk = 0;
  int64_t bad = -1;
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (chunk_rows < 1) chunk_rows = 1;
  for (int64_t t = 0; t < threads; t++) {
    job_t j = {weight, rows, offsets, sizes, heads, n, row_bytes, chunk_rows, out, &next_chunk, -1};
    jobs[t] = j;
  }
  for (int64_t t = 1; t < threads; t++)
    started[t] = pthread_create(&tids[t], NULL, work, &jobs[t]) == 0;
  work(&jobs[0]);  /* if a thread failed to start, this thread took its chunks */
  for (int64_t t = 1; t < threads; t++)
    if (started[t]) pthread_join(tids[t], NULL);
  for (int64_t t = 0; t < threads; t++)
    if (jobs[t].bad >= 0 && (bad < 0 || jobs[t].bad < bad)) bad = jobs[t].bad;
  return bad;
}
