/* harness.h — a few macros shared by the native test programs: CHECK reports the failing
 * expression with file and line and makes the program exit 1. */
#ifndef MA_TEST_HARNESS_H
#define MA_TEST_HARNESS_H
#include <stdio.h>
#include <stdlib.h>

static int ma_test_failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
            ma_test_failures++;                                                       \
        }                                                                             \
    } while (0)

#define CHECK_EQ(a, b)                                                                \
    do {                                                                              \
        long long _a = (long long)(a), _b = (long long)(b);                           \
        if (_a != _b) {                                                               \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n",      \
                    __FILE__, __LINE__, #a, #b, _a, _b);                              \
            ma_test_failures++;                                                       \
        }                                                                             \
    } while (0)

#define TEST_DONE(name)                                                               \
    do {                                                                              \
        if (ma_test_failures) {                                                       \
            fprintf(stderr, "FAIL %s (%d checks)\n", name, ma_test_failures);         \
            return 1;                                                                 \
        }                                                                             \
        printf("ok %s\n", name);                                                      \
        return 0;                                                                     \
    } while (0)
#endif
