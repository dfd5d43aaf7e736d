/* Test harness for the NBD server: a context with a running server on a
 * UNIX socket in a scratch directory, and ways to drive clients while
 * the loop keeps serving — external programs (GSubprocess) and a raw
 * protocol client on its own thread. */
#ifndef STRATA_NBD_HARNESS_H
#define STRATA_NBD_HARNESS_H

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <gio/gio.h>

#include "block-private.h"
#include "export-private.h"
#include "nbd-proto.h"
#include "../unit/test-util.h"

/* Each program uses part of the harness. */
#pragma GCC diagnostic ignored "-Wunused-function"

static StrataContext *ctx;
static char *dir;
static char *sock_path;
static int events_deleted;
static char last_event_id[64];

static void on_event(StrataContext *c, const char *name, JsonObject *data,
                     void *opaque)
{
    if (!strcmp(name, "BLOCK_EXPORT_DELETED")) {
        events_deleted++;
        g_strlcpy(last_event_id, json_object_get_string_member(data, "id"),
                  sizeof(last_event_id));
    }
}

static void harness_setup(void)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GSocketAddress) sa = NULL;

    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    dir = strata_test_tmpdir();
    sock_path = g_build_filename(dir, "nbd.sock", NULL);
    sa = g_unix_socket_address_new(sock_path);
    ck_assert_msg(strata_nbd_server_start(ctx, sa, 0, &err), "%s",
                  err ? err->message : "");
    strata_export_set_event_cb(ctx, on_event, NULL);
    events_deleted = 0;
    last_event_id[0] = 0;
}

static void harness_teardown(void)
{
    if (ctx) {
        strata_context_free(ctx);
        ctx = NULL;
    }
    g_free(sock_path);
    strata_test_rmdir(dir);
}

/* Adds a node from key=value text. */
static void add_node(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void add_node(const char *fmt, ...)
{
    g_autoptr(GError) err = NULL;
    va_list ap;

    va_start(ap, fmt);
    g_autofree char *spec = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    ck_assert_msg(strata_context_add_node_keyval(ctx, spec, &err), "%s: %s",
                  spec, err ? err->message : "");
}

/* Adds an export from key=value text. */
static void add_export(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void add_export(const char *fmt, ...)
{
    g_autoptr(GError) err = NULL;
    va_list ap;

    va_start(ap, fmt);
    g_autofree char *spec = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    ck_assert_msg(strata_export_add_keyval(ctx, spec, &err), "%s: %s", spec,
                  err ? err->message : "");
}

/* Creates a raw file of @size with @pattern bytes in [0, @data). */
static char *make_raw(const char *name, size_t size, size_t data, int pattern)
{
    char *path = strata_test_make_file(dir, name, size, false);
    if (data) {
        int fd = open(path, O_RDWR);
        void *buf = g_malloc(data);
        memset(buf, pattern, data);
        ck_assert_int_eq(pwrite(fd, buf, data, 0), (ssize_t)data);
        g_free(buf);
        close(fd);
    }
    return path;
}

/* ---- external programs ---- */

typedef struct {
    bool done;
    char *out;
    GSubprocess *proc;
} ToolRun;

static void tool_done(GObject *src, GAsyncResult *res, gpointer opaque)
{
    ToolRun *t = opaque;
    g_autoptr(GError) err = NULL;

    g_subprocess_communicate_utf8_finish(G_SUBPROCESS(src), res, &t->out,
                                         NULL, &err);
    t->done = true;
}

static void tool_start(ToolRun *t, const char *const *argv)
{
    g_autoptr(GError) err = NULL;

    memset(t, 0, sizeof(*t));
    t->proc = g_subprocess_newv(argv, G_SUBPROCESS_FLAGS_STDOUT_PIPE |
                                      G_SUBPROCESS_FLAGS_STDERR_MERGE, &err);
    ck_assert_msg(t->proc, "%s: %s", argv[0], err ? err->message : "");
    g_subprocess_communicate_utf8_async(t->proc, NULL, NULL, tool_done, t);
}

/* Iterates the loop until @t exits; returns its exit status (its
 * output in t->out, freed by tool_finish). */
static int tool_wait(ToolRun *t)
{
    while (!t->done) {
        /* With the context gone, the default context still runs the
         * subprocess's callbacks. */
        if (ctx) {
            strata_loop_iterate(ctx->loop, true);
        } else {
            g_main_context_iteration(NULL, TRUE);
        }
    }
    g_subprocess_wait(t->proc, NULL, NULL);
    return g_subprocess_get_if_exited(t->proc) ?
           g_subprocess_get_exit_status(t->proc) : -1;
}

static void tool_finish(ToolRun *t)
{
    g_clear_object(&t->proc);
    g_clear_pointer(&t->out, g_free);
}

/* Runs a program to its end; (transfer full) output in *@out. */
static int run_tool(char **out, const char *first, ...)
{
    GPtrArray *argv = g_ptr_array_new();
    ToolRun t;
    va_list ap;
    int status;

    g_ptr_array_add(argv, (char *)first);
    va_start(ap, first);
    for (const char *a; (a = va_arg(ap, const char *));) {
        g_ptr_array_add(argv, (char *)a);
    }
    va_end(ap);
    g_ptr_array_add(argv, NULL);
    tool_start(&t, (const char *const *)argv->pdata);
    g_ptr_array_free(argv, TRUE);
    status = tool_wait(&t);
    if (out) {
        *out = g_steal_pointer(&t.out);
    }
    tool_finish(&t);
    return status;
}

static bool have_tool(const char *name)
{
    g_autofree char *p = g_find_program_in_path(name);
    return p != NULL;
}

/* ---- a raw client on its own thread ---- */

/* The most requests @node had in flight at once, sampled every 2 ms by
 * the loop's thread between in_flight_watch() and in_flight_unwatch(). */
typedef struct {
    StrataNode *node;
    unsigned most;
    GSource *timer;
} InFlightWatch;

static gboolean in_flight_sample(gpointer opaque)
{
    InFlightWatch *w = opaque;

    w->most = MAX(w->most, w->node->in_flight);
    return G_SOURCE_CONTINUE;
}

static void in_flight_watch(InFlightWatch *w, StrataNode *node)
{
    w->node = node;
    w->most = 0;
    w->timer = g_timeout_source_new(2);
    g_source_set_callback(w->timer, in_flight_sample, w, NULL);
    g_source_attach(w->timer, strata_loop_get_context(ctx->loop));
}

static void in_flight_unwatch(InFlightWatch *w)
{
    g_source_destroy(w->timer);
    g_clear_pointer(&w->timer, g_source_unref);
}

/* A scenario runs on a thread with blocking sockets and returns NULL or
 * a failure message (transfer full); the test thread keeps the loop
 * running meanwhile and asserts on the result. */
typedef char *(*Scenario)(void *opaque);

typedef struct {
    Scenario fn;
    void *opaque;
    char *result;
    gint done;
} ScenarioRun;

static gpointer scenario_thread(gpointer opaque)
{
    ScenarioRun *r = opaque;
    r->result = r->fn(r->opaque);
    g_atomic_int_set(&r->done, 1);
    g_main_context_wakeup(strata_loop_get_context(ctx->loop));
    return NULL;
}

static char *run_scenario(Scenario fn, void *opaque)
{
    ScenarioRun r = { fn, opaque, NULL, 0 };
    GThread *t = g_thread_new("nbd-client", scenario_thread, &r);

    while (!g_atomic_int_get(&r.done)) {
        strata_loop_iterate(ctx->loop, true);
    }
    g_thread_join(t);
    /* Let the server notice disconnects. */
    for (int i = 0; i < 20; i++) {
        strata_loop_iterate(ctx->loop, false);
    }
    return r.result;
}

#define SCHECK(cond) do { \
        if (!(cond)) { \
            return g_strdup_printf("%s:%d: %s", __FILE__, __LINE__, #cond); \
        } \
    } while (0)

static void w16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static void w32(uint8_t *p, uint32_t v) { w16(p, v >> 16); w16(p + 2, v); }
static void w64(uint8_t *p, uint64_t v) { w32(p, v >> 32); w32(p + 4, v); }
static uint16_t r16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t r32(const uint8_t *p)
{
    return (uint32_t)r16(p) << 16 | r16(p + 2);
}
static uint64_t r64(const uint8_t *p)
{
    return (uint64_t)r32(p) << 32 | r32(p + 4);
}

static int raw_connect(void)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct timeval tv = { .tv_sec = 20 };

    g_strlcpy(sun.sun_path, sock_path, sizeof(sun.sun_path));
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        close(fd);
        return -1;
    }
    /* A server that hangs must fail the test, not stall it. */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

static bool raw_read(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n <= 0) {
            return false;
        }
        p += n;
        len -= n;
    }
    return true;
}

static bool raw_write(int fd, const void *buf, size_t len)
{
    return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len;
}

/* True when the server has closed the connection (EOF before any
 * further byte). */
static bool raw_is_closed(int fd)
{
    uint8_t b;
    return recv(fd, &b, 1, 0) == 0;
}

/* Reads the greeting, sends client flags (fixed newstyle, no zeroes). */
static bool raw_greet(int fd)
{
    uint8_t b[18], cf[4];
    if (!raw_read(fd, b, 18) || r64(b) != STRATA_NBD_INIT_MAGIC ||
        r64(b + 8) != STRATA_NBD_OPTS_MAGIC ||
        !(r16(b + 16) & STRATA_NBD_FLAG_FIXED_NEWSTYLE)) {
        return false;
    }
    w32(cf, STRATA_NBD_CFLAG_FIXED_NEWSTYLE | STRATA_NBD_CFLAG_NO_ZEROES);
    return raw_write(fd, cf, 4);
}

static bool raw_send_opt(int fd, uint32_t opt, const void *data,
                         uint32_t len)
{
    uint8_t h[16];
    w64(h, STRATA_NBD_OPTS_MAGIC);
    w32(h + 8, opt);
    w32(h + 12, len);
    return raw_write(fd, h, 16) && (!len || raw_write(fd, data, len));
}

/* Reads one option reply; payload (transfer full) in *@data. */
static bool raw_recv_rep(int fd, uint32_t *opt, uint32_t *type,
                         uint8_t **data, uint32_t *len)
{
    uint8_t h[20];
    if (!raw_read(fd, h, 20) || r64(h) != STRATA_NBD_REP_MAGIC) {
        return false;
    }
    *opt = r32(h + 8);
    *type = r32(h + 12);
    *len = r32(h + 16);
    *data = g_malloc(*len + 1);
    (*data)[*len] = 0;
    return raw_read(fd, *data, *len);
}

/* Builds the GO / INFO payload for @name asking for @infos. */
static uint8_t *go_payload(const char *name, const uint16_t *infos, int n,
                           uint32_t *len)
{
    size_t nl = strlen(name);
    uint8_t *b = g_malloc(6 + nl + 2 * n);
    w32(b, nl);
    memcpy(b + 4, name, nl);
    w16(b + 4 + nl, n);
    for (int i = 0; i < n; i++) {
        w16(b + 6 + nl + 2 * i, infos[i]);
    }
    *len = 6 + nl + 2 * n;
    return b;
}

/* Full handshake: optionally structured replies and meta contexts, then
 * GO.  Returns the fd or -1. */
static int raw_open(const char *name, bool structured, bool meta,
                    uint64_t *size, uint16_t *tflags)
{
    int fd = raw_connect();
    uint32_t opt, type, len;
    g_autofree uint8_t *p = NULL;

    if (fd < 0 || !raw_greet(fd)) {
        goto fail;
    }
    if (structured) {
        if (!raw_send_opt(fd, STRATA_NBD_OPT_STRUCTURED_REPLY, NULL, 0) ||
            !raw_recv_rep(fd, &opt, &type, &p, &len) ||
            type != STRATA_NBD_REP_ACK) {
            goto fail;
        }
        g_clear_pointer(&p, g_free);
    }
    if (meta) {
        size_t nl = strlen(name);
        const char *q = STRATA_NBD_META_BASE_ALLOCATION;
        const char *q2 = STRATA_NBD_META_ALLOCATION_DEPTH;
        g_autofree uint8_t *b = g_malloc(64 + nl);
        size_t pos = 0;
        w32(b, nl);
        memcpy(b + 4, name, nl);
        pos = 4 + nl;
        w32(b + pos, 2);
        pos += 4;
        w32(b + pos, strlen(q));
        memcpy(b + pos + 4, q, strlen(q));
        pos += 4 + strlen(q);
        w32(b + pos, strlen(q2));
        memcpy(b + pos + 4, q2, strlen(q2));
        pos += 4 + strlen(q2);
        if (!raw_send_opt(fd, STRATA_NBD_OPT_SET_META_CONTEXT, b, pos)) {
            goto fail;
        }
        do {
            g_clear_pointer(&p, g_free);
            if (!raw_recv_rep(fd, &opt, &type, &p, &len)) {
                goto fail;
            }
        } while (type == STRATA_NBD_REP_META_CONTEXT);
        if (type != STRATA_NBD_REP_ACK) {
            goto fail;
        }
    }
    {
        g_autofree uint8_t *b = go_payload(name, NULL, 0, &len);
        if (!raw_send_opt(fd, STRATA_NBD_OPT_GO, b, len)) {
            goto fail;
        }
    }
    for (;;) {
        g_clear_pointer(&p, g_free);
        if (!raw_recv_rep(fd, &opt, &type, &p, &len)) {
            goto fail;
        }
        if (type == STRATA_NBD_REP_ACK) {
            break;
        }
        if (type != STRATA_NBD_REP_INFO) {
            goto fail;
        }
        if (len == 12 && r16(p) == STRATA_NBD_INFO_EXPORT) {
            *size = r64(p + 2);
            *tflags = r16(p + 10);
        }
    }
    return fd;
fail:
    if (fd >= 0) {
        close(fd);
    }
    return -1;
}

static bool raw_send_req(int fd, uint16_t flags, uint16_t type,
                         uint64_t cookie, uint64_t off, uint32_t len,
                         const void *payload)
{
    uint8_t h[28];
    w32(h, STRATA_NBD_REQUEST_MAGIC);
    w16(h + 4, flags);
    w16(h + 6, type);
    w64(h + 8, cookie);
    w64(h + 16, off);
    w32(h + 24, len);
    return raw_write(fd, h, 28) && (!payload || raw_write(fd, payload, len));
}

/* Reads a simple reply; @data (when not NULL and no error) gets @len
 * bytes. */
static bool raw_recv_simple(int fd, uint32_t *err, uint64_t *cookie,
                            void *data, size_t len)
{
    uint8_t h[16];
    if (!raw_read(fd, h, 16) || r32(h) != STRATA_NBD_SIMPLE_REPLY_MAGIC) {
        return false;
    }
    *err = r32(h + 4);
    *cookie = r64(h + 8);
    if (data && *err == 0) {
        return raw_read(fd, data, len);
    }
    return true;
}

/* Reads one structured chunk: header fields and its payload (transfer
 * full). */
static bool raw_recv_chunk(int fd, uint16_t *flags, uint16_t *type,
                           uint64_t *cookie, uint8_t **payload,
                           uint32_t *len)
{
    uint8_t h[20];
    if (!raw_read(fd, h, 20) ||
        r32(h) != STRATA_NBD_STRUCTURED_REPLY_MAGIC) {
        return false;
    }
    *flags = r16(h + 4);
    *type = r16(h + 6);
    *cookie = r64(h + 8);
    *len = r32(h + 16);
    *payload = g_malloc(*len + 1);
    return raw_read(fd, *payload, *len);
}

#endif
