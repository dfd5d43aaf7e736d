/* stratad — the strata daemon: QMP on UNIX sockets, block nodes from the
 * command line, in the forms qemu-storage-daemon accepts.
 *
 *   stratad --qmp qmp.sock
 *   stratad --blockdev driver=file,node-name=f,filename=disk.img \
 *           --chardev socket,path=qmp.sock,server=on,wait=off,id=char0 \
 *           --monitor chardev=char0 --pidfile d.pid --daemonize
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
#include "../block/export-private.h"
#include "../util/keyval-private.h"

typedef struct {
    char *id;
    char *path;
} Chardev;

typedef struct {
    GPtrArray *blockdevs;   /* char * */
    GPtrArray *sockets;     /* char *: paths to serve QMP on */
    GPtrArray *chardevs;    /* Chardev * */
    GPtrArray *monitors;    /* char *: chardev ids */
    char *pidfile;
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

static void usage(void)
{
    printf("Usage: stratad [options]\n"
           "\n"
           "  --qmp PATH               serve QMP on the UNIX socket PATH\n"
           "  --blockdev OPTIONS       add a block node (key=value or JSON)\n"
           "  --chardev socket,path=PATH,server=on,wait=off,id=ID\n"
           "  --monitor chardev=ID     serve QMP on that chardev\n"
           "  --pidfile PATH           write the process id to PATH\n"
           "  --daemonize              run in the background once ready\n"
           "  -v, --trace PATTERN      log debug messages to stderr\n"
           "  -V, --version            print the version\n"
           "  -h, --help               print this help\n");
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
            strcmp(name, "--chardev") && strcmp(name, "--monitor") &&
            strcmp(name, "--pidfile") && strcmp(name, "--trace")) {
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
        } else if (!strcmp(name, "--blockdev")) {
            g_ptr_array_add(o->blockdevs, g_strdup(value));
        } else if (!strcmp(name, "--chardev")) {
            parse_chardev(o, value);
        } else if (!strcmp(name, "--monitor")) {
            parse_monitor(o, value);
        } else if (!strcmp(name, "--pidfile")) {
            g_free(o->pidfile);
            o->pidfile = g_strdup(value);
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

    o.blockdevs = g_ptr_array_new_with_free_func(g_free);
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
    for (guint i = 0; i < o.blockdevs->len; i++) {
        if (!strata_context_add_node_keyval(ctx, o.blockdevs->pdata[i],
                                            &err)) {
            die("--blockdev: %s", err->message);
        }
    }
    mon = strata_monitor_new(ctx);
    d.loop = g_main_loop_new(NULL, FALSE);
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

    /* Exports go while the monitors can still hear their
     * BLOCK_EXPORT_DELETED, as qemu-storage-daemon emits it on quit. */
    strata_exports_shutdown(ctx);
    /* Clients go first so that no command runs while nodes close;
     * closing the nodes flushes them. */
    strata_monitor_free(mon);
    strata_context_free(ctx);
    if (o.pidfile) {
        unlink(o.pidfile);
    }
    g_main_loop_unref(d.loop);
    g_ptr_array_unref(o.blockdevs);
    g_ptr_array_unref(o.sockets);
    g_ptr_array_unref(o.monitors);
    g_free(o.pidfile);
    return d.status;
}
