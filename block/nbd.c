/* strata — the NBD client driver: a node whose data lives on an NBD
 * server (qemu-nbd, qemu-storage-daemon, another strata).
 *
 * One connection per node, non-blocking, on the context's GMainContext.
 * Negotiation (fixed newstyle, structured replies, base:allocation, GO)
 * runs in a coroutine while open() iterates the loop, so a server living
 * in the same process keeps being served.  After that one reader
 * coroutine owns the receiving side: it reads each reply header, finds
 * the request by its cookie and stores the payload straight into that
 * request's buffers, then wakes the request's coroutine.  Senders take
 * turns under a send lock, so many requests are in flight at once.
 *
 * The server is not trusted: every length, offset and count it sends is
 * checked, and a reply that breaks the protocol ends the connection;
 * requests in flight then fail with -EIO.  Reconnecting
 * (reconnect-delay) is not done yet: the option is accepted and a lost
 * connection fails every later request.
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

/* Requests in flight on one connection. */
#define NBD_MAX_REQS 16
/* Option replies we read whole; larger ones are skipped or refused. */
#define NBD_MAX_OPT_REPLY (64 * 1024)
/* How long the server may take to answer the handshake. */
#define NBD_HANDSHAKE_NS (30 * G_GINT64_CONSTANT(1000000000))

typedef struct NbdReq {
    bool in_use;
    bool sent;
    bool done;                /* the final chunk has been read */
    StrataCoroutine *waiter;  /* set while the owner yields for the reply */
    int ret;
    uint16_t type;
    uint64_t offset;
    uint32_t len;
    StrataIOVec *qiov;        /* READ */
    size_t qiov_offset;
    bool bs_got;              /* BLOCK_STATUS: first extent */
    uint32_t bs_len;
    uint32_t bs_flags;
} NbdReq;

typedef struct NbdState {
    StrataNode *node;
    int fd;
    GSocketAddress *addr;
    char *export_name;
    int64_t open_timeout_s;
    int64_t reconnect_delay_s;

    uint64_t size;
    uint16_t tflags;
    bool structured;
    bool meta_ok;
    uint32_t meta_id;
    uint32_t min_block, pref_block, max_block;

    bool dead;                /* the connection is gone */
    bool reader_running;
    StrataCoMutex send_lock;
    NbdReq reqs[NBD_MAX_REQS];
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
    return (StrataNbdSock){ s->fd, s->node->ctx->loop, NULL };
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
    s->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                   0);
    if (s->fd < 0) {
        return -errno;
    }
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
    close(s->fd);
    s->fd = -1;
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
        s->structured = true;
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
            s->meta_ok = false;
            return true;
        }
        if (type != STRATA_NBD_REP_META_CONTEXT || len < 4) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Unexpected meta context reply");
            return false;
        }
        if (len - 4 == qlen &&
            !memcmp(data + 4, STRATA_NBD_META_BASE_ALLOCATION, qlen)) {
            s->meta_ok = true;
            s->meta_id = nbd_get32(data);
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
                        len ? ": " : "", len ? msg : "");
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
            s->size = nbd_get64(data + 2);
            s->tflags = nbd_get16(data + 10);
            have_export = true;
            break;
        case STRATA_NBD_INFO_BLOCK_SIZE:
            if (len != 14) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Block size info of bad length %" PRIu32, len);
                return false;
            }
            s->min_block = nbd_get32(data + 2);
            s->pref_block = nbd_get32(data + 6);
            s->max_block = nbd_get32(data + 10);
            if (s->min_block == 0 || s->min_block > 65536 ||
                (s->min_block & (s->min_block - 1)) ||
                s->max_block < s->min_block) {
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
    if (s->structured && !nbd_co_opt_meta(s, error)) {
        return false;
    }
    return nbd_co_opt_go(s, error);
}

typedef struct {
    NbdState *s;
    GError *error;
    bool ok;
} NbdOpenCo;

static void handshake_timeout(void *opaque)
{
    NbdState *s = opaque;

    if (s->fd >= 0) {
        shutdown(s->fd, SHUT_RDWR);
    }
}

static void nbd_open_entry(void *opaque)
{
    NbdOpenCo *oc = opaque;
    NbdState *s = oc->s;
    StrataLoop *loop = s->node->ctx->loop;
    int64_t deadline = strata_clock_ns() +
                       s->open_timeout_s * G_GINT64_CONSTANT(1000000000);
    StrataTimer *timer;
    int ret;

    /* With open-timeout, a server that is not up yet is retried. */
    while ((ret = nbd_co_connect(s)) < 0 && strata_clock_ns() < deadline) {
        strata_loop_co_sleep_ns(loop, 100 * 1000 * 1000);
    }
    if (ret < 0) {
        g_set_error(&oc->error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to connect to the NBD server: %s",
                    g_strerror(-ret));
        return;
    }
    timer = strata_timer_new(loop, handshake_timeout, s);
    strata_timer_mod(timer, strata_clock_ns() + NBD_HANDSHAKE_NS);
    oc->ok = nbd_co_handshake(s, &oc->error);
    strata_timer_del(timer);
    strata_timer_free(timer);
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

/* Fails every request in flight: the connection is gone. */
static void nbd_set_dead(NbdState *s)
{
    s->dead = true;
    if (s->fd >= 0) {
        shutdown(s->fd, SHUT_RDWR);
    }
    for (int i = 0; i < NBD_MAX_REQS; i++) {
        NbdReq *r = &s->reqs[i];
        if (r->in_use && !r->done) {
            r->ret = -EIO;
            nbd_req_complete(r);
        }
    }
    strata_co_queue_restart_all(&s->slot_wait);
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
        return nbd_co_read_qiov(s, r->qiov,
                                r->qiov_offset + (off - r->offset), dlen);
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
        strata_iov_memset(r->qiov, r->qiov_offset + (off - r->offset), 0,
                          hlen);
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
        if (!s->meta_ok || nbd_get32(buf) != s->meta_id || r->bs_got) {
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

    while (!s->dead && ret == 0) {
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
                if (s->structured) {
                    ret = -EPROTO;
                    break;
                }
                ret = nbd_co_read_qiov(s, r->qiov, r->qiov_offset, r->len);
                if (ret < 0) {
                    break;
                }
            } else if (r->type == STRATA_NBD_CMD_BLOCK_STATUS) {
                ret = -EPROTO;
                break;
            }
            nbd_req_complete(r);
        } else if (nbd_get32(hdr) == STRATA_NBD_STRUCTURED_REPLY_MAGIC &&
                   s->structured) {
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
    nbd_set_dead(s);
    s->reader_running = false;
}

/* ------------------------------------------------------------------ */
/* Requests                                                            */
/* ------------------------------------------------------------------ */

/*
 * Sends one request and waits for its whole reply.  @qiov: the data of
 * a WRITE, or the buffer a READ fills.  Returns 0 or -errno.
 */
static int nbd_co_request(NbdState *s, NbdReq *tmpl, uint16_t flags,
                          StrataIOVec *qiov, size_t qiov_offset)
{
    uint8_t hdr[STRATA_NBD_REQUEST_SIZE];
    NbdReq *r = NULL;
    int i, ret;

    while (!s->dead && s->nreqs >= NBD_MAX_REQS) {
        strata_co_queue_wait(&s->slot_wait, NULL);
    }
    if (s->dead) {
        return -EIO;
    }
    for (i = 0; i < NBD_MAX_REQS; i++) {
        if (!s->reqs[i].in_use) {
            r = &s->reqs[i];
            break;
        }
    }
    g_return_val_if_fail(r != NULL, -EIO);
    *r = *tmpl;
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
    r->sent = true;
    ret = s->dead ? -EIO : nbd_co_write_full(s, hdr, sizeof(hdr));
    if (ret == 0 && r->type == STRATA_NBD_CMD_WRITE) {
        ret = nbd_co_write_qiov(s, qiov, qiov_offset, r->len);
    }
    strata_co_mutex_unlock(&s->send_lock);
    if (ret < 0 && !s->dead) {
        nbd_set_dead(s);
    }
    if (!r->done) {
        r->waiter = strata_coroutine_self();
        strata_co_yield();
    }
    ret = r->ret;
    *tmpl = *r;
    memset(r, 0, sizeof(*r));
    s->nreqs--;
    strata_co_queue_next(&s->slot_wait);
    return ret;
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

    return s->size;
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

    if (s->tflags & STRATA_NBD_FLAG_READ_ONLY) {
        return -EACCES;
    }
    if (bytes == 0) {
        return 0;
    }
    if ((flags & STRATA_REQ_FUA) && (s->tflags & STRATA_NBD_FLAG_SEND_FUA)) {
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

    if (!(s->tflags & STRATA_NBD_FLAG_SEND_WRITE_ZEROES)) {
        return -ENOTSUP;
    }
    if (bytes > UINT32_MAX) {
        return -EINVAL;
    }
    if (!(flags & STRATA_REQ_MAY_UNMAP)) {
        f |= STRATA_NBD_CMD_FLAG_NO_HOLE;
    }
    if ((flags & STRATA_REQ_FUA) && (s->tflags & STRATA_NBD_FLAG_SEND_FUA)) {
        f |= STRATA_NBD_CMD_FLAG_FUA;
    }
    int ret = nbd_co_simple(s, STRATA_NBD_CMD_WRITE_ZEROES, f, offset,
                            bytes);
    return nbd_co_fua_fallback(node, flags, f, ret);
}

static int nbd_co_pdiscard(StrataNode *node, uint64_t offset, uint64_t bytes)
{
    NbdState *s = node->opaque;

    if (!(s->tflags & STRATA_NBD_FLAG_SEND_TRIM)) {
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

    if (!(s->tflags & STRATA_NBD_FLAG_SEND_FLUSH)) {
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
    uint32_t align = MAX(s->min_block, 1);
    uint64_t len = MIN(bytes, (uint64_t)(UINT32_MAX & ~(align - 1)));
    NbdReq t = { .type = STRATA_NBD_CMD_BLOCK_STATUS, .offset = offset,
                 .len = len };
    int ret;

    *map = offset;
    *file = node;
    if (!s->meta_ok) {
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

static char *nbd_filename(JsonObject *options, const char *export_name)
{
    const char *type = strata_opts_get_string(options, "server.type", "");

    if (!strcmp(type, "unix")) {
        return g_strdup_printf("nbd+unix:///%s?socket=%s", export_name,
                               strata_opts_get_string(options, "server.path",
                                                      ""));
    }
    return g_strdup_printf("nbd://%s:%s/%s",
                           strata_opts_get_string(options, "server.host", ""),
                           strata_opts_get_string(options, "server.port",
                                                  "10809"),
                           export_name);
}

static void nbd_close(StrataNode *node)
{
    NbdState *s = node->opaque;

    if (s->fd >= 0) {
        if (!s->dead) {
            /* Best effort: the server may be gone already. */
            uint8_t hdr[STRATA_NBD_REQUEST_SIZE] = { 0 };
            nbd_put32(hdr, STRATA_NBD_REQUEST_MAGIC);
            nbd_put16(hdr + 6, STRATA_NBD_CMD_DISC);
            if (send(s->fd, hdr, sizeof(hdr), MSG_DONTWAIT | MSG_NOSIGNAL)) {
                /* nothing to do either way */
            }
        }
        shutdown(s->fd, SHUT_RDWR);
        while (s->reader_running) {
            strata_loop_iterate(node->ctx->loop, true);
        }
        close(s->fd);
        s->fd = -1;
    }
    g_clear_object(&s->addr);
    g_clear_pointer(&s->export_name, g_free);
}

static bool nbd_open(StrataNode *node, JsonObject *options, GError **error)
{
    NbdState *s = node->opaque;
    NbdOpenCo oc = { s, NULL, false };
    JsonNode *server = json_object_get_member(options, "server");

    s->node = node;
    s->fd = -1;
    strata_co_mutex_init(&s->send_lock);
    strata_co_queue_init(&s->slot_wait);
    if (!server || !JSON_NODE_HOLDS_OBJECT(server)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter type for 'server', expected: object");
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
    if (!(s->tflags & STRATA_NBD_FLAG_HAS_FLAGS)) {
        s->tflags = 0;
    }
    if (s->size > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Export size %" PRIu64 " is too large", s->size);
        nbd_close(node);
        return false;
    }
    if (!node->read_only && (s->tflags & STRATA_NBD_FLAG_READ_ONLY)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "export '%s' is read-only", s->export_name);
        nbd_close(node);
        return false;
    }

    node->limits.request_alignment = MAX(s->min_block, 1);
    node->limits.buf_align = 1;
    node->limits.max_transfer = s->max_block ?
        MIN(s->max_block, STRATA_NBD_MAX_BUFFER) : STRATA_NBD_MAX_BUFFER;
    node->limits.max_transfer &= ~(uint64_t)(node->limits.request_alignment -
                                             1);
    node->limits.max_pwrite_zeroes = UINT32_MAX &
        ~(uint64_t)(node->limits.request_alignment - 1);
    node->limits.pdiscard_alignment = node->limits.request_alignment;
    g_free(node->filename);
    node->filename = nbd_filename(options, s->export_name);

    s->reader_running = true;
    strata_coroutine_enter(strata_coroutine_new(nbd_reader_entry, s));
    return true;
}

const StrataDriver strata_driver_nbd = {
    .name = "nbd",
    .state_size = sizeof(NbdState),
    .has_filename = true,
    .options = nbd_options,
    .open = nbd_open,
    .close = nbd_close,
    .co_get_length = nbd_co_get_length,
    .co_preadv = nbd_co_preadv,
    .co_pwritev = nbd_co_pwritev,
    .supports_fua = true,
    .co_pwrite_zeroes = nbd_co_pwrite_zeroes,
    .co_pdiscard = nbd_co_pdiscard,
    .co_flush = nbd_co_flush,
    .co_block_status = nbd_co_block_status,
};
