/* Unit tests of util/coroutine.c: switching, nesting, the stack pool,
 * wake-up lists, CoQueue, CoMutex, stack size and the guard page. */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coroutine-private.h"
#define STRATA_TEST_TRACE
#include "test-util.h"

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif

/* Runs @fn in a child and returns its wait status. */
static int run_in_child(void (*fn)(void))
{
    int status = 0;
    pid_t pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        struct rlimit no_core = { 0, 0 };

        setrlimit(RLIMIT_CORE, &no_core);
        /* The child is meant to die with a message; keep logs quiet. */
        if (!freopen("/dev/null", "w", stderr)) {
            _exit(2);
        }
        fn();
        _exit(0);
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    return status;
}

/* ---- enter / yield ---- */

typedef struct {
    int value;
    bool inside;
    StrataCoroutine *self;
} Counter;

static void counter_body(void *opaque)
{
    Counter *c = opaque;

    c->inside = strata_in_coroutine();
    c->self = strata_coroutine_self();
    for (int i = 0; i < 3; i++) {
        c->value += 10;
        strata_co_yield();
    }
    c->value = -1;
}

START_TEST(test_enter_yield)
{
    Counter c = { 0 };
    StrataCoroutine *co = strata_coroutine_new(counter_body, &c);

    ck_assert_ptr_nonnull(co);
    ck_assert(!strata_in_coroutine());
    ck_assert_ptr_null(strata_coroutine_self());
    ck_assert_int_eq(c.value, 0);       /* not started by _new */

    strata_coroutine_enter(co);
    ck_assert(c.inside);
    ck_assert_ptr_eq(c.self, co);
    ck_assert_int_eq(c.value, 10);
    ck_assert(!strata_in_coroutine());

    strata_coroutine_enter(co);
    ck_assert_int_eq(c.value, 20);
    strata_coroutine_enter(co);
    ck_assert_int_eq(c.value, 30);
    strata_coroutine_enter(co);         /* runs to the end */
    ck_assert_int_eq(c.value, -1);
    ck_assert_ptr_null(strata_coroutine_self());
}
END_TEST

/* ---- nesting ---- */

static StrataCoroutine *inner_co;

static void inner_body(void *opaque)
{
    trace_add("inner1");
    strata_co_yield();
    trace_add("inner2");
}

static void outer_body(void *opaque)
{
    StrataCoroutine *self = strata_coroutine_self();

    trace_add("outer1");
    inner_co = strata_coroutine_new(inner_body, NULL);
    strata_coroutine_enter(inner_co);
    /* The inner coroutine's yield came back here, not to plain code. */
    ck_assert_ptr_eq(strata_coroutine_self(), self);
    trace_add("outer2");
    strata_co_yield();
    trace_add("outer3");
}

START_TEST(test_nesting)
{
    StrataCoroutine *outer = strata_coroutine_new(outer_body, NULL);

    strata_coroutine_enter(outer);
    ck_assert_str_eq(trace->str, "outer1 inner1 outer2");
    /* Re-entered from plain code, the inner one now returns here. */
    strata_coroutine_enter(inner_co);
    ck_assert_str_eq(trace->str, "outer1 inner1 outer2 inner2");
    strata_coroutine_enter(outer);
    ck_assert_str_eq(trace->str, "outer1 inner1 outer2 inner2 outer3");
}
END_TEST

/* ---- the pool ---- */

static void add_one(void *opaque)
{
    (*(int *)opaque)++;
}

static void add_one_yield(void *opaque)
{
    strata_co_yield();
    (*(int *)opaque)++;
}

START_TEST(test_pool_reuse)
{
    int n = 0;
    StrataCoroutine *first, *again;
    StrataCoroutine *live[200];

    for (int i = 0; i < 10000; i++) {
        StrataCoroutine *co = strata_coroutine_new(add_one, &n);

        strata_coroutine_enter(co);
        ck_assert_uint_le(strata_coroutine_pool_size(), 64);
    }
    ck_assert_int_eq(n, 10000);
    ck_assert_uint_ge(strata_coroutine_pool_size(), 1);

    /* A finished coroutine's stack is the next one handed out. */
    first = strata_coroutine_new(add_one, &n);
    strata_coroutine_enter(first);
    again = strata_coroutine_new(add_one, &n);
    ck_assert_ptr_eq(again, first);
    strata_coroutine_enter(again);

    /* Many alive at once: the pool is emptied, then capped. */
    for (int i = 0; i < 200; i++) {
        live[i] = strata_coroutine_new(add_one_yield, &n);
        strata_coroutine_enter(live[i]);
    }
    ck_assert_uint_eq(strata_coroutine_pool_size(), 0);
    for (int i = 0; i < 200; i++) {
        strata_coroutine_enter(live[i]);
    }
    ck_assert_int_eq(n, 10002 + 200);
    ck_assert_uint_eq(strata_coroutine_pool_size(), 64);
}
END_TEST

static gpointer pool_thread(gpointer data)
{
    int n = 0;

    /* A new thread has a pool of its own. */
    if (strata_coroutine_pool_size() != 0) {
        return GINT_TO_POINTER(-1);
    }
    for (int i = 0; i < 100; i++) {
        strata_coroutine_enter(strata_coroutine_new(add_one, &n));
    }
    if (strata_coroutine_pool_size() == 0) {
        return GINT_TO_POINTER(-2);
    }
    return GINT_TO_POINTER(n);
}

START_TEST(test_pool_threads)
{
    for (int i = 0; i < 4; i++) {
        GThread *th = g_thread_new("co", pool_thread, NULL);

        /* The pool is released by the thread-exit destructor. */
        ck_assert_int_eq(GPOINTER_TO_INT(g_thread_join(th)), 100);
    }
}
END_TEST

/* ---- wake-up lists ---- */

static StrataCoroutine *sleeper;

static void sleeper_body(void *opaque)
{
    trace_add("S1");
    strata_co_yield();
    trace_add("S2");
}

static void waker_body(void *opaque)
{
    trace_add("W1");
    strata_coroutine_wake(sleeper);
    /* Not switched yet: the sleeper runs when we yield. */
    trace_add("W2");
    strata_co_yield();
    trace_add("W3");
}

START_TEST(test_wake_deferred)
{
    StrataCoroutine *waker = strata_coroutine_new(waker_body, NULL);

    sleeper = strata_coroutine_new(sleeper_body, NULL);
    strata_coroutine_enter(sleeper);
    strata_coroutine_enter(waker);
    ck_assert_str_eq(trace->str, "S1 W1 W2 S2");
    strata_coroutine_enter(waker);
    ck_assert_str_eq(trace->str, "S1 W1 W2 S2 W3");
}
END_TEST

static void wake_then_end(void *opaque)
{
    trace_add("W");
    strata_coroutine_wake(sleeper);
    trace_add("Wend");
}

START_TEST(test_wake_on_end)
{
    sleeper = strata_coroutine_new(sleeper_body, NULL);
    strata_coroutine_enter(sleeper);
    strata_coroutine_enter(strata_coroutine_new(wake_then_end, NULL));
    ck_assert_str_eq(trace->str, "S1 W Wend S2");
}
END_TEST

START_TEST(test_wake_plain)
{
    sleeper = strata_coroutine_new(sleeper_body, NULL);
    strata_coroutine_enter(sleeper);
    trace_add("P");
    strata_coroutine_wake(sleeper);   /* from plain code: entered at once */
    trace_add("P2");
    ck_assert_str_eq(trace->str, "S1 P S2 P2");
}
END_TEST

/* ---- CoQueue ---- */

static StrataCoQueue queue;

static void queue_waiter(void *opaque)
{
    int id = GPOINTER_TO_INT(opaque);

    trace_add("w%d", id);
    strata_co_queue_wait(&queue, NULL);
    trace_add("r%d", id);
}

START_TEST(test_queue_order)
{
    strata_co_queue_init(&queue);
    ck_assert(strata_co_queue_empty(&queue));
    ck_assert(!strata_co_queue_next(&queue));

    for (int i = 0; i < 5; i++) {
        strata_coroutine_enter(strata_coroutine_new(queue_waiter,
                                                    GINT_TO_POINTER(i)));
    }
    ck_assert(!strata_co_queue_empty(&queue));
    ck_assert(strata_co_queue_next(&queue));
    ck_assert(strata_co_queue_next(&queue));
    strata_co_queue_restart_all(&queue);
    ck_assert(strata_co_queue_empty(&queue));
    ck_assert_str_eq(trace->str, "w0 w1 w2 w3 w4 r0 r1 r2 r3 r4");
}
END_TEST

static void queue_restarter(void *opaque)
{
    trace_add("R");
    strata_co_queue_restart_all(&queue);
    trace_add("R2");
}

START_TEST(test_queue_restart_from_coroutine)
{
    strata_co_queue_init(&queue);
    for (int i = 0; i < 3; i++) {
        strata_coroutine_enter(strata_coroutine_new(queue_waiter,
                                                    GINT_TO_POINTER(i)));
    }
    strata_coroutine_enter(strata_coroutine_new(queue_restarter, NULL));
    ck_assert_str_eq(trace->str, "w0 w1 w2 R R2 r0 r1 r2");
}
END_TEST

/* ---- CoMutex ---- */

/* A round-robin of runnable coroutines, driven from plain code. */
static StrataCoroutine *ready[64];
static unsigned ready_head, ready_tail;
static StrataCoMutex mutex;
static int in_critical;

static void ready_push(StrataCoroutine *co)
{
    ready[ready_tail++ % G_N_ELEMENTS(ready)] = co;
}

static void yield_to_others(void)
{
    ready_push(strata_coroutine_self());
    strata_co_yield();
}

static void mutex_worker(void *opaque)
{
    int id = GPOINTER_TO_INT(opaque);

    for (int round = 0; round < 3; round++) {
        strata_co_mutex_lock(&mutex);
        ck_assert_int_eq(in_critical, 0);
        ck_assert_ptr_eq(mutex.holder, strata_coroutine_self());
        in_critical++;
        trace_add("%d", id);
        yield_to_others();          /* others run and must queue */
        yield_to_others();
        ck_assert_int_eq(in_critical, 1);
        in_critical--;
        strata_co_mutex_unlock(&mutex);
    }
}

START_TEST(test_mutex_fair)
{
    strata_co_mutex_init(&mutex);
    ready_head = ready_tail = 0;
    in_critical = 0;

    for (int i = 0; i < 4; i++) {
        ready_push(strata_coroutine_new(mutex_worker, GINT_TO_POINTER(i)));
    }
    while (ready_head != ready_tail) {
        strata_coroutine_enter(ready[ready_head++ % G_N_ELEMENTS(ready)]);
    }
    /* FIFO hand-off: nobody takes the lock twice while others wait. */
    ck_assert_str_eq(trace->str, "0 1 2 3 0 1 2 3 0 1 2 3");
    ck_assert_uint_eq(mutex.locked, 0);
    ck_assert_ptr_null(mutex.holder);
    ck_assert(strata_co_queue_empty(&mutex.waiters));
}
END_TEST

static StrataCoMutex cond_mutex;
static int cond_value;

static void cond_waiter(void *opaque)
{
    strata_co_mutex_lock(&cond_mutex);
    while (cond_value == 0) {
        strata_co_queue_wait(&queue, &cond_mutex);
        ck_assert_ptr_eq(cond_mutex.holder, strata_coroutine_self());
    }
    trace_add("got%d", cond_value);
    strata_co_mutex_unlock(&cond_mutex);
}

static void cond_setter(void *opaque)
{
    strata_co_mutex_lock(&cond_mutex);
    cond_value = 7;
    strata_co_queue_restart_all(&queue);
    strata_co_mutex_unlock(&cond_mutex);
    trace_add("set");
}

START_TEST(test_queue_wait_mutex)
{
    strata_co_mutex_init(&cond_mutex);
    strata_co_queue_init(&queue);
    cond_value = 0;
    strata_coroutine_enter(strata_coroutine_new(cond_waiter, NULL));
    strata_coroutine_enter(strata_coroutine_new(cond_waiter, NULL));
    ck_assert_uint_eq(cond_mutex.locked, 0);   /* released while waiting */
    strata_coroutine_enter(strata_coroutine_new(cond_setter, NULL));
    ck_assert_str_eq(trace->str, "set got7 got7");
    ck_assert_uint_eq(cond_mutex.locked, 0);
}
END_TEST

/* ---- floating point control state is per coroutine ---- */

#if defined(__x86_64__) && !defined(STRATA_COROUTINE_PORTABLE)
static unsigned read_mxcsr(void)
{
    unsigned v;

    __asm__ volatile("stmxcsr %0" : "=m"(v));
    return v;
}

static void write_mxcsr(unsigned v)
{
    __asm__ volatile("ldmxcsr %0" : : "m"(v));
}

static void mxcsr_body(void *opaque)
{
    unsigned *seen = opaque;

    write_mxcsr((read_mxcsr() & ~0x6000u) | 0x2000u);  /* round down */
    strata_co_yield();
    *seen = read_mxcsr() & 0x6000u;
}

START_TEST(test_fpu_state)
{
    unsigned seen = 0;
    unsigned before = read_mxcsr();
    StrataCoroutine *co = strata_coroutine_new(mxcsr_body, &seen);

    strata_coroutine_enter(co);
    ck_assert_uint_eq(read_mxcsr(), before);
    strata_coroutine_enter(co);
    ck_assert_uint_eq(seen, 0x2000u);
    ck_assert_uint_eq(read_mxcsr(), before);
}
END_TEST
#endif

/* ---- stacks ---- */

static void big_frame(void *opaque)
{
    volatile unsigned char buf[200 * 1024];
    unsigned sum = 0;

    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (unsigned char)i;
    }
    for (size_t i = 0; i < sizeof(buf); i += 4096) {
        sum += buf[i] + buf[sizeof(buf) - 1 - i];
    }
    *(unsigned *)opaque = sum + 1;
}

START_TEST(test_stack_large)
{
    unsigned sum = 0;

    strata_coroutine_enter(strata_coroutine_new(big_frame, &sum));
    ck_assert_uint_ne(sum, 0);
}
END_TEST

/* Never reached; keeps the compiler from calling the recursion
 * infinite. */
static volatile int recursion_limit = G_MAXINT;

static int recurse(volatile char *prev, int depth)
{
    volatile char buf[1024];

    if (depth >= recursion_limit) {
        return 0;
    }

    buf[0] = (char)depth;
    buf[1023] = prev ? prev[0] : 0;
    return recurse(buf, depth + 1) + buf[1];
}

static void overflow_body(void *opaque)
{
    recurse(NULL, 0);
}

static G_GNUC_UNUSED void overflow_child(void)
{
    strata_coroutine_enter(strata_coroutine_new(overflow_body, NULL));
}

START_TEST(test_stack_guard)
{
#ifdef TEST_ASAN
    return;     /* ASan reports the overflow itself */
#else
    int status = run_in_child(overflow_child);

    ck_assert(WIFSIGNALED(status));
    ck_assert_int_eq(WTERMSIG(status), SIGSEGV);
#endif
}
END_TEST

/* ---- misuse ---- */

static void enter_finished_child(void)
{
    int n = 0;
    StrataCoroutine *co = strata_coroutine_new(add_one, &n);

    strata_coroutine_enter(co);
    strata_coroutine_enter(co);
}

static void enter_self_body(void *opaque)
{
    strata_coroutine_enter(strata_coroutine_self());
}

static void enter_running_child(void)
{
    strata_coroutine_enter(strata_coroutine_new(enter_self_body, NULL));
}

static void wake_twice_body(void *opaque)
{
    strata_coroutine_wake(sleeper);
    strata_coroutine_wake(sleeper);
}

static void wake_twice_child(void)
{
    sleeper = strata_coroutine_new(sleeper_body, NULL);
    strata_coroutine_enter(sleeper);
    strata_coroutine_enter(strata_coroutine_new(wake_twice_body, NULL));
}

START_TEST(test_misuse_dies)
{
    /* g_error() aborts the process; a clean exit would mean the bug went
     * unnoticed. */
    ck_assert(WIFSIGNALED(run_in_child(enter_finished_child)));
    ck_assert(WIFSIGNALED(run_in_child(enter_running_child)));
    ck_assert(WIFSIGNALED(run_in_child(wake_twice_child)));
}
END_TEST

START_TEST(test_misuse_outside)
{
    /* Coroutine-only calls from plain code are refused, not fatal. */
    g_test_expect_message("strata", G_LOG_LEVEL_CRITICAL, "*self != NULL*");
    strata_co_yield();
    g_test_expect_message("strata", G_LOG_LEVEL_CRITICAL, "*fn != NULL*");
    ck_assert_ptr_null(strata_coroutine_new(NULL, NULL));
    g_test_assert_expected_messages();
}
END_TEST

/* Tests that log an ordering run inside the trace fixture; the rest are
 * bare. */
int main(void)
{
    const StrataTestCase tests[] = {
        { "/coroutine/enter-yield", test_enter_yield, .bare = true },
        { "/coroutine/nesting", test_nesting },
        { "/coroutine/pool/reuse", test_pool_reuse, .bare = true },
        { "/coroutine/pool/threads", test_pool_threads, .bare = true },
        { "/coroutine/wake/deferred", test_wake_deferred },
        { "/coroutine/wake/on-end", test_wake_on_end },
        { "/coroutine/wake/plain", test_wake_plain },
        { "/coroutine/queue/order", test_queue_order },
        { "/coroutine/queue/restart-from-coroutine",
          test_queue_restart_from_coroutine },
        { "/coroutine/queue/wait-mutex", test_queue_wait_mutex },
        { "/coroutine/mutex/fair", test_mutex_fair },
#if defined(__x86_64__) && !defined(STRATA_COROUTINE_PORTABLE)
        { "/coroutine/fpu-state", test_fpu_state, .bare = true },
#endif
        { "/coroutine/stack/large", test_stack_large, .bare = true },
        { "/coroutine/stack/guard", test_stack_guard, .bare = true },
        { "/coroutine/misuse/dies", test_misuse_dies },
        { "/coroutine/misuse/outside", test_misuse_outside, .bare = true },
    };

    return strata_test_main("coroutine", tests, strata_test_trace_setup,
                            strata_test_trace_teardown);
}
