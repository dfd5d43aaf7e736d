/* strata — qcow2 internal snapshots: the snapshot table (read,
 * validated, rewritten), create, apply, delete, and the refcount walk
 * they share.
 *
 * Refcounts are counted per L1 path: every L1 table (active or a
 * snapshot's) adds one to each L2 table it names and one to every data
 * cluster those tables name.  The walks below keep that, and keep the
 * on-disk invariant of refcount.c (never fewer counts than references)
 * plus a COPIED flag in the active tree that never claims a cluster
 * another tree references: the header switch that makes a snapshot
 * reachable follows the COPIED changes and the increments onto the
 * disk, and a flag is set again only after the switch that dropped the
 * other reference.  Between switches the flag may disagree with a count
 * that a crash would leave leaked (see create_locked()).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2-private.h"
#include "qcow2.h"

#define SNAPSHOT_HEADER_LEN 40u
#define SNAPSHOT_EXTRA_KNOWN 24u
#define MAX_SNAPSHOT_EXTRA 1024u
#define MAX_SNAPSHOTS_TABLE (1024ull * 65536)
#define HDR_SNAPSHOTS 60

static StrataNode *file_of(StrataQcow2State *s)
{
    return s->node->file->node;
}

void strata_qcow2_snapshot_free(StrataQcow2Snapshot *sn)
{
    if (!sn) {
        return;
    }
    g_free(sn->id_str);
    g_free(sn->name);
    if (sn->unknown_extra) {
        g_bytes_unref(sn->unknown_extra);
    }
    g_free(sn);
}

void strata_qcow2_snapshot_info_free(StrataQcow2SnapshotInfo *info)
{
    if (!info) {
        return;
    }
    g_free(info->id);
    g_free(info->name);
    g_free(info);
}

uint64_t strata_qcow2_vm_state_offset(const StrataQcow2State *s)
{
    return (uint64_t)s->l1_vm_state_index << (s->cluster_bits + s->l2_bits);
}

int strata_qcow2_check_snapshot_l1(StrataQcow2State *s,
                                   const StrataQcow2Snapshot *sn)
{
    uint64_t bytes = (uint64_t)sn->l1_size * 8;

    if (bytes > STRATA_QCOW2_MAX_L1_BYTES) {
        return -EFBIG;
    }
    if (sn->l1_size &&
        ((sn->l1_table_offset & (s->cluster_size - 1)) ||
         sn->l1_table_offset == 0 ||
         sn->l1_table_offset > (uint64_t)INT64_MAX - bytes)) {
        return -EINVAL;
    }
    return 0;
}

int strata_qcow2_co_read_l1(StrataQcow2State *s, uint64_t offset,
                            uint32_t size, uint64_t **table)
{
    g_autofree uint64_t *t = g_new0(uint64_t, MAX(size, 1u));
    int ret;

    *table = NULL;
    if (size) {
        ret = strata_node_co_pread(file_of(s), offset, (uint64_t)size * 8, t,
                                   0);
        if (ret < 0) {
            return ret;
        }
        for (uint32_t i = 0; i < size; i++) {
            t[i] = GUINT64_FROM_BE(t[i]);
        }
    }
    *table = g_steal_pointer(&t);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The table                                                           */
/* ------------------------------------------------------------------ */

int strata_qcow2_co_read_snapshots(StrataQcow2State *s, GError **error)
{
    uint64_t start = s->hdr.snapshots_offset;
    uint64_t off = start;
    int ret;

    s->snapshots = g_ptr_array_new_with_free_func(
        (GDestroyNotify)strata_qcow2_snapshot_free);
    s->snapshots_size = 0;

    for (uint32_t i = 0; i < s->hdr.nb_snapshots; i++) {
        uint8_t h[SNAPSHOT_HEADER_LEN];
        g_autofree uint8_t *rest = NULL;
        StrataQcow2Snapshot *sn;
        uint32_t extra;
        uint16_t id_len, name_len;
        uint64_t rest_len;

        if (off - start + SNAPSHOT_HEADER_LEN > MAX_SNAPSHOTS_TABLE) {
            goto too_big;
        }
        ret = strata_node_co_pread(file_of(s), off, sizeof(h), h, 0);
        if (ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Failed to read snapshot table: %s",
                        g_strerror(-ret));
            return ret;
        }
        off += sizeof(h);
        extra = strata_qcow2_be32(h + 36);
        id_len = strata_qcow2_be16(h + 12);
        name_len = strata_qcow2_be16(h + 14);
        if (extra > MAX_SNAPSHOT_EXTRA) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                        "Too much extra metadata in snapshot table entry "
                        "%u", i);
            return -EFBIG;
        }
        rest_len = (uint64_t)extra + id_len + name_len;
        if (off - start + rest_len > MAX_SNAPSHOTS_TABLE) {
            goto too_big;
        }
        rest = g_malloc0(MAX(rest_len, 1));
        if (rest_len) {
            ret = strata_node_co_pread(file_of(s), off, rest_len, rest, 0);
            if (ret < 0) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Failed to read snapshot table: %s",
                            g_strerror(-ret));
                return ret;
            }
        }
        off += rest_len;
        off = start + ((off - start + 7) & ~7ull);

        sn = g_new0(StrataQcow2Snapshot, 1);
        sn->l1_table_offset = strata_qcow2_be64(h);
        sn->l1_size = strata_qcow2_be32(h + 8);
        sn->date_sec = strata_qcow2_be32(h + 16);
        sn->date_nsec = strata_qcow2_be32(h + 20);
        sn->vm_clock_nsec = strata_qcow2_be64(h + 24);
        sn->vm_state_size = strata_qcow2_be32(h + 32);
        sn->extra_data_size = extra;
        sn->disk_size = s->hdr.size;
        sn->icount = UINT64_MAX;
        if (extra >= 8) {
            sn->vm_state_size = strata_qcow2_be64(rest);
        }
        if (extra >= 16) {
            sn->disk_size = strata_qcow2_be64(rest + 8);
        }
        if (extra >= 24) {
            sn->icount = strata_qcow2_be64(rest + 16);
        }
        if (extra > SNAPSHOT_EXTRA_KNOWN) {
            sn->unknown_extra = g_bytes_new(rest + SNAPSHOT_EXTRA_KNOWN,
                                            extra - SNAPSHOT_EXTRA_KNOWN);
        }
        sn->id_str = g_strndup((char *)rest + extra, id_len);
        sn->name = g_strndup((char *)rest + extra + id_len, name_len);
        g_ptr_array_add(s->snapshots, sn);
    }
    s->snapshots_size = off - start;
    return 0;

too_big:
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                "Snapshot table is too big");
    return -EFBIG;
}

/* Serialises the in-memory list as QEMU writes it: 24 bytes of known
 * extra data (plus kept unknown extra data), entries 8-byte aligned. */
static uint8_t *build_table(StrataQcow2State *s, uint64_t *len)
{
    GByteArray *b = g_byte_array_new();

    for (guint i = 0; i < s->snapshots->len; i++) {
        StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
        gsize unk = sn->unknown_extra ? g_bytes_get_size(sn->unknown_extra)
                                      : 0;
        size_t id_len = strlen(sn->id_str), name_len = strlen(sn->name);
        uint8_t h[SNAPSHOT_HEADER_LEN + SNAPSHOT_EXTRA_KNOWN];
        static const uint8_t pad[8];

        strata_qcow2_put_be64(h, sn->l1_table_offset);
        strata_qcow2_put_be32(h + 8, sn->l1_size);
        h[12] = (uint8_t)(id_len >> 8);
        h[13] = (uint8_t)id_len;
        h[14] = (uint8_t)(name_len >> 8);
        h[15] = (uint8_t)name_len;
        strata_qcow2_put_be32(h + 16, sn->date_sec);
        strata_qcow2_put_be32(h + 20, sn->date_nsec);
        strata_qcow2_put_be64(h + 24, sn->vm_clock_nsec);
        strata_qcow2_put_be32(h + 32, sn->vm_state_size > UINT32_MAX
                                      ? 0 : (uint32_t)sn->vm_state_size);
        /* What is written is what the entry has from now on. */
        sn->extra_data_size = (uint32_t)(SNAPSHOT_EXTRA_KNOWN + unk);
        strata_qcow2_put_be32(h + 36, sn->extra_data_size);
        strata_qcow2_put_be64(h + 40, sn->vm_state_size);
        strata_qcow2_put_be64(h + 48, sn->disk_size);
        strata_qcow2_put_be64(h + 56, sn->icount);
        g_byte_array_append(b, h, sizeof(h));
        if (unk) {
            g_byte_array_append(b, g_bytes_get_data(sn->unknown_extra, NULL),
                                (guint)unk);
        }
        g_byte_array_append(b, (const uint8_t *)sn->id_str, (guint)id_len);
        g_byte_array_append(b, (const uint8_t *)sn->name, (guint)name_len);
        if (b->len & 7) {
            g_byte_array_append(b, pad, 8 - (b->len & 7));
        }
    }
    *len = b->len;
    return g_byte_array_free(b, FALSE);
}

/* Flushes both caches: dependencies then settle, and what follows can
 * order its own writes.  Both caches are written before the one flush
 * (a dependency still flushes in between, when the cache that has it
 * writes), so that a barrier costs one fdatasync, not two. */
static int flush_all(StrataQcow2State *s)
{
    int ret = strata_qcow2_cache_co_write(s->l2_cache);
    int ret2 = strata_qcow2_cache_co_write(s->refcount_cache);

    if (ret == 0) {
        ret = ret2;
    }
    ret2 = strata_node_co_flush(s->node->file->node);
    return ret < 0 ? ret : ret2;
}

/* Makes whatever was pending before an operation stable, in its order,
 * and leaves no dependency behind: each cache's _co_flush settles its
 * own.  Costs no fdatasync when nothing was written since the last. */
static int settle_all(StrataQcow2State *s)
{
    int ret = strata_qcow2_cache_co_flush(s->l2_cache);

    return ret < 0 ? ret : strata_qcow2_cache_co_flush(s->refcount_cache);
}

/*
 * One barrier for the changes an operation made since settle_all(),
 * when they need no order among themselves: none makes a reference
 * reachable that a count on disk could miss, so any subset of them
 * surviving a crash leaks clusters at worst.  The dependencies their
 * allocations and frees recorded would cost an fdatasync each; they go.
 */
static int flush_unordered(StrataQcow2State *s)
{
    strata_qcow2_cache_drop_dependency(s->l2_cache);
    strata_qcow2_cache_drop_dependency(s->refcount_cache);
    return flush_all(s);
}

/* A table staged by stage_table(), not yet named by the header. */
typedef struct {
    uint64_t off;       /* 0: no snapshot left, no table */
    uint64_t len;
} StagedTable;

/*
 * Writes s->snapshots as a new table in new clusters, unflushed: the
 * caller makes it stable (with whatever else the switch needs) and then
 * calls switch_table().  Only the table's bytes are written, as QEMU
 * does; the rest of its last cluster is never read.
 */
static int stage_table(StrataQcow2State *s, StagedTable *t)
{
    g_autofree uint8_t *buf = build_table(s, &t->len);
    int64_t off;
    int ret;

    t->off = 0;
    if (t->len > MAX_SNAPSHOTS_TABLE) {
        return -EFBIG;
    }
    if (!s->snapshots->len) {
        return 0;
    }
    off = strata_qcow2_co_alloc_clusters(s, t->len);
    if (off < 0) {
        return (int)off;
    }
    ret = strata_qcow2_co_pwrite_meta(s, 0, (uint64_t)off, buf, t->len);
    if (ret < 0) {
        strata_qcow2_co_free_clusters(s, (uint64_t)off, t->len);
        return ret;
    }
    t->off = (uint64_t)off;
    return 0;
}

/* Gives back the clusters of a table that never became current. */
static void drop_staged_table(StrataQcow2State *s, const StagedTable *t)
{
    if (t->off) {
        strata_qcow2_co_free_clusters(s, t->off, t->len);
    }
}

/*
 * Switches the header to the staged table (nb_snapshots + offset in one
 * synchronous write), then frees the old table.  The staged table and
 * everything it needs must be stable already.  A crash leaves the old
 * or the new table, with leaks at worst.
 */
static int switch_table(StrataQcow2State *s, const StagedTable *t)
{
    uint64_t old_off = s->hdr.snapshots_offset;
    uint64_t old_size = s->snapshots_size;
    bool had = s->hdr.nb_snapshots > 0;
    uint8_t hdr[12];
    int ret;

    strata_qcow2_put_be32(hdr, s->snapshots->len);
    strata_qcow2_put_be64(hdr + 4, t->off);
    ret = strata_qcow2_co_write_header_bytes(s, HDR_SNAPSHOTS, hdr,
                                             sizeof(hdr));
    if (ret < 0) {
        return ret;
    }
    s->hdr.nb_snapshots = s->snapshots->len;
    s->hdr.snapshots_offset = t->off;
    s->snapshots_size = t->len;
    if (had && old_off) {
        strata_qcow2_co_free_clusters(s, old_off, MAX(old_size, 1));
    }
    return 0;
}

/* The table of s->snapshots made current: staged, made stable with
 * its clusters' counts, switched. */
static int write_table(StrataQcow2State *s)
{
    StagedTable t;
    int ret = stage_table(s, &t);

    if (ret == 0) {
        ret = flush_all(s);
    }
    if (ret == 0) {
        ret = switch_table(s, &t);
    }
    if (ret < 0) {
        drop_staged_table(s, &t);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* The refcount walk                                                   */
/* ------------------------------------------------------------------ */

typedef enum {
    COPIED_KEEP,   /* leave the flags alone */
    COPIED_EXACT,  /* COPIED ⇔ refcount 1, in L2 entries and @l1 */
    COPIED_CLEAR,  /* COPIED off everywhere (refcounts about to rise) */
} CopiedMode;

static bool copied_changes(CopiedMode mode, uint64_t *entry, uint64_t rc)
{
    uint64_t e = *entry;

    if (mode == COPIED_KEEP) {
        return false;
    }
    if (rc == 1 && mode == COPIED_EXACT) {
        e |= STRATA_QCOW2_OFLAG_COPIED;
    } else {
        e &= ~STRATA_QCOW2_OFLAG_COPIED;
    }
    if (e == *entry) {
        return false;
    }
    *entry = e;
    return true;
}

/* Contiguous host clusters whose counts change together: one
 * strata_qcow2_co_update_refcount() for a run instead of one per
 * cluster (a preallocated image is one long run). */
typedef struct {
    uint64_t start, len;
} CountRun;

static int run_flush(StrataQcow2State *s, CountRun *run, int addend)
{
    int ret = 0;

    if (run->len) {
        ret = strata_qcow2_co_update_refcount(s, run->start, run->len,
                                              addend);
        run->len = 0;
    }
    return ret;
}

static int run_add(StrataQcow2State *s, CountRun *run, uint64_t host,
                   uint64_t len, int addend)
{
    int ret = 0;

    if (run->len && run->start + run->len == host) {
        run->len += len;
        return 0;
    }
    ret = run_flush(s, run, addend);
    run->start = host;
    run->len = len;
    return ret;
}

/* Refcount reads along a walk: the refblock last looked up, peeked in
 * the cache (not pinned), so a read costs no lookup while the walk
 * stays in one block.  Valid until the walk yields: forget() before
 * anything that may. */
typedef struct {
    uint64_t rb_offset;
    const void *block;
} CountPeek;

static void peek_forget(CountPeek *p)
{
    p->block = NULL;
}

static int peek_refcount(StrataQcow2State *s, CountPeek *p, uint64_t host,
                         uint64_t *rc)
{
    uint64_t cluster = host >> s->cluster_bits;
    uint64_t rt_index = cluster >> s->refcount_block_bits;
    uint64_t rb = rt_index < s->refcount_table_size
        ? s->refcount_table[rt_index] & STRATA_QCOW2_REFT_OFFSET_MASK : 0;

    if (rb && !(p->block && p->rb_offset == rb)) {
        /* Validated when it was loaded, as every cached refblock. */
        p->block = strata_qcow2_cache_peek(s->refcount_cache, rb);
        p->rb_offset = rb;
    }
    if (rb && p->block) {
        *rc = strata_qcow2_refblock_get(
            p->block, s->refcount_order,
            cluster & ((1ull << s->refcount_block_bits) - 1));
        return 0;
    }
    peek_forget(p);
    return strata_qcow2_co_get_refcount(s, cluster, rc);
}

/*
 * Adds @addend to every L2 table @l1 names and to every cluster those
 * tables name, then (COPIED_EXACT) makes the COPIED flags of the L2
 * entries and of @l1's entries agree with the new refcounts.  L2 tables
 * change through the cache; @l1 only in memory (*@l1_modified says
 * whether the caller must write it).  Without COPIED_EXACT no count is
 * read, and data clusters are counted in contiguous runs.
 */
static int update_tree_refcounts(StrataQcow2State *s, uint64_t *l1,
                                 uint32_t l1_size, int addend,
                                 CopiedMode mode, bool *l1_modified)
{
    uint64_t cs = s->cluster_size;
    bool exact = mode == COPIED_EXACT;
    CountRun run = { 0 };
    CountPeek peek = { 0 };
    int ret;

    *l1_modified = false;
    if (exact) {
        /* Flags set (or cleared) for the new counts must not reach the
         * disk before them. */
        ret = strata_qcow2_cache_co_set_dependency(s->l2_cache,
                                                   s->refcount_cache);
        if (ret < 0) {
            return ret;
        }
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2 = l1[i] & STRATA_QCOW2_OFFSET_MASK;
        uint64_t rc = 2;

        if (!l2) {
            continue;
        }
        if ((l2 & (cs - 1)) ||
            strata_qcow2_overlaps_metadata(s, l2, cs)) {
            strata_qcow2_co_signal_corruption(s,
                "L2 table offset %#" G_GINT64_MODIFIER "x invalid (L1 index "
                "%u)", l2, i);
            return -EIO;
        }
        for (uint64_t sl = 0; sl < cs; sl += s->l2_slice_size) {
            uint64_t *slice;
            bool dirty = false;

            peek_forget(&peek);
            ret = strata_qcow2_cache_co_get(s->l2_cache, l2 + sl,
                                            (void **)&slice);
            if (ret < 0) {
                return ret;
            }
            for (uint64_t j = 0; j < s->l2_slice_entries; j++) {
                uint64_t e = strata_qcow2_l2_get(s, slice, j);
                uint64_t host = e & STRATA_QCOW2_OFFSET_MASK;

                switch (strata_qcow2_l2_entry_type(e)) {
                case STRATA_QCOW2_CLUSTER_COMPRESSED: {
                    uint64_t off = e & s->cluster_offset_mask;
                    uint64_t nb = ((e >> s->csize_shift) & s->csize_mask) + 1;
                    uint64_t end = (off & ~511ull) + nb * 512;
                    if (addend) {
                        /* Never a run: compressed data shares clusters. */
                        ret = run_flush(s, &run, addend);
                        if (ret == 0) {
                            ret = strata_qcow2_co_update_refcount(
                                s, off, end - off, addend);
                        }
                        peek_forget(&peek);
                        if (ret < 0) {
                            goto fail;
                        }
                    }
                    /* Never COPIED. */
                    rc = 2;
                    break;
                }
                case STRATA_QCOW2_CLUSTER_NORMAL:
                case STRATA_QCOW2_CLUSTER_ZERO_ALLOC:
                    if (host & (cs - 1)) {
                        strata_qcow2_co_signal_corruption(s,
                            "Cluster offset %#" G_GINT64_MODIFIER "x "
                            "unaligned in L2 table %#" G_GINT64_MODIFIER "x",
                            host, l2);
                        ret = -EIO;
                        goto fail;
                    }
                    if (addend && !exact) {
                        ret = run_add(s, &run, host, cs, addend);
                        peek_forget(&peek);
                    } else if (addend) {
                        ret = strata_qcow2_co_update_refcount(s, host, cs,
                                                              addend);
                        peek_forget(&peek);
                    }
                    if (ret == 0 && exact) {
                        ret = peek_refcount(s, &peek, host, &rc);
                    }
                    if (ret < 0) {
                        goto fail;
                    }
                    break;
                default:
                    continue;
                }
                if (copied_changes(mode, &e, rc)) {
                    strata_qcow2_l2_set(s, slice, j, e);
                    dirty = true;
                }
            }
            if (dirty) {
                strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
            }
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
            continue;
fail:
            if (dirty) {
                strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
            }
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
            return ret;
        }
        if (addend) {
            ret = run_add(s, &run, l2, cs, addend);
            if (ret == 0 && exact) {
                ret = run_flush(s, &run, addend);
            }
            peek_forget(&peek);
            if (ret < 0) {
                return ret;
            }
        }
        if (exact) {
            ret = peek_refcount(s, &peek, l2, &rc);
            if (ret < 0) {
                return ret;
            }
        }
        if (copied_changes(mode, &l1[i], rc)) {
            *l1_modified = true;
        }
    }
    return run_flush(s, &run, addend);
}

/* Writes the whole active L1 from s->l1_table, flushed if @flush. */
static int write_active_l1(StrataQcow2State *s, bool flush)
{
    uint64_t bytes = (uint64_t)s->l1_size * 8;
    g_autofree uint8_t *buf = g_malloc0(MAX(bytes, 1));

    for (uint32_t i = 0; i < s->l1_size; i++) {
        strata_qcow2_put_be64(buf + (uint64_t)i * 8, s->l1_table[i]);
    }
    if (!bytes) {
        return 0;
    }
    strata_node_debug_event(s->node->file->node, "l1_update");
    return flush ? strata_qcow2_co_write_meta(s, STRATA_QCOW2_OL_ACTIVE_L1,
                                              s->l1_table_offset, buf, bytes)
                 : strata_qcow2_co_pwrite_meta(s, STRATA_QCOW2_OL_ACTIVE_L1,
                                               s->l1_table_offset, buf,
                                               bytes);
}

/*
 * After a switch (header or active L1) that dropped references, and
 * the decrements that followed it: COPIED set again where the active
 * tree owns a cluster alone now, in one barrier with those decrements.
 * A flag is set only where the count in memory is 1, so nothing but the
 * active tree references that cluster any more (the switch before is
 * stable): a crash that keeps the flag and loses the decrement leaves a
 * leak that qemu-img check -r leaks repairs, flag included, and never a
 * shared cluster written in place.  @write_l1: the active L1 on disk may
 * differ from s->l1_table (a write of it failed), so it is written
 * whether or not a flag changes now.
 */
static int recompute_active_copied(StrataQcow2State *s, bool write_l1)
{
    bool l1_modified;
    int ret;

    /* The decrements recorded that their counts follow the L2 changes;
     * the switch already made that so. */
    strata_qcow2_cache_drop_dependency(s->refcount_cache);
    ret = update_tree_refcounts(s, s->l1_table, s->l1_size, 0,
                                COPIED_EXACT, &l1_modified);
    if (ret == 0 && (l1_modified || write_l1)) {
        ret = write_active_l1(s, false);
    }
    if (ret == 0) {
        ret = flush_unordered(s);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Operations                                                          */
/* ------------------------------------------------------------------ */

static StrataQcow2State *qcow2_state(StrataNode *node, GError **error)
{
    if (!node || node->drv != &strata_driver_qcow2 || !node->opaque) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Node '%s' is not a qcow2 node",
                    node ? node->node_name : "");
        return NULL;
    }
    return node->opaque;
}

static bool check_writable(StrataQcow2State *s, GError **error)
{
    if (!s->writable) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Node '%s' is read-only", s->node->node_name);
        return false;
    }
    if (s->corrupt) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "qcow2 image '%s' is corrupt; run a check with repair "
                    "first", s->node->node_name);
        return false;
    }
    return true;
}

/* The index of the snapshot with ID @id, else the first named @id. */
static int find_snapshot(StrataQcow2State *s, const char *id)
{
    for (guint i = 0; i < s->snapshots->len; i++) {
        StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
        if (!strcmp(sn->id_str, id)) {
            return (int)i;
        }
    }
    for (guint i = 0; i < s->snapshots->len; i++) {
        StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
        if (!strcmp(sn->name, id)) {
            return (int)i;
        }
    }
    return -1;
}

GPtrArray *strata_qcow2_snapshot_list(StrataNode *node, GError **error)
{
    StrataQcow2State *s = qcow2_state(node, error);
    GPtrArray *a;

    if (!s) {
        return NULL;
    }
    a = g_ptr_array_new_with_free_func(
        (GDestroyNotify)strata_qcow2_snapshot_info_free);
    for (guint i = 0; i < s->snapshots->len; i++) {
        StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
        StrataQcow2SnapshotInfo *info = g_new0(StrataQcow2SnapshotInfo, 1);
        info->id = g_strdup(sn->id_str);
        info->name = g_strdup(sn->name);
        info->vm_state_size = sn->vm_state_size;
        info->date_sec = sn->date_sec;
        info->date_nsec = sn->date_nsec;
        info->vm_clock_nsec = sn->vm_clock_nsec;
        info->icount = sn->icount;
        info->disk_size = sn->disk_size;
        g_ptr_array_add(a, info);
    }
    return a;
}

static void set_io_error(GError **error, const char *what, int ret)
{
    g_set_error(error, STRATA_ERROR,
                ret == -EIO ? STRATA_ERROR_CORRUPT : STRATA_ERROR_IO,
                "%s: %s", what, g_strerror(-ret));
}

static bool create_locked(StrataQcow2State *s,
                          const StrataQcow2SnapshotInfo *info,
                          GError **error)
{
    StrataQcow2Snapshot *sn;
    g_autofree char *id = NULL;
    g_autofree uint8_t *l1_copy = NULL;
    uint64_t l1_bytes = 0;
    StagedTable table = { 0 };
    const char *what;
    bool l1_modified;
    int64_t off;
    int ret;

    if (info->id && *info->id) {
        for (guint i = 0; i < s->snapshots->len; i++) {
            StrataQcow2Snapshot *o = g_ptr_array_index(s->snapshots, i);
            if (!strcmp(o->id_str, info->id)) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                            "Snapshot with ID '%s' already exists",
                            info->id);
                return false;
            }
        }
        id = g_strdup(info->id);
    } else {
        unsigned long max = 0;
        for (guint i = 0; i < s->snapshots->len; i++) {
            StrataQcow2Snapshot *o = g_ptr_array_index(s->snapshots, i);
            unsigned long v = strtoul(o->id_str, NULL, 10);
            max = MAX(max, v);
        }
        id = g_strdup_printf("%lu", max + 1);
    }
    if (strlen(id) > G_MAXUINT16 || strlen(info->name) > G_MAXUINT16) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Snapshot ID or name too long");
        return false;
    }
    if (s->snapshots->len >= STRATA_QCOW2_MAX_SNAPSHOTS) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Too many snapshots (at most %u)",
                    STRATA_QCOW2_MAX_SNAPSHOTS);
        return false;
    }
    if (s->refcount_order == 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Internal snapshots need refcounts wider than one bit");
        return false;
    }

    /* What was pending keeps its own order; from here on the caches
     * hold this snapshot's changes only. */
    ret = settle_all(s);
    if (ret < 0) {
        set_io_error(error, "Could not flush qcow2 metadata", ret);
        return false;
    }

    sn = g_new0(StrataQcow2Snapshot, 1);
    sn->id_str = g_steal_pointer(&id);
    sn->name = g_strdup(info->name);
    sn->l1_size = s->l1_size;
    sn->disk_size = s->hdr.size;
    sn->vm_state_size = info->vm_state_size;
    sn->vm_clock_nsec = info->vm_clock_nsec;
    sn->icount = info->icount;
    if (info->date_sec || info->date_nsec) {
        sn->date_sec = info->date_sec;
        sn->date_nsec = info->date_nsec;
    } else {
        gint64 now = g_get_real_time();
        sn->date_sec = (uint32_t)(now / G_USEC_PER_SEC);
        sn->date_nsec = (uint32_t)((now % G_USEC_PER_SEC) * 1000);
    }

    /*
     * Everything up to the header switch is one batch behind one flush:
     * the L1 copy, one more count along the active tree with COPIED off
     * in it, the new table.  None of it is reachable before the header
     * names the table, so whatever part of it a crash keeps, the image
     * is the old one with leaks: counts that rose for a snapshot that
     * does not exist, and COPIED either off on a cluster counted once
     * (a needless copy on the next write) or still on where the extra
     * count is the leak (the cluster really is the active tree's
     * alone).  `qemu-img check -r leaks` repairs both.  What the header
     * switch needs (counts up, COPIED off, table and copy written) is
     * stable before it.
     */
    if (sn->l1_size) {
        /* Verbatim, flags included, before they go from the active L1. */
        l1_bytes = (uint64_t)sn->l1_size * 8;
        l1_copy = g_malloc0(l1_bytes);
        for (uint32_t i = 0; i < sn->l1_size; i++) {
            strata_qcow2_put_be64(l1_copy + (uint64_t)i * 8, s->l1_table[i]);
        }
        off = strata_qcow2_co_alloc_clusters(s, l1_bytes);
        if (off < 0) {
            set_io_error(error, "Could not allocate the snapshot L1",
                         (int)off);
            strata_qcow2_snapshot_free(sn);
            return false;
        }
        sn->l1_table_offset = (uint64_t)off;
    }
    ret = update_tree_refcounts(s, s->l1_table, s->l1_size, 1, COPIED_CLEAR,
                                &l1_modified);
    if (ret < 0) {
        what = "Could not update refcounts for the snapshot";
        goto fail;
    }
    /* Written before the entry exists: the overlap check would take
     * the copy for the snapshot's own L1. */
    if (l1_bytes) {
        ret = strata_qcow2_co_pwrite_meta(s, 0, sn->l1_table_offset,
                                          l1_copy, l1_bytes);
        if (ret < 0) {
            what = "Could not write the snapshot L1";
            goto fail;
        }
    }
    g_ptr_array_add(s->snapshots, sn);
    ret = stage_table(s, &table);
    if (ret == 0 && l1_modified) {
        ret = write_active_l1(s, false);
    }
    if (ret == 0) {
        ret = flush_unordered(s);
    }
    if (ret == 0) {
        ret = switch_table(s, &table);
    }
    if (ret < 0) {
        g_ptr_array_steal_index(s->snapshots, s->snapshots->len - 1);
        drop_staged_table(s, &table);
        what = "Could not write the snapshot table";
        goto fail;
    }
    return true;

fail:
    /* The counts taken so far leak; nothing points at the copy.
     * COPIED flags cleared so far (on disk, or only in memory) follow
     * the refcounts again, set only where no count rose: a one-off
     * error must not leave the tree and the table disagreeing. */
    if (l1_bytes) {
        strata_qcow2_co_free_clusters(s, sn->l1_table_offset, l1_bytes);
    }
    /* The flags cleared in s->l1_table may not have reached the disk:
     * the next create would see nothing to clear and leave them on
     * under its snapshot. */
    recompute_active_copied(s, l1_modified);
    set_io_error(error, what, ret);
    strata_qcow2_snapshot_free(sn);
    return false;
}

static bool apply_locked(StrataQcow2State *s, StrataQcow2Snapshot *sn,
                         GError **error)
{
    uint64_t per_l1 = s->cluster_size << s->l2_bits;
    uint64_t need = sn->disk_size / per_l1 + (sn->disk_size % per_l1 != 0);
    g_autofree uint64_t *sn_l1 = NULL;
    uint64_t *new_l1, *old_l1;
    uint32_t old_size;
    bool l1_modified;
    int ret;

    if (strata_qcow2_check_snapshot_l1(s, sn) < 0 || need > sn->l1_size ||
        sn->disk_size > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "Snapshot '%s' has an invalid L1 table or disk size",
                    sn->id_str);
        return false;
    }
    if (sn->disk_size != s->hdr.size && s->hdr.version < 3) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Can't resize a v2 image which has snapshots");
        return false;
    }
    ret = flush_all(s);
    if (ret == 0) {
        ret = strata_qcow2_co_read_l1(s, sn->l1_table_offset, sn->l1_size,
                                      &sn_l1);
    }
    if (ret == 0 && sn->l1_size > s->l1_size) {
        ret = strata_qcow2_co_grow_l1(s, sn->l1_size);
    }
    if (ret < 0) {
        set_io_error(error, "Could not load the snapshot's L1 table", ret);
        return false;
    }

    /* References along the snapshot's path first: with the old active
     * path still counted, every table they reach is shared, so COPIED
     * goes from all of them. */
    new_l1 = g_new0(uint64_t, s->l1_size);
    memcpy(new_l1, sn_l1, (uint64_t)sn->l1_size * 8);
    ret = update_tree_refcounts(s, new_l1, sn->l1_size, 1, COPIED_EXACT,
                                &l1_modified);
    if (ret == 0) {
        ret = flush_all(s);
    }
    if (ret < 0) {
        g_free(new_l1);
        set_io_error(error, "Could not update refcounts", ret);
        return false;
    }

    /* The switch: the active L1 overwritten in place. */
    old_l1 = s->l1_table;
    old_size = s->l1_size;
    s->l1_table = new_l1;
    ret = write_active_l1(s, true);
    if (ret < 0) {
        s->l1_table = old_l1;
        g_free(new_l1);
        set_io_error(error, "Could not write the L1 table", ret);
        return false;
    }
    s->decmp_host = 0;
    /* Every cluster may map differently now, for the images above too. */
    strata_qcow2_layermap_notify_change(s);

    if (sn->disk_size != s->hdr.size) {
        uint8_t be[8];
        strata_qcow2_put_be64(be, sn->disk_size);
        ret = strata_qcow2_co_write_header_bytes(s, STRATA_QCOW2_HDR_SIZE, be,
                                                 sizeof(be));
        if (ret < 0) {
            g_free(old_l1);
            set_io_error(error, "Could not update the disk size", ret);
            return false;
        }
        s->hdr.size = sn->disk_size;
        s->l1_vm_state_index = (uint32_t)need;
        s->node->total_bytes = (int64_t)sn->disk_size;
        strata_node_chain_changed(s->node);
    }

    /* The old active path's references go; failures only leak. */
    ret = update_tree_refcounts(s, old_l1, old_size, -1, COPIED_KEEP,
                                &l1_modified);
    g_free(old_l1);
    if (ret == 0) {
        ret = recompute_active_copied(s, false);
    }
    if (ret < 0) {
        set_io_error(error, "Could not update refcounts after the switch",
                     ret);
        return false;
    }
    return true;
}

static bool delete_locked(StrataQcow2State *s, guint index, GError **error)
{
    StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, index);
    g_autofree uint64_t *sn_l1 = NULL;
    bool l1_modified;
    int ret;

    if (strata_qcow2_check_snapshot_l1(s, sn) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "Snapshot '%s' has an invalid L1 table", sn->id_str);
        return false;
    }
    ret = settle_all(s);
    if (ret == 0) {
        ret = strata_qcow2_co_read_l1(s, sn->l1_table_offset, sn->l1_size,
                                      &sn_l1);
    }
    if (ret < 0) {
        set_io_error(error, "Could not load the snapshot's L1 table", ret);
        return false;
    }

    /* The table without it first: from then on failures only leak. */
    g_ptr_array_steal_index(s->snapshots, index);
    ret = write_table(s);
    if (ret < 0) {
        g_ptr_array_insert(s->snapshots, (gint)index, sn);
        set_io_error(error, "Could not write the snapshot table", ret);
        return false;
    }

    ret = update_tree_refcounts(s, sn_l1, sn->l1_size, -1, COPIED_KEEP,
                                &l1_modified);
    if (ret == 0 && sn->l1_size) {
        strata_qcow2_co_free_clusters(s, sn->l1_table_offset,
                                      (uint64_t)sn->l1_size * 8);
    }
    strata_qcow2_snapshot_free(sn);
    if (ret == 0) {
        ret = recompute_active_copied(s, false);
    }
    if (ret < 0) {
        set_io_error(error, "Could not update refcounts", ret);
        return false;
    }
    return true;
}

/* Runs @op with requests drained and the metadata lock held. */
typedef enum { OP_CREATE, OP_APPLY, OP_DELETE } SnapOp;

static bool snapshot_op(StrataNode *node, SnapOp op, const char *id_or_name,
                        const StrataQcow2SnapshotInfo *info, GError **error)
{
    StrataQcow2State *s = qcow2_state(node, error);
    bool ok = false;
    int idx = -1;

    if (!s || !check_writable(s, error)) {
        return false;
    }
    strata_node_drained_begin(node);
    strata_co_mutex_lock(&s->lock);
    if (op != OP_CREATE) {
        idx = find_snapshot(s, id_or_name);
        if (idx < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Can't find snapshot '%s'", id_or_name);
            goto out;
        }
    }
    switch (op) {
    case OP_CREATE:
        ok = create_locked(s, info, error);
        break;
    case OP_APPLY:
        ok = apply_locked(s, g_ptr_array_index(s->snapshots, idx), error);
        break;
    case OP_DELETE:
        ok = delete_locked(s, (guint)idx, error);
        break;
    }
out:
    strata_co_mutex_unlock(&s->lock);
    if (ok && op == OP_CREATE && info->vm_state_size) {
        /* The snapshot keeps the VM state; the active tree need not,
         * and would only copy it on the next snapshot. */
        int ret = strata_qcow2_co_discard_vmstate(s, info->vm_state_size);
        if (ret < 0) {
            g_warning("qcow2: could not drop the VM state from the active "
                      "tree: %s", g_strerror(-ret));
        }
    }
    strata_node_drained_end(node);
    return ok;
}

bool strata_qcow2_co_snapshot_create_full(StrataNode *node,
                                          const StrataQcow2SnapshotInfo *info,
                                          GError **error)
{
    g_return_val_if_fail(info != NULL && info->name != NULL, false);
    return snapshot_op(node, OP_CREATE, NULL, info, error);
}

bool strata_qcow2_co_snapshot_create(StrataNode *node, const char *id,
                                     const char *name, GError **error)
{
    StrataQcow2SnapshotInfo info = { 0 };

    g_return_val_if_fail(name != NULL, false);
    info.id = (char *)id;
    info.name = (char *)name;
    /* As `qemu-img snapshot -c` records it. */
    info.icount = 0;
    return snapshot_op(node, OP_CREATE, NULL, &info, error);
}

bool strata_qcow2_co_snapshot_apply(StrataNode *node,
                                    const char *id_or_name, GError **error)
{
    g_return_val_if_fail(id_or_name != NULL, false);
    return snapshot_op(node, OP_APPLY, id_or_name, NULL, error);
}

bool strata_qcow2_co_snapshot_delete(StrataNode *node,
                                     const char *id_or_name, GError **error)
{
    g_return_val_if_fail(id_or_name != NULL, false);
    return snapshot_op(node, OP_DELETE, id_or_name, NULL, error);
}

bool strata_qcow2_co_snapshot_load_tmp(StrataNode *node, const char *id,
                                       const char *name, GError **error)
{
    StrataQcow2State *s = qcow2_state(node, error);
    StrataQcow2Snapshot *sn = NULL;
    uint64_t per_l1, need;
    uint64_t *l1;
    int ret;

    g_return_val_if_fail(id != NULL || name != NULL, false);
    if (!s) {
        return false;
    }
    if (s->writable) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Device is not readonly");
        return false;
    }
    strata_co_mutex_lock(&s->lock);
    for (guint i = 0; i < s->snapshots->len && !sn; i++) {
        StrataQcow2Snapshot *c = g_ptr_array_index(s->snapshots, i);

        if ((!id || !strcmp(c->id_str, id)) &&
            (!name || !strcmp(c->name, name))) {
            sn = c;
        }
    }
    if (!sn) {
        strata_co_mutex_unlock(&s->lock);
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Can't find snapshot");
        return false;
    }
    per_l1 = s->cluster_size << s->l2_bits;
    need = sn->disk_size / per_l1 + (sn->disk_size % per_l1 != 0);
    if (strata_qcow2_check_snapshot_l1(s, sn) < 0 || need > sn->l1_size ||
        sn->disk_size > INT64_MAX) {
        strata_co_mutex_unlock(&s->lock);
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "Snapshot '%s' has an invalid L1 table or disk size",
                    sn->id_str);
        return false;
    }
    ret = strata_qcow2_co_read_l1(s, sn->l1_table_offset, sn->l1_size, &l1);
    if (ret < 0) {
        strata_co_mutex_unlock(&s->lock);
        set_io_error(error, "Could not read the snapshot's L1 table", ret);
        return false;
    }
    /* L2 tables are cached by their host offset: the active tree's stay
     * valid, and the snapshot's are found under their own. */
    g_free(s->l1_table);
    s->l1_table = l1;
    s->l1_size = sn->l1_size;
    s->l1_table_offset = sn->l1_table_offset;
    s->hdr.size = sn->disk_size;
    s->l1_vm_state_index = (uint32_t)need;
    s->decmp_host = 0;
    node->total_bytes = (int64_t)sn->disk_size;
    strata_co_mutex_unlock(&s->lock);
    return true;
}
