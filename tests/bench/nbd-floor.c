/* The least an NBD server or client can do: the floor under bench-nbd.py's
 * rows, measured in the same rounds as strata and QEMU.
 *
 *   nbd-floor serve SOCKET FILE direct|cached [structured]
 *       Serves FILE (any export name) on a UNIX socket until killed: one
 *       thread, one io_uring for the socket's receives and the file's
 *       reads, writes and flushes, and the replies of one pass over the
 *       completions gathered into one sendmsg().  No coroutines, no
 *       graph, no checks beyond what keeps it from overrunning its
 *       buffers: what is left of a 4 KiB read when the server has no cost
 *       of its own is the client's and the disk's.  With "structured" it
 *       accepts structured replies, as QEMU's and strata's servers do, and
 *       answers in single chunks (a read: one OFFSET_DATA chunk): QEMU's
 *       client then reads each reply in four pieces instead of three.
 *
 *   nbd-floor copy SOCKET EXPORT OUTPUT CONNECTIONS DEPTH
 *       Reads the whole export into OUTPUT (an existing file of at least
 *       the export's size) over CONNECTIONS connections, DEPTH 2 MiB
 *       reads in flight on each, one thread per connection.  Each reply's
 *       payload is received 64 KiB at a time into a buffer of the
 *       thread's, which stays in the CPU's cache, and written from there
 *       with pwrite(): nothing else is done, no zero detection, no
 *       sparseness.  (Received straight into a shared mapping of OUTPUT
 *       instead, one copy fewer, it cost more: 0.31 s of CPU for a GiB
 *       into tmpfs against 0.25 s, the mapping's faults and teardown
 *       more than the copy out of the cache.)
 *
 * Otherwise simple replies only (the server declines structured replies
 * and meta contexts; QEMU's client and this one then do without).  Not a
 * server or client to use: a measuring instrument.
 */
#include <arpa/inet.h>
#include <endian.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbd-proto.h"

#define SERVE_SLOTS 64
#define SERVE_MAX_REQUEST (1u << 20)   /* advertised as the maximum block */
#define SERVE_RX_SIZE (8u << 20)
#define SERVE_RECV_TAG UINT64_MAX
#define COPY_REQUEST (2u << 20)
#define COPY_STAGE (64u << 10)

static bool read_full(int fd, void *buf, size_t len)
{
    char *p = buf;

    while (len) {
        ssize_t r = recv(fd, p, len, MSG_WAITALL);

        if (r <= 0) {
            return false;
        }
        p += r;
        len -= r;
    }
    return true;
}

static bool write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len) {
        ssize_t r = send(fd, p, len, MSG_NOSIGNAL);

        if (r <= 0) {
            return false;
        }
        p += r;
        len -= r;
    }
    return true;
}

/* Big-endian fields of the protocol's headers. */
static void put16(char *p, uint16_t v)
{
    v = htons(v);
    memcpy(p, &v, 2);
}

static void put32(char *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
}

static void put64(char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static uint16_t get16(const char *p)
{
    uint16_t v;

    memcpy(&v, p, 2);
    return ntohs(v);
}

static uint32_t get32(const char *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return ntohl(v);
}

static uint64_t get64(const char *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return be64toh(v);
}

/* ---- serve ---- */

typedef struct {
    char handle[8];         /* echoed as received */
    uint16_t type;
    uint32_t len;
    uint64_t off;
    bool busy;
    char *buf;              /* SERVE_MAX_REQUEST, aligned for O_DIRECT */
    char reply[32];
} ServeSlot;

typedef struct {
    int file;
    uint64_t size;
    bool structured_ok;     /* offered */
    bool structured;        /* taken by the current client */
    ServeSlot slots[SERVE_SLOTS];
} Server;

static bool opt_reply(int fd, uint32_t opt, uint32_t type, const char *data,
                      uint32_t len)
{
    char h[20];

    put64(h, STRATA_NBD_REP_MAGIC);
    put32(h + 8, opt);
    put32(h + 12, type);
    put32(h + 16, len);
    return write_full(fd, h, 20) && (!len || write_full(fd, data, len));
}

/* Fixed newstyle negotiation: true once the client is in transmission. */
static bool serve_handshake(Server *s, int fd)
{
    const uint16_t tflags = STRATA_NBD_FLAG_HAS_FLAGS |
                            STRATA_NBD_FLAG_SEND_FLUSH;
    char hello[18], cflags[4];

    memcpy(hello, "NBDMAGICIHAVEOPT", 16);
    put16(hello + 16,
          STRATA_NBD_FLAG_FIXED_NEWSTYLE | STRATA_NBD_FLAG_NO_ZEROES);
    if (!write_full(fd, hello, 18) || !read_full(fd, cflags, 4)) {
        return false;
    }
    for (;;) {
        char h[16], info[14];
        uint32_t opt, len;

        if (!read_full(fd, h, 16) || memcmp(h, "IHAVEOPT", 8)) {
            return false;
        }
        opt = get32(h + 8);
        len = get32(h + 12);
        if (len > 4096) {
            return false;
        }
        char data[4096];
        if (len && !read_full(fd, data, len)) {
            return false;
        }
        switch (opt) {
        case STRATA_NBD_OPT_EXPORT_NAME: {
            char r[10 + STRATA_NBD_EXPORT_NAME_PAD] = { 0 };

            put64(r, s->size);
            put16(r + 8, tflags);
            bool no_zeroes = get32(cflags) & STRATA_NBD_CFLAG_NO_ZEROES;

            return write_full(fd, r, no_zeroes
                                     ? 10 : 10 + STRATA_NBD_EXPORT_NAME_PAD);
        }
        case STRATA_NBD_OPT_INFO:
        case STRATA_NBD_OPT_GO:
            put16(info, STRATA_NBD_INFO_EXPORT);
            put64(info + 2, s->size);
            put16(info + 10, tflags);
            if (!opt_reply(fd, opt, STRATA_NBD_REP_INFO, info, 12)) {
                return false;
            }
            /* 4 KiB minimum: O_DIRECT takes the client's requests as
             * they come. */
            put16(info, STRATA_NBD_INFO_BLOCK_SIZE);
            put32(info + 2, 4096);
            put32(info + 6, 4096);
            put32(info + 10, SERVE_MAX_REQUEST);
            if (!opt_reply(fd, opt, STRATA_NBD_REP_INFO, info, 14) ||
                !opt_reply(fd, opt, STRATA_NBD_REP_ACK, NULL, 0)) {
                return false;
            }
            if (opt == STRATA_NBD_OPT_GO) {
                return true;
            }
            break;
        case STRATA_NBD_OPT_STRUCTURED_REPLY:
            if (s->structured_ok && !len) {
                s->structured = true;
                if (!opt_reply(fd, opt, STRATA_NBD_REP_ACK, NULL, 0)) {
                    return false;
                }
            } else if (!opt_reply(fd, opt, STRATA_NBD_REP_ERR_UNSUP, NULL,
                                  0)) {
                return false;
            }
            break;
        case STRATA_NBD_OPT_ABORT:
            opt_reply(fd, opt, STRATA_NBD_REP_ACK, NULL, 0);
            return false;
        default:
            if (!opt_reply(fd, opt, STRATA_NBD_REP_ERR_UNSUP, NULL, 0)) {
                return false;
            }
        }
    }
}

/* Sends @niov gathered iovecs whole (the socket is blocking). */
static bool send_all(int fd, struct iovec *iov, int niov)
{
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = niov };

    while (mh.msg_iovlen) {
        ssize_t r = sendmsg(fd, &mh, MSG_NOSIGNAL);

        if (r <= 0) {
            return false;
        }
        while (r && mh.msg_iovlen) {
            if ((size_t)r >= mh.msg_iov->iov_len) {
                r -= mh.msg_iov->iov_len;
                mh.msg_iov++;
                mh.msg_iovlen--;
            } else {
                mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + r;
                mh.msg_iov->iov_len -= r;
                r = 0;
            }
        }
    }
    return true;
}

/* Starts the complete requests in rx[*used, have): false on a request
 * this server cannot take (the connection then ends). */
static bool serve_parse(Server *s, struct io_uring *ring, const char *rx,
                        size_t have, size_t *used, bool *disc)
{
    while (have - *used >= STRATA_NBD_REQUEST_SIZE) {
        const char *p = rx + *used;
        uint16_t type = get16(p + 6);
        uint64_t off = get64(p + 16);
        uint32_t len = get32(p + 24);
        size_t need = STRATA_NBD_REQUEST_SIZE +
                      (type == STRATA_NBD_CMD_WRITE ? len : 0);
        ServeSlot *slot = NULL;
        struct io_uring_sqe *sqe;
        int k;

        if (get32(p) != STRATA_NBD_REQUEST_MAGIC || len > SERVE_MAX_REQUEST ||
            type > STRATA_NBD_CMD_FLUSH) {
            return false;
        }
        if (type == STRATA_NBD_CMD_DISC) {
            *disc = true;
            *used = have;
            return true;
        }
        if (have - *used < need) {
            return true;
        }
        for (k = 0; k < SERVE_SLOTS; k++) {
            if (!s->slots[k].busy) {
                slot = &s->slots[k];
                break;
            }
        }
        if (!slot || !(sqe = io_uring_get_sqe(ring))) {
            return true;    /* the next completions free one */
        }
        slot->busy = true;
        slot->type = type;
        slot->len = len;
        slot->off = off;
        memcpy(slot->handle, p + 8, 8);
        if (type == STRATA_NBD_CMD_READ) {
            io_uring_prep_read(sqe, s->file, slot->buf, len, off);
        } else if (type == STRATA_NBD_CMD_WRITE) {
            memcpy(slot->buf, p + STRATA_NBD_REQUEST_SIZE, len);
            io_uring_prep_write(sqe, s->file, slot->buf, len, off);
        } else {
            io_uring_prep_fsync(sqe, s->file, 0);
        }
        io_uring_sqe_set_data64(sqe, k);
        *used += need;
    }
    return true;
}

static bool slots_busy(const Server *s)
{
    for (int k = 0; k < SERVE_SLOTS; k++) {
        if (s->slots[k].busy) {
            return true;
        }
    }
    return false;
}

/* Ends the connection once what is in flight completes: no request is
 * read any more, and the receive still posted completes empty. */
static void serve_end(int fd, bool *done)
{
    *done = true;
    shutdown(fd, SHUT_RD);
}

static void serve_connection(Server *s, int fd)
{
    struct io_uring ring;
    char *rx = malloc(SERVE_RX_SIZE);
    size_t have = 0, used = 0;
    bool recv_posted = false, done = false;

    if (!rx || io_uring_queue_init(256, &ring, 0) < 0) {
        free(rx);
        return;
    }
    for (;;) {
        struct iovec iov[2 * SERVE_SLOTS];
        int niov = 0, replied[SERVE_SLOTS], nreplied = 0;
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;

        if (!recv_posted && !done) {
            if (used == have) {
                used = have = 0;
            } else if (SERVE_RX_SIZE - have <
                       SERVE_MAX_REQUEST + STRATA_NBD_REQUEST_SIZE) {
                memmove(rx, rx + used, have - used);
                have -= used;
                used = 0;
            }
            /* A full buffer waits for completions to free slots. */
            if (have < SERVE_RX_SIZE) {
                struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);

                io_uring_prep_recv(sqe, fd, rx + have, SERVE_RX_SIZE - have,
                                   0);
                io_uring_sqe_set_data64(sqe, SERVE_RECV_TAG);
                recv_posted = true;
            }
        }
        if (done && !recv_posted && !slots_busy(s)) {
            break;
        }
        io_uring_submit_and_wait(&ring, 1);
        io_uring_for_each_cqe(&ring, head, cqe) {
            uint64_t tag = io_uring_cqe_get_data64(cqe);
            ServeSlot *slot;

            seen++;
            if (tag == SERVE_RECV_TAG) {
                recv_posted = false;
                if (cqe->res <= 0) {
                    done = true;
                } else {
                    have += cqe->res;
                }
                continue;
            }
            slot = &s->slots[tag];
            bool failed = cqe->res < 0 ||
                          (slot->type != STRATA_NBD_CMD_FLUSH &&
                           (uint32_t)cqe->res != slot->len);
            if (s->structured) {
                /* One chunk, DONE: the data (at the request's offset), an
                 * error with no message, or nothing. */
                bool data = !failed && slot->type == STRATA_NBD_CMD_READ;

                put32(slot->reply, STRATA_NBD_STRUCTURED_REPLY_MAGIC);
                put16(slot->reply + 4, STRATA_NBD_REPLY_FLAG_DONE);
                put16(slot->reply + 6,
                      failed ? STRATA_NBD_REPLY_TYPE_ERROR
                             : data ? STRATA_NBD_REPLY_TYPE_OFFSET_DATA
                                    : STRATA_NBD_REPLY_TYPE_NONE);
                memcpy(slot->reply + 8, slot->handle, 8);
                put32(slot->reply + 16, failed ? 6 : data ? 8 + slot->len : 0);
                if (failed) {
                    put32(slot->reply + 20, 5);
                    put16(slot->reply + 24, 0);
                } else if (data) {
                    put64(slot->reply + 20, slot->off);
                }
                iov[niov++] = (struct iovec){
                    slot->reply, failed ? 26 : data ? 28 : 20 };
                if (data) {
                    iov[niov++] = (struct iovec){ slot->buf, slot->len };
                }
            } else {
                put32(slot->reply, STRATA_NBD_SIMPLE_REPLY_MAGIC);
                put32(slot->reply + 4, failed ? 5 : 0);
                memcpy(slot->reply + 8, slot->handle, 8);
                iov[niov++] = (struct iovec){ slot->reply, 16 };
                if (slot->type == STRATA_NBD_CMD_READ) {
                    iov[niov++] = (struct iovec){ slot->buf, slot->len };
                }
            }
            replied[nreplied++] = tag;
        }
        io_uring_cq_advance(&ring, seen);
        if (niov && !send_all(fd, iov, niov)) {
            serve_end(fd, &done);
        }
        for (int i = 0; i < nreplied; i++) {
            s->slots[replied[i]].busy = false;
        }
        if (!done) {
            bool disc = false;

            if (!serve_parse(s, &ring, rx, have, &used, &disc) || disc) {
                serve_end(fd, &done);
            }
        }
    }
    io_uring_queue_exit(&ring);
    free(rx);
}

static int serve_main(const char *sock_path, const char *file, bool direct,
                      bool structured)
{
    static Server s;
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    struct stat st;
    int ls;

    s.file = open(file, O_RDWR | (direct ? O_DIRECT : 0));
    if (s.file < 0 || fstat(s.file, &st) < 0) {
        perror(file);
        return 1;
    }
    s.size = st.st_size;
    s.structured_ok = structured;
    for (int k = 0; k < SERVE_SLOTS; k++) {
        if (posix_memalign((void **)&s.slots[k].buf, 4096, SERVE_MAX_REQUEST)) {
            return 1;
        }
    }
    /* Bound under another name and renamed once listening, so that
     * whoever waits for @sock_path to appear can connect at once. */
    ls = socket(AF_UNIX, SOCK_STREAM, 0);
    snprintf(a.sun_path, sizeof(a.sun_path), "%s.new", sock_path);
    unlink(a.sun_path);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        listen(ls, 8) < 0 || rename(a.sun_path, sock_path) < 0) {
        perror(sock_path);
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);

        if (fd < 0) {
            continue;
        }
        s.structured = false;
        if (serve_handshake(&s, fd)) {
            serve_connection(&s, fd);
        }
        close(fd);
    }
}

/* ---- copy ---- */

typedef struct {
    const char *sock_path;
    const char *export_name;
    int out;
    uint64_t size;
    int depth;
    atomic_uint_fast64_t next;
    atomic_bool failed;
} Copy;

/* Connects and negotiates with NBD_OPT_EXPORT_NAME: -1 on failure. */
static int copy_connect(const Copy *c, uint64_t *size)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    uint32_t nlen = strlen(c->export_name);
    char hello[18], cflags[4], opt[16], r[10];
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    snprintf(a.sun_path, sizeof(a.sun_path), "%s", c->sock_path);
    put32(cflags, STRATA_NBD_CFLAG_FIXED_NEWSTYLE | STRATA_NBD_CFLAG_NO_ZEROES);
    memcpy(opt, "IHAVEOPT", 8);
    put32(opt + 8, STRATA_NBD_OPT_EXPORT_NAME);
    put32(opt + 12, nlen);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        !read_full(fd, hello, 18) || memcmp(hello, "NBDMAGICIHAVEOPT", 16) ||
        !write_full(fd, cflags, 4) || !write_full(fd, opt, 16) ||
        !write_full(fd, c->export_name, nlen) || !read_full(fd, r, 10)) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    *size = get64(r);
    return fd;
}

/* Asks for the next chunk of the export, its offset as the handle:
 * false when none is left. */
static bool copy_request(Copy *c, int fd, bool *ok)
{
    uint64_t off = atomic_fetch_add(&c->next, COPY_REQUEST);
    char r[STRATA_NBD_REQUEST_SIZE];

    if (off >= c->size) {
        return false;
    }
    put32(r, STRATA_NBD_REQUEST_MAGIC);
    put16(r + 4, 0);
    put16(r + 6, STRATA_NBD_CMD_READ);
    memcpy(r + 8, &off, 8);
    put64(r + 16, off);
    put32(r + 24, c->size - off < COPY_REQUEST ? c->size - off : COPY_REQUEST);
    *ok = write_full(fd, r, STRATA_NBD_REQUEST_SIZE);
    return true;
}

static void *copy_connection(void *opaque)
{
    Copy *c = opaque;
    uint64_t size;
    int fd = copy_connect(c, &size), inflight = 0;
    bool ok = fd >= 0 && size == c->size;
    char *stage = malloc(COPY_STAGE);

    for (int i = 0; ok && i < c->depth && copy_request(c, fd, &ok); i++) {
        inflight++;
    }
    while (ok && inflight) {
        char h[16];
        uint64_t off;

        ok = read_full(fd, h, 16) &&
             get32(h) == STRATA_NBD_SIMPLE_REPLY_MAGIC && get32(h + 4) == 0;
        if (!ok) {
            break;
        }
        memcpy(&off, h + 8, 8);
        ok = stage && off < c->size;
        for (uint64_t left = c->size - off < COPY_REQUEST ? c->size - off
                                                          : COPY_REQUEST;
             ok && left;) {
            size_t n = left < COPY_STAGE ? left : COPY_STAGE;

            ok = read_full(fd, stage, n) &&
                 pwrite(c->out, stage, n, off) == (ssize_t)n;
            off += n;
            left -= n;
        }
        inflight--;
        if (ok && copy_request(c, fd, &ok)) {
            inflight++;
        }
    }
    if (!ok) {
        atomic_store(&c->failed, true);
    }
    if (fd >= 0) {
        close(fd);
    }
    free(stage);
    return NULL;
}

static int copy_main(const char *sock_path, const char *export_name,
                     const char *output, int conns, int depth)
{
    Copy c = { .sock_path = sock_path, .export_name = export_name,
               .depth = depth };
    pthread_t threads[64];
    struct stat st;
    int fd;

    fd = copy_connect(&c, &c.size);
    if (fd < 0) {
        fprintf(stderr, "nbd-floor: cannot negotiate with %s\n", sock_path);
        return 1;
    }
    close(fd);
    c.out = open(output, O_RDWR);
    if (c.out < 0 || fstat(c.out, &st) < 0 || (uint64_t)st.st_size < c.size) {
        fprintf(stderr, "nbd-floor: %s: not a file of %llu bytes\n", output,
                (unsigned long long)c.size);
        return 1;
    }
    for (int i = 0; i < conns; i++) {
        pthread_create(&threads[i], NULL, copy_connection, &c);
    }
    for (int i = 0; i < conns; i++) {
        pthread_join(threads[i], NULL);
    }
    if (atomic_load(&c.failed) || close(c.out) < 0) {
        fprintf(stderr, "nbd-floor: the copy failed\n");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if ((argc == 5 || (argc == 6 && !strcmp(argv[5], "structured"))) &&
        !strcmp(argv[1], "serve") &&
        (!strcmp(argv[4], "direct") || !strcmp(argv[4], "cached"))) {
        return serve_main(argv[2], argv[3], !strcmp(argv[4], "direct"),
                          argc == 6);
    }
    if (argc == 7 && !strcmp(argv[1], "copy")) {
        int conns = atoi(argv[5]), depth = atoi(argv[6]);

        if (conns >= 1 && conns <= 64 && depth >= 1 && depth <= 64) {
            return copy_main(argv[2], argv[3], argv[4], conns, depth);
        }
    }
    fprintf(stderr, "usage: nbd-floor serve SOCKET FILE direct|cached "
                    "[structured]\n"
                    "       nbd-floor copy SOCKET EXPORT OUTPUT CONNECTIONS "
                    "DEPTH\n");
    return 2;
}
