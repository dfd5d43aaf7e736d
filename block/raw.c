/* strata — raw: the image is the bytes of its file child, optionally a
 * window [offset, offset + size) of it. */
#include <errno.h>
#include <string.h>

#include "drivers-private.h"

typedef struct RawState {
    uint64_t offset;
    uint64_t size;
    bool has_size;
} RawState;

static const StrataOptDesc raw_options[] = {
    { "file", STRATA_OPT_CHILD, true, NULL },
    { "offset", STRATA_OPT_SIZE, false, NULL },
    { "size", STRATA_OPT_SIZE, false, NULL },
    { NULL, 0, false, NULL },
};

/* Reads offset and size into @out, checked against the file child. */
static bool raw_read_options(StrataNode *node, JsonObject *options,
                             RawState *out, GError **error)
{
    RawState *s = out;
    int64_t file_len;

    s->offset = strata_opts_get_size(options, "offset", 0);
    s->has_size = strata_opts_has(options, "size");
    s->size = strata_opts_get_size(options, "size", 0);

    if (s->has_size && s->offset > (uint64_t)INT64_MAX - s->size) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Offset %" G_GUINT64_FORMAT " and size %"
                    G_GUINT64_FORMAT " must not exceed INT64_MAX",
                    s->offset, s->size);
        return false;
    }
    if (s->offset || s->has_size) {
        file_len = strata_node_refresh_length(node->file->node);
        if (file_len < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not get the length of the file: %s",
                        g_strerror((int)-file_len));
            return false;
        }
        if (s->offset > (uint64_t)file_len) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Offset (%" G_GUINT64_FORMAT ") cannot be greater "
                        "than size of the containing file (%" G_GINT64_FORMAT
                        ")", s->offset, file_len);
            return false;
        }
        if (s->has_size && (uint64_t)file_len - s->offset < s->size) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "The sum of offset (%" G_GUINT64_FORMAT ") and size (%"
                        G_GUINT64_FORMAT ") has to be smaller or equal to the "
                        "actual size of the containing file (%"
                        G_GINT64_FORMAT ")", s->offset, s->size, file_len);
            return false;
        }
    }
    return true;
}

static bool raw_open(StrataNode *node, JsonObject *options, GError **error)
{
    if (!node->file) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'file' is missing");
        return false;
    }
    if (!raw_read_options(node, options, node->opaque, error)) {
        return false;
    }
    node->limits = node->file->node->limits;
    return true;
}

/* offset and size may change on a reopen, as QEMU's raw allows. */
static bool raw_reopen_prepare(StrataReopenState *rs, GError **error)
{
    static const char *const mutable_opts[] = { "offset", "size", NULL };
    RawState *next = g_new0(RawState, 1);

    if (!strata_reopen_check_options(rs, mutable_opts, error) ||
        !raw_read_options(rs->node, rs->options, next, error)) {
        g_free(next);
        return false;
    }
    rs->opaque = next;
    return true;
}

static void raw_reopen_commit(StrataReopenState *rs)
{
    RawState *s = rs->node->opaque;

    *s = *(RawState *)rs->opaque;
    g_free(rs->opaque);
    rs->opaque = NULL;
}

static void raw_reopen_abort(StrataReopenState *rs)
{
    g_free(rs->opaque);
    rs->opaque = NULL;
}

static int64_t raw_co_get_length(StrataNode *node)
{
    RawState *s = node->opaque;
    int64_t len;

    if (s->has_size) {
        return (int64_t)s->size;
    }
    len = strata_node_co_refresh_length(node->file->node);
    if (len < 0) {
        return len;
    }
    /* The file may have shrunk under a window opened earlier. */
    return (uint64_t)len > s->offset ? len - (int64_t)s->offset : 0;
}

static int raw_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                         StrataIOVec *qiov, size_t qiov_offset,
                         StrataReqFlags flags)
{
    RawState *s = node->opaque;

    return strata_node_co_preadv(node->file->node, s->offset + offset, bytes,
                                 qiov, qiov_offset, flags);
}

/* Streams only with no offset: the sink takes the child's offsets. */
static int raw_co_read_stream(StrataNode *node, uint64_t offset,
                              uint64_t bytes, StrataReadSink sink,
                              void *opaque, StrataStreamFlags flags)
{
    RawState *s = node->opaque;

    if (s->offset) {
        return -ENOTSUP;
    }
    return strata_node_co_read_stream(node->file->node, offset, bytes, sink,
                                      opaque, flags);
}

/* A request reaching past a fixed size would leak into bytes beyond the
 * window; io.c keeps requests inside the length, this is a second net. */
static bool raw_out_of_window(RawState *s, uint64_t offset, uint64_t bytes)
{
    return s->has_size && (offset > s->size || bytes > s->size - offset);
}

/* The bytes lie in the child as they are, @s->offset further on. */
static int raw_direct_write_target(StrataNode *node, uint64_t offset,
                                   uint64_t bytes, StrataDirectWrite *dw)
{
    RawState *s = node->opaque;

    if (raw_out_of_window(s, offset, bytes)) {
        return -ENOTSUP;
    }
    return strata_node_direct_write_target(node->file->node,
                                           s->offset + offset, bytes, dw);
}

static int raw_co_pwritev(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    RawState *s = node->opaque;

    if (raw_out_of_window(s, offset, bytes)) {
        return -ENOSPC;
    }
    return strata_node_co_pwritev(node->file->node, s->offset + offset,
                                  bytes, qiov, qiov_offset, flags);
}

static int raw_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                uint64_t bytes, StrataReqFlags flags)
{
    RawState *s = node->opaque;

    if (raw_out_of_window(s, offset, bytes)) {
        return -ENOSPC;
    }
    return strata_node_co_pwrite_zeroes(node->file->node, s->offset + offset,
                                        bytes, flags);
}

static int raw_co_copy_range_to(StrataNode *node, uint64_t offset,
                                uint64_t bytes, StrataNode *src,
                                uint64_t src_offset)
{
    RawState *s = node->opaque;

    if (raw_out_of_window(s, offset, bytes)) {
        return -ENOSPC;
    }
    return strata_node_co_copy_range_to(node->file->node, s->offset + offset,
                                        bytes, src, src_offset);
}

static int raw_co_pdiscard(StrataNode *node, uint64_t offset, uint64_t bytes)
{
    RawState *s = node->opaque;

    if (raw_out_of_window(s, offset, bytes)) {
        return -ENOSPC;
    }
    return strata_node_co_pdiscard(node->file->node, s->offset + offset,
                                   bytes);
}

/*
 * The file's own status is the image's: ask it directly (QEMU's
 * BDRV_BLOCK_RAW) so holes read as zero and unallocated, data as data,
 * with map and file pointing into the file node.
 */
static int raw_co_block_status(StrataNode *node, bool want_zero,
                               uint64_t offset, uint64_t bytes,
                               uint64_t *pnum, uint64_t *map,
                               StrataNode **file)
{
    RawState *s = node->opaque;
    int ret;

    ret = strata_node_co_block_status(node->file->node, want_zero,
                                      s->offset + offset, bytes, pnum, map,
                                      file);
    if (ret < 0) {
        return ret;
    }
    if (*pnum == 0) {
        /* The file shrank under the window: nothing there but zeroes. */
        *pnum = bytes;
        return STRATA_BLOCK_ZERO;
    }
    /* The I/O path decides EOF for this node's own range. */
    return ret & ~STRATA_BLOCK_EOF;
}

static int raw_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                           GError **error)
{
    RawState *s = node->opaque;

    if (s->has_size) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Cannot resize fixed-size raw disks");
        return -ENOTSUP;
    }
    if (offset > (uint64_t)INT64_MAX - s->offset) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Disk size too large for the chosen offset");
        return -EINVAL;
    }
    return strata_node_co_truncate(node->file->node, s->offset + offset,
                                   exact, error);
}

static void raw_query_image(StrataNode *node, JsonObject *image)
{
    RawState *s = node->opaque;
    StrataNode *file = node->file ? node->file->node : NULL;
    int64_t len = -1;

    if (s->has_size) {
        len = (int64_t)s->size;
    } else if (file) {
        int64_t file_len = strata_node_get_length(file);

        len = file_len > (int64_t)s->offset ? file_len - (int64_t)s->offset
                                             : 0;
    }
    json_object_set_int_member(image, "virtual-size", MAX(len, 0));
    if (node->filename) {
        json_object_set_string_member(image, "filename", node->filename);
    }
    json_object_set_string_member(image, "format", "raw");
    if (file && file->drv->query_image) {
        strata_node_set_actual_size(file, image);
        json_object_set_boolean_member(image, "dirty-flag", false);
    }
    /* Else QEMU's get_info, which raw forwards to its file, fails (an
     * nbd file): no dirty flag at all. */
}

const StrataDriver strata_driver_raw = {
    .name = "raw",
    .state_size = sizeof(RawState),
    .is_format = true,
    .options = raw_options,
    .open = raw_open,
    .co_get_length = raw_co_get_length,
    .co_preadv = raw_co_preadv,
    .co_read_stream = raw_co_read_stream,
    .direct_write_target = raw_direct_write_target,
    .co_pwritev = raw_co_pwritev,
    /* FUA travels down with the write to the file node. */
    .supports_fua = true,
    .co_pwrite_zeroes = raw_co_pwrite_zeroes,
    .co_copy_range_to = raw_co_copy_range_to,
    .co_pdiscard = raw_co_pdiscard,
    .co_block_status = raw_co_block_status,
    .co_truncate = raw_co_truncate,
    .reopen_prepare = raw_reopen_prepare,
    .reopen_commit = raw_reopen_commit,
    .reopen_abort = raw_reopen_abort,
    .query_image = raw_query_image,
};
