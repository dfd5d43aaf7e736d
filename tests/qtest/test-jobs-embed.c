/* A guest writing through the embedding API (a StrataBackend, in
 * process) while a stream or an intermediate commit runs, both driven by
 * the in-process monitor.  The guest's view is checked in process, and
 * the images afterwards with qemu-img compare against the chain with the
 * same writes applied offline. */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/uio.h>
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
    bool cancelled;
} Watch;

static void on_event(StrataMonitor *mon, const char *ev, void *opaque)
{
    Watch *w = opaque;

    if (strstr(ev, "\"event\": \"BLOCK_JOB_COMPLETED\"")) {
        w->completed = true;
        w->failed = strstr(ev, "\"error\"") != NULL;
    }
    if (strstr(ev, "\"event\": \"BLOCK_JOB_CANCELLED\"")) {
        w->cancelled = true;
    }
}

/* base: 0x11 in [0, 8M); mid: 0x22 in [4M, 8M), 0x23 in [12M, 13M);
 * top: 0x33 in [6M, 7M); ref.raw: what the chain reads. */
static int make_chain(const char *dir)
{
    return sh(dir, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                   "qemu-io -c 'write -P 0x11 0 8M' base.qcow2 && "
                   "qemu-img create -q -f qcow2 -F qcow2 -b "
                   "base.qcow2 mid.qcow2 && "
                   "qemu-io -c 'write -P 0x22 4M 4M' "
                   "-c 'write -P 0x23 12M 1M' mid.qcow2 && "
                   "qemu-img create -q -f qcow2 -F qcow2 -b "
                   "mid.qcow2 top.qcow2 && "
                   "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                   "qemu-img convert -O raw top.qcow2 ref.raw "
                   ">/dev/null");
}

/* Nodes base, mid and top over the images make_chain() wrote. */
static void open_chain(StrataMonitor *mon, const char *dir)
{
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
    Watch w = { false, false, false };
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
    ck_assert_int_eq(make_chain(dir), 0);

    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    mon = strata_monitor_new(ctx);
    strata_monitor_set_event_func(mon, on_event, &w, NULL);
    open_chain(mon, dir);
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

/* ---- the copy-on-read filter ---- */

static void exec_fails(StrataMonitor *mon, const char *desc,
                       const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static void exec_fails(StrataMonitor *mon, const char *desc,
                       const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *reply = NULL;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    reply = strata_monitor_execute(mon, cmd);
    ck_assert_msg(g_str_has_prefix(reply, "{\"error\"") &&
                  strstr(reply, desc), "%s -> %s", cmd, reply);
}

/* The layer of @img's chain that decides the byte at @offset, as
 * qemu-img map says: 0 for the image itself; -1 when it cannot tell. */
static int map_depth(const char *dir, const char *img, uint64_t offset)
{
    g_autofree char *cmd = g_strdup_printf("qemu-img map --output=json "
                                           "'%s/%s'", dir, img);
    g_autofree char *out = NULL;
    g_autoptr(JsonParser) parser = json_parser_new();
    JsonArray *a;
    int status = -1;

    if (!g_spawn_command_line_sync(cmd, &out, NULL, &status, NULL) ||
        !g_spawn_check_wait_status(status, NULL) ||
        !json_parser_load_from_data(parser, out, -1, NULL)) {
        return -1;
    }
    a = json_node_get_array(json_parser_get_root(parser));
    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *e = json_array_get_object_element(a, i);
        uint64_t start = json_object_get_int_member(e, "start");
        uint64_t len = json_object_get_int_member(e, "length");

        if (offset >= start && offset < start + len) {
            return json_object_get_int_member(e, "depth");
        }
    }
    return -1;
}

typedef struct {
    uint64_t offset, bytes;
} Range;

/* Reads @ranges through @blk; true when each matches ref.raw. */
static bool reads_match(StrataBackend *blk, const char *ref,
                        const Range *ranges, size_t n)
{
    bool same = true;

    for (size_t i = 0; i < n; i++) {
        g_autofree uint8_t *buf = g_malloc(ranges[i].bytes);

        if (strata_backend_pread(blk, ranges[i].offset, buf,
                                 ranges[i].bytes) != 0 ||
            memcmp(buf, ref + ranges[i].offset, ranges[i].bytes) != 0) {
            same = false;
        }
    }
    return same;
}

static char *load_ref(const char *dir)
{
    g_autofree char *path = g_build_filename(dir, "ref.raw", NULL);
    char *ref = NULL;
    gsize len = 0;

    ck_assert(g_file_get_contents(path, &ref, &len, NULL));
    ck_assert_uint_eq(len, 16 * MiB);
    return ref;
}

static void cancel_job(StrataMonitor *mon, Watch *w)
{
    exec_ok(mon, "{\"execute\": \"block-job-cancel\", \"arguments\": "
                 "{\"device\": \"j\", \"force\": true}}");
    while (!w->cancelled && !w->completed) {
        g_main_context_iteration(NULL, TRUE);
    }
}

static bool have_tools(const char *dir)
{
    if (sh(dir, "command -v qemu-img >/dev/null && "
                "command -v qemu-io >/dev/null") != 0) {
        g_rmdir(dir);
        return false;
    }
    return true;
}

/* A guest read through the stream's filter while the job is paused
 * copies what lies above the base into the top, whole clusters of it;
 * what lies in the base stays where it is. */
START_TEST(test_cor_stream_guest_reads)
{
    g_autofree char *dir = g_dir_make_tmp("strata-cor-XXXXXX", NULL);
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    Watch w = { false, false, false };
    static const Range reads[] = {
        { 12 * MiB, 128 * 1024 },       /* mid's data */
        { 5 * MiB + 4096, 8192 },       /* mid's, inside one cluster */
        { 1 * MiB, 64 * 1024 },         /* the base's */
        { 6 * MiB + 512 * 1024, 4096 }, /* the top's own */
    };

    ck_assert(dir);
    if (!have_tools(dir)) {
        return;
    }
    ck_assert_int_eq(make_chain(dir), 0);
    ref = load_ref(dir);
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    mon = strata_monitor_new(ctx);
    strata_monitor_set_event_func(mon, on_event, &w, NULL);
    open_chain(mon, dir);
    blk = strata_backend_new(ctx, "top", true, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");

    /* 64 KiB/s: the job copies its first range (at 4M) and then
     * sleeps, parked by the pause. */
    exec_ok(mon, "{\"execute\": \"block-stream\", \"arguments\": "
                 "{\"job-id\": \"j\", \"device\": \"top\", \"base-node\": "
                 "\"base\", \"speed\": 65536}}");
    exec_ok(mon, "{\"execute\": \"block-job-pause\", \"arguments\": "
                 "{\"device\": \"j\"}}");
    ck_assert(reads_match(blk, ref, reads, G_N_ELEMENTS(reads)));
    /* Read twice: the second time from the top. */
    ck_assert(reads_match(blk, ref, reads, G_N_ELEMENTS(reads)));
    cancel_job(mon, &w);
    ck_assert(reads_match(blk, ref, reads, G_N_ELEMENTS(reads)));
    strata_backend_unref(blk);
    strata_monitor_free(mon);
    strata_context_free(ctx);

    ck_assert_int_eq(map_depth(dir, "top.qcow2", 12 * MiB), 0);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 12 * MiB + 64 * 1024), 0);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 5 * MiB), 0);
    /* Neither what nobody read nor what lies in the base. */
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 12 * MiB + 512 * 1024), 1);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 5 * MiB + 64 * 1024), 1);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 1 * MiB), 2);
    ck_assert_int_eq(sh(dir, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                             "qemu-img check -q top.qcow2 && "
                             "rm -f *.qcow2 ref.raw"), 0);
    g_rmdir(dir);
}
END_TEST

typedef struct {
    int pending;
    int failures;
} AioCount;

static void aio_done(void *opaque, int ret)
{
    AioCount *c = opaque;

    c->pending--;
    c->failures += ret != 0;
}

/* A guest write racing a guest read of the same range through the
 * stream's filter: the copy the read makes never covers the write. */
START_TEST(test_cor_stream_write_wins)
{
    g_autofree char *dir = g_dir_make_tmp("strata-cor-XXXXXX", NULL);
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    Watch w = { false, false, false };
    AioCount c = { 0, 0 };
    enum { N = 8, LEN = 64 * 1024 };
    static uint8_t rbuf[2 * N][LEN], wbuf[2 * N][LEN];
    struct iovec riov[2 * N], wiov[2 * N];
    uint64_t off[2 * N];

    ck_assert(dir);
    if (!have_tools(dir)) {
        return;
    }
    ck_assert_int_eq(make_chain(dir), 0);
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    mon = strata_monitor_new(ctx);
    strata_monitor_set_event_func(mon, on_event, &w, NULL);
    open_chain(mon, dir);
    blk = strata_backend_new(ctx, "top", true, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    exec_ok(mon, "{\"execute\": \"block-stream\", \"arguments\": "
                 "{\"job-id\": \"j\", \"device\": \"top\", \"speed\": "
                 "65536}}");
    exec_ok(mon, "{\"execute\": \"block-job-pause\", \"arguments\": "
                 "{\"device\": \"j\"}}");

    /* Whole clusters of mid's data, and unaligned ranges of the base's
     * (the whole chain is streamed): the read goes first each time. */
    for (int i = 0; i < 2 * N; i++) {
        off[i] = i < N ? 12 * MiB + (uint64_t)i * 2 * LEN
                       : 2 * MiB + (uint64_t)(i - N) * 2 * LEN + 4096;
        memset(wbuf[i], 0x50 + i, LEN);
        riov[i] = (struct iovec){ rbuf[i], LEN };
        wiov[i] = (struct iovec){ wbuf[i], LEN };
        c.pending += 2;
        strata_backend_aio_preadv(blk, off[i], &riov[i], 1, 0, aio_done, &c);
        strata_backend_aio_pwritev(blk, off[i], &wiov[i], 1, 0, aio_done,
                                   &c);
        ck_assert_int_eq(sh(dir, "qemu-io -f raw -c 'write -P %d %"
                                 G_GUINT64_FORMAT " %d' ref.raw >/dev/null",
                            0x50 + i, off[i], LEN), 0);
    }
    while (c.pending > 0) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert_int_eq(c.failures, 0);
    ref = load_ref(dir);
    {
        Range all = { 0, 16 * MiB };
        ck_assert(reads_match(blk, ref, &all, 1));
    }
    cancel_job(mon, &w);
    strata_backend_unref(blk);
    strata_monitor_free(mon);
    strata_context_free(ctx);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 12 * MiB), 0);
    ck_assert_int_eq(sh(dir, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                             "qemu-img check -q top.qcow2 && "
                             "rm -f *.qcow2 ref.raw"), 0);
    g_rmdir(dir);
}
END_TEST

/* blockdev-add copy-on-read, with and without "bottom", and the bottoms
 * it refuses (nothing is copied by a refused one). */
START_TEST(test_cor_blockdev_add)
{
    g_autofree char *dir = g_dir_make_tmp("strata-cor-XXXXXX", NULL);
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    static const Range reads[] = {
        { 12 * MiB, 64 * 1024 }, /* mid's */
        { 1 * MiB, 64 * 1024 },  /* base's */
    };
    static const Range more[] = {
        { 2 * MiB, 64 * 1024 },  /* base's */
    };

    ck_assert(dir);
    if (!have_tools(dir)) {
        return;
    }
    ck_assert_int_eq(make_chain(dir), 0);
    ref = load_ref(dir);
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    mon = strata_monitor_new(ctx);
    open_chain(mon, dir);
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"null-co\", \"node-name\": \"other\"}}");
    exec_fails(mon, "Bottom node 'nope' not found",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": \"nope\"}}");
    exec_fails(mon, "Bottom node 'other' is not in the backing chain of "
                    "'top'",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": \"other\"}}");
    exec_fails(mon, "Invalid parameter type for 'bottom'",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": 7}}");
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
                 "\"bottom\": \"mid\"}}");
    exec_fails(mon, "Bottom node 'c' is a filter",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c2\", \"file\": \"top\", "
               "\"bottom\": \"c\"}}");
    blk = strata_backend_new(ctx, "c", false, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    ck_assert(reads_match(blk, ref, reads, G_N_ELEMENTS(reads)));
    strata_backend_unref(blk);
    exec_ok(mon, "{\"execute\": \"blockdev-del\", \"arguments\": "
                 "{\"node-name\": \"c\"}}");
    /* No bottom: the whole chain. */
    exec_ok(mon, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
                 "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\"}}");
    blk = strata_backend_new(ctx, "c", false, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    ck_assert(reads_match(blk, ref, more, G_N_ELEMENTS(more)));
    strata_backend_unref(blk);
    strata_monitor_free(mon);
    strata_context_free(ctx);

    ck_assert_int_eq(map_depth(dir, "top.qcow2", 12 * MiB), 0);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 1 * MiB), 2);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 2 * MiB), 0);
    ck_assert_int_eq(map_depth(dir, "top.qcow2", 3 * MiB), 2);
    ck_assert_int_eq(sh(dir, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                             "qemu-img check -q top.qcow2 && "
                             "rm -f *.qcow2 ref.raw"), 0);
    g_rmdir(dir);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/jobs-embed/stream/guest-writes", test_stream_guest_writes_embedded },
        { "/jobs-embed/commit/guest-writes", test_commit_guest_writes_embedded },
        { "/jobs-embed/cor/stream-guest-reads", test_cor_stream_guest_reads },
        { "/jobs-embed/cor/stream-write-wins", test_cor_stream_write_wins },
        { "/jobs-embed/cor/blockdev-add", test_cor_blockdev_add },
    };

    return strata_test_main("jobs-embed", tests, NULL, NULL);
}
