/* strata — QMP on a UNIX socket: listening, clients, buffered output.
 *
 * Unlike QSD, which serves one client per socket, every client that
 * connects gets its greeting at once and is served side by side.  Each
 * client's cost is bounded: its input through the JSON splitter's
 * limits, its output by MAX_PENDING_OUTPUT (a client that does not read
 * its replies and events is dropped rather than buffered for forever).
 *
 * A command may iterate the main loop (the block layer waits for I/O that
 * way), and so may any other loop callback (a bottom half that drops the
 * last reference to a backend drains it).  Clients' input read in such a
 * nested iteration would run a command in the middle of somebody else's
 * work: a command inside a command, or a query that sees an export gone
 * from the list before its BLOCK_EXPORT_DELETED was sent.  So input is
 * only read from the outermost level of the loop; in a nested iteration
 * it waits unread in the kernel until the loop is back at the top.
 *
 * A client may hang up while its own input is being fed to the
 * dispatcher (a reply that cannot be sent): it is marked gone at once,
 * nothing more of its input runs, and its session is torn down once the
 * splitter has returned.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <gio/gio.h>
#include <gio/gunixsocketaddress.h>

#include "strata-util.h"
#include "qmp-private.h"

#define MAX_PENDING_OUTPUT (16u << 20)
#define READ_CHUNK 65536

typedef struct Client Client;

struct StrataQmpServer {
    StrataMonitor *mon;
    char *path;
    GMainContext *mctx;     /* where every source of the server runs */
    GSocketService *service;
    GSource *resume_src;    /* re-reads paused clients at the top level */
    bool accepting;
    GList *clients;         /* Client * */
};

struct Client {
    int refcnt;
    StrataQmpServer *srv;
    GSocketConnection *conn;
    GSocket *sock;
    GSource *in_src;
    GSource *out_src;
    GString *out;
    size_t out_pos;
    bool closed;
    bool waiting;           /* input paused while a command runs */
    int feeding;            /* inside strata_qmp_session_feed() */
    StrataQmpSession session;
};

static void client_close(Client *c);
static gboolean client_readable(GSocket *sock, GIOCondition cond,
                                void *opaque);

static void client_ref(Client *c)
{
    c->refcnt++;
}

static void client_unref(Client *c)
{
    if (--c->refcnt > 0) {
        return;
    }
    g_string_free(c->out, TRUE);
    g_object_unref(c->conn);
    g_free(c);
}

static void drop_source(GSource **src)
{
    if (*src) {
        g_source_destroy(*src);
        g_source_unref(*src);
        *src = NULL;
    }
}

static gboolean client_writable(GSocket *sock, GIOCondition cond,
                                void *opaque);

/* Sends what the socket takes now; the rest waits for G_IO_OUT. */
static void client_flush(Client *c)
{
    while (!c->closed && c->out_pos < c->out->len) {
        g_autoptr(GError) err = NULL;
        gssize n = g_socket_send_with_blocking(c->sock,
                                               c->out->str + c->out_pos,
                                               c->out->len - c->out_pos,
                                               FALSE, NULL, &err);
        if (n < 0) {
            if (g_error_matches(err, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK)) {
                if (!c->out_src) {
                    c->out_src = g_socket_create_source(c->sock, G_IO_OUT,
                                                        NULL);
                    g_source_set_callback(c->out_src,
                                          (GSourceFunc)(void (*)(void))
                                          client_writable, c, NULL);
                    g_source_attach(c->out_src, c->srv->mctx);
                }
                return;
            }
            client_close(c);
            return;
        }
        c->out_pos += (size_t)n;
    }
    if (c->out_pos == c->out->len) {
        g_string_truncate(c->out, 0);
        c->out_pos = 0;
        drop_source(&c->out_src);
    }
}

static gboolean client_writable(GSocket *sock, GIOCondition cond,
                                void *opaque)
{
    Client *c = opaque;

    c->refcnt++;
    client_flush(c);
    client_unref(c);
    return G_SOURCE_CONTINUE;
}

static void client_send(StrataQmpSession *s, const char *line, void *opaque)
{
    Client *c = opaque;

    if (c->closed) {
        return;
    }
    if (c->out->len - c->out_pos + strlen(line) > MAX_PENDING_OUTPUT) {
        g_debug("QMP client not reading its replies: disconnected");
        client_close(c);
        return;
    }
    g_string_append(c->out, line);
    g_string_append(c->out, "\r\n");
    client_flush(c);
}

static void watch_input(Client *c)
{
    c->in_src = g_socket_create_source(c->sock, G_IO_IN | G_IO_HUP | G_IO_ERR,
                                       NULL);
    g_source_set_callback(c->in_src,
                          (GSourceFunc)(void (*)(void))client_readable, c,
                          NULL);
    g_source_attach(c->in_src, c->srv->mctx);
}

/* Whether clients may be read now: no command runs and the loop is not
 * iterated from inside some callback. */
static bool may_read(StrataQmpServer *srv)
{
    return !strata_monitor_is_busy(srv->mon) && g_main_depth() <= 1;
}

static bool any_waiting(StrataQmpServer *srv)
{
    for (GList *l = srv->clients; l; l = l->next) {
        Client *c = l->data;
        if (c->waiting && !c->closed) {
            return true;
        }
    }
    return false;
}

/* A source that is ready when paused clients can be read again.  Its
 * prepare() runs outside any dispatch only at the top level of the
 * loop (depth 0); in a nested iteration it never fires, so waiting
 * clients cost nothing there. */
typedef struct {
    GSource base;
    StrataQmpServer *srv;
} ResumeSource;

static gboolean resume_prepare(GSource *src, gint *timeout)
{
    StrataQmpServer *srv = ((ResumeSource *)src)->srv;

    *timeout = -1;
    return g_main_depth() == 0 && !strata_monitor_is_busy(srv->mon) &&
           any_waiting(srv);
}

static gboolean resume_check(GSource *src)
{
    return resume_prepare(src, &(gint){ 0 });
}

static gboolean resume_dispatch(GSource *src, GSourceFunc cb, gpointer data)
{
    strata_qmp_server_resume(((ResumeSource *)src)->srv);
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs resume_funcs = {
    .prepare = resume_prepare,
    .check = resume_check,
    .dispatch = resume_dispatch,
};

/* Writes the quit reply out before the daemon goes away. */
static void client_finish_quit(Client *c)
{
    g_socket_set_blocking(c->sock, TRUE);
    g_socket_set_timeout(c->sock, 5);
    while (!c->closed && c->out_pos < c->out->len) {
        gssize n = g_socket_send(c->sock, c->out->str + c->out_pos,
                                 c->out->len - c->out_pos, NULL, NULL);
        if (n <= 0) {
            break;
        }
        c->out_pos += (size_t)n;
    }
    c->session.quit_pending = false;
    strata_monitor_quit_done(c->srv->mon);
}

static gboolean client_readable(GSocket *sock, GIOCondition cond,
                                void *opaque)
{
    Client *c = opaque;
    char buf[READ_CHUNK];
    g_autoptr(GError) err = NULL;
    gssize n;

    if (!may_read(c->srv)) {
        /* Read again when the running command is done, or when the
         * loop is back at its top level. */
        g_source_unref(c->in_src);
        c->in_src = NULL;
        c->waiting = true;
        return G_SOURCE_REMOVE;
    }
    n = g_socket_receive_with_blocking(sock, buf, sizeof(buf), FALSE, NULL,
                                       &err);
    if (n < 0 && g_error_matches(err, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK)) {
        return G_SOURCE_CONTINUE;
    }
    if (n <= 0) {
        client_close(c);
        return G_SOURCE_REMOVE;
    }
    c->refcnt++;
    c->feeding++;
    strata_qmp_session_feed(&c->session, buf, (size_t)n);
    c->feeding--;
    if (c->closed) {
        /* It hung up meanwhile; the splitter is done with its state. */
        strata_qmp_session_cleanup(&c->session);
    } else if (c->session.quit_pending) {
        client_finish_quit(c);
    }
    bool closed = c->closed;
    client_unref(c);
    return closed ? G_SOURCE_REMOVE : G_SOURCE_CONTINUE;
}

static void client_close(Client *c)
{
    if (c->closed) {
        return;
    }
    c->closed = true;
    c->session.hung_up = true;
    drop_source(&c->in_src);
    drop_source(&c->out_src);
    if (!c->feeding) {
        strata_qmp_session_cleanup(&c->session);
    }
    g_io_stream_close(G_IO_STREAM(c->conn), NULL, NULL);
    c->srv->clients = g_list_remove(c->srv->clients, c);
    client_unref(c);
}

static gboolean on_incoming(GSocketService *service,
                            GSocketConnection *conn, GObject *source,
                            void *opaque)
{
    StrataQmpServer *srv = opaque;
    Client *c = g_new0(Client, 1);
    g_autofree char *greeting = NULL;

    c->refcnt = 1;
    c->srv = srv;
    c->conn = g_object_ref(conn);
    c->sock = g_socket_connection_get_socket(conn);
    c->out = g_string_new(NULL);
    g_socket_set_blocking(c->sock, FALSE);
    srv->clients = g_list_prepend(srv->clients, c);
    strata_qmp_session_init(&c->session, srv->mon, false, client_send, c);
    greeting = strata_qmp_greeting(srv->mon);
    /* Sending may find the peer gone and close (and free) the client:
     * hold it until we are done with it. */
    client_ref(c);
    client_send(&c->session, greeting, c);
    if (!c->closed) {
        watch_input(c);
    }
    client_unref(c);
    return TRUE;
}

void strata_qmp_server_resume(StrataQmpServer *srv)
{
    for (GList *l = srv->clients; l; l = l->next) {
        Client *c = l->data;
        if (c->waiting && !c->closed) {
            c->waiting = false;
            watch_input(c);
        }
    }
}

unsigned strata_qmp_server_client_count(StrataQmpServer *srv)
{
    return g_list_length(srv->clients);
}

/*
 * The socket is bound inside a fresh private directory next to @path,
 * given mode 0600 there, and then renamed into place: nobody can connect
 * before the mode is right, and @path appears only once it is listening.
 */
StrataQmpServer *strata_qmp_server_new(StrataMonitor *mon, const char *path,
                                       GError **error)
{
    g_autofree char *dir = g_path_get_dirname(path);
    g_autofree char *tmpl = g_build_filename(dir, ".strata-XXXXXX", NULL);
    g_autofree char *tmp_sock = NULL;
    g_autoptr(GSocketAddress) addr = NULL;
    StrataQmpServer *srv;
    struct stat st;

    if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "UNIX socket path '%s' is too long", path);
        return NULL;
    }
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                        "'%s' exists and is not a socket", path);
            return NULL;
        }
        /* A stale socket of an earlier run, as QEMU replaces it. */
        unlink(path);
    }
    if (!g_mkdtemp_full(tmpl, 0700)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to create a directory next to '%s': %s", path,
                    g_strerror(errno));
        return NULL;
    }
    tmp_sock = g_build_filename(tmpl, "s", NULL);

    srv = g_new0(StrataQmpServer, 1);
    srv->mon = mon;
    srv->path = g_strdup(path);
    srv->mctx = g_main_context_ref_thread_default();
    srv->service = g_socket_service_new();
    addr = g_unix_socket_address_new(tmp_sock);
    if (!g_socket_listener_add_address(G_SOCKET_LISTENER(srv->service), addr,
                                       G_SOCKET_TYPE_STREAM,
                                       G_SOCKET_PROTOCOL_DEFAULT, NULL, NULL,
                                       error) ||
        chmod(tmp_sock, 0600) < 0 || rename(tmp_sock, path) < 0) {
        if (error && !*error) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Failed to create socket '%s': %s", path,
                        g_strerror(errno));
        }
        unlink(tmp_sock);
        rmdir(tmpl);
        g_socket_service_stop(srv->service);
        g_socket_listener_close(G_SOCKET_LISTENER(srv->service));
        g_object_unref(srv->service);
        g_main_context_unref(srv->mctx);
        g_free(srv->path);
        g_free(srv);
        return NULL;
    }
    rmdir(tmpl);
    srv->resume_src = g_source_new(&resume_funcs, sizeof(ResumeSource));
    ((ResumeSource *)srv->resume_src)->srv = srv;
    g_source_attach(srv->resume_src, srv->mctx);
    g_signal_connect(srv->service, "incoming", G_CALLBACK(on_incoming), srv);
    g_socket_service_start(srv->service);
    srv->accepting = true;
    return srv;
}

void strata_qmp_server_stop_accepting(StrataQmpServer *srv)
{
    if (srv->accepting) {
        srv->accepting = false;
        g_socket_service_stop(srv->service);
        g_socket_listener_close(G_SOCKET_LISTENER(srv->service));
    }
}

/* What is still queued for @c (the last events) is written out, waiting
 * a little for a slow reader, before the connection closes. */
static void client_flush_final(Client *c)
{
    if (c->closed || c->out_pos >= c->out->len) {
        return;
    }
    drop_source(&c->out_src);
    g_socket_set_blocking(c->sock, TRUE);
    g_socket_set_timeout(c->sock, 1);
    while (c->out_pos < c->out->len) {
        gssize n = g_socket_send(c->sock, c->out->str + c->out_pos,
                                 c->out->len - c->out_pos, NULL, NULL);
        if (n <= 0) {
            break;
        }
        c->out_pos += (size_t)n;
    }
}

void strata_qmp_server_free(StrataQmpServer *srv)
{
    if (!srv) {
        return;
    }
    strata_qmp_server_stop_accepting(srv);
    g_object_unref(srv->service);
    drop_source(&srv->resume_src);
    while (srv->clients) {
        client_flush_final(srv->clients->data);
        client_close(srv->clients->data);
    }
    unlink(srv->path);
    g_main_context_unref(srv->mctx);
    g_free(srv->path);
    g_free(srv);
}
