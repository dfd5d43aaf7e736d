/* strata — dirty bitmaps with a granularity (one bit per granule). */
#ifndef STRATA_BITMAP_PRIVATE_H
#define STRATA_BITMAP_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataBitmap StrataBitmap;

/**
 * strata_bitmap_new:
 * @length: bytes covered (the disk's size)
 * @granularity: bytes per bit, a power of two >= 512
 *
 * Returns: (transfer full): an all-clean bitmap.
 */
StrataBitmap *strata_bitmap_new(uint64_t length, uint64_t granularity);
void strata_bitmap_free(StrataBitmap *bitmap);

uint64_t strata_bitmap_granularity(const StrataBitmap *bitmap);
uint64_t strata_bitmap_length(const StrataBitmap *bitmap);
/* Grows or shrinks the covered length; new area is clean. */
void strata_bitmap_resize(StrataBitmap *bitmap, uint64_t length);

/* Marks every granule touched by [offset, offset+bytes) dirty / clean.
 * reset clears only granules entirely inside the range. */
void strata_bitmap_set(StrataBitmap *bitmap, uint64_t offset, uint64_t bytes);
void strata_bitmap_reset(StrataBitmap *bitmap, uint64_t offset,
                         uint64_t bytes);
void strata_bitmap_set_all(StrataBitmap *bitmap);
void strata_bitmap_clear_all(StrataBitmap *bitmap);

bool strata_bitmap_get(const StrataBitmap *bitmap, uint64_t offset);
/* Dirty bytes (dirty granules × granularity, the last one clipped). */
uint64_t strata_bitmap_count(const StrataBitmap *bitmap);

/**
 * strata_bitmap_next_dirty_area:
 * @offset: (inout): where to start; set to the start of the area found
 * @max_bytes: cap on the area's length (0: no cap)
 * @bytes: (out): the length of the dirty run found
 *
 * Returns: false when nothing at or after @offset is dirty.
 */
bool strata_bitmap_next_dirty_area(const StrataBitmap *bitmap,
                                   uint64_t *offset, uint64_t max_bytes,
                                   uint64_t *bytes);

/* Returns: the first clean byte offset at or after @offset, or
 * the bitmap's length when everything after it is dirty. */
uint64_t strata_bitmap_next_clean(const StrataBitmap *bitmap, uint64_t offset);


#ifdef __cplusplus
}
#endif

#endif
