/* strata — null-co: a device of a given size that stores nothing.
 *
 * The benchmark target for the CPU cost of the request path, so a request
 * here allocates nothing and, without latency-ns, never yields.
 */
#include <errno.h>
#include <string.h>

#include "drivers-private.h"

#define NULL_DEFAULT_SIZE (1LL << 30)

typedef struct NullState {
    int64_t length;
    int64_t latency_ns;
    bool read_zeroes;
} NullState;

static const StrataOptDesc null_options[] = {
    /* A size ("1M" from key=value text), checked here: a negative one
     * gets the message QEMU would have given had it not crashed. */
    { "size", STRATA_OPT_INT, false, NULL },
    { "latency-ns", STRATA_OPT_INT, false, NULL },
    { "read-zeroes", STRATA_OPT_BOOL, false, NULL },
    { NULL, 0, false, NULL },
};

/*
 * QEMU names the node "null-co://" unless options that change what the
 * device is were given (size, read-zeroes); then a json: name carries
 * them.  latency-ns only changes timing and is left out, as in QEMU.
 */
static char *null_filename(JsonObject *options, int64_t size)
{
    g_autoptr(JsonObject) strong = NULL;
    g_autofree char *text = NULL;

    if (!strata_opts_has(options, "size") &&
        !strata_opts_has(options, "read-zeroes")) {
        return g_strdup("null-co://");
    }
    strong = json_object_new();
    json_object_set_string_member(strong, "driver", "null-co");
    if (strata_opts_has(options, "read-zeroes")) {
        json_object_set_boolean_member(strong, "read-zeroes",
            strata_opts_get_bool(options, "read-zeroes", false));
    }
    if (strata_opts_has(options, "size")) {
        json_object_set_int_member(strong, "size", size);
    }
    text = strata_opts_to_json_name(strong);
    if (g_str_has_prefix(text, "json:")) {
        return g_steal_pointer(&text);
    }
    return g_strconcat("json:", text, NULL);
}

static bool null_get_size(JsonObject *options, int64_t *size, GError **error)
{
    *size = strata_opts_get_int(options, "size", NULL_DEFAULT_SIZE);
    if (*size < 0) {
        /* QEMU 7.2 aborts here; a clear error serves better. */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'size' expects a non-negative value");
        return false;
    }
    return true;
}

static bool null_open(StrataNode *node, JsonObject *options, GError **error)
{
    NullState *s = node->opaque;

    if (!null_get_size(options, &s->length, error)) {
        return false;
    }
    s->latency_ns = strata_opts_get_int(options, "latency-ns", 0);
    if (s->latency_ns < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "latency-ns is invalid");
        return false;
    }
    s->read_zeroes = strata_opts_get_bool(options, "read-zeroes", false);

    g_free(node->filename);
    node->filename = null_filename(options, s->length);
    node->limits.request_alignment = 1;
    node->limits.buf_align = 1;
    return true;
}

static inline void null_co_delay(StrataNode *node)
{
    NullState *s = node->opaque;

    if (s->latency_ns > 0) {
        strata_loop_co_sleep_ns(node->ctx->loop, s->latency_ns);
    }
}

static int64_t null_co_get_length(StrataNode *node)
{
    NullState *s = node->opaque;

    return s->length;
}

static int null_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    NullState *s = node->opaque;

    /* Without read-zeroes the buffer keeps whatever it held, as QEMU's
     * null-co does: that is what makes it cheap. */
    if (s->read_zeroes) {
        strata_iov_memset(qiov, qiov_offset, 0, bytes);
    }
    null_co_delay(node);
    return 0;
}

static int null_co_pwritev(StrataNode *node, uint64_t offset, uint64_t bytes,
                           StrataIOVec *qiov, size_t qiov_offset,
                           StrataReqFlags flags)
{
    null_co_delay(node);
    return 0;
}

static int null_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataReqFlags flags)
{
    null_co_delay(node);
    return 0;
}

static int null_co_pdiscard(StrataNode *node, uint64_t offset,
                            uint64_t bytes)
{
    null_co_delay(node);
    return 0;
}

static int null_co_flush(StrataNode *node)
{
    null_co_delay(node);
    return 0;
}

/* As QEMU: the whole range maps onto the node itself; zero only when
 * reads really return zeroes.  No DATA flag: nothing is stored. */
static int null_co_block_status(StrataNode *node, bool want_zero,
                                uint64_t offset, uint64_t bytes,
                                uint64_t *pnum, uint64_t *map,
                                StrataNode **file)
{
    NullState *s = node->opaque;
    int ret = STRATA_BLOCK_OFFSET_VALID;

    *pnum = bytes;
    *map = offset;
    *file = node;
    if (s->read_zeroes) {
        ret |= STRATA_BLOCK_ZERO;
    }
    return ret;
}

static void null_query_image(StrataNode *node, JsonObject *image)
{
    NullState *s = node->opaque;

    json_object_set_int_member(image, "virtual-size", s->length);
    json_object_set_string_member(image, "filename", node->filename);
    json_object_set_string_member(image, "format", "null-co");
    json_object_set_int_member(image, "actual-size", 0);
}

static int64_t null_get_allocated_size(StrataNode *node)
{
    return 0;
}

/* Nothing of this driver's own can change on a reopen. */
static bool null_reopen_prepare(StrataReopenState *rs, GError **error)
{
    return strata_reopen_check_options(rs, NULL, error);
}

const StrataDriver strata_driver_null_co = {
    .name = "null-co",
    .state_size = sizeof(NullState),
    .has_filename = true,
    .options = null_options,
    .open = null_open,
    .co_get_length = null_co_get_length,
    .co_preadv = null_co_preadv,
    .co_pwritev = null_co_pwritev,
    .supports_fua = true,
    .co_pwrite_zeroes = null_co_pwrite_zeroes,
    .co_pdiscard = null_co_pdiscard,
    .co_flush = null_co_flush,
    .co_block_status = null_co_block_status,
    .query_image = null_query_image,
    .get_allocated_size = null_get_allocated_size,
    .reopen_prepare = null_reopen_prepare,
};
