/* strata — the NBD server: block exports served to NBD clients.
 *
 * One listener (a GSocketService on the context's GMainContext) accepts
 * connections.  Each connection is driven by one receiving coroutine:
 * it negotiates (fixed newstyle), then reads requests one after another
 * and starts a coroutine per request, so a connection has many requests
 * in flight and their replies leave as they complete, one at a time
 * under the connection's send lock.  Sockets are non-blocking; a
 * coroutine that would block waits on a one-shot fd source.
 *
 * An export holds its node through a StrataBackend, so it follows
 * snapshots and pivots.  Exports are reference counted: the context's
 * list holds one reference and every client attached to the export one
 * more; BLOCK_EXPORT_DELETED is emitted when the last goes.
 *
 * A client that misbehaves (bad magic, impossible lengths, a truncated
 * request) loses its connection; a request the protocol can answer
 * (unknown command, bad flags, out of range) gets an NBD error.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib-unix.h>
#include <glib/gstdio.h>
#include <gio/gunixsocketaddress.h>

#include "block-private.h"
#include "export-private.h"
#include "nbd-proto.h"
#include "../util/keyval-private.h"

/*
 * Requests in flight per connection before the server stops reading,
 * and the payload bytes they may hold between them (a request that
 * would go past it waits for others to end, unless it is alone).
 * QEMU's server stops at 16, so a client that keeps 32 in flight has
 * half of them waiting in the socket while the disk's queue is short:
 * 4 KiB O_DIRECT reads and writes from fio's nbd engine at depth 32
 * went from 56-60k/s (reads) and 62-63k/s (writes) with 16 to
 * 61-68k/s and 74-75k/s with 64, the device's queue from 10 to 16
 * (see also loop_co_wait_sqe in util/loop.c).  The byte
 * bound keeps what a client can make the server allocate where 16 of
 * the largest requests (32 MiB each) would have put it.
 */
#define NBD_MAX_REQS STRATA_NBD_SERVER_MAX_REQS
#define NBD_MAX_REQ_BYTES STRATA_NBD_SERVER_MAX_REQ_BYTES
/* Extents in one block-status chunk. */
#define NBD_MAX_EXTENTS (1024 * 1024 / 8)
/* Request buffers a connection keeps for reuse: one per request in
 * flight (so a steady stream of large requests never goes back to
 * mmap), the largest kept, and their total per connection. */
#define NBD_BUF_CACHE NBD_MAX_REQS
#define NBD_BUF_CACHE_MAX (2 * 1024 * 1024)
#define NBD_BUF_CACHE_TOTAL (16 * 1024 * 1024)
/*
 * Requests a connection's reader starts before it gives the loop a turn.
 * A client sends a burst of requests one system call each; the reader
 * took them as they came until the socket ran dry, so the reads it had
 * started waited for submission, and every reply for the burst's last
 * request.  A turn every few requests submits what was started, reaps
 * what completed and sends those replies while the client is still
 * sending: the two processes work at once instead of taking turns.
 * 4 KiB reads at depth 32 from qemu-img bench, 8-12 alternating rounds,
 * medians: page cache 1.187 s -> 0.794 s (131072 reads; QSD 1.476 s),
 * null-co 0.512 s -> 0.427 s (QSD 0.651 s); O_DIRECT reads and writes,
 * bound by the disk, unchanged.  A turn after every request gained
 * less (null-co 0.502 s); after two, four or eight, within the noise
 * of each other.
 */
#define NBD_REQS_PER_TURN 4
/* Option payloads larger than this are skipped and refused. */
#define NBD_MAX_OPTION (64 * 1024)

struct StrataNbdServer {
    StrataContext *ctx;
    GSocketService *service;
    gulong incoming_id;
    char *unix_path;          /* unlinked when the server stops */
    unsigned max_connections; /* 0: unlimited */
    GList *clients;           /* NbdClient * */
};

struct StrataExport {
    StrataContext *ctx;
    int refcnt;               /* the context's list + one per client */
    char *id;
    char *name;
    char *description;        /* nullable */
    bool writable;
    bool writethrough;
    bool deleted;             /* the list's reference is gone */
    StrataBackend *blk;
    GList *clients;
};

struct NbdRequest;

typedef struct NbdClient {
    StrataContext *ctx;
    StrataNbdServer *server;
    GSocketConnection *conn;
    int fd;
    StrataNbdWatch *watch;    /* of fd */
    StrataExport *exp;        /* after GO / EXPORT_NAME; holds a ref */
    uint64_t size;            /* the export's size at negotiation */
    uint16_t tflags;          /* transmission flags sent */
    bool structured;
    bool no_zeroes;
    bool closing;             /* kicked or finished: no more reads */
    bool meta_base;           /* selected meta contexts */
    bool meta_depth;
    char *meta_export;        /* export the selection was made for */
    StrataNbdRBuf rbuf;
    void *bufs[NBD_BUF_CACHE];     /* request buffers for reuse */
    size_t buf_sizes[NBD_BUF_CACHE];
    size_t buf_total;              /* bytes in bufs[] */
    unsigned buf_next;
    StrataCoMutex send_lock;
    struct NbdRequest *out_head;   /* replies waiting for the sender */
    struct NbdRequest **out_tail;
    bool sender_scheduled;
    unsigned nreqs;
    uint64_t req_bytes;       /* payload bytes of the requests in flight */
    StrataCoQueue reqs_wait;  /* the receiver waits here for a slot */
} NbdClient;

typedef struct NbdRequest {
    NbdClient *client;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
    int err;                  /* -errno decided while parsing */
    void *buf;
    bool hole;                /* a READ answered by a hole chunk */
    /* The reply, queued for the sender (reply_sender_co). */
    uint8_t rhdr[STRATA_NBD_CHUNK_HEADER_SIZE + 12];
    struct iovec riov[2];
    int rniov;
    struct NbdRequest *next_out;
    bool sent;
    int send_ret;
    StrataCoroutine *waiter;
} NbdRequest;

/* ------------------------------------------------------------------ */
/* Socket I/O from coroutines (nbd-sock.c)                             */
/* ------------------------------------------------------------------ */

static StrataNbdSock client_sock(NbdClient *c)
{
    return (StrataNbdSock){ c->fd, c->ctx->loop, c->watch, &c->closing,
                            &c->rbuf };
}

static int co_read_full(NbdClient *c, void *buf, size_t len)
{
    StrataNbdSock sk = client_sock(c);
    return strata_nbd_co_read_full(&sk, buf, len);
}

static int co_skip(NbdClient *c, uint64_t len)
{
    StrataNbdSock sk = client_sock(c);
    return strata_nbd_co_skip(&sk, len);
}

/* Callers that may interleave hold the send lock. */
static int co_writev_full(NbdClient *c, const struct iovec *iov, int niov)
{
    StrataNbdSock sk = client_sock(c);
    return strata_nbd_co_writev_full(&sk, iov, niov);
}

static int co_write_full(NbdClient *c, const void *buf, size_t len)
{
    StrataNbdSock sk = client_sock(c);
    return strata_nbd_co_write_full(&sk, buf, len);
}

/* Stops the connection: the receiver sees EOF, pending sends fail. */
static void client_kick(NbdClient *c)
{
    if (!c->closing) {
        c->closing = true;
        shutdown(c->fd, SHUT_RDWR);
    }
}

/* ------------------------------------------------------------------ */
/* Exports                                                             */
/* ------------------------------------------------------------------ */

static void emit_event(StrataContext *ctx, const char *name, JsonObject *data)
{
    if (ctx->export_event_cb) {
        ctx->export_event_cb(ctx, name, data, ctx->export_event_opaque);
    }
}

void strata_export_set_event_cb(StrataContext *ctx, StrataExportEventFunc cb,
                                void *opaque)
{
    g_return_if_fail(ctx != NULL);
    ctx->export_event_cb = cb;
    ctx->export_event_opaque = opaque;
}

/* Plain code only: the backend may drain. */
static void export_unref(StrataExport *exp)
{
    StrataContext *ctx = exp->ctx;

    if (--exp->refcnt > 0) {
        return;
    }
    ctx->exports = g_list_remove(ctx->exports, exp);
    strata_backend_unref(exp->blk);

    g_autoptr(JsonObject) data = json_object_new();
    json_object_set_string_member(data, "id", exp->id);
    emit_event(ctx, "BLOCK_EXPORT_DELETED", data);

    g_free(exp->id);
    g_free(exp->name);
    g_free(exp->description);
    g_free(exp);
}

StrataExport *strata_export_find(StrataContext *ctx, const char *id)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    for (GList *l = ctx->exports; l; l = l->next) {
        StrataExport *exp = l->data;
        if (!strcmp(exp->id, id)) {
            return exp;
        }
    }
    return NULL;
}

/* The live export a client may pick by @name. */
static StrataExport *export_by_name(StrataContext *ctx, const char *name)
{
    for (GList *l = ctx->exports; l; l = l->next) {
        StrataExport *exp = l->data;
        if (!exp->deleted && !strcmp(exp->name, name)) {
            return exp;
        }
    }
    return NULL;
}

unsigned strata_export_client_count(StrataExport *exp)
{
    g_return_val_if_fail(exp != NULL, 0);
    return g_list_length(exp->clients);
}

static bool export_id_check(const char *id, GError **error)
{
    bool ok = g_ascii_isalpha(id[0]);

    for (const char *p = id; ok && *p; p++) {
        ok = g_ascii_isalnum(*p) || *p == '-' || *p == '_' || *p == '.';
    }
    if (!ok) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid block export id '%s'", id);
    }
    return ok;
}

static const char *const export_types[] = {
    "nbd", "vhost-user-blk", "fuse", "vduse-blk", NULL,
};

static const StrataOptDesc export_options[] = {
    { "type", STRATA_OPT_ENUM, true, export_types },
    { "id", STRATA_OPT_STRING, true, NULL },
    { "node-name", STRATA_OPT_STRING, true, NULL },
    { "writable", STRATA_OPT_BOOL, false, NULL },
    { "writethrough", STRATA_OPT_BOOL, false, NULL },
    { "iothread", STRATA_OPT_STRING, false, NULL },
    { "fixed-iothread", STRATA_OPT_BOOL, false, NULL },
    { "name", STRATA_OPT_STRING, false, NULL },
    { "description", STRATA_OPT_STRING, false, NULL },
    { "bitmaps", STRATA_OPT_ANY, false, NULL },
    { "allocation-depth", STRATA_OPT_BOOL, false, NULL },
    { NULL, 0, false, NULL },
};

static StrataExport *export_add(StrataContext *ctx, JsonObject *options,
                                bool strings_only, GError **error)
{
    const StrataOptDesc *tables[] = { export_options, NULL };
    const char *type, *id, *node_name, *name, *desc;
    StrataExport *exp;
    StrataNode *node;
    uint64_t perm = STRATA_PERM_CONSISTENT_READ;
    g_autofree char *who = NULL;

    if (!strata_opts_validate(options, tables, strings_only, error)) {
        return NULL;
    }
    type = strata_opts_get_string(options, "type", "nbd");
    if (strcmp(type, "nbd") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Export type '%s' is not supported", type);
        return NULL;
    }
    if (strata_opts_has(options, "bitmaps")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Parameter 'bitmaps' is not supported");
        return NULL;
    }
    if (!ctx->nbd_server) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "NBD server not running");
        return NULL;
    }
    id = strata_opts_get_string(options, "id", NULL);
    if (!export_id_check(id, error)) {
        return NULL;
    }
    if (strata_export_find(ctx, id)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Block export id '%s' is already in use", id);
        return NULL;
    }
    node_name = strata_opts_get_string(options, "node-name", NULL);
    node = strata_context_lookup(ctx, node_name);
    if (!node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='' nor node-name='%s'", node_name);
        return NULL;
    }
    name = strata_opts_get_string(options, "name", node_name);
    if (strlen(name) > STRATA_NBD_MAX_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "export name '%s' too long", name);
        return NULL;
    }
    desc = strata_opts_get_string(options, "description", NULL);
    if (desc && strlen(desc) > STRATA_NBD_MAX_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "description '%s' too long", desc);
        return NULL;
    }
    if (export_by_name(ctx, name)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "NBD server already has export named '%s'", name);
        return NULL;
    }

    exp = g_new0(StrataExport, 1);
    exp->writable = strata_opts_get_bool(options, "writable", false);
    if (exp->writable) {
        if (node->read_only) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                        "Block node is read-only");
            g_free(exp);
            return NULL;
        }
        perm |= STRATA_PERM_WRITE;
    }
    who = g_strdup_printf("export '%s'", id);
    /* Exports share everything, as QEMU's: the node may be written or
     * resized by others (a job, a guest) while it is served. */
    exp->blk = strata_backend_new_full(ctx, node, perm, STRATA_PERM_ALL,
                                       who, error);
    if (!exp->blk) {
        g_free(exp);
        return NULL;
    }
    exp->ctx = ctx;
    exp->refcnt = 1;
    exp->id = g_strdup(id);
    exp->name = g_strdup(name);
    exp->description = g_strdup(desc);
    exp->writethrough = strata_opts_get_bool(options, "writethrough", false);
    ctx->exports = g_list_prepend(ctx->exports, exp);
    return exp;
}

StrataExport *strata_export_add(StrataContext *ctx, JsonObject *options,
                                GError **error)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(options != NULL, NULL);
    return export_add(ctx, options, false, error);
}

StrataExport *strata_export_add_keyval(StrataContext *ctx, const char *spec,
                                       GError **error)
{
    g_autoptr(JsonObject) obj = NULL;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(spec != NULL, NULL);
    obj = strata_keyval_parse(spec, "type", error);
    if (!obj) {
        return NULL;
    }
    return export_add(ctx, obj, !strata_keyval_is_json(spec), error);
}

/* Drops the list's reference after kicking every client. */
static void export_delete(StrataExport *exp)
{
    for (GList *l = exp->clients; l; l = l->next) {
        client_kick(l->data);
    }
    if (!exp->deleted) {
        exp->deleted = true;
        export_unref(exp);
    }
}

bool strata_export_del(StrataContext *ctx, const char *id, bool hard,
                       GError **error)
{
    StrataExport *exp;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(id != NULL, false);

    exp = strata_export_find(ctx, id);
    if (!exp) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Export '%s' is not found", id);
        return false;
    }
    if (!hard && exp->clients) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "export '%s' still in use", id);
        return false;
    }
    if (exp->deleted && !hard) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "Block export '%s' is already shutting down", id);
        return false;
    }
    export_delete(exp);
    return true;
}

JsonArray *strata_export_query(StrataContext *ctx)
{
    JsonArray *arr = json_array_new();

    g_return_val_if_fail(ctx != NULL, arr);
    for (GList *l = ctx->exports; l; l = l->next) {
        StrataExport *exp = l->data;
        StrataNode *node = strata_backend_get_node(exp->blk);
        JsonObject *o = json_object_new();

        json_object_set_string_member(o, "id", exp->id);
        json_object_set_string_member(o, "type", "nbd");
        json_object_set_string_member(o, "node-name",
                                      node ? strata_node_get_name(node) : "");
        json_object_set_boolean_member(o, "shutting-down", exp->deleted);
        json_array_add_object_element(arr, o);
    }
    return arr;
}

/* ------------------------------------------------------------------ */
/* Negotiation                                                         */
/* ------------------------------------------------------------------ */

static int co_send_rep(NbdClient *c, uint32_t opt, uint32_t type,
                       const void *data, uint32_t len)
{
    uint8_t hdr[20];
    struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, len } };

    nbd_put64(hdr, STRATA_NBD_REP_MAGIC);
    nbd_put32(hdr + 8, opt);
    nbd_put32(hdr + 12, type);
    nbd_put32(hdr + 16, len);
    return co_writev_full(c, iov, 2);
}

G_GNUC_PRINTF(4, 5)
static int co_send_rep_err(NbdClient *c, uint32_t opt, uint32_t type,
                           const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    return co_send_rep(c, opt, type, msg, strlen(msg));
}

static uint16_t export_tflags(NbdClient *c, StrataExport *exp)
{
    uint16_t f = STRATA_NBD_FLAG_HAS_FLAGS | STRATA_NBD_FLAG_SEND_FLUSH |
                 STRATA_NBD_FLAG_SEND_FUA | STRATA_NBD_FLAG_SEND_CACHE;

    if (exp->writable) {
        f |= STRATA_NBD_FLAG_SEND_TRIM | STRATA_NBD_FLAG_SEND_WRITE_ZEROES |
             STRATA_NBD_FLAG_SEND_FAST_ZERO;
    } else {
        /* Nobody writes through this export: several connections see
         * the same data, whatever they cache. */
        f |= STRATA_NBD_FLAG_READ_ONLY | STRATA_NBD_FLAG_CAN_MULTI_CONN;
    }
    if (c->structured) {
        f |= STRATA_NBD_FLAG_SEND_DF;
    }
    return f;
}

static void client_attach(NbdClient *c, StrataExport *exp)
{
    int64_t len = strata_backend_get_length(exp->blk);

    c->exp = exp;
    exp->refcnt++;
    exp->clients = g_list_append(exp->clients, c);
    c->size = len > 0 ? (uint64_t)len : 0;
    c->tflags = export_tflags(c, exp);
    if (c->meta_export && strcmp(c->meta_export, exp->name) != 0) {
        /* The contexts were negotiated for another export. */
        c->meta_base = c->meta_depth = false;
    }
}

/* NBD_OPT_EXPORT_NAME: no option reply; an unknown name ends the
 * connection, as the protocol leaves no way to say so. */
static int co_opt_export_name(NbdClient *c, const char *name)
{
    StrataExport *exp = export_by_name(c->ctx, name);
    uint8_t buf[10 + STRATA_NBD_EXPORT_NAME_PAD] = { 0 };

    if (!exp) {
        return -ENOENT;
    }
    client_attach(c, exp);
    nbd_put64(buf, c->size);
    nbd_put16(buf + 8, c->tflags);
    return co_write_full(c, buf, c->no_zeroes ? 10 : sizeof(buf));
}

/* NBD_OPT_INFO and NBD_OPT_GO.  Returns 1 when GO chose an export. */
static int co_opt_info(NbdClient *c, uint32_t opt, const uint8_t *p,
                       uint32_t len)
{
    uint32_t namelen;
    uint16_t nreq;
    bool want_name = false, want_desc = false;
    StrataExport *exp;
    int ret;

    if (len < 6 || (namelen = nbd_get32(p)) > len - 6 ||
        namelen > STRATA_NBD_MAX_STRING) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "bad option length");
    }
    nreq = nbd_get16(p + 4 + namelen);
    if (len != 6 + namelen + 2u * nreq) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "bad option length");
    }
    g_autofree char *name = g_strndup((const char *)p + 4, namelen);
    if (strlen(name) != namelen) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "export name contains NUL");
    }
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t what = nbd_get16(p + 6 + namelen + 2 * i);
        want_name |= what == STRATA_NBD_INFO_NAME;
        want_desc |= what == STRATA_NBD_INFO_DESCRIPTION;
    }
    exp = export_by_name(c->ctx, name);
    if (!exp) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_UNKNOWN,
                               "export '%s' not present", name);
    }

    if (want_name) {
        g_autofree uint8_t *b = g_malloc(2 + strlen(exp->name));
        nbd_put16(b, STRATA_NBD_INFO_NAME);
        memcpy(b + 2, exp->name, strlen(exp->name));
        ret = co_send_rep(c, opt, STRATA_NBD_REP_INFO, b,
                          2 + strlen(exp->name));
        if (ret < 0) {
            return ret;
        }
    }
    if (want_desc && exp->description) {
        size_t dl = strlen(exp->description);
        g_autofree uint8_t *b = g_malloc(2 + dl);
        nbd_put16(b, STRATA_NBD_INFO_DESCRIPTION);
        memcpy(b + 2, exp->description, dl);
        ret = co_send_rep(c, opt, STRATA_NBD_REP_INFO, b, 2 + dl);
        if (ret < 0) {
            return ret;
        }
    }
    {
        /* The I/O path pads unaligned requests, so any byte granularity
         * works; 4 KiB is what avoids read-modify-write. */
        uint8_t b[14];
        nbd_put16(b, STRATA_NBD_INFO_BLOCK_SIZE);
        nbd_put32(b + 2, 1);
        nbd_put32(b + 6, 4096);
        nbd_put32(b + 10, STRATA_NBD_MAX_BUFFER);
        ret = co_send_rep(c, opt, STRATA_NBD_REP_INFO, b, sizeof(b));
        if (ret < 0) {
            return ret;
        }
    }
    {
        uint8_t b[12];
        int64_t size = strata_backend_get_length(exp->blk);
        nbd_put16(b, STRATA_NBD_INFO_EXPORT);
        nbd_put64(b + 2, size > 0 ? (uint64_t)size : 0);
        nbd_put16(b + 10, export_tflags(c, exp));
        ret = co_send_rep(c, opt, STRATA_NBD_REP_INFO, b, sizeof(b));
        if (ret < 0) {
            return ret;
        }
    }
    ret = co_send_rep(c, opt, STRATA_NBD_REP_ACK, NULL, 0);
    if (ret < 0) {
        return ret;
    }
    if (opt == STRATA_NBD_OPT_GO) {
        client_attach(c, exp);
        return 1;
    }
    return 0;
}

static int co_opt_list(NbdClient *c, uint32_t len)
{
    int ret;

    if (len != 0) {
        return co_send_rep_err(c, STRATA_NBD_OPT_LIST,
                               STRATA_NBD_REP_ERR_INVALID,
                               "no payload expected");
    }
    /* Oldest first, as they were added. */
    for (GList *l = g_list_last(c->ctx->exports); l; l = l->prev) {
        StrataExport *exp = l->data;
        size_t nl = strlen(exp->name);
        size_t dl = exp->description ? strlen(exp->description) : 0;
        g_autofree uint8_t *b = NULL;

        if (exp->deleted) {
            continue;
        }
        b = g_malloc(4 + nl + dl);
        nbd_put32(b, nl);
        memcpy(b + 4, exp->name, nl);
        if (dl) {
            memcpy(b + 4 + nl, exp->description, dl);
        }
        ret = co_send_rep(c, STRATA_NBD_OPT_LIST, STRATA_NBD_REP_SERVER, b,
                          4 + nl + dl);
        if (ret < 0) {
            return ret;
        }
    }
    return co_send_rep(c, STRATA_NBD_OPT_LIST, STRATA_NBD_REP_ACK, NULL, 0);
}

static int co_send_meta(NbdClient *c, uint32_t opt, uint32_t id,
                        const char *name)
{
    size_t nl = strlen(name);
    uint8_t b[64];

    nbd_put32(b, id);
    memcpy(b + 4, name, nl);
    return co_send_rep(c, opt, STRATA_NBD_REP_META_CONTEXT, b, 4 + nl);
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
static int co_opt_meta(NbdClient *c, uint32_t opt, const uint8_t *p,
                       uint32_t len)
{
    bool set = opt == STRATA_NBD_OPT_SET_META_CONTEXT;
    bool base = false, depth = false;
    uint32_t namelen, nq, pos;
    StrataExport *exp;
    int ret;

    if (set && !c->structured) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "structured replies not negotiated");
    }
    if (len < 8 || (namelen = nbd_get32(p)) > len - 8 ||
        namelen > STRATA_NBD_MAX_STRING) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "bad option length");
    }
    g_autofree char *name = g_strndup((const char *)p + 4, namelen);
    nq = nbd_get32(p + 4 + namelen);
    pos = 8 + namelen;
    exp = export_by_name(c->ctx, name);
    if (!exp) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_UNKNOWN,
                               "export '%s' not present", name);
    }
    if (nq == 0 && !set) {
        base = depth = true;
    }
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t ql;
        if (len - pos < 4 || (ql = nbd_get32(p + pos)) > len - pos - 4) {
            return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                                   "bad option length");
        }
        g_autofree char *q = g_strndup((const char *)p + pos + 4, ql);
        pos += 4 + ql;
        if (!strcmp(q, STRATA_NBD_META_BASE_ALLOCATION) ||
            (!set && !strcmp(q, "base:"))) {
            base = true;
        } else if (!strcmp(q, STRATA_NBD_META_ALLOCATION_DEPTH) ||
                   (!set && !strcmp(q, "qemu:"))) {
            depth = true;
        }
        /* Other namespaces and names: nothing to offer, not an error. */
    }
    if (pos != len) {
        return co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                               "bad option length");
    }
    if (base) {
        ret = co_send_meta(c, opt, STRATA_NBD_META_ID_BASE_ALLOCATION,
                           STRATA_NBD_META_BASE_ALLOCATION);
        if (ret < 0) {
            return ret;
        }
    }
    if (depth) {
        ret = co_send_meta(c, opt, STRATA_NBD_META_ID_ALLOCATION_DEPTH,
                           STRATA_NBD_META_ALLOCATION_DEPTH);
        if (ret < 0) {
            return ret;
        }
    }
    if (set) {
        c->meta_base = base;
        c->meta_depth = depth;
        g_free(c->meta_export);
        c->meta_export = g_strdup(exp->name);
    }
    return co_send_rep(c, opt, STRATA_NBD_REP_ACK, NULL, 0);
}

/* Runs the handshake; 0 once an export is chosen, -errno to hang up. */
static int co_negotiate(NbdClient *c)
{
    uint8_t hello[18];
    uint8_t hdr[16];
    uint32_t cflags;
    int ret;

    nbd_put64(hello, STRATA_NBD_INIT_MAGIC);
    nbd_put64(hello + 8, STRATA_NBD_OPTS_MAGIC);
    nbd_put16(hello + 16, STRATA_NBD_FLAG_FIXED_NEWSTYLE |
                      STRATA_NBD_FLAG_NO_ZEROES);
    ret = co_write_full(c, hello, sizeof(hello));
    if (ret < 0) {
        return ret;
    }
    ret = co_read_full(c, hdr, 4);
    if (ret < 0) {
        return ret;
    }
    cflags = nbd_get32(hdr);
    if (!(cflags & STRATA_NBD_CFLAG_FIXED_NEWSTYLE) ||
        (cflags & ~(STRATA_NBD_CFLAG_FIXED_NEWSTYLE |
                    STRATA_NBD_CFLAG_NO_ZEROES))) {
        return -EINVAL;
    }
    c->no_zeroes = cflags & STRATA_NBD_CFLAG_NO_ZEROES;

    for (;;) {
        uint32_t opt, len;
        g_autofree uint8_t *data = NULL;

        ret = co_read_full(c, hdr, sizeof(hdr));
        if (ret < 0) {
            return ret;
        }
        if (nbd_get64(hdr) != STRATA_NBD_OPTS_MAGIC) {
            return -EINVAL;
        }
        opt = nbd_get32(hdr + 8);
        len = nbd_get32(hdr + 12);
        if (len > NBD_MAX_OPTION) {
            if (opt == STRATA_NBD_OPT_EXPORT_NAME) {
                return -EINVAL;
            }
            ret = co_skip(c, len);
            if (ret == 0) {
                ret = co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_TOO_BIG,
                                      "option too long");
            }
            if (ret < 0) {
                return ret;
            }
            continue;
        }
        data = g_malloc(len + 1);
        ret = co_read_full(c, data, len);
        if (ret < 0) {
            return ret;
        }
        data[len] = 0;

        switch (opt) {
        case STRATA_NBD_OPT_EXPORT_NAME:
            if (len > STRATA_NBD_MAX_STRING || strlen((char *)data) != len) {
                return -EINVAL;
            }
            return co_opt_export_name(c, (const char *)data);
        case STRATA_NBD_OPT_ABORT:
            co_send_rep(c, opt, STRATA_NBD_REP_ACK, NULL, 0);
            return -ECONNABORTED;
        case STRATA_NBD_OPT_LIST:
            ret = co_opt_list(c, len);
            break;
        case STRATA_NBD_OPT_INFO:
        case STRATA_NBD_OPT_GO:
            ret = co_opt_info(c, opt, data, len);
            if (ret == 1) {
                return 0;
            }
            break;
        case STRATA_NBD_OPT_STRUCTURED_REPLY:
            if (len != 0) {
                ret = co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                                      "no payload expected");
            } else if (c->structured) {
                ret = co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_INVALID,
                                      "structured reply already "
                                      "negotiated");
            } else {
                c->structured = true;
                ret = co_send_rep(c, opt, STRATA_NBD_REP_ACK, NULL, 0);
            }
            break;
        case STRATA_NBD_OPT_LIST_META_CONTEXT:
        case STRATA_NBD_OPT_SET_META_CONTEXT:
            ret = co_opt_meta(c, opt, data, len);
            break;
        case STRATA_NBD_OPT_STARTTLS:
            ret = co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_POLICY,
                                  "TLS not configured");
            break;
        default:
            ret = co_send_rep_err(c, opt, STRATA_NBD_REP_ERR_UNSUP,
                                  "unsupported option %" PRIu32, opt);
            break;
        }
        if (ret < 0) {
            return ret;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Transmission                                                        */
/* ------------------------------------------------------------------ */

static uint32_t errno_to_nbd(int err)
{
    switch (err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
        return STRATA_NBD_EPERM;
    case EIO:
        return STRATA_NBD_EIO;
    case ENOMEM:
        return STRATA_NBD_ENOMEM;
    case ENOSPC:
    case EFBIG:
        return STRATA_NBD_ENOSPC;
    case EOVERFLOW:
        return STRATA_NBD_EOVERFLOW;
    case ENOTSUP:
        return STRATA_NBD_ENOTSUP;
    case ESHUTDOWN:
    case ENOMEDIUM:
        return STRATA_NBD_ESHUTDOWN;
    default:
        return STRATA_NBD_EINVAL;
    }
}

/* Checks flags, permission and range; returns -errno for the reply. */
static int request_check(NbdClient *c, NbdRequest *r)
{
    uint16_t allowed = 0;
    bool write = false, ranged = true;

    switch (r->type) {
    case STRATA_NBD_CMD_READ:
        allowed = c->structured ? STRATA_NBD_CMD_FLAG_DF : 0;
        if (r->len > STRATA_NBD_MAX_BUFFER) {
            return -EINVAL;
        }
        break;
    case STRATA_NBD_CMD_WRITE:
        allowed = STRATA_NBD_CMD_FLAG_FUA;
        write = true;
        break;
    case STRATA_NBD_CMD_FLUSH:
        ranged = false;
        break;
    case STRATA_NBD_CMD_TRIM:
        allowed = STRATA_NBD_CMD_FLAG_FUA;
        write = true;
        break;
    case STRATA_NBD_CMD_CACHE:
        break;
    case STRATA_NBD_CMD_WRITE_ZEROES:
        allowed = STRATA_NBD_CMD_FLAG_FUA | STRATA_NBD_CMD_FLAG_NO_HOLE |
                  STRATA_NBD_CMD_FLAG_FAST_ZERO;
        write = true;
        break;
    case STRATA_NBD_CMD_BLOCK_STATUS:
        if (!c->structured || !(c->meta_base || c->meta_depth)) {
            return -EINVAL;
        }
        allowed = STRATA_NBD_CMD_FLAG_REQ_ONE;
        break;
    default:
        return -EINVAL;
    }
    if (r->flags & ~allowed) {
        return -EINVAL;
    }
    if (write && !c->exp->writable) {
        return -EPERM;
    }
    if (ranged && (r->offset > c->size || r->len > c->size - r->offset)) {
        return (r->type == STRATA_NBD_CMD_WRITE ||
                r->type == STRATA_NBD_CMD_WRITE_ZEROES) ? -ENOSPC : -EINVAL;
    }
    return 0;
}

static void chunk_header(uint8_t *hdr, NbdRequest *r, uint16_t flags,
                         uint16_t type, uint32_t len)
{
    nbd_put32(hdr, STRATA_NBD_STRUCTURED_REPLY_MAGIC);
    nbd_put16(hdr + 4, flags);
    nbd_put16(hdr + 6, type);
    nbd_put64(hdr + 8, r->cookie);
    nbd_put32(hdr + 16, len);
}

/*
 * Lays out the reply to @r, whose result is @ret, in r->rhdr / r->riov:
 * with @chunked (READ and BLOCK_STATUS on a structured connection) one
 * final chunk — the data in one piece (so DF is honoured trivially), a
 * hole for a READ of zeroes (r->hole), an empty one, or an error with
 * its message; else a simple reply, with the data of a successful READ.
 */
static void reply_prepare(NbdRequest *r, int ret, bool chunked)
{
    uint8_t *h = r->rhdr;

    r->rniov = 2;
    r->riov[0].iov_base = h;
    r->riov[1] = (struct iovec){ NULL, 0 };
    if (!chunked) {
        nbd_put32(h, STRATA_NBD_SIMPLE_REPLY_MAGIC);
        nbd_put32(h + 4, errno_to_nbd(-ret));
        nbd_put64(h + 8, r->cookie);
        r->riov[0].iov_len = STRATA_NBD_SIMPLE_REPLY_SIZE;
        if (ret == 0 && r->type == STRATA_NBD_CMD_READ) {
            r->riov[1] = (struct iovec){ r->buf, r->len };
        }
    } else if (ret < 0) {
        const char *msg = g_strerror(-ret);
        uint16_t ml = MIN(strlen(msg), 256);

        chunk_header(h, r, STRATA_NBD_REPLY_FLAG_DONE,
                     STRATA_NBD_REPLY_TYPE_ERROR, 6 + ml);
        nbd_put32(h + 20, errno_to_nbd(-ret));
        nbd_put16(h + 24, ml);
        r->riov[0].iov_len = STRATA_NBD_CHUNK_HEADER_SIZE + 6;
        r->riov[1] = (struct iovec){ (void *)msg, ml };
    } else if (r->len == 0 || r->type != STRATA_NBD_CMD_READ) {
        chunk_header(h, r, STRATA_NBD_REPLY_FLAG_DONE,
                     STRATA_NBD_REPLY_TYPE_NONE, 0);
        r->riov[0].iov_len = STRATA_NBD_CHUNK_HEADER_SIZE;
    } else if (r->hole) {
        chunk_header(h, r, STRATA_NBD_REPLY_FLAG_DONE,
                     STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, 12);
        nbd_put64(h + 20, r->offset);
        nbd_put32(h + 28, r->len);
        r->riov[0].iov_len = STRATA_NBD_CHUNK_HEADER_SIZE + 12;
    } else {
        chunk_header(h, r, STRATA_NBD_REPLY_FLAG_DONE,
                     STRATA_NBD_REPLY_TYPE_OFFSET_DATA, 8 + r->len);
        nbd_put64(h + 20, r->offset);
        r->riov[0].iov_len = STRATA_NBD_CHUNK_HEADER_SIZE + 8;
        r->riov[1] = (struct iovec){ r->buf, r->len };
    }
}

/*
 * The replies of one loop iteration leave together: the first queued
 * reply schedules this sender for the next dispatch, by which time the
 * other requests that completed in the same batch of I/O completions
 * have queued theirs, and one sendmsg carries them all (fewer system
 * calls here, fewer wake-ups in the client).
 */
static void reply_sender_co(void *opaque)
{
    NbdClient *c = opaque;

    strata_co_mutex_lock(&c->send_lock);
    while (c->out_head) {
        struct iovec iov[STRATA_NBD_MAX_IOV];
        NbdRequest *first = c->out_head, *r;
        int n = 0, ret;

        for (r = first; r && n + r->rniov <= STRATA_NBD_MAX_IOV;
             r = r->next_out) {
            memcpy(iov + n, r->riov, r->rniov * sizeof(*iov));
            n += r->rniov;
        }
        c->out_head = r;
        if (!r) {
            c->out_tail = &c->out_head;
        }
        ret = co_writev_full(c, iov, n);
        for (NbdRequest *q = first, *next; q != r; q = next) {
            next = q->next_out;
            q->sent = true;
            q->send_ret = ret;
            if (q->waiter) {
                StrataCoroutine *co = q->waiter;
                q->waiter = NULL;
                strata_coroutine_wake(co);
            }
        }
    }
    c->sender_scheduled = false;
    strata_co_mutex_unlock(&c->send_lock);
}

/* Coroutine only: queues @r's prepared reply and waits until it is sent
 * (its buffer is part of it). */
static int co_send_reply(NbdClient *c, NbdRequest *r)
{
    r->next_out = NULL;
    *c->out_tail = r;
    c->out_tail = &r->next_out;
    if (!c->sender_scheduled) {
        c->sender_scheduled = true;
        strata_loop_schedule_co(c->ctx->loop,
                                strata_coroutine_new(reply_sender_co, c));
    }
    while (!r->sent) {
        r->waiter = strata_coroutine_self();
        strata_co_yield();
    }
    return r->send_ret;
}

/* Waits while a graph change drains the node: block status goes to the
 * node directly, not through the backend that would hold it back. */
static StrataNode *co_status_node_begin(NbdClient *c)
{
    StrataNode *node;

    while ((node = strata_backend_get_node(c->exp->blk)) &&
           node->quiesce_counter) {
        strata_loop_co_sleep_ns(c->ctx->loop, 1000 * 1000);
    }
    if (node) {
        strata_node_inc_in_flight(node);
    }
    return node;
}

/* Collects the extents of one context into @ext (pairs of u32 length,
 * u32 flags in host order). */
static int co_collect_extents(StrataNode *node, NbdRequest *r, bool depth_ctx,
                              GArray *ext)
{
    uint64_t off = r->offset, end = r->offset + r->len;
    bool one = r->flags & STRATA_NBD_CMD_FLAG_REQ_ONE;

    while (off < end) {
        uint64_t pnum = 0;
        int depth = 0;
        uint32_t flags;
        int ret = strata_node_co_block_status_above(node, NULL, !depth_ctx,
                                                    off, end - off, &pnum,
                                                    NULL, NULL, &depth);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            break;
        }
        pnum = MIN(pnum, end - off);
        if (depth_ctx) {
            flags = (ret & STRATA_BLOCK_ALLOCATED) ? (uint32_t)depth + 1 : 0;
        } else {
            flags = ((ret & STRATA_BLOCK_DATA) ? 0 : STRATA_NBD_STATE_HOLE) |
                    (strata_node_status_reads_zero(node, ret)
                     ? STRATA_NBD_STATE_ZERO : 0);
        }
        if (ext->len && g_array_index(ext, uint32_t, ext->len - 1) == flags) {
            /* Same status: extend the last extent (the whole request
             * fits in 32 bits, so the sum does too). */
            g_array_index(ext, uint32_t, ext->len - 2) += (uint32_t)pnum;
        } else {
            if ((one && ext->len) || ext->len / 2 >= NBD_MAX_EXTENTS) {
                break;
            }
            uint32_t pair[2] = { (uint32_t)pnum, flags };
            g_array_append_vals(ext, pair, 2);
        }
        off += pnum;
    }
    return 0;
}

static int co_block_status(NbdClient *c, NbdRequest *r)
{
    g_autoptr(GArray) base = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    g_autoptr(GArray) depth = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    StrataNode *node = co_status_node_begin(c);
    int ret = 0;

    if (!node) {
        ret = -ESHUTDOWN;
    }
    if (ret == 0 && c->meta_base) {
        ret = co_collect_extents(node, r, false, base);
    }
    if (ret == 0 && c->meta_depth) {
        ret = co_collect_extents(node, r, true, depth);
    }
    if (node) {
        strata_node_dec_in_flight(node);
    }

    strata_co_mutex_lock(&c->send_lock);
    if (ret < 0) {
        reply_prepare(r, ret, true);
        ret = co_writev_full(c, r->riov, r->rniov);
    } else {
        struct { GArray *ext; uint32_t id; bool on; } parts[2] = {
            { base, STRATA_NBD_META_ID_BASE_ALLOCATION, c->meta_base },
            { depth, STRATA_NBD_META_ID_ALLOCATION_DEPTH, c->meta_depth },
        };
        for (int i = 0; i < 2 && ret == 0; i++) {
            bool last = i == 1 || !parts[1].on;
            GArray *ext = parts[i].ext;
            uint8_t hdr[STRATA_NBD_CHUNK_HEADER_SIZE + 4];
            g_autofree uint8_t *body = NULL;
            struct iovec iov[2];

            if (!parts[i].on) {
                continue;
            }
            body = g_malloc(ext->len * 4 + 1);
            for (guint k = 0; k < ext->len; k++) {
                nbd_put32(body + 4 * k, g_array_index(ext, uint32_t, k));
            }
            chunk_header(hdr, r, last ? STRATA_NBD_REPLY_FLAG_DONE : 0,
                         STRATA_NBD_REPLY_TYPE_BLOCK_STATUS,
                         4 + ext->len * 4);
            nbd_put32(hdr + 20, parts[i].id);
            iov[0] = (struct iovec){ hdr, sizeof(hdr) };
            iov[1] = (struct iovec){ body, ext->len * 4 };
            ret = co_writev_full(c, iov, 2);
        }
    }
    strata_co_mutex_unlock(&c->send_lock);
    return ret;
}

/* Whether what @node reads as zero is known without I/O: a format that
 * keeps its map in memory, or null-co, seen through filters and through
 * raw (whose status is its file's).  A raw file answers with lseeks in
 * a worker thread, which every read would then wait for (QEMU pays
 * them); its reads send their bytes, zeroes included. */
static bool zero_status_is_cheap(StrataNode *node)
{
    const char *drv;

    node = strata_node_status_source(node);
    drv = node ? strata_node_get_driver_name(node) : "";
    return !strcmp(drv, "qcow2") || !strcmp(drv, "null-co");
}

/*
 * A structured READ without DF (the client takes chunks) of a range the
 * node reads as zeroes through its whole chain is answered with one
 * hole chunk, as QEMU's server answers it: no read, 32 bytes on the
 * wire instead of the zeroes.  Ranges that mix data and zeroes are read
 * and sent whole.
 */
static bool co_read_is_hole(NbdClient *c, NbdRequest *r)
{
    uint64_t off = r->offset, end = r->offset + r->len;
    StrataNode *node;
    bool hole = true;

    if (!c->structured || (r->flags & STRATA_NBD_CMD_FLAG_DF) ||
        r->len == 0) {
        return false;
    }
    node = co_status_node_begin(c);
    if (!node) {
        return false;
    }
    if (!zero_status_is_cheap(node)) {
        hole = false;
    }
    while (hole && off < end) {
        uint64_t pnum = 0;
        int st = strata_node_co_block_status_above(node, NULL, false, off,
                                                   end - off, &pnum, NULL,
                                                   NULL, NULL);

        hole = st >= 0 && pnum > 0 &&
               strata_node_status_reads_zero(node, st);
        off += pnum;
    }
    strata_node_dec_in_flight(node);
    return hole;
}

/* Does the I/O of @r; 0 or -errno for the reply. */
static int co_do_request(NbdClient *c, NbdRequest *r)
{
    StrataBackend *blk = c->exp->blk;
    StrataReqFlags fua = ((r->flags & STRATA_NBD_CMD_FLAG_FUA) ||
                          c->exp->writethrough) ? STRATA_REQ_FUA : 0;
    int ret;

    switch (r->type) {
    case STRATA_NBD_CMD_READ:
        r->hole = co_read_is_hole(c, r);
        return r->len && !r->hole
               ? strata_backend_co_pread(blk, r->offset, r->buf, r->len)
               : 0;
    case STRATA_NBD_CMD_WRITE:
        return r->len ? strata_backend_co_pwrite(blk, r->offset, r->buf,
                                                 r->len, fua) : 0;
    case STRATA_NBD_CMD_FLUSH:
        return strata_backend_co_flush(blk);
    case STRATA_NBD_CMD_TRIM:
        ret = r->len ? strata_backend_co_pdiscard(blk, r->offset, r->len) : 0;
        if (ret == 0 && fua) {
            ret = strata_backend_co_flush(blk);
        }
        return ret;
    case STRATA_NBD_CMD_CACHE:
        /* A hint; nothing to prefetch into. */
        return 0;
    case STRATA_NBD_CMD_WRITE_ZEROES: {
        StrataReqFlags f = fua;
        if (!(r->flags & STRATA_NBD_CMD_FLAG_NO_HOLE)) {
            f |= STRATA_REQ_MAY_UNMAP;
        }
        if (r->flags & STRATA_NBD_CMD_FLAG_FAST_ZERO) {
            f |= STRATA_REQ_NO_FALLBACK;
        }
        return r->len ? strata_backend_co_pwrite_zeroes(blk, r->offset,
                                                        r->len, f) : 0;
    }
    default:
        return -EINVAL;
    }
}

/* Buffers of a power-of-two size are kept per connection for the next
 * request: large ones would otherwise come from mmap() each time, and
 * every page of them would fault and be zeroed on first touch. */
static size_t buf_class(uint32_t len)
{
    size_t sz = 4096;

    while (sz < len) {
        sz <<= 1;
    }
    return sz;
}

static void *client_buf_get(NbdClient *c, uint32_t len)
{
    size_t sz = buf_class(len);
    void *buf = NULL;

    for (int i = 0; i < NBD_BUF_CACHE; i++) {
        if (c->bufs[i] && c->buf_sizes[i] == sz) {
            buf = c->bufs[i];
            c->bufs[i] = NULL;
            c->buf_total -= sz;
            return buf;
        }
    }
    return posix_memalign(&buf, 4096, sz) == 0 ? buf : NULL;
}

static void client_buf_drop(NbdClient *c, int slot)
{
    free(c->bufs[slot]);
    c->bufs[slot] = NULL;
    c->buf_total -= c->buf_sizes[slot];
}

static void client_buf_put(NbdClient *c, void *buf, uint32_t len)
{
    size_t sz = buf_class(len);
    int slot = -1;

    if (!buf || sz > NBD_BUF_CACHE_MAX) {
        free(buf);
        return;
    }
    /* Over the byte budget, or out of slots: entries go in turn, so a
     * size no longer asked for does not stay forever. */
    for (int n = 0; n < NBD_BUF_CACHE &&
         c->buf_total + sz > NBD_BUF_CACHE_TOTAL; n++) {
        int old = c->buf_next++ % NBD_BUF_CACHE;
        if (c->bufs[old]) {
            client_buf_drop(c, old);
        }
    }
    for (int i = 0; i < NBD_BUF_CACHE && slot < 0; i++) {
        if (!c->bufs[i]) {
            slot = i;
        }
    }
    if (slot < 0) {
        slot = c->buf_next++ % NBD_BUF_CACHE;
        client_buf_drop(c, slot);
    }
    c->bufs[slot] = buf;
    c->buf_sizes[slot] = sz;
    c->buf_total += sz;
}

static void request_free(NbdRequest *r)
{
    client_buf_put(r->client, r->buf, r->len);
    g_free(r);
}

static void request_co(void *opaque)
{
    NbdRequest *r = opaque;
    NbdClient *c = r->client;
    int ret = r->err;

    if (r->type == STRATA_NBD_CMD_BLOCK_STATUS && ret == 0) {
        co_block_status(c, r);
    } else {
        if (ret == 0) {
            ret = co_do_request(c, r);
        }
        reply_prepare(r, ret, c->structured &&
                      (r->type == STRATA_NBD_CMD_READ ||
                       r->type == STRATA_NBD_CMD_BLOCK_STATUS));
        co_send_reply(c, r);
    }
    /* A failed send means the client is gone; the receiver notices. */
    c->req_bytes -= r->buf ? r->len : 0;
    request_free(r);
    c->nreqs--;
    strata_co_queue_next(&c->reqs_wait);
}

/* Reads requests until the client disconnects or misbehaves. */
static void co_transmission(NbdClient *c)
{
    uint8_t hdr[STRATA_NBD_REQUEST_SIZE];
    unsigned started = 0;       /* since the loop's last turn */

    while (!c->closing) {
        NbdRequest *r;

        while (c->nreqs >= NBD_MAX_REQS) {
            strata_co_queue_wait(&c->reqs_wait, NULL);
        }
        if (co_read_full(c, hdr, sizeof(hdr)) < 0) {
            return;
        }
        if (nbd_get32(hdr) != STRATA_NBD_REQUEST_MAGIC) {
            return;
        }
        r = g_new0(NbdRequest, 1);
        r->client = c;
        r->flags = nbd_get16(hdr + 4);
        r->type = nbd_get16(hdr + 6);
        r->cookie = nbd_get64(hdr + 8);
        r->offset = nbd_get64(hdr + 16);
        r->len = nbd_get32(hdr + 24);

        if (r->type == STRATA_NBD_CMD_DISC) {
            g_free(r);
            return;
        }
        if (r->type == STRATA_NBD_CMD_WRITE) {
            /* The payload must be read to stay in step; one too large
             * to buffer ends the connection. */
            if (r->len > STRATA_NBD_MAX_BUFFER) {
                g_free(r);
                return;
            }
        }
        r->err = request_check(c, r);
        if ((r->type == STRATA_NBD_CMD_WRITE ||
             (r->type == STRATA_NBD_CMD_READ && r->err == 0)) && r->len) {
            while (c->nreqs && c->req_bytes + r->len > NBD_MAX_REQ_BYTES) {
                strata_co_queue_wait(&c->reqs_wait, NULL);
            }
            r->buf = client_buf_get(c, r->len);
            if (!r->buf) {
                g_free(r);
                return;
            }
        }
        if (r->type == STRATA_NBD_CMD_WRITE &&
            co_read_full(c, r->buf, r->len) < 0) {
            request_free(r);
            return;
        }
        c->nreqs++;
        c->req_bytes += r->buf ? r->len : 0;
        strata_coroutine_enter(strata_coroutine_new(request_co, r));
        if (++started == NBD_REQS_PER_TURN) {
            started = 0;
            strata_loop_co_yield_now(c->ctx->loop);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Connections                                                         */
/* ------------------------------------------------------------------ */

static void client_free_bh(void *opaque)
{
    NbdClient *c = opaque;

    if (c->server) {
        c->server->clients = g_list_remove(c->server->clients, c);
    }
    strata_nbd_watch_free(c->watch);
    g_io_stream_close(G_IO_STREAM(c->conn), NULL, NULL);
    g_object_unref(c->conn);
    g_free(c->meta_export);
    for (int i = 0; i < NBD_BUF_CACHE; i++) {
        free(c->bufs[i]);
    }
    if (c->exp) {
        StrataExport *exp = c->exp;
        exp->clients = g_list_remove(exp->clients, c);
        c->exp = NULL;
        export_unref(exp);
    }
    g_free(c);
}

static void client_co(void *opaque)
{
    NbdClient *c = opaque;

    if (co_negotiate(c) == 0 && c->exp) {
        co_transmission(c);
    }
    c->closing = true;
    while (c->nreqs) {
        strata_co_queue_wait(&c->reqs_wait, NULL);
    }
    /* Freeing may drop the export's last reference, which unrefs a
     * backend: that is plain code's work. */
    strata_loop_call_soon(c->ctx->loop, client_free_bh, c);
}

static gboolean on_incoming(GSocketService *service, GSocketConnection *conn,
                            GObject *source, gpointer opaque)
{
    StrataNbdServer *server = opaque;
    NbdClient *c;

    if (server->max_connections &&
        g_list_length(server->clients) >= server->max_connections) {
        /* Returning drops the service's reference: the socket closes. */
        return TRUE;
    }
    c = g_new0(NbdClient, 1);
    c->ctx = server->ctx;
    c->server = server;
    c->conn = g_object_ref(conn);
    c->fd = g_socket_get_fd(g_socket_connection_get_socket(conn));
    strata_nbd_sock_tune(c->fd);
    c->watch = strata_nbd_watch_new(c->ctx->loop, c->fd);
    strata_co_mutex_init(&c->send_lock);
    c->out_tail = &c->out_head;
    strata_co_queue_init(&c->reqs_wait);
    server->clients = g_list_prepend(server->clients, c);
    strata_coroutine_enter(strata_coroutine_new(client_co, c));
    return TRUE;
}

/* ------------------------------------------------------------------ */
/* Server                                                              */
/* ------------------------------------------------------------------ */

bool strata_nbd_server_running(StrataContext *ctx)
{
    g_return_val_if_fail(ctx != NULL, false);
    return ctx->nbd_server != NULL;
}

bool strata_nbd_server_start(StrataContext *ctx, GSocketAddress *addr,
                             unsigned max_connections, GError **error)
{
    GMainContext *mctx;
    StrataNbdServer *server;
    bool ok;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(G_IS_SOCKET_ADDRESS(addr), false);

    if (ctx->nbd_server) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "NBD server already running");
        return false;
    }
    server = g_new0(StrataNbdServer, 1);
    server->ctx = ctx;
    server->max_connections = max_connections;
    if (G_IS_UNIX_SOCKET_ADDRESS(addr) &&
        g_unix_socket_address_get_address_type(G_UNIX_SOCKET_ADDRESS(addr)) ==
            G_UNIX_SOCKET_ADDRESS_PATH) {
        server->unix_path = g_strdup(
            g_unix_socket_address_get_path(G_UNIX_SOCKET_ADDRESS(addr)));
        /* A socket left by a previous run would make bind() fail. */
        GStatBuf st;
        if (g_lstat(server->unix_path, &st) == 0 && S_ISSOCK(st.st_mode)) {
            g_unlink(server->unix_path);
        }
    }

    /* The service accepts from the thread-default context current when
     * it starts: make that the loop's. */
    mctx = strata_loop_get_context(ctx->loop);
    g_main_context_push_thread_default(mctx);
    server->service = g_socket_service_new();
    ok = g_socket_listener_add_address(G_SOCKET_LISTENER(server->service),
                                       addr, G_SOCKET_TYPE_STREAM,
                                       G_SOCKET_PROTOCOL_DEFAULT, NULL, NULL,
                                       error);
    if (ok) {
        server->incoming_id = g_signal_connect(server->service, "incoming",
                                               G_CALLBACK(on_incoming),
                                               server);
        g_socket_service_start(server->service);
    }
    g_main_context_pop_thread_default(mctx);
    if (!ok) {
        g_prefix_error(error, "Failed to listen: ");
        g_object_unref(server->service);
        g_free(server->unix_path);
        g_free(server);
        return false;
    }
    ctx->nbd_server = server;
    return true;
}

static GSocketAddress *legacy_addr(JsonObject *addr, GError **error)
{
    const char *type = NULL;
    JsonObject *data = NULL;

    if (json_object_has_member(addr, "type") &&
        JSON_NODE_HOLDS_VALUE(json_object_get_member(addr, "type"))) {
        type = json_object_get_string_member(addr, "type");
    }
    if (json_object_has_member(addr, "data") &&
        JSON_NODE_HOLDS_OBJECT(json_object_get_member(addr, "data"))) {
        data = json_object_get_object_member(addr, "data");
    }
    if (!type || !data) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'addr.%s' is missing", type ? "data" : "type");
        return NULL;
    }
    if (!strcmp(type, "unix")) {
        const char *path = strata_opts_get_string(data, "path", NULL);
        bool abstract = strata_opts_get_bool(data, "abstract", false);
        bool tight = strata_opts_get_bool(data, "tight", true);
        if (!path) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'addr.data.path' is missing");
            return NULL;
        }
        if (abstract) {
            return g_unix_socket_address_new_with_type(
                path, -1, tight ? G_UNIX_SOCKET_ADDRESS_ABSTRACT
                                : G_UNIX_SOCKET_ADDRESS_ABSTRACT_PADDED);
        }
        return g_unix_socket_address_new(path);
    }
    if (!strcmp(type, "inet")) {
        const char *host = strata_opts_get_string(data, "host", NULL);
        const char *port = strata_opts_get_string(data, "port", NULL);
        g_autoptr(GSocketConnectable) conn = NULL;
        g_autoptr(GSocketAddressEnumerator) en = NULL;
        guint64 pnum;

        if (!host || !port) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'addr.data.%s' is missing",
                        host ? "port" : "host");
            return NULL;
        }
        if (!g_ascii_string_to_unsigned(port, 10, 0, 65535, &pnum, NULL)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Invalid port '%s'", port);
            return NULL;
        }
        /* A host name resolves at start, as QEMU resolves it. */
        conn = g_network_address_new(host, (guint16)pnum);
        en = g_socket_connectable_enumerate(conn);
        GSocketAddress *sa = g_socket_address_enumerator_next(en, NULL,
                                                              error);
        if (!sa && error && !*error) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "address resolution failed for %s:%s", host, port);
        }
        return sa;
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                "NBD server address type '%s' is not supported", type);
    return NULL;
}

bool strata_nbd_server_start_legacy(StrataContext *ctx, JsonObject *addr,
                                    int64_t max_connections, GError **error)
{
    g_autoptr(GSocketAddress) sa = NULL;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(addr != NULL, false);
    if (ctx->nbd_server) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "NBD server already running");
        return false;
    }
    if (max_connections < 0 || max_connections > UINT32_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'max-connections' expects uint32_t");
        return false;
    }
    sa = legacy_addr(addr, error);
    if (!sa) {
        return false;
    }
    return strata_nbd_server_start(ctx, sa, (unsigned)max_connections,
                                   error);
}

/* Waits until every client of @server has gone. */
static void wait_clients_gone(StrataContext *ctx, StrataNbdServer *server)
{
    while (server->clients) {
        if (strata_in_coroutine()) {
            strata_loop_co_sleep_ns(ctx->loop, 1000 * 1000);
        } else {
            strata_loop_iterate(ctx->loop, true);
        }
    }
}

bool strata_nbd_server_stop(StrataContext *ctx, GError **error)
{
    StrataNbdServer *server;

    g_return_val_if_fail(ctx != NULL, false);
    server = ctx->nbd_server;
    if (!server) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "NBD server not running");
        return false;
    }
    /* Stop accepting first, so nobody connects while we tear down. */
    g_signal_handler_disconnect(server->service, server->incoming_id);
    g_socket_service_stop(server->service);
    g_socket_listener_close(G_SOCKET_LISTENER(server->service));

    for (GList *l = ctx->exports, *next; l; l = next) {
        next = l->next;
        export_delete(l->data);
    }
    /* Clients still negotiating hold no export but the server. */
    for (GList *l = server->clients; l; l = l->next) {
        client_kick(l->data);
    }
    wait_clients_gone(ctx, server);

    ctx->nbd_server = NULL;
    g_object_unref(server->service);
    if (server->unix_path) {
        g_unlink(server->unix_path);
        g_free(server->unix_path);
    }
    g_free(server);
    return true;
}

void strata_exports_shutdown(StrataContext *ctx)
{
    if (ctx->nbd_server) {
        strata_nbd_server_stop(ctx, NULL);
    }
    /* Without a server nothing can be connected; delete what is left. */
    for (GList *l = ctx->exports, *next; l; l = next) {
        next = l->next;
        export_delete(l->data);
    }
    while (ctx->exports) {
        strata_loop_iterate(ctx->loop, true);
    }
}
