/* strata — dirty bitmaps with a granularity (one bit per granule).
 *
 * One flat array of 64-bit words.  Scans skip whole clean (or whole
 * dirty) words and find the bit inside a word with ctz, so walking a
 * 1 TiB disk at 64 KiB granularity touches 256 Ki words at most.  The
 * number of dirty bits is kept up to date on every change so that
 * strata_bitmap_count(), which jobs report often, costs nothing.
 *
 * Invariant: bits at or past nbits are always zero.
 */
#include <string.h>
#include <glib.h>

#include "bitmap-private.h"

struct StrataBitmap {
    uint64_t length;
    uint64_t granularity;
    unsigned shift;       /* log2(granularity) */
    uint64_t nbits;
    uint64_t nwords;
    uint64_t dirty;       /* bits set */
    uint64_t *words;
};

#define WORD_BITS 64

static uint64_t
bits_for_length(uint64_t length, unsigned shift)
{
    uint64_t mask = ((uint64_t)1 << shift) - 1;
    return (length >> shift) + ((length & mask) != 0);
}

static uint64_t
words_for_bits(uint64_t nbits)
{
    return nbits / WORD_BITS + (nbits % WORD_BITS != 0);
}

StrataBitmap *
strata_bitmap_new(uint64_t length, uint64_t granularity)
{
    g_return_val_if_fail(granularity >= 512, NULL);
    g_return_val_if_fail((granularity & (granularity - 1)) == 0, NULL);

    StrataBitmap *bitmap = g_new0(StrataBitmap, 1);
    bitmap->length = length;
    bitmap->granularity = granularity;
    bitmap->shift = (unsigned)__builtin_ctzll(granularity);
    bitmap->nbits = bits_for_length(length, bitmap->shift);
    bitmap->nwords = words_for_bits(bitmap->nbits);
    bitmap->words = g_new0(uint64_t, bitmap->nwords);
    return bitmap;
}

void
strata_bitmap_free(StrataBitmap *bitmap)
{
    if (bitmap == NULL) {
        return;
    }
    g_free(bitmap->words);
    g_free(bitmap);
}

uint64_t
strata_bitmap_granularity(const StrataBitmap *bitmap)
{
    g_return_val_if_fail(bitmap != NULL, 0);
    return bitmap->granularity;
}

uint64_t
strata_bitmap_length(const StrataBitmap *bitmap)
{
    g_return_val_if_fail(bitmap != NULL, 0);
    return bitmap->length;
}

/* Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64. */
static uint64_t
word_mask(unsigned lo, unsigned hi)
{
    uint64_t high = hi == WORD_BITS ? ~(uint64_t)0
                                    : (((uint64_t)1 << hi) - 1);
    return high & ~(((uint64_t)1 << lo) - 1);
}

/* Sets or clears bits [first, end), end <= nbits, keeping the count. */
static void
change_bits(StrataBitmap *bitmap, uint64_t first, uint64_t end, bool set)
{
    while (first < end) {
        uint64_t w = first / WORD_BITS;
        unsigned lo = first % WORD_BITS;
        unsigned hi = end - w * WORD_BITS >= WORD_BITS
                      ? WORD_BITS : (unsigned)(end - w * WORD_BITS);
        uint64_t mask = word_mask(lo, hi);
        uint64_t old = bitmap->words[w];
        uint64_t new = set ? (old | mask) : (old & ~mask);

        bitmap->dirty += __builtin_popcountll(new);
        bitmap->dirty -= __builtin_popcountll(old);
        bitmap->words[w] = new;
        first = (w + 1) * WORD_BITS;
    }
}

/* The end of [offset, offset + bytes) clipped to the bitmap's length,
 * without overflowing when offset + bytes passes UINT64_MAX. */
static uint64_t
clip_end(const StrataBitmap *bitmap, uint64_t offset, uint64_t bytes)
{
    if (bytes > bitmap->length - offset) {
        return bitmap->length;
    }
    return offset + bytes;
}

void
strata_bitmap_set(StrataBitmap *bitmap, uint64_t offset, uint64_t bytes)
{
    g_return_if_fail(bitmap != NULL);
    if (bytes == 0 || offset >= bitmap->length) {
        return;
    }
    uint64_t end = clip_end(bitmap, offset, bytes);
    change_bits(bitmap, offset >> bitmap->shift,
                ((end - 1) >> bitmap->shift) + 1, true);
}

void
strata_bitmap_reset(StrataBitmap *bitmap, uint64_t offset, uint64_t bytes)
{
    g_return_if_fail(bitmap != NULL);
    if (bytes == 0 || offset >= bitmap->length) {
        return;
    }
    uint64_t mask = bitmap->granularity - 1;
    uint64_t end = clip_end(bitmap, offset, bytes);
    /* A granule only partly covered keeps its bit: the part outside the
     * range may still be dirty.  The granule that runs past the end of
     * the disk is whole as far as the disk goes. */
    uint64_t first = (offset >> bitmap->shift) + ((offset & mask) != 0);
    uint64_t last = end == bitmap->length ? bitmap->nbits
                                          : end >> bitmap->shift;
    if (first < last) {
        change_bits(bitmap, first, last, false);
    }
}

void
strata_bitmap_set_all(StrataBitmap *bitmap)
{
    g_return_if_fail(bitmap != NULL);
    change_bits(bitmap, 0, bitmap->nbits, true);
}

void
strata_bitmap_clear_all(StrataBitmap *bitmap)
{
    g_return_if_fail(bitmap != NULL);
    memset(bitmap->words, 0, bitmap->nwords * sizeof(uint64_t));
    bitmap->dirty = 0;
}

static bool
test_bit(const StrataBitmap *bitmap, uint64_t bit)
{
    return (bitmap->words[bit / WORD_BITS] >> (bit % WORD_BITS)) & 1;
}

bool
strata_bitmap_get(const StrataBitmap *bitmap, uint64_t offset)
{
    g_return_val_if_fail(bitmap != NULL, false);
    if (offset >= bitmap->length) {
        return false;
    }
    return test_bit(bitmap, offset >> bitmap->shift);
}

uint64_t
strata_bitmap_count(const StrataBitmap *bitmap)
{
    g_return_val_if_fail(bitmap != NULL, 0);
    uint64_t bytes = bitmap->dirty << bitmap->shift;
    uint64_t tail = bitmap->length & (bitmap->granularity - 1);
    if (tail != 0 && test_bit(bitmap, bitmap->nbits - 1)) {
        bytes -= bitmap->granularity - tail;
    }
    return bytes;
}

/*
 * Returns the first bit at or after @from that is set (@want_set) or
 * clear, or nbits when there is none.
 */
static uint64_t
find_next(const StrataBitmap *bitmap, uint64_t from, bool want_set)
{
    if (from >= bitmap->nbits) {
        return bitmap->nbits;
    }
    uint64_t w = from / WORD_BITS;
    uint64_t flip = want_set ? 0 : ~(uint64_t)0;
    uint64_t cur = (bitmap->words[w] ^ flip) &
                   ~(((uint64_t)1 << (from % WORD_BITS)) - 1);

    for (;;) {
        if (cur != 0) {
            uint64_t bit = w * WORD_BITS + __builtin_ctzll(cur);
            return MIN(bit, bitmap->nbits);
        }
        if (++w >= bitmap->nwords) {
            return bitmap->nbits;
        }
        cur = bitmap->words[w] ^ flip;
    }
}

bool
strata_bitmap_next_dirty_area(const StrataBitmap *bitmap, uint64_t *offset,
                              uint64_t max_bytes, uint64_t *bytes)
{
    g_return_val_if_fail(bitmap != NULL, false);
    g_return_val_if_fail(offset != NULL && bytes != NULL, false);

    if (*offset >= bitmap->length) {
        return false;
    }
    uint64_t first = find_next(bitmap, *offset >> bitmap->shift, true);
    if (first >= bitmap->nbits) {
        return false;
    }
    uint64_t start = MAX(*offset, first << bitmap->shift);
    uint64_t clean = find_next(bitmap, first + 1, false);
    /* clean <= nbits, so the shift stays within length + granularity. */
    uint64_t end = clean >= bitmap->nbits ? bitmap->length
                                          : clean << bitmap->shift;
    uint64_t len = end - start;

    if (max_bytes != 0 && len > max_bytes) {
        len = max_bytes;
    }
    *offset = start;
    *bytes = len;
    return true;
}

uint64_t
strata_bitmap_next_clean(const StrataBitmap *bitmap, uint64_t offset)
{
    g_return_val_if_fail(bitmap != NULL, 0);
    if (offset >= bitmap->length) {
        return bitmap->length;
    }
    uint64_t bit = offset >> bitmap->shift;
    if (!test_bit(bitmap, bit)) {
        return offset;
    }
    uint64_t clean = find_next(bitmap, bit + 1, false);
    if (clean >= bitmap->nbits) {
        return bitmap->length;
    }
    return clean << bitmap->shift;
}

void
strata_bitmap_resize(StrataBitmap *bitmap, uint64_t length)
{
    g_return_if_fail(bitmap != NULL);

    uint64_t nbits = bits_for_length(length, bitmap->shift);
    uint64_t nwords = words_for_bits(nbits);

    if (nbits < bitmap->nbits) {
        /* Drop the bits past the new end first, so the count and the
         * zero-tail invariant hold for what remains. */
        change_bits(bitmap, nbits, bitmap->nbits, false);
    }
    if (nwords != bitmap->nwords) {
        bitmap->words = g_renew(uint64_t, bitmap->words, nwords);
        if (nwords > bitmap->nwords) {
            memset(bitmap->words + bitmap->nwords, 0,
                   (nwords - bitmap->nwords) * sizeof(uint64_t));
        }
        bitmap->nwords = nwords;
    }
    bitmap->nbits = nbits;
    bitmap->length = length;
}
