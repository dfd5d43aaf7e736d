/* strata — block-commit of intermediate layers: copy what the layers
 * top..(above base) hold down into base, then make base the backing of
 * the overlay above top and drop the committed layers.
 *
 * Nobody writes to the layers being committed (the guest writes above
 * them), and what the job writes into base lies under data those layers
 * hold, so guest reads see the same bytes throughout: no serialisation
 * is needed.  Active commit (top = the active layer) is a mirror:
 * mirror.c.
 */
#include <errno.h>
#include <string.h>

#include "job-private.h"
#include "mirror-private.h"
#include "driver.h"

/* QEMU's chunk (a range that fails is one BLOCK_JOB_ERROR, as in QEMU),
 * and buffer space for six (3 MiB), shared by up to 16 smaller copies,
 * where QEMU copies one chunk at a time: with the file preallocated
 * ahead of the writes, reads and writes then overlap. */
#define COMMIT_CHUNK (512 * 1024)
#define COMMIT_IN_FLIGHT 6

typedef struct CommitJob {
    StrataJob common;
    StrataNode *top;
    StrataNode *base;
    char *backing_file;
    /* Made writable for the job, read-only again when it ends (QEMU). */
    GPtrArray *made_writable;
} CommitJob;

static int commit_co_classify(StrataJob *job, uint64_t offset,
                              uint64_t bytes, uint64_t *pnum, bool *copy)
{
    CommitJob *c = (CommitJob *)job;
    int ret;

    ret = strata_node_co_block_status_above(c->top, c->base, false, offset,
                                            bytes, pnum, NULL, NULL, NULL);
    if (ret < 0) {
        return ret;
    }
    *copy = (ret & STRATA_BLOCK_ALLOCATED) != 0;
    return 0;
}

static int commit_co_copy(StrataJob *job, uint64_t offset, uint64_t bytes,
                          void *buf, bool *is_read)
{
    CommitJob *c = (CommitJob *)job;
    uint64_t step = strata_job_copy_step(c->base, bytes);
    int ret = 0;

    /* As stream_co_copy: small steps into a base in the page cache. */
    for (uint64_t done = 0; done < bytes && ret == 0; done += step) {
        uint64_t n = MIN(step, bytes - done);

        *is_read = true;
        ret = strata_node_co_pread(c->top, offset + done, n, buf, 0);
        if (ret == 0) {
            *is_read = false;
            ret = strata_node_co_pwrite(c->base, offset + done, n, buf, 0);
        }
    }
    return ret;
}

/* What the copies read: the layers from the top down to the base. */
static void commit_prefetch_chain(StrataJob *job, StrataNode **top,
                                  StrataNode **base, int *min_depth)
{
    CommitJob *c = (CommitJob *)job;

    *top = c->top;
    *base = c->base;
    *min_depth = 0;
}

/* A commit copies a layer's extents, often one cluster each, so it is
 * bound by latency: 32 copies in flight take a quarter off its time
 * (1 GiB chain, cache.direct) and keep peak RSS below QSD's. */
static const StrataJobCopyOps commit_copy_ops = {
    .co_classify = commit_co_classify,
    .co_copy = commit_co_copy,
    .max_tasks = 32,
    .prefetch_chain = commit_prefetch_chain,
};

static int commit_co_run(StrataJob *job, GError **error)
{
    CommitJob *c = (CommitJob *)job;
    int64_t len, base_len;
    int ret;

    len = strata_node_co_refresh_length(c->top);
    base_len = strata_node_co_refresh_length(c->base);
    if (len < 0 || base_len < 0) {
        ret = (int)(len < 0 ? len : base_len);
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                    g_strerror(-ret));
        return ret;
    }
    if (base_len < len) {
        ret = strata_node_co_truncate(c->base, len, false, error);
        if (ret < 0) {
            return ret;
        }
    }
    ret = strata_job_co_copy_loop(job, &commit_copy_ops, len, COMMIT_CHUNK,
                                  COMMIT_IN_FLIGHT);
    if (ret == 0) {
        /* The overlay's header will name the base: its data first. */
        ret = strata_node_co_flush(c->base);
    }
    return ret;
}

/* The edges that make @top somebody's backing file. */
static GPtrArray *overlay_edges(StrataNode *top)
{
    GPtrArray *out = g_ptr_array_new();

    for (GList *l = top->parents; l; l = l->next) {
        StrataChild *e = l->data;
        if (e->parent_kind == STRATA_PARENT_NODE &&
            e->role == STRATA_CHILD_BACKING) {
            g_ptr_array_add(out, e);
        }
    }
    return out;
}

static bool commit_prepare(StrataJob *job, GError **error)
{
    CommitJob *c = (CommitJob *)job;
    /* The overlays reach top through the job's filter. */
    g_autoptr(GPtrArray) edges = overlay_edges(job->filter ? job->filter
                                                           : c->top);
    bool ok = true;

    strata_node_ref(c->top);
    strata_node_drained_begin(c->base);
    for (guint i = 0; i < edges->len && ok; i++) {
        StrataChild *e = edges->pdata[i];
        StrataNode *overlay = e->parent;

        strata_node_drained_begin(overlay);
        if (!strata_node_record_backing(overlay, c->base, c->backing_file,
                                        error) ||
            !strata_child_replace_node(e, c->base, error)) {
            ok = false;
        }
        strata_node_drained_end(overlay);
    }
    strata_node_drained_end(c->base);
    strata_node_unref(c->top);
    return ok;
}

static void commit_clean(StrataJob *job)
{
    CommitJob *c = (CommitJob *)job;

    strata_job_restore_read_only(c->made_writable);
}

static void commit_free(StrataJob *job)
{
    CommitJob *c = (CommitJob *)job;

    g_free(c->backing_file);
    if (c->made_writable) {
        g_ptr_array_unref(c->made_writable);
    }
}

static const StrataJobDriver commit_driver = {
    .type = "commit",
    .instance_size = sizeof(CommitJob),
    .is_block_job = true,
    .co_run = commit_co_run,
    .prepare = commit_prepare,
    .clean = commit_clean,
    .free = commit_free,
};

/* Refuses a base that somebody outside top..base reads: what the job
 * writes into it would change what that reader sees. */
static bool check_base_users(StrataNode *top, StrataNode *base,
                             GError **error)
{
    for (GList *l = base->parents; l; l = l->next) {
        StrataChild *e = l->data;
        bool inside = false;

        if (e->parent_kind == STRATA_PARENT_NODE) {
            StrataNode *p = e->parent;
            for (StrataNode *n = top; n && n != base;
                 n = strata_node_backing(n)) {
                /* The chain's own edges, and a format's file edge. */
                inside = inside || n == p;
            }
        }
        if (!inside) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                        "Cannot commit into '%s': %s uses it as '%s' and "
                        "would see its content change",
                        base->node_name, e->parent_desc, e->name);
            return false;
        }
    }
    return true;
}

bool strata_commit_start(StrataContext *ctx, JsonObject *args,
                         GError **error)
{
    const char *job_id = strata_job_arg_str(args, "job-id");
    const char *device = strata_job_arg_str(args, "device");
    const char *top_node = strata_job_arg_str(args, "top-node");
    const char *top_name = strata_job_arg_str(args, "top");
    const char *base_node = strata_job_arg_str(args, "base-node");
    const char *base_name = strata_job_arg_str(args, "base");
    const char *backing_file = strata_job_arg_str(args, "backing-file");
    const char *filter_name = strata_job_arg_str(args, "filter-node-name");
    StrataOnError on_error;
    StrataNode *bs, *top, *base;
    GPtrArray *made;
    CommitJob *c;
    StrataJob *job;

    if (!strata_job_parse_on_error(args, "on-error", &on_error, error)) {
        return false;
    }
    /* The device lookup comes first: libvirt probes with it. */
    bs = device ? strata_context_lookup(ctx, device) : NULL;
    if (!bs) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_DEVICE_NOT_FOUND,
                    "Device '%s' not found", device ? device : "");
        return false;
    }
    if (!strata_job_busy_check(ctx, bs, error)) {
        return false;
    }
    top = bs;
    if (top_node && top_name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'top-node' and 'top' are mutually exclusive");
        return false;
    } else if (top_node) {
        top = strata_context_lookup(ctx, top_node);
        if (!top) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'",
                        top_node);
            return false;
        }
        if (!strata_node_chain_contains(bs, top, true)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "'%s' is not in this backing file chain", top_node);
            return false;
        }
    } else if (top_name) {
        const char *fn = strata_node_skip_filters(bs)->file
            ? strata_node_skip_filters(bs)->file->node->filename : NULL;
        if (!fn || strcmp(fn, top_name) != 0) {
            top = strata_node_find_backing_image(bs, top_name);
        }
        if (!top) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Top image file %s not found", top_name);
            return false;
        }
    }
    if (base_node && base_name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'base-node' and 'base' are mutually exclusive");
        return false;
    } else if (base_node) {
        base = strata_context_lookup(ctx, base_node);
        if (!base) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'",
                        base_node);
            return false;
        }
        if (!strata_node_chain_contains(top, base, true)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "'%s' is not in this backing file chain",
                        base_node);
            return false;
        }
    } else if (base_name) {
        base = strata_node_find_backing_image(top, base_name);
        if (!base) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Can't find '%s' in the backing chain", base_name);
            return false;
        }
    } else {
        base = top;
        while (strata_node_backing(base)) {
            base = strata_node_backing(base);
        }
    }
    for (StrataNode *n = top; n && n != base; n = strata_node_backing(n)) {
        if (!strata_job_busy_check(ctx, n, error)) {
            return false;
        }
    }
    if (top == base) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "cannot commit an image into itself");
        return false;
    }
    if (top == bs) {
        if (backing_file) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "'backing-file' specified, but 'top' is the active "
                        "layer");
            return false;
        }
        /* Guests write to the active layer while it is committed: a
         * mirror of it into base (mirror.c). */
        if (!strata_job_busy_check(ctx, base, error)) {
            return false;
        }
        if (!strata_job_check_filter_name(ctx, filter_name, error)) {
            return false;
        }
        return strata_active_commit_start(ctx, args, top, base, on_error,
                                          error);
    }
    if (!strata_job_busy_check(ctx, base, error)) {
        return false;
    }
    if (!strata_job_check_filter_name(ctx, filter_name, error)) {
        return false;
    }
    if (!check_base_users(top, base, error)) {
        return false;
    }
    /* The base is written, and the overlays of top get a new backing
     * string: both must be writable while the job runs. */
    made = strata_job_writable_list_new();
    {
        g_autoptr(GPtrArray) edges = overlay_edges(top);
        bool ok = strata_job_make_writable(made, base, error);
        for (guint i = 0; ok && i < edges->len; i++) {
            ok = strata_job_make_writable(
                made, ((StrataChild *)edges->pdata[i])->parent, error);
        }
        if (!ok) {
            strata_job_restore_read_only(made);
            g_ptr_array_unref(made);
            return false;
        }
    }

    job = strata_job_new(
        ctx, &commit_driver, job_id ? job_id : "",
        json_object_get_int_member_with_default(args, "speed", 0), on_error,
        json_object_get_boolean_member_with_default(args, "auto-finalize",
                                                    true),
        json_object_get_boolean_member_with_default(args, "auto-dismiss",
                                                    true),
        error);
    if (!job) {
        strata_job_restore_read_only(made);
        g_ptr_array_unref(made);
        return false;
    }
    c = (CommitJob *)job;
    c->top = top;
    c->base = base;
    c->backing_file = g_strdup(backing_file);
    c->made_writable = made;
    for (StrataNode *n = top; n; n = strata_node_backing(n)) {
        strata_job_add_node(job, n);
        if (n == base) {
            break;
        }
    }
    if (!strata_job_insert_filter(job, "commit_top", top, filter_name, true,
                                  error)) {
        commit_clean(job);
        strata_job_early_fail(job);
        return false;
    }
    strata_job_start(job);
    return true;
}
