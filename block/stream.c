/* strata — block-stream: copy what lies above the base into the top,
 * then make the base the top's backing file.
 *
 * The copy is a copy-on-read done by the job (strata_cor_co_copy): for
 * each range the top does not hold yet, a serialising request on the
 * top covers the read from the backing chain and the write into the
 * top, so a guest write to the same range either lands first (the job
 * then sees the range allocated and skips it) or waits until the job's
 * write is done (and then overwrites it).  The copy-on-read filter above
 * the top does the same for what the guest reads meanwhile, so the job
 * finds those ranges done.
 */
#include <errno.h>
#include <string.h>

#include "job-private.h"
#include "driver.h"

/* QEMU's chunk (a range that fails is one BLOCK_JOB_ERROR, as in QEMU),
 * and buffer space for six (3 MiB), shared by up to 32 smaller copies,
 * where QEMU copies one chunk at a time: with the file preallocated
 * ahead of the writes, reads and writes then overlap.  A whole-chain
 * stream is bounded by the buffer space, a stream with a base (the
 * overlays' 64 KiB clusters) by the number of copies; more space would
 * put the peak RSS above QSD's (docs/performance.md). */
#define STREAM_CHUNK (512 * 1024)
#define STREAM_IN_FLIGHT 6

typedef struct StreamJob {
    StrataJob common;
    StrataNode *top;
    StrataNode *base;        /* nullable: stream the whole chain */
    char *backing_file;      /* what to write; NULL: derived from base */
    bool backing_file_given;
    /* The top, when it was read-only (an intermediate layer): reopened
     * read-write for the job and read-only again when it ends. */
    GPtrArray *made_writable;
} StreamJob;

static int stream_co_classify(StrataJob *job, uint64_t offset,
                              uint64_t bytes, uint64_t *pnum, bool *copy)
{
    StreamJob *s = (StreamJob *)job;
    int depth = 0;
    int ret;

    ret = strata_node_co_block_status_above(s->top, s->base, false, offset,
                                            bytes, pnum, NULL, NULL,
                                            &depth);
    if (ret < 0) {
        return ret;
    }
    /* Copy what a layer between the top and the base holds; what the
     * top holds already, or nothing above the base holds, stays. */
    *copy = (ret & STRATA_BLOCK_ALLOCATED) && depth > 0;
    return 0;
}

/* The ranges were classified already: whatever the top still lacks in
 * them is copied (a guest write may have filled part meanwhile), in
 * steps of STRATA_JOB_BUFFERED_CHUNK through the start of @buf when the
 * top is in the page cache.  The chunk stays QEMU's 512 KiB: it is what
 * a failure and its BLOCK_JOB_ERROR cover. */
static int stream_co_copy(StrataJob *job, uint64_t offset, uint64_t bytes,
                          void *buf, bool *is_read)
{
    StrataNode *top = ((StreamJob *)job)->top;
    uint64_t step = strata_job_copy_step(top, bytes);
    int ret = 0;

    for (uint64_t done = 0; done < bytes && ret == 0; done += step) {
        ret = strata_cor_co_copy(top, NULL, offset + done,
                                 MIN(step, bytes - done), buf, false,
                                 is_read);
    }
    return ret;
}

/* What the copies read: the layers between the top and the base. */
static void stream_prefetch_chain(StrataJob *job, StrataNode **top,
                                  StrataNode **base, int *min_depth)
{
    StreamJob *s = (StreamJob *)job;

    *top = s->top;
    *base = s->base;
    *min_depth = 1;
}

static const StrataJobCopyOps stream_copy_ops = {
    .co_classify = stream_co_classify,
    .co_copy = stream_co_copy,
    .max_tasks = 32,
    .prefetch_chain = stream_prefetch_chain,
};

static int stream_co_run(StrataJob *job, GError **error)
{
    StreamJob *s = (StreamJob *)job;
    int64_t len;
    int ret;

    if (strata_node_backing(s->top) == s->base) {
        /* Nothing lies between the top and the base. */
        return 0;
    }
    len = strata_node_co_refresh_length(s->top);
    if (len < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                    g_strerror((int)-len));
        return (int)len;
    }
    ret = strata_job_co_copy_loop(job, &stream_copy_ops, len, STREAM_CHUNK,
                                  STREAM_IN_FLIGHT);
    if (ret == 0) {
        /* The header will name another backing file: what the top now
         * holds must be stable first. */
        ret = strata_node_co_flush(s->top);
    }
    return ret;
}

static bool stream_prepare(StrataJob *job, GError **error)
{
    StreamJob *s = (StreamJob *)job;
    StrataNode *top = s->top;
    bool ok = true;

    if (!top->backing) {
        return true;
    }
    strata_node_drained_begin(top);
    if (!strata_node_record_backing(top, s->base, s->backing_file, error)) {
        ok = false;
    } else if (s->base) {
        if (!strata_child_replace_node(top->backing, s->base, error)) {
            ok = false;
        }
    } else {
        strata_child_detach(top->backing);
    }
    strata_node_drained_end(top);
    return ok;
}

static void stream_free(StrataJob *job)
{
    StreamJob *s = (StreamJob *)job;

    g_free(s->backing_file);
    if (s->made_writable) {
        g_ptr_array_unref(s->made_writable);
    }
}

static void stream_clean(StrataJob *job)
{
    strata_job_restore_read_only(((StreamJob *)job)->made_writable);
}

static const StrataJobDriver stream_driver = {
    .type = "stream",
    .instance_size = sizeof(StreamJob),
    .is_block_job = true,
    .co_run = stream_co_run,
    .prepare = stream_prepare,
    .clean = stream_clean,
    .free = stream_free,
};

bool strata_stream_start(StrataContext *ctx, JsonObject *args,
                         GError **error)
{
    const char *device = strata_job_arg_str(args, "device");
    const char *base_name = strata_job_arg_str(args, "base");
    const char *base_node = strata_job_arg_str(args, "base-node");
    const char *bottom_name = strata_job_arg_str(args, "bottom");
    const char *backing_file = strata_job_arg_str(args, "backing-file");
    const char *filter_name = strata_job_arg_str(args, "filter-node-name");
    const char *job_id = strata_job_arg_str(args, "job-id");
    StrataOnError on_error;
    StrataNode *top, *base = NULL, *lowest = NULL;
    StreamJob *s;
    StrataJob *job;

    if (base_name && base_node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'base' and 'base-node' cannot be specified at the "
                    "same time");
        return false;
    }
    if (base_name && bottom_name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'base' and 'bottom' cannot be specified at the same "
                    "time");
        return false;
    }
    if (bottom_name && base_node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'bottom' and 'base-node' cannot be specified at the "
                    "same time");
        return false;
    }
    if (!strata_job_parse_on_error(args, "on-error", &on_error, error)) {
        return false;
    }
    top = device ? strata_context_lookup(ctx, device) : NULL;
    if (!top) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='%s' nor node-name='%s'",
                    device ? device : "", device ? device : "");
        return false;
    }
    if (base_name) {
        base = strata_node_find_backing_image(top, base_name);
        if (!base) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Can't find '%s' in the backing chain", base_name);
            return false;
        }
    }
    if (base_node) {
        base = strata_context_lookup(ctx, base_node);
        if (!base) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'",
                        base_node);
            return false;
        }
        if (base == top || !strata_node_chain_contains(top, base, false)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Node '%s' is not a backing image of '%s'",
                        base_node, device);
            return false;
        }
    }
    if (bottom_name) {
        StrataNode *bottom = strata_context_lookup(ctx, bottom_name);
        if (!bottom) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'",
                        bottom_name);
            return false;
        }
        if (bottom->drv->is_filter) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Node '%s' is a filter, use a non-filter node as "
                        "'bottom'", bottom_name);
            return false;
        }
        if (bottom != top &&
            !strata_node_chain_contains(top, bottom, false)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Node '%s' is not in a chain starting from '%s'",
                        bottom_name, device);
            return false;
        }
        base = strata_node_backing(bottom);
    }
    for (StrataNode *n = top; n && n != base; n = strata_node_backing(n)) {
        if (!strata_job_busy_check(ctx, n, error)) {
            return false;
        }
    }
    if (!base && backing_file) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "backing file specified, but streaming the entire "
                    "chain");
        return false;
    }
    if (!strata_job_check_filter_name(ctx, filter_name, error)) {
        return false;
    }
    job = strata_job_new(
        ctx, &stream_driver, job_id ? job_id : "",
        json_object_get_int_member_with_default(args, "speed", 0), on_error,
        json_object_get_boolean_member_with_default(args, "auto-finalize",
                                                    true),
        json_object_get_boolean_member_with_default(args, "auto-dismiss",
                                                    true),
        error);
    if (!job) {
        return false;
    }
    s = (StreamJob *)job;
    s->top = top;
    s->base = base;
    s->backing_file = g_strdup(backing_file);
    /* The lowest layer streamed: the filter's "bottom" when there is a
     * base. */
    for (StrataNode *n = top; n && n != base; n = strata_node_backing(n)) {
        strata_job_add_node(job, n);
        lowest = n;
    }
    /* Streaming into an intermediate (read-only) layer: it is written
     * for the job's time only. */
    s->made_writable = strata_job_writable_list_new();
    if (!strata_job_make_writable(s->made_writable, top, error)) {
        strata_job_early_fail(job);
        return false;
    }
    if (!strata_job_insert_filter(job, "copy-on-read", top, filter_name,
                                  false, error)) {
        stream_clean(job);
        strata_job_early_fail(job);
        return false;
    }
    /* Guest reads through the filter copy what the stream would, and
     * nothing from the base or below, as QEMU's "bottom". */
    if (base) {
        strata_cor_filter_set_bottom(job->filter, lowest);
    }
    strata_job_start(job);
    return true;
}
