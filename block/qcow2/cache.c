/* strata — qcow2 metadata cache: L2 table slices and refcount blocks.
 *
 * An entry is one slice of a metadata cluster, pinned while in use and
 * evicted least-recently-used.  Entries are created on first use, up to
 * the cache's size, so a node opened and little used costs little memory
 * however large its image is; the clean interval gives unused ones back.  Dirty entries go back to the file on
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
/* Enough to map a 1 TiB image with 64 KiB clusters; only what is used
 * is allocated. */
#define DEFAULT_L2_CACHE_MAX (128ull * 1024 * 1024)
#define DEFAULT_L2_SLICE 4096

typedef struct CacheEntry {
    uint64_t offset;   /* 0: holds nothing */
    void *table;       /* aligned for O_DIRECT, entry_size bytes */
    unsigned ref;
    bool dirty;
    bool used;         /* looked up since the last clean tick */
    GList link;        /* in c->lru */
} CacheEntry;

struct StrataQcow2Cache {
    StrataQcow2State *s;
    unsigned nb_entries;       /* the most entries the cache may hold */
    unsigned nb_alloc;         /* entries that exist */
    unsigned nb_dirty;
    uint32_t entry_size;
    /* Every existing entry, most recently used first; empty ones at the
     * tail. */
    GQueue lru;
    GHashTable *by_offset;     /* &entry->offset → entry */
    GHashTable *by_table;      /* entry->table → entry */
    StrataQcow2Cache *depends;
    StrataQcow2CacheStats stats;
    GSource *clean_source;     /* armed while there are entries */
    GMainContext *clean_context;
    unsigned clean_interval;   /* seconds; 0: never */
};

static void arm_clean(StrataQcow2Cache *c);

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
    g_queue_init(&c->lru);
    c->by_offset = g_hash_table_new(offset_hash, offset_equal);
    c->by_table = g_hash_table_new(g_direct_hash, g_direct_equal);
    return c;
}

static void entry_free(StrataQcow2Cache *c, CacheEntry *e)
{
    g_queue_unlink(&c->lru, &e->link);
    g_hash_table_remove(c->by_table, e->table);
    free(e->table);
    g_free(e);
    c->nb_alloc--;
}

void strata_qcow2_cache_free(StrataQcow2Cache *c)
{
    if (!c) {
        return;
    }
    strata_qcow2_cache_set_clean_interval(c, NULL, 0);
    while (c->lru.head) {
        entry_free(c, c->lru.head->data);
    }
    g_hash_table_destroy(c->by_offset);
    g_hash_table_destroy(c->by_table);
    g_free(c);
}

unsigned strata_qcow2_cache_nb_entries(const StrataQcow2Cache *c)
{
    return c->nb_entries;
}

void strata_qcow2_cache_get_stats(const StrataQcow2Cache *c,
                                  StrataQcow2CacheStats *stats)
{
    *stats = c->stats;
    stats->entries = c->nb_alloc;
    stats->max_entries = c->nb_entries;
    stats->bytes = (uint64_t)c->nb_alloc * c->entry_size;
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

void strata_qcow2_cache_drop_dependency(StrataQcow2Cache *c)
{
    c->depends = NULL;
}

bool strata_qcow2_cache_is_dirty(const StrataQcow2Cache *c)
{
    return c->nb_dirty > 0;
}

static StrataNode *file_node(StrataQcow2Cache *c)
{
    return c->s->node->file->node;
}

static void set_dirty(StrataQcow2Cache *c, CacheEntry *e, bool dirty)
{
    if (e->dirty != dirty) {
        e->dirty = dirty;
        if (dirty) {
            c->nb_dirty++;
        } else {
            c->nb_dirty--;
        }
    }
}

/* The most entries one request writes (a bound on its iovec). */
#define MAX_RUN 256

/* Writes @n dirty entries whose tables are contiguous on disk, @run[0]
 * first, with one request: a tree's L2 slices or refblocks written
 * together cost one system call, not one each.  The caller settled the
 * dependency and keeps the entries pinned. */
static int run_write(StrataQcow2Cache *c, CacheEntry **run, unsigned n)
{
    uint64_t offset = run[0]->offset;
    uint64_t bytes = (uint64_t)n * c->entry_size;
    StrataIOVec qiov;
    int ret;

    ret = strata_qcow2_co_pre_write_overlap_check(
        c->s, c == c->s->refcount_cache
                  ? STRATA_QCOW2_OL_REFCOUNT_BLOCK
                  : STRATA_QCOW2_OL_ACTIVE_L2 | STRATA_QCOW2_OL_INACTIVE_L2,
        offset, bytes);
    if (ret < 0) {
        return ret;
    }
    strata_iov_init(&qiov, (int)n);
    for (unsigned i = 0; i < n; i++) {
        /* Clean before the write yields: a change made meanwhile marks
         * it dirty again and is written next time. */
        set_dirty(c, run[i], false);
        strata_iov_add(&qiov, run[i]->table, c->entry_size);
    }
    strata_node_debug_event(file_node(c), c == c->s->refcount_cache
                                              ? "refblock_update_part"
                                              : "l2_update");
    ret = strata_node_co_pwritev(file_node(c), offset, bytes, &qiov, 0, 0);
    strata_iov_cleanup(&qiov);
    if (ret < 0) {
        for (unsigned i = 0; i < n; i++) {
            set_dirty(c, run[i], true);
        }
    }
    return ret;
}

/* Writes what @c depends on and flushes the file, once: 0 when there
 * was nothing to settle, 1 when it yielded for it, or -errno. */
static int settle_dependency(StrataQcow2Cache *c)
{
    StrataQcow2Cache *dep = c->depends;
    int ret;

    if (!dep) {
        return 0;
    }
    c->depends = NULL;
    ret = strata_qcow2_cache_co_flush(dep);
    if (ret < 0) {
        c->depends = dep;
        return ret;
    }
    return 1;
}

static int entry_write(StrataQcow2Cache *c, CacheEntry *e)
{
    uint64_t offset = e->offset;
    int ret;

    if (!e->dirty) {
        return 0;
    }
    ret = settle_dependency(c);
    if (ret < 0) {
        return ret;
    }
    if (!e->dirty || e->offset != offset) {
        return 0;   /* written by someone else meanwhile */
    }
    e->ref++;
    ret = run_write(c, &e, 1);
    e->ref--;
    return ret;
}

static int cmp_entry_offset(const void *a, const void *b)
{
    const CacheEntry *x = *(CacheEntry *const *)a;
    const CacheEntry *y = *(CacheEntry *const *)b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

int strata_qcow2_cache_co_write(StrataQcow2Cache *c)
{
    g_autofree CacheEntry **dirty = NULL;
    unsigned n = 0;
    int first_err = 0;

    if (!c->nb_dirty) {
        return 0;
    }
    /* Pinned while the writes yield: the clean interval and eviction
     * leave them alone. */
    dirty = g_new(CacheEntry *, c->nb_dirty);
    for (GList *l = c->lru.head; l && n < c->nb_dirty; l = l->next) {
        CacheEntry *e = l->data;
        if (e->dirty) {
            e->ref++;
            dirty[n++] = e;
        }
    }
    qsort(dirty, n, sizeof(*dirty), cmp_entry_offset);
    for (unsigned i = 0; i < n;) {
        unsigned len = 1;
        int ret;

        if (!dirty[i]->dirty) {
            i++;    /* written by someone else meanwhile */
            continue;
        }
        /* Settled before every run: one may be set while a write
         * yields.  The entries are looked at again afterwards. */
        ret = settle_dependency(c);
        if (ret != 0) {
            if (ret < 0) {
                first_err = ret;
                break;
            }
            continue;
        }
        while (i + len < n && len < MAX_RUN && dirty[i + len]->dirty &&
               dirty[i + len]->offset ==
                   dirty[i]->offset + (uint64_t)len * c->entry_size) {
            len++;
        }
        ret = run_write(c, dirty + i, len);
        if (ret < 0 && !first_err) {
            first_err = ret;
        }
        i += len;
    }
    for (unsigned i = 0; i < n; i++) {
        dirty[i]->ref--;
    }
    return first_err;
}

int strata_qcow2_cache_co_flush(StrataQcow2Cache *c)
{
    int ret = strata_qcow2_cache_co_write(c);
    /* Nothing was dirty, yet callers expect the dependency settled. */
    int fret = settle_dependency(c);

    if (fret < 0 && !ret) {
        ret = fret;
    }
    fret = strata_node_co_flush(file_node(c));
    return ret < 0 ? ret : fret;
}

/* An entry that may be reused, empty (offset 0) and unpinned; NULL with
 * -errno in *@err.  May yield to write a dirty victim back. */
static CacheEntry *get_free_entry(StrataQcow2Cache *c, int *err)
{
    for (;;) {
        CacheEntry *e = NULL;

        if (c->nb_alloc < c->nb_entries) {
            void *t = NULL;
            size_t align = MAX(file_node(c)->limits.buf_align, 512u);
            if (posix_memalign(&t, align, c->entry_size) != 0) {
                *err = -ENOMEM;
                return NULL;
            }
            e = g_new0(CacheEntry, 1);
            e->table = t;
            e->link.data = e;
            g_queue_push_tail_link(&c->lru, &e->link);
            g_hash_table_insert(c->by_table, t, e);
            c->nb_alloc++;
            arm_clean(c);
            return e;
        }
        for (GList *l = c->lru.tail; l; l = l->prev) {
            CacheEntry *x = l->data;
            if (!x->ref) {
                e = x;
                break;
            }
        }
        if (!e) {
            /* Every entry pinned: only a bug in the callers gets here. */
            g_warning("qcow2 metadata cache: every entry is in use");
            *err = -ENOSPC;
            return NULL;
        }
        if (e->dirty) {
            int ret = entry_write(c, e);
            if (ret < 0) {
                *err = ret;
                return NULL;
            }
            continue;   /* it yielded: look again */
        }
        if (e->offset) {
            g_hash_table_remove(c->by_offset, &e->offset);
            e->offset = 0;
        }
        return e;
    }
}

static void touch(StrataQcow2Cache *c, CacheEntry *e)
{
    g_queue_unlink(&c->lru, &e->link);
    g_queue_push_head_link(&c->lru, &e->link);
    e->used = true;
}

/*
 * Reads the slice at @offset into @e, and with it, in the same request,
 * the slices of the same metadata cluster next to it that the cache
 * does not hold, as long as the cache has never-used room for them.  A
 * cold image otherwise pays one read per slice, each with s->lock held
 * so every request waits: the first reads over a 1 GiB image took 32
 * serial reads of 4 KiB where two of 64 KiB do.  Only fresh entries are
 * taken (no eviction, no write-back), so a cache sized below the image
 * behaves as before.
 */
static int load_with_neighbours(StrataQcow2Cache *c, CacheEntry *e,
                                uint64_t offset)
{
    uint64_t cs = c->s->cluster_size;
    uint64_t table = offset & ~(cs - 1);
    uint64_t lo = offset, hi = offset + c->entry_size;
    unsigned room = c->nb_entries - c->nb_alloc;
    CacheEntry *extra[64];
    unsigned n = 0, first = 0;
    StrataIOVec qiov;
    int ret;

    if (c->entry_size >= cs) {
        return strata_node_co_pread(file_node(c), offset, c->entry_size,
                                    e->table, 0);
    }
    /* Widen over uncached slices: below first, then above. */
    while (lo > table && n < room && n < G_N_ELEMENTS(extra) &&
           !g_hash_table_contains(c->by_offset,
                                  &(uint64_t){ lo - c->entry_size })) {
        lo -= c->entry_size;
        n++;
    }
    first = n;
    while (hi < table + cs && n < room && n < G_N_ELEMENTS(extra) &&
           !g_hash_table_contains(c->by_offset, &hi)) {
        hi += c->entry_size;
        n++;
    }
    if (n == 0) {
        return strata_node_co_pread(file_node(c), offset, c->entry_size,
                                    e->table, 0);
    }
    for (unsigned i = 0; i < n; i++) {
        /* Fresh entries: room says nb_alloc < nb_entries, so this
         * neither yields nor fails but for memory. */
        extra[i] = get_free_entry(c, &ret);
        if (!extra[i]) {
            while (i-- > 0) {
                extra[i]->ref--;
            }
            return ret;
        }
        extra[i]->ref++;
    }
    strata_iov_init(&qiov, (int)n + 1);
    for (unsigned i = 0; i < first; i++) {
        strata_iov_add(&qiov, extra[i]->table, c->entry_size);
    }
    strata_iov_add(&qiov, e->table, c->entry_size);
    for (unsigned i = first; i < n; i++) {
        strata_iov_add(&qiov, extra[i]->table, c->entry_size);
    }
    ret = strata_node_co_preadv(file_node(c), lo, hi - lo, &qiov, 0, 0);
    strata_iov_cleanup(&qiov);
    for (unsigned i = 0; i < n; i++) {
        CacheEntry *x = extra[i];
        uint64_t off = i < first ? lo + (uint64_t)i * c->entry_size
                                 : offset + (uint64_t)(i - first + 1) *
                                   c->entry_size;

        x->ref--;
        /* Installed unless the read failed or someone loaded that slice
         * meanwhile; otherwise the entry stays empty for later use. */
        if (ret < 0 || g_hash_table_contains(c->by_offset, &off)) {
            continue;
        }
        x->offset = off;
        g_hash_table_insert(c->by_offset, &x->offset, x);
        /* Out of the empty entries' tail, not marked used. */
        g_queue_unlink(&c->lru, &x->link);
        g_queue_push_head_link(&c->lru, &x->link);
        c->stats.read_around++;
    }
    if (ret < 0) {
        /* A bad sector beside the slice must not cost the slice. */
        ret = strata_node_co_pread(file_node(c), offset, c->entry_size,
                                   e->table, 0);
    }
    return ret;
}

static int cache_get(StrataQcow2Cache *c, uint64_t offset, void **table,
                     bool read)
{
    CacheEntry *e;
    int ret = 0;

    g_return_val_if_fail(offset != 0, -EINVAL);

    e = g_hash_table_lookup(c->by_offset, &offset);
    if (e) {
        c->stats.hits++;
        goto found;
    }
    c->stats.misses++;
    e = get_free_entry(c, &ret);
    if (!e) {
        return ret;
    }
    /* Someone may have loaded it while a dirty victim was written. */
    {
        CacheEntry *other = g_hash_table_lookup(c->by_offset, &offset);
        if (other) {
            e = other;
            goto found;
        }
    }
    /* Pin while reading: the read yields and others may look for it. */
    if (read) {
        e->ref++;
        ret = load_with_neighbours(c, e, offset);
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
    g_hash_table_insert(c->by_offset, &e->offset, e);

found:
    e->ref++;
    touch(c, e);
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

const void *strata_qcow2_cache_peek(StrataQcow2Cache *c, uint64_t offset)
{
    CacheEntry *e = g_hash_table_lookup(c->by_offset, &offset);
    return e ? e->table : NULL;
}

static CacheEntry *entry_of(StrataQcow2Cache *c, void *table)
{
    return g_hash_table_lookup(c->by_table, table);
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
    set_dirty(c, e, true);
    if (c == c->s->l2_cache) {
        /* What this image maps changed: chains above it must look
         * again. */
        strata_qcow2_layermap_slice_changed(c->s, e->offset, table);
    }
}

void strata_qcow2_cache_discard_cluster(StrataQcow2Cache *c,
                                        uint64_t offset,
                                        uint64_t cluster_size)
{
    GList *next;

    for (GList *l = c->lru.head; l; l = next) {
        CacheEntry *e = l->data;
        next = l->next;
        if (e->offset && e->offset >= offset &&
            e->offset < offset + cluster_size && !e->ref) {
            g_hash_table_remove(c->by_offset, &e->offset);
            e->offset = 0;
            set_dirty(c, e, false);
            /* Empty entries are reused first. */
            g_queue_unlink(&c->lru, &e->link);
            g_queue_push_tail_link(&c->lru, &e->link);
        }
    }
    if (c == c->s->l2_cache) {
        strata_qcow2_layermap_notify_change(c->s);
    }
}

static void disarm_clean(StrataQcow2Cache *c)
{
    if (c->clean_source) {
        g_source_destroy(c->clean_source);
        g_source_unref(c->clean_source);
        c->clean_source = NULL;
    }
}

/* The clean interval: entries nobody looked up since the last tick
 * give their memory back (dirty or pinned ones stay). */
static gboolean clean_tick(gpointer opaque)
{
    StrataQcow2Cache *c = opaque;
    GList *l = c->lru.head;

    while (l) {
        CacheEntry *e = l->data;
        l = l->next;
        if (!e->used && !e->ref && !e->dirty) {
            if (e->offset) {
                g_hash_table_remove(c->by_offset, &e->offset);
            }
            entry_free(c, e);
        } else {
            e->used = false;
        }
    }
    if (!c->nb_alloc) {
        /* Nothing left to give back: no timer until there is.  Every
         * source costs the loop a little on each iteration, and most
         * layers of a deep chain hold nothing. */
        disarm_clean(c);
        return G_SOURCE_REMOVE;
    }
    return G_SOURCE_CONTINUE;
}

static void arm_clean(StrataQcow2Cache *c)
{
    if (c->clean_interval && !c->clean_source) {
        c->clean_source = g_timeout_source_new_seconds(c->clean_interval);
        g_source_set_callback(c->clean_source, clean_tick, c, NULL);
        g_source_attach(c->clean_source, c->clean_context);
    }
}

void strata_qcow2_cache_set_clean_interval(StrataQcow2Cache *c,
                                           GMainContext *context,
                                           unsigned seconds)
{
    disarm_clean(c);
    c->clean_context = context;
    c->clean_interval = seconds;
    if (c->nb_alloc) {
        arm_clean(c);
    }
}

void strata_qcow2_cache_drop_clean(StrataQcow2Cache *c)
{
    for (GList *l = c->lru.head; l; l = l->next) {
        ((CacheEntry *)l->data)->used = false;
    }
    clean_tick(c);
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
