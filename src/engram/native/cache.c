#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int64_t key, idx; } pair_t;

static void insertion_sort(pair_t* p, int64_t n) {
  for (int64_t i = 1; i < n; i++) {
    const pair_t v = p[i]; int64_t j = i;
    while (j > 0 && (p[j - 1].key > v.key || (p[j - 1].key == v.key && p[j - 1].idx > v.idx))) {
      p[j] = p[j - 1]; j--;
    }
    p[j] = v;
  }
}

/* Sort pairs by (key, idx) for keys in [0, 2^63) given in ascending idx order (so a stable sort by key
   is enough): insertion sort for a decode step's few dozen, else LSD radix sort with 11-bit digits
   (3 passes for 16M rows; tmp holds n more pairs). */
static void sort_pairs(pair_t* p, pair_t* tmp, int64_t n, int64_t max_key) {
  if (n <= 64) { insertion_sort(p, n); return; }
  int bits = 0;
  while (bits < 63 && (max_key >> bits) > 0) bits++;
  pair_t *src = p, *dst = tmp;
  int64_t count[2048];
  for (int shift = 0; shift < bits; shift += 11) {
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < n; i++) count[(src[i].key >> shift) & 2047]++;
    int64_t sum = 0;
    for (int b = 0; b < 2048; b++) { const int64_t c = count[b]; count[b] = sum; sum += c; }
    for (int64_t i = 0; i < n; i++) dst[count[(src[i].key >> shift) & 2047]++] = src[i];
    pair_t* t = src; src = dst; dst = t;
  }
  if (src != p) memcpy(p, src, (size_t)n * sizeof *p);
}

#define AHEAD 16  /* ids ahead whose map entry is prefetched; rows are prefetched AHEAD / 2 ahead */

/* Request ids[0..n) against a cache whose slot_of[r] is slot + 1 (0: not cached). Copies every cached
   row to out + i * rb now. Returns M, the number of distinct missed rows, written ascending to
   miss_rows[0..M); the K positions i holding a miss go to miss_pos[0..K) with miss_inv[k] the index of
   their row in miss_rows. counts = {distinct ids, distinct cached ids, K}. scratch holds 2n pairs. An id
   outside [0, num_rows) returns -(i + 1) for the first such position i, before anything is written. */
int64_t engram_cache_split(const int64_t* ids, int64_t n, int64_t num_rows, const int32_t* slot_of,
                           const char* slots, int64_t rb, char* out, pair_t* scratch, int64_t* miss_rows,
                           int64_t* miss_pos, int64_t* miss_inv, int64_t* counts) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= num_rows) return -(i + 1);
  /* The map and the slots are hundreds of MiB: every id costs two cache misses (map entry, then row).
     Prefetching both ahead of use overlaps them instead of queueing one after another. */
  for (int64_t i = 0; i < n && i < AHEAD; i++) __builtin_prefetch(&slot_of[ids[i]]);
  for (int64_t i = 0; i < n; i++) {
    if (i + AHEAD < n) __builtin_prefetch(&slot_of[ids[i + AHEAD]]);
    if (i + AHEAD / 2 < n) {
      const int32_t s2 = slot_of[ids[i + AHEAD / 2]];
      if (s2)
        for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(slots + (int64_t)(s2 - 1) * rb + o);
    }
    const int64_t r = ids[i]; const int32_t s = slot_of[r];
    if (s) memcpy(out + i * rb, slots + (int64_t)(s - 1) * rb, (size_t)rb);
    scratch[i].key = r; scratch[i].idx = i;
  }
  sort_pairs(scratch, scratch + n, n, num_rows - 1);
  int64_t U = 0, H = 0, M = 0, K = 0;
  for (int64_t a = 0; a < n;) {
    const int64_t r = scratch[a].key; int64_t b = a + 1;
    while (b < n && scratch[b].key == r) b++;
    U++;
    if (slot_of[r]) H++;
    else {
      for (int64_t j = a; j < b; j++) { miss_pos[K] = scratch[j].idx; miss_inv[K] = M; K++; }
      miss_rows[M++] = r;
    }
    a = b;
  }
  counts[0] = U; counts[1] = H; counts[2] = K;
  return M;
}

/* File position of logical row x: a placed row (its bit set) sits at slot[rank], an unplaced one after
   all P placed rows, behind the `rank` placed rows with smaller ids. rank = placed rows below x. */
#define PHYSICAL(NAME, T)                                                                             \
void NAME(const int64_t* rows, int64_t n, const uint64_t* bits, const T* before, const T* slot,      \
          int64_t P, int64_t* pos) {                                                                  \
  for (int64_t i = 0; i < n; i++) {                                                                   \
    const int64_t x = rows[i]; const uint64_t word = bits[x >> 6]; const unsigned b = (unsigned)(x & 63); \
    const int64_t rank = (int64_t)before[x >> 6] + __builtin_popcountll(word & ((1ULL << b) - 1ULL));  \
    pos[i] = ((word >> b) & 1ULL) ? (int64_t)slot[rank] : P + x - rank;                               \
  }                                                                                                   \
}
PHYSICAL(engram_physical_i32, int32_t)
PHYSICAL(engram_physical_i64, int64_t)

void engram_scatter_rows(char* out, const char* buf, const int64_t* pos, const int64_t* inv, int64_t k,
                         int64_t rb) {
  for (int64_t j = 0; j < k; j++) memcpy(out + pos[j] * rb, buf + inv[j] * rb, (size_t)rb);
}

/* sorted[0..n) = pos ascending; rank[j] = the place of pos[j] in it (ties keep input order). */
void engram_sort_rank(const int64_t* pos, int64_t n, pair_t* scratch, int64_t* sorted, int64_t* rank) {
  int64_t max_key = 0;
  for (int64_t j = 0; j < n; j++) {
    scratch[j].key = pos[j]; scratch[j].idx = j;
    if (pos[j] > max_key) max_key = pos[j];
  }
  sort_pairs(scratch, scratch + n, n, max_key);
  for (int64_t k = 0; k < n; k++) { sorted[k] = scratch[k].key; rank[scratch[k].idx] = k; }
}
