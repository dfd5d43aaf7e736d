/* strata — qcow2 cluster map: L1/L2 lookups, L2 table allocation, L1
 * growth, compressed clusters, metadata overlap checks and the header
 * writes other files need. */
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <zlib.h>
#ifdef STRATA_HAVE_ZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif

#include "qcow2-private.h"

static StrataNode *file_of(StrataQcow2State *s)
{
    return s->node->file->node;
}

StrataQcow2ClusterType strata_qcow2_l2_entry_type(uint64_t entry)
{
    if (entry & STRATA_QCOW2_OFLAG_COMPRESSED) {
        return STRATA_QCOW2_CLUSTER_COMPRESSED;
    }
    if (entry & STRATA_QCOW2_OFLAG_ZERO) {
        return (entry & STRATA_QCOW2_OFFSET_MASK)
            ? STRATA_QCOW2_CLUSTER_ZERO_ALLOC
            : STRATA_QCOW2_CLUSTER_ZERO_PLAIN;
    }
    if (!(entry & STRATA_QCOW2_OFFSET_MASK)) {
        return STRATA_QCOW2_CLUSTER_UNALLOCATED;
    }
    return STRATA_QCOW2_CLUSTER_NORMAL;
}

bool strata_qcow2_extl2_valid(uint64_t entry, uint64_t bitmap)
{
    uint64_t alloc = bitmap & STRATA_QCOW2_BITMAP_ALL_ALLOC;

    if (entry & STRATA_QCOW2_OFLAG_COMPRESSED) {
        return bitmap == 0;
    }
    if (!(entry & STRATA_QCOW2_OFFSET_MASK) && alloc) {
        return false;
    }
    return !(alloc & (bitmap >> 32));
}

StrataQcow2ClusterType strata_qcow2_subcluster_type(uint64_t entry,
                                                    uint64_t bitmap,
                                                    unsigned sc)
{
    bool host = entry & STRATA_QCOW2_OFFSET_MASK;

    if (entry & STRATA_QCOW2_OFLAG_COMPRESSED) {
        return STRATA_QCOW2_CLUSTER_COMPRESSED;
    }
    if (bitmap & (1ull << sc)) {
        return STRATA_QCOW2_CLUSTER_NORMAL;
    }
    if (bitmap & (1ull << (32 + sc))) {
        return host ? STRATA_QCOW2_CLUSTER_ZERO_ALLOC
                    : STRATA_QCOW2_CLUSTER_ZERO_PLAIN;
    }
    return host ? STRATA_QCOW2_CLUSTER_UNALLOCATED_ALLOC
                : STRATA_QCOW2_CLUSTER_UNALLOCATED;
}

int strata_qcow2_co_write_header_bytes(StrataQcow2State *s, uint64_t offset,
                                       const void *buf, size_t len)
{
    int ret = strata_qcow2_co_pre_write_overlap_check(
        s, STRATA_QCOW2_OL_MAIN_HEADER, offset, len);
    if (ret < 0) {
        return ret;
    }
    ret = strata_node_co_pwrite(file_of(s), offset, len, buf, 0);
    return ret < 0 ? ret : strata_node_co_flush(file_of(s));
}

int strata_qcow2_co_pwrite_meta(StrataQcow2State *s, int ign,
                                uint64_t offset, const void *buf, size_t len)
{
    int ret = strata_qcow2_co_pre_write_overlap_check(s, ign, offset, len);
    if (ret < 0) {
        return ret;
    }
    return strata_node_co_pwrite(file_of(s), offset, len, buf, 0);
}

int strata_qcow2_co_write_meta(StrataQcow2State *s, int ign, uint64_t offset,
                               const void *buf, size_t len)
{
    int ret = strata_qcow2_co_pwrite_meta(s, ign, offset, buf, len);
    return ret < 0 ? ret : strata_node_co_flush(file_of(s));
}

void strata_qcow2_co_signal_corruption(StrataQcow2State *s, const char *fmt,
                                       ...)
{
    va_list ap;
    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);

    if (s->corrupt) {
        g_warning("qcow2: %s (node '%s')", msg, s->node->node_name);
        return;
    }
    s->corrupt = true;
    if (s->writable) {
        uint8_t be[8];
        g_warning("qcow2: Marking image as corrupt: %s; further corruption "
                  "events will be suppressed (node '%s')", msg,
                  s->node->node_name);
        s->hdr.incompatible_features |= STRATA_QCOW2_INCOMPAT_CORRUPT;
        strata_qcow2_put_be64(be, s->hdr.incompatible_features);
        /* Straight to the file: this write must not itself be refused
         * by the overlap check that may have called us. */
        if (strata_node_co_pwrite(file_of(s), STRATA_QCOW2_HDR_INCOMPAT,
                                  sizeof(be), be, 0) == 0) {
            strata_node_co_flush(file_of(s));
        }
    } else {
        g_warning("qcow2: Image is corrupt: %s (node '%s')", msg,
                  s->node->node_name);
    }
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b,
                           uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

bool strata_qcow2_overlaps_metadata(StrataQcow2State *s, uint64_t offset,
                                    uint64_t size)
{
    uint64_t l1_len = ((uint64_t)s->l1_size * 8 + s->cluster_size - 1) &
                      ~(s->cluster_size - 1);
    uint64_t rt_len = ((s->refcount_table_size * 8) + s->cluster_size - 1) &
                      ~(s->cluster_size - 1);

    return ranges_overlap(offset, size, 0, s->cluster_size) ||
           ranges_overlap(offset, size, s->l1_table_offset, l1_len) ||
           ranges_overlap(offset, size, s->refcount_table_offset, rt_len);
}

static uint64_t cluster_round(const StrataQcow2State *s, uint64_t bytes)
{
    return (bytes + s->cluster_size - 1) & ~(s->cluster_size - 1);
}

static int overlap_cached(StrataQcow2State *s, int chk, uint64_t offset,
                          uint64_t size)
{
    if ((chk & STRATA_QCOW2_OL_MAIN_HEADER) &&
        ranges_overlap(offset, size, 0, s->cluster_size)) {
        return STRATA_QCOW2_OL_MAIN_HEADER;
    }
    if ((chk & STRATA_QCOW2_OL_ACTIVE_L1) && s->l1_size &&
        ranges_overlap(offset, size, s->l1_table_offset,
                       cluster_round(s, (uint64_t)s->l1_size * 8))) {
        return STRATA_QCOW2_OL_ACTIVE_L1;
    }
    if ((chk & STRATA_QCOW2_OL_REFCOUNT_TABLE) &&
        ranges_overlap(offset, size, s->refcount_table_offset,
                       cluster_round(s, s->refcount_table_size * 8))) {
        return STRATA_QCOW2_OL_REFCOUNT_TABLE;
    }
    if ((chk & STRATA_QCOW2_OL_SNAPSHOT_TABLE) && s->snapshots &&
        s->snapshots->len &&
        ranges_overlap(offset, size, s->hdr.snapshots_offset,
                       cluster_round(s, s->snapshots_size))) {
        return STRATA_QCOW2_OL_SNAPSHOT_TABLE;
    }
    if ((chk & STRATA_QCOW2_OL_BITMAP_DIRECTORY) && s->bitmap_dir_size &&
        ranges_overlap(offset, size, s->bitmap_dir_offset,
                       cluster_round(s, s->bitmap_dir_size))) {
        return STRATA_QCOW2_OL_BITMAP_DIRECTORY;
    }
    if ((chk & STRATA_QCOW2_OL_ACTIVE_L2) && s->l1_table) {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            uint64_t l2 = s->l1_table[i] & STRATA_QCOW2_OFFSET_MASK;
            if (l2 && ranges_overlap(offset, size, l2, s->cluster_size)) {
                return STRATA_QCOW2_OL_ACTIVE_L2;
            }
        }
    }
    if ((chk & STRATA_QCOW2_OL_REFCOUNT_BLOCK) && s->refcount_table) {
        if (!s->rt_used_valid) {
            /* Every guest write comes here: a table of 8192 entries
             * mostly zero is not walked each time. */
            s->rt_used = s->refcount_table_size;
            while (s->rt_used > 0 && !s->refcount_table[s->rt_used - 1]) {
                s->rt_used--;
            }
            s->rt_used_valid = true;
        }
        for (uint64_t i = 0; i < s->rt_used; i++) {
            uint64_t rb = s->refcount_table[i] &
                          STRATA_QCOW2_REFT_OFFSET_MASK;
            if (rb && ranges_overlap(offset, size, rb, s->cluster_size)) {
                return STRATA_QCOW2_OL_REFCOUNT_BLOCK;
            }
        }
    }
    if ((chk & STRATA_QCOW2_OL_INACTIVE_L1) && s->snapshots) {
        for (guint i = 0; i < s->snapshots->len; i++) {
            StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
            if (sn->l1_size &&
                ranges_overlap(offset, size, sn->l1_table_offset,
                               cluster_round(s, (uint64_t)sn->l1_size * 8))) {
                return STRATA_QCOW2_OL_INACTIVE_L1;
            }
        }
    }
    return 0;
}

int strata_qcow2_co_check_metadata_overlap(StrataQcow2State *s, int ign,
                                           uint64_t offset, uint64_t size)
{
    int chk = s->overlap_check & ~ign;
    int ret;

    if (!size || !chk) {
        return 0;
    }
    ret = overlap_cached(s, chk, offset, size);
    if (ret) {
        return ret;
    }
    if ((chk & STRATA_QCOW2_OL_INACTIVE_L2) && s->snapshots &&
        strata_coroutine_self()) {
        for (guint i = 0; i < s->snapshots->len; i++) {
            StrataQcow2Snapshot *sn = g_ptr_array_index(s->snapshots, i);
            g_autofree uint64_t *l1 = NULL;
            if (strata_qcow2_check_snapshot_l1(s, sn) < 0 ||
                strata_qcow2_co_read_l1(s, sn->l1_table_offset, sn->l1_size,
                                        &l1) < 0) {
                /* An unreadable table cannot be checked; the snapshot's
                 * own operations report it. */
                continue;
            }
            for (uint32_t j = 0; j < sn->l1_size; j++) {
                uint64_t l2 = l1[j] & STRATA_QCOW2_OFFSET_MASK;
                if (l2 && ranges_overlap(offset, size, l2, s->cluster_size)) {
                    return STRATA_QCOW2_OL_INACTIVE_L2;
                }
            }
        }
    }
    return 0;
}

static const char *const overlap_names[] = {
    "main-header", "active-l1", "active-l2", "refcount-table",
    "refcount-block", "snapshot-table", "inactive-l1", "inactive-l2",
    "bitmap-directory",
};

int strata_qcow2_co_pre_write_overlap_check(StrataQcow2State *s, int ign,
                                            uint64_t offset, uint64_t size)
{
    int hit;

    if (s->corrupt && s->writable) {
        /* Nothing may be written once the image is known to be bad. */
        return -EIO;
    }
    hit = strata_qcow2_co_check_metadata_overlap(s, ign, offset, size);
    if (!hit) {
        return 0;
    }
    strata_qcow2_co_signal_corruption(s,
        "Preventing invalid write on metadata (overlaps with %s) at %#"
        G_GINT64_MODIFIER "x, %" G_GUINT64_FORMAT " bytes",
        overlap_names[__builtin_ctz((unsigned)hit)], offset, size);
    return -EIO;
}

bool strata_qcow2_parse_overlap_check(JsonObject *options, int *mask,
                                      GError **error)
{
    JsonNode *n = options ? json_object_get_member(options, "overlap-check")
                          : NULL;
    const char *level = NULL;
    JsonObject *o = NULL;

    *mask = STRATA_QCOW2_OL_CACHED;
    if (!n) {
        return true;
    }
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_STRING) {
        level = json_node_get_string(n);
    } else if (JSON_NODE_HOLDS_OBJECT(n)) {
        o = json_node_get_object(n);
        level = strata_opts_get_string(o, "template", "cached");
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'overlap-check' expects a string or an "
                    "object");
        return false;
    }
    if (!strcmp(level, "none")) {
        *mask = 0;
    } else if (!strcmp(level, "constant")) {
        *mask = STRATA_QCOW2_OL_CONSTANT;
    } else if (!strcmp(level, "cached")) {
        *mask = STRATA_QCOW2_OL_CACHED;
    } else if (!strcmp(level, "all")) {
        *mask = STRATA_QCOW2_OL_ALL;
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Unsupported value '%s' for qcow2 option "
                    "'overlap-check'. Allowed are any of the following: "
                    "none, constant, cached, all", level);
        return false;
    }
    for (unsigned i = 0; o && i < G_N_ELEMENTS(overlap_names); i++) {
        if (json_object_has_member(o, overlap_names[i])) {
            if (strata_opts_get_bool(o, overlap_names[i], false)) {
                *mask |= 1 << i;
            } else {
                *mask &= ~(1 << i);
            }
        }
    }
    return true;
}

/* The first byte past the last whole cluster the file could hold. */
static uint64_t file_end_cluster(StrataQcow2State *s)
{
    int64_t len = file_of(s)->total_bytes;
    if (len < 0) {
        return UINT64_MAX;
    }
    return ((uint64_t)len + s->cluster_size - 1) & ~(s->cluster_size - 1);
}

/* Validates the host cluster an L1 or L2 entry names. */
static int check_cluster_offset(StrataQcow2State *s, uint64_t host,
                                const char *what, uint64_t guest)
{
    if (host & (s->cluster_size - 1)) {
        strata_qcow2_co_signal_corruption(s,
            "%s offset %#" G_GINT64_MODIFIER "x unaligned (guest offset "
            "%#" G_GINT64_MODIFIER "x)", what, host, guest);
        return -EIO;
    }
    if (strata_qcow2_overlaps_metadata(s, host, s->cluster_size)) {
        strata_qcow2_co_signal_corruption(s,
            "%s at %#" G_GINT64_MODIFIER "x overlaps the header, L1 or "
            "refcount table (guest offset %#" G_GINT64_MODIFIER "x)",
            what, host, guest);
        return -EIO;
    }
    if (host >= file_end_cluster(s)) {
        strata_qcow2_co_signal_corruption(s,
            "%s at %#" G_GINT64_MODIFIER "x lies past the end of the image "
            "file (guest offset %#" G_GINT64_MODIFIER "x)", what, host,
            guest);
        return -EIO;
    }
    return 0;
}

int strata_qcow2_co_write_l1_entry(StrataQcow2State *s, uint32_t index)
{
    uint8_t be[8];

    strata_qcow2_put_be64(be, s->l1_table[index]);
    strata_node_debug_event(file_of(s), "l1_update");
    return strata_qcow2_co_write_meta(s, STRATA_QCOW2_OL_ACTIVE_L1,
                                      s->l1_table_offset +
                                      (uint64_t)index * 8, be, sizeof(be));
}

int strata_qcow2_co_grow_l1(StrataQcow2State *s, uint64_t min_size)
{
    uint64_t bytes = min_size * 8;
    uint64_t alloc = (bytes + s->cluster_size - 1) & ~(s->cluster_size - 1);
    uint64_t old_offset = s->l1_table_offset;
    uint64_t old_alloc = ((uint64_t)s->l1_size * 8 + s->cluster_size - 1) &
                         ~(s->cluster_size - 1);
    g_autofree uint8_t *buf = NULL;
    uint64_t *table;
    uint8_t hdr[12];
    int64_t off;
    int ret;

    if (min_size <= s->l1_size) {
        return 0;
    }
    if (bytes > STRATA_QCOW2_MAX_L1_BYTES) {
        return -EFBIG;
    }
    off = strata_qcow2_co_alloc_clusters(s, alloc);
    if (off < 0) {
        return (int)off;
    }
    /* The new table's refcount first, then the table, then the header
     * switch (l1_size and offset in one write). */
    ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    if (ret < 0) {
        return ret;
    }
    buf = g_malloc0(alloc);
    for (uint32_t i = 0; i < s->l1_size; i++) {
        strata_qcow2_put_be64(buf + (uint64_t)i * 8, s->l1_table[i]);
    }
    strata_node_debug_event(file_of(s), "l1_grow_write_table");
    ret = strata_qcow2_co_write_meta(s, 0, (uint64_t)off, buf, alloc);
    if (ret < 0) {
        return ret;
    }
    strata_qcow2_put_be32(hdr, (uint32_t)min_size);
    strata_qcow2_put_be64(hdr + 4, (uint64_t)off);
    strata_node_debug_event(file_of(s), "l1_grow_activate_table");
    ret = strata_qcow2_co_write_header_bytes(s, STRATA_QCOW2_HDR_L1, hdr,
                                             sizeof(hdr));
    if (ret < 0) {
        return ret;
    }
    table = g_new0(uint64_t, min_size);
    memcpy(table, s->l1_table, (uint64_t)s->l1_size * 8);
    g_free(s->l1_table);
    s->l1_table = table;
    s->l1_size = (uint32_t)min_size;
    s->l1_table_offset = (uint64_t)off;
    s->hdr.l1_size = s->l1_size;
    s->hdr.l1_table_offset = s->l1_table_offset;
    if (old_alloc) {
        strata_qcow2_co_free_clusters(s, old_offset, old_alloc);
    }
    return 0;
}

/* Gives L1 entry @l1_index a table of its own (new, or a copy of a
 * shared one), in the order refcount → table → L1 entry → old table's
 * reference dropped. */
static int alloc_l2_table(StrataQcow2State *s, uint32_t l1_index)
{
    uint64_t old = s->l1_table[l1_index] & STRATA_QCOW2_OFFSET_MASK;
    g_autofree uint8_t *table = g_malloc0(s->cluster_size);
    int64_t off;
    int ret;

    if (old) {
        ret = check_cluster_offset(s, old, "L2 table",
                                   (uint64_t)l1_index
                                   << (s->l2_bits + s->cluster_bits));
        if (ret < 0) {
            return ret;
        }
        for (uint64_t sl = 0; sl < s->cluster_size; sl += s->l2_slice_size) {
            void *src;
            ret = strata_qcow2_cache_co_get(s->l2_cache, old + sl, &src);
            if (ret < 0) {
                return ret;
            }
            memcpy(table + sl, src, s->l2_slice_size);
            strata_qcow2_cache_put(s->l2_cache, &src);
        }
    }
    off = strata_qcow2_co_alloc_clusters(s, s->cluster_size);
    if (off < 0) {
        return (int)off;
    }
    ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    if (ret < 0) {
        return ret;
    }
    ret = strata_qcow2_co_write_meta(s, 0, (uint64_t)off, table,
                                     s->cluster_size);
    if (ret < 0) {
        return ret;
    }
    s->l1_table[l1_index] = (uint64_t)off | STRATA_QCOW2_OFLAG_COPIED;
    ret = strata_qcow2_co_write_l1_entry(s, l1_index);
    if (ret < 0) {
        s->l1_table[l1_index] = old;
        return ret;
    }
    if (old) {
        strata_qcow2_co_free_clusters(s, old, s->cluster_size);
    }
    return 0;
}

int strata_qcow2_co_get_l2_slice(StrataQcow2State *s, uint64_t offset,
                                 bool allocate, uint64_t **slice,
                                 uint64_t *index)
{
    uint64_t l1_index = offset >> (s->l2_bits + s->cluster_bits);
    uint64_t l2_index = (offset >> s->cluster_bits) & (s->l2_size - 1);
    uint64_t l2_offset, slice_offset;
    void *table;
    int ret;

    *slice = NULL;
    *index = l2_index % s->l2_slice_entries;
    if (l1_index >= s->l1_size) {
        if (!allocate) {
            return 0;
        }
        ret = strata_qcow2_co_grow_l1(s, l1_index + 1);
        if (ret < 0) {
            return ret;
        }
    }
    if (allocate && !(s->l1_table[l1_index] & STRATA_QCOW2_OFLAG_COPIED)) {
        ret = alloc_l2_table(s, (uint32_t)l1_index);
        if (ret < 0) {
            return ret;
        }
    }
    l2_offset = s->l1_table[l1_index] & STRATA_QCOW2_OFFSET_MASK;
    if (!l2_offset) {
        return 0;
    }
    ret = check_cluster_offset(s, l2_offset, "L2 table", offset);
    if (ret < 0) {
        return ret;
    }
    slice_offset = l2_offset +
                   (l2_index / s->l2_slice_entries) * s->l2_slice_size;
    ret = strata_qcow2_cache_co_get(s->l2_cache, slice_offset, &table);
    if (ret < 0) {
        return ret;
    }
    *slice = table;
    *index = l2_index % s->l2_slice_entries;
    return 0;
}

static bool has_host(StrataQcow2ClusterType t)
{
    return t == STRATA_QCOW2_CLUSTER_NORMAL ||
           t == STRATA_QCOW2_CLUSTER_ZERO_ALLOC ||
           t == STRATA_QCOW2_CLUSTER_UNALLOCATED_ALLOC;
}

/*
 * strata_qcow2_co_get_host_offset() on an extended-L2 image, from entry
 * @idx of the pinned @slice (released here): a run is a sequence of
 * subclusters of one type, which may go on into the following entries
 * (with data, contiguous on the host).
 */
static int get_host_offset_ext(StrataQcow2State *s, uint64_t offset,
                               uint64_t want, uint64_t *slice, uint64_t idx,
                               uint64_t *bytes, uint64_t *host,
                               StrataQcow2ClusterType *type)
{
    uint64_t in_cluster = strata_qcow2_offset_into_cluster(s, offset);
    uint64_t scs = s->subcluster_size;
    uint64_t entry = strata_qcow2_l2_get(s, slice, idx);
    uint64_t bitmap = strata_qcow2_l2_get_bitmap(s, slice, idx);
    unsigned sc = (unsigned)(in_cluster >> s->subcluster_bits);
    uint64_t first_host = entry & STRATA_QCOW2_OFFSET_MASK;
    uint64_t e = entry, b = bitmap, i = idx, n;
    StrataQcow2ClusterType t;
    int ret;

    if (!strata_qcow2_extl2_valid(entry, bitmap)) {
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        strata_qcow2_co_signal_corruption(s,
            "Invalid cluster entry found (guest offset %#" G_GINT64_MODIFIER
            "x, entry %#" G_GINT64_MODIFIER "x, bitmap %#" G_GINT64_MODIFIER
            "x)", offset, entry, bitmap);
        return -EIO;
    }
    t = strata_qcow2_subcluster_type(entry, bitmap, sc);
    if (t == STRATA_QCOW2_CLUSTER_COMPRESSED) {
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        *type = t;
        *host = entry;
        *bytes = MIN(want, s->cluster_size - in_cluster);
        return 0;
    }
    if (first_host) {
        ret = check_cluster_offset(s, first_host, "Data cluster", offset);
        if (ret < 0) {
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
            return ret;
        }
    }

    n = scs - (in_cluster & (scs - 1));
    sc++;
    while (n < want) {
        StrataQcow2ClusterType tt;
        bool next_entry = sc == STRATA_QCOW2_SUBCLUSTERS;

        if (next_entry) {
            if (++i >= s->l2_slice_entries) {
                break;
            }
            e = strata_qcow2_l2_get(s, slice, i);
            b = strata_qcow2_l2_get_bitmap(s, slice, i);
            if (!strata_qcow2_extl2_valid(e, b) ||
                (e & STRATA_QCOW2_OFLAG_COPIED) !=
                (entry & STRATA_QCOW2_OFLAG_COPIED)) {
                break;
            }
            sc = 0;
        }
        tt = strata_qcow2_subcluster_type(e, b, sc);
        if (tt != t) {
            break;
        }
        if (t == STRATA_QCOW2_CLUSTER_NORMAL &&
            (e & STRATA_QCOW2_OFFSET_MASK) + ((uint64_t)sc << s->subcluster_bits)
            != first_host + in_cluster + n) {
            break;
        }
        if (next_entry && has_host(t) &&
            check_cluster_offset(s, e & STRATA_QCOW2_OFFSET_MASK,
                                 "Data cluster", offset + n) < 0) {
            break;
        }
        n += scs;
        sc++;
    }
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
    *type = t;
    *bytes = MIN(want, n);
    if (has_host(t)) {
        *host = first_host + in_cluster;
    }
    return 0;
}

/* Flags that must agree for neighbouring entries to form one run. */
#define RUN_FLAGS                                                           \
    (STRATA_QCOW2_OFLAG_COPIED | STRATA_QCOW2_OFLAG_ZERO)

int strata_qcow2_co_get_host_offset(StrataQcow2State *s, uint64_t offset,
                                    uint64_t *bytes, uint64_t *host,
                                    StrataQcow2ClusterType *type,
                                    uint64_t *l2_entry)
{
    uint64_t in_cluster = strata_qcow2_offset_into_cluster(s, offset);
    uint64_t l2_index = (offset >> s->cluster_bits) & (s->l2_size - 1);
    uint64_t in_slice = l2_index % s->l2_slice_entries;
    /* How far the slice (or, without a table, the L2 range) reaches. */
    uint64_t slice_bytes = ((s->l2_slice_entries - in_slice)
                            << s->cluster_bits) - in_cluster;
    uint64_t want = MIN(*bytes, slice_bytes);
    uint64_t *slice, idx, entry, first_host, n;
    StrataQcow2ClusterType t;
    int ret;

    *host = 0;
    if (l2_entry) {
        *l2_entry = 0;
    }
    ret = strata_qcow2_co_get_l2_slice(s, offset, false, &slice, &idx);
    if (ret < 0) {
        return ret;
    }
    if (!slice) {
        *type = STRATA_QCOW2_CLUSTER_UNALLOCATED;
        *bytes = want;
        return 0;
    }

    entry = strata_qcow2_l2_get(s, slice, idx);
    if (l2_entry) {
        *l2_entry = entry;
    }
    if (s->extended_l2) {
        return get_host_offset_ext(s, offset, want, slice, idx, bytes, host,
                                   type);
    }
    t = strata_qcow2_l2_entry_type(entry);
    if (t == STRATA_QCOW2_CLUSTER_COMPRESSED) {
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        *type = t;
        *host = entry;
        *bytes = MIN(want, s->cluster_size - in_cluster);
        return 0;
    }
    if ((entry & STRATA_QCOW2_OFLAG_ZERO) && s->hdr.version < 3) {
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        strata_qcow2_co_signal_corruption(s,
            "Zero cluster entry found in pre-v3 image (guest offset "
            "%#" G_GINT64_MODIFIER "x)", offset);
        return -EIO;
    }
    first_host = entry & STRATA_QCOW2_OFFSET_MASK;
    if (t == STRATA_QCOW2_CLUSTER_NORMAL ||
        t == STRATA_QCOW2_CLUSTER_ZERO_ALLOC) {
        ret = check_cluster_offset(s, first_host, "Data cluster", offset);
        if (ret < 0) {
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
            return ret;
        }
    }

    /* Extend the run over following entries of the same kind (for data,
     * contiguous on the host too). */
    n = s->cluster_size - in_cluster;
    for (uint64_t i = idx + 1; n < want && i < s->l2_slice_entries; i++) {
        uint64_t e = GUINT64_FROM_BE(slice[i]);
        if (strata_qcow2_l2_entry_type(e) != t ||
            (e & RUN_FLAGS) != (entry & RUN_FLAGS)) {
            break;
        }
        if (t == STRATA_QCOW2_CLUSTER_NORMAL &&
            (e & STRATA_QCOW2_OFFSET_MASK) !=
            first_host + ((i - idx) << s->cluster_bits)) {
            break;
        }
        if (t == STRATA_QCOW2_CLUSTER_NORMAL ||
            t == STRATA_QCOW2_CLUSTER_ZERO_ALLOC) {
            ret = check_cluster_offset(s, e & STRATA_QCOW2_OFFSET_MASK,
                                       "Data cluster",
                                       offset + ((i - idx)
                                                 << s->cluster_bits));
            if (ret < 0) {
                break;
            }
        }
        n += s->cluster_size;
    }
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);

    *type = t;
    *bytes = MIN(want, n);
    if (t == STRATA_QCOW2_CLUSTER_NORMAL ||
        t == STRATA_QCOW2_CLUSTER_ZERO_ALLOC) {
        *host = first_host + in_cluster;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Compressed clusters                                                 */
/* ------------------------------------------------------------------ */

static int inflate_zlib(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len)
{
    z_stream z;
    int ret;

    memset(&z, 0, sizeof(z));
    /* A raw deflate stream (no zlib header) with a 4 KiB window. */
    if (inflateInit2(&z, -12) != Z_OK) {
        return -EIO;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)in_len;
    z.next_out = out;
    z.avail_out = (uInt)out_len;
    ret = inflate(&z, Z_FINISH);
    /* The input may hold trailing garbage or the next cluster's start:
     * what matters is a completely filled output cluster. */
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && z.avail_out == 0) {
        ret = 0;
    } else {
        ret = -EIO;
    }
    inflateEnd(&z);
    return ret;
}

#ifdef STRATA_HAVE_ZSTD
static int inflate_zstd(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len)
{
    ZSTD_DCtx *d = ZSTD_createDCtx();
    ZSTD_inBuffer ib = { in, in_len, 0 };
    ZSTD_outBuffer ob = { out, out_len, 0 };
    int ret = 0;

    if (!d) {
        return -ENOMEM;
    }
    while (ob.pos < ob.size) {
        size_t last_pos = ob.pos, last_in = ib.pos;
        size_t r = ZSTD_decompressStream(d, &ob, &ib);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (ob.pos == last_pos && ib.pos == last_in) {
            ret = -EIO; /* no progress: truncated input */
            break;
        }
    }
    ZSTD_freeDCtx(d);
    return ret;
}
#endif

static ssize_t deflate_zlib(const uint8_t *in, size_t in_len, uint8_t *out,
                            size_t out_len)
{
    z_stream z;
    ssize_t ret;

    memset(&z, 0, sizeof(z));
    /* Raw deflate, 4 KiB window: what QEMU's reader inflates. */
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)in_len;
    z.next_out = out;
    z.avail_out = (uInt)out_len;
    ret = deflate(&z, Z_FINISH);
    if (ret == Z_STREAM_END) {
        ret = (ssize_t)(out_len - z.avail_out);
    } else {
        /* Z_OK or Z_BUF_ERROR: the output did not fit. */
        ret = -ENOSPC;
    }
    deflateEnd(&z);
    return ret;
}

#ifdef STRATA_HAVE_ZSTD
static ssize_t deflate_zstd(const uint8_t *in, size_t in_len, uint8_t *out,
                            size_t out_len)
{
    size_t r = ZSTD_compress(out, out_len, in, in_len, ZSTD_CLEVEL_DEFAULT);

    if (ZSTD_isError(r)) {
        return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall
            ? -ENOSPC : -EIO;
    }
    return (ssize_t)r;
}
#endif

ssize_t strata_qcow2_compress(StrataQcow2State *s, const uint8_t *in,
                              uint8_t *out, size_t out_len)
{
    switch (s->hdr.compression_type) {
    case 0:
        return deflate_zlib(in, s->cluster_size, out, out_len);
#ifdef STRATA_HAVE_ZSTD
    case 1:
        return deflate_zstd(in, s->cluster_size, out, out_len);
#endif
    default:
        return -ENOTSUP;
    }
}

int strata_qcow2_co_read_compressed(StrataQcow2State *s, uint64_t entry)
{
    uint64_t coffset = entry & s->cluster_offset_mask;
    uint64_t nb_sectors = ((entry >> s->csize_shift) & s->csize_mask) + 1;
    uint64_t csize = nb_sectors * 512 - (coffset & 511);
    int ret;

    if (s->decmp_host == entry && entry) {
        return 0;
    }
    if (coffset > STRATA_QCOW2_MAX_HOST_OFFSET ||
        coffset < s->cluster_size) {
        strata_qcow2_co_signal_corruption(s,
            "Compressed cluster at %#" G_GINT64_MODIFIER "x out of range",
            coffset);
        return -EIO;
    }
    if (!s->cmp_buf) {
        /* Up to (cluster_size / 256) sectors: twice a cluster. */
        s->cmp_buf = g_malloc(2 * s->cluster_size);
        s->decmp_buf = g_malloc(s->cluster_size);
    }
    s->decmp_host = 0;
    ret = strata_node_co_pread(file_of(s), coffset, csize, s->cmp_buf, 0);
    if (ret < 0) {
        return ret;
    }
    switch (s->hdr.compression_type) {
    case 0:
        ret = inflate_zlib(s->cmp_buf, csize, s->decmp_buf, s->cluster_size);
        break;
#ifdef STRATA_HAVE_ZSTD
    case 1:
        ret = inflate_zstd(s->cmp_buf, csize, s->decmp_buf, s->cluster_size);
        break;
#endif
    default:
        ret = -ENOTSUP;
        break;
    }
    if (ret == 0) {
        s->decmp_host = entry;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Header rewrite                                                      */
/* ------------------------------------------------------------------ */

int strata_qcow2_co_rewrite_header(StrataQcow2State *s, GError **error)
{
    g_autofree uint8_t *cl = NULL;
    int ret;

    s->hdr.l1_size = s->l1_size;
    s->hdr.l1_table_offset = s->l1_table_offset;
    s->hdr.refcount_table_offset = s->refcount_table_offset;
    /* Metadata the new header names (a backing file) must be stable
     * before it does. */
    ret = strata_qcow2_cache_co_flush(s->l2_cache);
    if (ret == 0) {
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    }
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not flush qcow2 metadata: %s", g_strerror(-ret));
        return ret;
    }
    cl = strata_qcow2_header_build(&s->hdr, error);
    if (!cl) {
        return -EINVAL;
    }
    ret = strata_qcow2_co_write_header_bytes(s, 0, cl, s->cluster_size);
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not write qcow2 header: %s", g_strerror(-ret));
    }
    return ret;
}
