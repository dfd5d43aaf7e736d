/* strata-qmp — send one QMP command to stratad (or any QMP server).
 *
 *   strata-qmp -s qmp.sock query-named-block-nodes flat=true
 *   strata-qmp -s qmp.sock blockdev-add driver=null-co node-name=n0
 *   strata-qmp -s qmp.sock blockdev-add '{"driver": "null-co", ...}'
 *   strata-qmp -s qmp.sock --events
 *   strata-qmp -s qmp.sock --wait block-stream job-id=j0 device=top
 *
 * Arguments are key=value with dotted keys for nested members; a value
 * that reads as JSON (42, true, null, [..], {..}) keeps its type, any
 * other value is a string.  The return value is printed as JSON; an
 * error reply prints "Class: description" on stderr and exits 1.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-util.h"
#include "json-stream-private.h"

typedef struct {
    int fd;
    StrataJsonStream *js;
    GQueue values;          /* JsonNode *, parsed from the server */
    bool pretty;
    bool print_events;
    /* --wait: events are kept here from the command's sending on, since
     * a job may report before its command's reply arrives. */
    bool keep_events;
    GQueue events;          /* JsonNode * */
} Client;

static G_GNUC_NORETURN void die(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

static void die(const char *fmt, ...)
{
    va_list ap;

    fputs("strata-qmp: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static void on_value(JsonNode *value, GError *error, void *opaque)
{
    Client *c = opaque;

    if (error) {
        die("bad input from the server: %s", error->message);
    }
    g_queue_push_tail(&c->values, value);
}

static void print_json(Client *c, JsonNode *n)
{
    g_autofree char *s = c->pretty ? strata_json_to_pretty_string(n)
                                   : strata_json_to_string(n);
    printf("%s\n", s);
    fflush(stdout);
}

/* Returns: (transfer full): the next message from the server. */
static JsonNode *next_message(Client *c)
{
    char buf[65536];

    while (g_queue_is_empty(&c->values)) {
        ssize_t n = read(c->fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            die("read: %s", g_strerror(errno));
        }
        if (n == 0) {
            return NULL;
        }
        strata_json_stream_feed(c->js, buf, (size_t)n);
    }
    return g_queue_pop_head(&c->values);
}

static bool is_event(JsonNode *n)
{
    return JSON_NODE_HOLDS_OBJECT(n) &&
           json_object_has_member(json_node_get_object(n), "event");
}

/* Returns: (transfer full): the reply to the last command; events that
 * arrive meanwhile are printed when asked for. */
static JsonNode *wait_reply(Client *c)
{
    for (;;) {
        JsonNode *n = next_message(c);
        if (!n) {
            die("the server closed the connection");
        }
        if (!is_event(n)) {
            return n;
        }
        if (c->print_events) {
            print_json(c, n);
        }
        if (c->keep_events) {
            g_queue_push_tail(&c->events, n);
        } else {
            json_node_unref(n);
        }
    }
}

static void send_command(Client *c, const char *name, JsonObject *args)
{
    g_autoptr(JsonObject) cmd = json_object_new();
    g_autoptr(JsonNode) n = json_node_alloc();
    g_autofree char *json = NULL;
    g_autofree char *text = NULL;
    size_t off = 0, len;

    json_object_set_string_member(cmd, "execute", name);
    if (args) {
        json_object_set_object_member(cmd, "arguments",
                                      json_object_ref(args));
    }
    json_node_init_object(n, cmd);
    json = strata_json_to_string(n);
    text = g_strconcat(json, "\n", NULL);
    len = strlen(text);
    while (off < len) {
        ssize_t w = write(c->fd, text + off, len - off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w < 0) {
            die("write: %s", g_strerror(errno));
        }
        off += (size_t)w;
    }
}

/* Prints the reply; returns the exit status it means. */
static int report(Client *c, JsonNode *reply, bool quiet)
{
    JsonObject *o = JSON_NODE_HOLDS_OBJECT(reply)
        ? json_node_get_object(reply) : NULL;

    if (o && json_object_has_member(o, "error")) {
        JsonObject *e = json_object_get_object_member(o, "error");
        fprintf(stderr, "%s: %s\n",
                json_object_get_string_member_with_default(e, "class", "?"),
                json_object_get_string_member_with_default(e, "desc", "?"));
        return 1;
    }
    if (o && json_object_has_member(o, "return")) {
        if (!quiet) {
            print_json(c, json_object_get_member(o, "return"));
        }
        return 0;
    }
    die("unexpected reply from the server");
}

/* The id of the job the command starts or acts on, for --wait. */
static const char *job_of(JsonObject *args)
{
    static const char *const keys[] = { "job-id", "device", "id" };

    for (guint i = 0; args && i < G_N_ELEMENTS(keys); i++) {
        JsonNode *m = json_object_get_member(args, keys[i]);
        if (m && JSON_NODE_HOLDS_VALUE(m) &&
            json_node_get_value_type(m) == G_TYPE_STRING) {
            return json_node_get_string(m);
        }
    }
    return NULL;
}

/* The job an event is about ("" if none); its name in *@name. */
static const char *event_job(JsonNode *ev, const char **name)
{
    JsonObject *o = json_node_get_object(ev);
    JsonObject *data = json_object_get_object_member(o, "data");

    *name = json_object_get_string_member_with_default(o, "event", "");
    if (!data) {
        return "";
    }
    return json_object_get_string_member_with_default(
        data, json_object_has_member(data, "device") ? "device" : "id", "");
}

/* Whether @ev (an event about the awaited job, named @name) ends the
 * wait; sets *@failed on a job error.  A job that becomes ready ends it,
 * unless the command was one that moves a ready job on (complete, cancel,
 * finalize): that one waits for the end. */
static bool ends_wait(JsonNode *ev, const char *name, bool past_ready,
                      bool *failed)
{
    JsonObject *data = json_object_get_object_member(
        json_node_get_object(ev), "data");

    if (!strcmp(name, "BLOCK_JOB_COMPLETED")) {
        if (json_object_has_member(data, "error")) {
            fprintf(stderr, "job '%s' failed: %s\n",
                    json_object_get_string_member_with_default(data, "device",
                                                               "?"),
                    json_object_get_string_member_with_default(data, "error",
                                                               "?"));
            *failed = true;
        }
        return true;
    }
    if (!strcmp(name, "BLOCK_JOB_CANCELLED") ||
        !strcmp(name, "BLOCK_JOB_PENDING")) {
        return true;
    }
    if (!strcmp(name, "BLOCK_JOB_READY")) {
        return !past_ready;
    }
    if (!strcmp(name, "JOB_STATUS_CHANGE")) {
        const char *st = json_object_get_string_member_with_default(
            data, "status", "");
        return !strcmp(st, "concluded") || !strcmp(st, "null");
    }
    return false;
}

/* Waits until job @id is ready, pending or over; prints its BLOCK_JOB_*
 * events (unless --events printed them already).  Returns the exit
 * status: 1 when the job failed. */
static int wait_job(Client *c, const char *command, const char *id)
{
    bool past_ready = !strcmp(command, "block-job-complete") ||
                      !strcmp(command, "job-complete") ||
                      !strcmp(command, "block-job-cancel") ||
                      !strcmp(command, "job-cancel") ||
                      !strcmp(command, "block-job-finalize") ||
                      !strcmp(command, "job-finalize");
    bool failed = false;

    for (;;) {
        JsonNode *ev = g_queue_pop_head(&c->events);
        const char *name, *who;
        bool done = false;

        if (!ev) {
            ev = next_message(c);
            if (!ev) {
                die("the server closed the connection before job '%s' "
                    "ended", id);
            }
            if (!is_event(ev)) {
                json_node_unref(ev);
                continue;
            }
            if (c->print_events) {
                print_json(c, ev);
            }
        }
        who = event_job(ev, &name);
        if (!strcmp(who, id)) {
            done = ends_wait(ev, name, past_ready, &failed);
            /* The job's own reports; JOB_STATUS_CHANGE is bookkeeping. */
            if (!c->print_events && g_str_has_prefix(name, "BLOCK_JOB_")) {
                print_json(c, ev);
            }
        }
        json_node_unref(ev);
        if (done) {
            return failed ? 1 : 0;
        }
    }
}

/* key=value with dotted keys into @args. */
static void add_keyval(JsonObject *args, const char *arg)
{
    const char *eq = strchr(arg, '=');
    g_autofree char *key = NULL;
    g_auto(GStrv) parts = NULL;
    JsonObject *obj = args;
    JsonNode *value;

    if (!eq || eq == arg) {
        die("argument '%s' is not key=value", arg);
    }
    key = g_strndup(arg, eq - arg);
    value = strata_json_parse_text(eq + 1, NULL);
    if (!value) {
        value = json_node_init_string(json_node_alloc(), eq + 1);
    }
    parts = g_strsplit(key, ".", -1);
    for (guint i = 0; parts[i + 1]; i++) {
        JsonNode *m = json_object_get_member(obj, parts[i]);
        if (!m) {
            JsonObject *sub = json_object_new();
            json_object_set_object_member(obj, parts[i], sub);
            obj = sub;
        } else if (JSON_NODE_HOLDS_OBJECT(m)) {
            obj = json_node_get_object(m);
        } else {
            die("argument '%s' conflicts with an earlier one", arg);
        }
    }
    json_object_set_member(obj, parts[g_strv_length(parts) - 1], value);
}

static int connect_to(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        die("socket path too long: %s", path);
    }
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        die("cannot connect to '%s': %s", path, g_strerror(errno));
    }
    return fd;
}

int main(int argc, char **argv)
{
    g_autofree char *sock = NULL;
    gboolean pretty = FALSE, events = FALSE, wait = FALSE, version = FALSE;
    g_auto(GStrv) rest = NULL;
    GOptionEntry entries[] = {
        { "socket", 's', 0, G_OPTION_ARG_FILENAME, &sock,
          "the QMP socket", "SOCK" },
        { "pretty", 'p', 0, G_OPTION_ARG_NONE, &pretty,
          "pretty-print JSON", NULL },
        { "events", 'e', 0, G_OPTION_ARG_NONE, &events,
          "print events (after the command, until interrupted)", NULL },
        { "wait", 'w', 0, G_OPTION_ARG_NONE, &wait,
          "wait until the job the command names (job-id, device or id) "
          "is ready, pending or over; print its events", NULL },
        { "version", 'V', 0, G_OPTION_ARG_NONE, &version,
          "print the version", NULL },
        { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_STRING_ARRAY, &rest,
          NULL, "COMMAND [key=value...|JSON]" },
        { NULL },
    };
    g_autoptr(GOptionContext) oc =
        g_option_context_new("- send a QMP command");
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) args = NULL;
    Client c = { 0 };
    JsonNode *n;
    int status = 0;

    g_option_context_add_main_entries(oc, entries, NULL);
    if (!g_option_context_parse(oc, &argc, &argv, &err)) {
        die("%s", err->message);
    }
    if (version) {
        printf("strata-qmp %s\n", STRATA_VERSION);
        return 0;
    }
    if (!sock) {
        die("-s SOCK is required");
    }
    if ((!rest || !rest[0]) && !events) {
        die("no command given");
    }
    if (wait && (!rest || !rest[0])) {
        die("--wait needs a command");
    }
    signal(SIGPIPE, SIG_IGN);
    c.pretty = pretty;
    c.print_events = events;
    c.keep_events = wait;
    g_queue_init(&c.values);
    g_queue_init(&c.events);
    c.js = strata_json_stream_new(on_value, &c);

    if (rest && rest[0]) {
        args = json_object_new();
        for (guint i = 1; rest[i]; i++) {
            if (rest[i][0] == '{') {
                g_autoptr(JsonNode) v = strata_json_parse_text(rest[i],
                                                               &err);
                if (!v || !JSON_NODE_HOLDS_OBJECT(v)) {
                    die("'%s' is not a JSON object%s%s", rest[i],
                        err ? ": " : "", err ? err->message : "");
                }
                JsonObjectIter it;
                const char *k;
                JsonNode *m;
                json_object_iter_init_ordered(&it, json_node_get_object(v));
                while (json_object_iter_next_ordered(&it, &k, &m)) {
                    json_object_set_member(args, k, json_node_copy(m));
                }
            } else {
                add_keyval(args, rest[i]);
            }
        }
    }

    c.fd = connect_to(sock);
    n = next_message(&c);
    if (!n || !JSON_NODE_HOLDS_OBJECT(n) ||
        !json_object_has_member(json_node_get_object(n), "QMP")) {
        die("no QMP greeting from '%s'", sock);
    }
    json_node_unref(n);
    send_command(&c, "qmp_capabilities", NULL);
    n = wait_reply(&c);
    status = report(&c, n, true);
    json_node_unref(n);
    if (status) {
        return status;
    }
    if (rest && rest[0]) {
        send_command(&c, rest[0],
                     json_object_get_size(args) ? args : NULL);
        n = wait_reply(&c);
        status = report(&c, n, false);
        json_node_unref(n);
        if (wait && status == 0) {
            const char *id = job_of(args);
            if (!id) {
                die("--wait: '%s' names no job (job-id, device or id)",
                    rest[0]);
            }
            status = wait_job(&c, rest[0], id);
        }
    }
    if (events) {
        while ((n = next_message(&c))) {
            if (is_event(n)) {
                print_json(&c, n);
            }
            json_node_unref(n);
        }
    }
    close(c.fd);
    g_queue_clear_full(&c.events, (GDestroyNotify)json_node_unref);
    strata_json_stream_free(c.js);
    return status;
}
