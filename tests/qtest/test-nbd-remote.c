/* qtest: local overlays over remote bases.  A base exported by qemu-nbd,
 * streamed by stratad while the server is killed and started again: with
 * a long enough reconnect-delay the stream completes with the right data
 * (qemu-img compare); without one it fails with an error event; either
 * way the daemon keeps answering other QMP clients meanwhile.  And two
 * stratad processes on loopback TCP: one exports a base, the other
 * streams it into its local overlay; one mirrors its disk to the other's
 * export (storage migration) and then runs a four-layer chain on it. */
#include <check.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"

static bool have_tools(void)
{
    g_autofree char *nbd = g_find_program_in_path("qemu-nbd");

    return nbd && have_qemu_tools();
}

/* base: 0x11 over 12 of 16 MiB; top (local): 0x22 at 4 MiB; ref.raw:
 * the guest view of the chain. */
static void make_images(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 12M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 1M' top.qcow2 && "
                           "qemu-img convert -O raw top.qcow2 ref.raw "
                           ">/dev/null"), 0);
}

/* qemu-nbd serves base.qcow2 read-only on nbd.sock; --fork returns once
 * the socket listens. */
static void nbd_start(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-nbd --fork --pid-file=nbd.pid -k "
                           "\"$PWD/nbd.sock\" -f qcow2 -r -x base "
                           "--persistent base.qcow2"), 0);
}

/* Stopped first for a while, so the job has a request sent and
 * unanswered when the server dies. */
static void nbd_kill(QTestState *s)
{
    ck_assert_int_eq(sh(s, "kill -STOP $(cat nbd.pid) && sleep 0.3 && "
                           "kill -9 $(cat nbd.pid) && "
                           "kill -CONT $(cat nbd.pid) 2>/dev/null; "
                           "rm -f nbd.pid"), 0);
}

/* At the end, whatever happened: the server this test started. */
static void nbd_end(QTestState *s)
{
    sh(s, "test ! -f nbd.pid || kill -9 $(cat nbd.pid)");
}

static void add_remote_chain(QTestState *s, int delay)
{
    g_autofree char *cmd = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"nbd\", \"node-name\": \"remote\", \"read-only\": true, "
        "\"server\": {\"type\": \"unix\", \"path\": \"%s/nbd.sock\"}, "
        "\"export\": \"base\", \"reconnect-delay\": %d}}",
        qtest_dir(s), delay);

    ok(s, cmd);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"remote\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
}

/* Waits until the stream has copied something (so the server dies with
 * the job under way). */
static void wait_progress(QTestState *s)
{
    for (int i = 0; i < 2000; i++) {
        JsonNode *keep = NULL;
        JsonObject *j = block_job(s, &keep);
        gint64 off = json_object_get_int_member(j, "offset");

        json_node_unref(keep);
        if (off > 0) {
            return;
        }
        g_usleep(5000);
    }
    ck_abort_msg("the stream made no progress");
}

/* Another client asks the daemon for its jobs and must get an answer
 * (while a job waits for the server: @job_there). */
static void side_client_answers(QTestState *s, bool job_there)
{
    const char *req = "{\"execute\": \"qmp_capabilities\"}"
                      "{\"execute\": \"query-block-jobs\"}";
    g_autoptr(GString) got = g_string_new(NULL);
    int fd = qtest_connect(s);
    int returns = 0;

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
    while (returns < 2) {
        struct pollfd p = { fd, POLLIN, 0 };
        char buf[4096];
        ssize_t n;

        ck_assert_msg(poll(&p, 1, 10000) == 1,
                      "the daemon stopped answering: %s", got->str);
        n = read(fd, buf, sizeof(buf));
        ck_assert_int_gt(n, 0);
        g_string_append_len(got, buf, n);
        returns = 0;
        for (const char *q = got->str; (q = strstr(q, "\"return\""));
             q++) {
            returns++;
        }
    }
    ck_assert_msg(!strstr(got->str, "\"stream\"") == !job_there, "%s",
                  got->str);
    close(fd);
}

/* A daemon with the remote chain, streaming at @speed bytes/s, whose
 * server has just been killed with the job under way. */
static QTestState *stream_then_kill(int delay, int speed)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *cmd = g_strdup_printf(
        "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
        "\"j\", \"device\": \"top\", \"speed\": %d}}", speed);

    make_images(s);
    nbd_start(s);
    add_remote_chain(s, delay);
    ok(s, cmd);
    wait_progress(s);
    nbd_kill(s);
    return s;
}

START_TEST(test_stream_survives_restart)
{
    QTestState *s;
    g_autoptr(JsonNode) ev = NULL;

    if (!have_tools()) {
        return;
    }
    s = stream_then_kill(60, 8388608);
    g_usleep(300 * 1000);
    side_client_answers(s, true);
    nbd_start(s);
    ev = want_event(s, "BLOCK_JOB_COMPLETED");
    ck_assert_msg(!json_object_has_member(data_of(ev), "error"), "%s",
                  json_object_get_string_member(data_of(ev), "error"));
    ck_assert_int_eq(json_object_get_int_member(data_of(ev), "offset"),
                     16 * 1024 * 1024);
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"remote\"}}");
    nbd_end(s);
    /* The overlay stands alone now and holds the chain's data. */
    ck_assert_int_eq(sh(s, "qemu-img compare -f qcow2 -F raw top.qcow2 "
                           "ref.raw && ! qemu-img info top.qcow2 | "
                           "grep -q backing"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_stream_fails_without_delay)
{
    QTestState *s;
    g_autoptr(JsonNode) ev = NULL;

    if (!have_tools()) {
        return;
    }
    s = stream_then_kill(0, 4194304);
    ev = want_event(s, "BLOCK_JOB_COMPLETED");
    ck_assert_msg(json_object_has_member(data_of(ev), "error"),
                  "the stream completed without its server");
    ck_assert_int_lt(json_object_get_int_member(data_of(ev), "offset"),
                     16 * 1024 * 1024);
    side_client_answers(s, false);
    /* The overlay keeps its backing file: nothing was cut off. */
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ck_assert_int_eq(sh(s, "qemu-img compare -f qcow2 -F raw top.qcow2 "
                           "ref.raw && qemu-img info top.qcow2 | "
                           "grep -q 'backing file: base.qcow2'"), 0);
    nbd_end(s);
    qtest_end(s);
}
END_TEST


/* A TCP port nobody listens on right now (the kernel's pick). */
static int free_port(void)
{
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t len = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int port;

    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
    port = ntohs(sin.sin_port);
    close(fd);
    return port;
}

START_TEST(test_two_daemons)
{
    QTestState *a, *b;
    g_autoptr(JsonNode) ev = NULL;
    g_autofree char *start = NULL;
    g_autofree char *remote = NULL;
    int port = free_port();

    if (!have_qemu_tools()) {
        return;
    }
    a = qtest_start(NULL, true);
    b = qtest_start(NULL, true);
    make_images(a);
    ck_assert_int_eq(sh(b, "mv '%s/top.qcow2' '%s/ref.raw' . && "
                           "qemu-img rebase -u -b nbd://127.0.0.1:%d/base "
                           "-F raw top.qcow2", qtest_dir(a), qtest_dir(a),
                        port), 0);
    /* Daemon A serves its base over TCP, read-only. */
    ok(a, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"base\", \"read-only\": true, "
          "\"file\": {\"driver\": \"file\", \"filename\": \"base.qcow2\"}}}");
    start = g_strdup_printf(
        "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
        "{\"type\": \"inet\", \"data\": {\"host\": \"127.0.0.1\", "
        "\"port\": \"%d\"}}}}", port);
    ok(a, start);
    ok(a, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e\", \"node-name\": \"base\", \"name\": "
          "\"base\"}}");
    /* Daemon B: its overlay over A's export, streamed into one image. */
    remote = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"nbd\", \"node-name\": \"remote\", \"read-only\": true, "
        "\"server\": {\"type\": \"inet\", \"host\": \"127.0.0.1\", "
        "\"port\": \"%d\"}, \"export\": \"base\"}}", port);
    ok(b, remote);
    ok(b, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"remote\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    ok(b, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"j\", \"device\": \"top\"}}");
    ev = want_event(b, "BLOCK_JOB_COMPLETED");
    ck_assert_msg(!json_object_has_member(data_of(ev), "error"), "%s",
                  json_object_get_string_member(data_of(ev), "error"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(a, "{\"execute\": "
                                             "\"query-block-exports\"}");
        g_autofree char *txt = qtest_to_string(r);
        ck_assert_msg(strstr(txt, "\"node-name\": \"base\"") ||
                      strstr(txt, "\"node-name\":\"base\""), "%s", txt);
    }
    ok(b, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ok(b, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"remote\"}}");
    qtest_end(a);
    /* With A gone, B's overlay holds everything by itself. */
    ck_assert_int_eq(sh(b, "qemu-img compare -f qcow2 -F raw top.qcow2 "
                           "ref.raw && ! qemu-img info top.qcow2 | "
                           "grep -q backing"), 0);
    qtest_end(b);
}
END_TEST

/* Storage migration as libvirt drives it: B mirrors its disk (a
 * two-layer local chain) to a writable export of A over TCP, cancels in
 * READY (the source stays), and A's copy holds the guest view.  Then B
 * opens a four-layer chain whose base is A's export and serves it: the
 * guest view through B matches the local chain. */
START_TEST(test_mirror_to_remote)
{
    QTestState *a, *b;
    g_autoptr(JsonNode) ev = NULL;
    g_autofree char *cmd = NULL;
    int port = free_port();

    if (!have_qemu_tools()) {
        return;
    }
    a = qtest_start(NULL, true);
    b = qtest_start(NULL, true);
    make_images(b);
    ck_assert_int_eq(sh(a, "qemu-img create -q -f raw target.raw 16M"), 0);
    ok(a, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"raw\", \"node-name\": \"t\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"target.raw\"}}}");
    cmd = g_strdup_printf(
        "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
        "{\"type\": \"inet\", \"data\": {\"host\": \"127.0.0.1\", "
        "\"port\": \"%d\"}}}}", port);
    ok(a, cmd);
    ok(a, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e\", \"node-name\": \"t\", \"name\": \"t\", "
          "\"writable\": true}}");

    ok(b, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"base.qcow2\"}}}");
    ok(b, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"base\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    g_free(cmd);
    cmd = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"nbd\", \"node-name\": \"remote\", \"server\": {\"type\": "
        "\"inet\", \"host\": \"127.0.0.1\", \"port\": \"%d\"}, "
        "\"export\": \"t\"}}", port);
    ok(b, cmd);
    ok(b, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"top\", \"target\": \"remote\", \"sync\": "
          "\"full\"}}");
    json_node_unref(want_event(b, "BLOCK_JOB_READY"));
    ok(b, "{\"execute\": \"block-job-cancel\", \"arguments\": {\"device\": "
          "\"m\"}}");
    ev = want_event(b, "BLOCK_JOB_COMPLETED");
    ck_assert_msg(!json_object_has_member(data_of(ev), "error"), "%s",
                  json_object_get_string_member(data_of(ev), "error"));
    ok(b, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ok(b, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"base\"}}");
    ok(b, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"remote\"}}");
    ck_assert_int_eq(sh(a, "qemu-img compare -f raw -F raw target.raw "
                           "'%s/ref.raw'", qtest_dir(b)), 0);

    /* A four-layer chain in B over A's export (now the guest's disk). */
    /* Built over a local copy of A's image (A holds it open); the
     * blockdev-add below puts A's export under s1 instead. */
    ck_assert_int_eq(sh(b, "cp '%s/target.raw' copy.raw && "
                           "qemu-img create -q -f qcow2 -F raw -b "
                           "copy.raw s1.qcow2 && "
                           "qemu-io -c 'write -P 0x31 1M 64k' s1.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b s1.qcow2 "
                           "s2.qcow2 && qemu-io -c 'write -z 2M 1M' s2.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b s2.qcow2 "
                           "s3.qcow2 && qemu-io -c 'write -P 0x33 15M 4k' "
                           "s3.qcow2 && qemu-img convert -O raw s3.qcow2 "
                           "ref4.raw >/dev/null && rm copy.raw", qtest_dir(a)),
                     0);
    g_free(cmd);
    cmd = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"qcow2\", \"node-name\": \"s3\", \"read-only\": true, "
        "\"file\": {\"driver\": \"file\", \"filename\": \"s3.qcow2\"}, "
        "\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"s2.qcow2\"}, \"backing\": {\"driver\": "
        "\"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": "
        "\"s1.qcow2\"}, \"backing\": {\"driver\": \"raw\", \"file\": "
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"inet\", \"host\": "
        "\"127.0.0.1\", \"port\": \"%d\"}, \"export\": \"t\"}}}}}}", port);
    ok(b, cmd);
    ok(b, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"b.sock\"}}}}");
    ok(b, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e4\", \"node-name\": \"s3\", \"name\": "
          "\"s3\"}}");
    ck_assert_int_eq(sh(b, "qemu-img compare -f raw -F raw "
                           "'nbd+unix:///s3?socket=b.sock' ref4.raw"), 0);
    qtest_end(b);
    qtest_end(a);
}
END_TEST

int main(void)
{
    Suite *su = suite_create("nbd-remote");
    TCase *tc = tcase_create("stream");

    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_stream_survives_restart);
    tcase_add_test(tc, test_stream_fails_without_delay);
    tcase_add_test(tc, test_two_daemons);
    tcase_add_test(tc, test_mirror_to_remote);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
