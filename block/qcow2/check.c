/* strata — qcow2 check and repair: every cluster's refcount against the
 * references the metadata makes to it, counted as `qemu-img check`
 * counts them (leaks: refcount too high; corruptions: too low, or any
 * malformed entry), with repair of both by adjusting refcounts and of
 * COPIED flags in the active tree.
 *
 * Findings are printed with g_printerr() in the words QEMU uses, so a
 * tool can show them as qemu-img does.
 */
#include <errno.h>
#include <string.h>

#include "qcow2-private.h"

typedef struct Check {
    StrataQcow2State *s;
    StrataQcow2CheckResult *res;
    StrataQcow2CheckFix fix;
    uint32_t *refs;            /* references per host cluster */
    uint64_t nb_clusters;      /* entries of refs: the file, or more */
    uint64_t file_clusters;    /* clusters the file holds */
    bool rebuild;              /* the refcount structure itself is bad */
} Check;

static StrataNode *file_of(StrataQcow2State *s)
{
    return s->node->file->node;
}

/* Makes refs cover @n clusters (new ones unreferenced). */
static void grow_refs(Check *c, uint64_t n)
{
    if (n <= c->nb_clusters) {
        return;
    }
    c->refs = g_renew(uint32_t, c->refs, n);
    memset(c->refs + c->nb_clusters, 0,
           (n - c->nb_clusters) * sizeof(uint32_t));
    c->nb_clusters = n;
}

/*
 * Counts one reference to every cluster of [offset, offset + size).  The
 * last cluster of an image may be cut short by the end of the file, so
 * a region reaching less than a cluster past the end is counted; one
 * reaching further is a corruption (counted once per region, as QEMU
 * counts it).
 */
static void add_refs(Check *c, uint64_t offset, uint64_t size)
{
    StrataQcow2State *s = c->s;
    uint64_t first, last, file_len;

    if (!size) {
        return;
    }
    file_len = (uint64_t)MAX(file_of(s)->total_bytes, 0);
    if (offset + size > file_len &&
        offset + size - file_len >= s->cluster_size) {
        g_printerr("ERROR: counting reference for region exceeding the end "
                   "of the file by one cluster or more: offset %#"
                   G_GINT64_MODIFIER "x size %#" G_GINT64_MODIFIER "x\n",
                   offset, size);
        c->res->corruptions++;
        return;
    }
    first = offset >> s->cluster_bits;
    last = (offset + size - 1) >> s->cluster_bits;
    grow_refs(c, last + 1);
    for (uint64_t i = first; i <= last; i++) {
        if (c->refs[i] >= MIN(s->refcount_max, (uint64_t)UINT32_MAX)) {
            g_printerr("ERROR: overflow cluster offset=%#" G_GINT64_MODIFIER
                       "x\n", i << s->cluster_bits);
            g_printerr("Use qemu-img amend to increase the refcount entry "
                       "width or qemu-img convert to create a clean copy if "
                       "the image cannot be opened for writing\n");
            c->res->corruptions++;
            continue;
        }
        c->refs[i]++;
    }
}

static int read_l2(Check *c, uint64_t offset, uint64_t *table)
{
    StrataQcow2State *s = c->s;
    int ret = strata_node_co_pread(file_of(s), offset, s->cluster_size,
                                   table, 0);
    if (ret < 0) {
        g_printerr("ERROR: I/O error in check_refcounts_l2: %s\n",
                   g_strerror(-ret));
        c->res->check_errors++;
        return ret;
    }
    for (uint64_t i = 0; i < s->cluster_size / 8; i++) {
        table[i] = GUINT64_FROM_BE(table[i]);
    }
    return 0;
}

/* Extended L2: a bitmap that disagrees with its entry. */
static void check_bitmap(Check *c, uint64_t index, uint64_t e, uint64_t b)
{
    if (e & STRATA_QCOW2_OFLAG_COMPRESSED) {
        if (b) {
            g_printerr("ERROR compressed cluster %" G_GUINT64_FORMAT
                       " with non-zero subcluster allocation bitmap, "
                       "entry=%#" G_GINT64_MODIFIER "x\n", index, e);
            c->res->corruptions++;
        }
        return;
    }
    if (!(e & STRATA_QCOW2_OFFSET_MASK) &&
        (b & STRATA_QCOW2_BITMAP_ALL_ALLOC)) {
        g_printerr("ERROR: Unallocated cluster has non-zero subcluster "
                   "allocation map\n");
        c->res->corruptions++;
        return;
    }
    if (!strata_qcow2_extl2_valid(e, b)) {
        g_printerr("ERROR offset=%" G_GINT64_MODIFIER "x: Allocated cluster "
                   "has corrupted subcluster allocation bitmap\n",
                   (uint64_t)(e & STRATA_QCOW2_OFFSET_MASK));
        c->res->corruptions++;
    }
}

/* One L2 table's entries; @frag: fragmentation statistics (active tree
 * only), which QEMU counts within one table: the first cluster of a
 * table is never fragmented. */
static int check_l2(Check *c, uint64_t l2_offset, bool frag)
{
    uint64_t next = 0;     /* the host offset that would be contiguous */
    StrataQcow2State *s = c->s;
    g_autofree uint64_t *t = g_malloc(s->cluster_size);
    int ret = read_l2(c, l2_offset, t);

    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = 0; i < s->l2_size; i++) {
        uint64_t e = t[i << s->l2_entry_shift];
        uint64_t host = e & STRATA_QCOW2_OFFSET_MASK;

        if (s->extended_l2) {
            check_bitmap(c, i, e, t[(i << 1) + 1]);
            /* Bit 0 is not the zero flag there (the bitmap is). */
            e &= ~STRATA_QCOW2_OFLAG_ZERO;
        }
        switch (strata_qcow2_l2_entry_type(e)) {
        case STRATA_QCOW2_CLUSTER_COMPRESSED: {
            uint64_t off = e & s->cluster_offset_mask;
            uint64_t nb = ((e >> s->csize_shift) & s->csize_mask) + 1;
            if (e & STRATA_QCOW2_OFLAG_COPIED) {
                g_printerr("ERROR: coffset=%#" G_GINT64_MODIFIER "x: copied "
                           "flag must never be set for compressed "
                           "clusters\n", off);
                c->res->corruptions++;
            }
            if (frag) {
                c->res->allocated_clusters++;
                c->res->compressed_clusters++;
                c->res->fragmented_clusters++;
            }
            add_refs(c, off & ~511ull, nb * 512 - 0);
            break;
        }
        case STRATA_QCOW2_CLUSTER_ZERO_ALLOC:
        case STRATA_QCOW2_CLUSTER_NORMAL:
            if (e & STRATA_QCOW2_L2_RESERVED) {
                g_printerr("ERROR found l2 entry with reserved bits set: %#"
                           G_GINT64_MODIFIER "x\n", e);
                c->res->corruptions++;
            }
            if (frag) {
                c->res->allocated_clusters++;
                if (next && host != next) {
                    c->res->fragmented_clusters++;
                }
                next = host + s->cluster_size;
            }
            if (host & (s->cluster_size - 1)) {
                g_printerr("ERROR offset=%" G_GINT64_MODIFIER "x: Data "
                           "cluster is not properly aligned; L2 entry "
                           "corrupted.\n", host);
                c->res->corruptions++;
                break;
            }
            add_refs(c, host, s->cluster_size);
            break;
        case STRATA_QCOW2_CLUSTER_ZERO_PLAIN:
            if (s->hdr.version < 3) {
                g_printerr("ERROR: zero cluster in a v2 image: l2_entry=%#"
                           G_GINT64_MODIFIER "x\n", e);
                c->res->corruptions++;
            }
            /* fall through */
        default:
            if (e & STRATA_QCOW2_L2_RESERVED) {
                g_printerr("ERROR found l2 entry with reserved bits set: %#"
                           G_GINT64_MODIFIER "x\n", e);
                c->res->corruptions++;
            }
            break;
        }
    }
    return 0;
}

static int check_l1(Check *c, const uint64_t *l1, uint32_t l1_size,
                    uint64_t l1_offset, bool active)
{
    StrataQcow2State *s = c->s;

    add_refs(c, l1_offset, (uint64_t)l1_size * 8);
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2 = l1[i] & STRATA_QCOW2_OFFSET_MASK;
        if (l1[i] & STRATA_QCOW2_L1_RESERVED) {
            g_printerr("ERROR found L1 entry with reserved bits set: %#"
                       G_GINT64_MODIFIER "x\n", l1[i]);
            c->res->corruptions++;
        }
        if (!l2) {
            continue;
        }
        add_refs(c, l2, s->cluster_size);
        if (l2 & (s->cluster_size - 1)) {
            g_printerr("ERROR l2_offset=%" G_GINT64_MODIFIER "x: Table is "
                       "not cluster aligned; L1 entry corrupted\n", l2);
            c->res->corruptions++;
            continue;
        }
        if ((l2 >> s->cluster_bits) >= c->file_clusters) {
            continue; /* counted above as past the end */
        }
        if (check_l2(c, l2, active) < 0) {
            return -EIO;
        }
    }
    return 0;
}

/* COPIED must be set exactly where the on-disk refcount is 1, in the
 * active tree; repaired with FIX_ERRORS. */
static int check_copied(Check *c)
{
    StrataQcow2State *s = c->s;
    bool fix = c->fix & STRATA_QCOW2_CHECK_FIX_ERRORS;
    bool l1_dirty = false;
    g_autofree uint64_t *t = g_malloc(s->cluster_size);
    int ret;

    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2 = s->l1_table[i] & STRATA_QCOW2_OFFSET_MASK;
        bool l2_dirty = false;
        uint64_t rc;

        if (!l2 || (l2 & (s->cluster_size - 1)) ||
            (l2 >> s->cluster_bits) >= c->file_clusters) {
            continue;
        }
        ret = strata_qcow2_co_get_refcount(s, l2 >> s->cluster_bits, &rc);
        if (ret < 0) {
            continue;
        }
        if ((rc == 1) != !!(s->l1_table[i] & STRATA_QCOW2_OFLAG_COPIED)) {
            g_printerr("%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%"
                       G_GINT64_MODIFIER "x refcount=%" G_GUINT64_FORMAT "\n",
                       fix ? "Repairing" : "ERROR", i, s->l1_table[i], rc);
            if (fix) {
                s->l1_table[i] ^= STRATA_QCOW2_OFLAG_COPIED;
                l1_dirty = true;
                c->res->corruptions_fixed++;
            } else {
                c->res->corruptions++;
            }
        }
        if (read_l2(c, l2, t) < 0) {
            return -EIO;
        }
        for (uint64_t j = 0; j < s->l2_size; j++) {
            uint64_t e = t[j << s->l2_entry_shift];
            uint64_t host = e & STRATA_QCOW2_OFFSET_MASK;
            StrataQcow2ClusterType ty = strata_qcow2_l2_entry_type(e);
            if ((ty != STRATA_QCOW2_CLUSTER_NORMAL &&
                 ty != STRATA_QCOW2_CLUSTER_ZERO_ALLOC) ||
                (host & (s->cluster_size - 1))) {
                continue;
            }
            ret = strata_qcow2_co_get_refcount(s, host >> s->cluster_bits,
                                               &rc);
            if (ret < 0) {
                continue;
            }
            if ((rc == 1) != !!(e & STRATA_QCOW2_OFLAG_COPIED)) {
                g_printerr("%s OFLAG_COPIED data cluster: l2_entry=%"
                           G_GINT64_MODIFIER "x refcount=%" G_GUINT64_FORMAT
                           "\n", fix ? "Repairing" : "ERROR", e, rc);
                if (fix) {
                    t[j << s->l2_entry_shift] = e ^ STRATA_QCOW2_OFLAG_COPIED;
                    l2_dirty = true;
                    c->res->corruptions_fixed++;
                } else {
                    c->res->corruptions++;
                }
            }
        }
        if (l2_dirty) {
            for (uint64_t j = 0; j < s->cluster_size / 8; j++) {
                t[j] = GUINT64_TO_BE(t[j]);
            }
            /* The cache must not hold an older copy of this table. */
            strata_qcow2_cache_discard_cluster(s->l2_cache, l2,
                                               s->cluster_size);
            ret = strata_qcow2_co_write_meta(s, STRATA_QCOW2_OL_ACTIVE_L2,
                                             l2, t, s->cluster_size);
            if (ret < 0) {
                g_printerr("ERROR: Could not write L2 table: %s\n",
                           g_strerror(-ret));
                c->res->check_errors++;
                return ret;
            }
        }
    }
    if (l1_dirty) {
        uint64_t bytes = (uint64_t)s->l1_size * 8;
        g_autofree uint8_t *b = g_malloc(bytes);
        for (uint32_t i = 0; i < s->l1_size; i++) {
            strata_qcow2_put_be64(b + (uint64_t)i * 8, s->l1_table[i]);
        }
        ret = strata_qcow2_co_write_meta(s, STRATA_QCOW2_OL_ACTIVE_L1,
                                         s->l1_table_offset, b, bytes);
        if (ret < 0) {
            g_printerr("ERROR: Could not write L1 table: %s\n",
                       g_strerror(-ret));
            c->res->check_errors++;
            return ret;
        }
    }
    return 0;
}

/* Bitmap directory, tables and data: kept byte for byte (bitmaps are
 * not implemented), but their clusters are referenced all the same. */
static void bitmap_refs(Check *c)
{
    StrataQcow2State *s = c->s;
    uint64_t size = s->bitmap_dir_size, off = 0;
    g_autofree uint8_t *d = NULL;

    if (!size || size > 1024ull * 65535 ||
        (s->bitmap_dir_offset & (s->cluster_size - 1))) {
        return;
    }
    d = g_malloc(size);
    if (strata_node_co_pread(file_of(s), s->bitmap_dir_offset, size, d,
                             0) < 0) {
        c->res->check_errors++;
        return;
    }
    add_refs(c, s->bitmap_dir_offset, size);
    while (off + 24 <= size) {
        uint64_t t = strata_qcow2_be64(d + off);
        uint32_t n = strata_qcow2_be32(d + off + 8);
        uint64_t len = 24 + (uint64_t)strata_qcow2_be32(d + off + 20) +
                       strata_qcow2_be16(d + off + 18);
        g_autofree uint64_t *tab = NULL;

        off = (off + len + 7) & ~7ull;
        if (!t || (t & (s->cluster_size - 1)) || (uint64_t)n * 8 >
            STRATA_QCOW2_MAX_L1_BYTES) {
            continue;
        }
        add_refs(c, t, (uint64_t)n * 8);
        tab = g_new(uint64_t, MAX(n, 1u));
        if (n && strata_node_co_pread(file_of(s), t, (uint64_t)n * 8, tab,
                                      0) < 0) {
            c->res->check_errors++;
            continue;
        }
        for (uint32_t i = 0; i < n; i++) {
            uint64_t e = GUINT64_FROM_BE(tab[i]) & 0x00fffffffffffe00ull;
            if (e) {
                add_refs(c, e, s->cluster_size);
            }
        }
    }
}

static int check_refblocks(Check *c);

static int calculate_refs(Check *c)
{
    StrataQcow2State *s = c->s;
    int ret;

    add_refs(c, 0, s->cluster_size);
    ret = check_l1(c, s->l1_table, s->l1_size, s->l1_table_offset, true);
    if (ret < 0) {
        return ret;
    }
    for (guint i = 0; i < s->snapshots->len; i++) {
        StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
        g_autofree uint64_t *l1 = NULL;

        if (s->hdr.version >= 3 && sn->extra_data_size < 16) {
            g_printerr("ERROR snapshot table entry %u is incomplete\n", i);
            c->res->corruptions++;
        }
        if (strata_qcow2_check_snapshot_l1(s, sn) < 0) {
            g_printerr("ERROR snapshot %s (%s) l1_offset=%#"
                       G_GINT64_MODIFIER "x l1_size=%#x: L1 table is "
                       "invalid\n", sn->id_str, sn->name,
                       sn->l1_table_offset, sn->l1_size);
            c->res->corruptions++;
            continue;
        }
        ret = strata_qcow2_co_read_l1(s, sn->l1_table_offset, sn->l1_size,
                                      &l1);
        if (ret < 0) {
            g_printerr("ERROR: I/O error in check_refcounts_l1: %s\n",
                       g_strerror(-ret));
            c->res->check_errors++;
            return ret;
        }
        ret = check_l1(c, l1, sn->l1_size, sn->l1_table_offset, false);
        if (ret < 0) {
            return ret;
        }
    }
    if (s->snapshots->len) {
        add_refs(c, s->hdr.snapshots_offset, s->snapshots_size);
    }
    add_refs(c, s->refcount_table_offset, s->refcount_table_size * 8);
    bitmap_refs(c);

    return check_refblocks(c);
}

/*
 * The refcount blocks, counted last: one that shares a cluster with
 * anything counted before shows up as a count above one.  A bad entry
 * means the refcount structure must be rebuilt; one pointing past the
 * end of the file is repaired (with FIX_ERRORS) by growing the file over
 * it, as QEMU does, so that its zeroed block becomes a valid one.
 */
static int check_refblocks(Check *c)
{
    StrataQcow2State *s = c->s;

    for (uint64_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t e = s->refcount_table[i];
        uint64_t off = e & STRATA_QCOW2_REFT_OFFSET_MASK;
        uint64_t cl = off >> s->cluster_bits;
        bool fix = c->fix & STRATA_QCOW2_CHECK_FIX_ERRORS;

        if (e & ~STRATA_QCOW2_REFT_OFFSET_MASK) {
            g_printerr("ERROR refcount table entry %" G_GUINT64_FORMAT
                       " has reserved bits set\n", i);
            c->res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (off & (s->cluster_size - 1)) {
            g_printerr("ERROR refcount block %" G_GUINT64_FORMAT " is not "
                       "cluster aligned; refcount table entry corrupted\n",
                       i);
            c->res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (!off) {
            continue;
        }
        if (cl >= c->file_clusters) {
            int64_t len;
            int ret;

            g_printerr("%s refcount block %" G_GUINT64_FORMAT " is outside "
                       "image\n", fix ? "Repairing" : "ERROR", i);
            if (!fix) {
                c->res->corruptions++;
                continue;
            }
            ret = off > STRATA_QCOW2_MAX_HOST_OFFSET ? -EINVAL
                : strata_node_co_truncate(file_of(s), off + s->cluster_size,
                                          false, NULL);
            len = ret < 0 ? ret : strata_node_co_refresh_length(file_of(s));
            if (len >= 0 && (uint64_t)len < off + s->cluster_size) {
                len = -EINVAL;
            }
            if (len < 0) {
                g_printerr("ERROR could not resize image: %s\n",
                           g_strerror((int)-len));
                c->res->corruptions++;
                c->rebuild = true;
                continue;
            }
            c->file_clusters = strata_qcow2_size_to_clusters(s,
                                                             (uint64_t)len);
            grow_refs(c, c->file_clusters);
            c->res->corruptions_fixed++;
            /* Fresh zeroes: this block's only reference is this one. */
            add_refs(c, off, s->cluster_size);
            continue;
        }
        add_refs(c, off, s->cluster_size);
        if (c->refs[cl] != 1) {
            g_printerr("ERROR refcount block %" G_GUINT64_FORMAT
                       " refcount=%u\n", i, c->refs[cl]);
            c->res->corruptions++;
            c->rebuild = true;
        }
    }
    return 0;
}

/*
 * On-disk refcounts against the references, repairing as @fix allows.
 * A referenced cluster whose refcount is 0 is not patched one by one:
 * the refcount structure lost it, so it is rebuilt as a whole.
 */
static void compare_refs(Check *c, StrataQcow2CheckFix fix,
                         uint64_t *highest)
{
    StrataQcow2State *s = c->s;

    *highest = 0;
    for (uint64_t i = 0; i < c->nb_clusters; i++) {
        uint64_t rc, want = c->refs[i];
        int64_t *fixed = NULL;
        int ret = strata_qcow2_co_get_refcount(s, i, &rc);

        if (ret < 0) {
            g_printerr("Can't get refcount for cluster %" G_GUINT64_FORMAT
                       ": %s\n", i, g_strerror(-ret));
            c->res->check_errors++;
            continue;
        }
        if (rc || want) {
            *highest = i;
        }
        if (rc == want) {
            continue;
        }
        if (rc == 0) {
            c->rebuild = true;
        } else if (rc > want && (fix & STRATA_QCOW2_CHECK_FIX_LEAKS)) {
            fixed = &c->res->leaks_fixed;
        } else if (rc < want && (fix & STRATA_QCOW2_CHECK_FIX_ERRORS)) {
            fixed = &c->res->corruptions_fixed;
        }
        g_printerr("%s cluster %" G_GUINT64_FORMAT " refcount=%"
                   G_GUINT64_FORMAT " reference=%" G_GUINT64_FORMAT "\n",
                   fixed ? "Repairing" : rc < want ? "ERROR" : "Leaked", i,
                   rc, want);
        if (fixed) {
            ret = want > s->refcount_max ? -ERANGE
                : strata_qcow2_co_update_refcount(
                      s, i << s->cluster_bits, s->cluster_size,
                      (int64_t)want - (int64_t)rc);
            if (ret == 0) {
                (*fixed)++;
                continue;
            }
            g_printerr("ERROR: Could not fix cluster %" G_GUINT64_FORMAT
                       ": %s\n", i, g_strerror(-ret));
        }
        if (rc < want) {
            c->res->corruptions++;
        } else {
            c->res->leaks++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Rebuilding the refcount structure                                   */
/* ------------------------------------------------------------------ */

/*
 * Takes @n contiguous clusters unreferenced in refs, searching from
 * *@first_free (which is moved to the first gap seen) and growing refs
 * past the end of the file when no gap is long enough.  The clusters
 * get one reference: what the rebuilt structure itself occupies.
 */
static uint64_t refs_alloc(Check *c, uint64_t n, uint64_t *first_free)
{
    uint64_t i = *first_free, run = 0;
    bool gap_seen = false;

    for (; i < c->nb_clusters && run < n; i++) {
        if (c->refs[i]) {
            run = 0;
            continue;
        }
        if (!gap_seen) {
            *first_free = i;
            gap_seen = true;
        }
        run++;
    }
    if (run < n) {
        grow_refs(c, i + n - run);
        i += n - run;
    }
    i -= n;
    for (uint64_t k = 0; k < n; k++) {
        c->refs[i + k] = 1;
    }
    return i;
}

/* The new reftable being built, host order. */
typedef struct NewTable {
    uint64_t *entries;
    uint64_t size;      /* entries */
} NewTable;

/*
 * Writes, for every cluster referenced in refs within [@first, @end),
 * the refcount block that covers it, as refs says; a block not placed
 * yet gets a cluster first (which may extend the range to cover that
 * cluster's own block).  Returns 1 when @t had to grow (a reftable
 * placed for the old size is then too small), 0, or -errno.
 */
static int write_refblocks(Check *c, uint64_t first, uint64_t end,
                           NewTable *t, uint8_t *buf)
{
    StrataQcow2State *s = c->s;
    uint64_t per_block = 1ull << s->refcount_block_bits;
    uint64_t first_free = 0;
    bool grown = false;

    for (uint64_t cl = first; cl < end && cl < c->nb_clusters; cl++) {
        uint64_t index = cl >> s->refcount_block_bits;
        uint64_t start = index << s->refcount_block_bits;
        uint64_t block;
        int ret;

        if (!c->refs[cl]) {
            continue;
        }
        if (index < t->size && t->entries[index]) {
            block = t->entries[index];
        } else {
            /* Never in a block already written by this pass. */
            first_free = MAX(first_free, start);
            block = refs_alloc(c, 1, &first_free);
            end = MAX(end, block + 1);
            if (index >= t->size) {
                uint64_t per_cluster = s->cluster_size / 8;
                uint64_t size = (index / per_cluster + 1) * per_cluster;

                if (size * 8 > STRATA_QCOW2_MAX_REFTABLE_BYTES) {
                    g_printerr("ERROR: the refcount table would grow "
                               "beyond the maximum size\n");
                    return -EFBIG;
                }
                t->entries = g_renew(uint64_t, t->entries, size);
                memset(t->entries + t->size, 0, (size - t->size) * 8);
                t->size = size;
                grown = true;
            }
            block <<= s->cluster_bits;
            t->entries[index] = block;
        }

        memset(buf, 0, s->cluster_size);
        for (uint64_t k = 0; k < per_block && start + k < c->nb_clusters;
             k++) {
            strata_qcow2_refblock_set(buf, s->refcount_order, k,
                                      MIN(c->refs[start + k],
                                          s->refcount_max));
        }
        /* The old blocks may lie anywhere, even where a bad table entry
         * pointed at a cluster nothing references: they are being
         * replaced, so only they may be overwritten. */
        ret = strata_qcow2_co_pre_write_overlap_check(
            s, STRATA_QCOW2_OL_REFCOUNT_BLOCK, block, s->cluster_size);
        if (ret == 0) {
            ret = strata_node_co_pwrite(file_of(s), block, s->cluster_size,
                                        buf, 0);
        }
        if (ret < 0) {
            g_printerr("ERROR writing refblock: %s\n", g_strerror(-ret));
            return ret;
        }
        cl = start + per_block - 1;
    }
    return grown;
}

/*
 * Replaces the refcount structure by one built from refs alone.  Blocks
 * and table go to clusters nothing references (refs counts the old
 * table and its valid blocks, so they stay intact); they are made stable
 * before the one header write that switches to them, so a crash leaves
 * either the old structure or the new one.  The old one is leaked
 * afterwards: the caller's leak pass frees it.
 */
static int rebuild_refcounts(Check *c)
{
    StrataQcow2State *s = c->s;
    g_autofree uint8_t *buf = g_malloc(s->cluster_size);
    g_autofree uint8_t *tb = NULL;
    NewTable t = { NULL, 0 };
    uint64_t table_cl = 0, table_clusters = 0;
    uint8_t hdr[12];
    int ret;

    /* Every block is placed and written once... */
    ret = write_refblocks(c, 0, c->nb_clusters, &t, buf);
    /* ...then the table, whose clusters change the blocks covering
     * them; when that makes the table grow, it is placed again. */
    while (ret > 0) {
        uint64_t first_free = 0;

        table_clusters = strata_qcow2_size_to_clusters(s, t.size * 8);
        table_cl = refs_alloc(c, table_clusters, &first_free);
        ret = write_refblocks(c, table_cl, table_cl + table_clusters, &t,
                              buf);
    }
    if (ret < 0) {
        goto out;
    }

    tb = g_malloc0(table_clusters * s->cluster_size);
    for (uint64_t i = 0; i < t.size; i++) {
        strata_qcow2_put_be64(tb + i * 8, t.entries[i]);
    }
    /* The blocks are stable before the table that points to them. */
    ret = strata_node_co_flush(file_of(s));
    if (ret == 0) {
        ret = strata_qcow2_co_write_meta(s, 0, table_cl << s->cluster_bits,
                                         tb, table_clusters *
                                         s->cluster_size);
    }
    if (ret < 0) {
        g_printerr("ERROR writing reftable: %s\n", g_strerror(-ret));
        goto out;
    }
    strata_qcow2_put_be64(hdr, table_cl << s->cluster_bits);
    strata_qcow2_put_be32(hdr + 8, (uint32_t)table_clusters);
    ret = strata_qcow2_co_write_header_bytes(s, STRATA_QCOW2_HDR_REFTABLE,
                                             hdr, sizeof(hdr));
    if (ret < 0) {
        g_printerr("ERROR setting reftable: %s\n", g_strerror(-ret));
        goto out;
    }

    /* What the cache holds came from the old blocks. */
    for (uint64_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t off = s->refcount_table[i] & STRATA_QCOW2_REFT_OFFSET_MASK;
        if (off) {
            strata_qcow2_cache_discard_cluster(
                s->refcount_cache, strata_qcow2_start_of_cluster(s, off),
                s->cluster_size);
        }
    }
    strata_qcow2_refcount_table_set(s, g_steal_pointer(&t.entries), t.size);
    s->refcount_table_offset = table_cl << s->cluster_bits;
    s->hdr.refcount_table_offset = s->refcount_table_offset;
    s->hdr.refcount_table_clusters = (uint32_t)table_clusters;
    s->free_cluster_index = 0;
out:
    g_free(t.entries);
    return ret;
}

/* Counts every reference the metadata makes, from scratch. */
static int recount(Check *c)
{
    int64_t flen = strata_node_co_refresh_length(file_of(c->s));

    if (flen < 0) {
        c->res->check_errors++;
        return (int)flen;
    }
    c->file_clusters = strata_qcow2_size_to_clusters(c->s, (uint64_t)flen);
    g_free(c->refs);
    c->refs = NULL;
    c->nb_clusters = 0;
    grow_refs(c, MAX(c->file_clusters, 1));
    c->rebuild = false;
    return calculate_refs(c);
}

/*
 * The refcount part of the check, as QEMU runs it: count, compare
 * without repairing; then either rebuild the whole structure (when it
 * is itself damaged and errors may be fixed) and free what the rebuild
 * leaked, or compare once more, repairing.
 */
static int check_refcounts(Check *c, uint64_t *highest)
{
    StrataQcow2CheckResult *res = c->res, pre, old;
    int64_t fresh_leaks = 0;
    bool was_corrupt;
    int ret = recount(c);

    if (ret < 0) {
        return ret;
    }
    pre = *res;
    compare_refs(c, STRATA_QCOW2_CHECK_NO_FIX, highest);

    if (c->rebuild && (c->fix & STRATA_QCOW2_CHECK_FIX_ERRORS)) {
        old = *res;
        g_printerr("Rebuilding refcount structure\n");
        /* Looking up the old structure may have marked the image
         * corrupt; the rebuild is what repairs that. */
        was_corrupt = c->s->corrupt;
        c->s->corrupt = false;
        ret = rebuild_refcounts(c);
        if (ret < 0) {
            c->s->corrupt = was_corrupt;
            res->check_errors++;
            return ret;
        }
        /* Counting again sees the new structure: what it finds now is
         * what is left.  The old structure's failed lookups and the
         * statistics are not counted twice. */
        res->corruptions = 0;
        res->leaks = 0;
        res->check_errors = pre.check_errors;
        ret = recount(c);
        res->allocated_clusters = old.allocated_clusters;
        res->fragmented_clusters = old.fragmented_clusters;
        res->compressed_clusters = old.compressed_clusters;
        if (ret < 0) {
            return ret;
        }
        if (c->fix & STRATA_QCOW2_CHECK_FIX_LEAKS) {
            StrataQcow2CheckResult saved = *res;

            /* Leaks left now are the old structure and the rebuild's own
             * spare clusters. */
            memset(res, 0, sizeof(*res));
            compare_refs(c, STRATA_QCOW2_CHECK_FIX_LEAKS, highest);
            if (c->rebuild) {
                g_printerr("ERROR rebuilt refcount structure is still "
                           "broken\n");
            }
            fresh_leaks = res->leaks;
            *res = saved;
        }
        if (res->corruptions < old.corruptions) {
            res->corruptions_fixed += old.corruptions - res->corruptions;
        }
        if (res->leaks < old.leaks) {
            res->leaks_fixed += old.leaks - res->leaks;
        }
        res->leaks += fresh_leaks;
    } else if (c->fix) {
        if (c->rebuild) {
            g_printerr("ERROR need to rebuild refcount structures\n");
            res->check_errors++;
            return -EIO;
        }
        if (res->leaks || res->corruptions) {
            *res = pre;
            compare_refs(c, c->fix, highest);
        }
    }
    return 0;
}

static bool check_locked(StrataQcow2State *s, StrataQcow2CheckFix fix,
                         StrataQcow2CheckResult *res, GError **error)
{
    Check c = { s, res, fix, NULL, 0, 0, false };
    uint64_t highest = 0;
    int ret;

    memset(res, 0, sizeof(*res));
    res->total_clusters = (int64_t)strata_qcow2_size_to_clusters(s,
                                                                 s->hdr.size);
    /* What the metadata caches hold is what the image says. */
    ret = strata_qcow2_cache_co_flush(s->l2_cache);
    if (ret == 0) {
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    }
    if (ret < 0 && fix) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not flush qcow2 metadata: %s", g_strerror(-ret));
        return false;
    }
    ret = check_refcounts(&c, &highest);
    g_free(c.refs);
    if (ret < 0) {
        /* As QEMU: the check stopped, so its counts mean nothing. */
        g_set_error_literal(error, STRATA_ERROR, STRATA_ERROR_IO,
                            g_strerror(-ret));
        return false;
    }
    if (fix) {
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
        if (ret < 0) {
            res->check_errors++;
        }
    }
    ret = check_copied(&c);
    if (ret < 0) {
        g_set_error_literal(error, STRATA_ERROR, STRATA_ERROR_IO,
                            g_strerror(-ret));
        return false;
    }
    if (fix) {
        /* Recount the end after repair, as QEMU reports it. */
        uint64_t end = 0;
        int64_t flen = strata_node_co_refresh_length(file_of(s));
        uint64_t n = strata_qcow2_size_to_clusters(s, (uint64_t)MAX(flen, 0));
        for (uint64_t i = 0; i < n; i++) {
            uint64_t rc;
            if (strata_qcow2_co_get_refcount(s, i, &rc) == 0 && rc) {
                end = i;
            }
        }
        highest = end;
    }
    res->image_end_offset = (int64_t)((highest + 1) << s->cluster_bits);

    if (fix && s->writable && !res->corruptions && !res->check_errors) {
        uint64_t want = s->hdr.incompatible_features &
                        ~(STRATA_QCOW2_INCOMPAT_CORRUPT |
                          STRATA_QCOW2_INCOMPAT_DIRTY);
        if (want != s->hdr.incompatible_features) {
            uint8_t be[8];
            strata_qcow2_put_be64(be, want);
            s->corrupt = false;
            ret = strata_qcow2_co_write_header_bytes(
                s, STRATA_QCOW2_HDR_INCOMPAT, be, sizeof(be));
            if (ret < 0) {
                res->check_errors++;
                s->corrupt = !!(s->hdr.incompatible_features &
                                STRATA_QCOW2_INCOMPAT_CORRUPT);
            } else {
                s->hdr.incompatible_features = want;
            }
        }
        s->corrupt = false;
        s->needs_repair = false;
    }
    return true;
}

int strata_qcow2_co_check_repair(StrataQcow2State *s,
                                 StrataQcow2CheckFix fix,
                                 StrataQcow2CheckResult *res,
                                 GError **error)
{
    bool ok;
    /* Repairs write; a corrupt image may be repaired nevertheless. */
    bool was_corrupt = s->corrupt;

    if (fix) {
        s->corrupt = false;
    }
    ok = check_locked(s, fix, res, error);
    if (fix && (res->corruptions || res->check_errors || !ok)) {
        s->corrupt = was_corrupt;
    }
    return ok ? 0 : -EIO;
}

bool strata_qcow2_co_check(StrataNode *node, StrataQcow2CheckFix fix,
                           StrataQcow2CheckResult *out, GError **error)
{
    StrataQcow2State *s;
    int ret;

    g_return_val_if_fail(out != NULL, false);
    if (!node || node->drv != &strata_driver_qcow2 || !node->opaque) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Node '%s' is not a qcow2 node",
                    node ? node->node_name : "");
        return false;
    }
    s = node->opaque;
    if (fix && !s->writable) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Cannot repair read-only node '%s'", node->node_name);
        return false;
    }
    strata_node_drained_begin(node);
    strata_co_mutex_lock(&s->lock);
    ret = strata_qcow2_co_check_repair(s, fix, out, error);
    strata_co_mutex_unlock(&s->lock);
    strata_node_drained_end(node);
    return ret == 0;
}
