/* strata — the event loop: io_uring (or a thread pool), bottom halves,
 * timers; a GSource that runs in any GMainContext. */
#ifndef STRATA_LOOP_PRIVATE_H
#define STRATA_LOOP_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <glib.h>

#include "strata-util.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataLoop StrataLoop;
typedef struct StrataBH StrataBH;
typedef struct StrataTimer StrataTimer;

typedef enum {
    STRATA_AIO_AUTO,     /* io_uring when the kernel allows it, else threads */
    STRATA_AIO_IO_URING, /* io_uring or fail */
    STRATA_AIO_THREADS,  /* the thread pool even where io_uring works */
} StrataAioMode;

/**
 * strata_loop_new:
 * @context: (nullable): the GMainContext to attach to; NULL for the
 *   thread-default context
 * @mode: which I/O engine to use
 * @error: set when @mode is STRATA_AIO_IO_URING and the kernel refuses
 *
 * Returns: (transfer full): a loop attached to @context.
 */
StrataLoop *strata_loop_new(GMainContext *context, StrataAioMode mode,
                            GError **error);

/* Detaches the source and frees the loop.  Nothing may be in flight. */
void strata_loop_free(StrataLoop *loop);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataLoop, strata_loop_free)

/* Returns: (transfer none): the context the loop is attached to. */
GMainContext *strata_loop_get_context(StrataLoop *loop);

/* Returns: "io_uring" or "threads". */
const char *strata_loop_engine_name(StrataLoop *loop);

/* Returns: why io_uring is not used (nullable; NULL when it is used or
 * when threads were asked for). */
const char *strata_loop_fallback_reason(StrataLoop *loop);

/**
 * strata_loop_set_poll_max_ns:
 * @max_ns: the longest the loop may poll before it sleeps; 0 turns
 *   polling off
 *
 * Makes the thread that iterates @loop's context check for events
 * without sleeping for a while before each wait, as QEMU's IOThreads do
 * (their poll-max-ns).  A vCPU or CPU that sleeps takes tens of
 * microseconds to wake: a peer that answers a request within that time
 * (an NBD client, a disk at low depth) then finds the loop still
 * running.  The polling window adapts per thread: it grows (4 µs, then
 * doubling, up to @max_ns) while waits end within @max_ns, and drops to
 * nothing after a wait that outlasted @max_ns, so an idle loop sleeps
 * at once.  Installs a poll function on the context (the setting is
 * per process; the last call wins).
 */
void strata_loop_set_poll_max_ns(StrataLoop *loop, int64_t max_ns);

/* What the calling thread's polling did so far (the loop thread's,
 * called from it). */
typedef struct StrataLoopPollStats {
    int64_t max_ns;     /* the limit set; 0: off */
    int64_t window_ns;  /* how long the next wait may poll */
    uint64_t polled;    /* waits that ended while polling */
    uint64_t slept;     /* waits that went to sleep */
    uint64_t rests;     /* rounds that caught so little that polling
                         * rested (see loop_poll_tally) */
} StrataLoopPollStats;

void strata_loop_get_poll_stats(StrataLoopPollStats *stats);

/**
 * strata_loop_iterate:
 * @blocking: whether to wait for an event when nothing is ready
 *
 * Runs one iteration of the loop's GMainContext.  Plain code only
 * (never a coroutine).  Used to wait for a condition synchronously:
 * `while (!done) strata_loop_iterate(loop, true);`
 */
bool strata_loop_iterate(StrataLoop *loop, bool blocking);

/**
 * strata_loop_run_co:
 * @fn: coroutine body
 *
 * Plain code only: runs @fn(@opaque) in a new coroutine and iterates the
 * loop until it has returned.  Called from a coroutine it just calls @fn.
 */
void strata_loop_run_co(StrataLoop *loop, StrataCoroutineFunc fn,
                        void *opaque);

/* ---- bottom halves: callbacks run from the loop's next dispatch ---- */

typedef void (*StrataBHFunc)(void *opaque);

StrataBH *strata_bh_new(StrataLoop *loop, StrataBHFunc fn, void *opaque);
/* Schedules @bh once; scheduling an already scheduled BH does nothing. */
void strata_bh_schedule(StrataBH *bh);
void strata_bh_cancel(StrataBH *bh);
void strata_bh_free(StrataBH *bh);

/* One-shot: runs @fn(@opaque) from the next dispatch. */
void strata_loop_call_soon(StrataLoop *loop, StrataBHFunc fn, void *opaque);

/* Enters @co from the loop's next dispatch (not now). */
void strata_loop_schedule_co(StrataLoop *loop, StrataCoroutine *co);

/* Coroutine only: reschedule the caller at the end of the queue and
 * yield, letting other ready work run. */
void strata_loop_co_yield_now(StrataLoop *loop);

/* ---- timers (CLOCK_MONOTONIC nanoseconds) ---- */

typedef void (*StrataTimerFunc)(void *opaque);

int64_t strata_clock_ns(void);
StrataTimer *strata_timer_new(StrataLoop *loop, StrataTimerFunc fn,
                              void *opaque);
/* Arms the timer for the absolute time @expire_ns; re-arming moves it. */
void strata_timer_mod(StrataTimer *timer, int64_t expire_ns);
void strata_timer_del(StrataTimer *timer);
bool strata_timer_pending(const StrataTimer *timer);
void strata_timer_free(StrataTimer *timer);

/* Coroutine only: sleep for @ns nanoseconds without blocking the loop. */
void strata_loop_co_sleep_ns(StrataLoop *loop, int64_t ns);

/* ---- file I/O: coroutine only; results as the syscalls', -errno on
 * failure.  @engine picks the path per call: STRATA_AIO_AUTO and
 * STRATA_AIO_IO_URING use the ring when the loop has one (else the
 * thread pool), STRATA_AIO_THREADS always the pool (a file node opened
 * with aio=threads).  Ring submission is batched: everything queued
 * during one loop iteration goes to the kernel in one io_uring_enter. ---- */

ssize_t strata_loop_co_preadv(StrataLoop *loop, StrataAioMode engine, int fd,
                              const struct iovec *iov, int iovcnt,
                              uint64_t offset);
/* As strata_loop_co_preadv, but on the ring the read is handed to the
 * kernel's worker threads at once instead of being tried inline during
 * submission: for large buffered reads, whose copy out of the page cache
 * then runs on another CPU beside the loop's own work.  While enough such
 * reads are with the workers already (16 per further CPU, or
 * STRATA_LOOP_OFFLOAD_MAX) the read is tried inline instead. */
ssize_t strata_loop_co_preadv_offload(StrataLoop *loop, StrataAioMode engine,
                                      int fd, const struct iovec *iov,
                                      int iovcnt, uint64_t offset);
ssize_t strata_loop_co_pwritev(StrataLoop *loop, StrataAioMode engine,
                               int fd, const struct iovec *iov, int iovcnt,
                               uint64_t offset);
/* As strata_loop_co_preadv and strata_loop_co_pwritev, for I/O of a
 * device (an O_DIRECT file): on the ring, what the coroutine queues when
 * it completes is submitted at once, not with the other completions of
 * the batch. */
ssize_t strata_loop_co_preadv_direct(StrataLoop *loop, StrataAioMode engine,
                                     int fd, const struct iovec *iov,
                                     int iovcnt, uint64_t offset);
ssize_t strata_loop_co_pwritev_direct(StrataLoop *loop, StrataAioMode engine,
                                      int fd, const struct iovec *iov,
                                      int iovcnt, uint64_t offset);
int strata_loop_co_fdatasync(StrataLoop *loop, StrataAioMode engine, int fd);
int strata_loop_co_fallocate(StrataLoop *loop, StrataAioMode engine, int fd,
                             int mode, uint64_t offset, uint64_t len);

/* Coroutine only: recv(@fd, @buf, @len, @flags) on the loop's ring; the
 * bytes received or -errno, -ENOTSUP without a ring that can recv.
 * With MSG_WAITALL the kernel gathers the whole of @len (short only at
 * EOF, an error or a shutdown) in one request.  @buf must stay valid
 * until it returns, whatever happens to @fd meanwhile: shutdown(), not
 * close(), ends it. */
ssize_t strata_loop_co_recv(StrataLoop *loop, int fd, void *buf, size_t len,
                            int flags);

/* Whether the loop has an io_uring ring. */
bool strata_loop_has_io_uring(StrataLoop *loop);

/**
 * strata_loop_co_run_in_thread:
 * @fn: a blocking function run on a worker thread
 *
 * Coroutine only: runs @fn(@opaque) on the loop's worker pool and yields
 * until it returns; returns what @fn returned.  For the calls io_uring
 * cannot make (ftruncate, lseek(SEEK_DATA), …).
 */
int strata_loop_co_run_in_thread(StrataLoop *loop, int (*fn)(void *opaque),
                                 void *opaque);

/* Counters for tests and query commands. */
typedef struct StrataLoopStats {
    uint64_t submits;   /* io_uring_submit calls */
    uint64_t sqes;      /* SQEs handed to the kernel */
    uint64_t completions;
    uint64_t thread_jobs;
    uint64_t offloads;  /* of sqes, reads sent to the kernel's workers */
} StrataLoopStats;

void strata_loop_get_stats(StrataLoop *loop, StrataLoopStats *stats);

#ifdef __cplusplus
}
#endif

#endif
