/* Tests of the raw format: plain pass-through, the offset/size window and
 * its errors, block status through the window, resizing, direct writes
 * into the file under it.  (Streamed reads through raw are tested over
 * NBD, in test-nbd-client.) */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "driver.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static unsigned char pat(size_t i)
{
    return (unsigned char)(i * 7 + 1);
}

static StrataNode *open_raw(const char *path, const char *extra)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s%s%s",
        path, extra ? "," : "", extra ? extra : "");
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
    return n;
}

static void expect_error(const char *path, const char *extra,
                         const char *want)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s,%s",
        path, extra);

    ck_assert_msg(!strata_context_add_node_keyval(ctx, spec, &err),
                  "%s opened", spec);
    ck_assert_msg(strstr(err->message, want), "'%s' lacks '%s'",
                  err->message, want);
    ck_assert_ptr_null(strata_context_find_node(ctx, "disk"));
}

static void read_plain(const char *path, void *buf, size_t len, off_t off)
{
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, buf, len, off), (ssize_t)len);
    close(fd);
}

static StrataBackend *backend(bool writable)
{
    g_autoptr(GError) err = NULL;
    StrataBackend *b = strata_backend_new(ctx, "disk", writable, &err);

    ck_assert_msg(b, "%s", err ? err->message : "");
    return b;
}

typedef struct {
    StrataNode *node;
    int op; /* 0 status, 1 truncate, 2 zeroes, 3 discard */
    uint64_t offset, bytes, pnum, map;
    StrataNode *file;
    GError *error;
    int ret;
} Call;

static void call_co(void *opaque)
{
    Call *c = opaque;

    switch (c->op) {
    case 0:
        c->ret = strata_node_co_block_status(c->node, true, c->offset,
                                             c->bytes, &c->pnum, &c->map,
                                             &c->file);
        break;
    case 1:
        c->ret = strata_node_co_truncate(c->node, c->offset, true,
                                         &c->error);
        break;
    case 2:
        c->ret = strata_node_co_pwrite_zeroes(c->node, c->offset, c->bytes,
                                              0);
        break;
    case 3:
        c->ret = strata_node_co_pdiscard(c->node, c->offset, c->bytes);
        break;
    }
}

static void run(Call *c)
{
    strata_loop_run_co(ctx->loop, call_co, c);
}

START_TEST(test_passthrough)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 65536, true);
    StrataNode *n = open_raw(path, NULL);
    StrataBackend *b = backend(true);
    unsigned char buf[1000], back[1000];
    g_autoptr(JsonObject) img = json_object_new();

    ck_assert_int_eq(strata_node_get_length(n), 65536);
    ck_assert_str_eq(n->filename, path);
    ck_assert_int_eq(strata_backend_pread(b, 100, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], pat(100 + i));
    }
    memset(buf, 0x3c, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 777, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    read_plain(path, back, sizeof(back), 777);
    ck_assert_int_eq(memcmp(buf, back, sizeof(buf)), 0);

    n->drv->query_image(n, img);
    ck_assert_str_eq(json_object_get_string_member(img, "format"), "raw");
    ck_assert_int_eq(json_object_get_int_member(img, "virtual-size"), 65536);
    ck_assert(json_object_has_member(img, "actual-size"));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_window)
{
    g_autofree char *path = strata_test_make_file(dir, "w.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=4096,size=8192");
    StrataBackend *b = backend(true);
    unsigned char buf[512], back[512];

    ck_assert_int_eq(strata_node_get_length(n), 8192);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], pat(4096 + i));
    }
    /* Writes land shifted, and stay inside the window. */
    memset(buf, 0x77, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 8192 - 512, buf, 512, 0), 0);
    read_plain(path, back, sizeof(back), 4096 + 8192 - 512);
    ck_assert_int_eq(memcmp(buf, back, sizeof(buf)), 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], pat(4096 + 8192));
    ck_assert_int_lt(strata_backend_pwrite(b, 8192 - 256, buf, 512, 0), 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], pat(4096 + 8192));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_offset_only)
{
    g_autofree char *path = strata_test_make_file(dir, "o.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=1000");
    StrataBackend *b = backend(false);
    unsigned char c;

    ck_assert_int_eq(strata_node_get_length(n), 65536 - 1000);
    ck_assert_int_eq(strata_backend_pread(b, 0, &c, 1), 0);
    ck_assert_uint_eq(c, pat(1000));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_window_errors)
{
    g_autofree char *path = strata_test_make_file(dir, "e.img", 65536, true);

    expect_error(path, "offset=70000",
                 "Offset (70000) cannot be greater than size of the "
                 "containing file (65536)");
    expect_error(path, "offset=4096,size=65536",
                 "The sum of offset (4096) and size (65536) has to be "
                 "smaller or equal to the actual size of the containing "
                 "file (65536)");
    expect_error(path, "size=65537", "(65537)");
    expect_error(path, "offset=abc", "'offset'");
    expect_error(path, "size=-1", "'size'");
    expect_error(path, "bogus=1", "'bogus'");
}
END_TEST

START_TEST(test_missing_child)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *nope = g_build_filename(dir, "nope.img", NULL);
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s", nope);

    ck_assert_ptr_null(strata_context_add_node_keyval(
        ctx, "driver=raw,node-name=disk", &err));
    ck_assert_msg(strstr(err->message, "'file'"), "%s", err->message);
    g_clear_error(&err);
    ck_assert_ptr_null(strata_context_add_node_keyval(ctx, spec, &err));
    ck_assert_msg(strstr(err->message, "No such file or directory"), "%s",
                  err->message);
    g_clear_error(&err);
    ck_assert_ptr_null(strata_context_add_node_keyval(
        ctx, "driver=raw,node-name=disk,file=nosuchnode", &err));
}
END_TEST

START_TEST(test_block_status_window)
{
    g_autofree char *path = strata_test_make_file(dir, "h.img", 1 << 20,
                                                  false);
    unsigned char data[65536];
    int fd = open(path, O_RDWR);
    StrataNode *n;
    Call c;

    memset(data, 1, sizeof(data));
    ck_assert_int_eq(pwrite(fd, data, sizeof(data), 131072), sizeof(data));
    close(fd);
    n = open_raw(path, "offset=65536");

    /* [0, 64K) of the image is a hole of the file at 64K. */
    c = (Call) { .node = n, .op = 0, .offset = 0, .bytes = 1 << 19 };
    run(&c);
    ck_assert_int_ge(c.ret, 0);
    ck_assert(c.ret & STRATA_BLOCK_ZERO);
    ck_assert(!(c.ret & STRATA_BLOCK_DATA));
    ck_assert_uint_eq(c.pnum, 65536);
    ck_assert_uint_eq(c.map, 65536);
    ck_assert_ptr_eq(c.file, n->file->node);

    c = (Call) { .node = n, .op = 0, .offset = 65536, .bytes = 1 << 19 };
    run(&c);
    ck_assert(c.ret & STRATA_BLOCK_DATA);
    ck_assert_uint_eq(c.pnum, 65536);
    ck_assert_uint_eq(c.map, 131072);
}
END_TEST

START_TEST(test_zeroes_discard_shifted)
{
    g_autofree char *path = strata_test_make_file(dir, "z.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=4096,file.discard=unmap,"
                             "discard=unmap");
    unsigned char back[4096];
    Call c = { .node = n, .op = 2, .offset = 0, .bytes = 4096 };

    run(&c);
    ck_assert_int_eq(c.ret, 0);
    read_plain(path, back, sizeof(back), 4096);
    for (size_t i = 0; i < sizeof(back); i++) {
        ck_assert_uint_eq(back[i], 0);
    }
    read_plain(path, back, 1, 0);
    ck_assert_uint_eq(back[0], pat(0));

    c = (Call) { .node = n, .op = 3, .offset = 8192, .bytes = 8192 };
    run(&c);
    ck_assert_int_eq(c.ret, 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], 0);
    read_plain(path, back, 1, 8192);
    ck_assert_uint_eq(back[0], pat(8192));
}
END_TEST

START_TEST(test_truncate)
{
    g_autofree char *path = strata_test_make_file(dir, "t.img", 65536, true);
    g_autofree char *p2 = strata_test_make_file(dir, "t2.img", 65536, true);
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=fixed,size=4096,file.driver=file,"
        "file.filename=%s", p2);
    g_autoptr(GError) err = NULL;
    StrataNode *n = open_raw(path, NULL);
    StrataNode *fixed = strata_context_add_node_keyval(ctx, spec, &err);
    struct stat st;
    Call c = { .node = n, .op = 1, .offset = 1 << 20 };

    run(&c);
    ck_assert_int_eq(c.ret, 0);
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_size, 1 << 20);
    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);

    ck_assert_ptr_nonnull(fixed);
    c = (Call) { .node = fixed, .op = 1, .offset = 8192 };
    run(&c);
    ck_assert_int_lt(c.ret, 0);
    ck_assert_str_eq(c.error->message, "Cannot resize fixed-size raw disks");
    g_clear_error(&c.error);
    ck_assert_int_eq(stat(p2, &st), 0);
    ck_assert_int_eq(st.st_size, 65536);
}
END_TEST

/* ---- direct writes (strata_node_co_direct_write_begin) ---- */

typedef struct {
    StrataNode *node;
    StrataBackend *blk;     /* begins through it when set */
    uint64_t offset, bytes;
    StrataDirectWrite dw;
    bool end;               /* ends @dw instead */
    int ret;
} DirectCall;

static void direct_co(void *opaque)
{
    DirectCall *d = opaque;

    if (d->end) {
        if (d->blk) {
            strata_backend_co_direct_write_end(d->blk, &d->dw);
        } else {
            strata_node_co_direct_write_end(&d->dw);
        }
    } else if (d->blk) {
        d->ret = strata_backend_co_direct_write_begin(d->blk, d->offset,
                                                      d->bytes, &d->dw);
    } else {
        d->ret = strata_node_co_direct_write_begin(d->node, d->offset,
                                                   d->bytes, &d->dw);
    }
}

static int direct_begin(DirectCall *d)
{
    d->end = false;
    strata_loop_run_co(ctx->loop, direct_co, d);
    return d->ret;
}

static void direct_end(DirectCall *d)
{
    d->end = true;
    strata_loop_run_co(ctx->loop, direct_co, d);
}

/* What another thread did through a direct write, and what it got. */
typedef struct {
    const StrataDirectWrite *dw;
    int ret_data, ret_zero, ret_past, ret_before, ret_null;
} DirectThread;

static gpointer direct_thread(gpointer opaque)
{
    DirectThread *t = opaque;
    uint8_t buf[8192];

    memset(buf, 0x5a, sizeof(buf));
    t->ret_data = strata_direct_write(t->dw, 8192, buf, sizeof(buf));
    t->ret_zero = strata_direct_write_zeroes(t->dw, 16384, 4096);
    /* Past the range's end, and before its start. */
    t->ret_past = strata_direct_write(t->dw, 8192 + 16384 - 100, buf, 200);
    t->ret_before = strata_direct_write(t->dw, 4096, buf, 4096);
    t->ret_null = strata_direct_write(t->dw, 8192, NULL, 4096);
    return NULL;
}

/* The I/O the loop did for a flush of @b (ring requests and thread
 * jobs): none when nothing was written since the last one. */
static uint64_t flush_io(StrataBackend *b)
{
    StrataLoopStats s0, s1;

    strata_loop_get_stats(ctx->loop, &s0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    strata_loop_get_stats(ctx->loop, &s1);
    return (s1.sqes - s0.sqes) + (s1.thread_jobs - s0.thread_jobs);
}

/* A range of a raw node with a window, written from another thread
 * straight into the file: the bytes land at the window's offset, the
 * zeroes too, nothing outside the range is written or allowed; the
 * request counts in flight until it ends, and the next flush makes it
 * stable (the file does not take it for nothing written). */
START_TEST(test_direct_write)
{
    g_autofree char *path = strata_test_make_file(dir, "d.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=4096,size=32768");
    StrataBackend *b = backend(true);
    DirectCall d = { .node = n, .blk = b, .offset = 8192, .bytes = 16384 };
    DirectThread t = { .dw = &d.dw };
    g_autofree uint8_t *back = g_malloc(65536);

    flush_io(b);
    ck_assert_uint_eq(flush_io(b), 0);
    ck_assert_int_eq(direct_begin(&d), 0);
    ck_assert_ptr_eq(d.dw.file, n->file->node);
    ck_assert_uint_eq(d.dw.file_offset, 4096 + 8192);
    ck_assert_uint_gt(n->in_flight, 0);
    g_thread_join(g_thread_new("direct", direct_thread, &t));
    ck_assert_int_eq(t.ret_data, 0);
    ck_assert_int_eq(t.ret_zero, 0);
    ck_assert_int_eq(t.ret_past, -EINVAL);
    ck_assert_int_eq(t.ret_before, -EINVAL);
    ck_assert_int_eq(t.ret_null, -EINVAL);
    direct_end(&d);
    ck_assert_uint_eq(n->in_flight, 0);
    ck_assert_ptr_null(d.dw.node);
    ck_assert_uint_gt(flush_io(b), 0);
    ck_assert_uint_eq(flush_io(b), 0);

    read_plain(path, back, 65536, 0);
    for (size_t i = 0; i < 65536; i++) {
        unsigned char want = pat(i);

        if (i >= 4096 + 8192 && i < 4096 + 16384) {
            want = 0x5a;
        } else if (i >= 4096 + 16384 && i < 4096 + 16384 + 4096) {
            want = 0;
        }
        ck_assert_msg(back[i] == want, "byte %zu: %u, not %u", i, back[i],
                      want);
    }
    /* The backend checks its range first; the node refuses a range past
     * its end (a direct write never grows the file), and no bytes. */
    d = (DirectCall){ .node = n, .blk = b, .offset = 30000, .bytes = 8192 };
    ck_assert_int_eq(direct_begin(&d), -EIO);
    d.blk = NULL;
    ck_assert_int_eq(direct_begin(&d), -ENOTSUP);
    d.bytes = 0;
    ck_assert_int_eq(direct_begin(&d), -EINVAL);
    ck_assert_uint_eq(n->in_flight, 0);
    strata_backend_unref(b);
}
END_TEST

/* Where the bytes must not go straight into the file: a node that must
 * see them (detect-zeroes), a read-only one, O_DIRECT, a node with no
 * file (null-co).  Each says so before anything is written, and leaves
 * nothing in flight. */
START_TEST(test_direct_write_refused)
{
    g_autofree char *path = strata_test_make_file(dir, "r.img", 65536, true);
    g_autoptr(GError) err = NULL;
    struct {
        const char *spec;
        int want;
    } cases[] = {
        { "driver=raw,node-name=n0,detect-zeroes=on,"
          "file.driver=file,file.filename=%s", -ENOTSUP },
        { "driver=raw,node-name=n1,read-only=on,"
          "file.driver=file,file.filename=%s", -EPERM },
        { "driver=raw,node-name=n2,file.driver=file,file.filename=%s,"
          "file.cache.direct=on", -ENOTSUP },
        { "driver=null-co,node-name=n3,size=65536", -ENOTSUP },
        { "driver=raw,node-name=n4,file.driver=null-co,file.size=65536",
          -ENOTSUP },
    };

    for (unsigned i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *spec = g_strdup_printf(cases[i].spec, path);
        StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);
        DirectCall d;

        if (!n && i == 2) {
            /* No O_DIRECT where the test runs. */
            g_clear_error(&err);
            continue;
        }
        ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
        d = (DirectCall){ .node = n, .offset = 0, .bytes = 4096 };
        ck_assert_int_eq(direct_begin(&d), cases[i].want);
        ck_assert_ptr_null(d.dw.node);
        ck_assert_uint_eq(n->in_flight, 0);
    }
}
END_TEST

/* Whether files in @where can have holes punched in them. */
static bool can_punch(const char *where)
{
    g_autofree char *path = strata_test_make_file(where, "probe.img", 65536,
                                                  true);
    int fd = open(path, O_RDWR);
    bool ok = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                        65536) == 0 &&
              lseek(fd, 0, SEEK_HOLE) == 0;

    close(fd);
    unlink(path);
    return ok;
}

/* Zeroes through a direct write punch a hole where the file's node
 * unmaps (discard=unmap) and write zeroes where it does not; both read
 * back as zeroes. */
START_TEST(test_direct_write_punch)
{
    for (int unmap = 0; unmap < 2; unmap++) {
        g_autofree char *name = g_strdup_printf("p%d.img", unmap);
        g_autofree char *path = strata_test_make_file(dir, name, 262144,
                                                      true);
        g_autofree char *spec = g_strdup_printf(
            "driver=raw,node-name=p%d,file.driver=file,file.filename=%s%s",
            unmap, path, unmap ? ",file.discard=unmap" : "");
        g_autoptr(GError) err = NULL;
        StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);
        DirectCall d = { .node = n, .offset = 0, .bytes = 262144 };
        uint8_t back[131072];
        int fd;
        off_t hole;

        ck_assert_msg(n, "%s", err ? err->message : "");
        ck_assert_int_eq(direct_begin(&d), 0);
        ck_assert(d.dw.punch == (unmap == 1));
        ck_assert_int_eq(strata_direct_write_zeroes(&d.dw, 0, 131072), 0);
        direct_end(&d);
        read_plain(path, back, sizeof(back), 0);
        for (size_t i = 0; i < sizeof(back); i++) {
            ck_assert_uint_eq(back[i], 0);
        }
        fd = open(path, O_RDONLY);
        hole = lseek(fd, 0, SEEK_HOLE);
        close(fd);
        if (!unmap) {
            /* Written, not deallocated. */
            ck_assert_int_ge(hole, 131072);
        } else if (can_punch(dir)) {
            ck_assert_int_eq(hole, 0);
        } else {
            /* A file system that cannot punch writes zeroes instead. */
            ck_assert_int_ge(hole, 131072);
        }
    }
}
END_TEST

START_TEST(test_read_only_child)
{
    g_autofree char *path = strata_test_make_file(dir, "r.img", 65536, true);
    StrataNode *n = open_raw(path, "read-only=on");
    g_autoptr(GError) err = NULL;

    /* The nested file inherits read-only, so a writer is refused. */
    ck_assert(n->file->node->read_only);
    ck_assert_ptr_null(strata_backend_new(ctx, "disk", true, &err));
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/raw/passthrough", test_passthrough },
        { "/raw/window", test_window },
        { "/raw/window/offset-only", test_offset_only },
        { "/raw/window/errors", test_window_errors },
        { "/raw/missing-child", test_missing_child },
        { "/raw/block-status", test_block_status_window },
        { "/raw/zeroes-discard", test_zeroes_discard_shifted },
        { "/raw/truncate", test_truncate },
        { "/raw/read-only", test_read_only_child },
        { "/raw/direct-write", test_direct_write },
        { "/raw/direct-write/refused", test_direct_write_refused },
        { "/raw/direct-write/punch", test_direct_write_punch },
    };

    return strata_test_main("raw", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
