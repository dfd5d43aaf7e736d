/* libqtest — start stratad on a scratch socket and speak QMP to it. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "libqtest.h"
#include "json-stream-private.h"

struct QTestState {
    GPid pid;
    bool exited;
    char *dir;
    char *sock;
    int fd;
    bool eof;
    StrataJsonStream *js;
    GQueue msgs;
    JsonNode *greeting;
};

static void on_value(JsonNode *value, GError *error, void *opaque)
{
    QTestState *s = opaque;

    if (error) {
        fprintf(stderr, "libqtest: bad JSON from stratad: %s\n",
                error->message);
        g_error_free(error);
        return;
    }
    g_queue_push_tail(&s->msgs, value);
}

static int connect_path(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    g_assert(fd >= 0);
    g_strlcpy(sa.sun_path, path, sizeof(sa.sun_path));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int qtest_connect(QTestState *s)
{
    return connect_path(s->sock);
}

static bool read_some(QTestState *s, int timeout_ms)
{
    struct pollfd p = { .fd = s->fd, .events = POLLIN };
    char buf[65536];
    ssize_t n;

    if (s->eof || poll(&p, 1, timeout_ms) <= 0) {
        return false;
    }
    n = read(s->fd, buf, sizeof(buf));
    if (n <= 0) {
        s->eof = true;
        return false;
    }
    strata_json_stream_feed(s->js, buf, (size_t)n);
    return true;
}

static JsonNode *next_any(QTestState *s, int timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + timeout_ms * 1000LL;

    while (g_queue_is_empty(&s->msgs)) {
        gint64 left = (deadline - g_get_monotonic_time()) / 1000;
        if (left <= 0 || !read_some(s, (int)left)) {
            if (s->eof || g_get_monotonic_time() >= deadline) {
                return NULL;
            }
        }
    }
    return g_queue_pop_head(&s->msgs);
}

static bool is_event(JsonNode *n)
{
    return JSON_NODE_HOLDS_OBJECT(n) &&
           json_object_has_member(json_node_get_object(n), "event");
}

JsonNode *qtest_receive(QTestState *s, int timeout_ms)
{
    /* Events stay queued for qtest_wait_event: look past them. */
    gint64 deadline = g_get_monotonic_time() + timeout_ms * 1000LL;

    for (;;) {
        for (GList *l = s->msgs.head; l; l = l->next) {
            if (!is_event(l->data)) {
                JsonNode *n = l->data;
                g_queue_delete_link(&s->msgs, l);
                return n;
            }
        }
        gint64 left = (deadline - g_get_monotonic_time()) / 1000;
        if (left <= 0 || (!read_some(s, (int)left) && s->eof)) {
            return NULL;
        }
    }
}

JsonNode *qtest_wait_event(QTestState *s, const char *name, int timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + timeout_ms * 1000LL;

    for (;;) {
        for (GList *l = s->msgs.head; l; l = l->next) {
            JsonNode *n = l->data;
            if (is_event(n) &&
                !g_strcmp0(json_object_get_string_member(
                               json_node_get_object(n), "event"), name)) {
                g_queue_delete_link(&s->msgs, l);
                return n;
            }
        }
        gint64 left = (deadline - g_get_monotonic_time()) / 1000;
        if (left <= 0 || (!read_some(s, (int)left) && s->eof)) {
            return NULL;
        }
    }
}

void qtest_send_raw(QTestState *s, const char *text, size_t len)
{
    size_t off = 0;

    while (off < len) {
        ssize_t n = send(s->fd, text + off, len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        off += (size_t)n;
    }
}

JsonNode *qtest_qmp(QTestState *s, const char *text)
{
    qtest_send_raw(s, text, strlen(text));
    return qtest_receive(s, 10000);
}

bool qtest_eof(QTestState *s)
{
    while (read_some(s, 200)) {
    }
    return s->eof;
}

QTestState *qtest_start(const char *extra_args, bool negotiate)
{
    QTestState *s = g_new0(QTestState, 1);
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GError) err = NULL;

    s->dir = g_dir_make_tmp("strata-qtest-XXXXXX", NULL);
    g_assert(s->dir);
    s->sock = g_build_filename(s->dir, "qmp.sock", NULL);
    g_ptr_array_add(argv, g_strdup(STRATAD_PATH));
    g_ptr_array_add(argv, g_strdup("--qmp"));
    g_ptr_array_add(argv, g_strdup(s->sock));
    if (extra_args) {
        g_auto(GStrv) extra = g_strsplit(extra_args, " ", -1);
        for (guint i = 0; extra[i]; i++) {
            if (*extra[i]) {
                g_ptr_array_add(argv, g_strdup(extra[i]));
            }
        }
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_async(s->dir, (char **)argv->pdata, NULL,
                       G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &s->pid,
                       &err)) {
        g_error("cannot start stratad: %s", err->message);
    }
    s->js = strata_json_stream_new(on_value, s);
    g_queue_init(&s->msgs);
    for (int i = 0; i < 1000; i++) {
        s->fd = connect_path(s->sock);
        if (s->fd >= 0) {
            break;
        }
        g_usleep(10000);
    }
    g_assert(s->fd >= 0);
    s->greeting = next_any(s, 10000);
    g_assert(s->greeting);
    if (negotiate) {
        g_autoptr(JsonNode) r = qtest_qmp(s,
                                          "{\"execute\": \"qmp_capabilities\"}");
        g_assert(r && qtest_is_return(r));
    }
    return s;
}

int qtest_wait_exit(QTestState *s, int timeout_ms)
{
    int status;

    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        pid_t r = waitpid(s->pid, &status, WNOHANG);
        if (r == s->pid) {
            s->exited = true;
            return WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128 + WTERMSIG(status);
        }
        g_usleep(10000);
    }
    return -1;
}

int qtest_terminate(QTestState *s)
{
    kill(s->pid, SIGTERM);
    return qtest_wait_exit(s, 10000);
}

static void rm_rf(const char *dir)
{
    GDir *d = g_dir_open(dir, 0, NULL);
    const char *n;

    while (d && (n = g_dir_read_name(d))) {
        g_autofree char *p = g_build_filename(dir, n, NULL);
        if (g_file_test(p, G_FILE_TEST_IS_DIR) &&
            !g_file_test(p, G_FILE_TEST_IS_SYMLINK)) {
            rm_rf(p);
        } else {
            unlink(p);
        }
    }
    if (d) {
        g_dir_close(d);
    }
    rmdir(dir);
}

void qtest_end(QTestState *s)
{
    if (!s) {
        return;
    }
    if (!s->exited) {
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
    }
    g_spawn_close_pid(s->pid);
    if (s->fd >= 0) {
        close(s->fd);
    }
    while (!g_queue_is_empty(&s->msgs)) {
        json_node_unref(g_queue_pop_head(&s->msgs));
    }
    if (s->greeting) {
        json_node_unref(s->greeting);
    }
    strata_json_stream_free(s->js);
    rm_rf(s->dir);
    g_free(s->dir);
    g_free(s->sock);
    g_free(s);
}

const char *qtest_dir(QTestState *s)
{
    return s->dir;
}

const char *qtest_socket(QTestState *s)
{
    return s->sock;
}

int qtest_pid(QTestState *s)
{
    return s->pid;
}

JsonNode *qtest_greeting(QTestState *s)
{
    return s->greeting;
}

static JsonObject *error_obj(JsonNode *reply)
{
    if (!reply || !JSON_NODE_HOLDS_OBJECT(reply)) {
        return NULL;
    }
    JsonNode *e = json_object_get_member(json_node_get_object(reply),
                                         "error");
    return e && JSON_NODE_HOLDS_OBJECT(e) ? json_node_get_object(e) : NULL;
}

const char *qtest_error_class(JsonNode *reply)
{
    JsonObject *e = error_obj(reply);
    return e ? json_object_get_string_member(e, "class") : NULL;
}

const char *qtest_error_desc(JsonNode *reply)
{
    JsonObject *e = error_obj(reply);
    return e ? json_object_get_string_member(e, "desc") : NULL;
}

bool qtest_is_return(JsonNode *reply)
{
    return reply && JSON_NODE_HOLDS_OBJECT(reply) &&
           json_object_has_member(json_node_get_object(reply), "return");
}

char *qtest_to_string(JsonNode *node)
{
    return strata_json_to_string(node);
}

long qtest_rss_kib(QTestState *s)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/status", (int)s->pid);
    g_autofree char *text = NULL;
    const char *p;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return -1;
    }
    p = strstr(text, "VmRSS:");
    return p ? strtol(p + 6, NULL, 10) : -1;
}
