/* strata — socket I/O from coroutines, shared by the NBD server and
 * client: a would-block yields to the loop until the socket is ready. */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <glib-unix.h>

#include "nbd-proto.h"
#include "../util/coroutine-private.h"

static gboolean fd_ready(int fd, GIOCondition cond, gpointer opaque)
{
    strata_coroutine_wake(opaque);
    return G_SOURCE_REMOVE;
}

void strata_nbd_co_wait_fd(StrataNbdSock *sk, GIOCondition cond)
{
    GSource *src = g_unix_fd_source_new(sk->fd, cond | G_IO_HUP | G_IO_ERR);

    g_source_set_callback(src, (GSourceFunc)(void (*)(void))fd_ready,
                          strata_coroutine_self(), NULL);
    g_source_attach(src, strata_loop_get_context(sk->loop));
    strata_co_yield();
    g_source_destroy(src);
    g_source_unref(src);
}

int strata_nbd_co_read_full(StrataNbdSock *sk, void *buf, size_t len)
{
    StrataNbdRBuf *rb = sk->rbuf;
    uint8_t *p = buf;

    while (len) {
        if (rb && rb->pos < rb->end) {
            size_t n = MIN(len, rb->end - rb->pos);
            memcpy(p, rb->data + rb->pos, n);
            rb->pos += n;
            p += n;
            len -= n;
            continue;
        }
        if (sk->closing && *sk->closing) {
            return -ESHUTDOWN;
        }
        /* Large reads go straight to the caller's buffer. */
        bool fill = rb && len < sizeof(rb->data);
        ssize_t n = fill ? recv(sk->fd, rb->data, sizeof(rb->data),
                                MSG_DONTWAIT)
                         : recv(sk->fd, p, len, MSG_DONTWAIT);
        if (n > 0) {
            if (fill) {
                rb->pos = 0;
                rb->end = n;
            } else {
                p += n;
                len -= n;
            }
        } else if (n == 0) {
            return -ECONNRESET;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            strata_nbd_co_wait_fd(sk, G_IO_IN);
        } else if (errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

int strata_nbd_co_skip(StrataNbdSock *sk, uint64_t len)
{
    uint8_t tmp[4096];

    while (len) {
        size_t n = MIN(len, sizeof(tmp));
        int ret = strata_nbd_co_read_full(sk, tmp, n);
        if (ret < 0) {
            return ret;
        }
        len -= n;
    }
    return 0;
}

int strata_nbd_co_writev_full(StrataNbdSock *sk, const struct iovec *iov,
                              int niov)
{
    struct iovec v[STRATA_NBD_MAX_IOV];
    struct msghdr msg = { 0 };

    g_return_val_if_fail(niov <= STRATA_NBD_MAX_IOV, -EINVAL);
    memcpy(v, iov, niov * sizeof(*iov));
    msg.msg_iov = v;
    msg.msg_iovlen = niov;
    while (msg.msg_iovlen) {
        if (msg.msg_iov->iov_len == 0) {
            msg.msg_iov++;
            msg.msg_iovlen--;
            continue;
        }
        ssize_t n = sendmsg(sk->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                strata_nbd_co_wait_fd(sk, G_IO_OUT);
                continue;
            }
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        while (n > 0) {
            size_t k = MIN((size_t)n, msg.msg_iov->iov_len);
            msg.msg_iov->iov_base = (uint8_t *)msg.msg_iov->iov_base + k;
            msg.msg_iov->iov_len -= k;
            n -= k;
            if (msg.msg_iov->iov_len == 0) {
                msg.msg_iov++;
                msg.msg_iovlen--;
            }
        }
    }
    return 0;
}

int strata_nbd_co_write_full(StrataNbdSock *sk, const void *buf, size_t len)
{
    struct iovec iov = { (void *)buf, len };
    return strata_nbd_co_writev_full(sk, &iov, 1);
}

/* With the default send buffer (~208 KiB on Linux) a 1 MiB reply or
 * write left in five sendmsg calls with a wait for the peer between
 * each; with a few MiB a batch of them leaves in one call while the
 * peer drains it at its own pace.  Only the sender's buffer counts on a
 * UNIX stream socket. */
#define NBD_SNDBUF (4 * 1024 * 1024)

void strata_nbd_sock_tune(int fd)
{
    int v = NBD_SNDBUF;

    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v)) < 0) {
        /* The default stays: slower, still correct. */
    }
}
