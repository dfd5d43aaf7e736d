/* Tests of StrataBackend: callback and coroutine I/O, range checks,
 * permissions, and what happens when the context goes away. */
#include <errno.h>
#include <string.h>

#include "block-private.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static StrataBackend *open_raw(const char *path, bool writable)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s", path);
    ck_assert_msg(strata_context_add_node_keyval(ctx, spec, &err), "%s",
                  err ? err->message : "");
    StrataBackend *blk = strata_backend_new(ctx, "disk", writable, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    return blk;
}

typedef struct {
    int calls;
    int ret;
    bool in_submit;
    bool called_in_submit;
} CbState;

static void cb(void *opaque, int ret)
{
    CbState *s = opaque;
    s->calls++;
    s->ret = ret;
    if (s->in_submit) {
        s->called_in_submit = true;
    }
}

START_TEST(test_aio_not_in_submit)
{
    g_autoptr(GError) err = NULL;
    ck_assert(strata_context_add_node_keyval(
        ctx, "driver=null-co,node-name=n,size=1048576,read-zeroes=on", &err));
    StrataBackend *blk = strata_backend_new(ctx, "n", false, &err);
    char buf[4096];
    struct iovec iov = { buf, sizeof(buf) };
    CbState s = { 0 };

    /* null-co completes at once; the callback must still wait for the
     * loop. */
    memset(buf, 0xff, sizeof(buf));
    s.in_submit = true;
    strata_backend_aio_preadv(blk, 0, &iov, 1, 0, cb, &s);
    s.in_submit = false;
    ck_assert_int_eq(s.calls, 0);
    strata_backend_drain(blk);
    ck_assert_int_eq(s.calls, 1);
    ck_assert(!s.called_in_submit);
    ck_assert_int_eq(s.ret, 0);
    ck_assert_uint_eq(buf[0], 0);
    ck_assert_uint_eq(buf[4095], 0);
    strata_backend_unref(blk);
}
END_TEST

typedef struct {
    StrataBackend *blk;
    unsigned char *buf;
    uint64_t next, count, done, issued;
    size_t bs;
    int errors;
    bool write;
} Pump;

static void pump_cb(void *opaque, int ret);

static void pump_issue(Pump *p)
{
    uint64_t i = p->issued++;
    struct iovec *iov = g_new(struct iovec, 1);
    iov->iov_base = p->buf + (i % 64) * p->bs;
    iov->iov_len = p->bs;
    /* The iovec array must stay valid until the callback: freed there. */
    void **ctxp = g_new(void *, 2);
    ctxp[0] = p;
    ctxp[1] = iov;
    if (p->write) {
        strata_backend_aio_pwritev(p->blk, (i * p->bs) % (1 << 20), iov, 1,
                                   0, pump_cb, ctxp);
    } else {
        strata_backend_aio_preadv(p->blk, (i * p->bs) % (1 << 20), iov, 1, 0,
                                  pump_cb, ctxp);
    }
}

static void pump_cb(void *opaque, int ret)
{
    void **ctxp = opaque;
    Pump *p = ctxp[0];
    g_free(ctxp[1]);
    g_free(ctxp);
    p->done++;
    if (ret < 0) {
        p->errors++;
    }
    if (p->issued < p->count) {
        pump_issue(p);
    }
}

START_TEST(test_aio_depth)
{
    g_autofree char *path = strata_test_make_file(dir, "a.raw", 1 << 20,
                                                  true);
    StrataBackend *blk = open_raw(path, true);
    g_autofree unsigned char *buf = g_malloc(64 * 4096);
    Pump p = { blk, buf, 0, 4000, 0, 0, 4096, 0, true };

    memset(buf, 0x5a, 64 * 4096);
    for (int i = 0; i < 32; i++) {
        pump_issue(&p);
    }
    strata_backend_drain(blk);
    ck_assert_uint_eq(p.done, 4000);
    ck_assert_int_eq(p.errors, 0);
    ck_assert_int_eq(strata_backend_flush(blk), 0);

    /* Read everything back through the coroutine-style path. */
    g_autofree unsigned char *rb = g_malloc(1 << 20);
    ck_assert_int_eq(strata_backend_pread(blk, 0, rb, 1 << 20), 0);
    g_autofree unsigned char *want = g_malloc(1 << 20);
    memset(want, 0x5a, 1 << 20);
    ck_assert(memcmp(rb, want, 1 << 20) == 0);
    strata_backend_unref(blk);
}
END_TEST

START_TEST(test_range_and_perm)
{
    g_autofree char *path = strata_test_make_file(dir, "b.raw", 65536, true);
    StrataBackend *ro = open_raw(path, false);
    char buf[512] = { 0 };

    ck_assert_int_eq(strata_backend_get_length(ro), 65536);
    ck_assert_int_eq(strata_backend_pread(ro, 65536 - 512, buf, 512), 0);
    /* Past the end of the disk: -EIO, as a guest would see it. */
    ck_assert_int_eq(strata_backend_pread(ro, 65536 - 511, buf, 512), -EIO);
    ck_assert_int_eq(strata_backend_pread(ro, UINT64_MAX - 10, buf, 512),
                     -EIO);
    /* A read-only backend cannot write. */
    ck_assert_int_eq(strata_backend_pwrite(ro, 0, buf, 512, 0), -EPERM);
    strata_backend_unref(ro);
}
END_TEST

START_TEST(test_context_free_ejects)
{
    g_autofree char *path = strata_test_make_file(dir, "c.raw", 65536, true);
    StrataBackend *blk = open_raw(path, true);
    char buf[512];

    ck_assert_ptr_nonnull(strata_backend_get_node(blk));
    strata_context_free(ctx);
    ctx = NULL;
    /* The handle outlives the context, without a medium. */
    ck_assert_ptr_null(strata_backend_get_node(blk));
    ck_assert_int_eq(strata_backend_get_length(blk), -ENOMEDIUM);
    strata_backend_unref(blk);
    (void)buf;
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/backend/aio/not-in-submit", test_aio_not_in_submit },
        { "/backend/aio/depth", test_aio_depth },
        { "/backend/range-and-perm", test_range_and_perm },
        { "/backend/context-free", test_context_free_ejects },
    };

    return strata_test_main("backend", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
