/* Tests of the token bucket behind job speed limits. */
#include <check.h>
#include <glib.h>

#include "ratelimit-private.h"
#include "test-util.h"

#define MS (1000 * 1000ll)
#define T0 (1000 * 1000 * MS)  /* an arbitrary monotonic "now" */

START_TEST(test_unlimited)
{
    StrataRateLimit rl;

    strata_ratelimit_init(&rl);
    for (int i = 0; i < 1000; i++) {
        ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0,
                                                          UINT64_MAX), 0);
    }
    /* Back to unlimited after a limit was set. */
    strata_ratelimit_set_speed(&rl, 1000);
    strata_ratelimit_calculate_delay(&rl, T0, 1000);
    ck_assert_int_gt(strata_ratelimit_calculate_delay(&rl, T0, 1000), 0);
    strata_ratelimit_set_speed(&rl, 0);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1000), 0);
}
END_TEST

START_TEST(test_within_slice)
{
    StrataRateLimit rl;

    /* 1 MB/s: 100 kB per 100 ms slice. */
    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1000 * 1000);
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 10000),
                         0);
    }
    /* The slice is full: the next request goes into the next slice. */
    int64_t d = strata_ratelimit_calculate_delay(&rl, T0 + 10 * MS, 10000);
    ck_assert_int_eq(d, 90 * MS);
    /* So does the one after it, without a further wait. */
    d = strata_ratelimit_calculate_delay(&rl, T0 + 10 * MS, 10000);
    ck_assert_int_eq(d, 90 * MS);
    /* Once the clock reaches that slice, requests that fit go at once. */
    d = strata_ratelimit_calculate_delay(&rl, T0 + 100 * MS, 10000);
    ck_assert_int_eq(d, 0);
}
END_TEST

START_TEST(test_large_request)
{
    StrataRateLimit rl;

    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1000 * 1000);
    /* 350 kB is 3.5 slices' worth: allowed at once into an empty slice. */
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 350000), 0);
    /* The debt is paid off in slices 1..3; slice 3 still holds 50 kB of
     * it, so a 50 kB request fits there.  That fills slice 3, and the
     * next request goes into slice 4. */
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0 + MS, 50000),
                     299 * MS);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0 + MS, 60000),
                     399 * MS);
}
END_TEST

START_TEST(test_large_request_waits_empty)
{
    StrataRateLimit rl;

    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1000 * 1000);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 10000), 0);
    /* Too big for any slice: it waits for the next empty one. */
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 500000),
                     100 * MS);
    /* Its 500 kB are paid in slices 1..5; the next request goes in 6
     * (it would fit beside what is left in slice 5 only if <= 0). */
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1),
                     600 * MS);
}
END_TEST

START_TEST(test_average_rate)
{
    /* A job issuing 64 kB chunks for 10 simulated seconds moves what
     * the speed allows, within one slice of burst. */
    StrataRateLimit rl;
    uint64_t speed = 5 * 1000 * 1000;
    int64_t now = T0;
    uint64_t moved = 0;

    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, speed);
    while (now < T0 + 10000 * MS) {
        int64_t delay = strata_ratelimit_calculate_delay(&rl, now, 65536);
        ck_assert_int_ge(delay, 0);
        now += delay;
        moved += 65536;
        now += MS / 2;  /* the I/O itself */
    }
    double rate = moved / ((now - T0) / 1e9);
    ck_assert_msg(rate <= speed * 1.05 && rate >= speed * 0.9,
                  "rate %.0f for speed %" G_GUINT64_FORMAT, rate, speed);
}
END_TEST

START_TEST(test_idle_no_hoarding)
{
    StrataRateLimit rl;

    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1000 * 1000);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1000), 0);
    /* A minute idle buys one slice of burst, not a minute's worth. */
    int64_t later = T0 + 60000 * MS;
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, later, 100000),
                     0);
    ck_assert_int_gt(strata_ratelimit_calculate_delay(&rl, later, 100000),
                     0);
}
END_TEST

START_TEST(test_extremes)
{
    StrataRateLimit rl;

    /* 1 B/s: quota rounds up to one byte per slice, never zero. */
    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 5), 0);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1),
                     5 * 100 * MS);

    /* Huge requests and speeds neither overflow nor go negative. */
    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, 1);
    strata_ratelimit_calculate_delay(&rl, T0, UINT64_MAX);
    int64_t d = strata_ratelimit_calculate_delay(&rl, T0, UINT64_MAX);
    ck_assert_int_gt(d, 0);
    d = strata_ratelimit_calculate_delay(&rl, INT64_MAX, UINT64_MAX);
    ck_assert_int_ge(d, 0);

    strata_ratelimit_init(&rl);
    strata_ratelimit_set_speed(&rl, UINT64_MAX);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1ull << 59),
                     0);
    ck_assert_int_eq(strata_ratelimit_calculate_delay(&rl, T0, 1ull << 59),
                     0);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/ratelimit/unlimited", test_unlimited },
        { "/ratelimit/slice/fill", test_within_slice },
        { "/ratelimit/large/first", test_large_request },
        { "/ratelimit/large/waits", test_large_request_waits_empty },
        { "/ratelimit/average", test_average_rate },
        { "/ratelimit/idle", test_idle_no_hoarding },
        { "/ratelimit/extremes", test_extremes },
    };

    return strata_test_main("ratelimit", tests, NULL, NULL);
}
