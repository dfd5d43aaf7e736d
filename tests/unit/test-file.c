/* Tests of the file driver: open errors, data, short reads, O_DIRECT,
 * write-zeroes and discard, holes, resize, and image locks against a
 * second context and against QEMU's tools. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "driver.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static StrataNode *add(StrataContext *c, const char *spec, GError **err)
{
    return strata_context_add_node_keyval(c, spec, err);
}

/* The file node "f" on @path with cache.direct=on; NULL where the file
 * system refuses O_DIRECT (the caller then has nothing to test). */
static StrataNode *open_direct(const char *path)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s,cache.direct=on", path);
    StrataNode *n = add(ctx, spec, &err);

    if (!n && err && strstr(err->message, "Invalid argument")) {
        return NULL;
    }
    ck_assert_msg(n, "%s", err ? err->message : "");
    return n;
}

static StrataNode *open_file(const char *path, const char *extra)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s%s%s", path, extra ? "," : "",
        extra ? extra : "");
    StrataNode *n = add(ctx, spec, &err);

    ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
    return n;
}

/* Expects opening @spec to fail with a message containing @want. */
static void expect_open_error(const char *spec, const char *want)
{
    g_autoptr(GError) err = NULL;

    ck_assert_msg(add(ctx, spec, &err) == NULL, "%s opened", spec);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err->message, want), "'%s' lacks '%s'",
                  err->message, want);
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

/* The file's bytes [@off, @off + @len) all hold @byte. */
static void expect_filled(const char *path, off_t off, size_t len, int byte)
{
    g_autofree unsigned char *back = g_malloc(len);
    g_autofree unsigned char *want = g_malloc(len);

    read_plain(path, back, len, off);
    memset(want, byte, len);
    ck_assert_int_eq(memcmp(back, want, len), 0);
}

static struct stat stat_path(const char *path)
{
    struct stat st;

    ck_assert_int_eq(stat(path, &st), 0);
    return st;
}

/* ---- node calls in a coroutine ---- */

typedef enum { OP_READ, OP_WRITE, OP_ZERO, OP_DISCARD, OP_FLUSH,
               OP_STATUS, OP_TRUNCATE, OP_PREFETCH } Op;

typedef struct {
    Op op;
    StrataNode *node;
    uint64_t offset, bytes;
    void *buf;
    StrataReqFlags flags;
    bool want_zero, exact;
    uint64_t pnum, map;
    StrataNode *file;
    GError *error;
    const StrataRange *ranges;
    unsigned n;
    int ret;
} Call;

static void call_co(void *opaque)
{
    Call *c = opaque;

    switch (c->op) {
    case OP_READ:
        c->ret = strata_node_co_pread(c->node, c->offset, c->bytes, c->buf,
                                      c->flags);
        break;
    case OP_WRITE:
        c->ret = strata_node_co_pwrite(c->node, c->offset, c->bytes, c->buf,
                                       c->flags);
        break;
    case OP_ZERO:
        c->ret = strata_node_co_pwrite_zeroes(c->node, c->offset, c->bytes,
                                              c->flags);
        break;
    case OP_DISCARD:
        c->ret = strata_node_co_pdiscard(c->node, c->offset, c->bytes);
        break;
    case OP_FLUSH:
        c->ret = strata_node_co_flush(c->node);
        break;
    case OP_STATUS:
        c->ret = strata_node_co_block_status(c->node, c->want_zero,
                                             c->offset, c->bytes, &c->pnum,
                                             &c->map, &c->file);
        break;
    case OP_TRUNCATE:
        c->ret = strata_node_co_truncate(c->node, c->offset, c->exact,
                                         &c->error);
        break;
    case OP_PREFETCH:
        c->ret = strata_node_co_prefetch(c->node, c->ranges, c->n);
        break;
    }
}

static int run(Call *c)
{
    strata_loop_run_co(c->node->ctx->loop, call_co, c);
    return c->ret;
}

static int node_read(StrataNode *n, uint64_t off, uint64_t len, void *buf)
{
    Call c = { .op = OP_READ, .node = n, .offset = off, .bytes = len,
               .buf = buf };
    return run(&c);
}

static int node_write(StrataNode *n, uint64_t off, uint64_t len,
                      const void *buf)
{
    Call c = { .op = OP_WRITE, .node = n, .offset = off, .bytes = len,
               .buf = (void *)buf };
    return run(&c);
}

static int node_zero(StrataNode *n, uint64_t off, uint64_t len,
                     StrataReqFlags flags)
{
    Call c = { .op = OP_ZERO, .node = n, .offset = off, .bytes = len,
               .flags = flags };
    return run(&c);
}

static int node_discard(StrataNode *n, uint64_t off, uint64_t len)
{
    Call c = { .op = OP_DISCARD, .node = n, .offset = off, .bytes = len };
    return run(&c);
}

static int node_flush(StrataNode *n)
{
    Call c = { .op = OP_FLUSH, .node = n };
    return run(&c);
}

static int node_status(StrataNode *n, bool want_zero, uint64_t off,
                       uint64_t len, uint64_t *pnum)
{
    Call c = { .op = OP_STATUS, .node = n, .offset = off, .bytes = len,
               .want_zero = want_zero };
    int ret = run(&c);

    *pnum = c.pnum;
    if (ret >= 0 && (ret & STRATA_BLOCK_OFFSET_VALID)) {
        ck_assert_ptr_eq(c.file, n);
        ck_assert_uint_eq(c.map, off);
    }
    return ret;
}

static int node_truncate(StrataNode *n, uint64_t size, bool exact,
                         GError **error)
{
    Call c = { .op = OP_TRUNCATE, .node = n, .offset = size, .exact = exact };
    int ret = run(&c);

    if (error) {
        *error = c.error;
    } else {
        g_clear_error(&c.error);
    }
    return ret;
}

static int node_prefetch(StrataNode *n, const StrataRange *ranges,
                         unsigned count)
{
    Call c = { .op = OP_PREFETCH, .node = n, .ranges = ranges, .n = count };
    return run(&c);
}

/* ---- open errors ---- */

START_TEST(test_open_missing)
{
    g_autofree char *path = g_build_filename(dir, "nope.img", NULL);
    g_autofree char *spec = g_strdup_printf("driver=file,node-name=f,"
                                            "filename=%s", path);
    g_autofree char *want = g_strdup_printf("Could not open '%s': No such "
                                            "file or directory", path);
    g_autoptr(GError) err = NULL;

    ck_assert_ptr_null(add(ctx, spec, &err));
    ck_assert_str_eq(err->message, want);
    /* A failed open leaves no node behind. */
    ck_assert_ptr_null(strata_context_find_node(ctx, "f"));
}
END_TEST

START_TEST(test_open_bad_options)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 4096, true);
    g_autofree char *s1 = g_strdup_printf("driver=file,filename=%s,"
                                          "node-name=f,bogus=1", path);
    g_autofree char *s2 = g_strdup_printf("driver=file,filename=%s,"
                                          "node-name=f,locking=maybe", path);
    g_autofree char *s3 = g_strdup_printf("driver=file,filename=%s,"
                                          "node-name=f,aio=fast", path);
    g_autofree char *s4 = g_strdup_printf("driver=file,filename=%s,"
                                          "node-name=f,aio-max-batch=x",
                                          path);
    g_autofree char *s5 = g_strdup_printf("driver=file,filename=%s,"
                                          "node-name=f,drop-cache=maybe",
                                          path);

    expect_open_error(s1, "'bogus'");
    expect_open_error(s2, "'locking'");
    expect_open_error(s3, "'aio'");
    expect_open_error(s4, "'aio-max-batch'");
    expect_open_error(s5, "'drop-cache'");
    expect_open_error("driver=file,node-name=f", "'filename'");
}
END_TEST

START_TEST(test_open_accepted_options)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 4096, true);
    g_autofree char *spec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s,aio=threads,locking=on,"
        "aio-max-batch=16,drop-cache=off,x-check-cache-dropped=on", path);
    g_autoptr(GError) err = NULL;
    StrataNode *n = add(ctx, spec, &err);

    ck_assert_msg(n, "%s", err ? err->message : "");
    ck_assert_int_eq(strata_node_get_length(n), 4096);
    ck_assert_str_eq(n->filename, path);
}
END_TEST

START_TEST(test_open_native_needs_direct)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 4096, true);
    g_autofree char *s1 = g_strdup_printf("driver=file,node-name=f,"
                                          "filename=%s,aio=native", path);
    g_autofree char *s2 = g_strdup_printf("driver=file,node-name=f,"
                                          "filename=%s,aio=native,"
                                          "cache.direct=on", path);
    g_autoptr(GError) err = NULL;

    ck_assert_ptr_null(add(ctx, s1, &err));
    ck_assert_str_eq(err->message, "aio=native was specified, but it "
                     "requires cache.direct=on, which was not specified.");
    g_clear_error(&err);
    ck_assert_msg(add(ctx, s2, &err), "%s", err ? err->message : "");
}
END_TEST

START_TEST(test_open_directory)
{
    g_autofree char *spec = g_strdup_printf("driver=file,node-name=f,"
                                            "filename=%s,read-only=on", dir);

    expect_open_error(spec, "regular file");
}
END_TEST

START_TEST(test_open_io_uring)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 4096, true);
    g_autofree char *spec = g_strdup_printf("driver=file,node-name=f,"
                                            "filename=%s,aio=io_uring", path);
    g_autoptr(GError) err = NULL;
    StrataContext *threads = strata_context_new(NULL, "threads", &err);
    StrataNode *n;

    /* A context without a ring cannot honour an explicit io_uring. */
    ck_assert_ptr_nonnull(threads);
    ck_assert_ptr_null(add(threads, spec, &err));
    ck_assert_msg(g_str_has_prefix(err->message, "Unable to use io_uring"),
                  "%s", err->message);
    g_clear_error(&err);
    strata_context_free(threads);

    n = add(ctx, spec, &err);
    if (strcmp(strata_context_aio_engine(ctx), "io_uring") == 0) {
        unsigned char c;

        ck_assert_msg(n, "%s", err ? err->message : "");
        ck_assert_int_eq(node_read(n, 7, 1, &c), 0);
        ck_assert_uint_eq(c, pat(7));
    } else {
        ck_assert_ptr_null(n);
    }
}
END_TEST

/* ---- data ---- */

static void check_rw(const char *aio)
{
    g_autofree char *path = strata_test_make_file(dir, "rw.img", 1 << 20,
                                                  false);
    g_autofree char *extra = aio ? g_strdup_printf("aio=%s", aio) : NULL;
    StrataNode *n = open_file(path, extra);
    g_autofree unsigned char *buf = g_malloc(200000);
    g_autofree unsigned char *back = g_malloc(200000);

    for (size_t i = 0; i < 200000; i++) {
        buf[i] = pat(i);
    }
    ck_assert_int_eq(node_write(n, 12345, 200000, buf), 0);
    ck_assert_int_eq(node_flush(n), 0);
    read_plain(path, back, 200000, 12345);
    ck_assert_int_eq(memcmp(buf, back, 200000), 0);
    memset(back, 0, 200000);
    ck_assert_int_eq(node_read(n, 12345, 200000, back), 0);
    ck_assert_int_eq(memcmp(buf, back, 200000), 0);
    /* Not cached, then half cached: buffered reads that miss the page
     * cache take another path than hits. */
    strata_test_drop_cache(path, 0, 0);
    memset(back, 0, 200000);
    ck_assert_int_eq(node_read(n, 12345, 200000, back), 0);
    ck_assert_int_eq(memcmp(buf, back, 200000), 0);
    strata_test_drop_cache(path, 65536, 0);
    memset(back, 0, 200000);
    ck_assert_int_eq(node_read(n, 12345, 200000, back), 0);
    ck_assert_int_eq(memcmp(buf, back, 200000), 0);
    /* Small reads take the page cache inline when they can. */
    strata_test_drop_cache(path, 0, 0);
    for (int i = 0; i < 2; i++) {
        memset(back, 0, 8192);
        ck_assert_int_eq(node_read(n, 100000, 8192, back), 0);
        ck_assert_int_eq(memcmp(buf + 100000 - 12345, back, 8192), 0);
    }
}

START_TEST(test_rw_default)
{
    check_rw(NULL);
}
END_TEST

START_TEST(test_rw_threads)
{
    check_rw("threads");
}
END_TEST

START_TEST(test_rw_io_uring)
{
    if (strcmp(strata_context_aio_engine(ctx), "io_uring") != 0) {
        return;
    }
    check_rw("io_uring");
}
END_TEST

START_TEST(test_read_offload)
{
    g_autofree char *path = NULL;
    g_autofree unsigned char *buf = g_malloc(131072);
    g_autofree unsigned char *want = g_malloc(131072);
    StrataLoopStats before, after;
    StrataNode *n;

    if (strcmp(strata_context_aio_engine(ctx), "io_uring") != 0) {
        return;
    }
    /* Large buffered reads go to the kernel's workers, small ones are
     * tried inline; both return the file's bytes. */
    for (size_t i = 0; i < 131072; i++) {
        want[i] = pat(65536 + i);
    }
    path = strata_test_make_file(dir, "big.img", 1 << 20, true);
    n = open_file(path, "aio=io_uring");
    strata_loop_get_stats(ctx->loop, &before);
    ck_assert_int_eq(node_read(n, 65536, 131072, buf), 0);
    strata_loop_get_stats(ctx->loop, &after);
    ck_assert_uint_gt(after.offloads, before.offloads);
    ck_assert(memcmp(buf, want, 131072) == 0);

    strata_loop_get_stats(ctx->loop, &before);
    ck_assert_int_eq(node_read(n, 65536, 4096, buf), 0);
    strata_loop_get_stats(ctx->loop, &after);
    ck_assert_uint_eq(after.offloads, before.offloads);
    ck_assert(memcmp(buf, want, 4096) == 0);
}
END_TEST

START_TEST(test_short_read_zero_fills)
{
    g_autofree char *path = strata_test_make_file(dir, "s.img", 65536, true);
    StrataNode *n = open_file(path, NULL);
    unsigned char buf[8192];

    /* Shrink the file behind the node's back: the node still believes in
     * 64 KiB, so the driver sees the short read and must zero-fill. */
    ck_assert_int_eq(truncate(path, 4096 + 100), 0);
    memset(buf, 0xee, sizeof(buf));
    ck_assert_int_eq(node_read(n, 4096, sizeof(buf), buf), 0);
    for (size_t i = 0; i < 100; i++) {
        ck_assert_uint_eq(buf[i], pat(4096 + i));
    }
    for (size_t i = 100; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
}
END_TEST

START_TEST(test_direct_unaligned)
{
    g_autofree char *path = strata_test_make_file(dir, "d.img", 65536, true);
    StrataNode *n = open_direct(path);
    unsigned char b = 0, back[16];

    if (!n) {
        return; /* no O_DIRECT on this file system */
    }
    ck_assert_uint_ge(n->limits.request_alignment, 512);
    ck_assert_uint_ge(n->limits.buf_align, 512);
    ck_assert_int_eq(node_read(n, 3, 1, &b), 0);
    ck_assert_uint_eq(b, pat(3));
    b = 0xab;
    ck_assert_int_eq(node_write(n, 5, 1, &b), 0);
    read_plain(path, back, sizeof(back), 0);
    ck_assert_uint_eq(back[5], 0xab);
    ck_assert_uint_eq(back[4], pat(4));
    ck_assert_uint_eq(back[6], pat(6));
}
END_TEST

/* Writes @len bytes of @byte at @off through @n (@buf: scratch of @len,
 * aligned for O_DIRECT). */
static void write_filled(StrataNode *n, void *buf, uint64_t off,
                         uint64_t len, int byte)
{
    memset(buf, byte, len);
    ck_assert_int_eq(node_write(n, off, len, buf), 0);
}

/* Appends under O_DIRECT reserve space ahead (so that they run as
 * overwrites, in parallel); the node still ends where the data ends, a
 * resize drops the reservation, and closing gives it back. */
START_TEST(test_direct_append_reserves)
{
    g_autofree char *path = strata_test_make_file(dir, "r.img", 65536, true);
    StrataNode *n = open_direct(path);
    unsigned char *buf = NULL;
    const uint64_t cs = 65536;

    if (!n) {
        return; /* no O_DIRECT on this file system */
    }
    ck_assert_int_eq(posix_memalign((void **)&buf, 4096, cs), 0);
    for (uint64_t i = 1; i <= 4; i++) {
        memset(buf, (int)(0x40 + i), cs);
        ck_assert_int_eq(node_write(n, i * cs, cs, buf), 0);
    }
    ck_assert_int_gt(stat_path(path).st_size, 5 * cs);
    ck_assert_int_eq(strata_node_get_length(n), 5 * cs);
    /* Not exact and within the data: nothing to do, whatever lies past
     * the data on disk. */
    ck_assert_int_eq(node_truncate(n, 4 * cs, false, NULL), 0);
    ck_assert_int_gt(stat_path(path).st_size, 5 * cs);
    /* Growing: the size is exactly what was asked, then appends reserve
     * again. */
    ck_assert_int_eq(node_truncate(n, 6 * cs, false, NULL), 0);
    ck_assert_int_eq(stat_path(path).st_size, 6 * cs);
    write_filled(n, buf, 6 * cs, cs, 0x50);
    ck_assert_int_gt(stat_path(path).st_size, 7 * cs);
    ck_assert(strata_context_del_node(ctx, "f", NULL));
    ck_assert_int_eq(stat_path(path).st_size, 7 * cs);
    expect_filled(path, (off_t)(4 * cs), cs, 0x44);
    expect_filled(path, (off_t)(6 * cs), cs, 0x50);
    free(buf);
}
END_TEST

/* Overwrites under O_DIRECT learn the file's size once, not per write;
 * a file shrunk behind the node's back still takes every write (the
 * bytes land, an append past the size seen reserves again). */
START_TEST(test_direct_overwrite_after_shrink)
{
    const uint64_t cs = 65536;
    g_autofree char *path = strata_test_make_file(dir, "s.img", 4 * cs,
                                                  true);
    StrataNode *n = open_direct(path);
    unsigned char *buf = NULL;

    if (!n) {
        return; /* no O_DIRECT on this file system */
    }
    ck_assert_int_eq(posix_memalign((void **)&buf, 4096, cs), 0);
    write_filled(n, buf, 3 * cs, cs, 0x61);
    ck_assert_int_eq(stat_path(path).st_size, 4 * cs);
    ck_assert_int_eq(truncate(path, (off_t)cs), 0);
    write_filled(n, buf, 2 * cs, cs, 0x62);
    ck_assert_int_eq(stat_path(path).st_size, 3 * cs);
    write_filled(n, buf, 4 * cs, cs, 0x63);
    ck_assert_int_gt(stat_path(path).st_size, 5 * cs);
    ck_assert(strata_context_del_node(ctx, "f", NULL));
    ck_assert_int_eq(stat_path(path).st_size, 5 * cs);
    expect_filled(path, (off_t)(2 * cs), cs, 0x62);
    expect_filled(path, (off_t)(4 * cs), cs, 0x63);
    free(buf);
}
END_TEST

START_TEST(test_flush)
{
    g_autofree char *path = strata_test_make_file(dir, "f.img", 4096, true);
    StrataNode *n = open_file(path, "cache.no-flush=on");

    ck_assert_int_eq(node_flush(n), 0);
    ck_assert(n->cache_no_flush);
}
END_TEST

START_TEST(test_length_and_query)
{
    g_autofree char *path = strata_test_make_file(dir, "q.img", 3 * 65536,
                                                  true);
    StrataNode *n = open_file(path, NULL);
    g_autoptr(JsonObject) img = json_object_new();

    ck_assert_int_eq(strata_node_get_length(n), 3 * 65536);
    n->drv->query_image(n, img);
    ck_assert_int_eq(json_object_get_int_member(img, "virtual-size"),
                     3 * 65536);
    ck_assert_str_eq(json_object_get_string_member(img, "format"), "file");
    ck_assert_str_eq(json_object_get_string_member(img, "filename"), path);
    ck_assert_int_eq(json_object_get_int_member(img, "actual-size"),
                     (int64_t)stat_path(path).st_blocks * 512);
    ck_assert(!json_object_get_boolean_member(img, "dirty-flag"));
}
END_TEST

/* ---- zeroes, discard, holes, resize ---- */

START_TEST(test_zeroes_grow)
{
    g_autofree char *path = strata_test_make_file(dir, "z.img", 65536, true);
    StrataNode *n = open_file(path, NULL);
    unsigned char buf[4096];

    ck_assert_int_eq(node_zero(n, 65536, 1 << 20, 0), 0);
    ck_assert_int_eq(stat_path(path).st_size, 65536 + (1 << 20));
    read_plain(path, buf, sizeof(buf), 65536 + 4096);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
    /* Zeroes in the middle, too. */
    ck_assert_int_eq(node_zero(n, 4096, 4096, 0), 0);
    read_plain(path, buf, sizeof(buf), 4096);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
    read_plain(path, buf, 1, 8192);
    ck_assert_uint_eq(buf[0], pat(8192));
}
END_TEST

START_TEST(test_zeroes_unmap_punches)
{
    g_autofree char *path = strata_test_make_file(dir, "u.img", 1 << 20,
                                                  true);
    StrataNode *n = open_file(path, "discard=unmap");
    blkcnt_t before = stat_path(path).st_blocks;
    unsigned char buf[4096];

    ck_assert_int_eq(node_zero(n, 0, 512 * 1024, STRATA_REQ_MAY_UNMAP), 0);
    ck_assert_int_lt(stat_path(path).st_blocks, before);
    read_plain(path, buf, sizeof(buf), 4096);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
    /* Unmapping past the end still grows the file. */
    ck_assert_int_eq(node_zero(n, (1 << 20) - 4096, 65536,
                               STRATA_REQ_MAY_UNMAP), 0);
    ck_assert_int_eq(stat_path(path).st_size, (1 << 20) - 4096 + 65536);
}
END_TEST

START_TEST(test_discard)
{
    g_autofree char *p1 = strata_test_make_file(dir, "d1.img", 1 << 20,
                                                true);
    g_autofree char *p2 = strata_test_make_file(dir, "d2.img", 1 << 20,
                                                true);
    g_autoptr(GError) err = NULL;
    g_autofree char *s2 = g_strdup_printf("driver=file,node-name=g,"
                                          "filename=%s", p2);
    StrataNode *unmap = open_file(p1, "discard=unmap");
    StrataNode *ignore = add(ctx, s2, &err);
    blkcnt_t b1 = stat_path(p1).st_blocks, b2 = stat_path(p2).st_blocks;
    unsigned char c;

    ck_assert_ptr_nonnull(ignore);
    ck_assert_int_eq(node_discard(unmap, 0, 512 * 1024), 0);
    ck_assert_int_eq(node_discard(ignore, 0, 512 * 1024), 0);
    ck_assert_int_lt(stat_path(p1).st_blocks, b1);
    /* discard=ignore keeps the data. */
    ck_assert_int_eq(stat_path(p2).st_blocks, b2);
    read_plain(p2, &c, 1, 4096);
    ck_assert_uint_eq(c, pat(4096));
}
END_TEST

/* A prefetch hint reads the ranges given into the page cache (and only
 * them), through a filter too; ranges past the end are cut, a range
 * that does not fit an offset is refused, O_DIRECT ignores the hint. */
START_TEST(test_prefetch)
{
    const size_t mib = 1 << 20;
    g_autofree char *path = strata_test_make_file(dir, "p.img", 4 * mib,
                                                  true);
    g_autofree char *spec = NULL;
    g_autoptr(GError) err = NULL;
    const StrataRange want[] = {
        { 0, mib }, { 3 * mib, 8 * mib },
    };
    const StrataRange bad[] = { { 0, mib }, { UINT64_MAX - 10, 20 } };
    StrataNode *n, *dbg;
    bool cold;
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(fdatasync(fd), 0);
    close(fd);
    strata_test_drop_cache(path, 0, 0);
    /* A file system that keeps files in memory has nothing to show. */
    cold = strata_test_resident_pages(path, 0, 4 * mib) == 0;

    n = open_file(path, NULL);
    ck_assert_int_eq(node_prefetch(n, bad, 2), -EINVAL);
    ck_assert_int_eq(node_prefetch(n, want, 0), 0);
    ck_assert_int_eq(node_prefetch(n, want, 2), 0);
    ck_assert(strata_test_wait_resident(path, 0, mib));
    ck_assert(strata_test_wait_resident(path, 3 * mib, mib));
    if (cold) {
        ck_assert_uint_eq(strata_test_resident_pages(path, 2 * mib, mib), 0);
    }

    /* Through blkdebug, which passes it to the file under it. */
    strata_test_drop_cache(path, 0, 0);
    spec = g_strdup_printf("driver=blkdebug,node-name=dbg,image.driver=file,"
                           "image.filename=%s", path);
    dbg = add(ctx, spec, &err);
    ck_assert_msg(dbg, "%s", err ? err->message : "");
    ck_assert_int_eq(node_prefetch(dbg, &want[1], 1), 0);
    ck_assert(strata_test_wait_resident(path, 3 * mib, mib));
}
END_TEST

START_TEST(test_prefetch_direct)
{
    g_autofree char *path = strata_test_make_file(dir, "pd.img", 1 << 20,
                                                  true);
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s,cache.direct=on", path);
    const StrataRange r = { 0, 1 << 20 };
    StrataNode *n = add(ctx, spec, &err);
    StrataLoopStats before, after;

    if (!n && err && strstr(err->message, "Invalid argument")) {
        return; /* no O_DIRECT on this file system */
    }
    ck_assert_msg(n, "%s", err ? err->message : "");
    /* Nothing to fill: not even a job for a worker thread. */
    strata_loop_get_stats(ctx->loop, &before);
    ck_assert_int_eq(node_prefetch(n, &r, 1), 0);
    strata_loop_get_stats(ctx->loop, &after);
    ck_assert_uint_eq(after.thread_jobs, before.thread_jobs);
}
END_TEST

START_TEST(test_block_status_sparse)
{
    g_autofree char *path = strata_test_make_file(dir, "h.img", 4 << 20,
                                                  false);
    unsigned char data[65536];
    int fd = open(path, O_RDWR);
    StrataNode *n;
    uint64_t pnum;
    int ret;

    memset(data, 0x11, sizeof(data));
    ck_assert_int_eq(pwrite(fd, data, sizeof(data), 0), sizeof(data));
    ck_assert_int_eq(pwrite(fd, data, sizeof(data), 2 << 20), sizeof(data));
    close(fd);
    n = open_file(path, NULL);

    ret = node_status(n, true, 0, 4 << 20, &pnum);
    ck_assert_int_ge(ret, 0);
    ck_assert(ret & STRATA_BLOCK_DATA);
    ck_assert(!(ret & STRATA_BLOCK_ZERO));
    ck_assert_uint_eq(pnum, 65536);

    ret = node_status(n, true, 65536, 4 << 20, &pnum);
    ck_assert(ret & STRATA_BLOCK_ZERO);
    ck_assert(!(ret & STRATA_BLOCK_DATA));
    ck_assert_uint_eq(pnum, (2 << 20) - 65536);

    ret = node_status(n, true, 2 << 20, 1 << 20, &pnum);
    ck_assert(ret & STRATA_BLOCK_DATA);
    ck_assert_uint_eq(pnum, 65536);

    /* The hole after the last data runs to the end. */
    ret = node_status(n, true, (2 << 20) + 65536, 4 << 20, &pnum);
    ck_assert(ret & STRATA_BLOCK_ZERO);
    ck_assert_uint_eq(pnum, (2 << 20) - 65536);

    /* Without want_zero nobody asks the file system. */
    ret = node_status(n, false, 65536, 1 << 20, &pnum);
    ck_assert(ret & STRATA_BLOCK_DATA);
    ck_assert_uint_eq(pnum, 1 << 20);
}
END_TEST

START_TEST(test_truncate)
{
    g_autofree char *path = strata_test_make_file(dir, "t.img", 65536, true);
    StrataNode *n = open_file(path, NULL);
    GError *err = NULL;

    ck_assert_int_eq(node_truncate(n, 1 << 20, true, &err), 0);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(stat_path(path).st_size, 1 << 20);
    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);
    /* Not exact: a bigger file is fine as it is. */
    ck_assert_int_eq(node_truncate(n, 4096, false, NULL), 0);
    ck_assert_int_eq(stat_path(path).st_size, 1 << 20);
    ck_assert_int_eq(node_truncate(n, 4096, true, NULL), 0);
    ck_assert_int_eq(stat_path(path).st_size, 4096);
}
END_TEST

START_TEST(test_truncate_read_only)
{
    g_autofree char *path = strata_test_make_file(dir, "t.img", 65536, true);
    StrataNode *n = open_file(path, "read-only=on");
    GError *err = NULL;

    ck_assert_int_lt(node_truncate(n, 1 << 20, true, &err), 0);
    ck_assert_ptr_nonnull(err);
    g_error_free(err);
    ck_assert_int_eq(stat_path(path).st_size, 65536);
}
END_TEST

/* ---- locks ---- */

static bool is_lock_error(const GError *err)
{
    return err && strstr(err->message, "Failed to get") &&
           strstr(err->message, "Is another process using the image");
}

/* Takes the node (and a writable backend on it) in @c; NULL with @err
 * on a lock conflict at either step. */
static StrataBackend *take_writable(StrataContext *c, const char *path,
                                    const char *extra, GError **err)
{
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s%s%s",
        path, extra ? "," : "", extra ? extra : "");

    if (!add(c, spec, err)) {
        return NULL;
    }
    return strata_backend_new(c, "disk", true, err);
}

START_TEST(test_lock_second_context)
{
    g_autofree char *path = strata_test_make_file(dir, "l.img", 65536, true);
    g_autoptr(GError) err = NULL;
    StrataContext *ctx2 = strata_context_new(NULL, NULL, &err);
    StrataBackend *b1, *b2;
    g_autofree char *ro = g_strdup_printf(
        "driver=raw,node-name=peek,read-only=on,force-share=on,"
        "file.driver=file,file.filename=%s", path);
    char buf[512];

    ck_assert_ptr_nonnull(ctx2);
    b1 = take_writable(ctx, path, NULL, &err);
    ck_assert_msg(b1, "%s", err ? err->message : "");

    b2 = take_writable(ctx2, path, NULL, &err);
    ck_assert_ptr_null(b2);
    ck_assert_msg(is_lock_error(err), "%s", err ? err->message : "(none)");
    g_clear_error(&err);

    /* A read-only, force-share reader is allowed beside the writer. */
    ck_assert_msg(add(ctx2, ro, &err), "%s", err ? err->message : "");
    b2 = strata_backend_new(ctx2, "peek", false, &err);
    ck_assert_msg(b2, "%s", err ? err->message : "");
    ck_assert_int_eq(strata_backend_pread(b2, 0, buf, sizeof(buf)), 0);
    strata_backend_unref(b2);
    ck_assert(strata_context_del_node(ctx2, "peek", NULL));
    if (strata_context_find_node(ctx2, "disk")) {
        ck_assert(strata_context_del_node(ctx2, "disk", NULL));
    }

    /* Once the first context lets go, the second may write. */
    strata_backend_unref(b1);
    ck_assert(strata_context_del_node(ctx, "disk", NULL));
    b2 = take_writable(ctx2, path, NULL, &err);
    ck_assert_msg(b2, "%s", err ? err->message : "");
    strata_backend_unref(b2);
    strata_context_free(ctx2);
}
END_TEST

START_TEST(test_lock_off)
{
    g_autofree char *path = strata_test_make_file(dir, "l.img", 65536, true);
    g_autoptr(GError) err = NULL;
    StrataContext *ctx2 = strata_context_new(NULL, NULL, &err);
    StrataBackend *b1, *b2;

    b1 = take_writable(ctx, path, NULL, &err);
    ck_assert_msg(b1, "%s", err ? err->message : "");
    b2 = take_writable(ctx2, path, "file.locking=off", &err);
    ck_assert_msg(b2, "%s", err ? err->message : "");
    strata_backend_unref(b2);
    strata_backend_unref(b1);
    strata_context_free(ctx2);
}
END_TEST

/* Whether some open file description locks byte @off of @path. */
static bool byte_locked(const char *path, off_t off)
{
    struct flock fl = { .l_whence = SEEK_SET, .l_start = off, .l_len = 1,
                        .l_type = F_WRLCK };
    int fd = open(path, O_RDONLY);
    bool locked;

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(fcntl(fd, F_OFD_GETLK, &fl), 0);
    locked = fl.l_type != F_UNLCK;
    close(fd);
    return locked;
}

START_TEST(test_lock_bytes_match_qemu)
{
    g_autofree char *path = strata_test_make_file(dir, "l.img", 65536, true);
    g_autoptr(GError) err = NULL;
    StrataBackend *b = take_writable(ctx, path, NULL, &err);

    ck_assert_msg(b, "%s", err ? err->message : "");
    /* Byte 100 + i: permission i in use; 200 + i: i not shared.  A
     * writer uses consistent-read (0) and write (1). */
    ck_assert(byte_locked(path, 100));
    ck_assert(byte_locked(path, 101));
    ck_assert(!byte_locked(path, 0));
    strata_backend_unref(b);
    ck_assert(strata_context_del_node(ctx, "disk", NULL));
    ck_assert(!byte_locked(path, 100));
    ck_assert(!byte_locked(path, 101));
    ck_assert(!byte_locked(path, 201));
}
END_TEST

START_TEST(test_lock_qemu_io_holds)
{
    g_autofree char *qemu_io = g_find_program_in_path("qemu-io");
    g_autofree char *path = strata_test_make_file(dir, "q.img", 65536, true);
    g_autoptr(GError) err = NULL;
    StrataBackend *b;
    GPid pid;
    int i;

    if (!qemu_io) {
        return; /* nothing to talk to */
    }
    const char *argv[] = { qemu_io, "-f", "raw", "-c", "sleep 20000", path,
                           NULL };
    ck_assert(g_spawn_async(NULL, (char **)argv, NULL,
                            G_SPAWN_STDOUT_TO_DEV_NULL |
                            G_SPAWN_STDERR_TO_DEV_NULL |
                            G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &pid,
                            &err));
    for (i = 0; i < 500 && !byte_locked(path, 101); i++) {
        g_usleep(10000);
    }
    ck_assert_msg(i < 500, "qemu-io did not lock the image");

    b = take_writable(ctx, path, NULL, &err);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    g_spawn_close_pid(pid);
    ck_assert_ptr_null(b);
    ck_assert_msg(is_lock_error(err), "%s", err ? err->message : "(none)");
}
END_TEST

static int run_tool(const char *const *argv, char **err_out)
{
    g_autofree char *out = NULL;
    int status = 0;

    ck_assert(g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL,
                           NULL, &out, err_out, &status, NULL));
    return status;
}

START_TEST(test_lock_qemu_refused)
{
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    g_autofree char *qemu_io = g_find_program_in_path("qemu-io");
    g_autofree char *path = strata_test_make_file(dir, "q.img", 65536, true);
    g_autoptr(GError) err = NULL;
    g_autofree char *e1 = NULL, *e2 = NULL, *e3 = NULL;
    StrataBackend *b;

    if (!qemu_img || !qemu_io) {
        return;
    }
    b = take_writable(ctx, path, NULL, &err);
    ck_assert_msg(b, "%s", err ? err->message : "");
    {
        const char *write[] = { qemu_io, "-f", "raw", "-c", "write 0 512",
                                path, NULL };
        const char *read_u[] = { qemu_io, "-f", "raw", "-r", "-U", "-c",
                                 "read 0 512", path, NULL };
        const char *info[] = { qemu_img, "info", "-f", "raw", path, NULL };
        unsigned char c;

        /* A second writer is refused: we hold "write" unshared. */
        ck_assert_int_ne(run_tool(write, &e1), 0);
        ck_assert_msg(strstr(e1, "Failed to get \"write\" lock"), "%s", e1);
        read_plain(path, &c, 1, 0);
        ck_assert_uint_eq(c, pat(0));
        /* A reader that shares everything is let in, and QEMU 7.2's
         * "qemu-img info" takes no permission at all. */
        ck_assert_int_eq(run_tool(read_u, &e2), 0);
        ck_assert_int_eq(run_tool(info, &e3), 0);
    }
    strata_backend_unref(b);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/file/open/missing", test_open_missing },
        { "/file/open/bad-options", test_open_bad_options },
        { "/file/open/accepted-options", test_open_accepted_options },
        { "/file/open/native-needs-direct", test_open_native_needs_direct },
        { "/file/open/io-uring", test_open_io_uring },
        { "/file/open/directory", test_open_directory },
        { "/file/rw/default", test_rw_default },
        { "/file/rw/threads", test_rw_threads },
        { "/file/rw/io_uring", test_rw_io_uring },
        { "/file/rw/read-offload", test_read_offload },
        { "/file/rw/short-read", test_short_read_zero_fills },
        { "/file/direct/unaligned", test_direct_unaligned },
        { "/file/flush/no-flush", test_flush },
        { "/file/query", test_length_and_query },
        { "/file/zeroes/grow", test_zeroes_grow },
        { "/file/zeroes/unmap", test_zeroes_unmap_punches },
        { "/file/discard", test_discard },
        { "/file/block-status/sparse", test_block_status_sparse },
        { "/file/prefetch", test_prefetch },
        { "/file/prefetch/direct", test_prefetch_direct },
        { "/file/truncate", test_truncate },
        { "/file/direct-append-reserves", test_direct_append_reserves },
        { "/file/direct-overwrite-after-shrink",
          test_direct_overwrite_after_shrink },
        { "/file/truncate/read-only", test_truncate_read_only },
        { "/file/lock/second-context", test_lock_second_context },
        { "/file/lock/off", test_lock_off },
        { "/file/lock/bytes", test_lock_bytes_match_qemu },
        { "/file/lock/qemu-io-holds", test_lock_qemu_io_holds },
        { "/file/lock/qemu-refused", test_lock_qemu_refused },
    };

    return strata_test_main("file", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
