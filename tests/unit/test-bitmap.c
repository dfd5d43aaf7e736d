/* Tests of dirty bitmaps. */
#include <check.h>
#include <glib.h>

#include "bitmap-private.h"
#include "test-util.h"

#define KiB 1024ull
#define MiB (1024 * KiB)
#define GiB (1024 * MiB)
#define TiB (1024 * GiB)

START_TEST(test_new_invalid)
{
    /* Misuse is refused (with a critical), never a crash. */
    ck_assert_ptr_null(strata_bitmap_new(MiB, 256));
    ck_assert_ptr_null(strata_bitmap_new(MiB, 3000));
    ck_assert_ptr_null(strata_bitmap_new(MiB, 0));

    StrataBitmap *b = strata_bitmap_new(0, 512);
    ck_assert_ptr_nonnull(b);
    strata_bitmap_set(b, 0, 100);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    uint64_t off = 0, len = 0;
    ck_assert(!strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(strata_bitmap_next_clean(b, 0), 0);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_set_granules)
{
    StrataBitmap *b = strata_bitmap_new(MiB, 64 * KiB);

    ck_assert_uint_eq(strata_bitmap_granularity(b), 64 * KiB);
    ck_assert_uint_eq(strata_bitmap_length(b), MiB);
    /* One byte dirties its whole granule; a range across a boundary
     * dirties both granules. */
    strata_bitmap_set(b, 65 * KiB, 1);
    ck_assert(strata_bitmap_get(b, 64 * KiB));
    ck_assert(strata_bitmap_get(b, 128 * KiB - 1));
    ck_assert(!strata_bitmap_get(b, 128 * KiB));
    ck_assert(!strata_bitmap_get(b, 64 * KiB - 1));
    ck_assert_uint_eq(strata_bitmap_count(b), 64 * KiB);

    strata_bitmap_set(b, 300 * KiB, 100 * KiB);  /* granules 4, 5, 6 */
    ck_assert_uint_eq(strata_bitmap_count(b), 4 * 64 * KiB);
    strata_bitmap_set(b, 300 * KiB, 0);
    ck_assert_uint_eq(strata_bitmap_count(b), 4 * 64 * KiB);
    /* Setting twice does not count twice. */
    strata_bitmap_set(b, 256 * KiB, 64 * KiB);
    ck_assert_uint_eq(strata_bitmap_count(b), 4 * 64 * KiB);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_reset_partial)
{
    StrataBitmap *b = strata_bitmap_new(MiB, 64 * KiB);

    strata_bitmap_set_all(b);
    ck_assert_uint_eq(strata_bitmap_count(b), MiB);
    /* Covers granule 1 only partly, granule 2 fully. */
    strata_bitmap_reset(b, 100 * KiB, 100 * KiB);
    ck_assert(strata_bitmap_get(b, 64 * KiB));
    ck_assert(!strata_bitmap_get(b, 128 * KiB));
    ck_assert(strata_bitmap_get(b, 192 * KiB));
    ck_assert_uint_eq(strata_bitmap_count(b), MiB - 64 * KiB);
    /* Smaller than a granule: nothing cleared. */
    strata_bitmap_reset(b, 0, 64 * KiB - 1);
    ck_assert(strata_bitmap_get(b, 0));
    strata_bitmap_reset(b, 0, 64 * KiB);
    ck_assert(!strata_bitmap_get(b, 0));
    strata_bitmap_clear_all(b);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    ck_assert(!strata_bitmap_get(b, 500 * KiB));
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_tail_granule)
{
    /* 1000 KiB at 64 KiB: the last granule holds only 40 KiB. */
    StrataBitmap *b = strata_bitmap_new(1000 * KiB, 64 * KiB);

    strata_bitmap_set(b, 999 * KiB, 1);
    ck_assert(strata_bitmap_get(b, 960 * KiB));
    ck_assert_uint_eq(strata_bitmap_count(b), 40 * KiB);
    ck_assert(!strata_bitmap_get(b, 1000 * KiB));  /* past the end */

    /* Reaching the end of the disk clears the partial granule. */
    strata_bitmap_reset(b, 970 * KiB, 30 * KiB);
    ck_assert(strata_bitmap_get(b, 960 * KiB));  /* not from its start */
    strata_bitmap_reset(b, 960 * KiB, 40 * KiB);
    ck_assert(!strata_bitmap_get(b, 960 * KiB));
    ck_assert_uint_eq(strata_bitmap_count(b), 0);

    strata_bitmap_set_all(b);
    ck_assert_uint_eq(strata_bitmap_count(b), 1000 * KiB);
    uint64_t off = 0, len = 0;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(off, 0);
    ck_assert_uint_eq(len, 1000 * KiB);
    ck_assert_uint_eq(strata_bitmap_next_clean(b, 0), 1000 * KiB);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_overflow)
{
    /* A range ending past UINT64_MAX is clipped to the length. */
    StrataBitmap *b = strata_bitmap_new(MiB, 512);

    strata_bitmap_set(b, MiB - 512, UINT64_MAX);
    ck_assert_uint_eq(strata_bitmap_count(b), 512);
    strata_bitmap_set(b, UINT64_MAX - 10, 100);   /* past the end */
    strata_bitmap_set(b, UINT64_MAX, UINT64_MAX);
    ck_assert_uint_eq(strata_bitmap_count(b), 512);
    strata_bitmap_reset(b, 512, UINT64_MAX);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    ck_assert(!strata_bitmap_get(b, UINT64_MAX));
    ck_assert_uint_eq(strata_bitmap_next_clean(b, UINT64_MAX), MiB);
    uint64_t off = UINT64_MAX, len = 0;
    ck_assert(!strata_bitmap_next_dirty_area(b, &off, 0, &len));
    strata_bitmap_free(b);

    /* A length near UINT64_MAX at the largest useful granularity. */
    uint64_t huge = UINT64_MAX - 5;
    b = strata_bitmap_new(huge, 1ull << 62);
    strata_bitmap_set(b, huge - 1, 1);
    ck_assert(strata_bitmap_get(b, huge - 1));
    ck_assert(!strata_bitmap_get(b, 0));
    ck_assert_uint_eq(strata_bitmap_count(b), huge - 3 * (1ull << 62));
    off = 0;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(off, 3 * (1ull << 62));
    ck_assert_uint_eq(off + len, huge);
    ck_assert_uint_eq(strata_bitmap_next_clean(b, huge - 1), huge);
    strata_bitmap_reset(b, 0, UINT64_MAX);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_next_dirty_area)
{
    StrataBitmap *b = strata_bitmap_new(10 * MiB, 64 * KiB);
    uint64_t off, len;

    strata_bitmap_set(b, MiB, MiB);
    strata_bitmap_set(b, 5 * MiB, 64 * KiB);

    off = 0;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(off, MiB);
    ck_assert_uint_eq(len, MiB);

    /* Capped run. */
    off = 0;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 256 * KiB, &len));
    ck_assert_uint_eq(off, MiB);
    ck_assert_uint_eq(len, 256 * KiB);

    /* Starting inside a dirty granule keeps the start. */
    off = MiB + 100;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(off, MiB + 100);
    ck_assert_uint_eq(len, MiB - 100);

    off = 2 * MiB;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(off, 5 * MiB);
    ck_assert_uint_eq(len, 64 * KiB);

    off = 5 * MiB + 64 * KiB;
    ck_assert(!strata_bitmap_next_dirty_area(b, &off, 0, &len));

    ck_assert_uint_eq(strata_bitmap_next_clean(b, 0), 0);
    ck_assert_uint_eq(strata_bitmap_next_clean(b, MiB + 5), 2 * MiB);
    ck_assert_uint_eq(strata_bitmap_next_clean(b, 5 * MiB),
                      5 * MiB + 64 * KiB);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_resize)
{
    StrataBitmap *b = strata_bitmap_new(MiB, 64 * KiB);

    strata_bitmap_set_all(b);
    strata_bitmap_resize(b, 3 * MiB);
    ck_assert_uint_eq(strata_bitmap_length(b), 3 * MiB);
    ck_assert_uint_eq(strata_bitmap_count(b), MiB);
    ck_assert(!strata_bitmap_get(b, MiB));
    ck_assert_uint_eq(strata_bitmap_next_clean(b, 0), MiB);

    /* Shrinking drops the bits past the end; growing back finds the
     * area clean. */
    strata_bitmap_set_all(b);
    strata_bitmap_resize(b, 100 * KiB);
    ck_assert_uint_eq(strata_bitmap_count(b), 100 * KiB);
    strata_bitmap_resize(b, 4 * MiB);
    ck_assert_uint_eq(strata_bitmap_count(b), 128 * KiB);
    ck_assert(!strata_bitmap_get(b, 128 * KiB));
    uint64_t off = 0, len;
    ck_assert(strata_bitmap_next_dirty_area(b, &off, 0, &len));
    ck_assert_uint_eq(len, 128 * KiB);

    strata_bitmap_resize(b, 0);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    strata_bitmap_resize(b, 64 * KiB * 64 * 3 + 1);
    ck_assert_uint_eq(strata_bitmap_count(b), 0);
    strata_bitmap_set_all(b);
    ck_assert_uint_eq(strata_bitmap_count(b), 64 * KiB * 64 * 3 + 1);
    strata_bitmap_free(b);
}
END_TEST

/* Random operations against a plain array of booleans. */
START_TEST(test_model)
{
    const uint64_t gran = 512;
    const uint64_t length = 300 * gran + 77;
    const uint64_t nbits = 301;
    bool model[301] = { false };
    StrataBitmap *b = strata_bitmap_new(length, gran);
    GRand *rand = g_rand_new_with_seed(1234);

    for (int iter = 0; iter < 4000; iter++) {
        uint64_t off = g_rand_int_range(rand, 0, (gint32)length + 1000);
        uint64_t bytes = g_rand_int_range(rand, 0, 40 * gran);
        int op = g_rand_int_range(rand, 0, 10);
        uint64_t end = MIN(off + bytes, length);

        if (op < 5) {
            strata_bitmap_set(b, off, bytes);
            for (uint64_t i = 0; i < nbits && bytes > 0 && off < length;
                 i++) {
                if (i * gran < end && (i + 1) * gran > off) {
                    model[i] = true;
                }
            }
        } else if (op < 9) {
            strata_bitmap_reset(b, off, bytes);
            for (uint64_t i = 0; i < nbits && bytes > 0 && off < length;
                 i++) {
                uint64_t gend = MIN((i + 1) * gran, length);
                if (i * gran >= off && gend <= end) {
                    model[i] = false;
                }
            }
        } else {
            strata_bitmap_set_all(b);
            for (uint64_t i = 0; i < nbits; i++) {
                model[i] = true;
            }
        }

        uint64_t count = 0;
        for (uint64_t i = 0; i < nbits; i++) {
            if (model[i]) {
                count += MIN((i + 1) * gran, length) - i * gran;
            }
        }
        ck_assert_uint_eq(strata_bitmap_count(b), count);

        uint64_t probe = g_rand_int_range(rand, 0, (gint32)length);
        ck_assert_int_eq(strata_bitmap_get(b, probe), model[probe / gran]);

        /* next_clean and next_dirty_area against the model. */
        uint64_t expect_clean = length;
        for (uint64_t i = probe / gran; i < nbits; i++) {
            if (!model[i]) {
                expect_clean = MAX(i * gran, probe);
                break;
            }
        }
        ck_assert_uint_eq(strata_bitmap_next_clean(b, probe), expect_clean);

        uint64_t doff = probe, dlen = 0;
        bool found = strata_bitmap_next_dirty_area(b, &doff, 0, &dlen);
        uint64_t first = nbits;
        for (uint64_t i = probe / gran; i < nbits; i++) {
            if (model[i]) {
                first = i;
                break;
            }
        }
        ck_assert_int_eq(found, first < nbits);
        if (found) {
            uint64_t last = first;
            while (last + 1 < nbits && model[last + 1]) {
                last++;
            }
            ck_assert_uint_eq(doff, MAX(first * gran, probe));
            ck_assert_uint_eq(doff + dlen, MIN((last + 1) * gran, length));
        }
    }
    g_rand_free(rand);
    strata_bitmap_free(b);
}
END_TEST

START_TEST(test_walk_large)
{
    /* Mirror's first pass: 1 TiB at 64 KiB with scattered dirty areas. */
    StrataBitmap *b = strata_bitmap_new(TiB, 64 * KiB);
    uint64_t expect = 0;

    for (uint64_t off = 0; off < TiB; off += 3 * GiB + 64 * KiB * 7) {
        strata_bitmap_set(b, off, 64 * KiB * 5);
        expect += 64 * KiB * 5;
    }
    ck_assert_uint_eq(strata_bitmap_count(b), expect);

    gint64 start = g_get_monotonic_time();
    uint64_t off = 0, len, seen = 0, areas = 0;
    while (strata_bitmap_next_dirty_area(b, &off, MiB, &len)) {
        seen += len;
        areas++;
        off += len;
    }
    gint64 elapsed = g_get_monotonic_time() - start;
    ck_assert_uint_eq(seen, expect);
    ck_assert_uint_gt(areas, 300);
    /* Word scanning does this in about a millisecond. */
    ck_assert_msg(elapsed < 500000, "walk took %" G_GINT64_FORMAT " us",
                  elapsed);
    strata_bitmap_free(b);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/bitmap/new/invalid", test_new_invalid },
        { "/bitmap/set/granules", test_set_granules },
        { "/bitmap/reset/partial", test_reset_partial },
        { "/bitmap/tail-granule", test_tail_granule },
        { "/bitmap/overflow", test_overflow },
        { "/bitmap/next-dirty-area", test_next_dirty_area },
        { "/bitmap/resize", test_resize },
        { "/bitmap/model", test_model },
        { "/bitmap/walk/1tib", test_walk_large },
    };

    return strata_test_main("bitmap", tests, NULL, NULL);
}
