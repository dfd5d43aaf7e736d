/* strata — a token bucket for job speed limits. */
#ifndef STRATA_RATELIMIT_PRIVATE_H
#define STRATA_RATELIMIT_PRIVATE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Bytes per second with a burst of one slice (100 ms of rate, at least
 * one request).  Embed it; speed 0 means unlimited.
 */
typedef struct StrataRateLimit {
    uint64_t speed;       /* bytes per second, 0 = unlimited */
    int64_t slice_ns;
    int64_t slice_start;  /* ns */
    uint64_t dispatched;  /* bytes taken in this slice */
} StrataRateLimit;

void strata_ratelimit_init(StrataRateLimit *rl);
/* Changes the rate; takes effect for the next request. */
void strata_ratelimit_set_speed(StrataRateLimit *rl, uint64_t speed);

/**
 * strata_ratelimit_calculate_delay:
 * @now_ns: the current CLOCK_MONOTONIC time
 * @bytes: the size of the request about to go
 *
 * Accounts @bytes and returns how many ns the caller must wait before
 * issuing it (0: go now).  Requests larger than a slice are allowed
 * one at a time.
 */
int64_t strata_ratelimit_calculate_delay(StrataRateLimit *rl, int64_t now_ns,
                                         uint64_t bytes);

#ifdef __cplusplus
}
#endif

#endif
