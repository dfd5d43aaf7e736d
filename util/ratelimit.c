/* strata — a token bucket for job speed limits.
 *
 * Time is cut into slices of 100 ms starting at slice_start; each slice
 * may carry speed/10 bytes (its quota).  A request goes into the current
 * slice when it fits, or when the slice is still empty (so a request
 * larger than a quota is not starved; it then leaves a debt that the
 * following slices pay off).  Otherwise it is placed in the first later
 * slice that can take it, and the caller waits until that slice starts.
 * Unused quota is not saved up: a job idle for a minute gets one slice
 * of burst, not sixty seconds' worth.
 */
#include <glib.h>

#include "ratelimit-private.h"

#define SLICE_NS ((int64_t)100 * 1000 * 1000)

void
strata_ratelimit_init(StrataRateLimit *rl)
{
    g_return_if_fail(rl != NULL);
    rl->speed = 0;
    rl->slice_ns = SLICE_NS;
    rl->slice_start = 0;
    rl->dispatched = 0;
}

void
strata_ratelimit_set_speed(StrataRateLimit *rl, uint64_t speed)
{
    g_return_if_fail(rl != NULL);
    rl->speed = speed;
    if (rl->slice_ns <= 0) {
        rl->slice_ns = SLICE_NS;
    }
}

static uint64_t
slice_quota(const StrataRateLimit *rl)
{
    unsigned __int128 q = (unsigned __int128)rl->speed *
                          (uint64_t)rl->slice_ns / 1000000000u;
    if (q == 0) {
        return 1;
    }
    return q > UINT64_MAX ? UINT64_MAX : (uint64_t)q;
}

static uint64_t
add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* ceil(a / b) for b > 0, without overflowing. */
static uint64_t
div_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

/* Moves slice_start forward by @n slices, paying @n quotas of debt. */
static void
advance_slices(StrataRateLimit *rl, uint64_t n, uint64_t quota)
{
    if (n == 0) {
        return;
    }
    if (n > rl->dispatched / quota) {
        rl->dispatched = 0;
    } else {
        rl->dispatched -= n * quota;
    }
    uint64_t max_n = (uint64_t)(INT64_MAX - rl->slice_start) /
                     (uint64_t)rl->slice_ns;
    rl->slice_start += (int64_t)MIN(n, max_n) * rl->slice_ns;
}

int64_t
strata_ratelimit_calculate_delay(StrataRateLimit *rl, int64_t now_ns,
                                 uint64_t bytes)
{
    g_return_val_if_fail(rl != NULL, 0);
    if (rl->speed == 0) {
        return 0;
    }
    if (rl->slice_ns <= 0) {
        rl->slice_ns = SLICE_NS;
    }

    uint64_t quota = slice_quota(rl);

    /* Catch up with the clock: slices that ended pay off the debt. */
    if (now_ns >= rl->slice_start &&
        (uint64_t)now_ns - (uint64_t)rl->slice_start >=
            (uint64_t)rl->slice_ns) {
        uint64_t elapsed = ((uint64_t)now_ns - (uint64_t)rl->slice_start) /
                           (uint64_t)rl->slice_ns;
        advance_slices(rl, elapsed, quota);
        if (rl->dispatched == 0) {
            /* Idle: the next slice starts now, not on a grid laid down
             * long ago.  A slice already under way would let this
             * request and a whole quota after it go within less than a
             * slice's time, running ahead of the rate. */
            rl->slice_start = now_ns;
        }
    }

    if (rl->dispatched != 0 && add_sat(rl->dispatched, bytes) > quota) {
        /*
         * First later slice m where the request fits after m quotas of
         * debt are paid: either the debt is gone (an empty slice takes
         * anything) or what is left plus @bytes is within one quota.
         */
        uint64_t until_empty = div_up(rl->dispatched, quota);
        uint64_t total = add_sat(rl->dispatched, bytes);
        uint64_t until_fits = div_up(total - quota, quota);
        advance_slices(rl, MAX(1, MIN(until_empty, until_fits)), quota);
    }

    rl->dispatched = add_sat(rl->dispatched, bytes);
    return rl->slice_start > now_ns ? rl->slice_start - now_ns : 0;
}
