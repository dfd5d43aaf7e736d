/* strata — qcow2 layer map: for each cluster an image leaves
 * unallocated, which layer of its backing chain answers a read of it.
 *
 * Without it a read of a cluster that only the base holds looks the
 * cluster up in every layer on the way down, so its cost grows with the
 * chain's depth.  With it, the image that holds nothing asks its map and
 * reads the holding layer (or zeroes) directly: one lookup whatever the
 * depth.
 *
 * The map is a cache of facts about the layers below, so it holds for
 * one value of its node's chain_gen only, which moves (graph.c, io.c)
 * whenever an edge at or below the node changes, a node below changes
 * length, or a layer below reports that what it maps changed: a guest
 * write into an intermediate layer, commit writing into the base, a
 * snapshot reverted (strata_qcow2_layermap_notify_change()).
 * A build that yields (it reads L2 tables) and sees either happen
 * meanwhile throws its result away; the read then takes the slow path.
 *
 * A change to one L2 slice of a layer below (every allocating write of
 * a commit into its base) does not cost the maps above it everything:
 * strata_qcow2_layermap_slice_changed() corrects the answers of the
 * clusters that slice maps, in place, in every map that holds them.
 *
 * Region r of a map covers the clusters one L2 table covers (L1 index
 * r), with one 16-bit answer per cluster.  A region is built by walking
 * the chain's L2 tables for it, or, when the backing image has the same
 * region in its own map, from the backing's L2 table and that region:
 * the open of each layer of a chain does the latter for every region of
 * a small image, so the top of a freshly opened chain has a complete map
 * and no intermediate layer keeps one.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-private.h"

/* Answers, per cluster.  1..MAX_LAYERS name layers[answer - 1]. */
#define MAP_NONE 0          /* while building: not resolved yet */
#define MAP_WALK 0xfffe     /* read through the backing as the chain does */
#define MAP_ZERO 0xffff     /* reads as zeroes */
#define MAX_LAYERS 0xfff0

/* Memory for regions a map keeps; older regions are dropped first. */
#define MAP_BUDGET (4u << 20)
/* Open builds the whole map when it has at most this many regions and
 * the L2 tables it reads stay within EAGER_MAX_READS. */
#define EAGER_MAX_REGIONS 64
#define EAGER_MAX_READS 4096

struct StrataQcow2LayerMap {
    StrataQcow2State *s;
    uint64_t chain_gen;         /* s->node->chain_gen it is for */
    GPtrArray *layers;          /* StrataNode *: [0] is s's backing */
    bool last_opaque;           /* the last layer is read as a whole */
    uint64_t nb_regions;
    uint16_t **regions;         /* NULL: not built */
    GQueue built;               /* region index + 1, oldest first */
    unsigned max_built;
    StrataCoMutex build_lock;
    uint64_t building;          /* region index + 1 being built; 0: none */
    uint64_t edits;             /* moves when that region is edited */
    StrataQcow2LayerMapStats stats;
};

static StrataNode *backing_node(StrataQcow2State *s)
{
    return s->node->backing ? s->node->backing->node : NULL;
}

/* A layer whose L2 tables the map reads: qcow2 with the owner's
 * geometry and plain L2 entries. */
static bool mappable(StrataQcow2State *owner, StrataNode *n)
{
    StrataQcow2State *x;

    if (n->drv != &strata_driver_qcow2 || !n->opaque) {
        return false;
    }
    x = n->opaque;
    return x->l1_table && x->cluster_bits == owner->cluster_bits &&
           !(x->hdr.incompatible_features & STRATA_QCOW2_INCOMPAT_EXTL2);
}

/* A map pays off from two layers below on: with one, the backing's own
 * lookup is all the chain costs. */
static bool eligible(StrataQcow2State *s)
{
    StrataNode *b = backing_node(s);

    return b && mappable(s, b) &&
           backing_node((StrataQcow2State *)b->opaque) != NULL;
}

static void drop_regions(StrataQcow2LayerMap *m)
{
    for (uint64_t r = 0; r < m->nb_regions; r++) {
        g_clear_pointer(&m->regions[r], g_free);
    }
    g_queue_clear(&m->built);
}

/* Forgets everything and records the chain as the graph has it now. */
static void map_reset(StrataQcow2LayerMap *m)
{
    StrataQcow2State *s = m->s;
    StrataNode *n = backing_node(s);
    uint64_t per_region = s->cluster_size << s->l2_bits;

    drop_regions(m);
    g_free(m->regions);
    g_ptr_array_set_size(m->layers, 0);
    m->last_opaque = false;
    while (n && m->layers->len < MAX_LAYERS) {
        g_ptr_array_add(m->layers, n);
        if (!mappable(s, n)) {
            m->last_opaque = true;
            break;
        }
        n = backing_node(n->opaque);
    }
    if (n && m->layers->len == MAX_LAYERS) {
        /* Deeper than the answers can name: the last one read whole. */
        m->last_opaque = true;
    }
    m->nb_regions = (s->hdr.size + per_region - 1) / per_region;
    m->regions = g_new0(uint16_t *, MAX(m->nb_regions, 1));
    m->max_built = MAX(MAP_BUDGET / (s->l2_size * sizeof(uint16_t)), 1);
    m->chain_gen = s->node->chain_gen;
    m->stats.resets++;
}

void strata_qcow2_layermap_free(StrataQcow2State *s)
{
    StrataQcow2LayerMap *m = s->layer_map;

    if (!m) {
        return;
    }
    drop_regions(m);
    g_free(m->regions);
    g_ptr_array_unref(m->layers);
    g_free(m);
    s->layer_map = NULL;
}

/* The map of @s, current with its chain; NULL when @s does not use
 * one. */
static StrataQcow2LayerMap *map_get(StrataQcow2State *s)
{
    StrataQcow2LayerMap *m = s->layer_map;

    if (!eligible(s)) {
        strata_qcow2_layermap_free(s);
        return NULL;
    }
    if (!m) {
        m = g_new0(StrataQcow2LayerMap, 1);
        m->s = s;
        m->layers = g_ptr_array_new();
        g_queue_init(&m->built);
        strata_co_mutex_init(&m->build_lock);
        s->layer_map = m;
        map_reset(m);
    } else if (m->chain_gen != s->node->chain_gen) {
        map_reset(m);
    }
    return m;
}

void strata_qcow2_layermap_notify_change(StrataQcow2State *s)
{
    if (!s->node) {
        return;
    }
    for (GList *l = s->node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE) {
            strata_node_chain_changed(c->parent);
        }
    }
}

void strata_qcow2_layermap_get_stats(StrataQcow2State *s,
                                     StrataQcow2LayerMapStats *stats)
{
    StrataQcow2LayerMap *m = s->layer_map;

    memset(stats, 0, sizeof(*stats));
    if (m) {
        *stats = m->stats;
        stats->layers = m->layers->len;
        stats->regions_built = g_queue_get_length(&m->built);
    }
}

/* ------------------------------------------------------------------ */
/* Building                                                            */
/* ------------------------------------------------------------------ */

/*
 * The L2 entries (host order) layer @x has for region @r: zeroes where
 * it has no table.  Read whole from the file, then overlaid with the
 * slices @x's cache holds (they may be newer than the file); under
 * x->lock so nobody changes them meanwhile.
 */
static int read_l2_table(StrataQcow2State *x, uint64_t r, uint64_t *out)
{
    StrataNode *file = x->node->file->node;
    uint64_t cs = x->cluster_size;
    uint64_t l2;
    int ret = 0;

    strata_co_mutex_lock(&x->lock);
    l2 = r < x->l1_size ? x->l1_table[r] & STRATA_QCOW2_OFFSET_MASK : 0;
    if (!l2) {
        memset(out, 0, cs);
        goto out;
    }
    if ((l2 & (cs - 1)) ||
        (file->total_bytes >= 0 && l2 + cs > (uint64_t)file->total_bytes)) {
        /* The lookup path reports the corruption; the map just does not
         * vouch for this region. */
        ret = -EIO;
        goto out;
    }
    ret = strata_node_co_pread(file, l2, cs, out, 0);
    if (ret < 0) {
        goto out;
    }
    for (uint64_t off = 0; off < cs; off += x->l2_slice_size) {
        const void *t = strata_qcow2_cache_peek(x->l2_cache, l2 + off);
        if (t) {
            memcpy((uint8_t *)out + off, t, x->l2_slice_size);
        }
    }
    for (uint64_t i = 0; i < x->l2_size; i++) {
        out[i] = GUINT64_FROM_BE(out[i]);
    }
out:
    strata_co_mutex_unlock(&x->lock);
    return ret;
}

/* Clusters of @v still open that a read passing from @x into its
 * backing @b cannot reach: past @x's VM state start or @b's end. */
static void apply_limit(StrataQcow2State *x, StrataNode *b, uint64_t base,
                        uint16_t *v, uint64_t n, uint64_t cs)
{
    uint64_t limit = strata_qcow2_vm_state_offset(x);

    limit = MIN(limit, b->total_bytes > 0 ? (uint64_t)b->total_bytes : 0);
    if (limit >= base + n * cs) {
        return;
    }
    for (uint64_t k = 0; k < n; k++) {
        uint64_t off = base + k * cs;
        if (v[k] != MAP_NONE) {
            continue;
        }
        if (off >= limit) {
            v[k] = MAP_ZERO;
        } else if (off + cs > limit) {
            v[k] = MAP_WALK;    /* part data, part zeroes */
        }
    }
}

/* The answer layer @idx's L2 entry @e (host order) gives: MAP_NONE
 * when it leaves the cluster to the layers below. */
static uint16_t entry_answer(uint64_t e, uint16_t idx)
{
    if (!e) {
        return MAP_NONE;
    }
    switch (strata_qcow2_l2_entry_type(e)) {
    case STRATA_QCOW2_CLUSTER_UNALLOCATED:
        return MAP_NONE;
    case STRATA_QCOW2_CLUSTER_ZERO_PLAIN:
    case STRATA_QCOW2_CLUSTER_ZERO_ALLOC:
        return MAP_ZERO;
    default:
        return idx;
    }
}

/* Resolves the open clusters of @v that layer @idx's entries hold. */
static void take_entries(uint16_t *v, const uint64_t *l2, uint64_t n,
                         uint16_t idx)
{
    for (uint64_t k = 0; k < n; k++) {
        if (v[k] == MAP_NONE) {
            v[k] = entry_answer(l2[k], idx);
        }
    }
}

static void fill_open(uint16_t *v, uint64_t n, uint16_t val)
{
    for (uint64_t k = 0; k < n; k++) {
        if (v[k] == MAP_NONE) {
            v[k] = val;
        }
    }
}

/* Region @r from the backing's own map when it has it: one layer read
 * instead of the chain.  1 when done, 0 when the backing cannot help. */
static int build_composed(StrataQcow2LayerMap *m, uint64_t r, uint16_t *v,
                          uint64_t *l2)
{
    StrataQcow2State *s = m->s;
    StrataNode *b = g_ptr_array_index(m->layers, 0);
    StrataQcow2State *bs = b->opaque;
    StrataQcow2LayerMap *bm = bs->layer_map;
    uint64_t n = s->l2_size, cs = s->cluster_size;
    uint64_t base = (r << s->l2_bits) << s->cluster_bits;
    const uint16_t *bv;
    int ret;

    if (!bm || bm->chain_gen != bs->node->chain_gen ||
        r >= bm->nb_regions || !bm->regions[r] ||
        bm->layers->len + 1 != m->layers->len) {
        return 0;
    }
    ret = read_l2_table(bs, r, l2);
    if (ret < 0) {
        return ret;
    }
    /* The read yielded: the backing's region may be gone. */
    if (bm != bs->layer_map || bm->chain_gen != bs->node->chain_gen ||
        r >= bm->nb_regions || !(bv = bm->regions[r])) {
        return 0;
    }
    memset(v, 0, n * sizeof(*v));
    apply_limit(s, b, base, v, n, cs);
    take_entries(v, l2, n, 1);
    for (uint64_t k = 0; k < n; k++) {
        if (v[k] == MAP_NONE) {
            v[k] = (bv[k] == MAP_ZERO || bv[k] == MAP_WALK) ? bv[k]
                                                           : bv[k] + 1;
        }
    }
    m->stats.composed++;
    return 1;
}

/* Region @r by walking every layer's L2 table for it. */
static int build_walk(StrataQcow2LayerMap *m, uint64_t r, uint16_t *v,
                      uint64_t *l2)
{
    StrataQcow2State *s = m->s;
    StrataQcow2State *x = s;
    uint64_t n = s->l2_size, cs = s->cluster_size;
    uint64_t base = (r << s->l2_bits) << s->cluster_bits;
    uint64_t open = n;

    memset(v, 0, n * sizeof(*v));
    for (guint i = 0; i < m->layers->len && open; i++) {
        StrataNode *b = g_ptr_array_index(m->layers, i);
        bool last = i + 1 == m->layers->len;
        int ret;

        apply_limit(x, b, base, v, n, cs);
        if (last && m->last_opaque) {
            fill_open(v, n, (uint16_t)(i + 1));
            break;
        }
        ret = read_l2_table(b->opaque, r, l2);
        if (ret < 0) {
            return ret;
        }
        take_entries(v, l2, n, (uint16_t)(i + 1));
        x = b->opaque;
        open = 0;
        for (uint64_t k = 0; k < n; k++) {
            open += v[k] == MAP_NONE;
        }
    }
    /* Past the last qcow2 layer there is nothing: zeroes. */
    fill_open(v, n, MAP_ZERO);
    m->stats.walked++;
    return 0;
}

/* The answers of region @r, building them if needed; NULL when they
 * cannot be had now (the caller reads the slow way).  Not valid after
 * the next yield. */
static const uint16_t *region_get(StrataQcow2LayerMap *m, uint64_t r)
{
    StrataQcow2State *s = m->s;
    uint64_t gen, edits;
    uint16_t *v;
    uint64_t *l2;
    void *p = NULL;
    int ret;

    if (r >= m->nb_regions) {
        return NULL;
    }
    if (m->regions[r]) {
        return m->regions[r];
    }
    strata_co_mutex_lock(&m->build_lock);
    if (m->chain_gen != s->node->chain_gen || r >= m->nb_regions) {
        strata_co_mutex_unlock(&m->build_lock);
        return NULL;
    }
    if (m->regions[r]) {
        /* Built while we waited for the lock. */
        strata_co_mutex_unlock(&m->build_lock);
        return m->regions[r];
    }
    gen = m->chain_gen;
    if (posix_memalign(&p, 4096, s->cluster_size) != 0) {
        strata_co_mutex_unlock(&m->build_lock);
        return NULL;
    }
    l2 = p;
    v = g_new(uint16_t, s->l2_size);
    m->building = r + 1;
    edits = m->edits;
    ret = build_composed(m, r, v, l2);
    if (ret == 0) {
        ret = build_walk(m, r, v, l2);
    }
    m->building = 0;
    free(l2);
    if (ret < 0 || m->chain_gen != gen ||
        s->node->chain_gen != gen || m->edits != edits) {
        /* Something below changed while the tables were read. */
        g_free(v);
        strata_co_mutex_unlock(&m->build_lock);
        return NULL;
    }
    while (g_queue_get_length(&m->built) >= m->max_built) {
        uint64_t old = GPOINTER_TO_SIZE(g_queue_pop_head(&m->built)) - 1;
        g_clear_pointer(&m->regions[old], g_free);
    }
    m->regions[r] = v;
    g_queue_push_tail(&m->built, GSIZE_TO_POINTER(r + 1));
    strata_co_mutex_unlock(&m->build_lock);
    return v;
}

void strata_qcow2_layermap_co_prepare(StrataQcow2State *s)
{
    StrataQcow2LayerMap *m = map_get(s);
    StrataQcow2State *bs;
    StrataQcow2LayerMap *bm;
    bool composable;

    if (!m || m->nb_regions > EAGER_MAX_REGIONS) {
        return;
    }
    bs = ((StrataNode *)g_ptr_array_index(m->layers, 0))->opaque;
    bm = bs->layer_map;
    composable = bm && bm->chain_gen == bs->node->chain_gen &&
                 g_queue_get_length(&bm->built) == bm->nb_regions;
    if (!composable &&
        m->nb_regions * m->layers->len > EAGER_MAX_READS) {
        return;
    }
    for (uint64_t r = 0; r < m->nb_regions; r++) {
        if (!region_get(m, r)) {
            return;
        }
    }
    /* The backing's map served its purpose: only the top of a chain
     * keeps one (another reader of the backing rebuilds what it needs). */
    if (composable) {
        strata_qcow2_layermap_free(bs);
    }
}

/* ------------------------------------------------------------------ */
/* Keeping maps current                                                */
/* ------------------------------------------------------------------ */

/*
 * Layer @idx of @m changed what it maps for the @n clusters of region
 * @r from @k0 on; @be holds its entries for them now (big-endian).
 * Answers naming a layer above @idx stay; one naming @idx or a layer
 * below is what @idx says now, or (left to the layers below) the layer
 * it was when that was below; answers of zeroes or of a walk may have
 * come from above @idx as well as from below, so they become a walk
 * (correct whatever the chain holds, just not the quickest).
 */
static void map_edit(StrataQcow2LayerMap *m, uint16_t idx, uint64_t r,
                     uint64_t k0, const uint64_t *be, uint64_t n)
{
    uint16_t *v;

    if (m->building == r + 1) {
        m->edits++;
    }
    if (r >= m->nb_regions || !(v = m->regions[r])) {
        return;
    }
    for (uint64_t k = 0; k < n && k0 + k < m->s->l2_size; k++) {
        uint16_t a = v[k0 + k], now;

        if (a != MAP_ZERO && a != MAP_WALK && a < idx) {
            continue;
        }
        now = entry_answer(GUINT64_FROM_BE(be[k]), idx);
        if (a == MAP_ZERO || a == MAP_WALK) {
            v[k0 + k] = MAP_WALK;
        } else if (now != MAP_NONE) {
            v[k0 + k] = now;
        } else if (a == idx) {
            v[k0 + k] = MAP_WALK;
        }
    }
}

/* Edits the maps of @node and of every node above it that read @layer
 * as a mapped layer. */
static void edit_above(StrataNode *node, StrataNode *layer, uint64_t r,
                       uint64_t k0, const uint64_t *be, uint64_t n,
                       unsigned depth)
{
    if (depth > 4096) {
        return;
    }
    if (node->drv == &strata_driver_qcow2 && node->opaque) {
        StrataQcow2LayerMap *m = ((StrataQcow2State *)node->opaque)
                                     ->layer_map;
        if (m && m->chain_gen == node->chain_gen) {
            for (guint i = 0; i < m->layers->len; i++) {
                bool opaque = m->last_opaque && i + 1 == m->layers->len;
                if (g_ptr_array_index(m->layers, i) == layer && !opaque) {
                    map_edit(m, (uint16_t)(i + 1), r, k0, be, n);
                    break;
                }
            }
        }
    }
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE) {
            edit_above(c->parent, layer, r, k0, be, n, depth + 1);
        }
    }
}

void strata_qcow2_layermap_slice_changed(StrataQcow2State *s,
                                         uint64_t slice_offset,
                                         const void *slice)
{
    uint64_t table = slice_offset & ~(s->cluster_size - 1);
    bool above = false;
    uint64_t r;

    if (!s->node) {
        return;
    }
    /* The active layer (every guest write) has nobody to tell. */
    for (GList *l = s->node->parents; l && !above; l = l->next) {
        above = ((StrataChild *)l->data)->parent_kind == STRATA_PARENT_NODE;
    }
    if (!above) {
        return;
    }
    for (r = 0; r < s->l1_size; r++) {
        if ((s->l1_table[r] & STRATA_QCOW2_OFFSET_MASK) == table) {
            break;
        }
    }
    if (r == s->l1_size || (s->hdr.incompatible_features &
                            STRATA_QCOW2_INCOMPAT_EXTL2)) {
        /* Not (yet) a table of the active L1, or entries the maps do
         * not read: everyone above forgets. */
        strata_qcow2_layermap_notify_change(s);
        return;
    }
    for (GList *l = s->node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE) {
            edit_above(c->parent, s->node, r, (slice_offset - table) / 8,
                       slice, s->l2_slice_size / 8, 0);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Reading                                                             */
/* ------------------------------------------------------------------ */

/* What the chain shows below @s, the way the chain itself reads it. */
static int read_through(StrataQcow2State *s, uint64_t offset, uint64_t n,
                        StrataIOVec *qiov, size_t qiov_offset)
{
    StrataNode *b = backing_node(s);
    int64_t blen = b ? b->total_bytes : 0;
    uint64_t avail = 0;

    /* The VM state area belongs to this image alone. */
    if (offset >= strata_qcow2_vm_state_offset(s)) {
        b = NULL;
    }
    if (b && blen > 0 && offset < (uint64_t)blen) {
        avail = MIN(n, (uint64_t)blen - offset);
    }
    if (avail) {
        int ret = strata_node_co_preadv(b, offset, avail, qiov, qiov_offset,
                                        0);
        if (ret < 0) {
            return ret;
        }
    }
    if (avail < n) {
        strata_iov_memset(qiov, qiov_offset + avail, 0, n - avail);
    }
    return 0;
}

int strata_qcow2_co_read_backing(StrataQcow2State *s, uint64_t offset,
                                 uint64_t bytes, StrataIOVec *qiov,
                                 size_t qiov_offset)
{
    uint64_t cs = s->cluster_size;

    while (bytes > 0) {
        StrataQcow2LayerMap *m;
        const uint16_t *v;
        uint64_t c, r, k, n, end;
        uint16_t a;
        int ret;

        m = offset < strata_qcow2_vm_state_offset(s) ? map_get(s) : NULL;
        c = offset >> s->cluster_bits;
        r = c >> s->l2_bits;
        v = m ? region_get(m, r) : NULL;
        /* region_get may yield: the map may have been reset since. */
        if (!v || m->chain_gen != s->node->chain_gen) {
            return read_through(s, offset, bytes, qiov, qiov_offset);
        }
        m->stats.lookups++;
        /* The run of clusters with the same answer, within the region. */
        k = c & (s->l2_size - 1);
        a = v[k];
        end = (offset & ~(cs - 1)) + cs;
        while (end < offset + bytes && k + 1 < s->l2_size &&
               v[k + 1] == a) {
            k++;
            end += cs;
        }
        n = MIN(end, offset + bytes) - offset;
        if (a == MAP_ZERO) {
            strata_iov_memset(qiov, qiov_offset, 0, n);
            ret = 0;
        } else if (a == MAP_WALK || a == MAP_NONE) {
            ret = read_through(s, offset, n, qiov, qiov_offset);
        } else {
            StrataNode *layer = g_ptr_array_index(m->layers, a - 1);
            ret = strata_node_co_preadv(layer, offset, n, qiov, qiov_offset,
                                        0);
        }
        if (ret < 0) {
            return ret;
        }
        offset += n;
        qiov_offset += n;
        bytes -= n;
    }
    return 0;
}
