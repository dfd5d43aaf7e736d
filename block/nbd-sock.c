/* strata — socket I/O from coroutines, shared by the NBD server and
 * client: a would-block yields to the loop until the socket is ready. */
#include <errno.h>
#include <poll.h>
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

/*
 * A source per wait costs GLib a wake-up of its own context (an eventfd
 * write) when it is attached and another when it goes, plus an extra
 * poll to consume them: three system calls and a loop iteration for every
 * time a socket ran dry.  A watch stays in the poll set for the socket's
 * whole life and only changes what it asks for when that has to change:
 * input stays asked for while nobody waits (the next wait is usually
 * soon) and is dropped only when it comes with nobody to take it;
 * output, rarely waited for, is dropped once its waiter is woken.
 */
struct StrataNbdWatch {
    GSource source;
    int fd;
    gpointer tag;           /* NULL: out of the poll set */
    GIOCondition events;    /* what the poll set asks for */
    StrataCoroutine *co_in, *co_out;
};

static void watch_ask(StrataNbdWatch *w, GIOCondition events)
{
    if (!w->tag) {
        w->tag = g_source_add_unix_fd(&w->source, w->fd, events);
    } else if (events != w->events) {
        g_source_modify_unix_fd(&w->source, w->tag, events);
    }
    w->events = events;
}

static gboolean watch_dispatch(GSource *source, GSourceFunc cb, gpointer data)
{
    StrataNbdWatch *w = (StrataNbdWatch *)source;
    GIOCondition rev = w->tag ? g_source_query_unix_fd(source, w->tag) : 0;
    bool broken = rev & (G_IO_HUP | G_IO_ERR | G_IO_NVAL);
    StrataCoroutine *in = NULL, *out = NULL;
    GIOCondition drop = 0;

    if (w->co_in && (rev & G_IO_IN || broken)) {
        in = w->co_in;
        w->co_in = NULL;
    } else if (rev & G_IO_IN) {
        drop |= G_IO_IN;        /* ready with nobody to read: stop asking */
    }
    if (w->co_out && (rev & G_IO_OUT || broken)) {
        out = w->co_out;
        w->co_out = NULL;
        /* Unless its waiter waits again, a writable socket would end
         * every poll from now on. */
        drop |= G_IO_OUT;
    }
    /* The woken may wait again (and so ask) before these return. */
    if (in) {
        strata_coroutine_wake(in);
    }
    if (out) {
        strata_coroutine_wake(out);
    }
    /* The woken may also have closed the socket and freed the watch
     * (GLib keeps the memory until this returns). */
    if (g_source_is_destroyed(source) || !w->tag) {
        return G_SOURCE_CONTINUE;
    }
    if (broken && !w->co_in && !w->co_out) {
        /* A hang-up is reported whatever is asked for: out of the poll
         * set until somebody waits again (and sees it at once). */
        g_source_remove_unix_fd(source, w->tag);
        w->tag = NULL;
        w->events = 0;
        return G_SOURCE_CONTINUE;
    }
    watch_ask(w, (w->events & ~drop) | (w->co_in ? G_IO_IN : 0) |
                 (w->co_out ? G_IO_OUT : 0));
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs watch_funcs = {
    .dispatch = watch_dispatch,
};

StrataNbdWatch *strata_nbd_watch_new(StrataLoop *loop, int fd)
{
    StrataNbdWatch *w;

    g_return_val_if_fail(loop != NULL && fd >= 0, NULL);
    w = (StrataNbdWatch *)g_source_new(&watch_funcs, sizeof(*w));
    w->fd = fd;
    /* GLib takes a source that cannot recurse out of the poll set while
     * it dispatches and puts it back after, waking its context twice. */
    g_source_set_can_recurse(&w->source, TRUE);
    g_source_attach(&w->source, strata_loop_get_context(loop));
    return w;
}

void strata_nbd_watch_free(StrataNbdWatch *w)
{
    if (!w) {
        return;
    }
    /* A coroutine still waiting here would never be woken. */
    g_warn_if_fail(!w->co_in && !w->co_out);
    g_source_destroy(&w->source);
    g_source_unref(&w->source);
}

void strata_nbd_co_wait_fd(StrataNbdSock *sk, GIOCondition cond)
{
    StrataNbdWatch *w = sk->watch;
    StrataCoroutine *self = strata_coroutine_self();

    if (!w) {
        GSource *src = g_unix_fd_source_new(sk->fd,
                                            cond | G_IO_HUP | G_IO_ERR);

        g_source_set_callback(src, (GSourceFunc)(void (*)(void))fd_ready,
                              self, NULL);
        g_source_attach(src, strata_loop_get_context(sk->loop));
        strata_co_yield();
        g_source_destroy(src);
        g_source_unref(src);
        return;
    }
    g_return_if_fail(w->fd == sk->fd);
    if (cond & G_IO_IN) {
        g_return_if_fail(w->co_in == NULL);
        w->co_in = self;
    } else {
        g_return_if_fail(w->co_out == NULL);
        w->co_out = self;
    }
    watch_ask(w, w->events | (cond & (G_IO_IN | G_IO_OUT)));
    strata_co_yield();
    /* Entered by somebody else first: the watch must forget us. */
    if (w->co_in == self) {
        w->co_in = NULL;
    }
    if (w->co_out == self) {
        w->co_out = NULL;
    }
}

/*
 * A payload read with a recv() per piece the server has sent so far
 * costs a system call per socket-buffer's worth, an EAGAIN and a poll
 * whenever the reader catches up, and a loop turn to come back: for a
 * GiB of 2 MiB replies from qemu-nbd, 8,079 recv calls (2,178 of them
 * EAGAIN) and 1,696 polls.  At NBD_RING_RECV_MIN bytes and more the
 * rest of a read is one recv(MSG_WAITALL) on the loop's ring instead:
 * the kernel goes on copying as the data comes, with no return to us
 * in between, as a blocking reader would, but the loop keeps running.
 */
#define NBD_RING_RECV_MIN (64u * 1024)

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
        if (sk->ring_recv && len >= NBD_RING_RECV_MIN) {
            ssize_t n = strata_loop_co_recv(sk->loop, sk->fd, p, len,
                                            MSG_WAITALL | MSG_NOSIGNAL);

            if (n > 0) {
                p += n;
                len -= n;
                continue;
            }
            if (n == 0) {
                return -ECONNRESET;
            }
            /* No ring that can recv, or nothing this time: as below,
             * which waits for the socket rather than spin. */
            if (n != -ENOTSUP && n != -EAGAIN && n != -EINTR) {
                return (int)n;
            }
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

int strata_nbd_recv_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len) {
        ssize_t n = recv(fd, p, len, MSG_WAITALL);

        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if (n == 0) {
            return -ECONNRESET;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd pfd = { .fd = fd, .events = POLLIN };

            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
                return -errno;
            }
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
