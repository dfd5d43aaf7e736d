/* strata — qcow2 metadata cache: L2 table slices and refcount blocks.
 *
 * An entry is one slice of a metadata cluster, pinned while in use and
 * evicted least-recently-used.  Dirty entries go back to the file on
 * eviction or flush; a cache may depend on another (L2 on refcounts
 * after an allocation, refcounts on L2 after a free), and then the other
 * is written and the file flushed before any of its own entries, so a
 * crash never leaves a reference to an unreferenced cluster.
 *
 * Every call runs with s->lock held: the cache needs no lock of its own.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-private.h"

#define MIN_L2_CACHE_CLUSTERS 2
#define MIN_REFCOUNT_CACHE_CLUSTERS 4
#define DEFAULT_L2_CACHE_MAX (32ull * 1024 * 1024)
#define DEFAULT_L2_SLICE 4096

typedef struct CacheEntry {
    uint64_t offset;   /* 0: free slot */
    void *table;
    unsigned ref;
    bool dirty;
    uint64_t lru;
} CacheEntry;

struct StrataQcow2Cache {
    StrataQcow2State *s;
    CacheEntry *entries;
    unsigned nb_entries;
    uint32_t entry_size;
    uint64_t lru_counter;
    GHashTable *by_offset; /* &entry->offset → entry */
    StrataQcow2Cache *depends;
};

static guint offset_hash(gconstpointer p)
{
    uint64_t v = *(const uint64_t *)p;
    return (guint)(v >> 9) ^ (guint)(v >> 32);
}

static gboolean offset_equal(gconstpointer a, gconstpointer b)
{
    return *(const uint64_t *)a == *(const uint64_t *)b;
}

StrataQcow2Cache *strata_qcow2_cache_new(StrataQcow2State *s,
                                         unsigned nb_entries,
                                         uint32_t entry_size)
{
    StrataQcow2Cache *c = g_new0(StrataQcow2Cache, 1);

    c->s = s;
    c->nb_entries = MAX(nb_entries, 1u);
    c->entry_size = entry_size;
    /* Tables are allocated when first used: a node that is only read
     * through, or a cache sized for a big disk, costs no memory for
     * slots it never fills. */
    c->entries = g_new0(CacheEntry, c->nb_entries);
    c->by_offset = g_hash_table_new(offset_hash, offset_equal);
    return c;
}

void strata_qcow2_cache_free(StrataQcow2Cache *c)
{
    if (!c) {
        return;
    }
    for (unsigned i = 0; i < c->nb_entries; i++) {
        free(c->entries[i].table);
    }
    g_hash_table_destroy(c->by_offset);
    g_free(c->entries);
    g_free(c);
}

unsigned strata_qcow2_cache_nb_entries(const StrataQcow2Cache *c)
{
    return c->nb_entries;
}

int strata_qcow2_cache_co_set_dependency(StrataQcow2Cache *c,
                                         StrataQcow2Cache *dep)
{
    int ret;

    /* Each cache depends on at most one other, and never both on each
     * other: a cycle has no write order.  Settle what is pending instead
     * of forgetting it (forgetting let a decrement reach the disk before
     * the L2 change that dropped the reference). */
    if (dep->depends) {
        StrataQcow2Cache *old = dep->depends;

        dep->depends = NULL;
        ret = strata_qcow2_cache_co_flush(old);
        if (ret < 0) {
            dep->depends = old;
            return ret;
        }
    }
    if (c->depends && c->depends != dep) {
        StrataQcow2Cache *old = c->depends;

        c->depends = NULL;
        ret = strata_qcow2_cache_co_flush(old);
        if (ret < 0) {
            c->depends = old;
            return ret;
        }
    }
    c->depends = dep;
    return 0;
}

bool strata_qcow2_cache_is_dirty(const StrataQcow2Cache *c)
{
    for (unsigned i = 0; i < c->nb_entries; i++) {
        if (c->entries[i].dirty) {
            return true;
        }
    }
    return false;
}

static StrataNode *file_node(StrataQcow2Cache *c)
{
    return c->s->node->file->node;
}

static int entry_write(StrataQcow2Cache *c, CacheEntry *e)
{
    int ret;

    if (!e->dirty) {
        return 0;
    }
    if (c->depends) {
        StrataQcow2Cache *dep = c->depends;
        c->depends = NULL;
        ret = strata_qcow2_cache_co_flush(dep);
        if (ret < 0) {
            c->depends = dep;
            return ret;
        }
    }
    ret = strata_qcow2_co_pre_write_overlap_check(
        c->s, c == c->s->refcount_cache
                  ? STRATA_QCOW2_OL_REFCOUNT_BLOCK
                  : STRATA_QCOW2_OL_ACTIVE_L2 | STRATA_QCOW2_OL_INACTIVE_L2,
        e->offset, c->entry_size);
    if (ret < 0) {
        return ret;
    }
    ret = strata_node_co_pwrite(file_node(c), e->offset, c->entry_size,
                                e->table, 0);
    if (ret < 0) {
        return ret;
    }
    e->dirty = false;
    return 0;
}

int strata_qcow2_cache_co_write(StrataQcow2Cache *c)
{
    int first_err = 0;

    for (unsigned i = 0; i < c->nb_entries; i++) {
        int ret = entry_write(c, &c->entries[i]);
        if (ret < 0 && !first_err) {
            first_err = ret;
        }
    }
    return first_err;
}

int strata_qcow2_cache_co_flush(StrataQcow2Cache *c)
{
    int ret = strata_qcow2_cache_co_write(c);
    int fret;

    if (c->depends) {
        /* Nothing was dirty, yet callers expect the dependency settled. */
        StrataQcow2Cache *dep = c->depends;
        c->depends = NULL;
        fret = strata_qcow2_cache_co_flush(dep);
        if (fret < 0 && !ret) {
            ret = fret;
        }
    }
    fret = strata_node_co_flush(file_node(c));
    return ret < 0 ? ret : fret;
}

static CacheEntry *find_victim(StrataQcow2Cache *c)
{
    CacheEntry *best = NULL;

    for (unsigned i = 0; i < c->nb_entries; i++) {
        CacheEntry *e = &c->entries[i];
        if (e->ref) {
            continue;
        }
        if (!e->offset) {
            return e;
        }
        if (!best || e->lru < best->lru) {
            best = e;
        }
    }
    return best;
}

static int cache_get(StrataQcow2Cache *c, uint64_t offset, void **table,
                     bool read)
{
    CacheEntry *e;
    int ret;

    g_return_val_if_fail(offset != 0, -EINVAL);

    e = g_hash_table_lookup(c->by_offset, &offset);
    if (e) {
        goto found;
    }
    e = find_victim(c);
    if (!e) {
        /* Every entry pinned: only a bug in the callers gets here. */
        g_warning("qcow2 metadata cache: every entry is in use");
        return -ENOSPC;
    }
    if (e->offset) {
        ret = entry_write(c, e);
        if (ret < 0) {
            return ret;
        }
        g_hash_table_remove(c->by_offset, &e->offset);
        e->offset = 0;
    }
    if (!e->table) {
        /* Page-aligned, so that O_DIRECT reads land without a bounce. */
        if (posix_memalign(&e->table, 4096, c->entry_size) != 0) {
            e->table = NULL;
            return -ENOMEM;
        }
    }
    /* Pin while reading: the read yields and others may look for it. */
    if (read) {
        e->ref++;
        ret = strata_node_co_pread(file_node(c), offset, c->entry_size,
                                   e->table, 0);
        e->ref--;
        if (ret < 0) {
            return ret;
        }
        /* Someone else may have loaded the same slice meanwhile. */
        CacheEntry *other = g_hash_table_lookup(c->by_offset, &offset);
        if (other) {
            e = other;
            goto found;
        }
    } else {
        memset(e->table, 0, c->entry_size);
    }
    e->offset = offset;
    e->dirty = false;
    g_hash_table_insert(c->by_offset, &e->offset, e);

found:
    e->ref++;
    e->lru = ++c->lru_counter;
    *table = e->table;
    return 0;
}

int strata_qcow2_cache_co_get(StrataQcow2Cache *c, uint64_t offset,
                              void **table)
{
    return cache_get(c, offset, table, true);
}

int strata_qcow2_cache_co_get_empty(StrataQcow2Cache *c, uint64_t offset,
                                    void **table)
{
    return cache_get(c, offset, table, false);
}

static CacheEntry *entry_of(StrataQcow2Cache *c, void *table)
{
    for (unsigned i = 0; i < c->nb_entries; i++) {
        if (c->entries[i].table == table) {
            return &c->entries[i];
        }
    }
    return NULL;
}

void strata_qcow2_cache_put(StrataQcow2Cache *c, void **table)
{
    CacheEntry *e;

    if (!*table) {
        return;
    }
    e = entry_of(c, *table);
    g_return_if_fail(e && e->ref > 0);
    e->ref--;
    *table = NULL;
}

void strata_qcow2_cache_mark_dirty(StrataQcow2Cache *c, void *table)
{
    CacheEntry *e = entry_of(c, table);

    g_return_if_fail(e != NULL);
    e->dirty = true;
}

void strata_qcow2_cache_discard_cluster(StrataQcow2Cache *c,
                                        uint64_t offset,
                                        uint64_t cluster_size)
{
    for (unsigned i = 0; i < c->nb_entries; i++) {
        CacheEntry *e = &c->entries[i];
        if (e->offset && e->offset >= offset &&
            e->offset < offset + cluster_size && !e->ref) {
            g_hash_table_remove(c->by_offset, &e->offset);
            e->offset = 0;
            e->dirty = false;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Sizes from options                                                  */
/* ------------------------------------------------------------------ */

bool strata_qcow2_cache_sizes(JsonObject *options, uint64_t virtual_size,
                              uint32_t cluster_bits,
                              StrataQcow2CacheSizes *sizes, GError **error)
{
    uint64_t cluster_size = 1ull << cluster_bits;
    uint64_t l2_entries = (virtual_size + cluster_size - 1) >> cluster_bits;
    /* Enough L2 cache to map the whole disk, in whole clusters. */
    uint64_t max_l2 = ((l2_entries * 8 + cluster_size - 1) >> cluster_bits)
                      << cluster_bits;
    uint64_t min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size;
    bool has_all = options && strata_opts_has(options, "cache-size");
    bool has_l2 = options && strata_opts_has(options, "l2-cache-size");
    bool has_rc = options && strata_opts_has(options, "refcount-cache-size");
    uint64_t all = has_all ? strata_opts_get_size(options, "cache-size", 0)
                           : 0;
    uint64_t l2 = has_l2 ? strata_opts_get_size(options, "l2-cache-size", 0)
                         : 0;
    uint64_t rc = has_rc
        ? strata_opts_get_size(options, "refcount-cache-size", 0) : 0;
    uint64_t slice = options
        ? strata_opts_get_size(options, "l2-cache-entry-size",
                               MIN(cluster_size, DEFAULT_L2_SLICE))
        : MIN(cluster_size, DEFAULT_L2_SLICE);

    if (has_all) {
        if (has_l2 && has_rc) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "cache-size, l2-cache-size and refcount-cache-size "
                        "may not be set at the same time");
            return false;
        }
        if (has_l2 && l2 > all) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "l2-cache-size may not exceed cache-size");
            return false;
        }
        if (has_rc && rc > all) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "refcount-cache-size may not exceed cache-size");
            return false;
        }
        if (has_l2) {
            rc = all - l2;
        } else if (has_rc) {
            l2 = all - rc;
        } else if (all >= max_l2 + min_rc) {
            l2 = max_l2;
            rc = all - l2;
        } else {
            rc = MIN(all, min_rc);
            l2 = all - rc;
        }
    } else {
        if (!has_l2) {
            l2 = MIN(max_l2, DEFAULT_L2_CACHE_MAX);
        }
        if (!has_rc) {
            rc = min_rc;
        }
    }

    if (slice < 512 || slice > cluster_size || (slice & (slice - 1))) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "L2 cache entry size must be a power of two between 512 "
                    "and the cluster size (%" G_GUINT64_FORMAT ")",
                    cluster_size);
        return false;
    }
    /* Never fewer entries than a request may pin at once. */
    sizes->l2_cache_size = MAX(l2, MIN_L2_CACHE_CLUSTERS * cluster_size);
    sizes->refcount_cache_size = MAX(rc, min_rc);
    sizes->l2_slice_size = slice;
    return true;
}
