/* The in-process monitor (strata-monitor.h), the JSON splitter's limits,
 * and docs/qmp.md against the schema. */
#include <check.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "strata.h"
#include "qmp-private.h"
#include "block-private.h"

static StrataContext *ctx;
static StrataMonitor *mon;

static void setup(void)
{
    ctx = strata_context_new(NULL, "threads", NULL);
    ck_assert(ctx);
    mon = strata_monitor_new(ctx);
}

static void teardown(void)
{
    strata_monitor_free(mon);
    strata_context_free(ctx);
}

START_TEST(test_execute)
{
    g_autofree char *r1 = strata_monitor_execute(mon,
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"null-co\", \"node-name\": \"n0\"}, \"id\": 1}");
    g_autofree char *r2 = strata_monitor_execute(mon,
        "{\"execute\": \"qmp_capabilities\"} {\"execute\": \"nope\"}");
    g_autofree char *r3 = strata_monitor_execute(mon, "{\"execute\": ");

    ck_assert_str_eq(r1, "{\"return\": {}, \"id\": 1}\r\n");
    /* Already in command mode: negotiation is refused as a second one. */
    ck_assert_str_eq(r2, "{\"error\": {\"class\": \"CommandNotFound\", "
                         "\"desc\": \"Capabilities negotiation is already "
                         "complete, command ignored\"}}\r\n"
                         "{\"error\": {\"class\": \"CommandNotFound\", "
                         "\"desc\": \"The command nope has not been "
                         "found\"}}\r\n");
    ck_assert_str_eq(r3, "");
    ck_assert(strata_context_find_node(ctx, "n0") != NULL);
}
END_TEST

static void on_event(StrataMonitor *m, const char *ev, void *opaque)
{
    g_ptr_array_add(opaque, g_strdup(ev));
}

static void on_quit(StrataMonitor *m, void *opaque)
{
    *(int *)opaque += 1;
}

START_TEST(test_events_and_quit)
{
    GPtrArray *evs = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(JsonObject) data = json_object_new();
    int quits = 0;

    strata_monitor_set_event_func(mon, on_event, evs,
                                  (GDestroyNotify)g_ptr_array_unref);
    strata_monitor_set_quit_func(mon, on_quit, &quits);
    json_object_set_string_member(data, "id", "e0");
    strata_monitor_emit_event(mon, "BLOCK_EXPORT_DELETED", data);
    ck_assert_int_eq(evs->len, 1);
    ck_assert(g_str_has_prefix(evs->pdata[0], "{\"timestamp\": {\"seconds\": "));
    ck_assert(g_str_has_suffix(evs->pdata[0], "\"event\": "
                               "\"BLOCK_EXPORT_DELETED\", \"data\": "
                               "{\"id\": \"e0\"}}"));
    g_autofree char *r = strata_monitor_execute(mon,
        "{\"execute\": \"quit\"}");
    ck_assert_str_eq(r, "{\"return\": {}}\r\n");
    ck_assert_int_eq(quits, 1);
}
END_TEST

typedef struct {
    GPtrArray *out;
} Collect;

static void collect(JsonNode *v, GError *e, void *opaque)
{
    GPtrArray *out = opaque;

    if (e) {
        g_ptr_array_add(out, g_strdup_printf("E:%s", e->message));
        g_error_free(e);
    } else {
        g_ptr_array_add(out, strata_json_to_string(v));
        json_node_unref(v);
    }
}

START_TEST(test_stream_bytewise)
{
    /* Byte by byte gives the same texts as one write. */
    const char *in = "{'a': [1, -2.5e3, true, null]} \"x\\u00e9\" 7 }"
                     " {\"a\" 1} [1,]\n@x {\"b\": 2}";
    g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(StrataJsonStream) js = strata_json_stream_new(collect, out);

    for (size_t i = 0; in[i]; i++) {
        strata_json_stream_feed(js, in + i, 1);
    }
    strata_json_stream_flush(js);
    ck_assert_int_eq(out->len, 8);
    ck_assert_str_eq(out->pdata[0], "{\"a\": [1, -2500, true, null]}");
    ck_assert_str_eq(out->pdata[1], "\"x\\u00E9\"");
    ck_assert_str_eq(out->pdata[2], "7");
    ck_assert_str_eq(out->pdata[3], "E:JSON parse error, expecting value");
    ck_assert_str_eq(out->pdata[4],
                     "E:JSON parse error, missing : in object pair");
    ck_assert_str_eq(out->pdata[5], "E:JSON parse error, expecting value");
    ck_assert_str_eq(out->pdata[6], "E:JSON parse error, stray '@'");
    ck_assert_str_eq(out->pdata[7], "{\"b\": 2}");
}
END_TEST

/* The writer: runs of plain characters between escapes, every integer's
 * digits, and objects whose text is given. */
START_TEST(test_json_writer)
{
    g_autoptr(JsonObject) o = json_object_new();
    g_autoptr(JsonObject) known = json_object_new();
    g_autoptr(JsonNode) n = json_node_alloc();
    g_autoptr(GHashTable) texts = g_hash_table_new(NULL, NULL);
    g_autofree char *plain = NULL, *with = NULL, *pretty = NULL;

    json_object_set_string_member(o, "s",
                                  "ab\"c\\d\n\x01\x7f" "e\xc3\xa9" "f\xff"
                                  "g\xf0\x9f\x98\x80" "hij");
    json_object_set_int_member(o, "z", 0);
    json_object_set_int_member(o, "m", -1);
    json_object_set_int_member(o, "lo", G_MININT64);
    json_object_set_int_member(o, "hi", G_MAXINT64);
    json_object_set_string_member(o, "", "");
    json_object_set_int_member(known, "x", 1);
    json_object_set_object_member(o, "k", json_object_ref(known));
    json_node_init_object(n, o);

    plain = strata_json_to_string(n);
    ck_assert_str_eq(plain,
        "{\"s\": \"ab\\\"c\\\\d\\n\\u0001\\u007Fe\\u00E9f\\uFFFDg"
        "\\uD83D\\uDE00hij\", \"z\": 0, \"m\": -1, "
        "\"lo\": -9223372036854775808, \"hi\": 9223372036854775807, "
        "\"\": \"\", \"k\": {\"x\": 1}}");
    g_hash_table_insert(texts, known, (char *)"{\"x\": 2}");
    with = strata_json_to_string_with(n, texts);
    ck_assert_ptr_nonnull(strstr(with, "\"k\": {\"x\": 2}}"));
    ck_assert_int_eq(strlen(with), strlen(plain));
    /* Pretty printing writes every member itself. */
    pretty = strata_json_to_pretty_string(n);
    ck_assert_ptr_nonnull(strstr(pretty, "\"x\": 1"));
}
END_TEST

START_TEST(test_stream_limits)
{
    g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(StrataJsonStream) js = strata_json_stream_new(collect, out);
    char *deep = g_malloc(2000);

    memset(deep, '{', 2000);
    strata_json_stream_feed(js, deep, 2000);
    ck_assert_int_eq(out->len, 1);
    ck_assert_str_eq(out->pdata[0], "E:JSON nesting depth limit exceeded");
    /* Nothing of the skipped text is kept. */
    ck_assert_int_eq(strata_json_stream_pending(js), 0);
    memset(deep, '}', 2000);
    strata_json_stream_feed(js, deep, 2000);
    strata_json_stream_feed(js, "[\"ok\"]", 6);
    ck_assert_int_eq(out->len, 2);
    ck_assert_str_eq(out->pdata[1], "[\"ok\"]");
    g_free(deep);

    /* Many small tokens: the token count bound. */
    strata_json_stream_feed(js, "[", 1);
    for (int i = 0; i < 300000; i++) {
        strata_json_stream_feed(js, "1,", 2);
    }
    ck_assert_int_eq(out->len, 3);
    ck_assert_str_eq(out->pdata[2], "E:JSON token count limit exceeded");
    strata_json_stream_feed(js, "1] 5 ", 5);
    ck_assert_str_eq(out->pdata[out->len - 1], "5");
}
END_TEST

START_TEST(test_schema_args)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(StrataQmpSchema) s = strata_qmp_schema_new(&err);
    g_autoptr(JsonNode) a = strata_json_parse_text(
        "{\"node-name\": \"x\", \"size\": 1.5}", NULL);

    ck_assert(s);
    ck_assert(!strata_qmp_schema_check_args(s, "block_resize",
                                            json_node_get_object(a), &err));
    ck_assert_str_eq(err->message,
                     "Invalid parameter type for 'size', expected: integer");
}
END_TEST

/* docs/qmp.md documents exactly the schema's commands. */
START_TEST(test_docs_match_schema)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(StrataQmpSchema) s = strata_qmp_schema_new(&err);
    g_autofree char *path = g_build_filename(STRATA_SRCDIR, "docs", "qmp.md",
                                             NULL);
    g_autofree char *doc = NULL;
    const GPtrArray *cmds = strata_qmp_schema_commands(s);
    g_auto(GStrv) lines = NULL;
    unsigned documented = 0;

    ck_assert(g_file_get_contents(path, &doc, NULL, NULL));
    lines = g_strsplit(doc, "\n", -1);
    for (guint i = 0; lines[i]; i++) {
        if (g_str_has_prefix(lines[i], "### `")) {
            g_autofree char *name = g_strndup(lines[i] + 5,
                                              strlen(lines[i]) - 6);
            ck_assert_msg(strata_qmp_schema_has_command(s, name),
                          "docs/qmp.md documents '%s', not in the schema",
                          name);
            documented++;
        }
    }
    for (guint i = 0; i < cmds->len; i++) {
        g_autofree char *h = g_strdup_printf("### `%s`\n",
                                             (char *)cmds->pdata[i]);
        ck_assert_msg(strstr(doc, h), "docs/qmp.md lacks '%s'",
                      (char *)cmds->pdata[i]);
    }
    ck_assert_int_eq(documented, cmds->len);
}
END_TEST


/* ---- the socket server, driven from this thread ---- */

static char *sock_dir;
static char *sock_path;

static void sock_setup(void)
{
    setup();
    sock_dir = g_dir_make_tmp("strata-mon-XXXXXX", NULL);
    ck_assert(sock_dir);
    sock_path = g_build_filename(sock_dir, "qmp.sock", NULL);
    ck_assert(strata_monitor_listen(mon, sock_path, NULL));
}

static void sock_teardown(void)
{
    teardown();
    g_rmdir(sock_dir);
    g_clear_pointer(&sock_dir, g_free);
    g_clear_pointer(&sock_path, g_free);
}

static int sock_connect(void)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    ck_assert_int_ge(fd, 0);
    g_strlcpy(sa.sun_path, sock_path, sizeof(sa.sun_path));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return fd;
}

static void sock_send(int fd, const char *text)
{
    ck_assert_int_eq(send(fd, text, strlen(text), MSG_NOSIGNAL),
                     (ssize_t)strlen(text));
}

/* Runs the loop until a whole line has arrived on @fd; returns it
 * without its CRLF.  Reads byte by byte so that nothing after the line
 * is consumed. */
static char *sock_line(int fd)
{
    GString *line = g_string_new(NULL);
    gint64 deadline = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;

    while (g_get_monotonic_time() < deadline) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        char ch;

        if (poll(&p, 1, 0) == 1 && read(fd, &ch, 1) == 1) {
            if (ch == '\n') {
                if (line->len && line->str[line->len - 1] == '\r') {
                    g_string_truncate(line, line->len - 1);
                }
                return g_string_free(line, FALSE);
            }
            g_string_append_c(line, ch);
            continue;
        }
        g_main_context_iteration(NULL, FALSE);
        g_usleep(200);
    }
    ck_abort_msg("no line from the server (got '%s')", line->str);
    return NULL;
}

typedef struct {
    bool ran;
    bool node_seen_inside;
} LoopCallback;

/* Stands for any loop callback that waits for I/O by iterating the loop
 * (a bottom half dropping a backend drains it), and then emits an
 * event, as the NBD server's BLOCK_EXPORT_DELETED is emitted. */
static void nested_bh(void *opaque)
{
    LoopCallback *cb = opaque;
    g_autoptr(JsonObject) data = json_object_new();

    for (int i = 0; i < 50; i++) {
        g_main_context_iteration(NULL, FALSE);
        g_usleep(1000);
    }
    cb->node_seen_inside = strata_context_find_node(ctx, "n1") != NULL;
    json_object_set_string_member(data, "id", "e0");
    strata_monitor_emit_event(mon, "BLOCK_EXPORT_DELETED", data);
    cb->ran = true;
}

/*
 * A command must never run inside a loop callback that iterates the
 * loop: state the callback has half changed would be visible (an
 * export gone from query-block-exports whose BLOCK_EXPORT_DELETED is
 * not sent yet).  The client's command waits until the callback is
 * done, so the event comes first, then the reply.
 */
START_TEST(test_no_command_inside_loop_callback)
{
    LoopCallback cb = { 0 };
    int fd = sock_connect();
    g_autofree char *greeting = sock_line(fd);
    g_autofree char *caps = NULL, *first = NULL, *second = NULL;

    sock_send(fd, "{\"execute\": \"qmp_capabilities\"}");
    caps = sock_line(fd);
    ck_assert_str_eq(caps, "{\"return\": {}}");

    sock_send(fd, "{\"execute\": \"blockdev-add\", \"arguments\": "
                  "{\"driver\": \"null-co\", \"node-name\": \"n1\"}}");
    strata_loop_call_soon(ctx->loop, nested_bh, &cb);
    while (!cb.ran) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert_msg(!cb.node_seen_inside,
                  "a command ran inside a loop callback");
    first = sock_line(fd);
    second = sock_line(fd);
    ck_assert_msg(strstr(first, "\"event\": \"BLOCK_EXPORT_DELETED\"") &&
                  strstr(first, "{\"id\": \"e0\"}"), "%s", first);
    ck_assert_str_eq(second, "{\"return\": {}}");
    ck_assert(strata_context_find_node(ctx, "n1") != NULL);
    close(fd);
}
END_TEST

/*
 * A client that sends commands and hangs up before the first reply can
 * be written: nothing after that reply runs, the monitor forgets the
 * client, and an event still reaches the others.
 */
START_TEST(test_hangup_while_fed)
{
    int quiet = sock_connect();
    int gone = sock_connect();
    g_autofree char *g1 = sock_line(quiet);
    g_autofree char *g2 = sock_line(gone);
    g_autofree char *caps = NULL, *ev = NULL, *alive = NULL;
    g_autoptr(JsonObject) data = json_object_new();

    sock_send(quiet, "{\"execute\": \"qmp_capabilities\"}");
    caps = sock_line(quiet);
    ck_assert_str_eq(caps, "{\"return\": {}}");

    sock_send(gone, "{\"execute\": \"qmp_capabilities\"}"
                    "{\"execute\": \"blockdev-add\", \"arguments\": "
                    "{\"driver\": \"null-co\", \"node-name\": \"late\"}}");
    close(gone);
    for (int i = 0; i < 200 && strata_monitor_client_count(mon) > 1; i++) {
        g_main_context_iteration(NULL, FALSE);
        g_usleep(1000);
    }
    ck_assert_uint_eq(strata_monitor_client_count(mon), 1);
    ck_assert_msg(strata_context_find_node(ctx, "late") == NULL,
                  "a command of a client that hung up ran");

    json_object_set_string_member(data, "id", "e1");
    strata_monitor_emit_event(mon, "BLOCK_EXPORT_DELETED", data);
    ev = sock_line(quiet);
    ck_assert_msg(strstr(ev, "{\"id\": \"e1\"}") != NULL, "%s", ev);
    sock_send(quiet, "{\"execute\": \"query-version\", \"id\": 7}");
    alive = sock_line(quiet);
    ck_assert(g_str_has_suffix(alive, "\"id\": 7}"));
    close(quiet);
}
END_TEST

/* Shutting down: no new client, no command, but events still go out. */
START_TEST(test_quiesce)
{
    int fd = sock_connect();
    g_autofree char *greeting = sock_line(fd);
    g_autofree char *caps = NULL, *ev = NULL;
    g_autoptr(JsonObject) data = json_object_new();
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd2 = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char ch;

    sock_send(fd, "{\"execute\": \"qmp_capabilities\"}");
    caps = sock_line(fd);
    strata_monitor_quiesce(mon);
    ck_assert(strata_monitor_is_quiesced(mon));
    g_strlcpy(sa.sun_path, sock_path, sizeof(sa.sun_path));
    ck_assert_int_ne(connect(fd2, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(fd2);

    sock_send(fd, "{\"execute\": \"blockdev-add\", \"arguments\": "
                  "{\"driver\": \"null-co\", \"node-name\": \"q\"}}");
    for (int i = 0; i < 50; i++) {
        g_main_context_iteration(NULL, FALSE);
        g_usleep(1000);
    }
    ck_assert(strata_context_find_node(ctx, "q") == NULL);
    ck_assert_int_eq(recv(fd, &ch, 1, MSG_DONTWAIT), -1);

    json_object_set_string_member(data, "id", "e2");
    strata_monitor_emit_event(mon, "BLOCK_EXPORT_DELETED", data);
    ev = sock_line(fd);
    ck_assert_msg(strstr(ev, "{\"id\": \"e2\"}") != NULL, "%s", ev);
    close(fd);
}
END_TEST

static void add(Suite *s, const char *name, const TTest *t, bool fixture)
{
    TCase *tc = tcase_create(name);
    if (fixture) {
        tcase_add_checked_fixture(tc, setup, teardown);
    }
    _tcase_add_test(tc, t, 0, 0, 0, 1);
    suite_add_tcase(s, tc);
}

static void add_sock(Suite *s, const char *name, const TTest *t)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, sock_setup, sock_teardown);
    _tcase_add_test(tc, t, 0, 0, 0, 1);
    suite_add_tcase(s, tc);
}

int main(void)
{
    Suite *s = suite_create("monitor");
    SRunner *sr;
    int failed;

    signal(SIGPIPE, SIG_IGN);
    add(s, "/monitor/execute", test_execute, true);
    add(s, "/monitor/events-and-quit", test_events_and_quit, true);
    add_sock(s, "/monitor/socket/no-command-inside-loop-callback",
             test_no_command_inside_loop_callback);
    add_sock(s, "/monitor/socket/hangup-while-fed", test_hangup_while_fed);
    add_sock(s, "/monitor/socket/quiesce", test_quiesce);
    add(s, "/json-stream/bytewise", test_stream_bytewise, false);
    add(s, "/json-stream/writer", test_json_writer, false);
    add(s, "/json-stream/limits", test_stream_limits, false);
    add(s, "/qmp/schema/args", test_schema_args, false);
    add(s, "/qmp/schema/docs", test_docs_match_schema, false);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
