/* strata-qmp --wait/--verbose/--pivot against a real stratad: a job
 * followed to its end, left at READY or pivoted, a failing job and a
 * cancelled one giving exit status 1, Ctrl-C cancelling the job. */
#include <check.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"
#include "../unit/test-util.h"

typedef struct {
    int status;         /* exit status, or -1 when killed by a signal */
    char *out;
    char *err;
} Run;

static void run_clear(Run *r)
{
    g_free(r->out);
    g_free(r->err);
}

/* Starts strata-qmp -s SOCK @args... in the scratch directory. */
static GPid spawn_client(QTestState *s, int *out_fd, int *err_fd,
                         const char *const *args)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    GPid pid;

    g_ptr_array_add(argv, (char *)STRATA_QMP_PATH);
    g_ptr_array_add(argv, (char *)"-s");
    g_ptr_array_add(argv, (char *)qtest_socket(s));
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    g_assert(g_spawn_async_with_pipes(qtest_dir(s), (char **)argv->pdata,
                                      NULL, G_SPAWN_DO_NOT_REAP_CHILD, NULL,
                                      NULL, &pid, NULL, out_fd, err_fd,
                                      NULL));
    return pid;
}

static char *slurp(int fd)
{
    GString *s = g_string_new(NULL);
    char buf[4096];
    ssize_t n;

    while ((n = read(fd, buf, sizeof(buf))) > 0 ||
           (n < 0 && errno == EINTR)) {
        if (n > 0) {
            g_string_append_len(s, buf, n);
        }
    }
    close(fd);
    return g_string_free(s, FALSE);
}

static Run finish_client(GPid pid, int out_fd, int err_fd)
{
    Run r = { .status = -1 };
    int st;

    r.out = slurp(out_fd);
    r.err = slurp(err_fd);
    g_assert(waitpid(pid, &st, 0) == pid);
    if (WIFEXITED(st)) {
        r.status = WEXITSTATUS(st);
    }
    g_spawn_close_pid(pid);
    return r;
}

static Run run_client(QTestState *s, const char *const *args)
{
    int out_fd, err_fd;
    GPid pid = spawn_client(s, &out_fd, &err_fd, args);

    return finish_client(pid, out_fd, err_fd);
}

/* base (0x11 over the first 4 MiB) <- mid <- top, all opened. */
static QTestState *start_chain(void)
{
    QTestState *s = qtest_start(NULL, true);

    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 4M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -b base.qcow2 "
                           "-F qcow2 mid.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 1M' mid.qcow2 && "
                           "qemu-img create -q -f qcow2 -b mid.qcow2 "
                           "-F qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x33 8M 1M' top.qcow2"),
                     0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {"
          "\"driver\": \"qcow2\", \"node-name\": \"top\", \"file\": {"
          "\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    return s;
}

static bool job_listed(QTestState *s, const char *id)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": \"query-jobs\"}");
    g_autofree char *txt = qtest_to_string(r);
    g_autofree char *needle = g_strdup_printf("\"id\":\"%s\"", id);
    g_autofree char *needle2 = g_strdup_printf("\"id\": \"%s\"", id);

    return strstr(txt, needle) || strstr(txt, needle2);
}

static void wait_job_gone(QTestState *s, const char *id)
{
    for (int i = 0; i < 3000 && job_listed(s, id); i++) {
        g_usleep(10000);
    }
    ck_assert_msg(!job_listed(s, id), "job %s still listed", id);
}

START_TEST(test_wait_stream)
{
    QTestState *s;
    const char *args[] = { "--wait", "--verbose", "block-stream",
                           "job-id=s1", "device=top", NULL };
    Run r;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    r = run_client(s, args);
    ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
    ck_assert_msg(strstr(r.out, "Pull complete\n"), "%s", r.out);
    ck_assert_msg(strstr(r.err, "Block Pull: [100 %]"), "%s", r.err);
    /* The job really ran: top no longer needs its backing file, and it
     * holds every layer's data. */
    ck_assert_int_eq(sh(s, "qemu-img info -U top.qcow2 | "
                           "grep -q 'backing file'"), 1);
    /* qemu-io exits 1 when a pattern does not match. */
    ck_assert_int_eq(sh(s, "qemu-io -r -U -c 'read -P 0x11 0 4M' "
                           "-c 'read -P 0x22 4M 1M' -c 'read -P 0x33 8M 1M' "
                           "top.qcow2"), 0);
    run_clear(&r);
    qtest_end(s);
}
END_TEST

START_TEST(test_wait_ready_and_pivot)
{
    QTestState *s;
    const char *ready[] = { "--wait", "block-commit", "job-id=c1",
                            "device=top", NULL };
    const char *pivot[] = { "--wait", "--pivot", "-v", "block-commit",
                            "job-id=c2", "device=top", NULL };
    Run r;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    /* Without --pivot the client leaves at READY and the job stays. */
    r = run_client(s, ready);
    ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
    ck_assert_msg(strstr(r.out, "Now in synchronized phase\n"), "%s", r.out);
    ck_assert(job_listed(s, "c1"));
    run_clear(&r);
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": {"
          "\"device\": \"c1\"}}");
    wait_job_gone(s, "c1");

    /* With --pivot it completes the job: base becomes the active layer
     * and holds the top's data. */
    r = run_client(s, pivot);
    ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
    ck_assert_msg(strstr(r.out, "Successfully pivoted\n"), "%s", r.out);
    ck_assert_msg(strstr(r.err, "Block Commit: [100 %]"), "%s", r.err);
    ck_assert(!job_listed(s, "c2"));
    ck_assert_int_eq(sh(s, "qemu-io -r -U -c 'read -P 0x33 8M 1M' "
                           "-c 'read -P 0x22 4M 1M' base.qcow2"), 0);
    run_clear(&r);
    qtest_end(s);
}
END_TEST

START_TEST(test_wait_cancelled)
{
    QTestState *s;
    const char *args[] = { "--wait", "block-stream", "job-id=s1",
                           "device=top", "speed=1", NULL };
    int out_fd, err_fd;
    GPid pid;
    Run r;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    pid = spawn_client(s, &out_fd, &err_fd, args);
    for (int i = 0; i < 3000 && !job_listed(s, "s1"); i++) {
        g_usleep(10000);
    }
    ck_assert(job_listed(s, "s1"));
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": {"
          "\"device\": \"s1\"}}");
    r = finish_client(pid, out_fd, err_fd);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "job 's1' failed: the job was cancelled"),
                  "%s", r.err);
    run_clear(&r);
    qtest_end(s);
}
END_TEST

START_TEST(test_wait_interrupt_cancels)
{
    QTestState *s;
    const char *args[] = { "--wait", "block-stream", "job-id=s1",
                           "device=top", "speed=1", NULL };
    int out_fd, err_fd;
    GPid pid;
    Run r;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    pid = spawn_client(s, &out_fd, &err_fd, args);
    for (int i = 0; i < 3000 && !job_listed(s, "s1"); i++) {
        g_usleep(10000);
    }
    ck_assert(job_listed(s, "s1"));
    kill(pid, SIGINT);
    r = finish_client(pid, out_fd, err_fd);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "cancelled by the user"), "%s", r.err);
    wait_job_gone(s, "s1");
    /* Cancelled: the chain is as it was. */
    ck_assert_int_eq(sh(s, "qemu-img info -U top.qcow2 | "
                           "grep -q 'backing file: mid.qcow2'"), 0);
    run_clear(&r);
    qtest_end(s);
}
END_TEST

START_TEST(test_wait_create_job)
{
    QTestState *s = qtest_start(NULL, true);
    const char *good[] = { "--wait", "blockdev-create", "job-id=cr1",
                           "options.driver=file",
                           "options.filename=new.img",
                           "options.size=1048576", NULL };
    const char *bad[] = { "--wait", "blockdev-create", "job-id=cr2",
                          "options.driver=file",
                          "options.filename=no/such/dir/new.img",
                          "options.size=1048576", NULL };
    g_autofree char *path = g_build_filename(qtest_dir(s), "new.img", NULL);
    Run r;

    r = run_client(s, good);
    ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
    ck_assert_msg(strstr(r.out, "Create complete\n"), "%s", r.out);
    ck_assert(g_file_test(path, G_FILE_TEST_IS_REGULAR));
    /* Concluded jobs are dismissed by the follower. */
    ck_assert(!job_listed(s, "cr1"));
    run_clear(&r);

    r = run_client(s, bad);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "job 'cr2' failed: "), "%s", r.err);
    ck_assert(!job_listed(s, "cr2"));
    run_clear(&r);
    qtest_end(s);
}
END_TEST

static gint64 stat_of(QTestState *s, const char *node, const char *group,
                      const char *member)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"x-strata-query-node-stats\", \"arguments\": "
        "{\"node-name\": \"%s\"}}", node);
    g_autoptr(JsonNode) r = qtest_qmp(s, req);
    JsonArray *a;
    JsonObject *o;

    ck_assert(r && qtest_is_return(r));
    a = json_object_get_array_member(json_node_get_object(r), "return");
    ck_assert_uint_eq(json_array_get_length(a), 1);
    o = json_array_get_object_element(a, 0);
    ck_assert_str_eq(json_object_get_string_member(o, "node-name"), node);
    if (!group) {
        return json_object_has_member(o, "stats");
    }
    o = json_object_get_object_member(json_object_get_object_member(
                                          o, "stats"), group);
    return json_object_get_int_member(o, member);
}

/* x-strata-query-node-stats: the qcow2 caches are empty until used (the
 * memory is taken lazily) and count what a job does. */
START_TEST(test_node_stats)
{
    QTestState *s;
    const char *args[] = { "--wait", "block-stream", "job-id=s1",
                           "device=top", NULL };
    Run r;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    ck_assert_int_gt(stat_of(s, "top", "l2-cache", "max-entries"), 0);
    ck_assert_int_eq(stat_of(s, "top", "l2-cache", "bytes"), 0);
    r = run_client(s, args);
    ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
    run_clear(&r);
    ck_assert_int_gt(stat_of(s, "top", "l2-cache", "entries"), 0);
    ck_assert_int_gt(stat_of(s, "top", "l2-cache", "bytes"), 0);
    ck_assert_int_gt(stat_of(s, "top", "l2-cache", "misses") +
                     stat_of(s, "top", "l2-cache", "hits"), 0);
    /* Every node is listed; a file node keeps no counters. */
    {
        g_autoptr(JsonNode) q = qtest_qmp(
            s, "{\"execute\": \"x-strata-query-node-stats\"}");
        JsonArray *a = json_object_get_array_member(
            json_node_get_object(q), "return");
        unsigned files = 0, qcow2s = 0;

        for (guint i = 0; i < json_array_get_length(a); i++) {
            JsonObject *o = json_array_get_object_element(a, i);
            const char *drv = json_object_get_string_member(o, "driver");
            if (!strcmp(drv, "file")) {
                files++;
                ck_assert(!json_object_has_member(o, "stats"));
            } else if (!strcmp(drv, "qcow2")) {
                qcow2s++;
                ck_assert(json_object_has_member(o, "stats"));
            }
        }
        /* top and base after the stream dropped mid: 2 + 2 files. */
        ck_assert_uint_ge(qcow2s, 1);
        ck_assert_uint_eq(files, qcow2s);
    }
    fails(s, "{\"execute\": \"x-strata-query-node-stats\", "
             "\"arguments\": {\"node-name\": \"nope\"}}",
          "GenericError", "Cannot find node nope");
    fails(s, "{\"execute\": \"x-strata-query-node-stats\", "
             "\"arguments\": {\"node-name\": 5}}",
          "GenericError", NULL);
    qtest_end(s);
}
END_TEST

START_TEST(test_wait_errors)
{
    QTestState *s = qtest_start(NULL, true);
    const char *no_node[] = { "--wait", "block-stream", "job-id=x",
                              "device=nope", NULL };
    const char *no_id[] = { "--wait", "query-version", NULL };
    const char *pivot_alone[] = { "--pivot", "query-version", NULL };
    const char *with_events[] = { "--wait", "--events", "block-stream",
                                  "job-id=x", "device=n", NULL };
    Run r;

    /* An error reply ends the wait at once with the server's text. */
    r = run_client(s, no_node);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "GenericError: "), "%s", r.err);
    run_clear(&r);
    /* Usage errors: exit 2 before anything is sent. */
    r = run_client(s, no_id);
    ck_assert_int_eq(r.status, 2);
    ck_assert_msg(strstr(r.err, "names no job"), "%s", r.err);
    run_clear(&r);
    r = run_client(s, pivot_alone);
    ck_assert_int_eq(r.status, 2);
    run_clear(&r);
    r = run_client(s, with_events);
    ck_assert_int_eq(r.status, 2);
    run_clear(&r);
    /* The daemon still serves. */
    ok(s, "{\"execute\": \"query-version\"}");
    qtest_end(s);
}
END_TEST

/* A job's filter-node-name that is malformed or taken: QEMU's errors,
 * no job, and the chain untouched (commit, stream, active commit). */
START_TEST(test_filter_name_errors)
{
    static const char *const cmds[] = {
        "block-commit\", \"arguments\": {\"job-id\": \"j\", "
        "\"device\": \"top\", \"top-node\": \"%s\"",
        "block-stream\", \"arguments\": {\"job-id\": \"j\", "
        "\"device\": \"top\"",
        "block-commit\", \"arguments\": {\"job-id\": \"j\", "
        "\"device\": \"top\"",
    };
    QTestState *s;
    g_autofree char *mid = NULL;

    if (!have_qemu_tools()) {
        return;
    }
    s = start_chain();
    {
        g_autoptr(JsonNode) r = qtest_qmp(
            s, "{\"execute\": \"query-named-block-nodes\"}");
        JsonArray *a = json_object_get_array_member(
            json_node_get_object(r), "return");
        for (guint i = 0; i < json_array_get_length(a); i++) {
            JsonObject *o = json_array_get_object_element(a, i);
            if (g_str_has_suffix(json_object_get_string_member(o, "file"),
                                 "mid.qcow2") &&
                !strcmp(json_object_get_string_member(o, "drv"), "qcow2")) {
                mid = g_strdup(json_object_get_string_member(o,
                                                              "node-name"));
            }
        }
    }
    ck_assert(mid);
    for (guint i = 0; i < G_N_ELEMENTS(cmds); i++) {
        g_autofree char *head = g_strdup_printf(cmds[i], mid);
        g_autofree char *dup = g_strdup_printf(
            "{\"execute\": \"%s, \"filter-node-name\": \"top\"}}", head);
        g_autofree char *bad = g_strdup_printf(
            "{\"execute\": \"%s, \"filter-node-name\": \"1bad\"}}", head);

        fails(s, dup, "GenericError",
              "Duplicate nodes with node-name='top'");
        fails(s, bad, "GenericError", NULL);
        ck_assert(!job_listed(s, "j"));
    }
    ck_assert_int_eq(sh(s, "qemu-img info -U top.qcow2 | "
                           "grep -q 'backing file: mid.qcow2' && "
                           "qemu-img info -U mid.qcow2 | "
                           "grep -q 'backing file: base.qcow2' && "
                           "qemu-img check -q base.qcow2"), 0);
    qtest_end(s);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/strata-qmp/wait-stream", test_wait_stream },
        { "/strata-qmp/wait-ready-and-pivot", test_wait_ready_and_pivot },
        { "/strata-qmp/wait-cancelled", test_wait_cancelled },
        { "/strata-qmp/wait-interrupt-cancels", test_wait_interrupt_cancels },
        { "/strata-qmp/wait-create-job", test_wait_create_job },
        { "/strata-qmp/wait-errors", test_wait_errors },
        { "/strata-qmp/node-stats", test_node_stats },
        { "/strata-qmp/filter-name-errors", test_filter_name_errors },
    };

    return strata_test_main("strata-qmp", tests, NULL, NULL);
}
