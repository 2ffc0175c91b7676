/* test_crc.c — CRC32C matches the RFC 3720 vector; the hardware and table paths agree on
 * random data of every length and alignment around the block boundaries; chaining over
 * pieces equals one pass. */
#include "../ma_crc.h"
#include "harness.h"

#include <stdlib.h>
#include <string.h>

int ma_crc32c_sw(uint32_t *crc, const void *buf, size_t len);

int main(void)
{
    uint32_t c = 0;
    CHECK_EQ(ma_crc32c(&c, "123456789", 9), 0);
    CHECK_EQ(c, 0xE3069283u);
    c = 0;
    ma_crc32c_sw(&c, "123456789", 9);
    CHECK_EQ(c, 0xE3069283u);
    size_t max = 3 * 8192 * 3 + 100;
    unsigned char *buf = malloc(max + 8);
    srand(7);
    for (size_t i = 0; i < max + 8; i++) buf[i] = (unsigned char)rand();
    size_t lens[] = {0, 1, 7, 8, 9, 4096, 24575, 24576, 24577, 49152 + 13, 3 * 8192 * 3, max};
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        for (int off = 0; off < 8; off += 3) {
            uint32_t a = 0, b = 0;
            ma_crc32c(&a, buf + off, lens[li]);
            ma_crc32c_sw(&b, buf + off, lens[li]);
            CHECK_EQ(a, b);
            uint32_t p = 0;
            size_t half = lens[li] / 3;
            ma_crc32c(&p, buf + off, half);
            ma_crc32c(&p, buf + off + half, lens[li] - half);
            CHECK_EQ(p, a);
        }
    }
    free(buf);
    CHECK_EQ(ma_crc32c(NULL, "x", 1), -22);
    TEST_DONE("test_crc");
}
