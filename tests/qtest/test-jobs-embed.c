/* A guest writing through the embedding API (a StrataBackend, in
 * process) while a stream or an intermediate commit runs, both driven by
 * the in-process monitor.  The guest's view is checked in process, and
 * the images afterwards with qemu-img compare against the chain with the
 * same writes applied offline. */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "strata.h"
#include "../unit/test-util.h"

#define MiB (1024 * 1024)

static int sh(const char *dir, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static int sh(const char *dir, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *full = NULL;
    g_autofree char *err = NULL;
    int status = -1;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    full = g_strdup_printf("cd '%s' && %s", dir, cmd);
    {
        char *argv[] = { "/bin/sh", "-c", full, NULL };
        g_spawn_sync(NULL, argv, NULL, 0, NULL, NULL, NULL, &err, &status,
                     NULL);
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        fprintf(stderr, "command failed: %s\n%s", cmd, err ? err : "");
        return 1;
    }
    return 0;
}

static void exec_ok(StrataMonitor *mon, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
static void exec_ok(StrataMonitor *mon, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *reply = NULL;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    reply = strata_monitor_execute(mon, cmd);
    ck_assert_msg(g_str_has_prefix(reply, "{\"return\""), "%s -> %s", cmd,
                  reply);
}

typedef struct {
    bool completed;
    bool failed;
} Watch;

static void on_event(StrataMonitor *mon, const char *ev, void *opaque)
{
    Watch *w = opaque;

    if (strstr(ev, "\"event\": \"BLOCK_JOB_COMPLETED\"")) {
        w->completed = true;
        w->failed = strstr(ev, "\"error\"") != NULL;
    }
}

typedef struct {
    uint64_t offset, bytes;
    int pattern;
} GuestWrite;

static const GuestWrite writes[] = {
    { 0, MiB, 0x44 },              /* over base's data */
    { 4 * MiB + 256 * 1024, 64 * 1024, 0x45 }, /* inside mid's extent */
    { 6 * MiB + 4096, 4096, 0x46 },           /* partial cluster of top */
    { 12 * MiB, 2 * MiB, 0x47 },   /* across mid's data and a hole */
};

static void guest_writes_embedded(bool commit)
{
    g_autofree char *dir = g_dir_make_tmp("strata-embed-XXXXXX", NULL);
    g_autoptr(GError) err = NULL;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    Watch w = { false, false };
    g_autofree uint8_t *buf = g_malloc(2 * MiB);
    g_autofree uint8_t *view = g_malloc(16 * MiB);
    g_autofree char *ref = NULL;
    gsize ref_len = 0;

    ck_assert(dir);
    if (sh(dir, "command -v qemu-img >/dev/null && "
                "command -v qemu-io >/dev/null") != 0) {
        g_rmdir(dir);
        return;
    }
    ck_assert_int_eq(sh(dir, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                             "qemu-io -c 'write -P 0x11 0 8M' base.qcow2 && "
                             "qemu-img create -q -f qcow2 -F qcow2 -b "
                             "base.qcow2 mid.qcow2 && "
                             "qemu-io -c 'write -P 0x22 4M 4M' "
                             "-c 'write -P 0x23 12M 1M' mid.qcow2 && "
                             "qemu-img create -q -f qcow2 -F qcow2 -b "
                             "mid.qcow2 top.qcow2 && "
                             "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                             "qemu-img convert -O raw top.qcow2 ref.raw "
                             ">/dev/null"), 0);

    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    mon = strata_monitor_new(ctx);
    strata_monitor_set_event_func(mon, on_event, &w, NULL);
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
                 "\"file\", \"filename\": \"%s/base.qcow2\"}}}", dir);
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"qcow2\", \"node-name\": \"mid\", \"backing\": \"base\", "
                 "\"file\": {\"driver\": \"file\", \"filename\": "
                 "\"%s/mid.qcow2\"}}}", dir);
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"qcow2\", \"node-name\": \"top\", \"backing\": \"mid\", "
                 "\"file\": {\"driver\": \"file\", \"filename\": "
                 "\"%s/top.qcow2\"}}}", dir);
    blk = strata_backend_new(ctx, "top", true, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");

    /* 64 KiB/s: one chunk, then asleep for seconds while the guest
     * writes. */
    if (commit) {
        exec_ok(mon, "{\"execute\": \"block-commit\", \"arguments\": "
                     "{\"job-id\": \"j\", \"device\": \"top\", \"top-node\": "
                     "\"mid\", \"base-node\": \"base\", \"backing-file\": "
                     "\"base.qcow2\", \"speed\": 65536}}");
    } else {
        exec_ok(mon, "{\"execute\": \"block-stream\", \"arguments\": "
                     "{\"job-id\": \"j\", \"device\": \"top\", \"speed\": "
                     "65536}}");
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(writes); i++) {
        const GuestWrite *g = &writes[i];

        memset(buf, g->pattern, g->bytes);
        ck_assert_int_eq(strata_backend_pwrite(blk, g->offset, buf, g->bytes,
                                               0), 0);
        ck_assert_int_eq(sh(dir, "qemu-io -f raw -c 'write -P %d %"
                                 G_GUINT64_FORMAT " %" G_GUINT64_FORMAT
                                 "' ref.raw >/dev/null", g->pattern,
                            g->offset, g->bytes), 0);
    }
    ck_assert(!w.completed);
    exec_ok(mon, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
                 "{\"device\": \"j\", \"speed\": 0}}");
    while (!w.completed) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert(!w.failed);

    /* What the guest reads now is the reference. */
    {
        g_autofree char *path = g_build_filename(dir, "ref.raw", NULL);
        ck_assert(g_file_get_contents(path, &ref, &ref_len, NULL));
    }
    ck_assert_uint_eq(ref_len, 16 * MiB);
    ck_assert_int_eq(strata_backend_pread(blk, 0, view, 16 * MiB), 0);
    ck_assert_int_eq(memcmp(view, ref, 16 * MiB), 0);
    ck_assert_int_eq(strata_backend_flush(blk), 0);
    strata_backend_unref(blk);
    strata_monitor_free(mon);
    strata_context_free(ctx);

    ck_assert_int_eq(sh(dir, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                             "qemu-img check -q top.qcow2 && "
                             "qemu-img check -q mid.qcow2 && "
                             "qemu-img check -q base.qcow2"), 0);
    if (commit) {
        ck_assert_int_eq(sh(dir, "qemu-img info top.qcow2 | grep -q "
                                 "'^backing file: base.qcow2'"), 0);
    } else {
        ck_assert_int_eq(sh(dir, "! qemu-img info top.qcow2 | grep -q "
                                 "backing"), 0);
    }
    ck_assert_int_eq(sh(dir, "rm -f *.qcow2 ref.raw"), 0);
    g_rmdir(dir);
}

START_TEST(test_stream_guest_writes_embedded)
{
    guest_writes_embedded(false);
}
END_TEST

START_TEST(test_commit_guest_writes_embedded)
{
    guest_writes_embedded(true);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/jobs-embed/stream/guest-writes", test_stream_guest_writes_embedded },
        { "/jobs-embed/commit/guest-writes", test_commit_guest_writes_embedded },
    };

    return strata_test_main("jobs-embed", tests, NULL, NULL);
}
