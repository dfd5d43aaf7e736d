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

/* Runs the command @fmt makes: it must succeed (@error_desc NULL), or
 * fail with an error whose text contains @error_desc. */
static void exec_check(StrataMonitor *mon, const char *error_desc,
                       const char *fmt, va_list ap)
{
    g_autofree char *cmd = g_strdup_vprintf(fmt, ap);
    g_autofree char *reply = strata_monitor_execute(mon, cmd);

    if (!error_desc) {
        ck_assert_msg(g_str_has_prefix(reply, "{\"return\""), "%s -> %s",
                      cmd, reply);
    } else {
        ck_assert_msg(g_str_has_prefix(reply, "{\"error\"") &&
                      strstr(reply, error_desc), "%s -> %s", cmd, reply);
    }
}

static void exec_ok(StrataMonitor *mon, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
static void exec_ok(StrataMonitor *mon, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    exec_check(mon, NULL, fmt, ap);
    va_end(ap);
}

static void exec_fails(StrataMonitor *mon, const char *desc,
                       const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static void exec_fails(StrataMonitor *mon, const char *desc,
                       const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    exec_check(mon, desc, fmt, ap);
    va_end(ap);
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

static char *load_ref(const char *dir)
{
    g_autofree char *path = g_build_filename(dir, "ref.raw", NULL);
    char *ref = NULL;
    gsize len = 0;

    ck_assert(g_file_get_contents(path, &ref, &len, NULL));
    ck_assert_uint_eq(len, 16 * MiB);
    return ref;
}

/* A context with make_chain()'s images opened in a fresh scratch dir,
 * a monitor reporting to @w, and (when asked) a guest: a writable
 * backend on "top". */
typedef struct {
    char *dir;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    Watch w;
} Embed;

/* false (the test is skipped) without qemu-img and qemu-io. */
static bool embed_open(Embed *e, bool guest)
{
    g_autoptr(GError) err = NULL;

    memset(e, 0, sizeof(*e));
    e->dir = g_dir_make_tmp("strata-embed-XXXXXX", NULL);
    ck_assert(e->dir);
    if (sh(e->dir, "command -v qemu-img >/dev/null && "
                   "command -v qemu-io >/dev/null") != 0) {
        g_rmdir(e->dir);
        g_free(e->dir);
        return false;
    }
    ck_assert_int_eq(make_chain(e->dir), 0);
    e->ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(e->ctx, "%s", err ? err->message : "");
    e->mon = strata_monitor_new(e->ctx);
    strata_monitor_set_event_func(e->mon, on_event, &e->w, NULL);
    open_chain(e->mon, e->dir);
    if (guest) {
        e->blk = strata_backend_new(e->ctx, "top", true, &err);
        ck_assert_msg(e->blk, "%s", err ? err->message : "");
    }
    return true;
}

/* Closes everything but the images, which stay to be checked. */
static void embed_close(Embed *e)
{
    if (e->blk) {
        strata_backend_unref(e->blk);
    }
    strata_monitor_free(e->mon);
    strata_context_free(e->ctx);
}

static void embed_remove(Embed *e)
{
    ck_assert_int_eq(sh(e->dir, "rm -f *.qcow2 ref.raw"), 0);
    g_rmdir(e->dir);
    g_free(e->dir);
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
    Embed e;
    g_autofree uint8_t *buf = g_malloc(2 * MiB);
    g_autofree uint8_t *view = g_malloc(16 * MiB);
    g_autofree char *ref = NULL;

    if (!embed_open(&e, true)) {
        return;
    }
    /* 64 KiB/s: one chunk, then asleep for seconds while the guest
     * writes. */
    if (commit) {
        exec_ok(e.mon, "{\"execute\": \"block-commit\", \"arguments\": "
                       "{\"job-id\": \"j\", \"device\": \"top\", "
                       "\"top-node\": \"mid\", \"base-node\": \"base\", "
                       "\"backing-file\": \"base.qcow2\", \"speed\": "
                       "65536}}");
    } else {
        exec_ok(e.mon, "{\"execute\": \"block-stream\", \"arguments\": "
                       "{\"job-id\": \"j\", \"device\": \"top\", "
                       "\"speed\": 65536}}");
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(writes); i++) {
        const GuestWrite *g = &writes[i];

        memset(buf, g->pattern, g->bytes);
        ck_assert_int_eq(strata_backend_pwrite(e.blk, g->offset, buf,
                                               g->bytes, 0), 0);
        ck_assert_int_eq(sh(e.dir, "qemu-io -f raw -c 'write -P %d %"
                                   G_GUINT64_FORMAT " %" G_GUINT64_FORMAT
                                   "' ref.raw >/dev/null", g->pattern,
                            g->offset, g->bytes), 0);
    }
    ck_assert(!e.w.completed);
    exec_ok(e.mon, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
                   "{\"device\": \"j\", \"speed\": 0}}");
    while (!e.w.completed) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert(!e.w.failed);

    /* What the guest reads now is the reference. */
    ref = load_ref(e.dir);
    ck_assert_int_eq(strata_backend_pread(e.blk, 0, view, 16 * MiB), 0);
    ck_assert_int_eq(memcmp(view, ref, 16 * MiB), 0);
    ck_assert_int_eq(strata_backend_flush(e.blk), 0);
    embed_close(&e);

    ck_assert_int_eq(sh(e.dir, "qemu-img compare -q -F raw top.qcow2 "
                               "ref.raw && "
                               "qemu-img check -q top.qcow2 && "
                               "qemu-img check -q mid.qcow2 && "
                               "qemu-img check -q base.qcow2"), 0);
    if (commit) {
        ck_assert_int_eq(sh(e.dir, "qemu-img info top.qcow2 | grep -q "
                                   "'^backing file: base.qcow2'"), 0);
    } else {
        ck_assert_int_eq(sh(e.dir, "! qemu-img info top.qcow2 | grep -q "
                                   "backing"), 0);
    }
    embed_remove(&e);
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

/* A stream of "top" at 64 KiB/s (@base_arg: more arguments, "" for
 * none), paused at once: it copies its first range and then stays
 * parked, so what the top gains after that comes from the filter. */
static void start_paused_stream(Embed *e, const char *base_arg)
{
    exec_ok(e->mon, "{\"execute\": \"block-stream\", \"arguments\": "
                    "{\"job-id\": \"j\", \"device\": \"top\", \"speed\": "
                    "65536%s}}", base_arg);
    exec_ok(e->mon, "{\"execute\": \"block-job-pause\", \"arguments\": "
                    "{\"device\": \"j\"}}");
}

static void cancel_job(Embed *e)
{
    exec_ok(e->mon, "{\"execute\": \"block-job-cancel\", \"arguments\": "
                    "{\"device\": \"j\", \"force\": true}}");
    while (!e->w.cancelled && !e->w.completed) {
        g_main_context_iteration(NULL, TRUE);
    }
}

/* The top's data is still the chain's, and its image is sound. */
static void check_top(Embed *e)
{
    ck_assert_int_eq(sh(e->dir, "qemu-img compare -q -F raw top.qcow2 "
                                "ref.raw && qemu-img check -q top.qcow2"),
                     0);
}

/* A guest read through the stream's filter while the job is paused
 * copies what lies above the base into the top, whole clusters of it;
 * what lies in the base stays where it is. */
START_TEST(test_cor_stream_guest_reads)
{
    Embed e;
    g_autofree char *ref = NULL;
    static const Range reads[] = {
        { 12 * MiB, 128 * 1024 },       /* mid's data */
        { 5 * MiB + 4096, 8192 },       /* mid's, inside one cluster */
        { 1 * MiB, 64 * 1024 },         /* the base's */
        { 6 * MiB + 512 * 1024, 4096 }, /* the top's own */
    };

    if (!embed_open(&e, true)) {
        return;
    }
    ref = load_ref(e.dir);
    start_paused_stream(&e, ", \"base-node\": \"base\"");
    ck_assert(reads_match(e.blk, ref, reads, G_N_ELEMENTS(reads)));
    /* Read twice: the second time from the top. */
    ck_assert(reads_match(e.blk, ref, reads, G_N_ELEMENTS(reads)));
    cancel_job(&e);
    ck_assert(reads_match(e.blk, ref, reads, G_N_ELEMENTS(reads)));
    embed_close(&e);

    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 12 * MiB), 0);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 12 * MiB + 64 * 1024), 0);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 5 * MiB), 0);
    /* Neither what nobody read nor what lies in the base. */
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 12 * MiB + 512 * 1024),
                     1);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 5 * MiB + 64 * 1024), 1);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 1 * MiB), 2);
    check_top(&e);
    embed_remove(&e);
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
    Embed e;
    g_autofree char *ref = NULL;
    AioCount c = { 0, 0 };
    enum { N = 8, LEN = 64 * 1024 };
    static uint8_t rbuf[2 * N][LEN], wbuf[2 * N][LEN];
    struct iovec riov[2 * N], wiov[2 * N];
    Range all = { 0, 16 * MiB };

    if (!embed_open(&e, true)) {
        return;
    }
    start_paused_stream(&e, "");
    /* Whole clusters of mid's data, and unaligned ranges of the base's
     * (the whole chain is streamed): the read goes first each time. */
    for (int i = 0; i < 2 * N; i++) {
        uint64_t off = i < N ? 12 * MiB + (uint64_t)i * 2 * LEN
                             : 2 * MiB + (uint64_t)(i - N) * 2 * LEN + 4096;

        memset(wbuf[i], 0x50 + i, LEN);
        riov[i] = (struct iovec){ rbuf[i], LEN };
        wiov[i] = (struct iovec){ wbuf[i], LEN };
        c.pending += 2;
        strata_backend_aio_preadv(e.blk, off, &riov[i], 1, 0, aio_done, &c);
        strata_backend_aio_pwritev(e.blk, off, &wiov[i], 1, 0, aio_done,
                                   &c);
        ck_assert_int_eq(sh(e.dir, "qemu-io -f raw -c 'write -P %d %"
                                   G_GUINT64_FORMAT " %d' ref.raw "
                                   ">/dev/null", 0x50 + i, off, LEN), 0);
    }
    while (c.pending > 0) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert_int_eq(c.failures, 0);
    ref = load_ref(e.dir);
    ck_assert(reads_match(e.blk, ref, &all, 1));
    cancel_job(&e);
    embed_close(&e);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 12 * MiB), 0);
    check_top(&e);
    embed_remove(&e);
}
END_TEST

/* blockdev-add copy-on-read, with and without "bottom", and the bottoms
 * it refuses (nothing is copied by a refused one). */
START_TEST(test_cor_blockdev_add)
{
    Embed e;
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    StrataBackend *blk;
    static const Range reads[] = {
        { 12 * MiB, 64 * 1024 }, /* mid's */
        { 1 * MiB, 64 * 1024 },  /* base's */
    };
    static const Range more[] = {
        { 2 * MiB, 64 * 1024 },  /* base's */
    };

    if (!embed_open(&e, false)) {
        return;
    }
    ref = load_ref(e.dir);
    exec_ok(e.mon, "{\"execute\": \"blockdev-add\", \"arguments\": "
                   "{\"driver\": \"null-co\", \"node-name\": \"other\"}}");
    exec_fails(e.mon, "Bottom node 'nope' not found",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": \"nope\"}}");
    exec_fails(e.mon, "Bottom node 'other' is not in the backing chain of "
                      "'top'",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": \"other\"}}");
    exec_fails(e.mon, "Invalid parameter type for 'bottom'",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c\", \"file\": \"top\", "
               "\"bottom\": 7}}");
    exec_ok(e.mon, "{\"execute\": \"blockdev-add\", \"arguments\": "
                   "{\"driver\": \"copy-on-read\", \"node-name\": \"c\", "
                   "\"file\": \"top\", \"bottom\": \"mid\"}}");
    exec_fails(e.mon, "Bottom node 'c' is a filter",
               "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
               "\"copy-on-read\", \"node-name\": \"c2\", \"file\": \"top\", "
               "\"bottom\": \"c\"}}");
    blk = strata_backend_new(e.ctx, "c", false, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    ck_assert(reads_match(blk, ref, reads, G_N_ELEMENTS(reads)));
    strata_backend_unref(blk);
    exec_ok(e.mon, "{\"execute\": \"blockdev-del\", \"arguments\": "
                   "{\"node-name\": \"c\"}}");
    /* No bottom: the whole chain. */
    exec_ok(e.mon, "{\"execute\": \"blockdev-add\", \"arguments\": "
                   "{\"driver\": \"copy-on-read\", \"node-name\": \"c\", "
                   "\"file\": \"top\"}}");
    blk = strata_backend_new(e.ctx, "c", false, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    ck_assert(reads_match(blk, ref, more, G_N_ELEMENTS(more)));
    strata_backend_unref(blk);
    embed_close(&e);

    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 12 * MiB), 0);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 1 * MiB), 2);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 2 * MiB), 0);
    ck_assert_int_eq(map_depth(e.dir, "top.qcow2", 3 * MiB), 2);
    check_top(&e);
    embed_remove(&e);
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
