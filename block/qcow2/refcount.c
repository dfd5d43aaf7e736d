/* strata — qcow2 refcounts: reading and updating them, first-fit cluster
 * allocation, new refcount blocks and refcount table growth.
 *
 * The invariant kept on disk at every instant: a cluster's refcount is
 * never lower than the number of references to it.  So increments reach
 * the disk before the reference that needs them (the L2 cache depends on
 * the refcount cache after an allocation), and a reference is removed on
 * disk before its decrement (the refcount cache depends on the L2 cache
 * after a free).  A crash then leaks clusters at worst.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "qcow2-private.h"

uint64_t strata_qcow2_refblock_get(const void *block, uint32_t order,
                                   uint64_t index)
{
    const uint8_t *b = block;

    switch (order) {
    case 0:
        return (b[index / 8] >> (index % 8)) & 1;
    case 1:
        return (b[index / 4] >> (2 * (index % 4))) & 3;
    case 2:
        return (b[index / 2] >> (4 * (index % 2))) & 15;
    case 3:
        return b[index];
    case 4:
        return strata_qcow2_be16(b + 2 * index);
    case 5:
        return strata_qcow2_be32(b + 4 * index);
    default:
        return strata_qcow2_be64(b + 8 * index);
    }
}

void strata_qcow2_refblock_set(void *block, uint32_t order, uint64_t index,
                               uint64_t value)
{
    uint8_t *b = block;

    switch (order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = 1u << order;
        unsigned per_byte = 8 / bits;
        unsigned shift = (unsigned)(index % per_byte) * bits;
        uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
        b[index / per_byte] = (uint8_t)((b[index / per_byte] & ~mask) |
                                        ((value << shift) & mask));
        break;
    }
    case 3:
        b[index] = (uint8_t)value;
        break;
    case 4:
        b[2 * index] = (uint8_t)(value >> 8);
        b[2 * index + 1] = (uint8_t)value;
        break;
    case 5:
        strata_qcow2_put_be32(b + 4 * index, (uint32_t)value);
        break;
    default:
        strata_qcow2_put_be64(b + 8 * index, value);
        break;
    }
}

static StrataNode *file_of(StrataQcow2State *s)
{
    return s->node->file->node;
}

static int check_refblock_offset(StrataQcow2State *s, uint64_t rt_index,
                                 uint64_t offset)
{
    if (offset & (s->cluster_size - 1)) {
        strata_qcow2_co_signal_corruption(s,
            "Refblock offset %#" G_GINT64_MODIFIER "x unaligned "
            "(reftable index: %#" G_GINT64_MODIFIER "x)", offset, rt_index);
        return -EIO;
    }
    if (strata_qcow2_overlaps_metadata(s, offset, s->cluster_size)) {
        strata_qcow2_co_signal_corruption(s,
            "Refblock at %#" G_GINT64_MODIFIER "x overlaps other metadata",
            offset);
        return -EIO;
    }
    return 0;
}

int strata_qcow2_co_get_refcount(StrataQcow2State *s, uint64_t cluster,
                                 uint64_t *refcount)
{
    uint64_t rt_index = cluster >> s->refcount_block_bits;
    uint64_t rb_index = cluster & ((1ull << s->refcount_block_bits) - 1);
    uint64_t rb_offset;
    void *block;
    int ret;

    *refcount = 0;
    if (rt_index >= s->refcount_table_size) {
        return 0;
    }
    rb_offset = s->refcount_table[rt_index] & STRATA_QCOW2_REFT_OFFSET_MASK;
    if (!rb_offset) {
        return 0;
    }
    ret = check_refblock_offset(s, rt_index, rb_offset);
    if (ret < 0) {
        return ret;
    }
    ret = strata_qcow2_cache_co_get(s->refcount_cache, rb_offset, &block);
    if (ret < 0) {
        return ret;
    }
    *refcount = strata_qcow2_refblock_get(block, s->refcount_order,
                                          rb_index);
    strata_qcow2_cache_put(s->refcount_cache, &block);
    return 0;
}

/* Whether a read in flight still uses host cluster @cluster (freed
 * under it); the read then lowers the hint again when it ends. */
static bool read_in_flight(StrataQcow2State *s, uint64_t cluster)
{
    uint64_t lo = cluster << s->cluster_bits, hi = lo + s->cluster_size;

    for (GList *l = s->reads; l; l = l->next) {
        StrataQcow2Read *r = l->data;
        if (r->host_start < hi && lo < r->host_end) {
            r->deferred = true;
            return true;
        }
    }
    return false;
}

/* First run of @n clusters with refcount 0, from the hint upward;
 * clusters the table does not reach count as free, clusters a read in
 * flight still uses do not. */
static int find_free(StrataQcow2State *s, uint64_t n, uint64_t *first)
{
    uint64_t i = s->free_cluster_index, start = i, run = 0;

    for (;;) {
        uint64_t rc;
        int ret;

        if (i >= (STRATA_QCOW2_MAX_HOST_OFFSET >> s->cluster_bits)) {
            return -EFBIG;
        }
        ret = strata_qcow2_co_get_refcount(s, i, &rc);
        if (ret < 0) {
            return ret;
        }
        i++;
        if (rc == 0 && !(s->reads && read_in_flight(s, i - 1))) {
            if (run++ == 0) {
                start = i - 1;
            }
            if (run == n) {
                *first = start;
                return 0;
            }
        } else {
            run = 0;
        }
    }
}

/* Writes a freshly built metadata cluster and makes it stable. */
static int write_sync(StrataQcow2State *s, int ign, uint64_t offset,
                      const void *buf, uint64_t len)
{
    return strata_qcow2_co_write_meta(s, ign, offset, buf, len);
}

static int grow_reftable(StrataQcow2State *s, uint64_t min_entries);

/*
 * Makes sure the refcount block covering host cluster @cluster exists.
 * Returns 1 when it had to create metadata (then the caller's free-space
 * search is stale and must restart), 0 when the block was there, or
 * -errno.
 */
static int ensure_refblock(StrataQcow2State *s, uint64_t cluster)
{
    uint64_t rt_index = cluster >> s->refcount_block_bits;
    uint64_t entries_per_block = 1ull << s->refcount_block_bits;
    uint64_t b, b_rt;
    g_autofree uint8_t *block = NULL;
    uint8_t be[8];
    int ret;

    if (rt_index >= s->refcount_table_size) {
        ret = grow_reftable(s, rt_index + 1);
        return ret < 0 ? ret : 1;
    }
    if (s->refcount_table[rt_index] & STRATA_QCOW2_REFT_OFFSET_MASK) {
        return 0;
    }

    /* The reftable entry written below must not overtake L2 updates
     * that are still only in the cache. */
    ret = strata_qcow2_cache_co_flush(s->l2_cache);
    if (ret < 0) {
        return ret;
    }

    ret = find_free(s, 1, &b);
    if (ret < 0) {
        return ret;
    }
    b_rt = b >> s->refcount_block_bits;
    block = g_malloc0(s->cluster_size);
    if (b_rt == rt_index) {
        /* The new block describes itself. */
        strata_qcow2_refblock_set(block, s->refcount_order,
                                  b & (entries_per_block - 1), 1);
    } else {
        ret = ensure_refblock(s, b);
        if (ret != 0) {
            return ret;
        }
        ret = strata_qcow2_co_update_refcount(s, b << s->cluster_bits,
                                              s->cluster_size, 1);
        if (ret < 0) {
            return ret;
        }
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
        if (ret < 0) {
            return ret;
        }
    }

    /* Block first, then the table entry that makes it live. */
    strata_node_debug_event(file_of(s), "refblock_alloc_write");
    ret = write_sync(s, 0, b << s->cluster_bits, block, s->cluster_size);
    if (ret < 0) {
        return ret;
    }
    strata_qcow2_put_be64(be, b << s->cluster_bits);
    strata_node_debug_event(file_of(s), "refblock_alloc_hookup");
    ret = write_sync(s, STRATA_QCOW2_OL_REFCOUNT_TABLE,
                     s->refcount_table_offset + rt_index * 8, be, 8);
    if (ret < 0) {
        return ret;
    }
    s->refcount_table[rt_index] = b << s->cluster_bits;
    s->rt_used_valid = false;
    return 1;
}

/*
 * Replaces the refcount table by a larger one placed, together with the
 * refcount blocks that describe it, past everything the old table
 * reaches.  The switch is the 12-byte header write of offset + size; the
 * old table is freed after it.
 */
static int grow_reftable(StrataQcow2State *s, uint64_t min_entries)
{
    uint64_t per_block = 1ull << s->refcount_block_bits;
    uint64_t entries_per_cluster = s->cluster_size / 8;
    uint64_t file_len, start, table_clusters, blocks, new_entries;
    uint64_t old_offset = s->refcount_table_offset;
    uint64_t old_clusters = strata_qcow2_size_to_clusters(
        s, s->refcount_table_size * 8);
    g_autofree uint64_t *table = NULL;
    g_autofree uint8_t *buf = NULL;
    uint8_t hdr[12];
    int64_t len;
    int ret;

    strata_node_debug_event(file_of(s), "reftable_grow");
    len = strata_node_co_refresh_length(file_of(s));
    if (len < 0) {
        return (int)len;
    }
    file_len = (uint64_t)len;
    start = MAX(strata_qcow2_size_to_clusters(s, file_len),
                s->refcount_table_size * per_block);
    /* Headroom so that growth stays rare. */
    new_entries = MAX(min_entries, s->refcount_table_size * 3 / 2);

    /* Table and blocks must describe themselves: iterate to a fixed
     * point. */
    blocks = 0;
    for (;;) {
        uint64_t end, first_rt, last_rt, nb;
        table_clusters = (new_entries + entries_per_cluster - 1) /
                         entries_per_cluster;
        end = start + table_clusters + blocks;
        first_rt = start / per_block;
        last_rt = (end - 1) / per_block;
        nb = last_rt - first_rt + 1;
        if (last_rt + 1 > new_entries) {
            new_entries = last_rt + 1;
            continue;
        }
        if (nb == blocks) {
            break;
        }
        blocks = nb;
    }
    new_entries = table_clusters * entries_per_cluster;
    if (table_clusters * s->cluster_size > STRATA_QCOW2_MAX_REFTABLE_BYTES) {
        return -EFBIG;
    }
    if (((start + table_clusters + blocks) << s->cluster_bits) >
        STRATA_QCOW2_MAX_HOST_OFFSET) {
        return -EFBIG;
    }

    /* Every dirty block goes to disk first: the new table copies the
     * old one's entries, not the cache. */
    ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    if (ret < 0) {
        return ret;
    }

    buf = g_malloc0(s->cluster_size);
    for (uint64_t k = 0; k < blocks; k++) {
        uint64_t rt = start / per_block + k;
        uint64_t lo = rt * per_block, hi = lo + per_block;
        uint64_t first = MAX(lo, start);
        uint64_t last = MIN(hi, start + table_clusters + blocks);
        memset(buf, 0, s->cluster_size);
        for (uint64_t c = first; c < last; c++) {
            strata_qcow2_refblock_set(buf, s->refcount_order, c - lo, 1);
        }
        uint64_t boff = (start + table_clusters + k) << s->cluster_bits;
        ret = strata_qcow2_co_pre_write_overlap_check(s, 0, boff,
                                                      s->cluster_size);
        if (ret == 0) {
            strata_node_debug_event(file_of(s),
                                    "refblock_alloc_write_blocks");
            ret = strata_node_co_pwrite(file_of(s), boff, s->cluster_size,
                                        buf, 0);
        }
        if (ret < 0) {
            return ret;
        }
    }

    table = g_new0(uint64_t, new_entries);
    memcpy(table, s->refcount_table, s->refcount_table_size * 8);
    for (uint64_t k = 0; k < blocks; k++) {
        table[start / per_block + k] =
            (start + table_clusters + k) << s->cluster_bits;
    }
    {
        g_autofree uint8_t *tb = g_malloc0(table_clusters * s->cluster_size);
        for (uint64_t i = 0; i < new_entries; i++) {
            strata_qcow2_put_be64(tb + i * 8, table[i]);
        }
        ret = strata_node_co_flush(file_of(s));
        if (ret < 0) {
            return ret;
        }
        strata_node_debug_event(file_of(s), "refblock_alloc_write_table");
        ret = write_sync(s, 0, start << s->cluster_bits, tb,
                         table_clusters * s->cluster_size);
        if (ret < 0) {
            return ret;
        }
    }

    strata_qcow2_put_be64(hdr, start << s->cluster_bits);
    strata_qcow2_put_be32(hdr + 8, (uint32_t)table_clusters);
    strata_node_debug_event(file_of(s), "refblock_alloc_switch_table");
    ret = strata_qcow2_co_write_header_bytes(s, STRATA_QCOW2_HDR_REFTABLE,
                                             hdr, sizeof(hdr));
    if (ret < 0) {
        return ret;
    }

    strata_qcow2_refcount_table_set(s, g_steal_pointer(&table), new_entries);
    s->refcount_table_offset = start << s->cluster_bits;
    s->hdr.refcount_table_offset = s->refcount_table_offset;
    s->hdr.refcount_table_clusters = (uint32_t)table_clusters;

    strata_qcow2_co_free_clusters(s, old_offset,
                                  old_clusters << s->cluster_bits);
    return 0;
}

int strata_qcow2_co_update_refcount(StrataQcow2State *s, uint64_t offset,
                                    uint64_t length, int64_t addend)
{
    uint64_t first, last;
    void *block = NULL;
    uint64_t block_offset = 0;
    bool block_dirty = false;
    int ret = 0;

    if (length == 0) {
        return 0;
    }
    first = offset >> s->cluster_bits;
    last = (offset + length - 1) >> s->cluster_bits;

    if (addend < 0) {
        /* The reference is gone from the L2 cache; that must be on disk
         * before the count drops. */
        ret = strata_qcow2_cache_co_set_dependency(s->refcount_cache,
                                                   s->l2_cache);
        if (ret < 0) {
            return ret;
        }
    }

    for (uint64_t c = first; c <= last; c++) {
        uint64_t rt_index = c >> s->refcount_block_bits;
        uint64_t rb_index = c & ((1ull << s->refcount_block_bits) - 1);
        uint64_t rb_offset, rc;

        if (addend > 0 && !(block && rt_index < s->refcount_table_size &&
                            (s->refcount_table[rt_index] &
                             STRATA_QCOW2_REFT_OFFSET_MASK) == block_offset)) {
            /* Not in the block in hand: it may have to be created. */
            while ((ret = ensure_refblock(s, c)) == 1) {
                /* created; the table entry exists now */
            }
            if (ret < 0) {
                goto out;
            }
        } else if (addend <= 0 && rt_index >= s->refcount_table_size) {
            strata_qcow2_co_signal_corruption(s,
                "Freeing cluster %#" G_GINT64_MODIFIER "x that no refcount "
                "block covers", c << s->cluster_bits);
            ret = -EIO;
            goto out;
        }
        rb_offset = s->refcount_table[rt_index] &
                    STRATA_QCOW2_REFT_OFFSET_MASK;
        if (!rb_offset) {
            strata_qcow2_co_signal_corruption(s,
                "Freeing cluster %#" G_GINT64_MODIFIER "x without a "
                "refcount block", c << s->cluster_bits);
            ret = -EIO;
            goto out;
        }
        if (rb_offset != block_offset) {
            if (block_dirty) {
                strata_qcow2_cache_mark_dirty(s->refcount_cache, block);
                block_dirty = false;
            }
            strata_qcow2_cache_put(s->refcount_cache, &block);
            ret = check_refblock_offset(s, rt_index, rb_offset);
            if (ret < 0) {
                goto out;
            }
            ret = strata_qcow2_cache_co_get(s->refcount_cache, rb_offset,
                                            &block);
            if (ret < 0) {
                goto out;
            }
            block_offset = rb_offset;
        }
        rc = strata_qcow2_refblock_get(block, s->refcount_order, rb_index);
        if ((addend < 0 && (uint64_t)-addend > rc) ||
            (addend > 0 && (uint64_t)addend > s->refcount_max - rc)) {
            ret = -EINVAL;
            g_warning("qcow2: refcount of cluster %#" G_GINT64_MODIFIER "x "
                      "would %s", c << s->cluster_bits,
                      addend < 0 ? "drop below zero" : "overflow");
            goto out;
        }
        rc += addend;
        strata_qcow2_refblock_set(block, s->refcount_order, rb_index, rc);
        /* Marked when the walk leaves the block: it stays pinned until
         * then, so nothing writes or drops it meanwhile. */
        block_dirty = true;
        if (rc == 0) {
            if (c < s->free_cluster_index) {
                s->free_cluster_index = c;
            }
            strata_qcow2_cache_discard_cluster(s->l2_cache,
                                               c << s->cluster_bits,
                                               s->cluster_size);
        }
    }
out:
    if (block_dirty) {
        strata_qcow2_cache_mark_dirty(s->refcount_cache, block);
    }
    strata_qcow2_cache_put(s->refcount_cache, &block);
    return ret;
}

int64_t strata_qcow2_co_alloc_clusters(StrataQcow2State *s, uint64_t size)
{
    uint64_t n = strata_qcow2_size_to_clusters(s, size);
    uint64_t first;
    int ret;

    g_return_val_if_fail(n > 0, -EINVAL);

    for (;;) {
        bool restarted = false;
        ret = find_free(s, n, &first);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t c = first; c < first + n; c++) {
            ret = ensure_refblock(s, c);
            if (ret < 0) {
                return ret;
            }
            if (ret == 1) {
                restarted = true;
                break;
            }
        }
        if (!restarted) {
            break;
        }
    }
    if (((first + n) << s->cluster_bits) > STRATA_QCOW2_MAX_HOST_OFFSET) {
        return -EFBIG;
    }
    ret = strata_qcow2_co_update_refcount(s, first << s->cluster_bits,
                                          n << s->cluster_bits, 1);
    if (ret < 0) {
        return ret;
    }
    /* Whatever comes to point at these clusters must reach the disk
     * after their refcounts. */
    /* Before the next call, which may yield: a cluster freed meanwhile
     * (a read releasing it) lowers the hint, and must keep it lowered. */
    s->free_cluster_index = first + n;
    ret = strata_qcow2_cache_co_set_dependency(s->l2_cache,
                                               s->refcount_cache);
    if (ret < 0) {
        return ret;
    }
    return (int64_t)(first << s->cluster_bits);
}

void strata_qcow2_co_free_clusters(StrataQcow2State *s, uint64_t offset,
                                   uint64_t size)
{
    int ret = strata_qcow2_co_update_refcount(s, offset, size, -1);
    if (ret < 0) {
        g_warning("qcow2: could not free clusters at %#" G_GINT64_MODIFIER
                  "x (%s); they leak", offset, g_strerror(-ret));
    }
}

void strata_qcow2_co_free_l2_entry(StrataQcow2State *s, uint64_t entry)
{
    switch (strata_qcow2_l2_entry_type(entry)) {
    case STRATA_QCOW2_CLUSTER_NORMAL:
    case STRATA_QCOW2_CLUSTER_ZERO_ALLOC:
        strata_qcow2_co_free_clusters(s, entry & STRATA_QCOW2_OFFSET_MASK,
                                      s->cluster_size);
        break;
    case STRATA_QCOW2_CLUSTER_COMPRESSED: {
        uint64_t off = entry & s->cluster_offset_mask;
        uint64_t nb = ((entry >> s->csize_shift) & s->csize_mask) + 1;
        uint64_t end = (off & ~511ull) + nb * 512;
        strata_qcow2_co_free_clusters(s, off, end - off);
        break;
    }
    default:
        break;
    }
}

/* Whether the refcount block at reftable index @index counts nothing
 * but (when it lies in its own range) itself. */
static bool refblock_unused(StrataQcow2State *s, uint64_t index,
                            uint64_t offset, const void *block)
{
    uint64_t self = offset >> s->cluster_bits;
    uint64_t per_block = 1ull << s->refcount_block_bits;

    for (uint64_t k = 0; k < per_block; k++) {
        if ((index << s->refcount_block_bits) + k == self) {
            continue;
        }
        if (strata_qcow2_refblock_get(block, s->refcount_order, k)) {
            return false;
        }
    }
    return true;
}

int strata_qcow2_co_shrink_reftable(StrataQcow2State *s)
{
    uint64_t n = s->refcount_table_size;
    g_autofree uint8_t *table = g_malloc0(n * 8);
    g_autofree bool *drop = g_new0(bool, MAX(n, 1));
    bool any = false;
    int ret;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = s->refcount_table[i] & STRATA_QCOW2_REFT_OFFSET_MASK;
        void *block;

        if (!off) {
            continue;
        }
        ret = check_refblock_offset(s, i, off);
        if (ret == 0) {
            ret = strata_qcow2_cache_co_get(s->refcount_cache, off, &block);
        }
        if (ret < 0) {
            return ret;
        }
        drop[i] = refblock_unused(s, i, off, block);
        strata_qcow2_cache_put(s->refcount_cache, &block);
        if (drop[i]) {
            any = true;
        } else {
            strata_qcow2_put_be64(table + i * 8, s->refcount_table[i]);
        }
    }
    if (!any) {
        return 0;
    }
    /* Kept blocks are on disk before the table that keeps only them. */
    ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    if (ret == 0) {
        ret = write_sync(s, STRATA_QCOW2_OL_REFCOUNT_TABLE,
                         s->refcount_table_offset, table, n * 8);
    }
    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = s->refcount_table[i] & STRATA_QCOW2_REFT_OFFSET_MASK;

        if (!drop[i]) {
            continue;
        }
        strata_qcow2_cache_discard_cluster(s->refcount_cache, off,
                                           s->cluster_size);
        s->refcount_table[i] = 0;
        s->rt_used_valid = false;
        /* A block counted by another block is freed there; one that
         * counted itself went with its table entry. */
        if (((off >> s->cluster_bits) >> s->refcount_block_bits) != i) {
            strata_qcow2_co_free_clusters(s, off, s->cluster_size);
        }
    }
    return 0;
}

int64_t strata_qcow2_co_last_cluster_end(StrataQcow2State *s)
{
    int64_t len = strata_node_co_refresh_length(file_of(s));
    uint64_t i;

    if (len < 0) {
        return len;
    }
    for (i = strata_qcow2_size_to_clusters(s, (uint64_t)len); i > 0; i--) {
        uint64_t rc;
        int ret = strata_qcow2_co_get_refcount(s, i - 1, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc) {
            break;
        }
    }
    return (int64_t)(i << s->cluster_bits);
}

/*
 * A refcount table is mostly zeros: one cluster of it (8192 entries at
 * 64 KiB clusters) covers 32 TiB of host file at 16-bit refcounts, and a
 * small image uses its first entries only.  It lives in an anonymous
 * mapping of which only the pages holding a non-zero entry are written:
 * the others stay unbacked and read as zeros, so an open image costs a
 * page of memory for its table, not a cluster.  An entry set later (a new
 * refcount block) backs its page then.
 */
void strata_qcow2_refcount_table_set(StrataQcow2State *s, uint64_t *entries,
                                     uint64_t n)
{
    g_autofree uint64_t *src = entries;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t per_page = page / sizeof(uint64_t);
    size_t bytes = (MAX(n, 1) * sizeof(uint64_t) + page - 1) / page * page;
    uint64_t *t = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (t == MAP_FAILED) {
        /* As g_malloc() does when memory runs out. */
        g_error("%s: failed to map %zu bytes", G_STRLOC, bytes);
    }
    for (uint64_t i = 0; i < n; i += per_page) {
        size_t len = MIN(per_page, n - i) * sizeof(uint64_t);

        if (!strata_buffer_is_zero(src + i, len)) {
            memcpy(t + i, src + i, len);
        }
    }
    strata_qcow2_refcount_table_free(s);
    s->refcount_table = t;
    s->refcount_table_map = bytes;
    s->refcount_table_size = n;
    s->rt_used_valid = false;
}

void strata_qcow2_refcount_table_free(StrataQcow2State *s)
{
    if (s->refcount_table) {
        munmap(s->refcount_table, s->refcount_table_map);
    }
    s->refcount_table = NULL;
    s->refcount_table_map = 0;
}

bool strata_qcow2_refcount_init(StrataQcow2State *s, GError **error)
{
    s->refcount_order = s->hdr.refcount_order;
    s->refcount_block_bits = s->cluster_bits + 3 - s->refcount_order;
    s->refcount_max = s->refcount_order == 6
        ? UINT64_MAX : (1ull << (1u << s->refcount_order)) - 1;
    s->refcount_table_offset = s->hdr.refcount_table_offset;
    s->refcount_table_size =
        ((uint64_t)s->hdr.refcount_table_clusters << s->cluster_bits) / 8;
    s->free_cluster_index = 0;
    return true;
}
