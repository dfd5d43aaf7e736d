/* strata-qmp — send one QMP command to stratad (or any QMP server).
 *
 *   strata-qmp -s qmp.sock query-named-block-nodes flat=true
 *   strata-qmp -s qmp.sock blockdev-add driver=null-co node-name=n0
 *   strata-qmp -s qmp.sock blockdev-add '{"driver": "null-co", ...}'
 *   strata-qmp -s qmp.sock --events
 *   strata-qmp -s qmp.sock --wait --verbose block-stream device=top
 *   strata-qmp -s qmp.sock --wait --pivot block-commit device=top
 *
 * Arguments are key=value with dotted keys for nested members; a value
 * that reads as JSON (42, true, null, [..], {..}) keeps its type, any
 * other value is a string.  The return value is printed as JSON; an
 * error reply prints "Class: description" on stderr and exits 1.
 *
 * With --wait, a command that starts a job is followed to the job's end
 * the way virsh's --wait does it: a progress line on stderr with
 * --verbose, the job completed when READY with --pivot (without it, the
 * client leaves at READY and the job keeps the target in sync), and
 * exit status 1 when the job fails or is cancelled.  Ctrl-C cancels the
 * job being waited for.
 */
#include <poll.h>
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
    bool collect_events;    /* --wait: keep events for the job follower */
    GQueue events;          /* JsonNode *, kept while collect_events */
} Client;

static volatile sig_atomic_t interrupted;

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

/* Returns: (transfer full): the next message from the server, NULL at
 * EOF or when nothing arrives within @timeout_ms (-1: no limit) or a
 * signal interrupts the wait; *@timed_out (optional) tells which. */
static JsonNode *next_message_timeout(Client *c, int timeout_ms,
                                      bool *timed_out)
{
    char buf[65536];

    if (timed_out) {
        *timed_out = false;
    }
    while (g_queue_is_empty(&c->values)) {
        ssize_t n;

        if (timeout_ms >= 0 || timed_out) {
            struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
            int r = poll(&pfd, 1, timeout_ms);
            if (r <= 0 && timed_out && (r == 0 || errno == EINTR)) {
                *timed_out = true;
                return NULL;
            }
            if (r < 0 && errno != EINTR) {
                die("poll: %s", g_strerror(errno));
            }
            if (r <= 0) {
                continue;
            }
        }
        n = read(c->fd, buf, sizeof(buf));
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

static JsonNode *next_message(Client *c)
{
    return next_message_timeout(c, -1, NULL);
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
        if (c->collect_events) {
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

/* --wait: following a job to its end. */

typedef struct {
    const char *type;       /* query-jobs' "type" */
    const char *label;      /* the progress line's, as virsh words it */
    const char *done;       /* printed when the job completes */
} JobKind;

static const JobKind job_kinds[] = {
    { "stream", "Block Pull", "Pull complete" },
    { "commit", "Block Commit", "Commit complete" },
    { "mirror", "Block Copy", "Copy complete" },
    { "backup", "Block Backup", "Backup complete" },
    { "create", "Create", "Create complete" },
    { "snapshot-save", "Snapshot Save", "Snapshot saved" },
    { "snapshot-load", "Snapshot Load", "Snapshot loaded" },
    { "snapshot-delete", "Snapshot Delete", "Snapshot deleted" },
};

typedef struct {
    Client *c;
    const char *id;
    const JobKind *kind;
    bool verbose;
    bool pivot;
    bool block_job;         /* BLOCK_JOB_* events name it */
    bool completing;        /* block-job-complete sent */
    bool cancelling;
    bool at_ready;          /* left the job running in READY */
    int last_percent;
    int status;             /* -1 while running, else the exit status */
    char *error;            /* the job's error text, if it failed */
} Follow;

static void on_interrupt(int sig)
{
    (void)sig;
    interrupted = 1;
}

static const JobKind *job_kind(const char *type)
{
    static JobKind other;

    for (size_t i = 0; i < G_N_ELEMENTS(job_kinds); i++) {
        if (type && !strcmp(job_kinds[i].type, type)) {
            return &job_kinds[i];
        }
    }
    other.type = type ? type : "job";
    other.label = other.type;
    other.done = "Job complete";
    return &other;
}

/* Sends @name with @args and returns the reply; events that arrive
 * meanwhile stay queued for the follower. (transfer full) */
static JsonNode *follow_command(Follow *f, const char *name,
                                JsonObject *args)
{
    send_command(f->c, name, args);
    return wait_reply(f->c);
}

static JsonObject *args_id(const char *key, const char *id)
{
    JsonObject *a = json_object_new();

    json_object_set_string_member(a, key, id);
    return a;
}

/* The job's entry in query-jobs, or NULL once it is gone.
 * (transfer full) */
static JsonObject *query_job(Follow *f)
{
    g_autoptr(JsonNode) r = follow_command(f, "query-jobs", NULL);
    JsonObject *o = JSON_NODE_HOLDS_OBJECT(r) ? json_node_get_object(r)
                                              : NULL;
    JsonArray *jobs;

    if (!o || !json_object_has_member(o, "return")) {
        return NULL;
    }
    jobs = json_object_get_array_member(o, "return");
    for (guint i = 0; jobs && i < json_array_get_length(jobs); i++) {
        JsonObject *j = json_array_get_object_element(jobs, i);
        if (j && !g_strcmp0(json_object_get_string_member_with_default(
                                j, "id", NULL), f->id)) {
            return json_object_ref(j);
        }
    }
    return NULL;
}

static void show_progress(Follow *f, int percent)
{
    if (!f->verbose || percent == f->last_percent) {
        return;
    }
    f->last_percent = percent;
    fprintf(stderr, "\r%s: [%3d %%]", f->kind->label, percent);
    fflush(stderr);
}

static void poll_progress(Follow *f)
{
    g_autoptr(JsonObject) j = query_job(f);
    int64_t cur, total;

    if (!j) {
        return;
    }
    cur = json_object_get_int_member_with_default(j, "current-progress", 0);
    total = json_object_get_int_member_with_default(j, "total-progress", 0);
    /* Never show 100 before the job has ended: it may still have to
     * pivot or finalize. */
    show_progress(f, total > 0 ? (int)MIN(cur * 100 / total, 99) : 0);
}

static void finish(Follow *f, int status, const char *error)
{
    if (f->verbose && f->last_percent >= 0) {
        if (status == 0) {
            f->last_percent = -1;
            show_progress(f, 100);
        }
        fputc('\n', stderr);
    }
    f->status = status;
    if (error) {
        g_free(f->error);
        f->error = g_strdup(error);
    }
}

static void send_verb(Follow *f, const char *block_verb,
                      const char *job_verb)
{
    g_autoptr(JsonObject) a = f->block_job ? args_id("device", f->id)
                                           : args_id("id", f->id);
    g_autoptr(JsonNode) r = follow_command(f, f->block_job ? block_verb
                                                           : job_verb, a);
    JsonObject *o = JSON_NODE_HOLDS_OBJECT(r) ? json_node_get_object(r)
                                              : NULL;

    if (o && json_object_has_member(o, "error")) {
        JsonObject *e = json_object_get_object_member(o, "error");
        finish(f, 1, json_object_get_string_member_with_default(
                         e, "desc", "?"));
    }
}

/* A job that is not a block job ends in "concluded" with its error, if
 * any, in query-jobs; it waits there to be dismissed. */
static void conclude(Follow *f)
{
    g_autoptr(JsonObject) j = query_job(f);
    const char *err = j ? json_object_get_string_member_with_default(
                              j, "error", NULL) : NULL;

    finish(f, err ? 1 : 0, err);
    if (j) {
        g_autoptr(JsonObject) a = args_id("id", f->id);
        g_autoptr(JsonNode) r = follow_command(f, "job-dismiss", a);
    }
}

static void follow_event(Follow *f, JsonNode *n)
{
    JsonObject *ev = json_node_get_object(n);
    const char *name = json_object_get_string_member_with_default(
        ev, "event", "");
    JsonObject *data = json_object_get_object_member(ev, "data");
    const char *dev, *id;

    if (!data) {
        return;
    }
    dev = json_object_get_string_member_with_default(data, "device", NULL);
    id = json_object_get_string_member_with_default(data, "id", NULL);
    if (g_str_has_prefix(name, "BLOCK_JOB_")) {
        if (g_strcmp0(dev, f->id)) {
            return;
        }
        f->block_job = true;
    } else if (!strcmp(name, "JOB_STATUS_CHANGE")) {
        const char *st = json_object_get_string_member_with_default(
            data, "status", "");
        if (g_strcmp0(id, f->id) || f->status >= 0) {
            return;
        }
        if (!strcmp(st, "concluded") && !f->block_job) {
            conclude(f);
        } else if (!strcmp(st, "null")) {
            finish(f, 1, "the job disappeared");
        }
        return;
    } else {
        return;
    }

    if (!strcmp(name, "BLOCK_JOB_COMPLETED")) {
        const char *err = json_object_get_string_member_with_default(
            data, "error", NULL);
        finish(f, err ? 1 : 0, err);
    } else if (!strcmp(name, "BLOCK_JOB_CANCELLED")) {
        finish(f, 1, f->cancelling ? "cancelled by the user"
                                   : "the job was cancelled");
    } else if (!strcmp(name, "BLOCK_JOB_READY") && !f->completing) {
        if (f->pivot) {
            f->completing = true;
            send_verb(f, "block-job-complete", "job-complete");
        } else {
            f->at_ready = true;
            finish(f, 0, NULL);
        }
    } else if (!strcmp(name, "BLOCK_JOB_ERROR")) {
        const char *action = json_object_get_string_member_with_default(
            data, "action", "");
        if (f->verbose) {
            fprintf(stderr, "\n%s: I/O error (%s); action: %s\n",
                    f->kind->label,
                    json_object_get_string_member_with_default(
                        data, "operation", "?"), action);
        }
    }
}

/* The job type that a kept BLOCK_JOB_* event gives for job @id, for a
 * job that was over (and dismissed) before query-jobs could see it. */
static const char *event_type(Client *c, const char *id)
{
    for (GList *l = c->events.head; l; l = l->next) {
        JsonObject *o = json_node_get_object(l->data);
        JsonObject *d = json_object_get_object_member(o, "data");
        if (d && !g_strcmp0(json_object_get_string_member_with_default(
                                d, "device", NULL), id) &&
            json_object_has_member(d, "type")) {
            return json_object_get_string_member(d, "type");
        }
    }
    return NULL;
}

/* Follows job @id to its end; returns the exit status. */
static int follow_job(Client *c, const char *id, bool verbose, bool pivot,
                      bool completing)
{
    Follow f = { .c = c, .id = id, .verbose = verbose, .pivot = pivot,
                 .completing = completing, .last_percent = -1,
                 .status = -1 };
    g_autoptr(JsonObject) j = query_job(&f);
    const char *type = j ? json_object_get_string_member_with_default(
                               j, "type", NULL) : event_type(c, id);

    f.kind = job_kind(type);
    f.block_job = type && (!strcmp(f.kind->type, "stream") ||
                           !strcmp(f.kind->type, "commit") ||
                           !strcmp(f.kind->type, "mirror") ||
                           !strcmp(f.kind->type, "backup"));
    if (!j && g_queue_is_empty(&c->events)) {
        /* Gone before we looked, and no events for it: nothing to say
         * but that it is not there. */
        fprintf(stderr, "strata-qmp: no job '%s' to wait for\n", id);
        return 1;
    }
    while (f.status < 0) {
        JsonNode *n;
        bool idle;

        if (interrupted && !f.cancelling) {
            f.cancelling = true;
            send_verb(&f, "block-job-cancel", "job-cancel");
        }
        n = g_queue_pop_head(&c->events);
        if (!n) {
            n = next_message_timeout(c, verbose ? 250 : 1000, &idle);
            if (!n && !idle) {
                finish(&f, 1, "the server closed the connection");
                break;
            }
            if (!n) {
                if (verbose) {
                    poll_progress(&f);
                }
                continue;
            }
            if (!is_event(n)) {
                json_node_unref(n);     /* a stray reply: not ours */
                continue;
            }
            if (c->print_events) {
                print_json(c, n);
            }
        }
        follow_event(&f, n);
        json_node_unref(n);
        if (f.status < 0 && verbose) {
            poll_progress(&f);
        }
    }
    if (f.status == 0) {
        if (f.completing) {
            printf("Successfully pivoted\n");
        } else if (f.at_ready) {
            printf("%s\n", !g_strcmp0(f.kind->type, "mirror")
                               ? "Now in mirroring phase"
                               : "Now in synchronized phase");
        } else {
            printf("%s\n", f.kind->done);
        }
    }
    fflush(stdout);
    if (f.error) {
        fprintf(stderr, "strata-qmp: job '%s' failed: %s\n", id, f.error);
        g_free(f.error);
    }
    return f.status;
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
    gboolean pretty = FALSE, events = FALSE;
    gboolean wait = FALSE, verbose = FALSE, pivot = FALSE, version = FALSE;
    g_auto(GStrv) rest = NULL;
    GOptionEntry entries[] = {
        { "socket", 's', 0, G_OPTION_ARG_FILENAME, &sock,
          "the QMP socket", "SOCK" },
        { "pretty", 'p', 0, G_OPTION_ARG_NONE, &pretty,
          "pretty-print JSON", NULL },
        { "events", 'e', 0, G_OPTION_ARG_NONE, &events,
          "print events (after the command, until interrupted)", NULL },
        { "wait", 'w', 0, G_OPTION_ARG_NONE, &wait,
          "follow the job the command starts to its end; exit 1 if it "
          "fails or is cancelled", NULL },
        { "verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
          "with --wait: show the job's progress on stderr", NULL },
        { "pivot", 0, 0, G_OPTION_ARG_NONE, &pivot,
          "with --wait: complete the job when it is READY (pivot)", NULL },
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
    const char *job_id = NULL;
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
    if ((verbose || pivot) && !wait) {
        die("--verbose and --pivot go with --wait");
    }
    if (wait && events) {
        die("--wait and --events cannot be combined");
    }
    signal(SIGPIPE, SIG_IGN);
    c.pretty = pretty;
    c.print_events = events;
    c.collect_events = wait;
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

    if (wait) {
        /* Ctrl-C from here on cancels the job rather than leaving it
         * behind unwatched. */
        struct sigaction sa = { .sa_handler = on_interrupt };
        sigaction(SIGINT, &sa, NULL);
        if (!rest || !rest[0]) {
            die("--wait needs a command that starts a job");
        }
        job_id = json_object_get_string_member_with_default(args, "job-id",
                                                            NULL);
        if (!job_id) {
            /* Block jobs are named after their device by default, and
             * the job verbs name theirs by "device" or "id". */
            job_id = json_object_get_string_member_with_default(
                args, "device", NULL);
        }
        if (!job_id) {
            job_id = json_object_get_string_member_with_default(args, "id",
                                                                NULL);
        }
        if (!job_id) {
            die("--wait: '%s' names no job (no job-id or device)", rest[0]);
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
            status = follow_job(&c, job_id, verbose, pivot,
                                !strcmp(rest[0], "block-job-complete") ||
                                !strcmp(rest[0], "job-complete"));
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
