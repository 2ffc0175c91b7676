/* ma_crc.h — CRC32C (Castagnoli) of byte ranges, for per-extent checksums in the swap store.
 * Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise; both give the
 * same values (RFC 3720 test vector: "123456789" -> 0xE3069283). Returns 0 or -errno. */
#ifndef MA_CRC_H
#define MA_CRC_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* Continue a CRC32C: *crc holds the running value (start with 0), updated over buf[0..len). */
int ma_crc32c(uint32_t *crc, const void *buf, size_t len);

/* 1 when the hardware path is in use, 0 for the table path. */
int ma_crc32c_hw(void);

#ifdef __cplusplus
}
#endif
#endif
