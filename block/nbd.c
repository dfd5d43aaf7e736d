/* strata — the NBD client driver: a node whose data lives on an NBD
 * server (qemu-nbd, qemu-storage-daemon, another strata).
 *
 * One connection per node, non-blocking, on the context's GMainContext.
 * Negotiation (fixed newstyle, structured replies, base:allocation, GO)
 * runs in a coroutine while open() iterates the loop, so a server living
 * in the same process keeps being served.  After that one reader
 * coroutine owns the receiving side: it reads each reply header, finds
 * the request by its cookie and stores the payload straight into that
 * request's buffers (a streamed read's goes through a small staging
 * buffer to its sink, piece by piece, on a worker thread where the sink
 * allows it), then wakes the request's coroutine.  Senders take
 * turns under a send lock, so many requests are in flight at once.
 *
 * The server is not trusted: every length, offset and count it sends is
 * checked, and a reply that breaks the protocol ends the connection for
 * good; requests in flight then fail with -EIO.
 *
 * A connection that is merely lost (EOF, reset, a failed send) is
 * re-established by a background coroutine, as QEMU's driver does: for
 * reconnect-delay seconds requests (those in flight included) wait and
 * are then sent again on the new connection; past the delay, or without
 * one, they fail with -EIO at once while the reconnecting goes on, so a
 * server that comes back later serves later requests.  Nothing blocks the
 * loop: connect, handshake and backoff all yield.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib-unix.h>
#include <gio/gio.h>
#include <gio/gunixsocketaddress.h>

#include "drivers-private.h"
#include "nbd-proto.h"

/* Requests in flight on one connection: as many as strata's server
 * takes at once.  QEMU's server reads 16 and leaves the rest in the
 * socket until those end, which costs nothing more than waiting here. */
#define NBD_MAX_REQS STRATA_NBD_SERVER_MAX_REQS
/* Option replies we read whole; larger ones are skipped or refused. */
#define NBD_MAX_OPT_REPLY (64 * 1024)
/* How long the server may take to answer the handshake. */
#define NBD_HANDSHAKE_NS (30 * G_GINT64_CONSTANT(1000000000))
/* Reconnect attempts back off from the first to the last pause. */
#define NBD_RETRY_MIN_NS (100 * G_GINT64_CONSTANT(1000000))
#define NBD_RETRY_MAX_NS (2 * G_GINT64_CONSTANT(1000000000))
/* A streamed read's data is received into a staging buffer of this size,
 * a piece at a time, and handed on from there (see
 * strata_node_co_read_stream): small enough to stay in the CPU's cache
 * between the receive and the sink's copy. */
#define NBD_STAGE_SIZE (64 * 1024)
/*
 * A streamed payload of this much or more whose sink may run on any
 * thread is received on a worker thread, sink calls included, while the
 * loop's thread goes on with the other connections (see
 * nbd_co_stream_payload).
 */
#define NBD_THREAD_RECV_MIN (256 * 1024)

typedef enum {
    NBD_CONNECTED,
    NBD_CONNECTING_WAIT,    /* lost: requests wait for the reconnect */
    NBD_CONNECTING_NOWAIT,  /* lost past reconnect-delay: requests fail */
    NBD_QUIT,               /* protocol broken, or closing: final */
} NbdConnState;

typedef struct NbdReq {
    bool in_use;
    bool sent;
    bool done;                /* the final chunk has been read */
    bool lost;                /* done because the connection went */
    StrataCoroutine *waiter;  /* set while the owner yields for the reply */
    int ret;
    uint16_t type;
    uint64_t offset;
    uint32_t len;
    StrataIOVec *qiov;        /* READ */
    size_t qiov_offset;
    StrataReadSink sink;      /* READ streamed: instead of qiov */
    void *sink_opaque;
    bool sink_any_thread;     /* STRATA_STREAM_ANY_THREAD */
    bool bs_got;              /* BLOCK_STATUS: first extent */
    uint32_t bs_len;
    uint32_t bs_flags;
} NbdReq;

/* What a handshake learns about the export. */
typedef struct NbdInfo {
    uint64_t size;
    uint16_t tflags;
    bool structured;
    bool meta_ok;
    uint32_t meta_id;
    uint32_t min_block, pref_block, max_block;
} NbdInfo;

typedef struct NbdState {
    StrataNode *node;
    int fd;
    StrataNbdWatch *watch;    /* of fd */
    GSocketAddress *addr;
    char *addr_text;          /* for messages: the path or host:port */
    char *export_name;
    int64_t open_timeout_s;
    int64_t reconnect_delay_s;

    NbdInfo info;             /* the connection in use */
    NbdInfo neg;              /* the one being negotiated */

    NbdConnState state;
    bool reader_running;
    StrataCoQueue reader_gone;    /* the reconnect waits for the reader */
    bool reconnect_running;
    StrataCoroutine *sleeper;     /* the reconnect, in its backoff pause */
    StrataTimer *retry_timer;
    StrataTimer *delay_timer;     /* ends the CONNECTING_WAIT state */
    StrataCoQueue reconnect_wait; /* requests waiting for a connection */
    StrataCoMutex send_lock;
    StrataNbdRBuf rbuf;           /* of the current connection */
    NbdReq reqs[NBD_MAX_REQS];
    /* The read whose data the reader is receiving into its buffers: a
     * recv on the ring may still write there after a shutdown(), so
     * nbd_conn_lost leaves it to the reader, which ends it on return. */
    NbdReq *receiving;
    uint8_t *stage;               /* NBD_STAGE_SIZE; for streamed reads */
    unsigned nreqs;
    StrataCoQueue slot_wait;
} NbdState;

static const char *const nbd_addr_types[] = {
    "unix", "inet", "fd", "vsock", NULL,
};

static const StrataOptDesc nbd_options[] = {
    { "server", STRATA_OPT_ANY, true, NULL },
    { "server.type", STRATA_OPT_ENUM, true, nbd_addr_types },
    { "server.path", STRATA_OPT_STRING, false, NULL },
    { "server.abstract", STRATA_OPT_BOOL, false, NULL },
    { "server.tight", STRATA_OPT_BOOL, false, NULL },
    { "server.host", STRATA_OPT_STRING, false, NULL },
    { "server.port", STRATA_OPT_STRING, false, NULL },
    { "server.numeric", STRATA_OPT_BOOL, false, NULL },
    { "server.ipv4", STRATA_OPT_BOOL, false, NULL },
    { "server.ipv6", STRATA_OPT_BOOL, false, NULL },
    { "export", STRATA_OPT_STRING, false, NULL },
    { "reconnect-delay", STRATA_OPT_INT, false, NULL },
    { "open-timeout", STRATA_OPT_INT, false, NULL },
    { NULL, 0, false, NULL },
};

/* ------------------------------------------------------------------ */
/* Socket I/O from coroutines (nbd-sock.c)                             */
/* ------------------------------------------------------------------ */

static StrataNbdSock state_sock(NbdState *s)
{
    return (StrataNbdSock){ s->fd, s->node->ctx->loop, s->watch, NULL,
                            &s->rbuf, true };
}

/* Nobody may be waiting on the socket any more. */
static void nbd_close_fd(NbdState *s)
{
    g_clear_pointer(&s->watch, strata_nbd_watch_free);
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
}

static void nbd_co_wait_fd(NbdState *s, GIOCondition cond)
{
    StrataNbdSock sk = state_sock(s);
    strata_nbd_co_wait_fd(&sk, cond);
}

static int nbd_co_read_full(NbdState *s, void *buf, size_t len)
{
    StrataNbdSock sk = state_sock(s);
    return strata_nbd_co_read_full(&sk, buf, len);
}

static int nbd_co_skip(NbdState *s, uint64_t len)
{
    StrataNbdSock sk = state_sock(s);
    return strata_nbd_co_skip(&sk, len);
}

/* Hands [@off, @off + @len) of @r's range to its sink (@buf NULL: a
 * hole), unless an earlier piece failed; the sink's error becomes the
 * read's.  On the thread the sink may run on. */
static void nbd_sink(NbdReq *r, uint64_t off, const void *buf, size_t len)
{
    if (r->ret == 0) {
        int ret = r->sink(r->sink_opaque, r->offset + off, buf, len);

        if (ret < 0) {
            r->ret = ret;
        }
    }
}

/* A streamed payload that a worker thread receives (nbd_thread_recv). */
typedef struct NbdThreadRecv {
    int fd;
    uint8_t *stage;
    NbdReq *r;
    uint64_t off;
    size_t len;
} NbdThreadRecv;

/* Worker thread: receives the payload off the socket through the
 * staging buffer and hands each piece to the sink, as
 * nbd_co_stream_payload does on the loop's thread. */
static int nbd_thread_recv(void *opaque)
{
    NbdThreadRecv *t = opaque;

    while (t->len) {
        size_t n = MIN(t->len, (size_t)NBD_STAGE_SIZE);
        int ret = strata_nbd_recv_full(t->fd, t->stage, n);

        if (ret < 0) {
            return ret;
        }
        nbd_sink(t->r, t->off, t->stage, n);
        t->off += n;
        t->len -= n;
    }
    return 0;
}

/*
 * Receives @len bytes of a streamed read's data, @off bytes into its
 * range, through the staging buffer, a piece at a time to its sink.
 *
 * With a sink that may run anywhere, a large payload is received on a
 * worker thread instead: the loop's thread hands over the socket's
 * receiving side (nothing else reads it until the payload is in: this
 * reader waits) and goes on receiving other connections' replies and
 * running the rest of the graph, so that a tool reading an export over
 * several connections copies on every CPU, as nbd-floor's threads do.
 * A GiB from qemu-nbd over four connections into tmpfs, 25 rounds in
 * turn with qemu-img and nbd-floor: 0.312 s against 0.345 s received on
 * the loop's thread (qemu-img 0.409 s, nbd-floor 0.311 s).  The piece
 * that begins in the connection's buffer is received here, so that the
 * pieces keep their places.  The socket stays open meanwhile
 * (nbd_conn_lost only shuts it down, which ends the worker's wait; it is
 * closed once the reader is gone), and the staging buffer is the
 * connection's, used by one payload at a time.
 */
static int nbd_co_stream_payload(NbdState *s, NbdReq *r, uint64_t off,
                                 size_t len)
{
    size_t here = len;      /* received here, the rest on a worker */

    if (r->sink_any_thread && len >= NBD_THREAD_RECV_MIN) {
        here = s->rbuf.pos < s->rbuf.end ? MIN(len, (size_t)NBD_STAGE_SIZE)
                                         : 0;
    }
    if (!s->stage) {
        s->stage = g_malloc(NBD_STAGE_SIZE);
    }
    while (here) {
        size_t n = MIN(here, (size_t)NBD_STAGE_SIZE);
        int ret = nbd_co_read_full(s, s->stage, n);

        if (ret < 0) {
            return ret;
        }
        nbd_sink(r, off, s->stage, n);
        off += n;
        len -= n;
        here -= n;
    }
    if (len) {
        NbdThreadRecv t = { s->fd, s->stage, r, off, len };

        return strata_loop_co_run_in_thread(s->node->ctx->loop,
                                            nbd_thread_recv, &t);
    }
    return 0;
}

/* Reads @len bytes into @qiov at @off, piece by piece. */
static int nbd_co_read_qiov(NbdState *s, StrataIOVec *qiov, size_t off,
                            size_t len)
{
    for (int i = 0; i < qiov->niov && len; i++) {
        size_t l = qiov->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = MIN(l - off, len);
        int ret = nbd_co_read_full(s, (uint8_t *)qiov->iov[i].iov_base + off,
                                   n);
        if (ret < 0) {
            return ret;
        }
        len -= n;
        off = 0;
    }
    return len ? -EIO : 0;
}

/* Receives @len bytes of @r's data, @off bytes into its range, into its
 * buffers or through its sink. */
static int nbd_co_read_payload(NbdState *s, NbdReq *r, size_t off,
                               size_t len)
{
    int ret;

    s->receiving = r;
    ret = r->sink ? nbd_co_stream_payload(s, r, off, len)
                  : nbd_co_read_qiov(s, r->qiov, r->qiov_offset + off, len);
    s->receiving = NULL;
    return ret;
}

static int nbd_co_write_full(NbdState *s, const void *buf, size_t len)
{
    StrataNbdSock sk = state_sock(s);
    return strata_nbd_co_write_full(&sk, buf, len);
}

static int nbd_co_write_qiov(NbdState *s, StrataIOVec *qiov, size_t off,
                             size_t len)
{
    for (int i = 0; i < qiov->niov && len; i++) {
        size_t l = qiov->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = MIN(l - off, len);
        int ret = nbd_co_write_full(s, (uint8_t *)qiov->iov[i].iov_base + off,
                                    n);
        if (ret < 0) {
            return ret;
        }
        len -= n;
        off = 0;
    }
    return len ? -EINVAL : 0;
}

/* ------------------------------------------------------------------ */
/* Connecting and negotiating                                          */
/* ------------------------------------------------------------------ */

static GSocketAddress *nbd_parse_addr(JsonObject *options, GError **error)
{
    const char *type = strata_opts_get_string(options, "server.type", "");

    if (!strcmp(type, "unix")) {
        const char *path = strata_opts_get_string(options, "server.path",
                                                  NULL);
        if (!path) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'server.path' is missing");
            return NULL;
        }
        if (strata_opts_get_bool(options, "server.abstract", false)) {
            bool tight = strata_opts_get_bool(options, "server.tight", true);
            return g_unix_socket_address_new_with_type(
                path, -1, tight ? G_UNIX_SOCKET_ADDRESS_ABSTRACT
                                : G_UNIX_SOCKET_ADDRESS_ABSTRACT_PADDED);
        }
        return g_unix_socket_address_new(path);
    }
    if (!strcmp(type, "inet")) {
        const char *host = strata_opts_get_string(options, "server.host",
                                                  NULL);
        const char *port = strata_opts_get_string(options, "server.port",
                                                  "10809");
        g_autoptr(GSocketConnectable) conn = NULL;
        g_autoptr(GSocketAddressEnumerator) en = NULL;
        guint64 pnum;
        GSocketAddress *sa;

        if (!host) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'server.host' is missing");
            return NULL;
        }
        if (!g_ascii_string_to_unsigned(port, 10, 0, 65535, &pnum, NULL)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Invalid port '%s'", port);
            return NULL;
        }
        conn = g_network_address_new(host, (guint16)pnum);
        en = g_socket_connectable_enumerate(conn);
        sa = g_socket_address_enumerator_next(en, NULL, error);
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

/* A non-blocking connect: 0 or -errno. */
static int nbd_co_connect(NbdState *s)
{
    struct sockaddr_storage ss;
    gssize len = g_socket_address_get_native_size(s->addr);
    int err = 0;
    socklen_t elen = sizeof(err);

    if (len <= 0 || (size_t)len > sizeof(ss) ||
        !g_socket_address_to_native(s->addr, &ss, len, NULL)) {
        return -EINVAL;
    }
    s->rbuf.pos = s->rbuf.end = 0;
    s->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                   0);
    if (s->fd < 0) {
        return -errno;
    }
    strata_nbd_sock_tune(s->fd);
    s->watch = strata_nbd_watch_new(s->node->ctx->loop, s->fd);
    if (connect(s->fd, (struct sockaddr *)&ss, len) == 0) {
        return 0;
    }
    if (errno != EINPROGRESS && errno != EAGAIN) {
        err = -errno;
        goto fail;
    }
    nbd_co_wait_fd(s, G_IO_OUT);
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0) {
        err = errno;
    }
    if (err == 0) {
        return 0;
    }
    err = -err;
fail:
    nbd_close_fd(s);
    return err;
}

static int nbd_co_send_opt(NbdState *s, uint32_t opt, const void *data,
                           uint32_t len)
{
    uint8_t hdr[16];
    int ret;

    nbd_put64(hdr, STRATA_NBD_OPTS_MAGIC);
    nbd_put32(hdr + 8, opt);
    nbd_put32(hdr + 12, len);
    ret = nbd_co_write_full(s, hdr, sizeof(hdr));
    if (ret == 0 && len) {
        ret = nbd_co_write_full(s, data, len);
    }
    return ret;
}

/*
 * Reads one option reply to @opt: its type in *@type and its payload
 * (at most NBD_MAX_OPT_REPLY bytes, transfer full) in *@data / *@len.
 */
static bool nbd_co_recv_opt_reply(NbdState *s, uint32_t opt, uint32_t *type,
                                  uint8_t **data, uint32_t *len,
                                  GError **error)
{
    uint8_t hdr[20];
    int ret = nbd_co_read_full(s, hdr, sizeof(hdr));

    *data = NULL;
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to read option reply: %s", g_strerror(-ret));
        return false;
    }
    if (nbd_get64(hdr) != STRATA_NBD_REP_MAGIC) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Unexpected option reply magic 0x%" PRIx64, nbd_get64(hdr));
        return false;
    }
    if (nbd_get32(hdr + 8) != opt) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Reply to option %" PRIu32 " when %" PRIu32
                    " was sent", nbd_get32(hdr + 8), opt);
        return false;
    }
    *type = nbd_get32(hdr + 12);
    *len = nbd_get32(hdr + 16);
    if (*len > NBD_MAX_OPT_REPLY) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Option reply of %" PRIu32 " bytes is too long", *len);
        return false;
    }
    *data = g_malloc(*len + 1);
    ret = nbd_co_read_full(s, *data, *len);
    if (ret < 0) {
        g_clear_pointer(data, g_free);
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to read option reply: %s", g_strerror(-ret));
        return false;
    }
    (*data)[*len] = 0;
    return true;
}

static bool nbd_co_opt_structured(NbdState *s, GError **error)
{
    g_autofree uint8_t *data = NULL;
    uint32_t type, len;

    if (nbd_co_send_opt(s, STRATA_NBD_OPT_STRUCTURED_REPLY, NULL, 0) < 0 ||
        !nbd_co_recv_opt_reply(s, STRATA_NBD_OPT_STRUCTURED_REPLY, &type,
                               &data, &len, error)) {
        if (error && !*error) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Failed to send option");
        }
        return false;
    }
    if (type == STRATA_NBD_REP_ACK) {
        if (len) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Structured reply ACK with a payload");
            return false;
        }
        s->neg.structured = true;
    } else if (!(type & STRATA_NBD_REP_ERR(0))) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Unexpected reply type %" PRIu32, type);
        return false;
    }
    return true;
}

static bool nbd_co_opt_meta(NbdState *s, GError **error)
{
    size_t nlen = strlen(s->export_name);
    size_t qlen = strlen(STRATA_NBD_META_BASE_ALLOCATION);
    size_t plen = 4 + nlen + 4 + 4 + qlen;
    g_autofree uint8_t *p = g_malloc(plen);

    nbd_put32(p, nlen);
    memcpy(p + 4, s->export_name, nlen);
    nbd_put32(p + 4 + nlen, 1);
    nbd_put32(p + 8 + nlen, qlen);
    memcpy(p + 12 + nlen, STRATA_NBD_META_BASE_ALLOCATION, qlen);
    if (nbd_co_send_opt(s, STRATA_NBD_OPT_SET_META_CONTEXT, p, plen) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to send option");
        return false;
    }
    for (;;) {
        g_autofree uint8_t *data = NULL;
        uint32_t type, len;

        if (!nbd_co_recv_opt_reply(s, STRATA_NBD_OPT_SET_META_CONTEXT,
                                   &type, &data, &len, error)) {
            return false;
        }
        if (type == STRATA_NBD_REP_ACK) {
            return true;
        }
        if (type & STRATA_NBD_REP_ERR(0)) {
            /* Block status is optional: without it, all is data. */
            s->neg.meta_ok = false;
            return true;
        }
        if (type != STRATA_NBD_REP_META_CONTEXT || len < 4) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Unexpected meta context reply");
            return false;
        }
        if (len - 4 == qlen &&
            !memcmp(data + 4, STRATA_NBD_META_BASE_ALLOCATION, qlen)) {
            s->neg.meta_ok = true;
            s->neg.meta_id = nbd_get32(data);
        }
    }
}

static bool nbd_co_opt_go(NbdState *s, GError **error)
{
    size_t nlen = strlen(s->export_name);
    size_t plen = 4 + nlen + 2 + 2;
    g_autofree uint8_t *p = g_malloc(plen);
    bool have_export = false;

    nbd_put32(p, nlen);
    memcpy(p + 4, s->export_name, nlen);
    nbd_put16(p + 4 + nlen, 1);
    nbd_put16(p + 6 + nlen, STRATA_NBD_INFO_BLOCK_SIZE);
    if (nbd_co_send_opt(s, STRATA_NBD_OPT_GO, p, plen) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to send option");
        return false;
    }
    for (;;) {
        g_autofree uint8_t *data = NULL;
        uint32_t type, len;

        if (!nbd_co_recv_opt_reply(s, STRATA_NBD_OPT_GO, &type, &data, &len,
                                   error)) {
            return false;
        }
        if (type == STRATA_NBD_REP_ACK) {
            if (!have_export) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Server did not send the export's size");
                return false;
            }
            return true;
        }
        if (type & STRATA_NBD_REP_ERR(0)) {
            g_autofree char *msg = g_strescape((char *)data, NULL);
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Requested export not available%s%s",
                        len ? "\nserver reported: " : "", len ? msg : "");
            return false;
        }
        if (type != STRATA_NBD_REP_INFO || len < 2) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Unexpected reply type %" PRIu32 " to GO", type);
            return false;
        }
        switch (nbd_get16(data)) {
        case STRATA_NBD_INFO_EXPORT:
            if (len != 12) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Export info of bad length %" PRIu32, len);
                return false;
            }
            s->neg.size = nbd_get64(data + 2);
            s->neg.tflags = nbd_get16(data + 10);
            have_export = true;
            break;
        case STRATA_NBD_INFO_BLOCK_SIZE:
            if (len != 14) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Block size info of bad length %" PRIu32, len);
                return false;
            }
            s->neg.min_block = nbd_get32(data + 2);
            s->neg.pref_block = nbd_get32(data + 6);
            s->neg.max_block = nbd_get32(data + 10);
            if (s->neg.min_block == 0 || s->neg.min_block > 65536 ||
                (s->neg.min_block & (s->neg.min_block - 1)) ||
                s->neg.max_block < s->neg.min_block) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Server sent impossible block sizes");
                return false;
            }
            break;
        default:
            break;          /* name, description: not needed */
        }
    }
}

static bool nbd_co_handshake(NbdState *s, GError **error)
{
    uint8_t greet[18];
    uint8_t cflags[4];
    uint16_t hflags;
    int ret = nbd_co_read_full(s, greet, sizeof(greet));

    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to read the server's greeting: %s",
                    g_strerror(-ret));
        return false;
    }
    if (nbd_get64(greet) != STRATA_NBD_INIT_MAGIC ||
        nbd_get64(greet + 8) != STRATA_NBD_OPTS_MAGIC) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Server does not speak fixed newstyle NBD "
                    "(bad magic)");
        return false;
    }
    hflags = nbd_get16(greet + 16);
    if (!(hflags & STRATA_NBD_FLAG_FIXED_NEWSTYLE)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Server does not support fixed newstyle");
        return false;
    }
    nbd_put32(cflags, STRATA_NBD_CFLAG_FIXED_NEWSTYLE |
                  (hflags & STRATA_NBD_FLAG_NO_ZEROES ?
                   STRATA_NBD_CFLAG_NO_ZEROES : 0));
    if (nbd_co_write_full(s, cflags, sizeof(cflags)) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to send client flags");
        return false;
    }
    if (!nbd_co_opt_structured(s, error)) {
        return false;
    }
    if (s->neg.structured && !nbd_co_opt_meta(s, error)) {
        return false;
    }
    return nbd_co_opt_go(s, error);
}

static void handshake_timeout(void *opaque)
{
    NbdState *s = opaque;

    if (s->fd >= 0) {
        shutdown(s->fd, SHUT_RDWR);
    }
}

/* One attempt: connect and negotiate, within NBD_HANDSHAKE_NS.  On
 * failure the socket is closed again. */
static bool nbd_co_establish(NbdState *s, GError **error)
{
    StrataLoop *loop = s->node->ctx->loop;
    StrataTimer *timer;
    int ret = nbd_co_connect(s);
    bool ok;

    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to connect to '%s': %s", s->addr_text,
                    g_strerror(-ret));
        return false;
    }
    memset(&s->neg, 0, sizeof(s->neg));
    timer = strata_timer_new(loop, handshake_timeout, s);
    strata_timer_mod(timer, strata_clock_ns() +
                            (s->node->ctx->nbd_handshake_ns ?
                             s->node->ctx->nbd_handshake_ns : NBD_HANDSHAKE_NS));
    ok = nbd_co_handshake(s, error);
    strata_timer_del(timer);
    strata_timer_free(timer);
    if (ok && !(s->neg.tflags & STRATA_NBD_FLAG_HAS_FLAGS)) {
        s->neg.tflags = 0;
    }
    if (!ok) {
        nbd_close_fd(s);
    }
    return ok;
}

static void retry_timer_cb(void *opaque)
{
    NbdState *s = opaque;
    StrataCoroutine *co = s->sleeper;

    if (co) {
        s->sleeper = NULL;
        strata_coroutine_wake(co);
    }
}

/* Coroutine only: a pause between attempts that closing cuts short. */
static void nbd_co_backoff(NbdState *s, int64_t ns)
{
    s->sleeper = strata_coroutine_self();
    strata_timer_mod(s->retry_timer, strata_clock_ns() + ns);
    strata_co_yield();
    strata_timer_del(s->retry_timer);
}

typedef struct {
    NbdState *s;
    GError *error;
    bool ok;
} NbdOpenCo;

static void nbd_open_entry(void *opaque)
{
    NbdOpenCo *oc = opaque;
    NbdState *s = oc->s;
    int64_t deadline = strata_clock_ns() +
                       s->open_timeout_s * G_GINT64_CONSTANT(1000000000);

    /* With open-timeout, a server that is not up (or not ready) yet is
     * tried again until the deadline; the last error is reported. */
    for (;;) {
        g_clear_error(&oc->error);
        oc->ok = nbd_co_establish(s, &oc->error);
        if (oc->ok || strata_clock_ns() >= deadline) {
            return;
        }
        nbd_co_backoff(s, MIN(NBD_RETRY_MIN_NS,
                              deadline - strata_clock_ns()));
    }
}

/* ------------------------------------------------------------------ */
/* Replies                                                             */
/* ------------------------------------------------------------------ */

static int nbd_errno(uint32_t err)
{
    switch (err) {
    case STRATA_NBD_EPERM: return -EPERM;
    case STRATA_NBD_ENOMEM: return -ENOMEM;
    case STRATA_NBD_EINVAL: return -EINVAL;
    case STRATA_NBD_ENOSPC: return -ENOSPC;
    case STRATA_NBD_EOVERFLOW: return -EOVERFLOW;
    case STRATA_NBD_ENOTSUP: return -ENOTSUP;
    case STRATA_NBD_ESHUTDOWN: return -ESHUTDOWN;
    default: return -EIO;
    }
}

static void nbd_req_complete(NbdReq *r)
{
    r->done = true;
    if (r->waiter) {
        StrataCoroutine *co = r->waiter;
        r->waiter = NULL;
        strata_coroutine_wake(co);
    }
}

static void nbd_reconnect_entry(void *opaque);

static void delay_timer_cb(void *opaque)
{
    NbdState *s = opaque;

    if (s->state == NBD_CONNECTING_WAIT) {
        s->state = NBD_CONNECTING_NOWAIT;
        strata_co_queue_restart_all(&s->reconnect_wait);
    }
}

/*
 * The connection is gone: every request on it ends (marked lost, so it
 * may be sent again), and unless @fatal (the server broke the protocol)
 * or the node is closing, a reconnect starts in the background.
 */
static void nbd_conn_lost(NbdState *s, bool fatal)
{
    if (s->state == NBD_CONNECTED) {
        if (fatal) {
            s->state = NBD_QUIT;
        } else if (s->reconnect_delay_s) {
            s->state = NBD_CONNECTING_WAIT;
            strata_timer_mod(s->delay_timer, strata_clock_ns() +
                             s->reconnect_delay_s *
                             G_GINT64_CONSTANT(1000000000));
        } else {
            s->state = NBD_CONNECTING_NOWAIT;
        }
    } else if (fatal) {
        s->state = NBD_QUIT;
    }
    if (s->fd >= 0) {
        shutdown(s->fd, SHUT_RDWR);
    }
    for (int i = 0; i < NBD_MAX_REQS; i++) {
        NbdReq *r = &s->reqs[i];
        if (r->in_use && !r->done && r != s->receiving) {
            r->ret = -EIO;
            r->lost = true;
            nbd_req_complete(r);
        }
    }
    strata_co_queue_restart_all(&s->slot_wait);
    if (s->state == NBD_QUIT) {
        strata_timer_del(s->delay_timer);
        strata_co_queue_restart_all(&s->reconnect_wait);
    } else if (!s->reconnect_running) {
        s->reconnect_running = true;
        strata_loop_schedule_co(s->node->ctx->loop,
                                strata_coroutine_new(nbd_reconnect_entry, s));
    }
}

static NbdReq *nbd_find_req(NbdState *s, uint64_t cookie)
{
    if (cookie == 0 || cookie > NBD_MAX_REQS) {
        return NULL;
    }
    NbdReq *r = &s->reqs[cookie - 1];
    return r->in_use && r->sent && !r->done ? r : NULL;
}

/* One structured chunk's payload for @r: 0 or -errno (fatal). */
static int nbd_co_chunk(NbdState *s, NbdReq *r, uint16_t type, uint32_t len)
{
    uint8_t buf[12];
    int ret;

    switch (type) {
    case STRATA_NBD_REPLY_TYPE_NONE:
        return len == 0 ? 0 : -EPROTO;
    case STRATA_NBD_REPLY_TYPE_OFFSET_DATA: {
        if (r->type != STRATA_NBD_CMD_READ || len <= 8) {
            return -EPROTO;
        }
        ret = nbd_co_read_full(s, buf, 8);
        if (ret < 0) {
            return ret;
        }
        uint64_t off = nbd_get64(buf);
        uint32_t dlen = len - 8;
        if (off < r->offset || dlen > r->len ||
            off - r->offset > r->len - dlen) {
            return -EPROTO;
        }
        return nbd_co_read_payload(s, r, off - r->offset, dlen);
    }
    case STRATA_NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (r->type != STRATA_NBD_CMD_READ || len != 12) {
            return -EPROTO;
        }
        ret = nbd_co_read_full(s, buf, 12);
        if (ret < 0) {
            return ret;
        }
        uint64_t off = nbd_get64(buf);
        uint32_t hlen = nbd_get32(buf + 8);
        if (off < r->offset || hlen == 0 || hlen > r->len ||
            off - r->offset > r->len - hlen) {
            return -EPROTO;
        }
        if (r->sink) {
            nbd_sink(r, off - r->offset, NULL, hlen);
        } else {
            strata_iov_memset(r->qiov, r->qiov_offset + (off - r->offset), 0,
                              hlen);
        }
        return 0;
    }
    case STRATA_NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (r->type != STRATA_NBD_CMD_BLOCK_STATUS || len < 12 ||
            (len - 4) % 8) {
            return -EPROTO;
        }
        ret = nbd_co_read_full(s, buf, 12);
        if (ret < 0) {
            return ret;
        }
        if (!s->info.meta_ok || nbd_get32(buf) != s->info.meta_id || r->bs_got) {
            return -EPROTO;
        }
        r->bs_got = true;
        r->bs_len = nbd_get32(buf + 4);
        r->bs_flags = nbd_get32(buf + 8);
        /* With REQ_ONE there is one extent; tolerate more, unread. */
        return nbd_co_skip(s, len - 12);
    }
    default:
        break;
    }
    if (type & STRATA_NBD_REPLY_TYPE_ERR(0)) {
        if (len < 6) {
            return -EPROTO;
        }
        ret = nbd_co_read_full(s, buf, 6);
        if (ret < 0) {
            return ret;
        }
        uint32_t err = nbd_get32(buf);
        uint16_t mlen = nbd_get16(buf + 4);
        if ((uint64_t)mlen + 6 > len) {
            return -EPROTO;
        }
        if (r->ret == 0) {
            r->ret = err ? nbd_errno(err) : -EIO;
        }
        return nbd_co_skip(s, len - 6);
    }
    return -EPROTO;
}

/* The reader: one reply (or chunk) at a time until the connection
 * ends or breaks the protocol. */
static void nbd_reader_entry(void *opaque)
{
    NbdState *s = opaque;
    uint8_t hdr[STRATA_NBD_CHUNK_HEADER_SIZE];
    int ret = 0;

    while (s->state == NBD_CONNECTED && ret == 0) {
        NbdReq *r;

        ret = nbd_co_read_full(s, hdr, 4);
        if (ret < 0) {
            break;
        }
        if (nbd_get32(hdr) == STRATA_NBD_SIMPLE_REPLY_MAGIC) {
            ret = nbd_co_read_full(s, hdr + 4,
                                   STRATA_NBD_SIMPLE_REPLY_SIZE - 4);
            if (ret < 0) {
                break;
            }
            r = nbd_find_req(s, nbd_get64(hdr + 8));
            if (!r) {
                ret = -EPROTO;
                break;
            }
            uint32_t err = nbd_get32(hdr + 4);
            if (err) {
                r->ret = nbd_errno(err);
            } else if (r->type == STRATA_NBD_CMD_READ) {
                /* A structured connection must not answer reads with
                 * data in a simple reply. */
                if (s->info.structured) {
                    ret = -EPROTO;
                    break;
                }
                ret = nbd_co_read_payload(s, r, 0, r->len);
                if (ret < 0) {
                    break;
                }
            } else if (r->type == STRATA_NBD_CMD_BLOCK_STATUS) {
                ret = -EPROTO;
                break;
            }
            nbd_req_complete(r);
        } else if (nbd_get32(hdr) == STRATA_NBD_STRUCTURED_REPLY_MAGIC &&
                   s->info.structured) {
            ret = nbd_co_read_full(s, hdr + 4,
                                   STRATA_NBD_CHUNK_HEADER_SIZE - 4);
            if (ret < 0) {
                break;
            }
            uint16_t flags = nbd_get16(hdr + 4);
            uint16_t type = nbd_get16(hdr + 6);
            uint32_t len = nbd_get32(hdr + 16);
            r = nbd_find_req(s, nbd_get64(hdr + 8));
            if (!r || len > STRATA_NBD_MAX_BUFFER + 8) {
                ret = -EPROTO;
                break;
            }
            ret = nbd_co_chunk(s, r, type, len);
            if (ret < 0) {
                break;
            }
            if (flags & STRATA_NBD_REPLY_FLAG_DONE) {
                if (r->type == STRATA_NBD_CMD_BLOCK_STATUS && !r->bs_got &&
                    r->ret == 0) {
                    r->ret = -EIO;
                }
                nbd_req_complete(r);
            }
        } else {
            ret = -EPROTO;
        }
    }
    if (ret == -EPROTO) {
        g_warning("nbd: node '%s': server broke the protocol; "
                  "disconnecting", s->node->node_name);
    }
    nbd_conn_lost(s, ret == -EPROTO);
    s->reader_running = false;
    strata_co_queue_restart_all(&s->reader_gone);
}

static void nbd_start_reader(NbdState *s)
{
    s->reader_running = true;
    strata_coroutine_enter(strata_coroutine_new(nbd_reader_entry, s));
}

/* The export behind a new connection must be the one the node was
 * opened on, as the layers above see it. */
static bool nbd_same_export(NbdState *s, GError **error)
{
    const StrataNode *node = s->node;

    if (s->neg.size != s->info.size) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "export size changed from %" PRIu64 " to %" PRIu64,
                    s->info.size, s->neg.size);
        return false;
    }
    if (!node->read_only && (s->neg.tflags & STRATA_NBD_FLAG_READ_ONLY)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "export became read-only");
        return false;
    }
    if (MAX(s->neg.min_block, 1) > node->limits.request_alignment ||
        (s->neg.max_block && s->neg.max_block < node->limits.max_transfer)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "export block sizes changed");
        return false;
    }
    return true;
}

/*
 * Runs while the connection is down: waits for the old reader and any
 * sender still on the old socket, then connects again (backing off up to
 * NBD_RETRY_MAX_NS between attempts) until it works or the node closes.
 */
static void nbd_reconnect_entry(void *opaque)
{
    NbdState *s = opaque;
    int64_t pause = NBD_RETRY_MIN_NS;
    bool warned = false;

    while (s->reader_running) {
        strata_co_queue_wait(&s->reader_gone, NULL);
    }
    strata_co_mutex_lock(&s->send_lock);
    nbd_close_fd(s);
    strata_co_mutex_unlock(&s->send_lock);

    while (s->state == NBD_CONNECTING_WAIT ||
           s->state == NBD_CONNECTING_NOWAIT) {
        g_autoptr(GError) err = NULL;

        if (nbd_co_establish(s, &err)) {
            if (s->state == NBD_QUIT) {
                break;      /* closed meanwhile */
            }
            if (nbd_same_export(s, &err)) {
                s->info = s->neg;
                s->state = NBD_CONNECTED;
                strata_timer_del(s->delay_timer);
                nbd_start_reader(s);
                break;
            }
            if (!warned) {
                g_warning("nbd: node '%s': %s; not reconnecting to it",
                          s->node->node_name, err->message);
                warned = true;
            }
            nbd_close_fd(s);
        }
        if (s->state == NBD_QUIT) {
            break;
        }
        nbd_co_backoff(s, pause);
        pause = MIN(pause * 2, NBD_RETRY_MAX_NS);
    }
    if (s->state != NBD_CONNECTED) {
        nbd_close_fd(s);
    }
    s->reconnect_running = false;
    strata_co_queue_restart_all(&s->reconnect_wait);
}

/* ------------------------------------------------------------------ */
/* Requests                                                            */
/* ------------------------------------------------------------------ */

/*
 * Sends one request and waits for its whole reply.  @qiov: the data of
 * a WRITE, or the buffer a READ fills.  While the connection is being
 * re-established within reconnect-delay, the request waits, and one lost
 * with the connection is sent again.  Returns 0 or -errno.
 */
static int nbd_co_request(NbdState *s, NbdReq *tmpl, uint16_t flags,
                          StrataIOVec *qiov, size_t qiov_offset)
{
    const NbdReq orig = *tmpl;
    uint8_t hdr[STRATA_NBD_REQUEST_SIZE];

    for (;;) {
        NbdReq *r = NULL;
        bool lost;
        int i, ret;

        for (;;) {
            if (s->state == NBD_CONNECTING_WAIT) {
                strata_co_queue_wait(&s->reconnect_wait, NULL);
            } else if (s->state == NBD_CONNECTED &&
                       s->nreqs >= NBD_MAX_REQS) {
                strata_co_queue_wait(&s->slot_wait, NULL);
            } else {
                break;
            }
        }
        if (s->state != NBD_CONNECTED) {
            return -EIO;
        }
        for (i = 0; i < NBD_MAX_REQS; i++) {
            if (!s->reqs[i].in_use) {
                r = &s->reqs[i];
                break;
            }
        }
        g_return_val_if_fail(r != NULL, -EIO);
        *r = orig;
        r->in_use = true;
        r->qiov = qiov;
        r->qiov_offset = qiov_offset;
        s->nreqs++;

        nbd_put32(hdr, STRATA_NBD_REQUEST_MAGIC);
        nbd_put16(hdr + 4, flags);
        nbd_put16(hdr + 6, r->type);
        nbd_put64(hdr + 8, i + 1);
        nbd_put64(hdr + 16, r->offset);
        nbd_put32(hdr + 24, r->len);

        strata_co_mutex_lock(&s->send_lock);
        /* A request the connection took down while it queued for the
         * lock must not go out on the next connection. */
        if (s->state != NBD_CONNECTED || r->done) {
            if (!r->done) {
                r->ret = -EIO;
                r->lost = true;
                r->done = true;
            }
        } else {
            r->sent = true;
            ret = nbd_co_write_full(s, hdr, sizeof(hdr));
            if (ret == 0 && r->type == STRATA_NBD_CMD_WRITE) {
                ret = nbd_co_write_qiov(s, qiov, qiov_offset, r->len);
            }
            if (ret < 0) {
                nbd_conn_lost(s, false);
            }
        }
        strata_co_mutex_unlock(&s->send_lock);
        if (!r->done) {
            r->waiter = strata_coroutine_self();
            strata_co_yield();
        }
        ret = r->ret;
        lost = r->lost;
        *tmpl = *r;
        memset(r, 0, sizeof(*r));
        s->nreqs--;
        strata_co_queue_next(&s->slot_wait);
        if (!lost || !s->reconnect_delay_s ||
            s->state == NBD_CONNECTING_NOWAIT || s->state == NBD_QUIT) {
            return ret;
        }
    }
}

static int nbd_co_simple(NbdState *s, uint16_t type, uint16_t flags,
                         uint64_t offset, uint64_t bytes)
{
    NbdReq t = { .type = type, .offset = offset, .len = bytes };

    return nbd_co_request(s, &t, flags, NULL, 0);
}

static int64_t nbd_co_get_length(StrataNode *node)
{
    NbdState *s = node->opaque;

    return s->info.size;
}

static int nbd_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                         StrataIOVec *qiov, size_t qiov_offset,
                         StrataReqFlags flags)
{
    NbdState *s = node->opaque;
    NbdReq t = { .type = STRATA_NBD_CMD_READ, .offset = offset,
                 .len = bytes };

    if (bytes == 0) {
        return 0;
    }
    return nbd_co_request(s, &t, 0, qiov, qiov_offset);
}

/* A read whose data goes to @sink through the staging buffer (see
 * nbd_co_stream_payload); after a reconnect the pieces come again. */
static int nbd_co_read_stream(StrataNode *node, uint64_t offset,
                              uint64_t bytes, StrataReadSink sink,
                              void *opaque, StrataStreamFlags flags)
{
    NbdState *s = node->opaque;
    NbdReq t = { .type = STRATA_NBD_CMD_READ, .offset = offset,
                 .len = bytes, .sink = sink, .sink_opaque = opaque,
                 .sink_any_thread = flags & STRATA_STREAM_ANY_THREAD };

    return nbd_co_request(s, &t, 0, NULL, 0);
}

static int nbd_co_flush(StrataNode *node);

/* A server without FUA: the data is made stable by a flush instead. */
static int nbd_co_fua_fallback(StrataNode *node, StrataReqFlags flags,
                               uint16_t sent, int ret)
{
    if (ret == 0 && (flags & STRATA_REQ_FUA) &&
        !(sent & STRATA_NBD_CMD_FLAG_FUA)) {
        ret = nbd_co_flush(node);
    }
    return ret;
}

static int nbd_co_pwritev(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    NbdState *s = node->opaque;
    NbdReq t = { .type = STRATA_NBD_CMD_WRITE, .offset = offset,
                 .len = bytes };
    uint16_t f = 0;

    if (s->info.tflags & STRATA_NBD_FLAG_READ_ONLY) {
        return -EACCES;
    }
    if (bytes == 0) {
        return 0;
    }
    if ((flags & STRATA_REQ_FUA) && (s->info.tflags & STRATA_NBD_FLAG_SEND_FUA)) {
        f |= STRATA_NBD_CMD_FLAG_FUA;
    }
    int ret = nbd_co_request(s, &t, f, qiov, qiov_offset);
    return nbd_co_fua_fallback(node, flags, f, ret);
}

static int nbd_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                uint64_t bytes, StrataReqFlags flags)
{
    NbdState *s = node->opaque;
    uint16_t f = 0;

    if (!(s->info.tflags & STRATA_NBD_FLAG_SEND_WRITE_ZEROES)) {
        return -ENOTSUP;
    }
    if (bytes > UINT32_MAX) {
        return -EINVAL;
    }
    if (!(flags & STRATA_REQ_MAY_UNMAP)) {
        f |= STRATA_NBD_CMD_FLAG_NO_HOLE;
    }
    if ((flags & STRATA_REQ_FUA) && (s->info.tflags & STRATA_NBD_FLAG_SEND_FUA)) {
        f |= STRATA_NBD_CMD_FLAG_FUA;
    }
    int ret = nbd_co_simple(s, STRATA_NBD_CMD_WRITE_ZEROES, f, offset,
                            bytes);
    return nbd_co_fua_fallback(node, flags, f, ret);
}

static int nbd_co_pdiscard(StrataNode *node, uint64_t offset, uint64_t bytes)
{
    NbdState *s = node->opaque;

    if (!(s->info.tflags & STRATA_NBD_FLAG_SEND_TRIM)) {
        return -ENOTSUP;
    }
    if (bytes > UINT32_MAX) {
        return -EINVAL;
    }
    return nbd_co_simple(s, STRATA_NBD_CMD_TRIM, 0, offset, bytes);
}

static int nbd_co_flush(StrataNode *node)
{
    NbdState *s = node->opaque;

    if (!(s->info.tflags & STRATA_NBD_FLAG_SEND_FLUSH)) {
        return 0;
    }
    return nbd_co_simple(s, STRATA_NBD_CMD_FLUSH, 0, 0, 0);
}

static int nbd_co_block_status(StrataNode *node, bool want_zero,
                               uint64_t offset, uint64_t bytes,
                               uint64_t *pnum, uint64_t *map,
                               StrataNode **file)
{
    NbdState *s = node->opaque;
    uint32_t align = MAX(s->info.min_block, 1);
    uint64_t len = MIN(bytes, (uint64_t)(UINT32_MAX & ~(align - 1)));
    NbdReq t = { .type = STRATA_NBD_CMD_BLOCK_STATUS, .offset = offset,
                 .len = len };
    int ret;

    *map = offset;
    *file = node;
    if (!s->info.meta_ok) {
        *pnum = bytes;
        return STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
    }
    ret = nbd_co_request(s, &t, STRATA_NBD_CMD_FLAG_REQ_ONE, NULL, 0);
    if (ret < 0) {
        return ret;
    }
    if (t.bs_len == 0) {
        return -EIO;
    }
    /* A server may describe more than was asked; only the asked part
     * counts, and an unaligned tail is rounded down to the block. */
    *pnum = MIN((uint64_t)t.bs_len, len);
    if (*pnum > align && (*pnum & (align - 1))) {
        *pnum &= ~(uint64_t)(align - 1);
    }
    ret = STRATA_BLOCK_OFFSET_VALID;
    if (!(t.bs_flags & STRATA_NBD_STATE_HOLE)) {
        ret |= STRATA_BLOCK_DATA;
    }
    if (t.bs_flags & STRATA_NBD_STATE_ZERO) {
        ret |= STRATA_BLOCK_ZERO;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Open and close                                                      */
/* ------------------------------------------------------------------ */

/* The node's filename as QEMU writes it; an empty export name is left
 * out of the URI.  *@addr_text: the server as connect errors name it. */
static char *nbd_filename(JsonObject *options, const char *export_name,
                          char **addr_text)
{
    const char *type = strata_opts_get_string(options, "server.type", "");
    bool has_export = export_name[0] != 0;

    if (!strcmp(type, "unix")) {
        const char *path = strata_opts_get_string(options, "server.path", "");

        *addr_text = g_strdup(path);
        return g_strdup_printf("nbd+unix://%s%s?socket=%s",
                               has_export ? "/" : "", export_name, path);
    }
    const char *host = strata_opts_get_string(options, "server.host", "");
    const char *port = strata_opts_get_string(options, "server.port",
                                              "10809");
    g_autofree char *h = strchr(host, ':') ? g_strdup_printf("[%s]", host)
                                           : g_strdup(host);

    *addr_text = g_strdup_printf("%s:%s", host, port);
    return g_strdup_printf("nbd://%s:%s%s%s", h, port,
                           has_export ? "/" : "", export_name);
}

static void nbd_close(StrataNode *node)
{
    NbdState *s = node->opaque;
    bool was_connected = s->state == NBD_CONNECTED;

    s->state = NBD_QUIT;
    if (s->fd >= 0) {
        if (was_connected) {
            /* Best effort: the server may be gone already. */
            uint8_t hdr[STRATA_NBD_REQUEST_SIZE] = { 0 };
            nbd_put32(hdr, STRATA_NBD_REQUEST_MAGIC);
            nbd_put16(hdr + 6, STRATA_NBD_CMD_DISC);
            if (send(s->fd, hdr, sizeof(hdr), MSG_DONTWAIT | MSG_NOSIGNAL)) {
                /* nothing to do either way */
            }
        }
        /* Ends the reader, and a handshake the reconnect is in. */
        shutdown(s->fd, SHUT_RDWR);
    }
    if (s->retry_timer) {
        retry_timer_cb(s);
    }
    strata_co_queue_restart_all(&s->reconnect_wait);
    while (s->reader_running || s->reconnect_running) {
        strata_loop_iterate(node->ctx->loop, true);
    }
    nbd_close_fd(s);
    g_clear_pointer(&s->retry_timer, strata_timer_free);
    g_clear_pointer(&s->delay_timer, strata_timer_free);
    g_clear_object(&s->addr);
    g_clear_pointer(&s->addr_text, g_free);
    g_clear_pointer(&s->export_name, g_free);
    g_clear_pointer(&s->stage, g_free);
}

static bool nbd_open(StrataNode *node, JsonObject *options, GError **error)
{
    NbdState *s = node->opaque;
    NbdOpenCo oc = { s, NULL, false };
    JsonNode *server = json_object_get_member(options, "server");

    s->node = node;
    s->fd = -1;
    s->state = NBD_QUIT;
    strata_co_mutex_init(&s->send_lock);
    strata_co_queue_init(&s->slot_wait);
    strata_co_queue_init(&s->reconnect_wait);
    strata_co_queue_init(&s->reader_gone);
    s->retry_timer = strata_timer_new(node->ctx->loop, retry_timer_cb, s);
    s->delay_timer = strata_timer_new(node->ctx->loop, delay_timer_cb, s);
    if (!server || !JSON_NODE_HOLDS_OBJECT(server)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter type for 'server', expected: object");
        nbd_close(node);
        return false;
    }
    s->export_name = g_strdup(strata_opts_get_string(options, "export", ""));
    if (strlen(s->export_name) > STRATA_NBD_MAX_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "export name too long to send to server");
        nbd_close(node);
        return false;
    }
    s->reconnect_delay_s = strata_opts_get_int(options, "reconnect-delay", 0);
    s->open_timeout_s = strata_opts_get_int(options, "open-timeout", 0);
    if (s->reconnect_delay_s < 0 || s->reconnect_delay_s > UINT32_MAX ||
        s->open_timeout_s < 0 || s->open_timeout_s > UINT32_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s' expects uint32_t",
                    s->open_timeout_s < 0 || s->open_timeout_s > UINT32_MAX ?
                    "open-timeout" : "reconnect-delay");
        nbd_close(node);
        return false;
    }
    g_free(node->filename);
    node->filename = nbd_filename(options, s->export_name, &s->addr_text);
    s->addr = nbd_parse_addr(options, error);
    if (!s->addr) {
        nbd_close(node);
        return false;
    }

    strata_loop_run_co(node->ctx->loop, nbd_open_entry, &oc);
    if (!oc.ok) {
        g_propagate_error(error, oc.error);
        nbd_close(node);
        return false;
    }
    s->info = s->neg;
    if (s->info.size > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Export size %" PRIu64 " is too large", s->info.size);
        nbd_close(node);
        return false;
    }
    if (!node->read_only && (s->info.tflags & STRATA_NBD_FLAG_READ_ONLY)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "export '%s' is read-only", s->export_name);
        nbd_close(node);
        return false;
    }

    node->limits.request_alignment = MAX(s->info.min_block, 1);
    node->limits.buf_align = 1;
    node->limits.max_transfer = s->info.max_block ?
        MIN(s->info.max_block, STRATA_NBD_MAX_BUFFER) : STRATA_NBD_MAX_BUFFER;
    node->limits.max_transfer &= ~(uint64_t)(node->limits.request_alignment -
                                             1);
    node->limits.max_pwrite_zeroes = UINT32_MAX &
        ~(uint64_t)(node->limits.request_alignment - 1);
    node->limits.pdiscard_alignment = node->limits.request_alignment;

    s->state = NBD_CONNECTED;
    nbd_start_reader(s);
    return true;
}

static bool nbd_can_multi_conn(StrataNode *node)
{
    NbdState *s = node->opaque;

    return s->state == NBD_CONNECTED &&
           (s->info.tflags & STRATA_NBD_FLAG_CAN_MULTI_CONN);
}

const StrataDriver strata_driver_nbd = {
    .name = "nbd",
    .state_size = sizeof(NbdState),
    .has_filename = true,
    .receives_on_loop = true,
    .can_multi_conn = nbd_can_multi_conn,
    .options = nbd_options,
    .open = nbd_open,
    .close = nbd_close,
    .co_get_length = nbd_co_get_length,
    .co_preadv = nbd_co_preadv,
    .co_read_stream = nbd_co_read_stream,
    .co_pwritev = nbd_co_pwritev,
    .supports_fua = true,
    .co_pwrite_zeroes = nbd_co_pwrite_zeroes,
    .co_pdiscard = nbd_co_pdiscard,
    .co_flush = nbd_co_flush,
    .co_block_status = nbd_co_block_status,
};
