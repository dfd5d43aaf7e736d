/* Tests of the request path: alignment padding, read-modify-write
 * serialisation, reads past the end, zero detection, write-zeroes,
 * flush, block status. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "block-private.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static StrataNode *open_file(const char *path, const char *extra)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s%s%s", path, extra ? "," : "",
        extra ? extra : "");
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
    return n;
}

static void read_file(const char *path, void *buf, size_t len, off_t off)
{
    int fd = open(path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, buf, len, off), (ssize_t)len);
    close(fd);
}

static unsigned char pat(size_t i)
{
    return (unsigned char)(i * 7 + 1);
}

/* ---- odd-sized requests on an O_DIRECT node ---- */

typedef struct {
    StrataNode *node;
    const char *path;
} IoEnv;

static void unaligned_co(void *opaque)
{
    IoEnv *e = opaque;
    unsigned char buf[9000];

    ck_assert_uint_ge(e->node->limits.request_alignment, 512);

    /* One byte at offset 3. */
    ck_assert_int_eq(strata_node_co_pread(e->node, 3, 1, buf, 0), 0);
    ck_assert_uint_eq(buf[0], pat(3));

    /* Across a 4 KiB boundary, from an odd buffer address. */
    ck_assert_int_eq(strata_node_co_pread(e->node, 4095, 5001, buf + 1, 0),
                     0);
    for (size_t i = 0; i < 5001; i++) {
        ck_assert_uint_eq(buf[1 + i], pat(4095 + i));
    }

    /* Unaligned write: the bytes around it must survive. */
    memset(buf, 0xab, 777);
    ck_assert_int_eq(strata_node_co_pwrite(e->node, 1000, 777, buf, 0), 0);
    ck_assert_int_eq(strata_node_co_flush(e->node), 0);
}

START_TEST(test_unaligned_direct)
{
    g_autofree char *path = strata_test_make_file(dir, "a.raw", 65536, true);
    IoEnv e = { open_file(path, "cache.direct=on"), path };
    unsigned char buf[4096];

    strata_loop_run_co(ctx->loop, unaligned_co, &e);
    read_file(path, buf, sizeof(buf), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        unsigned char want = (i >= 1000 && i < 1777) ? 0xab : pat(i);
        ck_assert_msg(buf[i] == want, "byte %zu: %u != %u", i, buf[i], want);
    }
}
END_TEST

/* ---- concurrent read-modify-writes of one block must not lose data ---- */

typedef struct {
    StrataNode *node;
    uint64_t off;
    unsigned char val;
    int ret;
    bool done;
} RmwReq;

static void rmw_co(void *opaque)
{
    RmwReq *r = opaque;
    unsigned char b[100];
    memset(b, r->val, sizeof(b));
    r->ret = strata_node_co_pwrite(r->node, r->off, sizeof(b), b, 0);
    r->done = true;
}

START_TEST(test_rmw_serialised)
{
    g_autofree char *path = strata_test_make_file(dir, "b.raw", 65536, false);
    StrataNode *n = open_file(path, "cache.direct=on");
    RmwReq reqs[8];
    unsigned char buf[4096];

    /* Eight writers of 100 bytes each inside the same 4 KiB block, all
     * started before any finishes. */
    for (int i = 0; i < 8; i++) {
        reqs[i] = (RmwReq){ n, 200 + i * 300, (unsigned char)(0x10 + i), 0,
                            false };
        strata_coroutine_enter(strata_coroutine_new(rmw_co, &reqs[i]));
    }
    for (int i = 0; i < 8; i++) {
        while (!reqs[i].done) {
            strata_loop_iterate(ctx->loop, true);
        }
        ck_assert_int_eq(reqs[i].ret, 0);
    }
    read_file(path, buf, sizeof(buf), 0);
    for (int i = 0; i < 8; i++) {
        for (int k = 0; k < 100; k++) {
            ck_assert_uint_eq(buf[200 + i * 300 + k], 0x10 + i);
        }
    }
    ck_assert_uint_eq(buf[0], 0);
    ck_assert_uint_eq(buf[199], 0);
    ck_assert_uint_eq(buf[300], 0);
}
END_TEST

/* ---- reads past the end, writes that grow a protocol node ---- */

static void eof_co(void *opaque)
{
    IoEnv *e = opaque;
    unsigned char buf[8192];

    memset(buf, 0xee, sizeof(buf));
    /* 1000 bytes of file, then zeroes. */
    ck_assert_int_eq(strata_node_co_pread(e->node, 0, 8192, buf, 0), 0);
    for (size_t i = 0; i < 1000; i++) {
        ck_assert_uint_eq(buf[i], pat(i));
    }
    for (size_t i = 1000; i < 8192; i++) {
        ck_assert_uint_eq(buf[i], 0);
    }
    /* A write past the end grows the node (formats append clusters). */
    memset(buf, 0x77, 100);
    ck_assert_int_eq(strata_node_co_pwrite(e->node, 5000, 100, buf, 0), 0);
    ck_assert_int_eq(strata_node_get_length(e->node), 5100);
    ck_assert_int_eq(strata_node_co_refresh_length(e->node), 5100);
}

START_TEST(test_eof)
{
    g_autofree char *path = strata_test_make_file(dir, "c.raw", 1000, true);
    IoEnv e = { open_file(path, NULL), path };
    strata_loop_run_co(ctx->loop, eof_co, &e);
}
END_TEST

/* ---- write-zeroes at odd offsets; detect-zeroes ---- */

static void zeroes_co(void *opaque)
{
    IoEnv *e = opaque;
    ck_assert_int_eq(strata_node_co_pwrite_zeroes(e->node, 10, 5000, 0), 0);
    ck_assert_int_eq(strata_node_co_pwrite_zeroes(e->node, 65536, 65536,
                                                  STRATA_REQ_MAY_UNMAP), 0);
}

START_TEST(test_write_zeroes)
{
    g_autofree char *path = strata_test_make_file(dir, "d.raw", 262144, true);
    IoEnv e = { open_file(path, "cache.direct=on,discard=unmap"), path };
    unsigned char buf[262144];

    strata_loop_run_co(ctx->loop, zeroes_co, &e);
    read_file(path, buf, sizeof(buf), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        bool zero = (i >= 10 && i < 5010) || (i >= 65536 && i < 131072);
        /* One assertion per failure only: each costs a syscall. */
        if (buf[i] != (zero ? 0 : pat(i))) {
            ck_abort_msg("byte %zu: %u", i, buf[i]);
        }
    }
}
END_TEST

static void detect_co(void *opaque)
{
    IoEnv *e = opaque;
    g_autofree unsigned char *z = g_malloc0(1 << 20);
    ck_assert_int_eq(strata_node_co_pwrite(e->node, 0, 1 << 20, z, 0), 0);
}

START_TEST(test_detect_zeroes_unmap)
{
    g_autofree char *path = strata_test_make_file(dir, "e.raw", 1 << 20,
                                                  true);
    IoEnv e = { open_file(path, "discard=unmap,detect-zeroes=unmap"), path };
    struct stat st;

    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_ge(st.st_blocks * 512, 1 << 20);
    strata_loop_run_co(ctx->loop, detect_co, &e);
    /* A zero buffer became a hole punch rather than a data write. */
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_lt(st.st_blocks * 512, 1 << 19);
    ck_assert_int_eq(st.st_size, 1 << 20);
}
END_TEST

/* ---- read-only nodes refuse writes with -EPERM ---- */

static void ro_co(void *opaque)
{
    IoEnv *e = opaque;
    char b[512] = { 0 };
    ck_assert_int_eq(strata_node_co_pwrite(e->node, 0, 512, b, 0), -EPERM);
    ck_assert_int_eq(strata_node_co_pwrite_zeroes(e->node, 0, 512, 0),
                     -EPERM);
    ck_assert_int_eq(strata_node_co_pdiscard(e->node, 0, 512), -EPERM);
    ck_assert_int_eq(strata_node_co_pread(e->node, 0, 512, b, 0), 0);
}

START_TEST(test_read_only)
{
    g_autofree char *path = strata_test_make_file(dir, "f.raw", 4096, true);
    IoEnv e = { open_file(path, "read-only=on"), path };
    strata_loop_run_co(ctx->loop, ro_co, &e);
}
END_TEST

/* ---- errors from below reach the caller: blkdebug injects them ---- */

static void eio_co(void *opaque)
{
    IoEnv *e = opaque;
    char b[4096];
    ck_assert_int_eq(strata_node_co_pread(e->node, 0, 4096, b, 0), -EIO);
    ck_assert_int_eq(strata_node_co_flush(e->node), -ENOSPC);
    /* Writes were not targeted. */
    ck_assert_int_eq(strata_node_co_pwrite(e->node, 0, 4096, b, 0), 0);
}

START_TEST(test_errors_propagate)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = strata_test_make_file(dir, "g.raw", 65536, true);
    g_autofree char *spec = g_strdup_printf(
        "{\"driver\": \"blkdebug\", \"node-name\": \"dbg\", "
        "\"inject-error\": [{\"event\": \"read_aio\", \"errno\": 5}, "
        "{\"event\": \"flush_to_disk\", \"errno\": 28}], "
        "\"image\": {\"driver\": \"file\", \"filename\": \"%s\"}}", path);
    IoEnv e = { strata_context_add_node_keyval(ctx, spec, &err), path };
    ck_assert_msg(e.node, "%s", err ? err->message : "");
    strata_loop_run_co(ctx->loop, eio_co, &e);
}
END_TEST

/* ---- block status on a sparse file ---- */

static void status_co(void *opaque)
{
    IoEnv *e = opaque;
    uint64_t pnum, map;
    StrataNode *file;
    int ret;

    ret = strata_node_co_block_status(e->node, true, 0, 1 << 20, &pnum, &map,
                                      &file);
    ck_assert_int_ge(ret, 0);
    ck_assert(ret & STRATA_BLOCK_DATA);
    ck_assert(ret & STRATA_BLOCK_ALLOCATED);
    ck_assert_uint_eq(pnum, 65536);
    ck_assert_uint_eq(map, 0);

    ret = strata_node_co_block_status(e->node, true, 65536, 1 << 20, &pnum,
                                      &map, &file);
    ck_assert_int_ge(ret, 0);
    ck_assert(ret & STRATA_BLOCK_ZERO);
    ck_assert(!(ret & STRATA_BLOCK_DATA));
    ck_assert_uint_eq(pnum, (1 << 20) - 65536);
    ck_assert(ret & STRATA_BLOCK_EOF);

    /* Past the end: nothing. */
    ret = strata_node_co_block_status(e->node, true, 1 << 20, 512, &pnum,
                                      NULL, NULL);
    ck_assert_int_eq(ret, STRATA_BLOCK_EOF);
    ck_assert_uint_eq(pnum, 0);
}

START_TEST(test_block_status)
{
    g_autofree char *path = strata_test_make_file(dir, "h.raw", 1 << 20,
                                                  false);
    unsigned char data[65536];
    int fd = open(path, O_WRONLY);
    memset(data, 1, sizeof(data));
    ck_assert_int_eq(pwrite(fd, data, sizeof(data), 0), sizeof(data));
    fsync(fd);
    close(fd);
    IoEnv e = { open_file(path, NULL), path };
    strata_loop_run_co(ctx->loop, status_co, &e);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/io/align/direct", test_unaligned_direct },
        { "/io/align/rmw-serialised", test_rmw_serialised },
        { "/io/eof", test_eof },
        { "/io/zeroes/write", test_write_zeroes },
        { "/io/zeroes/detect-unmap", test_detect_zeroes_unmap },
        { "/io/read-only", test_read_only },
        { "/io/errors/propagate", test_errors_propagate },
        { "/io/block-status/sparse", test_block_status },
    };

    return strata_test_main("io", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
