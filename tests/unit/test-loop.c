/* Unit tests of util/loop.c: bottom halves, timers, file I/O through both
 * engines, batching, the thread pool, fallback, and several contexts. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib-unix.h>

#include "coroutine-private.h"
#include "loop-private.h"
#define STRATA_TEST_TRACE
#include "test-util.h"

static void setup(void)
{
    strata_test_trace_setup();
    g_unsetenv("STRATA_IO_URING_DISABLE");
}

/* Engine of a looped test: 0 = io_uring, 1 = threads. */
static StrataAioMode engine_of(int i)
{
    return i == 0 ? STRATA_AIO_IO_URING : STRATA_AIO_THREADS;
}

/* A loop on a private context; NULL (and the test skipped) where the
 * kernel has no io_uring for us. */
static StrataLoop *loop_new_for(int engine, GMainContext **ctx)
{
    g_autoptr(GError) error = NULL;
    StrataLoop *loop;

    *ctx = g_main_context_new();
    loop = strata_loop_new(*ctx, engine_of(engine), &error);
    if (!loop) {
        ck_assert(g_error_matches(error, STRATA_ERROR,
                                  STRATA_ERROR_NOT_SUPPORTED));
        fprintf(stderr, "skipped: %s\n", error->message);
        g_main_context_unref(*ctx);
        return NULL;
    }
    ck_assert_str_eq(strata_loop_engine_name(loop),
                     engine == 0 ? "io_uring" : "threads");
    ck_assert(strata_loop_has_io_uring(loop) == (engine == 0));
    ck_assert_ptr_eq(strata_loop_get_context(loop), *ctx);
    return loop;
}

static void loop_done(StrataLoop *loop, GMainContext *ctx)
{
    strata_loop_free(loop);
    /* The source is gone from the context with the loop. */
    ck_assert(!g_main_context_pending(ctx));
    g_main_context_unref(ctx);
}

/* Iterates until *@flag is set, with a generous bound. */
static void iterate_until(StrataLoop *loop, const bool *flag)
{
    int64_t deadline = strata_clock_ns() + 10 * G_GINT64_CONSTANT(1000000000);

    while (!*flag) {
        ck_assert_int_lt(strata_clock_ns(), deadline);
        strata_loop_iterate(loop, true);
    }
}

/* ---- bottom halves ---- */

static void trace_bh(void *opaque)
{
    trace_add("%s", (const char *)opaque);
}

START_TEST(test_bh_order)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    StrataBH *a = strata_bh_new(loop, trace_bh, "A");
    StrataBH *b = strata_bh_new(loop, trace_bh, "B");
    StrataBH *c = strata_bh_new(loop, trace_bh, "C");
    StrataBH *d = strata_bh_new(loop, trace_bh, "D");

    strata_bh_schedule(c);
    strata_bh_schedule(a);
    strata_bh_schedule(c);      /* already scheduled: no second run */
    strata_bh_schedule(d);
    strata_bh_schedule(b);
    strata_bh_cancel(d);
    ck_assert_str_eq(trace->str, "");   /* nothing runs before dispatch */
    strata_loop_iterate(loop, false);
    ck_assert_str_eq(trace->str, "C A B");
    strata_loop_iterate(loop, false);
    ck_assert_str_eq(trace->str, "C A B");

    strata_bh_free(a);
    strata_bh_free(b);
    strata_bh_free(c);
    strata_bh_free(d);
    loop_done(loop, ctx);
}
END_TEST

typedef struct {
    StrataBH *bh;
    int runs;
} Resched;

static void resched_bh(void *opaque)
{
    Resched *r = opaque;

    r->runs++;
    strata_bh_schedule(r->bh);
}

static void timer_flag(void *opaque)
{
    *(bool *)opaque = true;
}

START_TEST(test_bh_reschedule)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    Resched r = { NULL, 0 };
    StrataTimer *timer;
    bool fired = false;

    r.bh = strata_bh_new(loop, resched_bh, &r);
    strata_bh_schedule(r.bh);
    strata_loop_iterate(loop, false);
    ck_assert_int_eq(r.runs, 1);    /* its own reschedule waits a turn */
    strata_loop_iterate(loop, false);
    ck_assert_int_eq(r.runs, 2);

    /* A BH that always reschedules itself does not starve timers. */
    timer = strata_timer_new(loop, timer_flag, &fired);
    strata_timer_mod(timer, strata_clock_ns() + 5 * 1000 * 1000);
    iterate_until(loop, &fired);
    ck_assert_int_gt(r.runs, 2);

    strata_bh_free(r.bh);
    strata_timer_free(timer);
    loop_done(loop, ctx);
}
END_TEST

static void count_cb(void *opaque)
{
    (*(int *)opaque)++;
}

START_TEST(test_call_soon)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    int n = 0;

    strata_loop_call_soon(loop, count_cb, &n);
    strata_loop_call_soon(loop, count_cb, &n);
    ck_assert_int_eq(n, 0);
    strata_loop_iterate(loop, false);
    ck_assert_int_eq(n, 2);
    strata_loop_iterate(loop, false);
    ck_assert_int_eq(n, 2);         /* one-shot */

    /* Pending one-shots are released with the loop. */
    strata_loop_call_soon(loop, count_cb, &n);
    loop_done(loop, ctx);
    ck_assert_int_eq(n, 2);
}
END_TEST

/* ---- coroutines on the loop ---- */

typedef struct {
    StrataLoop *loop;
    const char *name;
    bool done;
} YieldArg;

static void yielder(void *opaque)
{
    YieldArg *arg = opaque;

    for (int i = 1; i <= 3; i++) {
        trace_add("%s%d", arg->name, i);
        strata_loop_co_yield_now(arg->loop);
    }
    arg->done = true;
}

START_TEST(test_yield_now)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    YieldArg a = { loop, "a", false }, b = { loop, "b", false };

    strata_loop_schedule_co(loop, strata_coroutine_new(yielder, &a));
    strata_loop_schedule_co(loop, strata_coroutine_new(yielder, &b));
    ck_assert_str_eq(trace->str, "");   /* scheduled, not entered */
    iterate_until(loop, &b.done);
    ck_assert(a.done);
    ck_assert_str_eq(trace->str, "a1 b1 a2 b2 a3 b3");
    loop_done(loop, ctx);
}
END_TEST

/* ---- timers ---- */

typedef struct {
    int id;
    int64_t due;
    int64_t fired_at;
} TimedArg;

static void timed_cb(void *opaque)
{
    TimedArg *arg = opaque;

    arg->fired_at = strata_clock_ns();
    trace_add("t%d", arg->id);
}

START_TEST(test_timer_order)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    int64_t now = strata_clock_ns();
    const int64_t ms = 1000 * 1000;
    TimedArg args[4] = {
        { 1, now + 30 * ms, 0 }, { 2, now + 10 * ms, 0 },
        { 3, now + 20 * ms, 0 }, { 4, now + 15 * ms, 0 },
    };
    StrataTimer *timers[4];
    bool last = false;
    StrataTimer *end = strata_timer_new(loop, timer_flag, &last);

    for (int i = 0; i < 4; i++) {
        timers[i] = strata_timer_new(loop, timed_cb, &args[i]);
        strata_timer_mod(timers[i], args[i].due);
        ck_assert(strata_timer_pending(timers[i]));
    }
    strata_timer_del(timers[3]);            /* never fires */
    ck_assert(!strata_timer_pending(timers[3]));
    args[2].due = now + 5 * ms;             /* moved earlier */
    strata_timer_mod(timers[2], args[2].due);
    strata_timer_mod(end, now + 40 * ms);

    iterate_until(loop, &last);
    ck_assert_str_eq(trace->str, "t3 t2 t1");
    for (int i = 0; i < 3; i++) {
        ck_assert_int_ge(args[i].fired_at, args[i].due);
        ck_assert(!strata_timer_pending(timers[i]));
    }
    for (int i = 0; i < 4; i++) {
        strata_timer_free(timers[i]);
    }
    strata_timer_free(end);
    loop_done(loop, ctx);
}
END_TEST

typedef struct {
    StrataLoop *loop;
    int64_t slept;
    bool done;
} SleepArg;

static void sleeper(void *opaque)
{
    SleepArg *arg = opaque;
    int64_t t0 = strata_clock_ns();

    strata_loop_co_sleep_ns(arg->loop, 20 * 1000 * 1000);
    arg->slept = strata_clock_ns() - t0;
    arg->done = true;
}

START_TEST(test_co_sleep)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    SleepArg arg = { loop, 0, false };

    strata_coroutine_enter(strata_coroutine_new(sleeper, &arg));
    ck_assert(!arg.done);
    iterate_until(loop, &arg.done);
    ck_assert_int_ge(arg.slept, 20 * 1000 * 1000);
    ck_assert_int_lt(arg.slept, 2000 * 1000 * 1000);
    loop_done(loop, ctx);
}
END_TEST

/* ---- file I/O ---- */

typedef struct {
    char *dir;
    char *path;
    int fd;
} TempFile;

static void temp_file_open(TempFile *tf)
{
    g_autoptr(GError) error = NULL;

    tf->dir = g_dir_make_tmp("strata-loop-XXXXXX", &error);
    ck_assert_ptr_nonnull(tf->dir);
    tf->path = g_build_filename(tf->dir, "data", NULL);
    tf->fd = open(tf->path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_int_ge(tf->fd, 0);
}

static void temp_file_close(TempFile *tf)
{
    close(tf->fd);
    unlink(tf->path);
    rmdir(tf->dir);
    g_free(tf->path);
    g_free(tf->dir);
}

typedef struct {
    StrataLoop *loop;
    StrataAioMode engine;
    int fd;
    bool done;
    /* results, checked by the test in plain code */
    ssize_t wrote, read_back, short_read, offloaded;
    int sync, alloc, punch;
    char buf[8192];
    char obuf[8192];
    char hole[4096];
} RwArg;

static void rw_body(void *opaque)
{
    RwArg *a = opaque;
    char first[3000], second[5192];
    struct iovec wiov[2] = {
        { first, sizeof(first) }, { second, sizeof(second) },
    };
    struct iovec riov = { a->buf, sizeof(a->buf) };
    struct iovec oiov[2] = {
        { a->obuf, 1000 }, { a->obuf + 1000, sizeof(a->obuf) - 1000 },
    };
    struct iovec hiov = { a->hole, sizeof(a->hole) };
    char tail[100];
    struct iovec tiov = { tail, sizeof(tail) };

    memset(first, 'a', sizeof(first));
    memset(second, 'b', sizeof(second));
    a->wrote = strata_loop_co_pwritev(a->loop, a->engine, a->fd, wiov, 2,
                                      4096);
    a->sync = strata_loop_co_fdatasync(a->loop, a->engine, a->fd);
    a->read_back = strata_loop_co_preadv(a->loop, a->engine, a->fd, &riov,
                                         1, 4096);
    /* The same bytes through the kernel's workers (ring) or the pool. */
    a->offloaded = strata_loop_co_preadv_offload(a->loop, a->engine, a->fd,
                                                 oiov, 2, 4096);
    /* Past the end: a short read, returned as is. */
    a->short_read = strata_loop_co_preadv(a->loop, a->engine, a->fd, &tiov,
                                          1, 4096 + 8192 - 40);
    a->alloc = strata_loop_co_fallocate(a->loop, a->engine, a->fd, 0,
                                        0, 1024 * 1024);
    a->punch = strata_loop_co_fallocate(a->loop, a->engine, a->fd,
                                        FALLOC_FL_PUNCH_HOLE |
                                        FALLOC_FL_KEEP_SIZE, 4096, 4096);
    if (a->punch == 0) {
        strata_loop_co_preadv(a->loop, a->engine, a->fd, &hiov, 1, 4096);
    }
    a->done = true;
}

START_TEST(test_io_rw)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    TempFile tf;
    RwArg *a;
    StrataLoopStats stats;
    struct stat st;

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    a = g_new0(RwArg, 1);
    a->loop = loop;
    a->engine = engine_of(_i);
    a->fd = tf.fd;
    memset(a->hole, 'x', sizeof(a->hole));

    strata_loop_run_co(loop, rw_body, a);
    ck_assert(a->done);
    ck_assert_int_eq(a->wrote, 8192);
    ck_assert_int_eq(a->sync, 0);
    ck_assert_int_eq(a->read_back, 8192);
    for (int i = 0; i < 8192; i++) {
        ck_assert_int_eq(a->buf[i], i < 3000 ? 'a' : 'b');
    }
    ck_assert_int_eq(a->offloaded, 8192);
    ck_assert(memcmp(a->obuf, a->buf, sizeof(a->buf)) == 0);
    ck_assert_int_eq(a->short_read, 40);
    ck_assert_int_eq(a->alloc, 0);
    ck_assert_int_eq(fstat(tf.fd, &st), 0);
    ck_assert_int_eq(st.st_size, 1024 * 1024);
    if (a->punch != -EOPNOTSUPP) {
        ck_assert_int_eq(a->punch, 0);
        for (size_t i = 0; i < sizeof(a->hole); i++) {
            ck_assert_int_eq(a->hole[i], 0);
        }
    }

    strata_loop_get_stats(loop, &stats);
    if (_i == 0) {
        ck_assert_uint_ge(stats.sqes, 6);
        ck_assert_uint_ge(stats.submits, 1);
        ck_assert_uint_eq(stats.thread_jobs, 0);
    } else {
        ck_assert_uint_eq(stats.sqes, 0);
        ck_assert_uint_eq(stats.submits, 0);
        ck_assert_uint_ge(stats.thread_jobs, 6);
    }
    ck_assert_uint_eq(stats.completions, _i == 0 ? stats.sqes
                                                 : stats.thread_jobs);
    g_free(a);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

typedef struct {
    StrataLoop *loop;
    StrataAioMode engine;
    int rdonly_fd;
    ssize_t bad_read, bad_offload, bad_write, bad_sync, bad_alloc, ro_write;
} ErrArg;

static void err_body(void *opaque)
{
    ErrArg *a = opaque;
    char buf[512];
    struct iovec iov = { buf, sizeof(buf) };

    a->bad_read = strata_loop_co_preadv(a->loop, a->engine, 1000, &iov, 1, 0);
    a->bad_offload = strata_loop_co_preadv_offload(a->loop, a->engine, 1000,
                                                   &iov, 1, 0);
    a->bad_write = strata_loop_co_pwritev(a->loop, a->engine, 1000, &iov, 1,
                                          0);
    a->bad_sync = strata_loop_co_fdatasync(a->loop, a->engine, 1000);
    a->bad_alloc = strata_loop_co_fallocate(a->loop, a->engine, 1000, 0, 0,
                                            4096);
    a->ro_write = strata_loop_co_pwritev(a->loop, a->engine, a->rdonly_fd,
                                         &iov, 1, 0);
}

START_TEST(test_io_errors)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    TempFile tf;
    ErrArg a = { 0 };

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    a.loop = loop;
    a.engine = engine_of(_i);
    a.rdonly_fd = open(tf.path, O_RDONLY | O_CLOEXEC);
    ck_assert_int_ge(a.rdonly_fd, 0);
    ck_assert_int_eq(fcntl(1000, F_GETFD), -1);    /* fd 1000 is not open */

    strata_loop_run_co(loop, err_body, &a);
    ck_assert_int_eq(a.bad_read, -EBADF);
    ck_assert_int_eq(a.bad_offload, -EBADF);
    ck_assert_int_eq(a.bad_write, -EBADF);
    ck_assert_int_eq(a.bad_sync, -EBADF);
    ck_assert_int_eq(a.bad_alloc, -EBADF);
    ck_assert_int_eq(a.ro_write, -EBADF);

    close(a.rdonly_fd);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

/* Per call, aio=threads goes to the pool even on a ring loop. */
static void threads_engine_body(void *opaque)
{
    RwArg *a = opaque;
    struct iovec iov = { a->buf, 512 };

    a->wrote = strata_loop_co_pwritev(a->loop, STRATA_AIO_THREADS, a->fd,
                                      &iov, 1, 0);
    a->read_back = strata_loop_co_preadv(a->loop, STRATA_AIO_AUTO, a->fd,
                                         &iov, 1, 0);
}

START_TEST(test_io_engine_per_call)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(0, &ctx);
    TempFile tf;
    RwArg *a;
    StrataLoopStats stats;

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    a = g_new0(RwArg, 1);
    a->loop = loop;
    a->fd = tf.fd;
    strata_loop_run_co(loop, threads_engine_body, a);
    ck_assert_int_eq(a->wrote, 512);
    ck_assert_int_eq(a->read_back, 512);
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.thread_jobs, 1);
    ck_assert_uint_eq(stats.sqes, 1);
    g_free(a);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

typedef struct {
    StrataLoop *loop;
    int fd;
    int index;
    ssize_t ret;
    int *finished;
    char buf[4096];
} BatchArg;

static void batch_reader(void *opaque)
{
    BatchArg *a = opaque;
    struct iovec iov = { a->buf, sizeof(a->buf) };

    a->ret = strata_loop_co_preadv(a->loop, STRATA_AIO_AUTO, a->fd, &iov, 1,
                                   (uint64_t)a->index * 4096);
    (*a->finished)++;
}

/* Fills 32 blocks of @fd (block i with 'A' + i % 26) and starts @fn in
 * one coroutine per block; the coroutines queue their reads and yield. */
static BatchArg *start_block_readers(StrataLoop *loop, int fd,
                                     StrataCoroutineFunc fn, int *finished)
{
    BatchArg *args = g_new0(BatchArg, 32);
    char block[4096];

    for (int i = 0; i < 32; i++) {
        memset(block, 'A' + i % 26, sizeof(block));
        ck_assert_int_eq(pwrite(fd, block, sizeof(block), i * 4096), 4096);
    }
    for (int i = 0; i < 32; i++) {
        args[i] = (BatchArg){ loop, fd, i, 0, finished, { 0 } };
        strata_coroutine_enter(strata_coroutine_new(fn, &args[i]));
    }
    return args;
}

START_TEST(test_io_batching)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(0, &ctx);
    TempFile tf;
    BatchArg *args;
    StrataLoopStats stats;
    int finished = 0;
    bool all = false;

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    args = start_block_readers(loop, tf.fd, batch_reader, &finished);
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.submits, 0);    /* queued, not yet submitted */

    while (!all) {
        strata_loop_iterate(loop, true);
        all = finished == 32;
    }
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.sqes, 32);
    ck_assert_uint_eq(stats.submits, 1);
    ck_assert_uint_eq(stats.completions, 32);
    for (int i = 0; i < 32; i++) {
        ck_assert_int_eq(args[i].ret, 4096);
        ck_assert_int_eq(args[i].buf[0], 'A' + i % 26);
        ck_assert_int_eq(args[i].buf[4095], 'A' + i % 26);
    }
    g_free(args);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

/* More requests than the ring has entries: the SQ fills and is flushed. */
static void twice_reader(void *opaque)
{
    BatchArg *a = opaque;
    struct iovec iov = { a->buf, sizeof(a->buf) };
    uint64_t off = (uint64_t)a->index * 4096;

    a->ret = strata_loop_co_preadv(a->loop, STRATA_AIO_AUTO, a->fd, &iov, 1,
                                   off);
    if (a->ret == 4096) {
        a->ret = strata_loop_co_preadv(a->loop, STRATA_AIO_AUTO, a->fd, &iov,
                                       1, off);
    }
    (*a->finished)++;
}

/* A loop made while @var is @value (NULL: unset); the variable is unset
 * again after. */
static StrataLoop *loop_new_with_env(const char *var, const char *value,
                                     GMainContext **ctx)
{
    StrataLoop *loop;

    if (value) {
        g_setenv(var, value, TRUE);
    }
    loop = loop_new_for(0, ctx);
    g_unsetenv(var);
    return loop;
}

/* With STRATA_LOOP_REAP_BATCH=1 every completion's follow-up request is
 * submitted on its own, before the next completion is handled. */
START_TEST(test_io_reap_batch_env)
{
    GMainContext *ctx;
    StrataLoop *loop;
    TempFile tf;
    BatchArg *args;
    StrataLoopStats stats;
    int finished = 0;

    loop = loop_new_with_env("STRATA_LOOP_REAP_BATCH", "1", &ctx);
    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    args = start_block_readers(loop, tf.fd, twice_reader, &finished);
    while (finished < 32) {
        strata_loop_iterate(loop, true);
    }
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.sqes, 64);
    ck_assert_uint_eq(stats.submits, 1 + 32);
    for (int i = 0; i < 32; i++) {
        ck_assert_int_eq(args[i].ret, 4096);
    }
    g_free(args);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

static void offload_reader(void *opaque)
{
    BatchArg *a = opaque;
    struct iovec iov = { a->buf, sizeof(a->buf) };

    a->ret = strata_loop_co_preadv_offload(a->loop, STRATA_AIO_AUTO, a->fd,
                                           &iov, 1,
                                           (uint64_t)a->index * 4096);
    (*a->finished)++;
}

/* 32 offloaded reads queued at once on a loop made with
 * STRATA_LOOP_OFFLOAD_MAX=@env (NULL: unset), then @serial more one after
 * another.  Returns how many went to the kernel's workers, or -1 when
 * there is no ring. */
static int offloads_with_env(const char *env, int serial)
{
    GMainContext *ctx;
    StrataLoop *loop;
    TempFile tf;
    BatchArg *args;
    StrataLoopStats stats;
    int finished = 0;
    bool good = true;

    loop = loop_new_with_env("STRATA_LOOP_OFFLOAD_MAX", env, &ctx);
    if (!loop) {
        return -1;
    }
    temp_file_open(&tf);
    args = start_block_readers(loop, tf.fd, offload_reader, &finished);
    while (finished < 32) {
        strata_loop_iterate(loop, true);
    }
    for (int i = 0; i < serial; i++) {
        args[i].index = 31 - i;
        strata_coroutine_enter(strata_coroutine_new(offload_reader,
                                                    &args[i]));
        while (finished < 33 + i) {
            strata_loop_iterate(loop, true);
        }
    }
    /* Offloaded or inline, every read returns its block. */
    for (int i = 0; i < 32; i++) {
        good = good && args[i].ret == 4096 &&
               args[i].buf[0] == 'A' + args[i].index % 26 &&
               args[i].buf[4095] == 'A' + args[i].index % 26;
    }
    ck_assert(good);
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.sqes, 32 + serial);
    g_free(args);
    temp_file_close(&tf);
    loop_done(loop, ctx);
    return (int)stats.offloads;
}

/* Reads offloaded at once are capped; the rest are tried inline, and a
 * completed offload frees its place. */
START_TEST(test_io_offload_max_env)
{
    int unset = offloads_with_env(NULL, 0);

    if (unset < 0) {
        return;
    }
    /* The default leaves at least 28 per CPU beside the loop's. */
    ck_assert_int_ge(unset, 28);
    ck_assert_int_eq(offloads_with_env("2", 0), 2);
    ck_assert_int_eq(offloads_with_env("2", 5), 2 + 5);
    ck_assert_int_eq(offloads_with_env("0", 3), 0);
    ck_assert_int_eq(offloads_with_env("40", 0), 32);
    /* Garbage and out-of-range values: the default. */
    ck_assert_int_eq(offloads_with_env("lots", 0), unset);
    ck_assert_int_eq(offloads_with_env("99999", 0), unset);
    ck_assert_int_eq(offloads_with_env("-1", 0), unset);
}
END_TEST

START_TEST(test_io_ring_full)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(0, &ctx);
    TempFile tf;
    BatchArg *args;
    StrataLoopStats stats;
    int finished = 0;
    bool all = false;
    const int n = 600;

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    ck_assert_int_eq(ftruncate(tf.fd, 4096), 0);
    args = g_new0(BatchArg, n);
    for (int i = 0; i < n; i++) {
        args[i] = (BatchArg){ loop, tf.fd, 0, 0, &finished, { 0 } };
        strata_coroutine_enter(strata_coroutine_new(batch_reader, &args[i]));
    }
    while (!all) {
        strata_loop_iterate(loop, true);
        all = finished == n;
    }
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.sqes, n);
    ck_assert_uint_ge(stats.submits, 3);
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq(args[i].ret, 4096);
    }
    g_free(args);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

/* ---- run_in_thread ---- */

typedef struct {
    GThread *loop_thread;
    GThread *ran_on;
} ThreadArg;

static int in_thread_fn(void *opaque)
{
    ThreadArg *t = opaque;

    t->ran_on = g_thread_self();
    return 42;
}

typedef struct {
    StrataLoop *loop;
    ThreadArg t;
    int ret;
} RitArg;

static void rit_body(void *opaque)
{
    RitArg *a = opaque;

    a->ret = strata_loop_co_run_in_thread(a->loop, in_thread_fn, &a->t);
}

START_TEST(test_run_in_thread)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    RitArg a = { 0 };
    StrataLoopStats stats;

    if (!loop) {
        return;
    }
    a.loop = loop;
    a.t.loop_thread = g_thread_self();
    strata_loop_run_co(loop, rit_body, &a);
    ck_assert_int_eq(a.ret, 42);
    ck_assert_ptr_nonnull(a.t.ran_on);
    ck_assert_ptr_ne(a.t.ran_on, a.t.loop_thread);
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.thread_jobs, 1);
    loop_done(loop, ctx);
}
END_TEST

/* ---- recv on the ring ---- */

#define RECV_LEN (256 * 1024)

typedef struct {
    StrataLoop *loop;
    int fd;
    uint8_t *buf;
    size_t len;
    ssize_t ret;
} RecvArg;

static void recv_body(void *opaque)
{
    RecvArg *a = opaque;

    a->ret = strata_loop_co_recv(a->loop, a->fd, a->buf, a->len,
                                 MSG_WAITALL);
}

/* Sends RECV_LEN bytes (byte i is i % 251) in pieces, with pauses, so
 * the receiver catches up with it many times. */
static gpointer recv_writer(gpointer opaque)
{
    int fd = GPOINTER_TO_INT(opaque);
    g_autofree uint8_t *data = g_malloc(RECV_LEN);
    size_t off = 0;

    for (size_t i = 0; i < RECV_LEN; i++) {
        data[i] = i % 251;
    }
    while (off < RECV_LEN) {
        size_t n = MIN(RECV_LEN - off, 10000 + off % 7);
        ssize_t r = send(fd, data + off, n, MSG_NOSIGNAL);

        if (r <= 0) {
            break;
        }
        off += r;
        g_usleep(500);
    }
    return GSIZE_TO_POINTER(off);
}

static void shut_cb(void *opaque)
{
    shutdown(GPOINTER_TO_INT(opaque), SHUT_RDWR);
}

/* One recv(MSG_WAITALL) gathers what arrives in many pieces; a
 * shutdown() ends one that waits, with what it had; without a ring the
 * call says so and touches nothing. */
START_TEST(test_co_recv)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    g_autofree uint8_t *buf = g_malloc0(RECV_LEN);
    int sv[2];

    if (!loop) {
        return;
    }
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    RecvArg a = { loop, sv[0], buf, RECV_LEN, 0 };
    GThread *w = g_thread_new("writer", recv_writer, GINT_TO_POINTER(sv[1]));

    strata_loop_run_co(loop, recv_body, &a);
    if (_i == 1) {
        ck_assert_int_eq(a.ret, -ENOTSUP);
        ck_assert_uint_eq(buf[1], 0);
        /* Let the writer finish. */
        ck_assert_int_eq(recv(sv[0], buf, RECV_LEN, MSG_WAITALL), RECV_LEN);
    } else {
        ck_assert_int_eq(a.ret, RECV_LEN);
        for (size_t i = 0; i < RECV_LEN; i++) {
            ck_assert_uint_eq(buf[i], i % 251);
        }
    }
    ck_assert_uint_eq(GPOINTER_TO_SIZE(g_thread_join(w)), RECV_LEN);
    if (_i == 0) {
        StrataTimer *t = strata_timer_new(loop, shut_cb,
                                          GINT_TO_POINTER(sv[0]));

        ck_assert_int_eq(send(sv[1], "12345", 5, 0), 5);
        memset(buf, 0, RECV_LEN);
        a = (RecvArg){ loop, sv[0], buf, 65536, 0 };
        strata_timer_mod(t, strata_clock_ns() + 50 * 1000000);
        strata_loop_run_co(loop, recv_body, &a);
        ck_assert_int_eq(a.ret, 5);
        ck_assert(memcmp(buf, "12345", 5) == 0);
        ck_assert_uint_eq(buf[5], 0);
        strata_timer_free(t);
    }
    close(sv[0]);
    close(sv[1]);
    loop_done(loop, ctx);
}
END_TEST

/* ---- fallback ---- */

START_TEST(test_fallback_env)
{
    g_autoptr(GError) error = NULL;
    GMainContext *ctx = g_main_context_new();
    StrataLoop *loop;
    RwArg *a;
    TempFile tf;
    StrataLoopStats stats;

    g_setenv("STRATA_IO_URING_DISABLE", "1", TRUE);

    g_test_expect_message("strata", G_LOG_LEVEL_MESSAGE,
                          "*thread pool*STRATA_IO_URING_DISABLE*");
    loop = strata_loop_new(ctx, STRATA_AIO_AUTO, &error);
    g_test_assert_expected_messages();
    ck_assert_ptr_nonnull(loop);
    ck_assert_ptr_null(error);
    ck_assert(!strata_loop_has_io_uring(loop));
    ck_assert_str_eq(strata_loop_engine_name(loop), "threads");
    ck_assert_ptr_nonnull(strstr(strata_loop_fallback_reason(loop),
                                 "STRATA_IO_URING_DISABLE"));

    /* AUTO and IO_URING calls take the pool on such a loop. */
    temp_file_open(&tf);
    a = g_new0(RwArg, 1);
    a->loop = loop;
    a->engine = STRATA_AIO_IO_URING;
    a->fd = tf.fd;
    strata_loop_run_co(loop, rw_body, a);
    ck_assert_int_eq(a->read_back, 8192);
    strata_loop_get_stats(loop, &stats);
    ck_assert_uint_eq(stats.sqes, 0);
    ck_assert_uint_ge(stats.thread_jobs, 5);
    g_free(a);
    temp_file_close(&tf);
    strata_loop_free(loop);

    /* Asking for io_uring where there is none is an error. */
    loop = strata_loop_new(ctx, STRATA_AIO_IO_URING, &error);
    ck_assert_ptr_null(loop);
    ck_assert(g_error_matches(error, STRATA_ERROR,
                              STRATA_ERROR_NOT_SUPPORTED));
    ck_assert_ptr_nonnull(strstr(error->message, "io_uring"));
    g_clear_error(&error);

    /* Threads by choice is not a fallback. */
    loop = strata_loop_new(ctx, STRATA_AIO_THREADS, &error);
    ck_assert_ptr_nonnull(loop);
    ck_assert_ptr_null(strata_loop_fallback_reason(loop));
    strata_loop_free(loop);

    g_unsetenv("STRATA_IO_URING_DISABLE");
    loop = strata_loop_new(ctx, STRATA_AIO_AUTO, &error);
    ck_assert_ptr_nonnull(loop);
    if (strata_loop_has_io_uring(loop)) {
        ck_assert_ptr_null(strata_loop_fallback_reason(loop));
    } else {
        ck_assert_ptr_nonnull(strata_loop_fallback_reason(loop));
    }
    strata_loop_free(loop);
    g_main_context_unref(ctx);
}
END_TEST

/* ---- contexts ---- */

START_TEST(test_two_contexts)
{
    GMainContext *ctx1, *ctx2;
    StrataLoop *loop1 = loop_new_for(_i, &ctx1);
    StrataLoop *loop2;
    TempFile tf;
    int n1 = 0, n2 = 0;
    RitArg rit = { 0 };
    StrataCoroutine *co;
    bool done = false;

    if (!loop1) {
        return;
    }
    loop2 = loop_new_for(_i, &ctx2);
    temp_file_open(&tf);

    strata_loop_call_soon(loop1, count_cb, &n1);
    strata_loop_call_soon(loop2, count_cb, &n2);
    strata_loop_iterate(loop2, false);
    ck_assert_int_eq(n1, 0);
    ck_assert_int_eq(n2, 1);
    strata_loop_iterate(loop1, false);
    ck_assert_int_eq(n1, 1);
    ck_assert_int_eq(n2, 1);

    /* Work started on loop2 completes only when loop2's context runs. */
    rit.loop = loop2;
    co = strata_coroutine_new(rit_body, &rit);
    strata_coroutine_enter(co);
    for (int i = 0; i < 5; i++) {
        g_usleep(2000);
        strata_loop_iterate(loop1, false);
    }
    ck_assert_int_eq(rit.ret, 0);
    while (!done) {
        strata_loop_iterate(loop2, true);
        done = rit.ret == 42;
    }

    temp_file_close(&tf);
    loop_done(loop2, ctx2);
    loop_done(loop1, ctx1);
}
END_TEST

typedef struct {
    StrataLoop *loop;
    GMainLoop *main_loop;
    int fd;
    ssize_t ret;
    bool slept;
} MainLoopArg;

static void main_loop_body(void *opaque)
{
    MainLoopArg *a = opaque;
    char buf[100] = "hello";
    struct iovec iov = { buf, sizeof(buf) };

    a->ret = strata_loop_co_pwritev(a->loop, STRATA_AIO_AUTO, a->fd, &iov, 1,
                                    0);
    strata_loop_co_sleep_ns(a->loop, 2 * 1000 * 1000);
    a->slept = true;
    g_main_loop_quit(a->main_loop);
}

START_TEST(test_gmainloop)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    MainLoopArg a = { 0 };
    TempFile tf;

    if (!loop) {
        return;
    }
    temp_file_open(&tf);
    a.loop = loop;
    a.fd = tf.fd;
    a.main_loop = g_main_loop_new(ctx, FALSE);
    strata_loop_schedule_co(loop, strata_coroutine_new(main_loop_body, &a));
    g_main_loop_run(a.main_loop);
    ck_assert_int_eq(a.ret, 100);
    ck_assert(a.slept);
    g_main_loop_unref(a.main_loop);
    temp_file_close(&tf);
    loop_done(loop, ctx);
}
END_TEST

START_TEST(test_thread_default_context)
{
    g_autoptr(GError) error = NULL;
    GMainContext *ctx = g_main_context_new();
    StrataLoop *loop;

    g_main_context_push_thread_default(ctx);
    loop = strata_loop_new(NULL, STRATA_AIO_THREADS, &error);
    ck_assert_ptr_eq(strata_loop_get_context(loop), ctx);
    strata_loop_free(loop);
    g_main_context_pop_thread_default(ctx);
    g_main_context_unref(ctx);
}
END_TEST

/* ---- run_co and recursion ---- */

typedef struct {
    StrataLoop *loop;
    int depth;
    bool inner_in_co;
    int order;
} RunArg;

static void run_inner(void *opaque)
{
    RunArg *a = opaque;

    a->inner_in_co = strata_in_coroutine();
    a->order = a->order * 10 + 1;
}

static void run_outer(void *opaque)
{
    RunArg *a = opaque;

    strata_loop_co_sleep_ns(a->loop, 1000 * 1000);
    /* From a coroutine, run_co just calls the function. */
    strata_loop_run_co(a->loop, run_inner, a);
    a->order = a->order * 10 + 2;
}

START_TEST(test_run_co)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    RunArg a = { loop, 0, false, 0 };

    strata_loop_run_co(loop, run_outer, &a);
    ck_assert_int_eq(a.order, 12);
    ck_assert(a.inner_in_co);
    loop_done(loop, ctx);
}
END_TEST

static void sleepy(void *opaque)
{
    RunArg *a = opaque;

    strata_loop_co_sleep_ns(a->loop, 1000 * 1000);
    a->depth++;
}

static void sync_from_bh(void *opaque)
{
    RunArg *a = opaque;

    /* A synchronous helper inside dispatch iterates the context again. */
    strata_loop_run_co(a->loop, sleepy, a);
    a->order++;
}

START_TEST(test_nested_iteration)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(_i, &ctx);
    RunArg a = { loop, 0, false, 0 };
    bool done = false;

    if (!loop) {
        return;
    }
    strata_loop_call_soon(loop, sync_from_bh, &a);
    while (!done) {
        strata_loop_iterate(loop, true);
        done = a.order == 1;
    }
    ck_assert_int_eq(a.depth, 1);
    loop_done(loop, ctx);
}
END_TEST

/* ---- misuse ---- */

START_TEST(test_misuse)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(1, &ctx);
    char buf[16];
    struct iovec iov = { buf, sizeof(buf) };

    g_test_expect_message("strata", G_LOG_LEVEL_CRITICAL,
                          "*strata_in_coroutine*");
    ck_assert_int_eq(strata_loop_co_preadv(loop, STRATA_AIO_AUTO, 0, &iov, 1,
                                           0), -EINVAL);
    g_test_assert_expected_messages();
    loop_done(loop, ctx);
}
END_TEST

/* ---- adaptive polling ---- */

typedef struct {
    int fd;
    int n;
} Ticker;

/* Writes a byte @n times, 50 µs apart: a peer that answers quickly. */
static gpointer ticker_thread(gpointer opaque)
{
    Ticker *t = opaque;

    for (int i = 0; i < t->n; i++) {
        g_usleep(50);
        ck_assert_int_eq(write(t->fd, "x", 1), 1);
    }
    return NULL;
}

static gboolean tick_read(gint fd, GIOCondition cond, gpointer opaque)
{
    char buf[256];
    ssize_t n = read(fd, buf, sizeof(buf));

    if (n > 0) {
        *(int *)opaque += n;
    }
    return G_SOURCE_CONTINUE;
}

/* Runs @n ticks through @ctx, iterating it blocking until all came. */
static void run_ticks(StrataLoop *loop, int wfd, int n, int *got)
{
    Ticker t = { wfd, n };
    GThread *th = g_thread_new("ticker", ticker_thread, &t);
    int64_t deadline = strata_clock_ns() + 20 * G_GINT64_CONSTANT(1000000000);

    *got = 0;
    while (*got < n) {
        ck_assert_int_lt(strata_clock_ns(), deadline);
        strata_loop_iterate(loop, true);
    }
    g_thread_join(th);
}

static gboolean flag_timeout(gpointer opaque)
{
    *(bool *)opaque = true;
    return G_SOURCE_REMOVE;
}

/* With a limit, waits that end soon are caught while the loop polls and
 * the window grows; one long wait resets it; without a limit nothing
 * polls.  Counters and window are the thread's (strata_loop_poll_stats). */
START_TEST(test_poll_adapts)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(0, &ctx);
    StrataLoopPollStats st0, st1, st2, st3;
    int fds[2], got = 0;
    GSource *src, *ticks;
    bool fired = false;
    const int n = 400;

    if (!loop) {
        return;
    }
    ck_assert_int_eq(pipe(fds), 0);
    ck_assert(g_unix_set_fd_nonblocking(fds[0], TRUE, NULL));
    ticks = g_unix_fd_source_new(fds[0], G_IO_IN);
    g_source_set_callback(ticks, (GSourceFunc)(void (*)(void))tick_read, &got,
                          NULL);
    g_source_attach(ticks, ctx);

    /* Off by default: every wait sleeps. */
    strata_loop_get_poll_stats(&st0);
    ck_assert_int_eq(st0.max_ns, 0);
    run_ticks(loop, fds[1], 50, &got);
    strata_loop_get_poll_stats(&st1);
    ck_assert_int_eq(st1.polled, st0.polled);
    ck_assert_int_eq(st1.window_ns, 0);

    /* 2 ms: ticks 50 µs apart (however late a loaded machine makes
     * them) end waits inside the limit, so the window opens and most
     * waits end while polling. */
    strata_loop_set_poll_max_ns(loop, 2000000);
    run_ticks(loop, fds[1], n, &got);
    strata_loop_get_poll_stats(&st2);
    ck_assert_int_eq(st2.max_ns, 2000000);
    ck_assert_msg(st2.polled - st1.polled > n / 4,
                  "caught %" G_GUINT64_FORMAT " of %d waits while polling",
                  st2.polled - st1.polled, n);
    ck_assert_int_le(st2.window_ns, 2000000);

    /* A 20 ms wait outlasts the limit: the window closes. */
    src = g_timeout_source_new(20);
    g_source_set_callback(src, flag_timeout, &fired, NULL);
    g_source_attach(src, ctx);
    g_source_unref(src);
    iterate_until(loop, &fired);
    strata_loop_get_poll_stats(&st3);
    ck_assert_int_eq(st3.window_ns, 0);
    ck_assert_int_gt(st3.slept, st2.slept);

    /* Off again: back to plain sleeps. */
    strata_loop_set_poll_max_ns(loop, 0);
    run_ticks(loop, fds[1], 50, &got);
    strata_loop_get_poll_stats(&st0);
    ck_assert_int_eq(st0.polled, st3.polled);
    ck_assert_int_eq(st0.max_ns, 0);

    g_source_destroy(ticks);
    g_source_unref(ticks);
    close(fds[0]);
    close(fds[1]);
    loop_done(loop, ctx);
}
END_TEST

/* Through the context's poll function itself: waits that polling never
 * catches (nothing comes until the timeout) make it rest, resting waits
 * sleep at once, and after the rest a ready fd is caught while polling
 * again. */
START_TEST(test_poll_rests)
{
    GMainContext *ctx;
    StrataLoop *loop = loop_new_for(0, &ctx);
    StrataLoopPollStats st0, st1, st2, st3;
    GPollFunc poll_fn;
    GPollFD pfd;
    int fds[2], calls;

    if (!loop) {
        return;
    }
    ck_assert_int_eq(pipe(fds), 0);
    pfd = (GPollFD){ .fd = fds[0], .events = G_IO_IN };
    strata_loop_set_poll_max_ns(loop, 2000000);
    poll_fn = g_main_context_get_poll_func(ctx);
    strata_loop_get_poll_stats(&st0);

    /* Empty waits of 1 ms, inside the 2 ms limit: every window ends
     * with nothing, and a round of them rests polling. */
    for (calls = 0; calls < 200; calls++) {
        ck_assert_int_eq(poll_fn(&pfd, 1, 1), 0);
        strata_loop_get_poll_stats(&st1);
        if (st1.rests > st0.rests) {
            break;
        }
    }
    ck_assert_int_eq(st1.rests, st0.rests + 1);
    ck_assert_int_eq(st1.polled, st0.polled);
    ck_assert_int_eq(st1.window_ns, 0);

    /* Resting: a ready fd is found by the sleeping poll, not by
     * polling, wait after wait (without the rest the window would open
     * again after the first). */
    ck_assert_int_eq(write(fds[1], "x", 1), 1);
    for (calls = 0; calls < 10; calls++) {
        ck_assert_int_eq(poll_fn(&pfd, 1, 1000), 1);
    }
    strata_loop_get_poll_stats(&st2);
    ck_assert_int_eq(st2.polled, st1.polled);
    ck_assert_int_eq(st2.slept, st1.slept + 10);

    /* The rest ends: the ready fd is caught while polling again. */
    for (calls = 0; calls < 2000; calls++) {
        ck_assert_int_eq(poll_fn(&pfd, 1, 1000), 1);
        strata_loop_get_poll_stats(&st3);
        if (st3.polled > st2.polled) {
            break;
        }
    }
    ck_assert_int_gt(st3.polled, st2.polled);
    ck_assert_int_eq(st3.rests, st1.rests);

    strata_loop_set_poll_max_ns(loop, 0);
    close(fds[0]);
    close(fds[1]);
    loop_done(loop, ctx);
}
END_TEST

/* .loops = 2: once per engine, io_uring then threads (engine_of()). */
int main(void)
{
    const StrataTestCase tests[] = {
        { "/loop/bh/order", test_bh_order },
        { "/loop/bh/reschedule", test_bh_reschedule },
        { "/loop/bh/call-soon", test_call_soon },
        { "/loop/co/yield-now", test_yield_now },
        { "/loop/timer/order", test_timer_order },
        { "/loop/timer/co-sleep", test_co_sleep },
        { "/loop/io/read-write", test_io_rw, .loops = 2 },
        { "/loop/io/errors", test_io_errors, .loops = 2 },
        { "/loop/io/engine-per-call", test_io_engine_per_call },
        { "/loop/io/batching", test_io_batching },
        { "/loop/io/reap-batch-env", test_io_reap_batch_env },
        { "/loop/io/offload-max-env", test_io_offload_max_env },
        { "/loop/io/ring-full", test_io_ring_full },
        { "/loop/thread/run-in-thread", test_run_in_thread, .loops = 2 },
        { "/loop/io/co-recv", test_co_recv, .loops = 2 },
        { "/loop/fallback/env", test_fallback_env },
        { "/loop/context/two", test_two_contexts, .loops = 2 },
        { "/loop/context/gmainloop", test_gmainloop, .loops = 2 },
        { "/loop/context/thread-default", test_thread_default_context },
        { "/loop/run-co", test_run_co },
        { "/loop/nested-iteration", test_nested_iteration, .loops = 2 },
        { "/loop/misuse", test_misuse },
        { "/loop/poll/adapts", test_poll_adapts },
        { "/loop/poll/rests", test_poll_rests },
    };

    return strata_test_main("loop", tests, setup,
                            strata_test_trace_teardown);
}
