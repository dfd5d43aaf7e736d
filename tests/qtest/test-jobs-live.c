/* qtest: stream and commit under stress — the daemon killed (SIGKILL) in
 * the middle of a job, the speed limit as an upper bound on progress
 * (also across block-job-set-speed), and an intermediate commit while a
 * guest writes over NBD.  Images and content are checked with QEMU's
 * tools (qemu-img check, qemu-img compare). */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"
#include "../unit/test-util.h"

#define MiB (1024 * 1024)
/* The largest range stream and commit copy at once (their chunk). */
#define JOB_CHUNK (512 * 1024)

/*
 * base.qcow2 (32 MiB): 0x11 over 24 MiB; mid.qcow2: 0x22 at 4 MiB (8 MiB)
 * and 0x23 at 20 MiB (2 MiB); top.qcow2: 0x33 at 6 MiB (1 MiB).
 * ref.raw is the guest view of top.
 */
static void make_chain(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 32M && "
                           "qemu-io -c 'write -P 0x11 0 24M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 mid.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 8M' "
                           "-c 'write -P 0x23 20M 2M' mid.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "mid.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                           "qemu-img convert -O raw top.qcow2 ref.raw "
                           ">/dev/null"), 0);
}

/* Every layer by name, as libvirt opens a chain. */
static void add_chain(QTestState *s)
{
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"base.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"mid\", \"backing\": \"base\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"mid.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"mid\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
}

/* STRATA_TEST_SEED repeats a run; the seed is printed either way. */
static GRand *seeded(const char *what)
{
    const char *env = getenv("STRATA_TEST_SEED");
    guint32 seed = env ? (guint32)strtoul(env, NULL, 0) : g_random_int();

    printf("%s: seed %u (STRATA_TEST_SEED=%u repeats it)\n", what, seed,
           seed);
    fflush(stdout);
    return g_rand_new_with_seed(seed);
}

/* qemu-img check's verdict: 0 clean, 3 leaked clusters only. */
static int check_status(QTestState *s, const char *file)
{
    g_autofree char *cmd = g_strdup_printf(
        "cd '%s' && qemu-img check -q %s >/dev/null 2>&1", qtest_dir(s),
        file);
    int status = system(cmd);

    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/*
 * Starts @job_json rate-limited, kills the daemon at a random moment
 * while it copies, then checks what a crash may leave: the image the job
 * wrote has no corruption (leaked clusters are allowed, as after any
 * crash during allocation), the others are clean, the guest view is
 * unchanged, and a fresh daemon reopens the chain from the headers (the
 * top alone) and completes the same job (@redo_fmt: its command, where
 * each %s is the scratch directory), after which @final_sh holds.
 */
static void crash_during(const char *what, const char *job_json,
                         const char *redo_fmt, const char *written,
                         const char *final_sh)
{
    g_autoptr(GRand) r = seeded(what);
    QTestState *s = qtest_start(NULL, true);
    QTestState *s2;
    g_autofree char *top = NULL;
    g_autofree char *add_top = NULL;
    g_autofree char *redo = NULL;
    const char *files[] = { "base.qcow2", "mid.qcow2", "top.qcow2" };
    int delay_ms = g_rand_int_range(r, 0, 1500);

    make_chain(s);
    add_chain(s);
    ok(s, job_json);
    reach_status(s, "j", "running");
    g_usleep((gulong)delay_ms * 1000);
    ck_assert_int_eq(kill(qtest_pid(s), SIGKILL), 0);
    ck_assert_int_ne(qtest_wait_exit(s, 20000), 0);

    for (unsigned i = 0; i < G_N_ELEMENTS(files); i++) {
        int st = check_status(s, files[i]);
        if (!strcmp(files[i], written)) {
            ck_assert_msg(st == 0 || st == 3, "%s after %d ms: check %d",
                          files[i], delay_ms, st);
        } else {
            ck_assert_msg(st == 0, "%s: check %d", files[i], st);
        }
    }
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw"),
                     0);

    /* The headers still describe a whole chain: a new daemon opens it
     * from the top and finishes the job. */
    top = g_build_filename(qtest_dir(s), "top.qcow2", NULL);
    add_top = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"qcow2\", \"node-name\": \"top\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"%s\"}}}", top);
    s2 = qtest_start(NULL, true);
    ok(s2, add_top);
    redo = g_strdup_printf(redo_fmt, qtest_dir(s), qtest_dir(s));
    ok(s2, redo);
    {
        g_autoptr(JsonNode) c = want_event(s2, "BLOCK_JOB_COMPLETED");
        ck_assert(!json_object_has_member(data_of(c), "error"));
    }
    ok(s2, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s2, 20000), 0);
    qtest_end(s2);
    for (unsigned i = 0; i < G_N_ELEMENTS(files); i++) {
        ck_assert_msg(check_status(s, files[i]) == 0 ||
                      (check_status(s, files[i]) == 3 &&
                       !strcmp(files[i], written)),
                      "%s after the second run", files[i]);
    }
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "%s", final_sh), 0);
    qtest_end(s);
}

START_TEST(test_crash_during_stream)
{
    if (!have_qemu_tools()) {
        return;
    }
    /* About 25 MiB to copy at 8 MiB/s: the kill lands mid-copy. */
    crash_during("stream",
                 "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
                 "\"j\", \"device\": \"top\", \"speed\": 8388608}}",
                 "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
                 "\"j2\", \"device\": \"top\"}}",
                 "top.qcow2", "! qemu-img info top.qcow2 | grep -q backing");
}
END_TEST

START_TEST(test_crash_during_commit)
{
    if (!have_qemu_tools()) {
        return;
    }
    /* mid holds 10 MiB, at 4 MiB/s. */
    crash_during("commit",
                 "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
                 "\"j\", \"device\": \"top\", \"top-node\": \"mid\", "
                 "\"base-node\": \"base\", \"speed\": 4194304}}",
                 "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
                 "\"j2\", \"device\": \"top\", \"top\": \"%s/mid.qcow2\", "
                 "\"base\": \"%s/base.qcow2\", \"backing-file\": "
                 "\"base.qcow2\"}}",
                 "base.qcow2",
                 "qemu-img info top.qcow2 | grep -q '^backing file: "
                 "base.qcow2'");
}
END_TEST

/* Progress of job "j" (query-block-jobs' offset). */
static int64_t job_offset(QTestState *s)
{
    JsonNode *keep = NULL;
    JsonObject *j = block_job(s, &keep);
    int64_t off = json_object_get_int_member(j, "offset");

    json_node_unref(keep);
    return off;
}

/*
 * Samples the job's progress for @ms and fails if it ever runs ahead of
 * @allowed0 + @speed × (time since @t0) + one chunk.  The time is read
 * after each reply, the start before the command that set the speed, so
 * a slow machine only makes the bound looser.
 */
static void bound_progress(QTestState *s, int64_t t0, int64_t allowed0,
                           int64_t speed, int ms)
{
    int64_t end = g_get_monotonic_time() + (int64_t)ms * 1000;

    while (g_get_monotonic_time() < end) {
        int64_t off = job_offset(s);
        int64_t now = g_get_monotonic_time();
        int64_t allowed = allowed0 + speed * (now - t0) / G_USEC_PER_SEC +
                          JOB_CHUNK;

        ck_assert_msg(off <= allowed, "progress %" G_GINT64_FORMAT
                      " ahead of the limit %" G_GINT64_FORMAT, off, allowed);
        g_usleep(20 * 1000);
    }
}

START_TEST(test_speed_bound)
{
    QTestState *s;
    int64_t t0, t1, a1;
    /* Below 5 MiB/s the token bucket's burst (100 ms of rate) is
     * within a chunk; above, the bound is that burst instead. */
    const int64_t s1 = 2 * MiB, s2 = 4 * MiB;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    /* Every byte of the disk needs copying: progress is all copies (a
     * range skipped as unallocated advances progress for free). */
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 24M && "
                           "qemu-io -c 'write -P 0x11 0 24M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 top.qcow2 >/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"top.qcow2\"}}}");
    t0 = g_get_monotonic_time();
    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"j\", \"device\": \"top\", \"speed\": 2097152}}");
    bound_progress(s, t0, 0, s1, 1500);

    /* Faster while running: what was allowed so far plus the new rate. */
    t1 = g_get_monotonic_time();
    a1 = s1 * (t1 - t0) / G_USEC_PER_SEC;
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"j\", \"speed\": 4194304}}");
    bound_progress(s, t1, a1, s2, 1000);
    ck_assert_int_gt(job_offset(s), 0);

    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"j\", \"speed\": 0}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(!json_object_has_member(data_of(c), "error"));
        ck_assert_int_eq(json_object_get_int_member(data_of(c), "offset"),
                         24 * MiB);
    }
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q top.qcow2 base.qcow2"), 0);
    qtest_end(s);
}
END_TEST

/* An intermediate commit (mid into base) while a guest writes into the
 * active layer over NBD: the result equals the chain with the same
 * writes applied offline. */
START_TEST(test_commit_guest_writes_nbd)
{
    static const char *const writes[] = {
        "write -P 0x44 0 1M", "write -P 0x45 5M 1M",
        "write -P 0x46 4352K 64K", "write -P 0x47 21M 4K",
    };
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    make_chain(s);
    add_chain(s);
    export_top(s);
    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"j\", \"device\": \"top\", \"top-node\": \"mid\", "
          "\"base-node\": \"base\", \"speed\": 1048576}}");
    reach_status(s, "j", "running");
    for (unsigned i = 0; i < G_N_ELEMENTS(writes); i++) {
        ck_assert_int_eq(guest_io(s, writes[i]), 0);
    }
    ck_assert_int_lt(job_offset(s), 10 * MiB);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"j\", \"speed\": 0}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(!json_object_has_member(data_of(c), "error"));
    }
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                           "qemu-img check -q top.qcow2 && "
                           "qemu-img check -q base.qcow2 && "
                           "qemu-img info top.qcow2 | grep -q "
                           "'backing file: base.qcow2'"), 0);
    qtest_end(s);
}
END_TEST

/* As QEMU: a copy-on-read filter above the streamed node and a
 * commit_top filter above the committed top while the job lives, named
 * by filter-node-name or auto-named; guest I/O goes through them, and
 * they are gone when the job is. */
START_TEST(test_filter_nodes)
{
    QTestState *s;
    char *name;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    make_chain(s);
    add_chain(s);
    export_top(s);
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"c\", \"device\": \"top\", \"top-node\": \"mid\", "
             "\"base-node\": \"base\", \"filter-node-name\": \"mid\"}}",
          "GenericError", NULL);
    ck_assert_ptr_null(node_of_driver(s, "commit_top"));

    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"c\", \"device\": \"top\", \"top-node\": \"mid\", "
          "\"base-node\": \"base\", \"speed\": 65536}}");
    name = node_of_driver(s, "commit_top");
    ck_assert_msg(name && name[0] == '#', "commit_top node: %s",
                  name ? name : "(none)");
    g_free(name);
    ck_assert_int_eq(guest_io(s, "write -P 0x55 1M 64k"), 0);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"c\", \"speed\": 0}}");
    json_node_unref(want_event(s, "BLOCK_JOB_COMPLETED"));
    ck_assert_ptr_null(node_of_driver(s, "commit_top"));

    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"s\", \"device\": \"top\", \"filter-node-name\": \"cor0\", "
          "\"speed\": 65536}}");
    name = node_of_driver(s, "copy-on-read");
    ck_assert_str_eq(name ? name : "(none)", "cor0");
    g_free(name);
    ck_assert_int_eq(guest_io(s, "write -P 0x56 9M 64k"), 0);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"s\", \"speed\": 0}}");
    json_node_unref(want_event(s, "BLOCK_JOB_COMPLETED"));
    ck_assert_ptr_null(node_of_driver(s, "copy-on-read"));
    /* The export is back on top, and writes still land. */
    ck_assert_int_eq(guest_io(s, "write -P 0x57 2M 64k"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw && "
                           "qemu-img check -q top.qcow2"), 0);
    qtest_end(s);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/jobs-live/crash/stream", test_crash_during_stream },
        { "/jobs-live/crash/commit", test_crash_during_commit },
        { "/jobs-live/speed-bound", test_speed_bound },
        { "/jobs-live/commit/guest-writes-nbd", test_commit_guest_writes_nbd },
        { "/jobs-live/filter-nodes", test_filter_nodes },
    };

    return strata_test_main("jobs-live", tests, NULL, NULL);
}
