#include <stddef.h>
#include <stdint.h>

/* Per-row CRC32C loops over a batch of rows. The checksum itself is not computed here: `fn` is the
   address of `crc32c_extend(uint32_t crc, const uint8_t* data, size_t n)` from the kept CRC32C library
   (google-crc32c's libcrc32c: hardware CRC32 instructions, three interleaved streams), so this file
   only saves the per-row round trip through Python. */

typedef uint32_t (*crc_extend_fn)(uint32_t, const uint8_t*, size_t);

/* out[i] = crc32c of row i of `rows` ([n, row_bytes], back to back). */
void engram_row_crcs(void* fn, const uint8_t* rows, int64_t n, int64_t row_bytes, uint32_t* out) {
  crc_extend_fn ext = (crc_extend_fn)fn;
  for (int64_t i = 0; i < n; i++) out[i] = ext(0u, rows + i * row_bytes, (size_t)row_bytes);
}

/* Checks row i of `rows` against sums[pos[i]] (pos NULL: against sums[i]). Writes the indices i of the
   first `max_bad` mismatching rows to `bad` and returns how many rows mismatch in all. */
int64_t engram_verify_rows(void* fn, const uint8_t* rows, int64_t n, int64_t row_bytes, const int64_t* pos,
                           const uint32_t* sums, int64_t* bad, int64_t max_bad) {
  crc_extend_fn ext = (crc_extend_fn)fn;
  int64_t nbad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t want = sums[pos ? pos[i] : i];
    if (ext(0u, rows + i * row_bytes, (size_t)row_bytes) != want) {
      if (nbad < max_bad) bad[nbad] = i;
      nbad++;
    }
  }
  return nbad;
}
