/* qtest: stratad as a daemon — events while NBD clients come and go,
 * the --nbd-server and --export forms, and the shutdown order. */
#include <check.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "libqtest.h"
#include "../unit/test-util.h"

static bool have_qemu_io(void)
{
    g_autofree char *p = g_find_program_in_path("qemu-io");
    return p != NULL;
}

/* Sends @req; the reply must be a return (its value is handed back). */
static JsonNode *ok(QTestState *s, const char *req)
{
    JsonNode *r = qtest_qmp(s, req);
    g_autofree char *txt = r ? qtest_to_string(r) : NULL;

    ck_assert_msg(r && qtest_is_return(r), "%s -> %s", req,
                  txt ? txt : "(none)");
    return r;
}

static void ok_free(QTestState *s, const char *req)
{
    json_node_unref(ok(s, req));
}

static char *make_image(const char *dir, const char *name, int size_mib)
{
    char *path = g_build_filename(dir, name, NULL);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, (off_t)size_mib << 20), 0);
    close(fd);
    return path;
}

/* ---- an interactive qemu-io on an NBD export ---- */

typedef struct {
    GPid pid;
    int in, out;
} QemuIo;

static void qio_start(QemuIo *q, const char *sock, const char *export)
{
    g_autofree char *uri = g_strdup_printf("nbd+unix:///%s?socket=%s",
                                           export, sock);
    char *argv[] = { "qemu-io", "-f", "raw", uri, NULL };
    g_autoptr(GError) err = NULL;

    ck_assert_msg(g_spawn_async_with_pipes(NULL, argv, NULL,
                                           G_SPAWN_SEARCH_PATH |
                                           G_SPAWN_DO_NOT_REAP_CHILD |
                                           G_SPAWN_STDERR_TO_DEV_NULL,
                                           NULL, NULL, &q->pid, &q->in,
                                           &q->out, NULL, &err),
                  "%s", err ? err->message : "");
}

/* Runs one qemu-io command and waits for its summary line ("… ops; …"):
 * returns everything it printed. */
static char *qio_cmd(QemuIo *q, const char *cmd)
{
    GString *out = g_string_new(NULL);
    gint64 deadline = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;

    ck_assert_int_eq(write(q->in, cmd, strlen(cmd)), (ssize_t)strlen(cmd));
    ck_assert_int_eq(write(q->in, "\n", 1), 1);
    while (!strstr(out->str, "ops/sec") && !strstr(out->str, "failed") &&
           g_get_monotonic_time() < deadline) {
        struct pollfd p = { .fd = q->out, .events = POLLIN };
        char buf[4096];
        if (poll(&p, 1, 100) == 1) {
            ssize_t n = read(q->out, buf, sizeof(buf));
            if (n <= 0) {
                break;
            }
            g_string_append_len(out, buf, n);
        }
    }
    return g_string_free(out, FALSE);
}

static void qio_end(QemuIo *q)
{
    kill(q->pid, SIGKILL);
    waitpid(q->pid, NULL, 0);
    g_spawn_close_pid(q->pid);
    close(q->in);
    close(q->out);
}

/* Runs qemu-io -c CMD… once on an export; returns its exit status. */
static int qio_once(const char *sock, const char *export, bool ro,
                    const char *cmd1, const char *cmd2, char **out)
{
    g_autofree char *uri = g_strdup_printf("nbd+unix:///%s?socket=%s",
                                           export, sock);
    char *argv[10] = { "qemu-io", "-f", "raw" };
    int n = 3, status = -1;

    if (ro) {
        argv[n++] = "-r";
    }
    argv[n++] = "-c";
    argv[n++] = (char *)cmd1;
    if (cmd2) {
        argv[n++] = "-c";
        argv[n++] = (char *)cmd2;
    }
    argv[n++] = uri;
    argv[n] = NULL;
    ck_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                           out, NULL, &status, NULL));
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* ---- the event after a hard block-export-del ---- */

/*
 * A hard block-export-del while a client that has written is connected:
 * the export goes away once the client is dropped, and the event is
 * sent no later than the first query-block-exports that no longer
 * lists it.  Another QMP client that sends a command and vanishes at
 * the same time changes nothing for the first.
 */
START_TEST(test_hard_del_event)
{
    QTestState *s;
    g_autofree char *nbd = NULL, *img = NULL, *req = NULL, *out = NULL;
    QemuIo q;
    JsonNode *ev;
    int rounds = 0;

    if (!have_qemu_io()) {
        return;
    }
    s = qtest_start(NULL, true);
    nbd = g_build_filename(qtest_dir(s), "nbd.sock", NULL);
    img = make_image(qtest_dir(s), "d.raw", 1);
    req = g_strdup_printf("{\"execute\": \"blockdev-add\", \"arguments\": "
                          "{\"driver\": \"file\", \"node-name\": \"f\", "
                          "\"filename\": \"%s\"}}", img);
    ok_free(s, req);
    g_free(req);
    req = g_strdup_printf("{\"execute\": \"nbd-server-start\", \"arguments\": "
                          "{\"addr\": {\"type\": \"unix\", \"data\": "
                          "{\"path\": \"%s\"}}}}", nbd);
    ok_free(s, req);
    ok_free(s, "{\"execute\": \"block-export-add\", \"arguments\": "
               "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": \"f\", "
               "\"writable\": true}}");

    for (int i = 0; i < 5; i++) {
        qio_start(&q, nbd, "f");
        out = qio_cmd(&q, "write -P 0x5a 0 64k");
        ck_assert_msg(strstr(out, "wrote 65536/65536"), "%s", out);
        g_clear_pointer(&out, g_free);

        /* A second client: negotiates, asks, hangs up at once. */
        int fd = qtest_connect(s);
        const char *bye = "{\"execute\": \"qmp_capabilities\"}"
                          "{\"execute\": \"query-version\"}";
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(write(fd, bye, strlen(bye)), (ssize_t)strlen(bye));
        ok_free(s, "{\"execute\": \"block-export-del\", \"arguments\": "
                   "{\"id\": \"e0\", \"mode\": \"hard\"}}");
        close(fd);

        for (;;) {
            g_autoptr(JsonNode) r = ok(s, "{\"execute\": "
                                          "\"query-block-exports\"}");
            JsonArray *a = json_object_get_array_member(
                json_node_get_object(r), "return");
            if (json_array_get_length(a) == 0) {
                break;
            }
            ck_assert_int_lt(++rounds, 100000);
        }
        /* Already queued: it came before the reply that shows no export. */
        ev = qtest_wait_event(s, "BLOCK_EXPORT_DELETED", 0);
        ck_assert_msg(ev != NULL, "no BLOCK_EXPORT_DELETED (round %d)", i);
        ck_assert_str_eq(json_object_get_string_member(
            json_object_get_object_member(json_node_get_object(ev), "data"),
            "id"), "e0");
        json_node_unref(ev);
        qio_end(&q);
        if (i < 4) {
            ok_free(s, "{\"execute\": \"block-export-add\", \"arguments\": "
                       "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                       "\"f\", \"writable\": true}}");
        }
    }
    qtest_end(s);
}
END_TEST

/* ---- --nbd-server and --export ---- */

/* Runs stratad with @args (shell-split) to its exit; *@err gets stderr. */
static int run_stratad(const char *args, char **err)
{
    g_autofree char *cmd = g_strdup_printf("%s %s", STRATAD_PATH, args);
    g_auto(GStrv) argv = NULL;
    int status = -1;

    ck_assert(g_shell_parse_argv(cmd, NULL, &argv, NULL));
    ck_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL,
                           NULL, NULL, NULL, err, &status, NULL));
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* One line naming the option, exit status 1. */
static void bad_args(const char *args, const char *want1, const char *want2)
{
    g_autofree char *err = NULL;

    ck_assert_int_eq(run_stratad(args, &err), 1);
    ck_assert_msg(strchr(err, '\n') == err + strlen(err) - 1,
                  "not one line: %s", err);
    ck_assert_msg(strstr(err, want1) && (!want2 || strstr(err, want2)),
                  "%s: %s", args, err);
}

START_TEST(test_cmdline_nbd)
{
    g_autofree char *dir = g_dir_make_tmp("strata-qtest-XXXXXX", NULL);
    g_autofree char *img = make_image(dir, "d.raw", 1);
    g_autofree char *nbd = g_build_filename(dir, "nbd.sock", NULL);
    g_autofree char *args = g_strdup_printf(
        "--blockdev driver=file,node-name=f,filename=%s "
        "--nbd-server addr.type=unix,addr.path=%s,max-connections=4 "
        "--export type=nbd,id=e0,node-name=f,name=disk,writable=on "
        "--export type=nbd,id=e1,node-name=f",
        img, nbd);
    QTestState *s = qtest_start(args, true);
    g_autoptr(JsonNode) r = ok(s, "{\"execute\": \"query-block-exports\"}");
    g_autofree char *txt = qtest_to_string(r);
    g_autofree char *out = NULL, *out2 = NULL, *out3 = NULL;

    ck_assert_str_eq(txt, "{\"return\": ["
                     "{\"id\": \"e1\", \"type\": \"nbd\", \"node-name\": "
                     "\"f\", \"shutting-down\": false}, "
                     "{\"id\": \"e0\", \"type\": \"nbd\", \"node-name\": "
                     "\"f\", \"shutting-down\": false}]}");
    /* As QSD: exports' backends are anonymous and attach no device, so
     * query-block lists nothing, while the nodes are all there. */
    g_autoptr(JsonNode) qb = ok(s, "{\"execute\": \"query-block\"}");
    g_autofree char *qbt = qtest_to_string(qb);
    ck_assert_str_eq(qbt, "{\"return\": []}");
    if (have_qemu_io()) {
        ck_assert_int_eq(qio_once(nbd, "disk", false, "write -P 0xa5 4096 8192",
                                  "read -P 0xa5 4096 8192", &out), 0);
        ck_assert_msg(strstr(out, "read 8192/8192"), "%s", out);
        /* e1 is read-only (writable defaults to off) and named by its
         * node. */
        ck_assert_int_eq(qio_once(nbd, "f", true, "read -P 0xa5 4096 8192", NULL,
                                  &out2), 0);
        ck_assert_msg(strstr(out2, "read 8192/8192"), "%s", out2);
        /* Opening it for writing is refused. */
        ck_assert_int_ne(qio_once(nbd, "f", false, "write 0 512", NULL,
                                  &out3), 0);
    }
    qtest_end(s);
    g_unlink(img);
    g_rmdir(dir);

    /* An export needs the server before it, as in qemu-storage-daemon. */
    bad_args("--blockdev driver=null-co,node-name=n "
             "--export type=nbd,id=e0,node-name=n",
             "--export", "NBD server not running");
    bad_args("--nbd-server addr.type=vsock,addr.cid=2,addr.port=1",
             "--nbd-server", "addr.");
    bad_args("--nbd-server addr.type=unix,addr.path=/tmp/x,bogus=1",
             "--nbd-server", "bogus");
    bad_args("--nbd-server max-connections=2", "--nbd-server", "'addr'");
    bad_args("--nbd-server addr.type=unix,addr.path=/tmp/x,"
             "max-connections=many", "--nbd-server", "max-connections");
    bad_args("--nbd-server addr.type=unix,addr.path=/tmp/x,tls-creds=t",
             "--nbd-server", "TLS");
    bad_args("--nbd-server addr.type=unix,addr.path=/nonexistent/dir/s",
             "--nbd-server", "listen");
    bad_args("--nbd-server addr.type=unix,addr.path=/tmp/strata-never.sock "
             "--export type=nbd,id=e0,node-name=nosuch",
             "--export", "nosuch");
}
END_TEST

/* ---- shutdown ---- */

static void shutdown_case(bool by_quit)
{
    g_autofree char *dir = g_dir_make_tmp("strata-qtest-XXXXXX", NULL);
    g_autofree char *img = g_build_filename(dir, "d.qcow2", NULL);
    g_autofree char *nbd = g_build_filename(dir, "nbd.sock", NULL);
    g_autofree char *args = NULL, *out = NULL, *check = NULL, *cmd = NULL;
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    QTestState *s;
    QemuIo q;
    JsonNode *ev;
    int status;

    if (!qemu_img || !have_qemu_io()) {
        g_rmdir(dir);
        return;
    }
    cmd = g_strdup_printf("qemu-img create -q -f qcow2 %s 4M", img);
    ck_assert(g_spawn_command_line_sync(cmd, NULL, NULL, &status, NULL));
    ck_assert_int_eq(status, 0);
    args = g_strdup_printf(
        "--blockdev driver=file,node-name=file,filename=%s "
        "--blockdev driver=qcow2,node-name=disk,file=file "
        "--nbd-server addr.type=unix,addr.path=%s "
        "--export type=nbd,id=e0,node-name=disk,writable=on", img, nbd);
    s = qtest_start(args, true);
    qio_start(&q, nbd, "disk");
    /* Allocates clusters: the qcow2 metadata is dirty in the caches. */
    out = qio_cmd(&q, "write -P 0x3c 1M 192k");
    ck_assert_msg(strstr(out, "wrote 196608/196608"), "%s", out);

    if (by_quit) {
        qtest_send_raw(s, "{\"execute\": \"quit\", \"id\": \"q\"}",
                       strlen("{\"execute\": \"quit\", \"id\": \"q\"}"));
        g_autoptr(JsonNode) r = qtest_receive(s, 10000);
        ck_assert(qtest_is_return(r));
        status = qtest_wait_exit(s, 10000);
    } else {
        status = qtest_terminate(s);
    }
    ck_assert_int_eq(status, 0);
    /* The export's event reached the client on the way out. */
    ev = qtest_wait_event(s, "BLOCK_EXPORT_DELETED", 1000);
    ck_assert(ev != NULL);
    json_node_unref(ev);
    ck_assert(qtest_eof(s));
    /* Every socket is gone. */
    ck_assert(!g_file_test(qtest_socket(s), G_FILE_TEST_EXISTS));
    ck_assert(!g_file_test(nbd, G_FILE_TEST_EXISTS));
    qio_end(&q);

    /* The image was flushed and closed: consistent, unlocked, with the
     * data. */
    g_free(cmd);
    cmd = g_strdup_printf("qemu-img check -q %s", img);
    ck_assert(g_spawn_command_line_sync(cmd, NULL, &check, &status, NULL));
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s", check);
    g_free(cmd);
    g_free(out);
    out = NULL;
    cmd = g_strdup_printf("qemu-io -f qcow2 -c 'read -P 0x3c 1M 192k' %s",
                          img);
    ck_assert(g_spawn_command_line_sync(cmd, &out, NULL, &status, NULL));
    ck_assert_msg(strstr(out, "read 196608/196608"), "%s", out);
    qtest_end(s);
    g_unlink(img);
    g_rmdir(dir);
}

START_TEST(test_shutdown_sigterm)
{
    shutdown_case(false);
}
END_TEST

START_TEST(test_shutdown_quit)
{
    shutdown_case(true);
}
END_TEST

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const StrataTestCase tests[] = {
        { "/stratad/events/hard-export-del",
          test_hard_del_event, .timeout = 60 },
        { "/stratad/cmdline/nbd-server-export",
          test_cmdline_nbd, .timeout = 60 },
        { "/stratad/shutdown/sigterm", test_shutdown_sigterm, .timeout = 60 },
        { "/stratad/shutdown/quit", test_shutdown_quit, .timeout = 60 },
    };

    return strata_test_main("stratad", tests, NULL, NULL);
}
