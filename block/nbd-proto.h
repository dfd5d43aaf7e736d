/* strata — NBD wire constants (the protocol as NetworkBlockDevice's
 * doc/proto.md defines it).  Every number on the wire is big-endian;
 * the server packs and unpacks fields by hand, so no struct here is
 * laid over wire bytes. */
#ifndef STRATA_NBD_PROTO_H
#define STRATA_NBD_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <glib.h>

#include "../util/loop-private.h"

/* ---- handshake (fixed newstyle) ---- */

/* The server opens with these two 64-bit magics and 16 bits of flags. */
#define STRATA_NBD_INIT_MAGIC        UINT64_C(0x4e42444d41474943) /* NBDMAGIC */
#define STRATA_NBD_OPTS_MAGIC        UINT64_C(0x49484156454f5054) /* IHAVEOPT */
/* Every option reply starts with this. */
#define STRATA_NBD_REP_MAGIC         UINT64_C(0x0003e889045565a9)

/* Handshake flags the server offers. */
#define STRATA_NBD_FLAG_FIXED_NEWSTYLE  (1u << 0)
#define STRATA_NBD_FLAG_NO_ZEROES       (1u << 1)
/* The client's answer: the same bits, as 32-bit client flags. */
#define STRATA_NBD_CFLAG_FIXED_NEWSTYLE (1u << 0)
#define STRATA_NBD_CFLAG_NO_ZEROES      (1u << 1)

/* Options a client sends during negotiation. */
enum {
    STRATA_NBD_OPT_EXPORT_NAME = 1,
    STRATA_NBD_OPT_ABORT = 2,
    STRATA_NBD_OPT_LIST = 3,
    STRATA_NBD_OPT_PEEK_EXPORT = 4,   /* withdrawn from the protocol */
    STRATA_NBD_OPT_STARTTLS = 5,
    STRATA_NBD_OPT_INFO = 6,
    STRATA_NBD_OPT_GO = 7,
    STRATA_NBD_OPT_STRUCTURED_REPLY = 8,
    STRATA_NBD_OPT_LIST_META_CONTEXT = 9,
    STRATA_NBD_OPT_SET_META_CONTEXT = 10,
};

/* Option reply types; the error ones have the top bit set. */
#define STRATA_NBD_REP_ERR(n)   ((1u << 31) | (n))
enum {
    STRATA_NBD_REP_ACK = 1,
    STRATA_NBD_REP_SERVER = 2,
    STRATA_NBD_REP_INFO = 3,
    STRATA_NBD_REP_META_CONTEXT = 4,
};
#define STRATA_NBD_REP_ERR_UNSUP          STRATA_NBD_REP_ERR(1)
#define STRATA_NBD_REP_ERR_POLICY         STRATA_NBD_REP_ERR(2)
#define STRATA_NBD_REP_ERR_INVALID        STRATA_NBD_REP_ERR(3)
#define STRATA_NBD_REP_ERR_PLATFORM       STRATA_NBD_REP_ERR(4)
#define STRATA_NBD_REP_ERR_TLS_REQD       STRATA_NBD_REP_ERR(5)
#define STRATA_NBD_REP_ERR_UNKNOWN        STRATA_NBD_REP_ERR(6)
#define STRATA_NBD_REP_ERR_SHUTDOWN       STRATA_NBD_REP_ERR(7)
#define STRATA_NBD_REP_ERR_BLOCK_SIZE_REQD STRATA_NBD_REP_ERR(8)
#define STRATA_NBD_REP_ERR_TOO_BIG        STRATA_NBD_REP_ERR(9)

/* Information items of NBD_OPT_INFO / NBD_OPT_GO. */
enum {
    STRATA_NBD_INFO_EXPORT = 0,      /* u64 size, u16 transmission flags */
    STRATA_NBD_INFO_NAME = 1,        /* the export's full name */
    STRATA_NBD_INFO_DESCRIPTION = 2, /* free text */
    STRATA_NBD_INFO_BLOCK_SIZE = 3,  /* u32 minimum, preferred, maximum */
};

/* Transmission flags: what the export supports. */
#define STRATA_NBD_FLAG_HAS_FLAGS        (1u << 0)
#define STRATA_NBD_FLAG_READ_ONLY        (1u << 1)
#define STRATA_NBD_FLAG_SEND_FLUSH       (1u << 2)
#define STRATA_NBD_FLAG_SEND_FUA         (1u << 3)
#define STRATA_NBD_FLAG_ROTATIONAL       (1u << 4)
#define STRATA_NBD_FLAG_SEND_TRIM        (1u << 5)
#define STRATA_NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define STRATA_NBD_FLAG_SEND_DF          (1u << 7)
#define STRATA_NBD_FLAG_CAN_MULTI_CONN   (1u << 8)
#define STRATA_NBD_FLAG_SEND_RESIZE      (1u << 9)
#define STRATA_NBD_FLAG_SEND_CACHE       (1u << 10)
#define STRATA_NBD_FLAG_SEND_FAST_ZERO   (1u << 11)

/* The 124 zero bytes that end an NBD_OPT_EXPORT_NAME answer unless the
 * client asked for NO_ZEROES. */
#define STRATA_NBD_EXPORT_NAME_PAD 124

/* ---- transmission ---- */

#define STRATA_NBD_REQUEST_MAGIC     UINT32_C(0x25609513)
#define STRATA_NBD_SIMPLE_REPLY_MAGIC UINT32_C(0x67446698)
#define STRATA_NBD_STRUCTURED_REPLY_MAGIC UINT32_C(0x668e33ef)

/* Request: magic u32, flags u16, type u16, cookie u64, offset u64,
 * length u32. */
#define STRATA_NBD_REQUEST_SIZE 28
/* Simple reply: magic u32, error u32, cookie u64. */
#define STRATA_NBD_SIMPLE_REPLY_SIZE 16
/* Structured reply chunk header: magic u32, flags u16, type u16,
 * cookie u64, payload length u32. */
#define STRATA_NBD_CHUNK_HEADER_SIZE 20

/* Command flags. */
#define STRATA_NBD_CMD_FLAG_FUA        (1u << 0)
#define STRATA_NBD_CMD_FLAG_NO_HOLE    (1u << 1)
#define STRATA_NBD_CMD_FLAG_DF         (1u << 2)
#define STRATA_NBD_CMD_FLAG_REQ_ONE    (1u << 3)
#define STRATA_NBD_CMD_FLAG_FAST_ZERO  (1u << 4)

enum {
    STRATA_NBD_CMD_READ = 0,
    STRATA_NBD_CMD_WRITE = 1,
    STRATA_NBD_CMD_DISC = 2,
    STRATA_NBD_CMD_FLUSH = 3,
    STRATA_NBD_CMD_TRIM = 4,
    STRATA_NBD_CMD_CACHE = 5,
    STRATA_NBD_CMD_WRITE_ZEROES = 6,
    STRATA_NBD_CMD_BLOCK_STATUS = 7,
};

/* Structured reply chunk flags and types. */
#define STRATA_NBD_REPLY_FLAG_DONE (1u << 0)
#define STRATA_NBD_REPLY_TYPE_ERR(n) ((1u << 15) | (n))
enum {
    STRATA_NBD_REPLY_TYPE_NONE = 0,
    STRATA_NBD_REPLY_TYPE_OFFSET_DATA = 1,  /* u64 offset, data */
    STRATA_NBD_REPLY_TYPE_OFFSET_HOLE = 2,  /* u64 offset, u32 length */
    STRATA_NBD_REPLY_TYPE_BLOCK_STATUS = 5, /* u32 context, extents */
};
/* u32 error, u16 message length, message */
#define STRATA_NBD_REPLY_TYPE_ERROR        STRATA_NBD_REPLY_TYPE_ERR(1)
/* as ERROR, then u64 offset */
#define STRATA_NBD_REPLY_TYPE_ERROR_OFFSET STRATA_NBD_REPLY_TYPE_ERR(2)

/* Error numbers on the wire (fixed, whatever the host's errno values). */
enum {
    STRATA_NBD_EPERM = 1,
    STRATA_NBD_EIO = 5,
    STRATA_NBD_ENOMEM = 12,
    STRATA_NBD_EINVAL = 22,
    STRATA_NBD_ENOSPC = 28,
    STRATA_NBD_EOVERFLOW = 75,
    STRATA_NBD_ENOTSUP = 95,
    STRATA_NBD_ESHUTDOWN = 108,
};

/* base:allocation extent flags. */
#define STRATA_NBD_STATE_HOLE (1u << 0)
#define STRATA_NBD_STATE_ZERO (1u << 1)

/* Meta contexts this server offers, and the ids it gives them. */
#define STRATA_NBD_META_BASE_ALLOCATION "base:allocation"
#define STRATA_NBD_META_ALLOCATION_DEPTH "qemu:allocation-depth"
enum {
    STRATA_NBD_META_ID_BASE_ALLOCATION = 0,
    STRATA_NBD_META_ID_ALLOCATION_DEPTH = 1,
};

/* Limits (as QEMU's): names and descriptions on the wire, and the
 * largest READ or WRITE payload. */
#define STRATA_NBD_MAX_STRING 4096
#define STRATA_NBD_MAX_BUFFER (32u * 1024 * 1024)

/* The server's requests in flight per connection, and the payload
 * bytes they may hold between them (see export-nbd.c). */
#define STRATA_NBD_SERVER_MAX_REQS 64
#define STRATA_NBD_SERVER_MAX_REQ_BYTES (16 * (uint64_t)STRATA_NBD_MAX_BUFFER)

/* ---- big-endian fields, as every NBD structure is laid out ---- */

static inline void nbd_put16(uint8_t *p, uint16_t v)
{
    p[0] = v >> 8;
    p[1] = v;
}

static inline void nbd_put32(uint8_t *p, uint32_t v)
{
    nbd_put16(p, v >> 16);
    nbd_put16(p + 2, v);
}

static inline void nbd_put64(uint8_t *p, uint64_t v)
{
    nbd_put32(p, v >> 32);
    nbd_put32(p + 4, v);
}

static inline uint16_t nbd_get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t nbd_get32(const uint8_t *p)
{
    return (uint32_t)nbd_get16(p) << 16 | nbd_get16(p + 2);
}

static inline uint64_t nbd_get64(const uint8_t *p)
{
    return (uint64_t)nbd_get32(p) << 32 | nbd_get32(p + 4);
}

/* ---- a non-blocking socket driven from coroutines (nbd-sock.c) ---- */

/* Bytes received ahead of what was asked: small reads (headers) are
 * served from here, so one recv() takes in many of them. */
typedef struct StrataNbdRBuf {
    size_t pos, end;
    uint8_t data[16 * 1024];
} StrataNbdRBuf;

/* Watches one socket for as long as it is open (nbd-sock.c). */
typedef struct StrataNbdWatch StrataNbdWatch;

typedef struct StrataNbdSock {
    int fd;
    StrataLoop *loop;
    StrataNbdWatch *watch;  /* nullable: a one-shot source per wait */
    const bool *closing;    /* nullable: reads give -ESHUTDOWN once set */
    StrataNbdRBuf *rbuf;    /* nullable: unbuffered; else everything read
                             * from @fd must go through this socket */
    /* Large reads may be one recv(MSG_WAITALL) on the loop's ring (see
     * NBD_RING_RECV_MIN): only where every buffer read into outlives a
     * shutdown() of @fd, since the kernel may still fill it after one. */
    bool ring_recv;
} StrataNbdSock;

/* A watch on @fd for the sockets' waits, in @loop's context; freed
 * before @fd is closed, with nobody waiting on it. */
StrataNbdWatch *strata_nbd_watch_new(StrataLoop *loop, int fd);
void strata_nbd_watch_free(StrataNbdWatch *w);

/* Coroutine only: yields until the socket is ready for @cond (G_IO_IN or
 * G_IO_OUT; at most one waiter for each on a watch) or hung up. */
void strata_nbd_co_wait_fd(StrataNbdSock *sk, GIOCondition cond);
/* Coroutine only: exactly @len bytes; 0 or -errno (-ECONNRESET at EOF). */
int strata_nbd_co_read_full(StrataNbdSock *sk, void *buf, size_t len);
/* Coroutine only: reads and drops @len bytes. */
int strata_nbd_co_skip(StrataNbdSock *sk, uint64_t len);
/* A worker thread's: exactly @len bytes off @fd (non-blocking or not),
 * waiting in poll() while there are none; 0 or -errno (-ECONNRESET at
 * EOF or once the socket is shut down).  Never on the loop's thread. */
int strata_nbd_recv_full(int fd, void *buf, size_t len);
/* Coroutine only: every byte of @iov (at most STRATA_NBD_MAX_IOV
 * elements). */
#define STRATA_NBD_MAX_IOV 64
int strata_nbd_co_writev_full(StrataNbdSock *sk, const struct iovec *iov,
                              int niov);
int strata_nbd_co_write_full(StrataNbdSock *sk, const void *buf, size_t len);

/* Sets a connected socket up for large transfers (a send buffer of a few
 * MiB, as far as net.core.wmem_max allows); failures are harmless. */
void strata_nbd_sock_tune(int fd);

#endif
