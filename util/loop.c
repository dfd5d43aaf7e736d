/* strata — the event loop: one GSource over an io_uring ring (or a thread
 * pool), bottom halves and timers, attached to any GMainContext.
 *
 * The source has three kinds of work:
 *
 *  - I/O.  A coroutine puts an SQE on the ring, points its user_data at a
 *    small request struct on its own stack, and yields.  prepare() hands
 *    everything queued since the last iteration to the kernel in one
 *    io_uring_submit(); dispatch() reaps the CQEs and re-enters each
 *    waiting coroutine.  The ring fd is polled by the GMainContext.
 *    Where there is no ring, or a caller asks for threads, a GThreadPool
 *    worker makes the blocking call and reports through a locked list and
 *    an eventfd polled by the same source.
 *  - Bottom halves: callbacks that run from the next dispatch, in the
 *    order they were scheduled.
 *  - Timers on CLOCK_MONOTONIC, kept in a list sorted by expiry.
 *
 * Nested iterations of the context from inside dispatch are allowed
 * (can_recurse), so every piece of work is unlinked before it runs.
 */
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "coroutine-private.h"
#include "loop-private.h"

#define LOOP_RING_ENTRIES 256
/* Threads of the pool, as many as QEMU's: a blocking read of data not
 * in the page cache holds its thread until the disk answers, so the
 * pool's size caps how many such reads the disk sees at once (16 made
 * cold 4 KiB random reads at depth 32 run at 2/3 of QEMU's rate). */
#define LOOP_MAX_WORKERS 64
/* Completions handled before the requests they caused are submitted: a
 * few, so the device's queue is refilled promptly (a whole ring's worth
 * left it idle for tens of microseconds at depth 32), while each
 * submission still carries several requests. */
#define LOOP_REAP_BATCH 8
/* STRATA_LOOP_REAP_BATCH overrides it (1 .. LOOP_REAP_BATCH_MAX) for
 * measuring: each submission of several sequential reads is merged by
 * the kernel into one larger request (8 x 64 KiB -> 512 KiB), while one
 * read per io_uring_enter, as QEMU submits, is merged or not by the I/O
 * scheduler depending on how busy the device is. */
#define LOOP_REAP_BATCH_MAX 64
/* Reads on their way through the kernel's workers (IOSQE_ASYNC) at once,
 * per CPU beside the loop's own; further ones are tried inline.  Handing
 * a read to a worker costs the loop and the worker a wake-up each (about
 * a third as much again as copying 64 KiB), and with every read away the
 * loop thread sleeps between completions while its own CPU idles.  A few
 * reads queued per worker CPU keep the workers busy while the loop copies
 * the rest itself (64 KiB page-cache reads at depth 32 on 2 CPUs: a
 * quarter less CPU per read and a tenth of the context switches).  The
 * kernel runs such reads one after another in a single worker as long as
 * none blocks, so the two CPUs share the copying: at depth 32, 28 with
 * the worker and 4 for the loop, whose own per-request work fills the
 * rest of its time, gave 1.24-1.30 times QEMU's rate against 1.16 with
 * 16 and 1.15 with all 32 away (the loop then sleeps between wake-ups).
 * Below the limit every such read goes to the workers as before, so a
 * loop with other work (a convert's writes) keeps it.
 * STRATA_LOOP_OFFLOAD_MAX overrides the limit (0: never offload). */
#define LOOP_OFFLOAD_PER_CPU 28
#define LOOP_OFFLOAD_MAX_LIMIT 4096

struct StrataBH {
    StrataLoop *loop;
    StrataBHFunc fn;
    void *opaque;
    StrataBH *prev, *next;      /* in the loop's scheduled list */
    uint64_t seq;               /* when it was scheduled */
    bool scheduled;
    bool oneshot;               /* freed by the loop before it runs */
};

struct StrataTimer {
    StrataLoop *loop;
    StrataTimerFunc fn;
    void *opaque;
    int64_t expire_ns;
    uint64_t seq;               /* when it was armed */
    StrataTimer *prev, *next;   /* in the loop's sorted list */
    bool pending;
};

typedef struct {
    GSource source;
    StrataLoop *loop;
} LoopSource;

/* An io_uring request; lives on the waiting coroutine's stack. */
typedef struct {
    StrataCoroutine *co;
    int result;
    bool done;
    bool device;    /* I/O of a device (O_DIRECT): see loop_co_wait_sqe */
} UringReq;

/* For loop_co_readv's and loop_co_writev's flags: not an IOSQE_ bit,
 * the loop's own. */
#define LOOP_REQ_DEVICE (1u << 31)

typedef enum {
    JOB_PREADV,
    JOB_PWRITEV,
    JOB_FDATASYNC,
    JOB_FALLOCATE,
    JOB_FUNC,
} JobType;

/* A thread-pool request; lives on the waiting coroutine's stack. */
typedef struct ThreadJob {
    JobType type;
    int fd;
    int iovcnt;
    int mode;
    const struct iovec *iov;
    uint64_t offset;
    uint64_t len;
    int (*fn)(void *opaque);
    void *opaque;
    StrataCoroutine *co;
    ssize_t result;
    bool done;
    struct ThreadJob *next;
} ThreadJob;

struct StrataLoop {
    GMainContext *context;
    LoopSource *source;

    bool has_ring;
    bool ring_recv;         /* the ring takes IORING_OP_RECV (5.6) */
    struct io_uring ring;
    char *fallback_reason;

    StrataBH *bh_head, *bh_tail;
    uint64_t bh_seq;

    StrataTimer *timer_head;
    uint64_t timer_seq;

    GThreadPool *pool;          /* created on first use */
    int event_fd;
    gpointer event_tag;
    GMutex done_lock;
    ThreadJob *done;            /* finished jobs, newest first */

    unsigned inflight;
    unsigned reap_batch;        /* CQEs handled between submissions */
    unsigned offload_max;       /* see LOOP_OFFLOAD_PER_CPU */
    unsigned offloading;        /* offloaded reads not yet completed */
    StrataLoopStats stats;
};

int64_t strata_clock_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * G_GINT64_CONSTANT(1000000000) + ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Bottom halves                                                       */
/* ------------------------------------------------------------------ */

StrataBH *strata_bh_new(StrataLoop *loop, StrataBHFunc fn, void *opaque)
{
    StrataBH *bh;

    g_return_val_if_fail(loop != NULL, NULL);
    g_return_val_if_fail(fn != NULL, NULL);

    bh = g_new0(StrataBH, 1);
    bh->loop = loop;
    bh->fn = fn;
    bh->opaque = opaque;
    return bh;
}

void strata_bh_schedule(StrataBH *bh)
{
    StrataLoop *loop;

    g_return_if_fail(bh != NULL);

    if (bh->scheduled) {
        return;
    }
    loop = bh->loop;
    bh->scheduled = true;
    bh->seq = loop->bh_seq++;
    bh->next = NULL;
    bh->prev = loop->bh_tail;
    if (loop->bh_tail) {
        loop->bh_tail->next = bh;
    } else {
        loop->bh_head = bh;
    }
    loop->bh_tail = bh;
}

static void bh_unlink(StrataBH *bh)
{
    StrataLoop *loop = bh->loop;

    if (bh->prev) {
        bh->prev->next = bh->next;
    } else {
        loop->bh_head = bh->next;
    }
    if (bh->next) {
        bh->next->prev = bh->prev;
    } else {
        loop->bh_tail = bh->prev;
    }
    bh->prev = bh->next = NULL;
    bh->scheduled = false;
}

void strata_bh_cancel(StrataBH *bh)
{
    g_return_if_fail(bh != NULL);

    if (bh->scheduled) {
        bh_unlink(bh);
    }
}

void strata_bh_free(StrataBH *bh)
{
    if (!bh) {
        return;
    }
    strata_bh_cancel(bh);
    g_free(bh);
}

/*
 * Runs the BHs scheduled before this dispatch began.  Those scheduled by
 * the callbacks wait for the next dispatch (prepare() then polls with a
 * zero timeout), so a BH that keeps rescheduling itself cannot starve
 * I/O completions and timers.
 */
static void loop_run_bhs(StrataLoop *loop)
{
    uint64_t limit = loop->bh_seq;
    StrataBH *bh;

    while ((bh = loop->bh_head) && bh->seq < limit) {
        StrataBHFunc fn = bh->fn;
        void *opaque = bh->opaque;

        bh_unlink(bh);
        if (bh->oneshot) {
            g_free(bh);
        }
        /* @bh may be freed or (on a coroutine stack) gone from here on. */
        fn(opaque);
    }
}

void strata_loop_call_soon(StrataLoop *loop, StrataBHFunc fn, void *opaque)
{
    StrataBH *bh = strata_bh_new(loop, fn, opaque);

    g_return_if_fail(bh != NULL);
    bh->oneshot = true;
    strata_bh_schedule(bh);
}

static void enter_co_cb(void *opaque)
{
    strata_coroutine_enter(opaque);
}

void strata_loop_schedule_co(StrataLoop *loop, StrataCoroutine *co)
{
    g_return_if_fail(co != NULL);

    strata_loop_call_soon(loop, enter_co_cb, co);
}

void strata_loop_co_yield_now(StrataLoop *loop)
{
    StrataBH bh = { 0 };

    g_return_if_fail(loop != NULL);
    g_return_if_fail(strata_in_coroutine());

    bh.loop = loop;
    bh.fn = enter_co_cb;
    bh.opaque = strata_coroutine_self();
    strata_bh_schedule(&bh);
    strata_co_yield();
    /* Entered early by somebody else: the BH must not outlive the frame. */
    strata_bh_cancel(&bh);
}

/* ------------------------------------------------------------------ */
/* Timers                                                              */
/* ------------------------------------------------------------------ */

StrataTimer *strata_timer_new(StrataLoop *loop, StrataTimerFunc fn,
                              void *opaque)
{
    StrataTimer *timer;

    g_return_val_if_fail(loop != NULL, NULL);
    g_return_val_if_fail(fn != NULL, NULL);

    timer = g_new0(StrataTimer, 1);
    timer->loop = loop;
    timer->fn = fn;
    timer->opaque = opaque;
    return timer;
}

static void timer_unlink(StrataTimer *timer)
{
    StrataLoop *loop = timer->loop;

    if (timer->prev) {
        timer->prev->next = timer->next;
    } else {
        loop->timer_head = timer->next;
    }
    if (timer->next) {
        timer->next->prev = timer->prev;
    }
    timer->prev = timer->next = NULL;
    timer->pending = false;
}

void strata_timer_mod(StrataTimer *timer, int64_t expire_ns)
{
    StrataLoop *loop;
    StrataTimer *pos, *prev = NULL;

    g_return_if_fail(timer != NULL);

    loop = timer->loop;
    if (timer->pending) {
        timer_unlink(timer);
    }
    timer->expire_ns = expire_ns;
    timer->seq = loop->timer_seq++;

    /* After every timer with the same expiry: equal deadlines fire in
     * the order they were armed. */
    for (pos = loop->timer_head; pos && pos->expire_ns <= expire_ns;
         pos = pos->next) {
        prev = pos;
    }
    timer->prev = prev;
    timer->next = pos;
    if (prev) {
        prev->next = timer;
    } else {
        loop->timer_head = timer;
    }
    if (pos) {
        pos->prev = timer;
    }
    timer->pending = true;
}

void strata_timer_del(StrataTimer *timer)
{
    g_return_if_fail(timer != NULL);

    if (timer->pending) {
        timer_unlink(timer);
    }
}

bool strata_timer_pending(const StrataTimer *timer)
{
    g_return_val_if_fail(timer != NULL, false);

    return timer->pending;
}

void strata_timer_free(StrataTimer *timer)
{
    if (!timer) {
        return;
    }
    strata_timer_del(timer);
    g_free(timer);
}

/*
 * Fires the timers that have expired, earliest first.  A timer re-armed
 * by a callback for a time already past waits for the next dispatch
 * (its seq is then not below @limit), so it cannot spin here forever.
 */
static void loop_run_timers(StrataLoop *loop)
{
    uint64_t limit = loop->timer_seq;
    int64_t now;

    if (!loop->timer_head) {
        return;
    }
    now = strata_clock_ns();
    for (;;) {
        StrataTimer *timer = loop->timer_head;
        StrataTimerFunc fn;
        void *opaque;

        while (timer && timer->expire_ns <= now && timer->seq >= limit) {
            timer = timer->next;
        }
        if (!timer || timer->expire_ns > now) {
            break;
        }
        fn = timer->fn;
        opaque = timer->opaque;
        timer_unlink(timer);
        fn(opaque);
    }
}

typedef struct {
    StrataCoroutine *co;
    bool fired;
} SleepWait;

static void sleep_cb(void *opaque)
{
    SleepWait *wait = opaque;

    wait->fired = true;
    strata_coroutine_enter(wait->co);
}

void strata_loop_co_sleep_ns(StrataLoop *loop, int64_t ns)
{
    SleepWait wait = { strata_coroutine_self(), false };
    StrataTimer timer = { 0 };

    g_return_if_fail(loop != NULL);
    g_return_if_fail(wait.co != NULL);

    timer.loop = loop;
    timer.fn = sleep_cb;
    timer.opaque = &wait;
    strata_timer_mod(&timer, strata_clock_ns() + MAX(ns, 0));
    while (!wait.fired) {
        strata_co_yield();
    }
}

/* ------------------------------------------------------------------ */
/* io_uring                                                            */
/* ------------------------------------------------------------------ */

/* Hands every queued SQE to the kernel.  Returns false when some are
 * left for a later attempt (the kernel is short of resources or the CQ
 * overflowed and must be reaped first). */
static bool loop_submit(StrataLoop *loop)
{
    while (io_uring_sq_ready(&loop->ring) > 0) {
        int ret = io_uring_submit(&loop->ring);

        if (ret == -EINTR) {
            continue;
        }
        if (ret < 0) {
            if (ret != -EAGAIN && ret != -EBUSY) {
                g_critical("strata: io_uring_submit failed: %s",
                           g_strerror(-ret));
            }
            return false;
        }
        loop->stats.submits++;
        loop->stats.sqes += (unsigned)ret;
        if (ret == 0) {
            return false;
        }
    }
    return true;
}

static struct io_uring_sqe *loop_co_get_sqe(StrataLoop *loop)
{
    struct io_uring_sqe *sqe;

    /* A full SQ: flush it now rather than waiting for prepare(). */
    while (!(sqe = io_uring_get_sqe(&loop->ring))) {
        if (!loop_submit(loop)) {
            strata_loop_co_yield_now(loop);
        }
    }
    return sqe;
}

static int loop_co_wait_sqe(StrataLoop *loop, struct io_uring_sqe *sqe,
                            UringReq *req)
{
    io_uring_sqe_set_data(sqe, req);
    loop->inflight++;
    /* A request for a device goes to the kernel at once rather than
     * with the loop's batch: the sooner it is there, the fuller the
     * device's queue, and the device (a virtio disk here) serves
     * requests that arrive one by one faster than the same requests in
     * a burst.  After a completion: random 4 KiB O_DIRECT requests at
     * depth 32 on a qcow2 image, medians of 7, 65536 reads 0.655 s
     * against 0.717 s when the batch's 8 went together (fio 0.634 s);
     * 32768 writes 0.245 s against 0.271 s (fio 0.236 s).  From an NBD
     * client's requests, which the server reads 16 or more at a time
     * (fio's nbd engine at depth 32): 68-79k reads/s against 60-61k,
     * 85-100k writes/s against 73-74k, the disk's own latency per read
     * 220-250 µs against 320-350 µs, for about 1 µs of CPU more per
     * request.  Page cache reads, which complete inside the submission,
     * still go in batches (see loop_reap_ring). */
    if (req->device) {
        loop_submit(loop);
    }
    while (!req->done) {
        strata_co_yield();
    }
    return req->result;
}

static void loop_reap_ring(StrataLoop *loop)
{
    UringReq *batch[LOOP_REAP_BATCH_MAX];

    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;

        io_uring_for_each_cqe(&loop->ring, head, cqe) {
            UringReq *req = io_uring_cqe_get_data(cqe);

            req->result = cqe->res;
            req->done = true;
            batch[n++] = req;
            if (n == loop->reap_batch) {
                break;
            }
        }
        if (!n) {
            /* More completions than the CQ holds wait in the kernel's
             * overflow list until an io_uring_enter moves them over. */
            if (io_uring_cq_has_overflow(&loop->ring)) {
                io_uring_get_events(&loop->ring);
                if (io_uring_cq_ready(&loop->ring)) {
                    continue;
                }
            }
            break;
        }
        /* Consumed before anyone runs, so a nested iteration from a
         * woken coroutine's caller cannot see these CQEs again. */
        io_uring_cq_advance(&loop->ring, n);
        loop->inflight -= n;
        loop->stats.completions += n;
        for (unsigned i = 0; i < n; i++) {
            /* What it queues for a device goes out at once (see
             * loop_co_wait_sqe). */
            strata_coroutine_enter(batch[i]->co);
        }
        /* The woken coroutines usually queued their next requests: give
         * them to the kernel before handling more completions, so the
         * queue does not run dry while we work (4 KiB O_DIRECT reads at
         * depth 32: 0.90 s -> 0.77 s for 65536, QEMU's 0.77 s).  Page
         * cache reads, which complete inside the submission, go in
         * batches: one submission per completion cost 14 % (4 KiB) and
         * 30 % (64 KiB) of their rate. */
        if (io_uring_sq_ready(&loop->ring)) {
            loop_submit(loop);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Thread pool                                                         */
/* ------------------------------------------------------------------ */

static void loop_worker(gpointer data, gpointer user_data)
{
    ThreadJob *job = data;
    StrataLoop *loop = user_data;
    ssize_t ret = 0;
    uint64_t one = 1;

    switch (job->type) {
    case JOB_PREADV:
        ret = preadv(job->fd, job->iov, job->iovcnt, (off_t)job->offset);
        break;
    case JOB_PWRITEV:
        ret = pwritev(job->fd, job->iov, job->iovcnt, (off_t)job->offset);
        break;
    case JOB_FDATASYNC:
        ret = fdatasync(job->fd);
        break;
    case JOB_FALLOCATE:
        ret = fallocate(job->fd, job->mode, (off_t)job->offset,
                        (off_t)job->len);
        break;
    case JOB_FUNC:
        ret = job->fn(job->opaque);
        break;
    }
    if (ret < 0 && job->type != JOB_FUNC) {
        ret = -errno;
    }
    job->result = ret;

    g_mutex_lock(&loop->done_lock);
    job->next = loop->done;
    loop->done = job;
    g_mutex_unlock(&loop->done_lock);
    /* From here on @job may be gone; @loop is not, because
     * strata_loop_free() waits for the workers. */
    while (write(loop->event_fd, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
}

static void loop_reap_threads(StrataLoop *loop)
{
    ThreadJob *list, *rev = NULL;
    uint64_t count;

    if (!loop->pool) {
        return;
    }
    if (!(g_source_query_unix_fd(&loop->source->source, loop->event_tag) &
          G_IO_IN)) {
        return;
    }
    /* Non-blocking: a stale readiness from a nested iteration is fine. */
    if (read(loop->event_fd, &count, sizeof(count)) < 0) {
        (void)count;
    }

    g_mutex_lock(&loop->done_lock);
    list = loop->done;
    loop->done = NULL;
    g_mutex_unlock(&loop->done_lock);

    while (list) {
        ThreadJob *next = list->next;

        list->next = rev;
        rev = list;
        list = next;
    }
    while (rev) {
        ThreadJob *next = rev->next;

        loop->inflight--;
        loop->stats.completions++;
        rev->done = true;
        strata_coroutine_enter(rev->co);
        rev = next;
    }
}

static ssize_t loop_co_run_job(StrataLoop *loop, ThreadJob *job)
{
    g_autoptr(GError) error = NULL;

    if (!loop->pool) {
        loop->pool = g_thread_pool_new(loop_worker, loop, LOOP_MAX_WORKERS,
                                       FALSE, &error);
        if (!loop->pool) {
            g_warning("strata: cannot start I/O workers: %s",
                      error->message);
            return -EAGAIN;
        }
    }
    job->co = strata_coroutine_self();
    job->done = false;
    if (!g_thread_pool_push(loop->pool, job, &error)) {
        g_warning("strata: cannot queue I/O work: %s", error->message);
        return -EAGAIN;
    }
    loop->inflight++;
    loop->stats.thread_jobs++;
    while (!job->done) {
        strata_co_yield();
    }
    return job->result;
}

/* ------------------------------------------------------------------ */
/* File I/O                                                            */
/* ------------------------------------------------------------------ */

static bool loop_use_ring(StrataLoop *loop, StrataAioMode engine)
{
    return loop->has_ring && engine != STRATA_AIO_THREADS;
}

static ssize_t loop_co_readv(StrataLoop *loop, StrataAioMode engine, int fd,
                             const struct iovec *iov, int iovcnt,
                             uint64_t offset, unsigned sqe_flags)
{
    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    if (loop_use_ring(loop, engine)) {
        UringReq req = { strata_coroutine_self(), 0, false,
                         (sqe_flags & LOOP_REQ_DEVICE) != 0 };
        struct io_uring_sqe *sqe = loop_co_get_sqe(loop);
        bool offload = (sqe_flags & IOSQE_ASYNC) &&
                       loop->offloading < loop->offload_max;
        ssize_t ret;

        io_uring_prep_readv(sqe, fd, iov, (unsigned)iovcnt, offset);
        if (offload) {
            sqe->flags |= IOSQE_ASYNC;
            loop->stats.offloads++;
            loop->offloading++;
        }
        ret = loop_co_wait_sqe(loop, sqe, &req);
        if (offload) {
            loop->offloading--;
        }
        return ret;
    } else {
        ThreadJob job = { .type = JOB_PREADV, .fd = fd, .iov = iov,
                          .iovcnt = iovcnt, .offset = offset };

        return loop_co_run_job(loop, &job);
    }
}

ssize_t strata_loop_co_preadv(StrataLoop *loop, StrataAioMode engine, int fd,
                              const struct iovec *iov, int iovcnt,
                              uint64_t offset)
{
    return loop_co_readv(loop, engine, fd, iov, iovcnt, offset, 0);
}

/* IOSQE_ASYNC skips the inline attempt in io_uring_enter: the kernel's
 * worker threads do the read (and its copy out of the page cache) while
 * this thread goes on submitting and completing other requests.  Beyond
 * loop->offload_max such reads at once the read is tried inline. */
ssize_t strata_loop_co_preadv_offload(StrataLoop *loop, StrataAioMode engine,
                                      int fd, const struct iovec *iov,
                                      int iovcnt, uint64_t offset)
{
    return loop_co_readv(loop, engine, fd, iov, iovcnt, offset,
                         IOSQE_ASYNC);
}

ssize_t strata_loop_co_preadv_direct(StrataLoop *loop, StrataAioMode engine,
                                     int fd, const struct iovec *iov,
                                     int iovcnt, uint64_t offset)
{
    return loop_co_readv(loop, engine, fd, iov, iovcnt, offset,
                         LOOP_REQ_DEVICE);
}

static ssize_t loop_co_writev(StrataLoop *loop, StrataAioMode engine,
                              int fd, const struct iovec *iov, int iovcnt,
                              uint64_t offset, unsigned flags)
{
    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    if (loop_use_ring(loop, engine)) {
        UringReq req = { strata_coroutine_self(), 0, false,
                         (flags & LOOP_REQ_DEVICE) != 0 };
        struct io_uring_sqe *sqe = loop_co_get_sqe(loop);

        io_uring_prep_writev(sqe, fd, iov, (unsigned)iovcnt, offset);
        return loop_co_wait_sqe(loop, sqe, &req);
    } else {
        ThreadJob job = { .type = JOB_PWRITEV, .fd = fd, .iov = iov,
                          .iovcnt = iovcnt, .offset = offset };

        return loop_co_run_job(loop, &job);
    }
}

ssize_t strata_loop_co_pwritev(StrataLoop *loop, StrataAioMode engine,
                               int fd, const struct iovec *iov, int iovcnt,
                               uint64_t offset)
{
    return loop_co_writev(loop, engine, fd, iov, iovcnt, offset, 0);
}

ssize_t strata_loop_co_pwritev_direct(StrataLoop *loop, StrataAioMode engine,
                                      int fd, const struct iovec *iov,
                                      int iovcnt, uint64_t offset)
{
    return loop_co_writev(loop, engine, fd, iov, iovcnt, offset,
                          LOOP_REQ_DEVICE);
}

int strata_loop_co_fdatasync(StrataLoop *loop, StrataAioMode engine, int fd)
{
    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    if (loop_use_ring(loop, engine)) {
        UringReq req = { strata_coroutine_self(), 0, false };
        struct io_uring_sqe *sqe = loop_co_get_sqe(loop);

        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        return loop_co_wait_sqe(loop, sqe, &req);
    } else {
        ThreadJob job = { .type = JOB_FDATASYNC, .fd = fd };

        return (int)loop_co_run_job(loop, &job);
    }
}

int strata_loop_co_fallocate(StrataLoop *loop, StrataAioMode engine, int fd,
                             int mode, uint64_t offset, uint64_t len)
{
    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    if (loop_use_ring(loop, engine)) {
        UringReq req = { strata_coroutine_self(), 0, false };
        struct io_uring_sqe *sqe = loop_co_get_sqe(loop);

        io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)len);
        return loop_co_wait_sqe(loop, sqe, &req);
    } else {
        ThreadJob job = { .type = JOB_FALLOCATE, .fd = fd, .mode = mode,
                          .offset = offset, .len = len };

        return (int)loop_co_run_job(loop, &job);
    }
}

ssize_t strata_loop_co_recv(StrataLoop *loop, int fd, void *buf, size_t len,
                            int flags)
{
    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    if (!loop->ring_recv) {
        return -ENOTSUP;
    }
    UringReq req = { strata_coroutine_self(), 0, false, false };
    struct io_uring_sqe *sqe = loop_co_get_sqe(loop);

    io_uring_prep_recv(sqe, fd, buf, len, flags);
    return loop_co_wait_sqe(loop, sqe, &req);
}

int strata_loop_co_run_in_thread(StrataLoop *loop, int (*fn)(void *opaque),
                                 void *opaque)
{
    ThreadJob job = { .type = JOB_FUNC, .fn = fn, .opaque = opaque };

    g_return_val_if_fail(loop != NULL, -EINVAL);
    g_return_val_if_fail(fn != NULL, -EINVAL);
    g_return_val_if_fail(strata_in_coroutine(), -EINVAL);

    return (int)loop_co_run_job(loop, &job);
}

bool strata_loop_has_io_uring(StrataLoop *loop)
{
    g_return_val_if_fail(loop != NULL, false);

    return loop->has_ring;
}

/* ------------------------------------------------------------------ */
/* The GSource                                                         */
/* ------------------------------------------------------------------ */

static bool loop_timer_expired(StrataLoop *loop, int64_t now)
{
    return loop->timer_head && loop->timer_head->expire_ns <= now;
}

static bool loop_ring_ready(StrataLoop *loop)
{
    return loop->has_ring && (io_uring_cq_ready(&loop->ring) ||
                              io_uring_cq_has_overflow(&loop->ring));
}

/* Extra reap rounds per dispatch (see loop_dispatch). */
#define LOOP_DISPATCH_ROUNDS 4

static gboolean loop_prepare(GSource *source, gint *timeout)
{
    StrataLoop *loop = ((LoopSource *)source)->loop;

    *timeout = -1;
    if (loop->has_ring && !loop_submit(loop)) {
        /* Retry soon; reaping completions may be what unblocks it. */
        *timeout = 1;
    }
    if (loop->bh_head || loop_ring_ready(loop)) {
        *timeout = 0;
        return TRUE;
    }
    if (loop->timer_head) {
        int64_t delta = loop->timer_head->expire_ns - strata_clock_ns();
        int64_t ms;

        if (delta <= 0) {
            *timeout = 0;
            return TRUE;
        }
        /* Round up: waking a little late beats spinning early. */
        ms = (delta + 999999) / 1000000;
        if (*timeout < 0 || ms < *timeout) {
            *timeout = (gint)MIN(ms, (int64_t)G_MAXINT);
        }
    }
    return FALSE;
}

static gboolean loop_check(GSource *source)
{
    StrataLoop *loop = ((LoopSource *)source)->loop;

    if (loop->bh_head || loop_ring_ready(loop)) {
        return TRUE;
    }
    if (loop->pool && (g_source_query_unix_fd(source, loop->event_tag) &
                       G_IO_IN)) {
        return TRUE;
    }
    return loop_timer_expired(loop, strata_clock_ns());
}

static gboolean loop_dispatch(GSource *source, GSourceFunc callback,
                              gpointer user_data)
{
    StrataLoop *loop = ((LoopSource *)source)->loop;

    if (loop->has_ring) {
        loop_reap_ring(loop);
    }
    loop_reap_threads(loop);
    loop_run_bhs(loop);
    loop_run_timers(loop);

    /* The coroutines just woken usually queued their next requests: hand
     * them over now and take whatever has completed meanwhile, a few
     * rounds, before paying for a trip through the main context's poll.
     * Bounded so other sources of the context still get their turn. */
    for (int round = 0; loop->has_ring && round < LOOP_DISPATCH_ROUNDS;
         round++) {
        if (io_uring_sq_ready(&loop->ring)) {
            loop_submit(loop);
        }
        if (!loop_ring_ready(loop) && !loop->bh_head) {
            break;
        }
        loop_reap_ring(loop);
        loop_run_bhs(loop);
    }
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs loop_source_funcs = {
    .prepare = loop_prepare,
    .check = loop_check,
    .dispatch = loop_dispatch,
};

/* ------------------------------------------------------------------ */
/* The loop                                                            */
/* ------------------------------------------------------------------ */

static bool loop_disabled_by_env(void)
{
    const char *env = g_getenv("STRATA_IO_URING_DISABLE");

    return env && *env && strcmp(env, "0") != 0;
}

/* The unsigned in [@min, @max] environment variable @name gives, or
 * @dflt when it is unset or anything else (the measuring knobs). */
static unsigned loop_env_unsigned(const char *name, unsigned min,
                                  unsigned max, unsigned dflt)
{
    const char *env = g_getenv(name);
    guint64 v;

    if (env && g_ascii_string_to_unsigned(env, 10, min, max, &v, NULL)) {
        return (unsigned)v;
    }
    return dflt;
}

static bool loop_init_ring(StrataLoop *loop, StrataAioMode mode,
                           GError **error)
{
    int ret;

    if (mode == STRATA_AIO_THREADS) {
        return true;
    }
    if (loop_disabled_by_env()) {
        loop->fallback_reason =
            g_strdup("io_uring disabled by STRATA_IO_URING_DISABLE");
    } else {
        ret = io_uring_queue_init(LOOP_RING_ENTRIES, &loop->ring, 0);
        if (ret == 0) {
            struct io_uring_probe *probe = io_uring_get_probe_ring(&loop->ring);

            loop->has_ring = true;
            /* No probe at all: older than the opcode too. */
            loop->ring_recv = probe &&
                              io_uring_opcode_supported(probe, IORING_OP_RECV);
            io_uring_free_probe(probe);
            return true;
        }
        if (ret != -ENOSYS && ret != -EPERM && ret != -EACCES &&
            ret != -ENOMEM) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                        "Cannot set up an io_uring ring: %s",
                        g_strerror(-ret));
            return false;
        }
        loop->fallback_reason =
            g_strdup_printf("the kernel refused io_uring: %s",
                            g_strerror(-ret));
    }
    if (mode == STRATA_AIO_IO_URING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "aio=io_uring is not available (%s)",
                    loop->fallback_reason);
        return false;
    }
    g_message("strata: using a thread pool for I/O: %s",
              loop->fallback_reason);
    return true;
}

StrataLoop *strata_loop_new(GMainContext *context, StrataAioMode mode,
                            GError **error)
{
    StrataLoop *loop;
    GSource *source;

    g_return_val_if_fail(mode == STRATA_AIO_AUTO ||
                         mode == STRATA_AIO_IO_URING ||
                         mode == STRATA_AIO_THREADS, NULL);
    g_return_val_if_fail(error == NULL || *error == NULL, NULL);

    loop = g_new0(StrataLoop, 1);
    loop->event_fd = -1;
    loop->reap_batch = loop_env_unsigned("STRATA_LOOP_REAP_BATCH", 1,
                                         LOOP_REAP_BATCH_MAX,
                                         LOOP_REAP_BATCH);
    /* A single CPU still gets some offloads: the workers' copies then
     * interleave with the loop's other work rather than delay it. */
    loop->offload_max = loop_env_unsigned(
        "STRATA_LOOP_OFFLOAD_MAX", 0, LOOP_OFFLOAD_MAX_LIMIT,
        LOOP_OFFLOAD_PER_CPU * MAX(g_get_num_processors() - 1, 1u));
    g_mutex_init(&loop->done_lock);

    if (!loop_init_ring(loop, mode, error)) {
        g_mutex_clear(&loop->done_lock);
        g_free(loop->fallback_reason);
        g_free(loop);
        return NULL;
    }

    loop->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (loop->event_fd < 0) {
        int err = errno;

        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "Cannot create an eventfd: %s", g_strerror(err));
        if (loop->has_ring) {
            io_uring_queue_exit(&loop->ring);
        }
        g_mutex_clear(&loop->done_lock);
        g_free(loop->fallback_reason);
        g_free(loop);
        return NULL;
    }

    loop->context = context ? g_main_context_ref(context)
                            : g_main_context_ref_thread_default();
    source = g_source_new(&loop_source_funcs, sizeof(LoopSource));
    loop->source = (LoopSource *)source;
    loop->source->loop = loop;
    g_source_set_name(source, "strata-loop");
    /* Synchronous helpers iterate the context from inside dispatch. */
    g_source_set_can_recurse(source, TRUE);
    if (loop->has_ring) {
        g_source_add_unix_fd(source, loop->ring.ring_fd, G_IO_IN);
    }
    loop->event_tag = g_source_add_unix_fd(source, loop->event_fd, G_IO_IN);
    g_source_attach(source, loop->context);
    return loop;
}

void strata_loop_free(StrataLoop *loop)
{
    if (!loop) {
        return;
    }
    g_return_if_fail(loop->inflight == 0);

    /* Workers first: until they are gone they may write the eventfd. */
    if (loop->pool) {
        g_thread_pool_free(loop->pool, FALSE, TRUE);
    }
    g_source_destroy(&loop->source->source);
    g_source_unref(&loop->source->source);
    if (loop->has_ring) {
        io_uring_queue_exit(&loop->ring);
    }
    close(loop->event_fd);

    while (loop->bh_head) {
        StrataBH *bh = loop->bh_head;

        bh_unlink(bh);
        if (bh->oneshot) {
            g_free(bh);
        }
    }
    while (loop->timer_head) {
        timer_unlink(loop->timer_head);
    }
    g_main_context_unref(loop->context);
    g_mutex_clear(&loop->done_lock);
    g_free(loop->fallback_reason);
    g_free(loop);
}

GMainContext *strata_loop_get_context(StrataLoop *loop)
{
    g_return_val_if_fail(loop != NULL, NULL);

    return loop->context;
}

const char *strata_loop_engine_name(StrataLoop *loop)
{
    g_return_val_if_fail(loop != NULL, NULL);

    return loop->has_ring ? "io_uring" : "threads";
}

const char *strata_loop_fallback_reason(StrataLoop *loop)
{
    g_return_val_if_fail(loop != NULL, NULL);

    return loop->fallback_reason;
}

/* ------------------------------------------------------------------ */
/* Adaptive polling                                                    */
/* ------------------------------------------------------------------ */

#define LOOP_POLL_FIRST_NS 4000

/*
 * Polling that catches almost nothing rests.  When the peer the loop
 * waits for runs on the same CPU (the scheduler moves a woken client
 * next to the task that woke it), the peer cannot run while the loop
 * polls: every window ends empty, and the loop holds the CPU from the
 * very task it waits for.  An NBD client on the daemon's CPU, 4 KiB
 * page-cache reads at depth 32: 1.361 s polling against 1.060 s not;
 * on the other CPU 0.876 s against 1.269 s.  Polling caught 1 wait in
 * 10 in the first case, 14 in 15 in the second.  So a round of
 * LOOP_POLL_ROUND polled waits that caught fewer than
 * LOOP_POLL_ROUND_HITS sends the next LOOP_POLL_REST waits straight to
 * sleep, after which polling tries again.
 */
#define LOOP_POLL_ROUND 32
#define LOOP_POLL_ROUND_HITS 8
#define LOOP_POLL_REST 256
#define LOOP_POLL_REST_MAX_SHIFT 5      /* up to 256 << 5 = 8192 waits */

/* The round and the rest; all zero is the start (see
 * strata_loop_set_poll_max_ns). */
typedef struct {
    unsigned waits;         /* polled waits in this round */
    unsigned caught;        /* of them, ended while polling */
    unsigned left;          /* waits still to rest */
    unsigned shift;         /* the next rest: LOOP_POLL_REST << shift */
} LoopPollRound;

/* GPollFunc carries no user data: the limit is the process's, the
 * window, the round and the counters the polling thread's. */
static gint64 loop_poll_max_ns;
static __thread gint64 loop_poll_ns;
static __thread guint64 loop_poll_polled, loop_poll_slept, loop_poll_rests;
static __thread LoopPollRound loop_poll_round;

/* Counts one polled wait into the round; a poor round rests polling,
 * each poor round in a row twice as long. */
static void loop_poll_tally(bool caught)
{
    LoopPollRound *r = &loop_poll_round;

    r->caught += caught;
    if (++r->waits < LOOP_POLL_ROUND) {
        return;
    }
    if (r->caught < LOOP_POLL_ROUND_HITS) {
        r->left = LOOP_POLL_REST << r->shift;
        r->shift = MIN(r->shift + 1, LOOP_POLL_REST_MAX_SHIFT);
        loop_poll_ns = 0;
        loop_poll_rests++;
    } else {
        r->shift = 0;
    }
    r->waits = 0;
    r->caught = 0;
}

/*
 * The context's poll: a wait that may block first asks without sleeping
 * until the window runs out (or the timeout, when sooner), then sleeps.
 * What the whole wait took then moves the window: ended inside it, it
 * was right; ended after it but within the limit, a longer window would
 * have caught it; outlasted the limit, polling only burns the CPU.
 */
static gint loop_poll(GPollFD *fds, guint nfds, gint timeout)
{
    gint64 max = loop_poll_max_ns;
    gint64 window = MIN(loop_poll_ns, max);
    gint64 start, waited;
    gint ret;

    if (timeout == 0 || max == 0) {
        return g_poll(fds, nfds, timeout);
    }
    if (loop_poll_round.left) {
        loop_poll_round.left--;
        loop_poll_slept++;
        return g_poll(fds, nfds, timeout);
    }
    start = strata_clock_ns();
    if (timeout > 0) {
        window = MIN(window, (gint64)timeout * 1000000);
    }
    while (window > 0) {
        ret = g_poll(fds, nfds, 0);
        if (ret != 0) {
            loop_poll_polled++;
            loop_poll_tally(true);
            return ret;
        }
        if (strata_clock_ns() - start >= window) {
            break;
        }
    }
    loop_poll_slept++;
    ret = g_poll(fds, nfds, timeout);
    waited = strata_clock_ns() - start;
    if (waited > max) {
        loop_poll_ns = 0;
    } else if (waited > loop_poll_ns) {
        loop_poll_ns = loop_poll_ns ? MIN(loop_poll_ns * 2, max)
                                    : MIN(LOOP_POLL_FIRST_NS, max);
    }
    if (window > 0) {
        loop_poll_tally(false);
    }
    return ret;
}

void strata_loop_set_poll_max_ns(StrataLoop *loop, int64_t max_ns)
{
    g_return_if_fail(loop != NULL && max_ns >= 0);

    loop_poll_max_ns = max_ns;
    loop_poll_ns = MIN(loop_poll_ns, max_ns);
    /* A new limit starts afresh: no rest carried over. */
    loop_poll_round = (LoopPollRound){ 0 };
    g_main_context_set_poll_func(loop->context,
                                 max_ns ? loop_poll : g_poll);
}

void strata_loop_get_poll_stats(StrataLoopPollStats *stats)
{
    g_return_if_fail(stats != NULL);

    stats->max_ns = loop_poll_max_ns;
    stats->window_ns = loop_poll_ns;
    stats->polled = loop_poll_polled;
    stats->slept = loop_poll_slept;
    stats->rests = loop_poll_rests;
}

bool strata_loop_iterate(StrataLoop *loop, bool blocking)
{
    g_return_val_if_fail(loop != NULL, false);
    g_return_val_if_fail(!strata_in_coroutine(), false);

    return g_main_context_iteration(loop->context, blocking);
}

typedef struct {
    StrataCoroutineFunc fn;
    void *opaque;
    bool done;
} RunCo;

static void run_co_body(void *opaque)
{
    RunCo *run = opaque;

    run->fn(run->opaque);
    run->done = true;
}

void strata_loop_run_co(StrataLoop *loop, StrataCoroutineFunc fn,
                        void *opaque)
{
    RunCo run = { fn, opaque, false };

    g_return_if_fail(loop != NULL);
    g_return_if_fail(fn != NULL);

    if (strata_in_coroutine()) {
        fn(opaque);
        return;
    }
    strata_coroutine_enter(strata_coroutine_new(run_co_body, &run));
    while (!run.done) {
        strata_loop_iterate(loop, true);
    }
}

void strata_loop_get_stats(StrataLoop *loop, StrataLoopStats *stats)
{
    g_return_if_fail(loop != NULL);
    g_return_if_fail(stats != NULL);

    *stats = loop->stats;
}
