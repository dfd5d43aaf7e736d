/* Tests of blkdebug: error injection per event, range, count and type,
 * option checking, and the volatile write cache with power cuts. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "driver.h"
#include "debug-private.h"
#include "test-util.h"

static StrataContext *ctx;
static char *dir;

static void setup(void)
{
    g_autoptr(GError) err = NULL;

    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    dir = strata_test_tmpdir();
}

static void teardown(void)
{
    if (ctx) {
        strata_context_free(ctx);
    }
    strata_test_rmdir(dir);
}

static unsigned char pat(size_t i)
{
    return (unsigned char)(i * 7 + 1);
}

static void read_plain(const char *path, void *buf, size_t len, off_t off)
{
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, buf, len, off), (ssize_t)len);
    close(fd);
}

/* Opens blkdebug over @path; @rules is the JSON of "inject-error" (or
 * NULL), @extra more top-level JSON members (or NULL). */
static StrataNode *try_open(StrataContext *c, const char *path,
                            const char *rules, const char *extra,
                            GError **err)
{
    g_autofree char *text = g_strdup_printf(
        "{\"driver\": \"blkdebug\", \"node-name\": \"dbg\", "
        "\"image\": {\"driver\": \"file\", \"filename\": \"%s\"}%s%s%s%s}",
        path, rules ? ", \"inject-error\": " : "", rules ? rules : "",
        extra ? ", " : "", extra ? extra : "");
    g_autoptr(JsonParser) p = json_parser_new();

    ck_assert_msg(json_parser_load_from_data(p, text, -1, NULL), "%s", text);
    return strata_context_add_node(c, json_node_get_object(
                                       json_parser_get_root(p)), err);
}

static StrataBackend *open_dbg(const char *path, const char *rules,
                               const char *extra)
{
    g_autoptr(GError) err = NULL;
    StrataBackend *b;

    ck_assert_msg(try_open(ctx, path, rules, extra, &err), "%s",
                  err ? err->message : "");
    b = strata_backend_new(ctx, "dbg", true, &err);
    ck_assert_msg(b, "%s", err ? err->message : "");
    return b;
}

static void expect_error(const char *rules, const char *extra,
                         const char *want)
{
    g_autofree char *path = strata_test_make_file(dir, "e.img", 4096, true);
    g_autoptr(GError) err = NULL;

    ck_assert_ptr_null(try_open(ctx, path, rules, extra, &err));
    ck_assert_msg(err && strstr(err->message, want), "'%s' lacks '%s'",
                  err ? err->message : "(none)", want);
    ck_assert_ptr_null(strata_context_find_node(ctx, "dbg"));
}

typedef struct {
    StrataNode *node;
    int op; /* 0 zeroes, 1 discard, 2 block status */
    uint64_t offset, bytes, pnum;
    StrataReqFlags flags;
    int ret;
} Call;

static void call_co(void *opaque)
{
    Call *c = opaque;

    switch (c->op) {
    case 0:
        c->ret = strata_node_co_pwrite_zeroes(c->node, c->offset, c->bytes,
                                              c->flags);
        break;
    case 1:
        c->ret = strata_node_co_pdiscard(c->node, c->offset, c->bytes);
        break;
    case 2:
        c->ret = strata_node_co_block_status(c->node, true, c->offset,
                                             c->bytes, &c->pnum, NULL,
                                             NULL);
        break;
    }
}

static int node_call(int op, uint64_t offset, uint64_t bytes)
{
    Call c = { .node = strata_context_find_node(ctx, "dbg"), .op = op,
               .offset = offset, .bytes = bytes };

    strata_loop_run_co(ctx->loop, call_co, &c);
    return c.ret;
}

/* ---- injection ---- */

START_TEST(test_passthrough)
{
    g_autofree char *path = strata_test_make_file(dir, "p.img", 65536, true);
    StrataBackend *b = open_dbg(path, NULL, NULL);
    unsigned char buf[512], back[512];

    ck_assert_int_eq(strata_backend_get_length(b), 65536);
    ck_assert_int_eq(strata_backend_pread(b, 512, buf, sizeof(buf)), 0);
    ck_assert_uint_eq(buf[0], pat(512));
    memset(buf, 9, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 1024, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    read_plain(path, back, sizeof(back), 1024);
    ck_assert_int_eq(memcmp(buf, back, sizeof(buf)), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_read)
{
    g_autofree char *path = strata_test_make_file(dir, "r.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"read_aio\", "
                                "\"errno\": 5}]", NULL);
    unsigned char buf[512];

    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), -EIO);
    ck_assert_int_eq(strata_backend_pread(b, 4096, buf, sizeof(buf)), -EIO);
    /* Other kinds of request pass. */
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_write_errno)
{
    g_autofree char *path = strata_test_make_file(dir, "w.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"write_aio\", "
                                "\"errno\": 28, \"immediately\": true}]",
                                NULL);
    unsigned char buf[512], back[512];

    memset(buf, 0xee, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0),
                     -ENOSPC);
    read_plain(path, back, sizeof(back), 0);
    ck_assert_uint_eq(back[0], pat(0));
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_flush)
{
    g_autofree char *path = strata_test_make_file(dir, "f.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"flush_to_disk\"}]",
                                NULL);
    unsigned char buf[512];

    ck_assert_int_eq(strata_backend_flush(b), -EIO);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_once)
{
    g_autofree char *path = strata_test_make_file(dir, "o.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"read_aio\", "
                                "\"once\": true}]", NULL);
    unsigned char buf[512];

    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), -EIO);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_sector)
{
    g_autofree char *path = strata_test_make_file(dir, "s.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"read_aio\", "
                                "\"sector\": 8}]", NULL);
    unsigned char buf[4096];

    ck_assert_int_eq(strata_backend_pread(b, 0, buf, 4096), 0);
    ck_assert_int_eq(strata_backend_pread(b, 4096, buf, 512), -EIO);
    /* Any request touching the sector. */
    ck_assert_int_eq(strata_backend_pread(b, 4000, buf, 100), -EIO);
    ck_assert_int_eq(strata_backend_pread(b, 4608, buf, 512), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_byte_range)
{
    g_autofree char *path = strata_test_make_file(dir, "x.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"write_aio\", "
                                "\"x-offset\": 10000, \"x-bytes\": 100}]",
                                NULL);
    unsigned char buf[512] = { 0 };

    ck_assert_int_eq(strata_backend_pwrite(b, 9000, buf, 512, 0), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 9600, buf, 401, 0), -EIO);
    ck_assert_int_eq(strata_backend_pwrite(b, 10099, buf, 1, 0), -EIO);
    ck_assert_int_eq(strata_backend_pwrite(b, 10100, buf, 512, 0), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_after)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"read_aio\", "
                                "\"x-after\": 2, \"once\": true}]", NULL);
    unsigned char buf[512];

    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), -EIO);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_iotype)
{
    g_autofree char *path = strata_test_make_file(dir, "i.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"none\", "
                                "\"iotype\": \"discard\", \"errno\": 1}, "
                                "{\"event\": \"none\", \"iotype\": "
                                "[\"write-zeroes\", \"block-status\"], "
                                "\"errno\": 22}]", "\"discard\": \"unmap\"");
    unsigned char buf[512];

    ck_assert_int_eq(node_call(1, 0, 4096), -EPERM);
    ck_assert_int_eq(node_call(0, 0, 4096), -EINVAL);
    ck_assert_int_eq(node_call(2, 0, 4096), -EINVAL);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_default_iotypes)
{
    g_autofree char *path = strata_test_make_file(dir, "n.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"none\"}]", NULL);
    unsigned char buf[512];

    /* "none" fires for everything but block status, QEMU's default. */
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), -EIO);
    ck_assert_int_eq(strata_backend_flush(b), -EIO);
    ck_assert_int_eq(node_call(2, 0, 4096) >= 0, 1);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_inject_errno_zero_and_state)
{
    g_autofree char *path = strata_test_make_file(dir, "z.img", 65536, true);
    StrataBackend *b = open_dbg(path, "[{\"event\": \"read_aio\", "
                                "\"errno\": 0}, {\"event\": \"write_aio\", "
                                "\"state\": 2}, {\"event\": \"flush_to_disk\","
                                " \"state\": 1}]", NULL);
    unsigned char buf[512];

    /* errno 0 injects nothing; state 2 is never reached without
     * set-state; state 1 is the initial one. */
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 0, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), -EIO);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_keyval)
{
    g_autofree char *path = strata_test_make_file(dir, "k.img", 65536, true);
    g_autofree char *spec = g_strdup_printf(
        "driver=blkdebug,node-name=dbg,image.driver=file,"
        "image.filename=%s,inject-error.0.event=read_aio,"
        "inject-error.0.errno=28,inject-error.0.once=on,"
        "inject-error.0.sector=2", path);
    g_autoptr(GError) err = NULL;
    StrataBackend *b;
    unsigned char buf[512];

    ck_assert_msg(strata_context_add_node_keyval(ctx, spec, &err), "%s",
                  err ? err->message : "");
    b = strata_backend_new(ctx, "dbg", false, &err);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, 512), 0);
    ck_assert_int_eq(strata_backend_pread(b, 1024, buf, 512), -ENOSPC);
    ck_assert_int_eq(strata_backend_pread(b, 1024, buf, 512), 0);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_bad_options)
{
    expect_error("{\"event\": \"read_aio\"}", NULL,
                 "Invalid parameter type for 'inject-error', expected: "
                 "array");
    expect_error("[5]", NULL, "'inject-error[0]'");
    expect_error("[{\"errno\": 5}]", NULL,
                 "Parameter 'inject-error[0].event' is missing");
    expect_error("[{\"event\": \"read_aio\"}, {\"event\": \"explode\"}]",
                 NULL, "Parameter 'inject-error[1].event' does not accept "
                 "value 'explode'");
    expect_error("[{\"event\": \"read_aio\", \"colour\": 1}]", NULL,
                 "Parameter 'inject-error[0].colour' is unexpected");
    expect_error("[{\"event\": \"read_aio\", \"errno\": \"EIO\"}]", NULL,
                 "Invalid parameter type for 'inject-error[0].errno', "
                 "expected: integer");
    expect_error("[{\"event\": \"read_aio\", \"errno\": -5}]", NULL,
                 "'inject-error[0].errno'");
    expect_error("[{\"event\": \"read_aio\", \"once\": 3}]", NULL,
                 "'inject-error[0].once', expected: boolean");
    expect_error("[{\"event\": \"read_aio\", \"sector\": -7}]", NULL,
                 "'inject-error[0].sector'");
    expect_error("[{\"event\": \"read_aio\", \"iotype\": \"erase\"}]", NULL,
                 "Parameter 'inject-error[0].iotype' does not accept value "
                 "'erase'");
    expect_error("[{\"event\": \"read_aio\", \"iotype\": [\"read\", 3]}]",
                 NULL, "'inject-error[0].iotype[1]'");
    expect_error("[{\"event\": \"read_aio\", \"x-bytes\": 5}]", NULL,
                 "'inject-error[0].x-bytes' needs x-offset");
    expect_error("[{\"event\": \"read_aio\", \"x-offset\": 0, "
                 "\"sector\": 1}]", NULL, "exclude each other");
    expect_error("[{\"event\": \"read_aio\", \"x-after\": -1}]", NULL,
                 "'inject-error[0].x-after'");
    expect_error(NULL, "\"align\": 3", "Cannot meet constraints with align");
    expect_error(NULL, "\"x-volatile-cache\": \"yes\"", "'x-volatile-cache'");
    expect_error(NULL, "\"x-seed\": true", "'x-seed'");
    expect_error(NULL, "\"set-state\": []", "'set-state'");
}
END_TEST

START_TEST(test_missing_image)
{
    g_autoptr(GError) err = NULL;

    ck_assert_ptr_null(strata_context_add_node_keyval(
        ctx, "driver=blkdebug,node-name=dbg", &err));
    ck_assert_msg(strstr(err->message, "'image'"), "%s", err->message);
}
END_TEST

/* ---- the volatile cache ---- */

static const char *volatile_opts = "\"x-volatile-cache\": true";

START_TEST(test_volatile_power_cut_loses_unflushed)
{
    g_autofree char *path = strata_test_make_file(dir, "v.img", 65536, true);
    StrataBackend *b = open_dbg(path, NULL, volatile_opts);
    StrataNode *dbg = strata_context_find_node(ctx, "dbg");
    g_autoptr(GError) err = NULL;
    unsigned char a[4096], c[4096], back[4096];

    memset(a, 0xaa, sizeof(a));
    memset(c, 0xcc, sizeof(c));
    ck_assert_int_eq(strata_backend_pwrite(b, 0, a, sizeof(a), 0), 0);
    /* Not on the image yet, but readers see it. */
    read_plain(path, back, 1, 0);
    ck_assert_uint_eq(back[0], pat(0));
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), 0);
    ck_assert_uint_eq(back[100], 0xaa);
    ck_assert_uint_eq(strata_debug_cached_bytes(dbg), 4096);

    ck_assert_int_eq(strata_backend_flush(b), 0);
    ck_assert_uint_eq(strata_debug_cached_bytes(dbg), 0);
    read_plain(path, back, sizeof(back), 0);
    ck_assert_int_eq(memcmp(back, a, sizeof(a)), 0);

    /* Partly overlapping, unflushed: lost on power cut. */
    ck_assert_int_eq(strata_backend_pwrite(b, 2048, c, sizeof(c), 0), 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), 0);
    ck_assert_uint_eq(back[2047], 0xaa);
    ck_assert_uint_eq(back[2048], 0xcc);

    ck_assert(strata_debug_power_cut(dbg, STRATA_POWER_CUT_LOSE_ALL, &err));
    /* The machine is off. */
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), -EIO);
    ck_assert_int_eq(strata_backend_pwrite(b, 0, a, sizeof(a), 0), -EIO);
    strata_backend_unref(b);
    strata_context_free(ctx);
    ctx = NULL;

    read_plain(path, back, sizeof(back), 0);
    ck_assert_int_eq(memcmp(back, a, sizeof(a)), 0);
    read_plain(path, back, sizeof(back), 4096);
    for (size_t i = 0; i < sizeof(back); i++) {
        ck_assert_uint_eq(back[i], pat(4096 + i));
    }
}
END_TEST

START_TEST(test_volatile_armed_cut)
{
    g_autofree char *path = strata_test_make_file(dir, "w.img", 65536, true);
    StrataBackend *b = open_dbg(path, NULL, volatile_opts);
    StrataNode *dbg = strata_context_find_node(ctx, "dbg");
    unsigned char a[4096], c[4096], back[4096];

    memset(a, 0xaa, sizeof(a));
    memset(c, 0xcc, sizeof(c));
    /* Three write-kind requests pass (write, flush, write), reads do
     * not count; the power fails as the fourth arrives. */
    strata_debug_arm_power_cut(dbg, 3, STRATA_POWER_CUT_LOSE_ALL);
    ck_assert_int_eq(strata_backend_pwrite(b, 0, a, sizeof(a), 0), 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 4096, c, sizeof(c), 0), 0);
    ck_assert_uint_eq(strata_debug_cached_bytes(dbg), 4096);
    ck_assert(!strata_debug_powered_off(dbg));
    /* The fourth fails, and what was held is lost. */
    ck_assert_int_eq(strata_backend_pwrite(b, 8192, c, sizeof(c), 0), -EIO);
    ck_assert(strata_debug_powered_off(dbg));
    ck_assert_int_eq(strata_backend_pread(b, 0, back, sizeof(back)), -EIO);
    strata_backend_unref(b);

    read_plain(path, back, sizeof(back), 0);
    ck_assert_int_eq(memcmp(back, a, sizeof(a)), 0);
    read_plain(path, back, 1, 4096);
    ck_assert_uint_eq(back[0], pat(4096));
    read_plain(path, back, 1, 8192);
    ck_assert_uint_eq(back[0], pat(8192));
}
END_TEST

START_TEST(test_volatile_fua_survives)
{
    g_autofree char *path = strata_test_make_file(dir, "u.img", 65536, true);
    StrataBackend *b = open_dbg(path, NULL, volatile_opts);
    StrataNode *dbg = strata_context_find_node(ctx, "dbg");
    unsigned char a[512], c[512], back[512];

    memset(a, 0x11, sizeof(a));
    memset(c, 0x22, sizeof(c));
    /* The held write is older than the FUA one: both must be on the
     * image, the FUA data on top. */
    ck_assert_int_eq(strata_backend_pwrite(b, 0, a, sizeof(a), 0), 0);
    ck_assert_int_eq(strata_backend_pwrite(b, 256, c, sizeof(c),
                                           STRATA_REQ_FUA), 0);
    ck_assert(strata_debug_power_cut(dbg, STRATA_POWER_CUT_LOSE_ALL, NULL));
    strata_backend_unref(b);
    read_plain(path, back, sizeof(back), 0);
    ck_assert_uint_eq(back[0], 0x11);
    ck_assert_uint_eq(back[255], 0x11);
    ck_assert_uint_eq(back[256], 0x22);
    read_plain(path, back, 1, 767);
    ck_assert_uint_eq(back[0], 0x22);
}
END_TEST

START_TEST(test_volatile_zeroes_and_growth)
{
    g_autofree char *path = strata_test_make_file(dir, "g.img", 8192, true);
    StrataBackend *b = open_dbg(path, NULL, volatile_opts);
    StrataNode *dbg = strata_context_find_node(ctx, "dbg");
    unsigned char back[4096];
    struct stat st;
    Call c = { .node = dbg, .op = 0, .offset = 0, .bytes = 4096 };

    strata_loop_run_co(ctx->loop, call_co, &c);
    ck_assert_int_eq(c.ret, 0);
    ck_assert_int_eq(strata_backend_pread(b, 0, back, 4096), 0);
    ck_assert_uint_eq(back[0], 0);
    ck_assert_uint_eq(back[4095], 0);
    read_plain(path, back, 1, 0);
    ck_assert_uint_eq(back[0], pat(0));
    /* Block status must not call the held range a hole of the file. */
    ck_assert_int_eq(node_call(2, 0, 8192) & STRATA_BLOCK_DATA,
                     STRATA_BLOCK_DATA);

    ck_assert_int_eq(strata_backend_flush(b), 0);
    read_plain(path, back, 4096, 0);
    ck_assert_uint_eq(back[0], 0);
    ck_assert_uint_eq(back[4095], 0);
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_size, 8192);
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_volatile_cache_limit)
{
    g_autofree char *path = strata_test_make_file(dir, "l.img", 1 << 20,
                                                  false);
    StrataBackend *b = open_dbg(path, NULL, "\"x-volatile-cache\": true, "
                                "\"x-cache-size\": 65536");
    StrataNode *dbg = strata_context_find_node(ctx, "dbg");
    unsigned char buf[4096], back[4096];

    for (int i = 0; i < 64; i++) {
        memset(buf, i + 1, sizeof(buf));
        ck_assert_int_eq(strata_backend_pwrite(b, i * 4096, buf, 4096, 0),
                         0);
        ck_assert_uint_le(strata_debug_cached_bytes(dbg), 65536);
    }
    /* The oldest writes were written back without a flush; the newest
     * are still held. */
    read_plain(path, back, 4096, 0);
    ck_assert_uint_eq(back[0], 1);
    read_plain(path, back, 4096, 63 * 4096);
    ck_assert_uint_eq(back[0], 0);
    ck_assert_int_eq(strata_backend_pread(b, 63 * 4096, back, 4096), 0);
    ck_assert_uint_eq(back[0], 64);
    strata_backend_unref(b);
}
END_TEST

/* Runs the random-subset scenario on a fresh copy of the image with
 * @seed; returns the image's bytes after the power cut. */
static unsigned char *random_cut(const char *name, int seed)
{
    g_autofree char *path = strata_test_make_file(dir, name, 65536, false);
    g_autofree char *extra = g_strdup_printf(
        "\"x-volatile-cache\": true, \"x-seed\": %d", seed);
    StrataContext *c = strata_context_new(NULL, NULL, NULL);
    g_autoptr(GError) err = NULL;
    StrataBackend *b;
    unsigned char buf[8192];
    unsigned char *image = g_malloc(65536);

    ck_assert_msg(try_open(c, path, NULL, extra, &err), "%s",
                  err ? err->message : "");
    b = strata_backend_new(c, "dbg", true, &err);
    ck_assert_ptr_nonnull(b);
    for (int i = 0; i < 8; i++) {
        memset(buf, 0x40 + i, sizeof(buf));
        /* Overlapping writes: the newest content of a sector wins. */
        ck_assert_int_eq(strata_backend_pwrite(b, i * 6144, buf,
                                               sizeof(buf), 0), 0);
    }
    ck_assert(strata_debug_power_cut(strata_context_find_node(c, "dbg"),
                                     STRATA_POWER_CUT_RANDOM_SUBSET, &err));
    strata_backend_unref(b);
    strata_context_free(c);
    read_plain(path, image, 65536, 0);
    return image;
}

START_TEST(test_volatile_random_subset)
{
    g_autofree unsigned char *r1 = random_cut("r1.img", 42);
    g_autofree unsigned char *r2 = random_cut("r2.img", 42);
    g_autofree unsigned char *r3 = random_cut("r3.img", 7);
    unsigned kept = 0, lost = 0;

    ck_assert_int_eq(memcmp(r1, r2, 65536), 0);
    ck_assert_int_ne(memcmp(r1, r3, 65536), 0);
    for (size_t sec = 0; sec < (7 * 6144 + 8192) / 512; sec++) {
        unsigned char v = r1[sec * 512];
        /* The newest write covering this sector. */
        int newest = -1;

        for (int i = 0; i < 8; i++) {
            if (sec * 512 >= (size_t)i * 6144 &&
                sec * 512 < (size_t)i * 6144 + 8192) {
                newest = i;
            }
        }
        /* A sector holds all zeroes or the newest data, never a mix and
         * never an older write's data. */
        for (size_t j = 1; j < 512; j++) {
            ck_assert_uint_eq(r1[sec * 512 + j], v);
        }
        if (v == 0) {
            lost++;
        } else {
            ck_assert_uint_eq(v, 0x40 + newest);
            kept++;
        }
    }
    ck_assert_uint_gt(kept, 0);
    ck_assert_uint_gt(lost, 0);
}
END_TEST

START_TEST(test_volatile_process_death)
{
    g_autofree char *path = strata_test_make_file(dir, "k.img", 65536, true);
    pid_t pid = fork();
    int status;
    unsigned char back[512];

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        StrataBackend *b = open_dbg(path, NULL, volatile_opts);
        unsigned char buf[512];

        memset(buf, 0x5a, sizeof(buf));
        if (strata_backend_pwrite(b, 0, buf, sizeof(buf), 0) ||
            strata_backend_flush(b) ||
            strata_backend_pwrite(b, 4096, buf, sizeof(buf), 0)) {
            _exit(1);
        }
        _exit(0); /* as if killed: nothing is closed or flushed */
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    read_plain(path, back, sizeof(back), 0);
    ck_assert_uint_eq(back[0], 0x5a);
    read_plain(path, back, sizeof(back), 4096);
    ck_assert_uint_eq(back[0], pat(4096));
}
END_TEST

START_TEST(test_power_cut_wrong_node)
{
    g_autofree char *path = strata_test_make_file(dir, "w.img", 4096, true);
    g_autofree char *spec = g_strdup_printf("driver=file,node-name=f,"
                                            "filename=%s", path);
    g_autoptr(GError) err = NULL;
    StrataNode *f = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_ptr_nonnull(f);
    ck_assert(!strata_debug_power_cut(f, STRATA_POWER_CUT_LOSE_ALL, &err));
    ck_assert_msg(strstr(err->message, "not a blkdebug node"), "%s",
                  err->message);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("debug");

    strata_test_add(s, "/debug/passthrough", test_passthrough, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/read", test_inject_read, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/write-errno", test_inject_write_errno,
                    setup, teardown);
    strata_test_add(s, "/debug/inject/flush", test_inject_flush, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/once", test_inject_once, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/sector", test_inject_sector, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/byte-range", test_inject_byte_range,
                    setup, teardown);
    strata_test_add(s, "/debug/inject/after", test_inject_after, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/iotype", test_inject_iotype, setup,
                    teardown);
    strata_test_add(s, "/debug/inject/default-iotypes",
                    test_inject_default_iotypes, setup, teardown);
    strata_test_add(s, "/debug/inject/errno-zero-and-state",
                    test_inject_errno_zero_and_state, setup, teardown);
    strata_test_add(s, "/debug/keyval", test_keyval, setup, teardown);
    strata_test_add(s, "/debug/bad-options", test_bad_options, setup,
                    teardown);
    strata_test_add(s, "/debug/missing-image", test_missing_image, setup,
                    teardown);
    strata_test_add(s, "/debug/volatile/power-cut",
                    test_volatile_power_cut_loses_unflushed, setup,
                    teardown);
    strata_test_add(s, "/debug/volatile/armed-cut", test_volatile_armed_cut,
                    setup, teardown);
    strata_test_add(s, "/debug/volatile/fua", test_volatile_fua_survives,
                    setup, teardown);
    strata_test_add(s, "/debug/volatile/zeroes",
                    test_volatile_zeroes_and_growth, setup, teardown);
    strata_test_add(s, "/debug/volatile/cache-limit",
                    test_volatile_cache_limit, setup, teardown);
    strata_test_add(s, "/debug/volatile/random-subset",
                    test_volatile_random_subset, setup, teardown);
    strata_test_add(s, "/debug/volatile/process-death",
                    test_volatile_process_death, setup, teardown);
    strata_test_add(s, "/debug/power-cut/wrong-node",
                    test_power_cut_wrong_node, setup, teardown);
    return strata_test_run(s);
}
