/* strata — what tests may ask of the blkdebug driver (debug.c) beyond the
 * driver vtable: simulated power loss of a volatile write cache. */
#ifndef STRATA_DEBUG_PRIVATE_H
#define STRATA_DEBUG_PRIVATE_H

#include "block-private.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    /* Every write the cache still holds is lost. */
    STRATA_POWER_CUT_LOSE_ALL,
    /* A random subset of the held writes (chosen with the node's x-seed)
     * reaches the image, in random order and possibly only some of the
     * 512-byte sectors of a write, as a real disk may leave it. */
    STRATA_POWER_CUT_RANDOM_SUBSET,
} StrataPowerCutMode;

/**
 * strata_debug_power_cut:
 * @node: a blkdebug node
 *
 * Simulates the power failing under a blkdebug node opened with
 * x-volatile-cache=on: the held writes are dropped or partly written
 * according to @mode, and from then on every request on @node fails
 * with -EIO (the machine is off).  Close the graph and reopen the image
 * to see what survived.  Callable from plain code (it runs the loop) or
 * from a coroutine.
 *
 * Returns: false with @error when @node is not a blkdebug node, or when
 * writing the surviving data failed.
 */
bool strata_debug_power_cut(StrataNode *node, StrataPowerCutMode mode,
                            GError **error);

/**
 * strata_debug_arm_power_cut:
 * @node: a blkdebug node
 * @writes: write-kind requests (write, write-zeroes, discard, flush)
 *          still let through
 *
 * Arms a power cut that fires by itself: as the write-kind request
 * after @writes more arrives, the power fails as with
 * strata_debug_power_cut(@mode), and that request fails with -EIO like
 * every one after it.  Stepping @writes from 0 cuts an operation at
 * each of its write boundaries in turn.
 */
void strata_debug_arm_power_cut(StrataNode *node, uint64_t writes,
                                StrataPowerCutMode mode);

/* Whether @node has lost power (an armed cut fired, or a cut was made). */
bool strata_debug_powered_off(StrataNode *node);

/* Bytes of write data the volatile cache of @node holds right now. */
uint64_t strata_debug_cached_bytes(StrataNode *node);

#ifdef __cplusplus
}
#endif

#endif
