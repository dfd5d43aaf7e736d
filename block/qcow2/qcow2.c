/* strata — the qcow2 format driver: open/close, the data path (reads
 * through the cluster map and the backing chain, allocating writes with
 * copy-on-write, zero clusters, discard), flush, resize and query. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <glib/gstdio.h>

#include "qcow2-private.h"
#include "qcow2.h"
#include "../driver.h"

/* Deeper chains than this are refused rather than recursed into. */
#define MAX_BACKING_DEPTH 256

/* Bytes read first to learn the cluster size.  The whole cluster of a
 * default image (64 KiB) in one request: on a cold cache a 4 KiB probe
 * followed by the rest of the cluster cost two waits for the disk per
 * layer of a chain. */
#define HEADER_PROBE 65536

static StrataNode *file_of(StrataQcow2State *s)
{
    return s->node->file->node;
}

static StrataNode *backing_of(StrataQcow2State *s)
{
    return s->node->backing ? s->node->backing->node : NULL;
}

/*
 * Reads the header cluster of @file (@flen bytes long): the header and
 * its extensions live in the first cluster.  The fixed part comes first
 * and says how big a cluster is, so a 64 KiB-cluster image costs 64 KiB
 * rather than the largest cluster size (2 MiB of a daemon's peak memory
 * per image opened).  A cluster size out of range is left to the
 * parser to report.
 */
static int read_header_cluster(StrataNode *file, int64_t flen,
                               uint8_t **out, size_t *out_len)
{
    size_t len = (size_t)MIN((uint64_t)MAX(flen, 0), HEADER_PROBE);
    g_autofree uint8_t *buf = g_malloc0(MAX(len, (size_t)1));
    uint32_t bits;
    int ret;

    ret = len ? strata_node_co_pread(file, 0, len, buf, 0) : 0;
    if (ret < 0) {
        return ret;
    }
    bits = len >= 24 ? strata_qcow2_be32(buf + 20) : 0;
    if (bits >= STRATA_QCOW2_MIN_CLUSTER_BITS &&
        bits <= STRATA_QCOW2_MAX_CLUSTER_BITS &&
        (uint64_t)flen > len && (1u << bits) > len) {
        size_t more = (size_t)MIN((uint64_t)flen, 1ull << bits);

        buf = g_realloc(buf, more);
        ret = strata_node_co_pread(file, len, more - len, buf + len, 0);
        if (ret < 0) {
            return ret;
        }
        len = more;
    }
    *out = g_steal_pointer(&buf);
    *out_len = len;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Open                                                                */
/* ------------------------------------------------------------------ */

typedef struct OpenCo {
    StrataQcow2State *s;
    JsonObject *options;
    GError *error;
    bool ok;
} OpenCo;

static bool read_table(StrataQcow2State *s, uint64_t offset, uint64_t n,
                       uint64_t **out, GError **error)
{
    g_autofree uint64_t *t = g_new0(uint64_t, MAX(n, 1));
    int ret;

    if (n) {
        ret = strata_node_co_pread(file_of(s), offset, n * 8, t, 0);
        if (ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not read qcow2 metadata at %#"
                        G_GINT64_MODIFIER "x: %s", offset, g_strerror(-ret));
            return false;
        }
        for (uint64_t i = 0; i < n; i++) {
            t[i] = GUINT64_FROM_BE(t[i]);
        }
    }
    *out = g_steal_pointer(&t);
    return true;
}

static bool open_co_body(StrataQcow2State *s, JsonObject *options,
                         GError **error)
{
    StrataNode *file = file_of(s);
    StrataQcow2CacheSizes sizes;
    g_autofree uint8_t *buf = NULL;
    uint64_t *rt;
    int64_t flen;
    size_t len;
    int ret;

    flen = strata_node_co_refresh_length(file);
    if (flen < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not get the size of the qcow2 file: %s",
                    g_strerror((int)-flen));
        return false;
    }
    ret = read_header_cluster(file, flen, &buf, &len);
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not read qcow2 header: %s", g_strerror(-ret));
        return false;
    }
    if (!strata_qcow2_header_parse(&s->hdr, buf, len, error) ||
        !strata_qcow2_header_check_features(&s->hdr, s->writable, error)) {
        return false;
    }
    if (s->lazy_refcounts_opt && s->hdr.version < 3) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Lazy refcounts require a qcow2 image with at least "
                    "qemu 1.1 compatibility level");
        return false;
    }
    s->corrupt = !!(s->hdr.incompatible_features &
                    STRATA_QCOW2_INCOMPAT_CORRUPT);

    s->cluster_bits = s->hdr.cluster_bits;
    s->cluster_size = 1ull << s->cluster_bits;
    s->extended_l2 = !!(s->hdr.incompatible_features &
                        STRATA_QCOW2_INCOMPAT_EXTL2);
    s->l2_entry_shift = s->extended_l2 ? 1 : 0;
    s->l2_bits = s->cluster_bits - 3 - s->l2_entry_shift;
    s->l2_size = 1ull << s->l2_bits;
    s->subcluster_bits = s->cluster_bits -
                         (s->extended_l2 ? 5 /* 32 subclusters */ : 0);
    s->subcluster_size = 1ull << s->subcluster_bits;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->cluster_offset_mask = (1ull << s->csize_shift) - 1;
    s->l1_size = s->hdr.l1_size;
    s->l1_table_offset = s->hdr.l1_table_offset;
    {
        uint64_t per_l1 = s->cluster_size << s->l2_bits;
        s->l1_vm_state_index = (uint32_t)((s->hdr.size + per_l1 - 1) /
                                          per_l1);
    }

    if (!strata_qcow2_parse_overlap_check(options, &s->overlap_check,
                                          error) ||
        !strata_qcow2_refcount_init(s, error)) {
        return false;
    }
    for (guint i = 0; i < s->hdr.kept_exts->len; i++) {
        StrataQcow2Ext *e = g_ptr_array_index(s->hdr.kept_exts, i);
        gsize elen;
        const uint8_t *d = g_bytes_get_data(e->data, &elen);
        if (e->type == STRATA_QCOW2_EXT_BITMAPS && elen >= 24) {
            s->bitmap_dir_size = strata_qcow2_be64(d + 8);
            s->bitmap_dir_offset = strata_qcow2_be64(d + 16);
        }
    }
    if (!read_table(s, s->l1_table_offset, s->l1_size, &s->l1_table,
                    error) ||
        !read_table(s, s->refcount_table_offset, s->refcount_table_size,
                    &rt, error)) {
        return false;
    }
    strata_qcow2_refcount_table_set(s, rt, s->refcount_table_size);

    if (strata_qcow2_co_read_snapshots(s, error) < 0) {
        return false;
    }
    /* The sizes cover the L2 tables of the whole disk at 8 bytes an
     * entry: extended entries take twice that, as would a disk twice
     * as large. */
    if (!strata_qcow2_cache_sizes(options, s->hdr.size << s->l2_entry_shift,
                                  s->cluster_bits, &sizes, error)) {
        return false;
    }
    s->l2_slice_size = (uint32_t)sizes.l2_slice_size;
    s->l2_slice_entries = s->l2_slice_size / (8u << s->l2_entry_shift);
    s->l2_cache = strata_qcow2_cache_new(
        s, (unsigned)MIN(sizes.l2_cache_size / s->l2_slice_size,
                         (uint64_t)G_MAXINT), s->l2_slice_size);
    s->refcount_cache = strata_qcow2_cache_new(
        s, (unsigned)MIN(sizes.refcount_cache_size / s->cluster_size,
                         (uint64_t)G_MAXINT), (uint32_t)s->cluster_size);
    {
        /* QEMU's default on Linux: unused slices go back after 10 min. */
        int64_t ci = strata_opts_get_int(options, "cache-clean-interval",
                                         600);
        GMainContext *gctx = strata_loop_get_context(s->node->ctx->loop);

        if (ci < 0 || ci > G_MAXUINT32) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Cache clean interval too big");
            return false;
        }
        strata_qcow2_cache_set_clean_interval(s->l2_cache, gctx,
                                              (unsigned)ci);
        strata_qcow2_cache_set_clean_interval(s->refcount_cache, gctx,
                                              (unsigned)ci);
    }

    /* Refcounts left stale by a crash under lazy refcounts are rebuilt
     * before anything is written, as QEMU does on open. */
    if ((s->hdr.incompatible_features & STRATA_QCOW2_INCOMPAT_DIRTY) &&
        s->writable) {
        StrataQcow2CheckResult res;
        ret = strata_qcow2_co_check_repair(s, STRATA_QCOW2_CHECK_FIX_ALL,
                                           &res, error);
        if (ret < 0) {
            return false;
        }
        if (res.corruptions || res.check_errors ||
            (s->hdr.incompatible_features & STRATA_QCOW2_INCOMPAT_DIRTY)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                        "Could not repair dirty image: %" G_GINT64_FORMAT
                        " corruptions and %" G_GINT64_FORMAT " errors left",
                        res.corruptions, res.check_errors);
            return false;
        }
    }

    /* Autoclear bits name features a program that does not know them
     * must invalidate; none is implemented here. */
    if (s->writable && (s->hdr.autoclear_features &
                        ~STRATA_QCOW2_AUTOCLEAR_SUPPORTED)) {
        uint8_t be[8];
        s->hdr.autoclear_features &= STRATA_QCOW2_AUTOCLEAR_SUPPORTED;
        strata_qcow2_put_be64(be, s->hdr.autoclear_features);
        ret = strata_qcow2_co_write_header_bytes(
            s, STRATA_QCOW2_HDR_AUTOCLEAR, be, sizeof(be));
        if (ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not update qcow2 header: %s",
                        g_strerror(-ret));
            return false;
        }
        s->autoclear_cleared = true;
    }
    return true;
}

static void open_co(void *opaque)
{
    OpenCo *o = opaque;
    o->ok = open_co_body(o->s, o->options, &o->error);
}

/* Where QEMU would look for a backing file named @name in an image
 * opened as @image: relative names are relative to the image's
 * directory, as it was spelled, without normalising. */
static char *backing_path(const char *image, const char *name,
                          GError **error)
{
    const char *slash;

    if (g_path_is_absolute(name)) {
        return g_strdup(name);
    }
    {
        /* "proto:rest" before any slash is a protocol name. */
        const char *colon = strchr(name, ':');
        const char *sl = strchr(name, '/');
        if (colon && (!sl || colon < sl)) {
            return g_strdup(name);
        }
    }
    if (!image || !*image || g_str_has_prefix(image, "json:")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot use relative backing file names for '%s'",
                    image ? image : "");
        return NULL;
    }
    slash = strrchr(image, '/');
    if (!slash) {
        return g_strdup(name);
    }
    return g_strdup_printf("%.*s%s", (int)(slash - image + 1), image, name);
}

static bool open_backing(StrataQcow2State *s, JsonObject *options,
                         GError **error)
{
    StrataNode *node = s->node;
    const char *image = file_of(s)->filename;
    g_autofree char *path = NULL;
    g_autoptr(JsonObject) bopts = NULL;
    GStatBuf st;
    unsigned depth = 0;
    const char *stat_path;
    StrataNode *child;
    g_autoptr(GError) local = NULL;

    path = backing_path(image, s->hdr.backing_file, error);
    if (!path) {
        return false;
    }
    /* A file name, or a remote image (a thin overlay over a base on
     * shared storage), or a json: name, as QEMU opens them; the
     * header's format wins over a json: name's. */
    bopts = strata_image_name_options(node->ctx, path, s->hdr.backing_format,
                                      error);
    if (!bopts) {
        g_prefix_error(error, "Could not open backing file '%s': ", path);
        return false;
    }
    stat_path = strata_options_filename(bopts);

    /* A chain that comes back to an image being opened would recurse
     * for ever. */
    if (stat_path && g_stat(stat_path, &st) == 0) {
        for (GList *l = node->ctx->all_nodes; l; l = l->next) {
            StrataNode *n = l->data;
            StrataQcow2State *o;
            if (n->drv != node->drv || !n->opaque) {
                continue;
            }
            o = n->opaque;
            if (!o->opening) {
                continue;
            }
            depth++;
            if (o->st_dev == (uint64_t)st.st_dev &&
                o->st_ino == (uint64_t)st.st_ino) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                            "Backing file chain of '%s' loops back to '%s'",
                            image, path);
                return false;
            }
        }
    }
    if (depth > MAX_BACKING_DEPTH) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing file chain of '%s' is deeper than %u images",
                    image, MAX_BACKING_DEPTH);
        return false;
    }

    json_object_set_boolean_member(bopts, "read-only", true);
    {
        JsonNode *cache = json_object_get_member(options, "cache");
        if (cache && JSON_NODE_HOLDS_OBJECT(cache)) {
            json_object_set_member(bopts, "cache", json_node_copy(cache));
        }
    }

    child = strata_node_open(node->ctx, bopts, false, false, &local);
    if (!child) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not open backing file '%s': %s", path,
                    local->message);
        return false;
    }
    if (!strata_node_attach_child(node, child, "backing",
                                  STRATA_CHILD_BACKING, STRATA_PARENT_NODE,
                                  node, NULL, 0, 0, error)) {
        strata_node_unref(child);
        return false;
    }
    strata_node_unref(child);
    return true;
}

static void qcow2_state_free(StrataQcow2State *s)
{
    strata_qcow2_layermap_free(s);
    strata_qcow2_cache_free(s->l2_cache);
    strata_qcow2_cache_free(s->refcount_cache);
    s->l2_cache = s->refcount_cache = NULL;
    g_clear_pointer(&s->l1_table, g_free);
    strata_qcow2_refcount_table_free(s);
    g_clear_pointer(&s->cmp_buf, g_free);
    g_clear_pointer(&s->decmp_buf, g_free);
    g_clear_pointer(&s->snapshots, g_ptr_array_unref);
    strata_qcow2_header_cleanup(&s->hdr);
}

/* Whether the image file has far fewer blocks than its length: the
 * mark of preallocated metadata over holes. */
static bool file_is_sparse(StrataNode *file)
{
    int64_t actual;

    if (!file || file->total_bytes <= 0) {
        return false;
    }
    actual = strata_node_allocated_size(file);
    return actual >= 0 && actual < file->total_bytes / 2;
}

static void prepare_co(void *opaque)
{
    strata_qcow2_layermap_co_prepare(opaque);
}

static bool qcow2_open(StrataNode *node, JsonObject *options,
                       GError **error)
{
    StrataQcow2State *s = node->opaque;
    OpenCo o = { s, options, NULL, false };
    GStatBuf st;

    s->node = node;
    strata_qcow2_header_init(&s->hdr);
    strata_co_mutex_init(&s->lock);
    s->writable = !node->read_only;
    s->pass_discard_request =
        strata_opts_get_bool(options, "pass-discard-request", false);
    s->lazy_refcounts_opt =
        strata_opts_get_bool(options, "lazy-refcounts", false);
    if (!node->file) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'file' is missing");
        return false;
    }

    strata_loop_run_co(node->ctx->loop, open_co, &o);
    if (!o.ok) {
        g_propagate_error(error, o.error);
        qcow2_state_free(s);
        return false;
    }

    node->limits.request_alignment = 1;
    node->limits.pdiscard_alignment = s->cluster_size;

    if (!json_object_has_member(options, "backing") && s->hdr.backing_file) {
        const char *fname = file_of(s)->filename;
        s->opening = true;
        if (fname && g_stat(fname, &st) == 0) {
            s->st_dev = (uint64_t)st.st_dev;
            s->st_ino = (uint64_t)st.st_ino;
        }
        bool ok = open_backing(s, options, error);
        s->opening = false;
        if (!ok) {
            qcow2_state_free(s);
            return false;
        }
    }
    s->sparse_file = file_is_sparse(node->file->node);
    strata_loop_run_co(node->ctx->loop, prepare_co, s);
    return true;
}

typedef struct CloseCo {
    StrataQcow2State *s;
    int ret;
} CloseCo;

static void close_co(void *opaque)
{
    CloseCo *c = opaque;
    StrataQcow2State *s = c->s;

    strata_co_mutex_lock(&s->lock);
    c->ret = strata_qcow2_cache_co_flush(s->l2_cache);
    if (c->ret == 0) {
        c->ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    }
    strata_co_mutex_unlock(&s->lock);
}

static void qcow2_close(StrataNode *node)
{
    StrataQcow2State *s = node->opaque;

    if (!s->l2_cache) {
        return;
    }
    if (s->writable && (strata_qcow2_cache_is_dirty(s->l2_cache) ||
                        strata_qcow2_cache_is_dirty(s->refcount_cache))) {
        CloseCo c = { s, 0 };
        strata_loop_run_co(node->ctx->loop, close_co, &c);
        if (c.ret < 0) {
            g_warning("qcow2: could not write metadata of node '%s' on "
                      "close: %s", node->node_name, g_strerror(-c.ret));
        }
    }
    qcow2_state_free(s);
}

/* ------------------------------------------------------------------ */
/* Reads                                                               */
/* ------------------------------------------------------------------ */

/* Reads guest bytes without the request path: also used for the
 * copy-on-write of a cluster's untouched parts. */
static int read_internal(StrataQcow2State *s, uint64_t offset,
                         uint64_t bytes, StrataIOVec *qiov,
                         size_t qiov_offset)
{
    while (bytes > 0) {
        uint64_t n = bytes, host;
        StrataQcow2ClusterType type;
        int ret;

        strata_co_mutex_lock(&s->lock);
        ret = strata_qcow2_co_get_host_offset(s, offset, &n, &host, &type,
                                              NULL);
        if (ret < 0) {
            strata_co_mutex_unlock(&s->lock);
            return ret;
        }
        if (type == STRATA_QCOW2_CLUSTER_COMPRESSED) {
            /* The shared decompression buffer is used under the lock. */
            ret = strata_qcow2_co_read_compressed(s, host);
            if (ret == 0) {
                strata_iov_from_buf(qiov, qiov_offset,
                                    s->decmp_buf +
                                    strata_qcow2_offset_into_cluster(s,
                                                                     offset),
                                    n);
            }
            strata_co_mutex_unlock(&s->lock);
            if (ret < 0) {
                return ret;
            }
        } else if (type == STRATA_QCOW2_CLUSTER_NORMAL) {
            /* Registered before the lock is dropped: a write that frees
             * these clusters meanwhile must not give them to anyone
             * before this read is done. */
            StrataQcow2Read rd = { host, host + n, false };
            s->reads = g_list_prepend(s->reads, &rd);
            strata_co_mutex_unlock(&s->lock);
            ret = strata_node_co_preadv(file_of(s), host, n, qiov,
                                        qiov_offset, 0);
            s->reads = g_list_remove(s->reads, &rd);
            if (rd.deferred) {
                uint64_t c = host >> s->cluster_bits;
                s->free_cluster_index = MIN(s->free_cluster_index, c);
            }
            if (ret < 0) {
                return ret;
            }
        } else {
            strata_co_mutex_unlock(&s->lock);
            switch (type) {
            case STRATA_QCOW2_CLUSTER_UNALLOCATED:
            case STRATA_QCOW2_CLUSTER_UNALLOCATED_ALLOC:
                ret = strata_qcow2_co_read_backing(s, offset, n, qiov,
                                                    qiov_offset);
                break;
            default:
                strata_iov_memset(qiov, qiov_offset, 0, n);
                ret = 0;
                break;
            }
            if (ret < 0) {
                return ret;
            }
        }
        offset += n;
        qiov_offset += n;
        bytes -= n;
    }
    return 0;
}

static int qcow2_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                           StrataIOVec *qiov, size_t qiov_offset,
                           StrataReqFlags flags)
{
    return read_internal(node->opaque, offset, bytes, qiov, qiov_offset);
}

/* ------------------------------------------------------------------ */
/* Writes                                                              */
/* ------------------------------------------------------------------ */

/* s->lock held.  Waits (releasing the lock) while an allocation in
 * flight covers a cluster of [start, end); true when it had to wait. */
static bool wait_for_allocs(StrataQcow2State *s, uint64_t start,
                            uint64_t end)
{
    for (GList *l = s->allocs; l; l = l->next) {
        StrataQcow2Alloc *a = l->data;
        if (a->guest_start < end && start < a->guest_end) {
            strata_co_queue_wait(&a->waiters, &s->lock);
            return true;
        }
    }
    return false;
}

static int check_writable(StrataQcow2State *s)
{
    if (!s->writable) {
        return -EROFS;
    }
    if (s->corrupt) {
        return -EIO;
    }
    return 0;
}

/*
 * Reads the parts of the new cluster run [start, end) that a write of
 * [start + head_len, end - tail_len) leaves alone, into *@buf (free()),
 * laid out as in the run.  The buffer is aligned for the file so the
 * merged write (head, guest data, tail) needs no bounce copy.  When the
 * run is one cluster, head and tail come from one read of the whole
 * cluster: through a backing chain a second request costs more than the
 * few bytes of guest data read for nothing.
 */
static int cow_read(StrataQcow2State *s, uint64_t start, uint64_t end,
                    uint64_t head_len, uint64_t tail_len, uint8_t **buf)
{
    uint64_t len = end - start;
    size_t align = MAX(file_of(s)->limits.buf_align, 4096u);
    StrataIOVec v;
    void *p = NULL;
    int ret = 0;

    *buf = NULL;
    if (!head_len && !tail_len) {
        return 0;
    }
    if (posix_memalign(&p, align, len) != 0) {
        return -ENOMEM;
    }
    *buf = p;
    if (head_len && tail_len && len == s->cluster_size) {
        strata_iov_init_buf(&v, p, len);
        return read_internal(s, start, len, &v, 0);
    }
    if (head_len) {
        strata_iov_init_buf(&v, p, head_len);
        ret = read_internal(s, start, head_len, &v, 0);
    }
    if (ret == 0 && tail_len) {
        strata_iov_init_buf(&v, *buf + len - tail_len, tail_len);
        ret = read_internal(s, end - tail_len, tail_len, &v, 0);
    }
    return ret;
}

/* Where the data of a guest write comes from: the caller's buffers, or
 * (copy_range_to) a range of a file node that the kernel copies. */
typedef struct WriteData {
    StrataIOVec *qiov;      /* the data, from qiov_offset on */
    size_t qiov_offset;
    StrataNode *src;        /* when set: @src's bytes from src_offset on */
    uint64_t src_offset;
} WriteData;

/* Puts @n bytes of @d's data at file offset @host, which the overlap
 * check passed.  s->lock not held. */
static int put_data(StrataQcow2State *s, const WriteData *d, uint64_t host,
                    uint64_t n)
{
    if (d->src) {
        return strata_node_co_copy_range_to(file_of(s), host, n, d->src,
                                            d->src_offset);
    }
    return strata_node_co_pwritev(file_of(s), host, n, d->qiov,
                                  d->qiov_offset, 0);
}

/* Whether guest [@from, @to) of this layer reads as zeroes, as far as
 * block status knows without reading data (false when unsure). */
static bool co_reads_as_zero(StrataQcow2State *s, uint64_t from,
                             uint64_t to)
{
    uint64_t pnum = 0;
    int st = strata_node_co_block_status_above(s->node, NULL, false, from,
                                               to - from, &pnum, NULL, NULL,
                                               NULL);

    return st >= 0 && pnum >= to - from &&
           strata_node_status_reads_zero(s->node, st);
}

/* When the new cluster's range reads as zeroes now (one block status
 * query for all of [@gfrom, @gto), the guest's part included: it is one
 * cluster, and the query is on every copy-on-write), the file zeroes
 * [@gfrom, @gto) at @host by allocation (a range of unwritten extents,
 * no zero bytes through the page cache or to the disk) and only the
 * guest's data is written: a 4 KiB write into a 64 KiB cluster of an
 * empty stretch of the chain writes 4 KiB, not 64.  -ENOTSUP: take the
 * plain path (the file cannot zero cheaply, or the range holds data). */
static int co_write_over_zeroes(StrataQcow2State *s, uint64_t gfrom,
                                uint64_t gto, uint64_t offset, uint64_t n,
                                const WriteData *d, uint64_t host)
{
    StrataNode *file = file_of(s);
    uint64_t align = MAX(file->limits.request_alignment, 4096u);
    int ret;

    if (d->src || ((host | (gto - gfrom)) & (align - 1)) ||
        !co_reads_as_zero(s, gfrom, gto)) {
        return -ENOTSUP;
    }
    ret = strata_node_co_pwrite_zeroes(file, host, gto - gfrom,
                                       STRATA_REQ_NO_FALLBACK);
    if (ret < 0) {
        return ret;
    }
    return put_data(s, d, host + (offset - gfrom), n);
}

/* Writes guest [offset, offset + n) from @d, widened to [gfrom, gto)
 * with what the guest reads there now (the copy-on-write of what the
 * request leaves out), at @host, where guest @gfrom is to live.
 * s->lock not held. */
static int write_padded(StrataQcow2State *s, uint64_t gfrom, uint64_t gto,
                        uint64_t offset, uint64_t n, const WriteData *d,
                        uint64_t host)
{
    uint64_t head_len = offset - gfrom, tail_len = gto - (offset + n);
    WriteData padded = { 0 };
    uint8_t *cow = NULL;
    StrataIOVec wv;
    int ret;

    if (d->src && (head_len || tail_len)) {
        /* copy_range_to takes whole clusters only. */
        return -ENOTSUP;
    }
    strata_co_mutex_lock(&s->lock);
    ret = strata_qcow2_co_pre_write_overlap_check(s, 0, host, gto - gfrom);
    strata_co_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    if (!head_len && !tail_len) {
        return put_data(s, d, host, n);
    }
    ret = co_write_over_zeroes(s, gfrom, gto, offset, n, d, host);
    if (ret != -ENOTSUP) {
        return ret;
    }
    strata_iov_init(&wv, d->qiov->niov + 2);
    ret = cow_read(s, gfrom, gto, head_len, tail_len, &cow);
    if (head_len) {
        strata_iov_add(&wv, cow, head_len);
    }
    strata_iov_concat(&wv, d->qiov, d->qiov_offset, n);
    if (tail_len) {
        strata_iov_add(&wv, cow + (gto - gfrom) - tail_len, tail_len);
    }
    if (ret == 0) {
        padded.qiov = &wv;
        ret = put_data(s, &padded, host, gto - gfrom);
    }
    strata_iov_cleanup(&wv);
    free(cow);
    return ret;
}

/*
 * The part of a cluster a new host cluster must receive when a write
 * covers bytes [*from, *to) of it: all of it, except with extended L2,
 * where it is the written subclusters, widened over every subcluster
 * with data when the old cluster has some (its entry is replaced).
 */
static void cow_extent(StrataQcow2State *s, uint64_t entry, uint64_t bitmap,
                       uint64_t *from, uint64_t *to)
{
    uint64_t scs = s->subcluster_size;
    uint64_t alloc = bitmap & STRATA_QCOW2_BITMAP_ALL_ALLOC;

    if (!s->extended_l2 || (entry & STRATA_QCOW2_OFLAG_COMPRESSED)) {
        *from = 0;
        *to = s->cluster_size;
        return;
    }
    *from &= ~(scs - 1);
    *to = (*to + scs - 1) & ~(scs - 1);
    if ((entry & STRATA_QCOW2_OFFSET_MASK) && alloc) {
        *from = MIN(*from, (uint64_t)__builtin_ctzll(alloc)
                           << s->subcluster_bits);
        *to = MAX(*to, (uint64_t)(64 - __builtin_clzll(alloc))
                       << s->subcluster_bits);
    }
}

/* A new alloc covering guest [start, end), registered; s->lock held. */
static void alloc_begin(StrataQcow2State *s, StrataQcow2Alloc *alloc,
                        uint64_t start, uint64_t end)
{
    alloc->guest_start = start;
    alloc->guest_end = end;
    strata_co_queue_init(&alloc->waiters);
    s->allocs = g_list_prepend(s->allocs, alloc);
}

static void alloc_end(StrataQcow2State *s, StrataQcow2Alloc *alloc)
{
    s->allocs = g_list_remove(s->allocs, alloc);
    strata_co_queue_restart_all(&alloc->waiters);
}

/*
 * Extended L2: a write into subclusters without data (they read as
 * zeroes or from the backing file) of a cluster we own.  Only the
 * subclusters it covers in part are completed by copy-on-write; then
 * the bitmap marks what was written as data.  Called with s->lock held,
 * which it drops.
 */
static int64_t write_subclusters(StrataQcow2State *s, uint64_t offset,
                                 uint64_t n, uint64_t host,
                                 const WriteData *d)
{
    uint64_t scs = s->subcluster_size;
    uint64_t start = strata_qcow2_start_of_cluster(s, offset);
    uint64_t gfrom, gto, *slice, idx;
    StrataQcow2Alloc alloc;
    int ret;

    n = MIN(n, start + s->cluster_size - offset);
    gfrom = offset & ~(scs - 1);
    gto = (offset + n + scs - 1) & ~(scs - 1);
    /* Two writes into one subcluster would each copy the other's part
     * from below: they take turns. */
    alloc_begin(s, &alloc, start, start + s->cluster_size);
    strata_co_mutex_unlock(&s->lock);

    ret = write_padded(s, gfrom, gto, offset, n, d, host - (offset - gfrom));

    strata_co_mutex_lock(&s->lock);
    if (ret == 0) {
        /* The data reaches the disk before the bitmap that shows it. */
        ret = strata_qcow2_cache_co_set_dependency(s->l2_cache,
                                                   s->refcount_cache);
    }
    if (ret == 0) {
        ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
    }
    if (ret == 0) {
        unsigned from = (unsigned)((gfrom - start) >> s->subcluster_bits);
        unsigned to = (unsigned)((gto - start) >> s->subcluster_bits);
        uint64_t b = strata_qcow2_l2_get_bitmap(s, slice, idx);

        b |= strata_qcow2_sc_alloc_range(from, to);
        b &= ~strata_qcow2_sc_zero_range(from, to);
        strata_qcow2_l2_set_bitmap(s, slice, idx, b);
        strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
    }
    alloc_end(s, &alloc);
    strata_co_mutex_unlock(&s->lock);
    return ret < 0 ? ret : (int64_t)n;
}


/*
 * Writes what fits of [offset, offset + bytes) in one run of clusters of
 * the same kind, from @d; returns the bytes written or -errno.
 */
static int64_t write_chunk_from(StrataQcow2State *s, uint64_t offset,
                                uint64_t bytes, const WriteData *d)
{
    uint64_t cs = s->cluster_size;
    uint64_t n, host, entry, start, end, nb;
    uint64_t from0, to0, fromL, toL;
    StrataQcow2ClusterType type;
    StrataQcow2Alloc alloc;
    uint64_t *slice;
    uint64_t idx;
    int64_t hoff;
    int ret;

    strata_co_mutex_lock(&s->lock);
    do {
        start = strata_qcow2_start_of_cluster(s, offset);
        end = (offset + bytes + cs - 1) & ~(cs - 1);
    } while (wait_for_allocs(s, start, end));

    n = bytes;
    ret = strata_qcow2_co_get_host_offset(s, offset, &n, &host, &type,
                                          &entry);
    if (ret < 0) {
        goto unlock;
    }

    if (type == STRATA_QCOW2_CLUSTER_NORMAL &&
        (entry & STRATA_QCOW2_OFLAG_COPIED)) {
        /* Our own cluster: overwrite in place. */
        ret = strata_qcow2_co_pre_write_overlap_check(s, 0, host, n);
        strata_co_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        ret = put_data(s, d, host, n);
        return ret < 0 ? ret : (int64_t)n;
    }
    if (s->extended_l2 && (entry & STRATA_QCOW2_OFLAG_COPIED) &&
        (type == STRATA_QCOW2_CLUSTER_ZERO_ALLOC ||
         type == STRATA_QCOW2_CLUSTER_UNALLOCATED_ALLOC)) {
        return write_subclusters(s, offset, n, host, d);
    }

    /* A new cluster run: [start, end) in guest space. */
    start = strata_qcow2_start_of_cluster(s, offset);
    end = (offset + n + cs - 1) & ~(cs - 1);
    nb = (end - start) >> s->cluster_bits;

    /* The L2 table first (allocated or made our own), then the data. */
    ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
    if (ret < 0) {
        goto unlock;
    }
    from0 = offset - start;
    to0 = nb == 1 ? offset + n - start : cs;
    cow_extent(s, strata_qcow2_l2_get(s, slice, idx),
               strata_qcow2_l2_get_bitmap(s, slice, idx), &from0, &to0);
    fromL = nb == 1 ? offset - start : 0;
    toL = offset + n - (end - cs);
    cow_extent(s, strata_qcow2_l2_get(s, slice, idx + nb - 1),
               strata_qcow2_l2_get_bitmap(s, slice, idx + nb - 1), &fromL,
               &toL);
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
    hoff = strata_qcow2_co_alloc_clusters(s, nb * cs);
    if (hoff < 0) {
        ret = (int)hoff;
        goto unlock;
    }
    alloc_begin(s, &alloc, start, end);
    strata_co_mutex_unlock(&s->lock);

    ret = write_padded(s, start + from0, end - cs + toL, offset, n, d,
                       (uint64_t)hoff + from0);

    strata_co_mutex_lock(&s->lock);
    if (ret < 0) {
        /* Nothing points at the new clusters: give them back. */
        strata_qcow2_co_free_clusters(s, (uint64_t)hoff, nb * cs);
        goto done;
    }
    /* The L2 entries last: the cache writes them only after the new
     * refcounts and, with them, this data reached the disk. */
    ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
    if (ret < 0) {
        goto done;
    }
    {
        g_autofree uint64_t *old = g_new(uint64_t, nb);
        for (uint64_t k = 0; k < nb; k++) {
            old[k] = strata_qcow2_l2_get(s, slice, idx + k);
            strata_qcow2_l2_set(s, slice, idx + k,
                                ((uint64_t)hoff + k * cs) |
                                STRATA_QCOW2_OFLAG_COPIED);
            if (s->extended_l2) {
                /* Written subclusters hold data now; the others keep
                 * reading as zeroes or from the backing file. */
                unsigned f = k == 0 ? (unsigned)(from0 >> s->subcluster_bits)
                                    : 0;
                unsigned t = k == nb - 1
                    ? (unsigned)(toL >> s->subcluster_bits)
                    : STRATA_QCOW2_SUBCLUSTERS;
                uint64_t b = strata_qcow2_l2_get_bitmap(s, slice, idx + k);
                b |= strata_qcow2_sc_alloc_range(f, t);
                b &= ~strata_qcow2_sc_zero_range(f, t);
                strata_qcow2_l2_set_bitmap(s, slice, idx + k, b);
            }
        }
        strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
        strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        for (uint64_t k = 0; k < nb; k++) {
            strata_qcow2_co_free_l2_entry(s, old[k]);
        }
    }
    s->decmp_host = 0;
done:
    alloc_end(s, &alloc);
unlock:
    strata_co_mutex_unlock(&s->lock);
    return ret < 0 ? ret : (int64_t)n;
}

static int64_t write_chunk(StrataQcow2State *s, uint64_t offset,
                           uint64_t bytes, StrataIOVec *qiov,
                           size_t qiov_offset)
{
    WriteData d = { .qiov = qiov, .qiov_offset = qiov_offset };

    return write_chunk_from(s, offset, bytes, &d);
}

/* ------------------------------------------------------------------ */
/* Compressed writes                                                   */
/* ------------------------------------------------------------------ */

/*
 * Host bytes for @size bytes of compressed data (less than a cluster),
 * packed after the previous compressed cluster when its host cluster
 * has room: each compressed cluster holds one reference to the host
 * cluster it lies in.  s->lock held.
 */
static int64_t alloc_compressed(StrataQcow2State *s, uint64_t size)
{
    uint64_t off = s->free_byte_offset;
    uint64_t room = s->cluster_size - strata_qcow2_offset_into_cluster(s, off);
    uint64_t rc = 0;
    int ret;

    if (off) {
        /* A host cluster whose compressed clusters were all freed may
         * have gone to someone else meanwhile. */
        ret = strata_qcow2_co_get_refcount(s, off >> s->cluster_bits, &rc);
        if (ret < 0 || rc == 0 || rc >= s->refcount_max || room < size) {
            off = 0;
        }
    }
    if (off) {
        ret = strata_qcow2_co_update_refcount(s, off, size, 1);
        if (ret < 0) {
            return ret;
        }
    } else {
        int64_t c = strata_qcow2_co_alloc_clusters(s, s->cluster_size);
        if (c < 0) {
            return c;
        }
        off = (uint64_t)c;
    }
    s->free_byte_offset = off + size;
    if (!strata_qcow2_offset_into_cluster(s, s->free_byte_offset)) {
        s->free_byte_offset = 0;
    }
    return (int64_t)off;
}

/* Stores the cluster at guest @offset (@data: one whole cluster) in
 * @clen compressed bytes at @cdata, replacing whatever was there. */
static int write_one_compressed(StrataQcow2State *s, uint64_t offset,
                                const uint8_t *cdata, uint64_t clen)
{
    StrataQcow2Alloc alloc;
    uint64_t *slice, idx, old, entry, nb_add;
    int64_t coff;
    int ret;

    strata_co_mutex_lock(&s->lock);
    while (wait_for_allocs(s, offset, offset + s->cluster_size)) {
    }
    /* The L2 table first, then the data, as for any allocation. */
    ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
    if (ret < 0) {
        goto unlock;
    }
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
    coff = alloc_compressed(s, clen);
    if (coff < 0) {
        ret = (int)coff;
        goto unlock;
    }
    if ((uint64_t)coff > s->cluster_offset_mask) {
        /* The descriptor cannot name it (cluster sizes below 16 KiB
         * leave fewer offset bits than the file may need). */
        strata_qcow2_co_free_clusters(s, (uint64_t)coff, clen);
        ret = -EFBIG;
        goto unlock;
    }
    alloc_begin(s, &alloc, offset, offset + s->cluster_size);
    ret = strata_qcow2_co_pre_write_overlap_check(s, 0, (uint64_t)coff,
                                                  clen);
    strata_co_mutex_unlock(&s->lock);

    if (ret == 0) {
        ret = strata_node_co_pwrite(file_of(s), (uint64_t)coff, clen, cdata,
                                    0);
    }

    strata_co_mutex_lock(&s->lock);
    if (ret == 0) {
        /* New refcounts and the data before the entry naming them. */
        ret = strata_qcow2_cache_co_set_dependency(s->l2_cache,
                                                   s->refcount_cache);
    }
    if (ret == 0) {
        ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
    }
    if (ret < 0) {
        strata_qcow2_co_free_clusters(s, (uint64_t)coff, clen);
        goto done;
    }
    nb_add = (((uint64_t)coff + clen - 1) >> 9) - ((uint64_t)coff >> 9);
    entry = (uint64_t)coff | (nb_add << s->csize_shift) |
            STRATA_QCOW2_OFLAG_COMPRESSED;
    old = strata_qcow2_l2_get(s, slice, idx);
    strata_qcow2_l2_set(s, slice, idx, entry);
    /* Compressed clusters have no subclusters. */
    strata_qcow2_l2_set_bitmap(s, slice, idx, 0);
    strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
    strata_qcow2_co_free_l2_entry(s, old);
    s->decmp_host = 0;
done:
    alloc_end(s, &alloc);
unlock:
    strata_co_mutex_unlock(&s->lock);
    return ret;
}

/*
 * STRATA_REQ_WRITE_COMPRESSED: whole clusters (the disk's last one may
 * be partial, and is padded with zeroes), each compressed on its own;
 * one that does not shrink is written as a normal cluster, as QEMU
 * does.
 */
static int write_compressed(StrataQcow2State *s, uint64_t offset,
                            uint64_t bytes, StrataIOVec *qiov,
                            size_t qiov_offset)
{
    uint64_t cs = s->cluster_size;
    g_autofree uint8_t *in = NULL, *out = NULL;

    if (strata_qcow2_offset_into_cluster(s, offset) ||
        (strata_qcow2_offset_into_cluster(s, bytes) &&
         offset + bytes != s->hdr.size)) {
        return -EINVAL;
    }
    in = g_malloc(cs);
    out = g_malloc(cs);
    while (bytes > 0) {
        uint64_t n = MIN(bytes, cs);
        ssize_t clen;
        int ret;

        strata_iov_to_buf(qiov, qiov_offset, in, n);
        memset(in + n, 0, cs - n);
        clen = strata_qcow2_compress(s, in, out, cs - 1);
        if (clen == -ENOSPC) {
            StrataIOVec v;
            strata_iov_init_buf(&v, in, n);
            for (uint64_t done = 0; done < n;) {
                int64_t w = write_chunk(s, offset + done, n - done, &v, done);
                if (w < 0) {
                    return (int)w;
                }
                done += (uint64_t)w;
            }
            ret = 0;
        } else if (clen < 0) {
            return (int)clen;
        } else {
            ret = write_one_compressed(s, offset, out, (uint64_t)clen);
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

static int qcow2_co_pwritev(StrataNode *node, uint64_t offset,
                            uint64_t bytes, StrataIOVec *qiov,
                            size_t qiov_offset, StrataReqFlags flags)
{
    StrataQcow2State *s = node->opaque;
    int ret = check_writable(s);

    if (ret < 0) {
        return ret;
    }
    if (flags & STRATA_REQ_WRITE_COMPRESSED) {
        return write_compressed(s, offset, bytes, qiov, qiov_offset);
    }
    while (bytes > 0) {
        int64_t n = write_chunk(s, offset, bytes, qiov, qiov_offset);
        if (n < 0) {
            return (int)n;
        }
        offset += (uint64_t)n;
        qiov_offset += (size_t)n;
        bytes -= (uint64_t)n;
    }
    return 0;
}

/*
 * Whole clusters only: a partial one needs the copy-on-write of the rest
 * through a buffer, so the caller writes it the usual way.  The write
 * path is write_chunk's, with the file's copy instead of a write.
 */
static int qcow2_co_copy_range_to(StrataNode *node, uint64_t offset,
                                  uint64_t bytes, StrataNode *src,
                                  uint64_t src_offset)
{
    StrataQcow2State *s = node->opaque;
    int ret = check_writable(s);

    if (ret < 0) {
        return ret;
    }
    if ((offset | bytes) & (s->cluster_size - 1)) {
        return -ENOTSUP;
    }
    for (uint64_t done = 0; done < bytes;) {
        WriteData d = { .src = src, .src_offset = src_offset + done };
        int64_t n = write_chunk_from(s, offset + done, bytes - done, &d);

        if (n < 0) {
            return (int)n;
        }
        done += (uint64_t)n;
    }
    return 0;
}

/* Writes zero bytes as data (partial clusters, v2 with a backing file). */
static int write_zero_data(StrataQcow2State *s, uint64_t offset,
                           uint64_t bytes)
{
    uint64_t chunk = MIN(bytes, MAX(s->cluster_size, 1024 * 1024ull));
    g_autofree uint8_t *zero = g_malloc0(chunk);

    while (bytes > 0) {
        uint64_t n = MIN(bytes, chunk);
        StrataIOVec v;
        int ret;
        strata_iov_init_buf(&v, zero, n);
        ret = qcow2_co_pwritev(s->node, offset, n, &v, 0, 0);
        if (ret < 0) {
            return ret;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

typedef enum {
    ZAP_ZERO,          /* write-zeroes: keep our storage (ZERO_ALLOC) */
    ZAP_ZERO_UNMAP,    /* write-zeroes with unmap (v3): ZERO_PLAIN */
    ZAP_DISCARD,       /* guest discard (v3): as ZAP_ZERO_UNMAP, but what
                        * reads as zeroes with nothing below is left
                        * alone, as QEMU leaves it */
    ZAP_DEALLOCATE,    /* v2 without backing: entry 0 */
} ZapMode;

/* Rewrites the L2 entries of whole clusters [offset, offset + bytes). */
static int zap_clusters(StrataQcow2State *s, uint64_t offset, uint64_t bytes,
                        ZapMode mode)
{
    int ret = 0;

    strata_co_mutex_lock(&s->lock);
    while (bytes > 0) {
        uint64_t *slice;
        uint64_t idx, n, done;
        bool has_backing = backing_of(s) != NULL;

        if (wait_for_allocs(s, offset, offset + bytes)) {
            continue;
        }
        ret = strata_qcow2_co_get_l2_slice(s, offset, false, &slice, &idx);
        if (ret < 0) {
            break;
        }
        n = MIN(bytes >> s->cluster_bits, s->l2_slice_entries - idx);
        if (!slice && (mode == ZAP_DEALLOCATE ||
                       (mode == ZAP_DISCARD && !has_backing))) {
            /* No table: everything here reads as zeroes already. */
            done = n;
        } else {
            if (!slice) {
                ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice,
                                                   &idx);
                if (ret < 0) {
                    break;
                }
            } else if (!(s->l1_table[offset >> (s->l2_bits +
                                                s->cluster_bits)] &
                         STRATA_QCOW2_OFLAG_COPIED)) {
                strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
                ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice,
                                                   &idx);
                if (ret < 0) {
                    break;
                }
            }
            g_autofree uint64_t *freed = g_new0(uint64_t, n);
            bool dirty = false;
            for (uint64_t k = 0; k < n; k++) {
                uint64_t old = strata_qcow2_l2_get(s, slice, idx + k);
                uint64_t oldb = strata_qcow2_l2_get_bitmap(s, slice, idx + k);
                StrataQcow2ClusterType t = strata_qcow2_l2_entry_type(old);
                /* With extended L2, zero lives in the bitmap. */
                uint64_t zero = s->extended_l2 ? 0 : STRATA_QCOW2_OFLAG_ZERO;
                uint64_t neu, neub = 0;

                if (mode == ZAP_DEALLOCATE) {
                    neu = 0;
                } else if (mode == ZAP_DISCARD &&
                           t == STRATA_QCOW2_CLUSTER_UNALLOCATED &&
                           !has_backing) {
                    continue;
                } else if (mode == ZAP_ZERO &&
                           (t == STRATA_QCOW2_CLUSTER_NORMAL ||
                            t == STRATA_QCOW2_CLUSTER_ZERO_ALLOC) &&
                           (old & STRATA_QCOW2_OFLAG_COPIED)) {
                    neu = old | zero;
                    neub = STRATA_QCOW2_BITMAP_ALL_ZERO;
                } else {
                    neu = zero;
                    neub = STRATA_QCOW2_BITMAP_ALL_ZERO;
                }
                if (!s->extended_l2) {
                    neub = 0;
                }
                if (neu == old && neub == oldb) {
                    continue;
                }
                strata_qcow2_l2_set(s, slice, idx + k, neu);
                strata_qcow2_l2_set_bitmap(s, slice, idx + k, neub);
                dirty = true;
                if ((neu & STRATA_QCOW2_OFFSET_MASK) == 0) {
                    freed[k] = old;
                }
            }
            if (dirty) {
                strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
            }
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
            for (uint64_t k = 0; k < n; k++) {
                strata_qcow2_co_free_l2_entry(s, freed[k]);
            }
            done = n;
        }
        if (slice) {
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        }
        offset += done << s->cluster_bits;
        bytes -= done << s->cluster_bits;
    }
    s->decmp_host = 0;
    strata_co_mutex_unlock(&s->lock);
    return ret;
}

/* The whole clusters of [offset, offset + bytes); the disk's last,
 * partial cluster counts as whole. */
static void whole_clusters(StrataQcow2State *s, uint64_t offset,
                           uint64_t bytes, uint64_t *first, uint64_t *last)
{
    uint64_t cs = s->cluster_size;
    uint64_t end = offset + bytes;

    *first = (offset + cs - 1) & ~(cs - 1);
    if (end >= s->hdr.size) {
        *last = (s->hdr.size + cs - 1) & ~(cs - 1);
    } else {
        *last = end & ~(cs - 1);
    }
    if (*last < *first) {
        *last = *first;
    }
}

/* Extended L2: sets the zero bits of the whole subclusters [offset,
 * offset + bytes) of one cluster; -ENOTSUP for a compressed cluster. */
static int zero_subclusters(StrataQcow2State *s, uint64_t offset,
                            uint64_t bytes)
{
    uint64_t start = strata_qcow2_start_of_cluster(s, offset);
    unsigned from = (unsigned)((offset - start) >> s->subcluster_bits);
    unsigned to = (unsigned)((offset + bytes - start) >> s->subcluster_bits);
    uint64_t *slice, idx, e, b, nb;
    int ret;

    strata_co_mutex_lock(&s->lock);
    while (wait_for_allocs(s, start, start + s->cluster_size)) {
    }
    ret = strata_qcow2_co_get_l2_slice(s, offset, false, &slice, &idx);
    if (ret < 0 || (!slice && !backing_of(s))) {
        /* No table and nothing below: zeroes already. */
        goto out;
    }
    if (!slice || !(s->l1_table[offset >> (s->l2_bits + s->cluster_bits)] &
                    STRATA_QCOW2_OFLAG_COPIED)) {
        if (slice) {
            strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
        }
        ret = strata_qcow2_co_get_l2_slice(s, offset, true, &slice, &idx);
        if (ret < 0) {
            goto out;
        }
    }
    e = strata_qcow2_l2_get(s, slice, idx);
    b = strata_qcow2_l2_get_bitmap(s, slice, idx);
    if (e & STRATA_QCOW2_OFLAG_COMPRESSED) {
        ret = -ENOTSUP;
    } else if (!strata_qcow2_extl2_valid(e, b)) {
        ret = -EIO;
    } else {
        nb = (b | strata_qcow2_sc_zero_range(from, to)) &
             ~strata_qcow2_sc_alloc_range(from, to);
        if (nb != b) {
            strata_qcow2_l2_set_bitmap(s, slice, idx, nb);
            strata_qcow2_cache_mark_dirty(s->l2_cache, slice);
        }
    }
    strata_qcow2_cache_put(s->l2_cache, (void **)&slice);
out:
    strata_co_mutex_unlock(&s->lock);
    return ret;
}

/* Zeroes [offset, offset + bytes) inside one cluster: with extended L2
 * whole subclusters by their zero bits, the rest as data. */
static int zero_partial(StrataQcow2State *s, uint64_t offset, uint64_t bytes)
{
    uint64_t scs = s->subcluster_size;
    uint64_t end = offset + bytes;
    uint64_t a = (offset + scs - 1) & ~(scs - 1);
    uint64_t z = end & ~(scs - 1);
    int ret;

    if (!s->extended_l2 || a >= z) {
        return write_zero_data(s, offset, bytes);
    }
    if (offset < a) {
        ret = write_zero_data(s, offset, a - offset);
        if (ret < 0) {
            return ret;
        }
    }
    ret = zero_subclusters(s, a, z - a);
    if (ret == -ENOTSUP) {
        ret = write_zero_data(s, a, z - a);
    }
    if (ret == 0 && end > z) {
        ret = write_zero_data(s, z, end - z);
    }
    return ret;
}

static int qcow2_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                  uint64_t bytes, StrataReqFlags flags)
{
    StrataQcow2State *s = node->opaque;
    uint64_t first, last, end = offset + bytes;
    bool has_backing = backing_of(s) != NULL;
    ZapMode mode;
    int ret = check_writable(s);

    if (ret < 0) {
        return ret;
    }
    if (s->hdr.version < 3) {
        if (has_backing) {
            return -ENOTSUP;
        }
        mode = ZAP_DEALLOCATE;
    } else {
        mode = (flags & STRATA_REQ_MAY_UNMAP) ? ZAP_ZERO_UNMAP : ZAP_ZERO;
    }
    whole_clusters(s, offset, bytes, &first, &last);
    if (first >= last) {
        /* No whole cluster: a head and perhaps a tail cluster. */
        first = last = MIN(first, end);
    }
    if (offset < first) {
        ret = zero_partial(s, offset, first - offset);
        if (ret < 0) {
            return ret;
        }
    }
    if (first < last) {
        ret = zap_clusters(s, first, last - first, mode);
        if (ret < 0) {
            return ret;
        }
    }
    if (end > last) {
        ret = zero_partial(s, last, end - last);
    }
    return ret;
}

static int qcow2_co_pdiscard(StrataNode *node, uint64_t offset,
                             uint64_t bytes)
{
    StrataQcow2State *s = node->opaque;
    uint64_t first, last;
    int ret = check_writable(s);

    if (ret < 0) {
        return ret;
    }
    if (s->hdr.version < 3 && backing_of(s)) {
        /* Deallocating would let the backing file show through. */
        return -ENOTSUP;
    }
    whole_clusters(s, offset, bytes, &first, &last);
    if (first >= last) {
        return 0;
    }
    return zap_clusters(s, first, last - first,
                        s->hdr.version < 3 ? ZAP_DEALLOCATE : ZAP_DISCARD);
}

static int qcow2_co_flush(StrataNode *node)
{
    StrataQcow2State *s = node->opaque;
    int ret, ret2;

    if (!s->writable) {
        return 0;
    }
    strata_co_mutex_lock(&s->lock);
    /* L2 first: its dependency pulls refcount increments ahead of it,
     * and refcount decrements wait for it. */
    ret = strata_qcow2_cache_co_write(s->l2_cache);
    ret2 = strata_qcow2_cache_co_write(s->refcount_cache);
    strata_co_mutex_unlock(&s->lock);
    return ret < 0 ? ret : ret2;
}

/* ------------------------------------------------------------------ */
/* VM state                                                            */
/* ------------------------------------------------------------------ */

int strata_qcow2_co_discard_vmstate(StrataQcow2State *s, uint64_t bytes)
{
    uint64_t len = (bytes + s->cluster_size - 1) & ~(s->cluster_size - 1);
    return zap_clusters(s, strata_qcow2_vm_state_offset(s), len,
                        ZAP_DEALLOCATE);
}

int strata_qcow2_co_vmstate_rw(StrataNode *node, uint64_t pos, void *buf,
                               uint64_t bytes, bool is_write)
{
    StrataQcow2State *s;
    uint64_t off, limit;
    StrataIOVec v;
    int ret;

    g_return_val_if_fail(node && node->drv == &strata_driver_qcow2 &&
                         node->opaque, -EINVAL);
    s = node->opaque;
    off = strata_qcow2_vm_state_offset(s);
    /* What the largest L1 table can map. */
    limit = (uint64_t)(STRATA_QCOW2_MAX_L1_BYTES / 8) <<
            (s->l2_bits + s->cluster_bits);
    if (pos > limit - off || bytes > limit - off - pos) {
        return -EFBIG;
    }
    off += pos;
    strata_iov_init_buf(&v, buf, bytes);
    if (!is_write) {
        return read_internal(s, off, bytes, &v, 0);
    }
    ret = check_writable(s);
    if (ret < 0) {
        return ret;
    }
    for (uint64_t done = 0; done < bytes;) {
        int64_t n = write_chunk(s, off + done, bytes - done, &v,
                                (size_t)done);
        if (n < 0) {
            return (int)n;
        }
        done += (uint64_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Status, length, resize                                              */
/* ------------------------------------------------------------------ */

static int64_t qcow2_co_get_length(StrataNode *node)
{
    StrataQcow2State *s = node->opaque;
    return (int64_t)s->hdr.size;
}

static int qcow2_co_block_status(StrataNode *node, bool want_zero,
                                 uint64_t offset, uint64_t bytes,
                                 uint64_t *pnum, uint64_t *map,
                                 StrataNode **file)
{
    StrataQcow2State *s = node->opaque;
    uint64_t n = bytes, host;
    StrataQcow2ClusterType type;
    int ret;

    strata_co_mutex_lock(&s->lock);
    ret = strata_qcow2_co_get_host_offset(s, offset, &n, &host, &type,
                                          NULL);
    strata_co_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    *pnum = n;
    switch (type) {
    case STRATA_QCOW2_CLUSTER_NORMAL:
        *map = host;
        *file = file_of(s);
        /* Only an image whose metadata was preallocated can have holes
         * under its data clusters: asking the file elsewhere costs a
         * seek per extent for nothing (QEMU decides the same way). */
        return STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID |
               (s->sparse_file ? STRATA_BLOCK_RECURSE : 0);
    case STRATA_QCOW2_CLUSTER_ZERO_PLAIN:
    case STRATA_QCOW2_CLUSTER_ZERO_ALLOC:
        return STRATA_BLOCK_ZERO;
    case STRATA_QCOW2_CLUSTER_COMPRESSED:
        return STRATA_BLOCK_DATA;
    default:
        return 0;
    }
}

/* The header's disk size, then the state that follows it; @need: the
 * L1 entries the new size uses. */
static int set_size(StrataQcow2State *s, uint64_t size, uint64_t need)
{
    uint8_t be[8];
    int ret;

    strata_qcow2_put_be64(be, size);
    ret = strata_qcow2_co_write_header_bytes(s, STRATA_QCOW2_HDR_SIZE, be,
                                             sizeof(be));
    if (ret == 0) {
        s->hdr.size = size;
        s->l1_vm_state_index = (uint32_t)need;
    }
    return ret;
}

/*
 * Drops the L2 tables of the L1 entries from @keep on: their entries go
 * to zero on disk first, then the tables are freed (a crash in between
 * leaks them).  The L1 table keeps its size, as in QEMU.
 */
/* Zeroes the L1 entries from @keep on and frees the L2 tables they held
 * (whose entries must all be free by now).  s->lock held. */
static int drop_l2_tables(StrataQcow2State *s, uint32_t keep)
{
    uint64_t bytes;
    g_autofree uint8_t *zeroes = NULL;
    int ret;

    if (keep >= s->l1_size) {
        return 0;
    }
    /* Nothing still cached may point into the tables being dropped. */
    ret = strata_qcow2_cache_co_flush(s->l2_cache);
    if (ret < 0) {
        return ret;
    }
    bytes = (uint64_t)(s->l1_size - keep) * 8;
    zeroes = g_malloc0(bytes);
    ret = strata_qcow2_co_write_meta(s, STRATA_QCOW2_OL_ACTIVE_L1,
                                     s->l1_table_offset +
                                     (uint64_t)keep * 8, zeroes, bytes);
    if (ret < 0) {
        /* Part of the tail may be zero on disk: forget it in memory too,
         * so that nothing writes through a table half gone. */
        memset(s->l1_table + keep, 0, bytes);
        return ret;
    }
    for (uint32_t i = keep; i < s->l1_size; i++) {
        uint64_t l2 = s->l1_table[i] & STRATA_QCOW2_OFFSET_MASK;

        s->l1_table[i] = 0;
        if (l2) {
            strata_qcow2_cache_discard_cluster(s->l2_cache, l2,
                                               s->cluster_size);
            strata_qcow2_co_free_clusters(s, l2, s->cluster_size);
        }
    }
    return 0;
}

/* After the clusters went: the L2 tables from L1 index @keep on, then
 * the refcount blocks nothing needs any more, each step once the one
 * before is on the disk.  s->lock held; *@what says what failed. */
static int release_tables(StrataQcow2State *s, uint32_t keep,
                          const char **what)
{
    int ret;

    *what = "Failed to free the L2 tables";
    ret = drop_l2_tables(s, keep);
    if (ret == 0) {
        *what = "Failed to discard unused refblocks";
        ret = strata_qcow2_cache_co_flush(s->l2_cache);
    }
    if (ret == 0) {
        ret = strata_qcow2_co_shrink_reftable(s);
    }
    return ret;
}

/*
 * Shrinking, as QEMU 7.2 does it: the clusters past the new end are
 * deallocated (also in an image with internal snapshots, whose tables
 * are copied first), the L2 tables past it freed, refcount blocks left
 * empty dropped, then the header gets the new size and the file loses
 * its unused tail.  A crash before the header write leaves the old size
 * with its tail deallocated, never a size the metadata does not cover.
 */
/* Cuts the file after its last used cluster (the metadata no longer
 * covers what lies beyond).  s->lock held. */
static void truncate_tail(StrataQcow2State *s)
{
    int64_t len = strata_qcow2_co_last_cluster_end(s);

    if (len > 0 && len < file_of(s)->total_bytes) {
        g_autoptr(GError) err = NULL;
        /* Exact, or a file would keep its length; a block device
         * refuses (ENOTSUP) and simply keeps its size. */
        int r = strata_node_co_truncate(file_of(s), (uint64_t)len, true,
                                        &err);
        if (r < 0 && r != -ENOTSUP) {
            g_warning("qcow2: Failed to truncate the tail of the image: %s",
                      err->message);
        }
    }
}

/* The end of a shrink or an emptying that got to @ret: the file's tail
 * cut when all went well, s->lock dropped, a failure reported as
 * @what. */
static int release_done(StrataQcow2State *s, int ret, const char *what,
                        GError **error)
{
    if (ret == 0) {
        truncate_tail(s);
    }
    strata_co_mutex_unlock(&s->lock);
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s: %s", what,
                    g_strerror(-ret));
    }
    return ret;
}

static int shrink(StrataQcow2State *s, uint64_t offset, uint64_t need,
                  GError **error)
{
    uint64_t start = (offset + s->cluster_size - 1) & ~(s->cluster_size - 1);
    const char *what = "Failed to discard cropped clusters";
    int ret = 0;

    if (start < s->hdr.size) {
        ret = zap_clusters(s, start, s->hdr.size - start, ZAP_DEALLOCATE);
    }
    strata_co_mutex_lock(&s->lock);
    if (ret == 0) {
        ret = release_tables(s, MAX((uint32_t)need, 1u), &what);
    }
    if (ret == 0) {
        what = "Failed to update the image size";
        ret = set_size(s, offset, need);
    }
    return release_done(s, ret, what, error);
}

int strata_qcow2_co_make_empty(StrataNode *node, GError **error)
{
    StrataQcow2State *s;
    const char *what = "Failed to deallocate the clusters";
    int ret;

    g_return_val_if_fail(node && node->drv == &strata_driver_qcow2 &&
                         node->opaque, -EINVAL);
    s = node->opaque;
    ret = check_writable(s);
    if (ret == 0) {
        /* All the active tree covers: the disk and the VM state after
         * it.  Each cluster goes as a discard's would, so a crash at any
         * point leaves an image that reads as some of its clusters gone
         * and leaks nothing a check would call corrupt. */
        ret = zap_clusters(s, 0, (uint64_t)s->l1_size
                                 << (s->l2_bits + s->cluster_bits),
                           ZAP_DEALLOCATE);
    }
    strata_co_mutex_lock(&s->lock);
    if (ret == 0) {
        ret = release_tables(s, 0, &what);
    }
    if (ret == 0) {
        /* The freed refcounts reach the disk before the file loses the
         * clusters they counted. */
        what = "Failed to write the metadata";
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    }
    return release_done(s, ret, what, error);
}

static int qcow2_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                             GError **error)
{
    StrataQcow2State *s = node->opaque;
    uint64_t old = s->hdr.size;
    uint64_t per_l1 = s->cluster_size << s->l2_bits;
    uint64_t need = offset / per_l1 + (offset % per_l1 != 0);
    StrataNode *b = backing_of(s);
    int ret = check_writable(s);

    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "qcow2 image is %s", s->corrupt ? "corrupt"
                                                    : "read-only");
        return ret;
    }
    if (s->hdr.version < 3 && s->snapshots && s->snapshots->len) {
        /* Snapshots record no disk size in v2 (QEMU refuses too). */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Can't resize a v2 image which has snapshots");
        return -ENOTSUP;
    }
    if (offset & 511) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "The new size must be a multiple of 512");
        return -EINVAL;
    }
    if (offset < old) {
        return shrink(s, offset, need, error);
    }
    if (offset == old) {
        return 0;
    }
    if (need * 8 > STRATA_QCOW2_MAX_L1_BYTES) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "The image size is too large for this cluster size");
        return -EFBIG;
    }

    strata_co_mutex_lock(&s->lock);
    ret = strata_qcow2_co_grow_l1(s, need);
    if (ret == 0) {
        /* Everything the new size needs is on disk before the header
         * announces it. */
        ret = strata_qcow2_cache_co_flush(s->l2_cache);
    }
    if (ret == 0) {
        ret = strata_qcow2_cache_co_flush(s->refcount_cache);
    }
    if (ret == 0) {
        ret = set_size(s, offset, need);
    }
    strata_co_mutex_unlock(&s->lock);
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not resize qcow2 image: %s", g_strerror(-ret));
        return ret;
    }

    /* Backing data beyond the old end must not appear in the new
     * space. */
    if (b && b->total_bytes > 0 && (uint64_t)b->total_bytes > old) {
        uint64_t zend = MIN(offset, (uint64_t)b->total_bytes);
        node->total_bytes = (int64_t)offset;
        ret = qcow2_co_pwrite_zeroes(node, old, zend - old, 0);
        if (ret == -ENOTSUP) {
            ret = write_zero_data(s, old, zend - old);
        }
        if (ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not zero the grown area: %s",
                        g_strerror(-ret));
            return ret;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Reopen                                                              */
/* ------------------------------------------------------------------ */

typedef struct ReopenCo {
    StrataQcow2State *s;
    bool to_read_only;
    GError *error;
    bool ok;
} ReopenCo;

/*
 * Going read-only: everything cached reaches the file and the image is
 * marked clean, since nothing will write the metadata any more.  Going
 * read-write: the header is read again and must still be the one the
 * node works with and carry no feature it cannot write.
 */
static void reopen_co(void *opaque)
{
    ReopenCo *r = opaque;
    StrataQcow2State *s = r->s;
    int ret;

    if (r->to_read_only) {
        ret = strata_node_co_flush(s->node);
        if (ret == 0 &&
            (s->hdr.incompatible_features & STRATA_QCOW2_INCOMPAT_DIRTY)) {
            uint8_t be[8];
            uint64_t features = s->hdr.incompatible_features &
                                ~(uint64_t)STRATA_QCOW2_INCOMPAT_DIRTY;
            strata_qcow2_put_be64(be, features);
            ret = strata_qcow2_co_write_header_bytes(
                s, STRATA_QCOW2_HDR_INCOMPAT, be, sizeof(be));
            if (ret == 0) {
                ret = strata_node_co_flush(file_of(s));
            }
            if (ret == 0) {
                s->hdr.incompatible_features = features;
            }
        }
        if (ret < 0) {
            g_set_error(&r->error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not flush qcow2 image '%s': %s",
                        s->node->node_name, g_strerror(-ret));
            return;
        }
    } else {
        StrataQcow2Header h;
        g_autofree uint8_t *buf = NULL;
        int64_t flen = strata_node_co_refresh_length(file_of(s));
        size_t len;

        if (flen < 0) {
            g_set_error(&r->error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not get the size of the qcow2 file: %s",
                        g_strerror((int)-flen));
            return;
        }
        ret = read_header_cluster(file_of(s), flen, &buf, &len);
        if (ret < 0) {
            g_set_error(&r->error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not read qcow2 header: %s", g_strerror(-ret));
            return;
        }
        strata_qcow2_header_init(&h);
        if (strata_qcow2_header_parse(&h, buf, len, &r->error) &&
            strata_qcow2_header_check_features(&h, true, &r->error)) {
            if (h.l1_table_offset != s->hdr.l1_table_offset ||
                h.l1_size != s->hdr.l1_size ||
                h.refcount_table_offset != s->hdr.refcount_table_offset ||
                h.cluster_bits != s->hdr.cluster_bits ||
                h.size != s->hdr.size ||
                h.snapshots_offset != s->hdr.snapshots_offset) {
                g_set_error(&r->error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                            "The qcow2 header of '%s' changed while the "
                            "node was read-only", s->node->node_name);
            } else if (h.incompatible_features &
                       STRATA_QCOW2_INCOMPAT_DIRTY) {
                g_set_error(&r->error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                            "Image '%s' is marked dirty; it must be "
                            "repaired before it is written",
                            s->node->node_name);
            }
        }
        strata_qcow2_header_cleanup(&h);
        if (r->error) {
            return;
        }
    }
    r->ok = true;
}

static bool qcow2_reopen_prepare(StrataReopenState *rs, GError **error)
{
    static const char *const mutable_opts[] = {
        "pass-discard-request", NULL,
    };
    StrataQcow2State *s = rs->node->opaque;
    ReopenCo r = { .s = s };

    if (!strata_reopen_check_options(rs, mutable_opts, error)) {
        return false;
    }
    if (rs->read_only == !s->writable) {
        return true;
    }
    r.to_read_only = rs->read_only;
    strata_loop_run_co(rs->node->ctx->loop, reopen_co, &r);
    if (!r.ok) {
        g_propagate_error(error, r.error);
        return false;
    }
    return true;
}

static void qcow2_reopen_commit(StrataReopenState *rs)
{
    StrataQcow2State *s = rs->node->opaque;

    s->writable = !rs->read_only;
    s->pass_discard_request =
        strata_opts_get_bool(rs->options, "pass-discard-request", false);
}

/* ------------------------------------------------------------------ */
/* Permissions, query                                                  */
/* ------------------------------------------------------------------ */

static void qcow2_child_perm(StrataNode *node, StrataChild *child,
                             StrataChildRole role, uint64_t parent_perm,
                             uint64_t parent_shared, uint64_t *nperm,
                             uint64_t *nshared)
{
    if (role != STRATA_CHILD_FILE) {
        strata_default_child_perm(node, child, role, parent_perm,
                                  parent_shared, nperm, nshared);
        return;
    }
    /* The metadata is ours: we read the file always, and write and
     * resize it whenever the node is writable, even without a writer
     * above; others must not change it under us then. */
    *nperm = STRATA_PERM_CONSISTENT_READ;
    *nshared = (parent_shared | STRATA_PERM_WRITE_UNCHANGED) &
               ~STRATA_PERM_GRAPH_MOD;
    if (!node->read_only) {
        *nperm |= STRATA_PERM_WRITE | STRATA_PERM_RESIZE;
        *nshared &= ~(STRATA_PERM_WRITE | STRATA_PERM_RESIZE);
    }
}

/* The header keeps the backing string and format; rewriting it is one
 * header write (the extensions are kept). */
static int qcow2_co_change_backing_file(StrataNode *node,
                                        const char *backing,
                                        const char *fmt, GError **error)
{
    StrataQcow2State *s = node->opaque;
    char *old_file = s->hdr.backing_file;
    char *old_fmt = s->hdr.backing_format;
    int ret;

    s->hdr.backing_file = backing ? g_strdup(backing) : NULL;
    s->hdr.backing_format = backing && fmt && *fmt ? g_strdup(fmt) : NULL;
    ret = strata_qcow2_co_rewrite_header(s, error);
    if (ret < 0) {
        g_free(s->hdr.backing_file);
        g_free(s->hdr.backing_format);
        s->hdr.backing_file = old_file;
        s->hdr.backing_format = old_fmt;
        return ret;
    }
    g_free(old_file);
    g_free(old_fmt);
    return 0;
}

static JsonObject *cache_stats(const StrataQcow2Cache *c)
{
    JsonObject *o = json_object_new();
    StrataQcow2CacheStats st;

    strata_qcow2_cache_get_stats(c, &st);
    json_object_set_int_member(o, "hits", (gint64)st.hits);
    json_object_set_int_member(o, "misses", (gint64)st.misses);
    json_object_set_int_member(o, "entries", st.entries);
    json_object_set_int_member(o, "max-entries", st.max_entries);
    json_object_set_int_member(o, "bytes", (gint64)st.bytes);
    return o;
}

static void qcow2_query_stats(StrataNode *node, JsonObject *stats)
{
    StrataQcow2State *s = node->opaque;
    StrataQcow2LayerMapStats lm;
    JsonObject *m = json_object_new();

    json_object_set_object_member(stats, "l2-cache",
                                  cache_stats(s->l2_cache));
    json_object_set_object_member(stats, "refcount-cache",
                                  cache_stats(s->refcount_cache));
    strata_qcow2_layermap_get_stats(s, &lm);
    json_object_set_int_member(m, "lookups", (gint64)lm.lookups);
    json_object_set_int_member(m, "composed", (gint64)lm.composed);
    json_object_set_int_member(m, "walked", (gint64)lm.walked);
    json_object_set_int_member(m, "resets", (gint64)lm.resets);
    json_object_set_int_member(m, "layers", lm.layers);
    json_object_set_int_member(m, "regions", lm.regions_built);
    json_object_set_object_member(stats, "layer-map", m);
}

static void qcow2_query_image(StrataNode *node, JsonObject *image)
{
    StrataQcow2State *s = node->opaque;
    JsonObject *fs = json_object_new();
    JsonObject *data = json_object_new();
    const StrataQcow2Header *h = &s->hdr;

    json_object_set_int_member(image, "cluster-size",
                               (gint64)s->cluster_size);
    strata_node_set_actual_size(node, image);
    json_object_set_boolean_member(image, "dirty-flag",
                                   !!(h->incompatible_features &
                                      STRATA_QCOW2_INCOMPAT_DIRTY));
    if (h->backing_file) {
        g_autofree char *full =
            backing_path(file_of(s)->filename, h->backing_file, NULL);
        json_object_set_string_member(image, "backing-filename",
                                      h->backing_file);
        if (full) {
            json_object_set_string_member(image, "full-backing-filename",
                                          full);
        }
        if (h->backing_format) {
            json_object_set_string_member(image, "backing-filename-format",
                                          h->backing_format);
        }
    }
    json_object_set_string_member(data, "compat",
                                  h->version == 2 ? "0.10" : "1.1");
    if (h->version >= 3) {
        json_object_set_string_member(data, "compression-type",
                                      h->compression_type ? "zstd"
                                                          : "zlib");
        json_object_set_boolean_member(data, "lazy-refcounts",
                                       !!(h->compatible_features &
                                          STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS));
        json_object_set_boolean_member(data, "corrupt", s->corrupt);
        json_object_set_boolean_member(data, "extended-l2", s->extended_l2);
    } else {
        json_object_set_string_member(data, "compression-type", "zlib");
    }
    json_object_set_int_member(data, "refcount-bits",
                               1 << s->refcount_order);
    json_object_set_string_member(fs, "type", "qcow2");
    json_object_set_object_member(fs, "data", data);
    json_object_set_object_member(image, "format-specific", fs);
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */
/* ------------------------------------------------------------------ */

static const char *const overlap_values[] = {
    "none", "constant", "cached", "all", NULL,
};

static const StrataOptDesc qcow2_options[] = {
    { "file", STRATA_OPT_CHILD, true, NULL },
    { "backing", STRATA_OPT_CHILD_OR_NULL, false, NULL },
    { "lazy-refcounts", STRATA_OPT_BOOL, false, NULL },
    { "pass-discard-request", STRATA_OPT_BOOL, false, NULL },
    { "pass-discard-snapshot", STRATA_OPT_BOOL, false, NULL },
    { "pass-discard-other", STRATA_OPT_BOOL, false, NULL },
    /* A level name or an object of per-structure booleans. */
    { "overlap-check", STRATA_OPT_ANY, false, overlap_values },
    { "cache-size", STRATA_OPT_SIZE, false, NULL },
    { "l2-cache-size", STRATA_OPT_SIZE, false, NULL },
    { "l2-cache-entry-size", STRATA_OPT_SIZE, false, NULL },
    { "refcount-cache-size", STRATA_OPT_SIZE, false, NULL },
    { "cache-clean-interval", STRATA_OPT_INT, false, NULL },
    { NULL },
};

const StrataDriver strata_driver_qcow2 = {
    .name = "qcow2",
    .state_size = sizeof(StrataQcow2State),
    .is_format = true,
    .options = qcow2_options,
    .open = qcow2_open,
    .close = qcow2_close,
    .co_get_length = qcow2_co_get_length,
    .co_preadv = qcow2_co_preadv,
    .co_pwritev = qcow2_co_pwritev,
    .co_copy_range_to = qcow2_co_copy_range_to,
    .co_pwrite_zeroes = qcow2_co_pwrite_zeroes,
    .co_pdiscard = qcow2_co_pdiscard,
    .co_flush = qcow2_co_flush,
    .co_block_status = qcow2_co_block_status,
    .co_truncate = qcow2_co_truncate,
    .child_perm = qcow2_child_perm,
    .co_change_backing_file = qcow2_co_change_backing_file,
    .reopen_prepare = qcow2_reopen_prepare,
    .reopen_commit = qcow2_reopen_commit,
    .query_image = qcow2_query_image,
    .query_stats = qcow2_query_stats,
};
