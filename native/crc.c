/* crc.c — CRC32C for swap-store checksums (see ma_crc.h).
 *
 * The hardware path runs three independent crc32q streams over thirds of each 24 KiB block
 * (the instruction has 3-cycle latency and 1-cycle throughput) and joins them with a
 * table-free shift by multiplication in GF(2); tails go eight bytes at a time. The software
 * path is the classic slice-by-one table, used on CPUs without SSE4.2 and as the reference in
 * tests.
 */
#include "ma_crc.h"

#include <errno.h>
#include <string.h>

#define POLY 0x82F63B78u

static uint32_t table[256];
static int table_ready;

static void init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[i] = c;
    }
    table_ready = 1;
}

static uint32_t sw(uint32_t crc, const unsigned char *p, size_t n)
{
    if (!table_ready) init_table();
    while (n--) crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

/* Multiply a and b modulo the CRC polynomial (reflected). */
static uint32_t gf2_mul(uint32_t a, uint32_t b)
{
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        if (a & 0x80000000u) prod ^= b;
        a <<= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return prod;
}

/* x^(8n) mod P in reflected form: the factor that shifts a CRC over n zero bytes. */
static uint32_t shift_factor(size_t n)
{
    uint32_t result = 0x80000000u, base = 0x40000000u; /* x^0, x^1 */
    size_t bits = n * 8;
    while (bits) {
        if (bits & 1) result = gf2_mul(result, base);
        base = gf2_mul(base, base);
        bits >>= 1;
    }
    return result;
}

#define BLK 8192 /* bytes per stream per round */
static uint32_t shift_blk;

__attribute__((target("sse4.2"))) static uint32_t hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c0 = crc;
    while (n && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        n--;
    }
    if (n >= 3 * BLK) {
        if (!shift_blk) shift_blk = shift_factor(BLK);
        while (n >= 3 * BLK) {
            uint64_t c1 = 0, c2 = 0;
            const unsigned char *a = p, *b = p + BLK, *c = p + 2 * BLK;
            for (size_t i = 0; i < BLK; i += 8) {
                uint64_t x, y, z;
                memcpy(&x, a + i, 8);
                memcpy(&y, b + i, 8);
                memcpy(&z, c + i, 8);
                c0 = _mm_crc32_u64(c0, x);
                c1 = _mm_crc32_u64(c1, y);
                c2 = _mm_crc32_u64(c2, z);
            }
            uint32_t joined = gf2_mul(shift_blk, (uint32_t)c0) ^ (uint32_t)c1;
            c0 = gf2_mul(shift_blk, joined) ^ (uint32_t)c2;
            p += 3 * BLK;
            n -= 3 * BLK;
        }
    }
    while (n >= 8) {
        uint64_t x;
        memcpy(&x, p, 8);
        c0 = _mm_crc32_u64(c0, x);
        p += 8;
        n -= 8;
    }
    while (n--) c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return (uint32_t)c0;
}

int ma_crc32c_hw(void) { return __builtin_cpu_supports("sse4.2") != 0; }
#else
int ma_crc32c_hw(void) { return 0; }
#endif

int ma_crc32c(uint32_t *crc, const void *buf, size_t len)
{
    if (!crc || (len && !buf)) return -EINVAL;
    uint32_t c = ~*crc;
#if defined(__x86_64__)
    if (ma_crc32c_hw()) c = hw(c, buf, len);
    else c = sw(c, buf, len);
#else
    c = sw(c, buf, len);
#endif
    *crc = ~c;
    return 0;
}

/* Table-path CRC, exposed for tests that compare the two paths. */
int ma_crc32c_sw(uint32_t *crc, const void *buf, size_t len);
int ma_crc32c_sw(uint32_t *crc, const void *buf, size_t len)
{
    if (!crc || (len && !buf)) return -EINVAL;
    *crc = ~sw(~*crc, buf, len);
    return 0;
}
