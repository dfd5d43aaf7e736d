/* strata — the filters QEMU puts above the nodes a job works on, so that
 * they show in the graph while it runs: "copy-on-read" above the top of
 * a block-stream, "commit_top" above the top of an intermediate commit,
 * "mirror_top" above the source of a mirror or an active commit.
 *
 * commit_top and mirror_top pass every request through to their file
 * child (the I/O path forwards what a filter leaves NULL); the mirror
 * follows guest writes with a write notifier on its source, which also
 * sees writes that do not come through the filter.  copy-on-read, as
 * QEMU's,
 * writes what a guest reads from the backing chain into the node below
 * it, so that the data is there the next time (and a stream finds it
 * done); with "bottom", only what the layers down to that node hold is
 * copied, not what lies below it (a stream's base).  It can be added with
 * blockdev-add too.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "drivers-private.h"
#include "job-private.h"

/* A guest read that needs copying is done in pieces of at most this
 * much (rounded to the top's clusters): the bounce buffer's size. */
#define COR_MAX_PIECE (1024 * 1024)

static const StrataOptDesc job_filter_options[] = {
    { "file", STRATA_OPT_CHILD, true, NULL },
    { NULL, 0, false, NULL },
};

static bool job_filter_open(StrataNode *node, JsonObject *options,
                            GError **error)
{
    node->limits = node->file->node->limits;
    return true;
}

/* QEMU answers a filter's image info from the node it filters: the
 * cluster size and the allocated size are the filtered image's. */
static void job_filter_query_image(StrataNode *node, JsonObject *image)
{
    static const char *const from_child[] = {
        "cluster-size", "actual-size",
    };
    StrataNode *child = node->file->node;
    g_autoptr(JsonObject) ci = json_object_new();

    if (child->drv->query_image) {
        child->drv->query_image(child, ci);
    }
    /* Both from the one query of the child (its actual-size is its
     * file's, already asked for). */
    for (guint i = 0; i < G_N_ELEMENTS(from_child); i++) {
        if (json_object_has_member(ci, from_child[i])) {
            json_object_set_int_member(image, from_child[i],
                json_object_get_int_member(ci, from_child[i]));
        }
    }
    json_object_set_boolean_member(image, "dirty-flag", false);
}

/* ------------------------------------------------------------------ */
/* The copy shared by the filter and the stream job                    */
/* ------------------------------------------------------------------ */

/* Reads of one copy in flight at once, at most. */
#define COR_MAX_PARTS 16

/* The parts of a read of the backing chain, each from the layer that
 * holds it, all in flight together. */
typedef struct CorReadGroup {
    unsigned pending;
    int ret;
    StrataCoQueue wait;
} CorReadGroup;

typedef struct CorReadPart {
    CorReadGroup *g;
    StrataNode *layer;
    uint64_t offset, bytes;
    char *buf;
} CorReadPart;

static void cor_read_part_co(void *opaque)
{
    CorReadPart *p = opaque;
    CorReadGroup *g = p->g;
    int ret = strata_node_co_pread(p->layer, p->offset, p->bytes, p->buf, 0);

    if (ret < 0 && g->ret == 0) {
        g->ret = ret;
    }
    g_free(p);
    g->pending--;
    strata_co_queue_next(&g->wait);
}

static void cor_read_part_start(CorReadGroup *g, CorReadPart *p)
{
    while (g->pending >= COR_MAX_PARTS) {
        strata_co_queue_wait(&g->wait, NULL);
    }
    g->pending++;
    strata_coroutine_enter(strata_coroutine_new(cor_read_part_co, p));
}

/* The layer, from @n down, that decides [@offset, @offset + *@bytes),
 * and for how long (*@bytes shortened); *@layer NULL: the range reads as
 * zeroes.  *@map: where the data lies in the layer's file, when
 * *@has_map.  The chain walk counts filters as layers of their own, so
 * a debug node above an image still sees the read. */
static int cor_co_find_layer(StrataNode *n, uint64_t offset, uint64_t *bytes,
                             StrataNode **layer, uint64_t *map,
                             bool *has_map)
{
    uint64_t want = *bytes;
    StrataNode *file = NULL;
    int depth = 0;
    int ret = strata_node_co_block_status_above(n, NULL, false, offset, want,
                                                bytes, map, &file, &depth);

    *layer = NULL;
    *has_map = false;
    if (ret < 0) {
        return ret;
    }
    if (*bytes == 0) {
        /* Past @n's end: zeroes, as the layer above reads. */
        *bytes = want;
        return 0;
    }
    if ((ret & STRATA_BLOCK_ALLOCATED) && (ret & STRATA_BLOCK_DATA)) {
        /* Every layer the walk passed has a backing or a filtered
         * child to go on to. */
        for (; depth > 0; depth--) {
            n = n->backing ? n->backing->node : n->file->node;
        }
        *layer = n;
        *has_map = (ret & STRATA_BLOCK_OFFSET_VALID) && file;
    }
    return 0;
}

/* Reads what @backing (a top's backing node) shows of the range: each
 * extent from the layer holding it, all at once, where a plain read
 * through @backing would read them one after the other (a stream's
 * ranges mix a base's large extents with the overlays' clusters).
 * Neighbouring extents of one layer that lie side by side in its file
 * are read as one. */
static int cor_co_read_layers(StrataNode *backing, uint64_t offset,
                              uint64_t bytes, char *buf)
{
    CorReadGroup g = { 0, 0, { NULL, NULL } };
    CorReadPart *cur = NULL;
    uint64_t cur_map = 0, pos = offset, end = offset + bytes;
    bool cur_has_map = false;
    int ret = 0;

    strata_co_queue_init(&g.wait);
    while (pos < end && g.ret == 0) {
        uint64_t n = end - pos, map = 0;
        StrataNode *layer;
        bool has_map;

        ret = cor_co_find_layer(backing, pos, &n, &layer, &map, &has_map);
        if (ret < 0) {
            break;
        }
        if (!layer) {
            memset(buf + (pos - offset), 0, n);
        } else if (cur && cur->layer == layer && cur_has_map && has_map &&
                   cur->offset + cur->bytes == pos &&
                   cur_map + cur->bytes == map) {
            cur->bytes += n;
        } else {
            if (cur) {
                cor_read_part_start(&g, cur);
            }
            cur = g_new(CorReadPart, 1);
            *cur = (CorReadPart){ &g, layer, pos, n, buf + (pos - offset) };
            cur_map = map;
            cur_has_map = has_map;
        }
        pos += n;
    }
    if (cur) {
        if (ret == 0 && g.ret == 0) {
            cor_read_part_start(&g, cur);
        } else {
            g_free(cur);
        }
    }
    while (g.pending > 0) {
        strata_co_queue_wait(&g.wait, NULL);
    }
    return ret < 0 ? ret : g.ret;
}

int strata_cor_co_read_backing(StrataNode *top, uint64_t offset,
                               uint64_t bytes, void *buf)
{
    StrataNode *backing = strata_node_backing(top);
    int64_t blen;
    uint64_t n;

    if (!backing) {
        memset(buf, 0, bytes);
        return 0;
    }
    blen = backing->total_bytes;
    if (blen < 0) {
        blen = strata_node_co_refresh_length(backing);
        if (blen < 0) {
            return (int)blen;
        }
    }
    n = (uint64_t)blen > offset ? MIN(bytes, (uint64_t)blen - offset) : 0;
    if (n < bytes) {
        memset((char *)buf + n, 0, bytes - n);
    }
    return n ? cor_co_read_layers(backing, offset, n, buf) : 0;
}

int strata_cor_co_copy(StrataNode *top, StrataNode *base, uint64_t offset,
                       uint64_t bytes, void *buf, bool fill, bool *is_read)
{
    StrataTrackedReq req;
    uint64_t pos = offset, end = offset + bytes;
    int ret = 0;

    *is_read = true;
    strata_node_inc_in_flight(top);
    strata_tracked_request_init(&req, top, offset, bytes, true, true);
    strata_co_wait_serialising(&req);
    /* Inside the serialised section, a guest write that came first is
     * visible as allocated data of the top, and one that comes later
     * waits until the copy is written. */
    while (pos < end) {
        char *p = (char *)buf + (pos - offset);
        uint64_t pnum = 0;
        int depth = 0;
        bool copy;

        if (base) {
            ret = strata_node_co_block_status_above(top, base, false, pos,
                                                    end - pos, &pnum, NULL,
                                                    NULL, &depth);
            copy = (ret & STRATA_BLOCK_ALLOCATED) && depth > 0;
        } else {
            ret = strata_node_co_block_status(top, false, pos, end - pos,
                                              &pnum, NULL, NULL);
            copy = !(ret & STRATA_BLOCK_ALLOCATED);
        }
        if (ret < 0) {
            break;
        }
        if (pnum == 0) {
            /* The top ends here: what lies past it reads as zeroes. */
            if (fill) {
                memset(p, 0, end - pos);
            }
            ret = 0;
            break;
        }
        if (copy) {
            ret = strata_cor_co_read_backing(top, pos, pnum, p);
            if (ret < 0) {
                break;
            }
            ret = strata_node_co_pwrite(top, pos, pnum, p, 0);
            if (ret < 0) {
                *is_read = false;
                break;
            }
        } else if (fill) {
            ret = strata_node_co_pread(top, pos, pnum, p, 0);
            if (ret < 0) {
                break;
            }
        }
        ret = 0;
        pos += pnum;
    }
    strata_tracked_request_end(&req);
    strata_node_dec_in_flight(top);
    return ret;
}

/* ------------------------------------------------------------------ */
/* copy-on-read                                                        */
/* ------------------------------------------------------------------ */

typedef struct CorState {
    /* The lowest layer whose data is copied (a reference); NULL: the
     * whole backing chain. */
    StrataNode *bottom;
} CorState;

static const StrataOptDesc cor_options[] = {
    { "file", STRATA_OPT_CHILD, true, NULL },
    { "bottom", STRATA_OPT_STRING, false, NULL },
    { NULL, 0, false, NULL },
};

static bool cor_check_bottom(StrataNode *node, StrataNode *bottom,
                             const char *name, GError **error)
{
    if (bottom->drv->is_filter) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Bottom node '%s' is a filter", name);
        return false;
    }
    if (!strata_node_chain_contains(strata_node_skip_filters(node->file->node),
                                    bottom, true)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Bottom node '%s' is not in the backing chain of '%s'",
                    name, node->file->node->node_name);
        return false;
    }
    return true;
}

static bool cor_open(StrataNode *node, JsonObject *options, GError **error)
{
    CorState *s = node->opaque;
    const char *bottom = strata_opts_get_string(options, "bottom", NULL);

    node->limits = node->file->node->limits;
    if (bottom) {
        StrataNode *b = strata_context_lookup(node->ctx, bottom);

        if (!b) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Bottom node '%s' not found", bottom);
            return false;
        }
        if (!cor_check_bottom(node, b, bottom, error)) {
            return false;
        }
        strata_node_ref(b);
        s->bottom = b;
    }
    return true;
}

static void cor_close(StrataNode *node)
{
    CorState *s = node->opaque;

    g_clear_pointer(&s->bottom, strata_node_unref);
}

void strata_cor_filter_set_bottom(StrataNode *filter, StrataNode *bottom)
{
    CorState *s;

    g_return_if_fail(filter && filter->drv == &strata_driver_copy_on_read);
    s = filter->opaque;
    if (bottom) {
        strata_node_ref(bottom);
    }
    g_clear_pointer(&s->bottom, strata_node_unref);
    s->bottom = bottom;
}

/* The copy writes into the node below: the filter needs that besides
 * what its parents need, unless it is read-only. */
static void cor_child_perm(StrataNode *node, StrataChild *child,
                           StrataChildRole role, uint64_t parent_perm,
                           uint64_t parent_shared, uint64_t *nperm,
                           uint64_t *nshared)
{
    strata_default_child_perm(node, child, role, parent_perm, parent_shared,
                              nperm, nshared);
    if (!node->read_only) {
        *nperm |= STRATA_PERM_WRITE_UNCHANGED;
    }
}

/* Where reads copy to, and down to which node (*@base, exclusive; NULL:
 * the whole chain); NULL when the filter cannot copy now: read-only, no
 * backing chain, or "bottom" no longer below the top (the stream that
 * inserted the filter has dropped it from the chain). */
static StrataNode *cor_target(StrataNode *node, StrataNode **base)
{
    CorState *s = node->opaque;
    StrataNode *top = strata_node_skip_filters(node->file->node);

    *base = NULL;
    if (node->read_only || !top || top->read_only ||
        !strata_node_backing(top)) {
        return NULL;
    }
    if (s->bottom) {
        if (s->bottom == top ||
            !strata_node_chain_contains(top, s->bottom, false)) {
            return NULL;
        }
        *base = strata_node_backing(s->bottom);
    }
    return top;
}

/* 1 when some part of the range lies in a layer between @top and @base,
 * 0 when none does, or -errno. */
static int cor_co_needs_copy(StrataNode *top, StrataNode *base,
                             uint64_t offset, uint64_t bytes)
{
    uint64_t pos = offset, end = offset + bytes;

    while (pos < end) {
        uint64_t pnum = 0;
        int depth = 0;
        int ret = strata_node_co_block_status_above(top, base, false, pos,
                                                    end - pos, &pnum, NULL,
                                                    NULL, &depth);
        if (ret < 0) {
            return ret;
        }
        if ((ret & STRATA_BLOCK_ALLOCATED) && depth > 0) {
            return 1;
        }
        if (pnum == 0) {
            break;
        }
        pos += pnum;
    }
    return 0;
}

static inline uint64_t cor_align_down(uint64_t v, uint64_t a)
{
    return v / a * a;
}

static int cor_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                         StrataIOVec *qiov, size_t qiov_offset,
                         StrataReqFlags flags)
{
    StrataNode *base = NULL;
    StrataNode *top = cor_target(node, &base);
    uint64_t cluster, piece, pos, end, len;
    void *buf = NULL;
    int ret;

    if (top) {
        ret = cor_co_needs_copy(top, base, offset, bytes);
        if (ret < 0) {
            return ret;
        }
        if (ret == 0) {
            top = NULL;
        }
    }
    if (top && top->total_bytes >= 0 &&
        cor_align_down(offset, MAX(top->limits.request_alignment, 1u)) >=
            (uint64_t)top->total_bytes) {
        top = NULL;
    }
    if (!top || top->total_bytes < 0) {
        return strata_node_co_preadv(node->file->node, offset, bytes, qiov,
                                     qiov_offset, flags);
    }

    /* Whole clusters are copied, so the top gets no partial cluster to
     * fill from its backing file itself; what the guest did not ask for
     * is read once more but never handed out. */
    cluster = MAX(top->limits.pdiscard_alignment,
                  (uint64_t)top->limits.request_alignment);
    cluster = MAX(cluster, (uint64_t)1);
    piece = MAX(cor_align_down(COR_MAX_PIECE, cluster), cluster);
    len = (uint64_t)top->total_bytes;
    pos = cor_align_down(offset, cluster);
    end = MIN(cor_align_down(offset + bytes + cluster - 1, cluster), len);
    if (posix_memalign(&buf, 4096, MIN(piece, end - pos)) != 0) {
        return -ENOMEM;
    }
    ret = 0;
    while (pos < end && ret == 0) {
        uint64_t n = MIN(piece, end - pos);
        uint64_t from = MAX(pos, offset);
        uint64_t to = MIN(pos + n, offset + bytes);
        bool is_read;

        ret = strata_cor_co_copy(top, base, pos, n, buf, true, &is_read);
        if (ret == 0 && from < to) {
            strata_iov_from_buf(qiov, qiov_offset + (from - offset),
                                (char *)buf + (from - pos), to - from);
        }
        pos += n;
    }
    free(buf);
    if (ret == 0 && offset + bytes > end) {
        /* Past the top's end (the top shrank under the filter). */
        uint64_t from = MAX(end, offset);
        strata_iov_memset(qiov, qiov_offset + (from - offset), 0,
                          offset + bytes - from);
    }
    return ret;
}

const StrataDriver strata_driver_copy_on_read = {
    .name = "copy-on-read",
    .state_size = sizeof(CorState),
    .is_filter = true,
    .options = cor_options,
    .open = cor_open,
    .close = cor_close,
    .co_preadv = cor_co_preadv,
    .child_perm = cor_child_perm,
    .query_image = job_filter_query_image,
};

const StrataDriver strata_driver_commit_top = {
    .name = "commit_top",
    .is_filter = true,
    .filter_edge_name = "backing",
    .options = job_filter_options,
    .open = job_filter_open,
    .query_image = job_filter_query_image,
};

const StrataDriver strata_driver_mirror_top = {
    .name = "mirror_top",
    .is_filter = true,
    .filter_edge_name = "backing",
    .options = job_filter_options,
    .open = job_filter_open,
    .query_image = job_filter_query_image,
};
