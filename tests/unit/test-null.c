/* Tests of null-co: size and its errors, read-zeroes, latency, block
 * status and the names QEMU gives such nodes. */
#include <errno.h>
#include <string.h>

#include "driver.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static StrataNode *add(const char *spec)
{
    g_autoptr(GError) err = NULL;
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
    return n;
}

static void expect_error(const char *spec, const char *want)
{
    g_autoptr(GError) err = NULL;

    ck_assert_msg(!strata_context_add_node_keyval(ctx, spec, &err),
                  "%s opened", spec);
    ck_assert_msg(strstr(err->message, want), "'%s' lacks '%s'",
                  err->message, want);
}

typedef struct {
    StrataNode *node;
    uint64_t offset, bytes, pnum, map;
    StrataNode *file;
    int ret;
} StatusCall;

static void status_co(void *opaque)
{
    StatusCall *c = opaque;

    c->ret = strata_node_co_block_status(c->node, true, c->offset, c->bytes,
                                         &c->pnum, &c->map, &c->file);
}

START_TEST(test_defaults)
{
    StrataNode *n = add("driver=null-co,node-name=n");
    g_autoptr(JsonObject) img = json_object_new();

    ck_assert_int_eq(strata_node_get_length(n), 1LL << 30);
    ck_assert_str_eq(n->filename, "null-co://");
    n->drv->query_image(n, img);
    ck_assert_int_eq(json_object_get_int_member(img, "virtual-size"),
                     1LL << 30);
    ck_assert_str_eq(json_object_get_string_member(img, "format"),
                     "null-co");
    ck_assert_int_eq(json_object_get_int_member(img, "actual-size"), 0);
}
END_TEST

START_TEST(test_size_errors)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonParser) p = json_parser_new();
    JsonObject *o;

    /* QEMU 7.2 aborts on this one; strata answers. */
    ck_assert(json_parser_load_from_data(p, "{\"driver\": \"null-co\", "
                                         "\"node-name\": \"n\", "
                                         "\"size\": -1}", -1, NULL));
    o = json_node_get_object(json_parser_get_root(p));
    ck_assert_ptr_null(strata_context_add_node(ctx, o, &err));
    ck_assert_str_eq(err->message,
                     "Parameter 'size' expects a non-negative value");

    /* JSON keeps its types: a string is no integer (QMP's wording). */
    g_clear_error(&err);
    ck_assert(json_parser_load_from_data(p, "{\"driver\": \"null-co\", "
                                         "\"size\": \"big\"}", -1, NULL));
    o = json_node_get_object(json_parser_get_root(p));
    ck_assert_ptr_null(strata_context_add_node(ctx, o, &err));
    ck_assert_str_eq(err->message,
                     "Invalid parameter type for 'size', expected: integer");

    expect_error("driver=null-co,node-name=n,size=big", "'size'");
    expect_error("driver=null-co,node-name=n,size=-5",
                 "Parameter 'size' expects a non-negative value");
    expect_error("driver=null-co,node-name=n,size=1Q", "'size'");
    expect_error("driver=null-co,node-name=n,size=99999999999E", "'size'");
    expect_error("driver=null-co,node-name=n,latency-ns=-5",
                 "latency-ns is invalid");
    expect_error("driver=null-co,node-name=n,read-zeroes=maybe",
                 "'read-zeroes'");
    expect_error("driver=null-co,node-name=n,filename=x", "'filename'");
    ck_assert_ptr_null(strata_context_find_node(ctx, "n"));
}
END_TEST

START_TEST(test_sizes)
{
    StrataNode *n = add("driver=null-co,node-name=n,size=1048576");
    StrataNode *z = add("driver=null-co,node-name=z,size=0");
    StrataNode *m = add("driver=null-co,node-name=m,size=64k");
    StrataNode *g = add("driver=null-co,node-name=g,size=2G");

    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);
    ck_assert_int_eq(strata_node_get_length(z), 0);
    ck_assert_int_eq(strata_node_get_length(m), 65536);
    ck_assert_int_eq(strata_node_get_length(g), 2LL << 30);
    /* key=value sizes become numbers in the json: name. */
    ck_assert_msg(strstr(m->filename, "65536"), "%s", m->filename);
}
END_TEST

START_TEST(test_read_zeroes)
{
    g_autoptr(GError) err = NULL;
    StrataBackend *bz, *bk;
    unsigned char buf[4096];

    add("driver=null-co,node-name=z,read-zeroes=on");
    add("driver=null-co,node-name=k");
    bz = strata_backend_new(ctx, "z", true, &err);
    bk = strata_backend_new(ctx, "k", true, &err);
    ck_assert(bz && bk);

    memset(buf, 0xff, sizeof(buf));
    ck_assert_int_eq(strata_backend_pread(bz, 4096, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
    /* Without read-zeroes the buffer is not touched, as in QEMU. */
    memset(buf, 0xff, sizeof(buf));
    ck_assert_int_eq(strata_backend_pread(bk, 4096, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0xff);
    }
    /* Writes and flushes succeed and store nothing. */
    ck_assert_int_eq(strata_backend_pwrite(bz, 0, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(bz), 0);
    ck_assert_int_eq(strata_backend_pread(bz, 0, buf, sizeof(buf)), 0);
    ck_assert_uint_eq(buf[0], 0);
    strata_backend_unref(bz);
    strata_backend_unref(bk);
}
END_TEST

START_TEST(test_latency)
{
    g_autoptr(GError) err = NULL;
    StrataBackend *b;
    unsigned char buf[512];
    int64_t t0;

    add("driver=null-co,node-name=n,latency-ns=30000000");
    b = strata_backend_new(ctx, "n", true, &err);
    ck_assert_ptr_nonnull(b);
    t0 = g_get_monotonic_time();
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_ge(g_get_monotonic_time() - t0, 30000);
    t0 = g_get_monotonic_time();
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0), 0);
    ck_assert_int_ge(g_get_monotonic_time() - t0, 30000);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_block_status)
{
    StrataNode *z = add("driver=null-co,node-name=z,read-zeroes=on");
    StrataNode *k = add("driver=null-co,node-name=k");
    StatusCall c = { .node = z, .offset = 4096, .bytes = 65536 };

    strata_loop_run_co(ctx->loop, status_co, &c);
    ck_assert_int_ge(c.ret, 0);
    ck_assert(c.ret & STRATA_BLOCK_ZERO);
    ck_assert(c.ret & STRATA_BLOCK_OFFSET_VALID);
    ck_assert(!(c.ret & STRATA_BLOCK_DATA));
    ck_assert_uint_eq(c.pnum, 65536);
    ck_assert_uint_eq(c.map, 4096);
    ck_assert_ptr_eq(c.file, z);

    c = (StatusCall) { .node = k, .offset = 0, .bytes = 65536 };
    strata_loop_run_co(ctx->loop, status_co, &c);
    ck_assert_int_ge(c.ret, 0);
    ck_assert(!(c.ret & STRATA_BLOCK_ZERO));
    ck_assert(!(c.ret & STRATA_BLOCK_DATA));
    ck_assert(c.ret & STRATA_BLOCK_OFFSET_VALID);
}
END_TEST

START_TEST(test_filename)
{
    StrataNode *a = add("driver=null-co,node-name=a,size=1073741824,"
                        "read-zeroes=on");
    StrataNode *b = add("driver=null-co,node-name=b,latency-ns=10");
    StrataNode *c = add("driver=null-co,node-name=c,read-only=on");

    /* Options that change the device make a json: name without the
     * node name; timing and generic options do not.  (Spacing is the
     * JSON generator's business.) */
    g_autofree char *tight = g_strdup(a->filename);
    char *w = tight;

    for (const char *r = a->filename; *r; r++) {
        if (*r != ' ') {
            *w++ = *r;
        }
    }
    *w = 0;
    ck_assert_msg(g_str_has_prefix(tight, "json:{\"driver\":\"null-co\""),
                  "%s", a->filename);
    ck_assert_msg(strstr(tight, "\"size\":1073741824"), "%s", a->filename);
    ck_assert_msg(strstr(tight, "\"read-zeroes\":true"), "%s",
                  a->filename);
    ck_assert_ptr_null(strstr(a->filename, "node-name"));
    ck_assert_str_eq(b->filename, "null-co://");
    ck_assert_str_eq(c->filename, "null-co://");
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/null/defaults", test_defaults },
        { "/null/size/errors", test_size_errors },
        { "/null/size/values", test_sizes },
        { "/null/read-zeroes", test_read_zeroes },
        { "/null/latency", test_latency },
        { "/null/block-status", test_block_status },
        { "/null/filename", test_filename },
    };

    return strata_test_main("null", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
