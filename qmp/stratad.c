/* stratad — the strata daemon: QMP on UNIX sockets, block nodes from the
 * command line, in the forms qemu-storage-daemon accepts.
 *
 *   stratad --qmp qmp.sock
 *   stratad --blockdev driver=file,node-name=f,filename=disk.img \
 *           --nbd-server addr.type=unix,addr.path=nbd.sock \
 *           --export type=nbd,id=e0,node-name=f,writable=on \
 *           --chardev socket,path=qmp.sock,server=on,wait=off,id=char0 \
 *           --monitor chardev=char0 --pidfile d.pid --daemonize
 *
 * --blockdev, --nbd-server and --export act in command-line order, as
 * qemu-storage-daemon's do (an export names a node given before it).
 *
 * On SIGTERM, SIGINT or "quit" the daemon stops accepting QMP clients
 * and reading their commands, deletes the exports (their
 * BLOCK_EXPORT_DELETED still reaches the clients), flushes every node,
 * closes the images, and only then removes its sockets and exits 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib.h>
#include <glib-unix.h>

#include "strata.h"
#include "qmp-private.h"
#include "../block/block-private.h"
#include "../block/export-private.h"
#include "../util/keyval-private.h"

typedef struct {
    char *id;
    char *path;
} Chardev;

typedef enum {
    ACT_BLOCKDEV,
    ACT_NBD_SERVER,
    ACT_EXPORT,
} ActionKind;

typedef struct {
    ActionKind kind;
    char *spec;
} Action;

static void action_free(void *p)
{
    Action *a = p;

    g_free(a->spec);
    g_free(a);
}

typedef struct {
    GPtrArray *actions;     /* Action *, in command-line order */
    GPtrArray *sockets;     /* char *: paths to serve QMP on */
    GPtrArray *chardevs;    /* Chardev * */
    GPtrArray *monitors;    /* char *: chardev ids */
    char *pidfile;
    gint64 poll_max_ns;
    bool daemonize;
    bool verbose;
} Options;

static G_GNUC_NORETURN void die(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

static void die(const char *fmt, ...)
{
    va_list ap;

    fputs("stratad: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* How long the loop polls before it sleeps (see
 * strata_loop_set_poll_max_ns); as QEMU's IOThreads by default. */
#define STRATAD_POLL_MAX_NS 100000
#define STRATAD_POLL_LIMIT_NS 1000000

static void usage(void)
{
    printf("Usage: stratad [options]\n"
           "\n"
           "  --qmp PATH               serve QMP on the UNIX socket PATH\n"
           "  --blockdev OPTIONS       add a block node (key=value or JSON)\n"
           "  --nbd-server addr.type=unix,addr.path=PATH[,max-connections=N]\n"
           "  --nbd-server addr.type=inet,addr.host=HOST,addr.port=PORT\n"
           "                           start the NBD server\n"
           "  --export type=nbd,id=ID,node-name=NODE[,name=NAME]"
           "[,writable=on]\n"
           "           [,description=TEXT][,writethrough=on]\n"
           "                           export a node over NBD\n"
           "  --chardev socket,path=PATH,server=on,wait=off,id=ID\n"
           "  --monitor chardev=ID     serve QMP on that chardev\n"
           "  --pidfile PATH           write the process id to PATH\n"
           "  --poll-max-ns NS         poll up to NS ns before sleeping "
           "(default %d; 0: off)\n"
           "  --daemonize              run in the background once ready\n"
           "  -v, --trace PATTERN      log debug messages to stderr\n"
           "  -V, --version            print the version\n"
           "  -h, --help               print this help\n",
           STRATAD_POLL_MAX_NS);
}

static bool is_on(const char *v)
{
    return !strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true");
}

static bool is_off(const char *v)
{
    return !strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false");
}

static void parse_chardev(Options *o, const char *spec)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) obj = strata_keyval_parse(spec, "backend", &err);
    JsonObjectIter it;
    const char *key;
    JsonNode *val;
    Chardev *c;

    if (!obj) {
        die("--chardev: %s", err->message);
    }
    c = g_new0(Chardev, 1);
    json_object_iter_init_ordered(&it, obj);
    while (json_object_iter_next_ordered(&it, &key, &val)) {
        const char *v = JSON_NODE_HOLDS_VALUE(val)
            ? json_node_get_string(val) : NULL;
        if (!v) {
            die("--chardev: invalid value for '%s'", key);
        }
        if (!strcmp(key, "backend")) {
            if (strcmp(v, "socket") != 0) {
                die("--chardev: backend '%s' is not supported (only "
                    "'socket')", v);
            }
        } else if (!strcmp(key, "id")) {
            c->id = g_strdup(v);
        } else if (!strcmp(key, "path")) {
            c->path = g_strdup(v);
        } else if (!strcmp(key, "server")) {
            if (!is_on(v)) {
                die("--chardev: only server=on is supported");
            }
        } else if (!strcmp(key, "wait")) {
            if (!is_off(v)) {
                die("--chardev: only wait=off is supported");
            }
        } else {
            die("--chardev: parameter '%s' is unexpected", key);
        }
    }
    if (!c->id) {
        die("--chardev: parameter 'id' is missing");
    }
    if (!c->path) {
        die("--chardev: parameter 'path' is missing");
    }
    g_ptr_array_add(o->chardevs, c);
}

static void parse_monitor(Options *o, const char *spec)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) obj = strata_keyval_parse(spec, "chardev", &err);
    JsonObjectIter it;
    const char *key;
    JsonNode *val;
    const char *chardev = NULL;

    if (!obj) {
        die("--monitor: %s", err->message);
    }
    json_object_iter_init_ordered(&it, obj);
    while (json_object_iter_next_ordered(&it, &key, &val)) {
        const char *v = JSON_NODE_HOLDS_VALUE(val)
            ? json_node_get_string(val) : NULL;
        if (!v) {
            die("--monitor: invalid value for '%s'", key);
        }
        if (!strcmp(key, "chardev")) {
            chardev = v;
        } else if (!strcmp(key, "mode")) {
            if (strcmp(v, "control") != 0) {
                die("--monitor: only mode=control is supported");
            }
        } else if (!strcmp(key, "pretty")) {
            /* Accepted for compatibility; replies are one per line. */
        } else {
            die("--monitor: parameter '%s' is unexpected", key);
        }
    }
    if (!chardev) {
        die("--monitor: parameter 'chardev' is missing");
    }
    g_ptr_array_add(o->monitors, g_strdup(chardev));
}

static void parse_args(Options *o, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        g_autofree char *name = NULL;
        const char *value = NULL;
        const char *eq;

        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            usage();
            exit(0);
        }
        if (!strcmp(arg, "-V") || !strcmp(arg, "--version")) {
            printf("stratad %s (QMP of QEMU %d.%d)\n", STRATA_VERSION, 7, 2);
            exit(0);
        }
        if (!strcmp(arg, "-v")) {
            o->verbose = true;
            continue;
        }
        if (!strcmp(arg, "--daemonize")) {
            o->daemonize = true;
            continue;
        }
        if (strncmp(arg, "--", 2) != 0) {
            die("unexpected argument '%s'", arg);
        }
        eq = strchr(arg, '=');
        if (eq) {
            name = g_strndup(arg, eq - arg);
            value = eq + 1;
        } else {
            name = g_strdup(arg);
        }
        if (strcmp(name, "--qmp") && strcmp(name, "--blockdev") &&
            strcmp(name, "--nbd-server") && strcmp(name, "--export") &&
            strcmp(name, "--chardev") && strcmp(name, "--monitor") &&
            strcmp(name, "--pidfile") && strcmp(name, "--trace") &&
            strcmp(name, "--poll-max-ns")) {
            die("unknown option '%s'", name);
        }
        if (!value) {
            if (i + 1 >= argc) {
                die("option '%s' needs an argument", name);
            }
            value = argv[++i];
        }
        if (!strcmp(name, "--qmp")) {
            g_ptr_array_add(o->sockets, g_strdup(value));
        } else if (!strcmp(name, "--blockdev") ||
                   !strcmp(name, "--nbd-server") ||
                   !strcmp(name, "--export")) {
            Action *a = g_new0(Action, 1);
            a->kind = !strcmp(name, "--blockdev") ? ACT_BLOCKDEV
                      : !strcmp(name, "--export") ? ACT_EXPORT
                                                  : ACT_NBD_SERVER;
            a->spec = g_strdup(value);
            g_ptr_array_add(o->actions, a);
        } else if (!strcmp(name, "--chardev")) {
            parse_chardev(o, value);
        } else if (!strcmp(name, "--monitor")) {
            parse_monitor(o, value);
        } else if (!strcmp(name, "--pidfile")) {
            g_free(o->pidfile);
            o->pidfile = g_strdup(value);
        } else if (!strcmp(name, "--poll-max-ns")) {
            guint64 ns;

            if (!g_ascii_string_to_unsigned(value, 10, 0, STRATAD_POLL_LIMIT_NS,
                                            &ns, NULL)) {
                die("--poll-max-ns: '%s' is not a number of nanoseconds "
                    "from 0 to %d", value, STRATAD_POLL_LIMIT_NS);
            }
            o->poll_max_ns = ns;
        } else {
            o->verbose = true;
        }
    }
    /* Monitors name chardevs: resolve them to socket paths now. */
    for (guint i = 0; i < o->monitors->len; i++) {
        const char *id = o->monitors->pdata[i];
        Chardev *found = NULL;
        for (guint j = 0; j < o->chardevs->len && !found; j++) {
            Chardev *c = o->chardevs->pdata[j];
            if (!strcmp(c->id, id)) {
                found = c;
            }
        }
        if (!found) {
            die("--monitor: chardev '%s' not found", id);
        }
        g_ptr_array_add(o->sockets, g_strdup(found->path));
    }
}

/* A keyval value as a JSON boolean, or NULL when it is none. */
static JsonNode *bool_value(JsonNode *v)
{
    if (JSON_NODE_HOLDS_VALUE(v) &&
        json_node_get_value_type(v) == G_TYPE_BOOLEAN) {
        return json_node_copy(v);
    }
    if (JSON_NODE_HOLDS_VALUE(v) &&
        json_node_get_value_type(v) == G_TYPE_STRING) {
        const char *s = json_node_get_string(v);
        if (is_on(s) || is_off(s)) {
            return json_node_init_boolean(json_node_alloc(), is_on(s));
        }
    }
    return NULL;
}

static const char *string_value(JsonNode *v)
{
    return JSON_NODE_HOLDS_VALUE(v) &&
           json_node_get_value_type(v) == G_TYPE_STRING
        ? json_node_get_string(v) : NULL;
}

/*
 * --nbd-server takes qemu-storage-daemon's NbdServerOptions:
 * addr.type=unix,addr.path=… or addr.type=inet,addr.host=…,addr.port=…
 * (a SocketAddress, flat), max-connections, tls-creds, tls-authz.  It is
 * turned into nbd-server-start's legacy form.
 */
static bool start_nbd_server(StrataContext *ctx, const char *spec,
                             GError **error)
{
    g_autoptr(JsonObject) obj = strata_keyval_parse(spec, NULL, error);
    g_autoptr(JsonObject) legacy = json_object_new();
    JsonObject *addr = NULL, *data = json_object_new();
    JsonObjectIter it;
    const char *key, *type = NULL;
    JsonNode *val;
    int64_t max_conn = 0;

    json_object_set_object_member(legacy, "data", data);
    if (!obj) {
        return false;
    }
    json_object_iter_init_ordered(&it, obj);
    while (json_object_iter_next_ordered(&it, &key, &val)) {
        if (!strcmp(key, "addr") && JSON_NODE_HOLDS_OBJECT(val)) {
            addr = json_node_get_object(val);
        } else if (!strcmp(key, "max-connections")) {
            const char *s = string_value(val);
            guint64 n;
            if (JSON_NODE_HOLDS_VALUE(val) &&
                json_node_get_value_type(val) == G_TYPE_INT64) {
                max_conn = json_node_get_int(val);
            } else if (s && g_ascii_string_to_unsigned(s, 10, 0, UINT32_MAX,
                                                       &n, NULL)) {
                max_conn = (int64_t)n;
            } else {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter 'max-connections' expects uint32_t");
                return false;
            }
        } else if (!strcmp(key, "tls-creds") || !strcmp(key, "tls-authz")) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                        "Parameter '%s': TLS is not supported by this NBD "
                        "server", key);
            return false;
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter '%s' is unexpected", key);
            return false;
        }
    }
    if (!addr) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'addr' is missing");
        return false;
    }
    json_object_iter_init_ordered(&it, addr);
    while (json_object_iter_next_ordered(&it, &key, &val)) {
        g_autoptr(JsonNode) b = NULL;
        if (!strcmp(key, "type") && string_value(val)) {
            type = string_value(val);
        } else if ((!strcmp(key, "path") || !strcmp(key, "host") ||
                    !strcmp(key, "port")) && string_value(val)) {
            json_object_set_string_member(data, key, string_value(val));
        } else if ((!strcmp(key, "abstract") || !strcmp(key, "tight")) &&
                   (b = bool_value(val))) {
            json_object_set_member(data, key, g_steal_pointer(&b));
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'addr.%s' is unexpected", key);
            return false;
        }
    }
    if (!type) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'addr.type' is missing");
        return false;
    }
    if (strcmp(type, "unix") != 0 && strcmp(type, "inet") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Parameter 'addr.type': '%s' is not supported (unix or "
                    "inet)", type);
        return false;
    }
    json_object_set_string_member(legacy, "type", type);
    return strata_nbd_server_start_legacy(ctx, legacy, max_conn, error);
}

typedef struct {
    GMainLoop *loop;
    int status;
} Daemon;

static gboolean on_signal(void *opaque)
{
    Daemon *d = opaque;

    g_main_loop_quit(d->loop);
    return G_SOURCE_CONTINUE;
}

static void flush_all_co(void *opaque)
{
    StrataContext *ctx = opaque;

    /* Parents first (newest first), so that a format's metadata reaches
     * its file before the file is flushed. */
    for (GList *l = ctx->all_nodes; l; l = l->next) {
        StrataNode *node = l->data;
        int ret = strata_node_co_flush(node);
        if (ret < 0) {
            g_warning("flushing node '%s' on shutdown: %s",
                      strata_node_get_name(node), g_strerror(-ret));
        }
    }
}

static void flush_all(StrataContext *ctx)
{
    strata_loop_run_co(ctx->loop, flush_all_co, ctx);
}

static void on_quit(StrataMonitor *mon, void *opaque)
{
    Daemon *d = opaque;

    g_main_loop_quit(d->loop);
}

/* Forks; the parent waits until the child says it serves, and exits with
 * the child's verdict.  Returns the pipe the child reports on. */
static int start_daemon(void)
{
    int fds[2];
    pid_t pid;

    if (pipe(fds) < 0) {
        die("--daemonize: pipe: %s", g_strerror(errno));
    }
    pid = fork();
    if (pid < 0) {
        die("--daemonize: fork: %s", g_strerror(errno));
    }
    if (pid > 0) {
        char status = 1;
        close(fds[1]);
        while (read(fds[0], &status, 1) < 0 && errno == EINTR) {
        }
        _exit(status == 0 ? 0 : 1);
    }
    close(fds[0]);
    setsid();
    return fds[1];
}

static void finish_daemonize(int fd, bool keep_stderr)
{
    char ok = 0;
    int null = open("/dev/null", O_RDWR);

    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        /* The parent's caller may wait for stderr to close; keep it
         * only for the log -v asked for. */
        if (!keep_stderr) {
            dup2(null, STDERR_FILENO);
        }
        if (null > STDERR_FILENO) {
            close(null);
        }
    }
    if (write(fd, &ok, 1) < 0) {
        /* The parent is gone; nothing to tell. */
    }
    close(fd);
}

int main(int argc, char **argv)
{
    Options o = { 0 };
    Daemon d = { 0 };
    g_autoptr(GError) err = NULL;
    /* Static: a fatal error exits with them alive, and they stay reachable. */
    static StrataContext *ctx;
    static StrataMonitor *mon;
    int daemon_fd = -1;

    o.poll_max_ns = STRATAD_POLL_MAX_NS;
    o.actions = g_ptr_array_new_with_free_func(action_free);
    o.sockets = g_ptr_array_new_with_free_func(g_free);
    o.chardevs = g_ptr_array_new();
    o.monitors = g_ptr_array_new_with_free_func(g_free);
    parse_args(&o, argc, argv);
    if (o.verbose) {
        g_log_set_debug_enabled(TRUE);
    }
    /* The ring and the thread pool do not survive a fork: fork first. */
    if (o.daemonize) {
        daemon_fd = start_daemon();
    }

    ctx = strata_context_new(NULL, NULL, &err);
    if (!ctx) {
        die("%s", err->message);
    }
    for (guint i = 0; i < o.actions->len; i++) {
        Action *a = o.actions->pdata[i];
        switch (a->kind) {
        case ACT_BLOCKDEV:
            if (!strata_context_add_node_keyval(ctx, a->spec, &err)) {
                die("--blockdev: %s", err->message);
            }
            break;
        case ACT_NBD_SERVER:
            if (!start_nbd_server(ctx, a->spec, &err)) {
                die("--nbd-server: %s", err->message);
            }
            break;
        case ACT_EXPORT:
            if (!strata_export_add_keyval(ctx, a->spec, &err)) {
                die("--export: %s", err->message);
            }
            break;
        }
    }
    mon = strata_monitor_new(ctx);
    d.loop = g_main_loop_new(NULL, FALSE);
    strata_loop_set_poll_max_ns(ctx->loop, o.poll_max_ns);
    strata_monitor_set_quit_func(mon, on_quit, &d);
    for (guint i = 0; i < o.sockets->len; i++) {
        if (!strata_monitor_listen(mon, o.sockets->pdata[i], &err)) {
            die("%s", err->message);
        }
    }
    if (o.pidfile) {
        g_autofree char *pid = g_strdup_printf("%d\n", (int)getpid());
        if (!g_file_set_contents(o.pidfile, pid, -1, &err)) {
            die("--pidfile: %s", err->message);
        }
    }
    g_unix_signal_add(SIGTERM, on_signal, &d);
    g_unix_signal_add(SIGINT, on_signal, &d);
    if (daemon_fd >= 0) {
        finish_daemonize(daemon_fd, o.verbose);
    }
    g_debug("stratad %s serving (aio engine %s)", STRATA_VERSION,
            strata_context_aio_engine(ctx));

    g_main_loop_run(d.loop);

    /* Nobody new connects and no command runs from here on: the steps
     * below iterate the loop, where a client's command would otherwise
     * run while nodes close.  Clients stay connected to hear the
     * exports' BLOCK_EXPORT_DELETED, as qemu-storage-daemon sends it. */
    strata_monitor_quiesce(mon);
    strata_exports_shutdown(ctx);
    flush_all(ctx);
    strata_monitor_detach_context(mon);
    strata_context_free(ctx);
    /* The sockets disappear only once the images are closed: a script
     * may take that as the sign that the files are consistent. */
    strata_monitor_free(mon);
    if (o.pidfile) {
        unlink(o.pidfile);
    }
    g_main_loop_unref(d.loop);
    g_ptr_array_unref(o.actions);
    g_ptr_array_unref(o.sockets);
    g_ptr_array_unref(o.monitors);
    g_free(o.pidfile);
    return d.status;
}
