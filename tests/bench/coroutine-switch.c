/* Measures the cost of a coroutine switch, of creating and finishing a
 * coroutine, and, for reference, of a plain swapcontext() round trip.
 *
 * Usage: coroutine-switch [ROUND_TRIPS]   (default 10 million)
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <ucontext.h>

#include "coroutine-private.h"

static double now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Counts and yields until the count goes negative. */
static void yield_loop(void *opaque)
{
    volatile long *count = opaque;

    while (*count >= 0) {
        (*count)++;
        strata_co_yield();
    }
}

static void nothing(void *opaque)
{
    (*(volatile long *)opaque)++;
}

static ucontext_t main_uc, co_uc;

static void uc_body(void)
{
    for (;;) {
        swapcontext(&co_uc, &main_uc);
    }
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10 * 1000 * 1000;
    volatile long count = 0;
    StrataCoroutine *co;
    double t0, rt, create, uc;
    static char uc_stack[64 * 1024];

    if (n <= 0) {
        fprintf(stderr, "usage: %s [ROUND_TRIPS]\n", argv[0]);
        return 2;
    }

    /* Enter + yield: two switches per round trip. */
    co = strata_coroutine_new(yield_loop, (void *)&count);
    strata_coroutine_enter(co);
    t0 = now_ns();
    for (long i = 0; i < n; i++) {
        strata_coroutine_enter(co);
    }
    rt = (now_ns() - t0) / (double)n;
    if (count != n + 1) {
        fprintf(stderr, "lost round trips: %ld of %ld\n", count, n + 1);
        return 1;
    }
    count = -1;
    strata_coroutine_enter(co);     /* it ends, and its stack is freed */

    /* Create + enter + finish, with the stack from the pool. */
    count = 0;
    t0 = now_ns();
    for (long i = 0; i < n / 4; i++) {
        strata_coroutine_enter(strata_coroutine_new(nothing, (void *)&count));
    }
    create = (now_ns() - t0) / (double)(n / 4);

    /* swapcontext() round trip, for reference (it saves the signal mask
     * with a system call on every switch). */
    getcontext(&co_uc);
    co_uc.uc_stack.ss_sp = uc_stack;
    co_uc.uc_stack.ss_size = sizeof(uc_stack);
    co_uc.uc_link = NULL;
    makecontext(&co_uc, uc_body, 0);
    swapcontext(&main_uc, &co_uc);
    t0 = now_ns();
    for (long i = 0; i < n / 10; i++) {
        swapcontext(&main_uc, &co_uc);
    }
    uc = (now_ns() - t0) / (double)(n / 10);

    printf("coroutine switch: %.1f ns per switch "
           "(enter+yield round trip %.1f ns, %ld round trips)\n",
           rt / 2, rt, n);
    printf("coroutine create+enter+finish: %.1f ns (pooled stack)\n",
           create);
    printf("swapcontext reference: %.1f ns per switch "
           "(round trip %.1f ns)\n", uc / 2, uc);
    return 0;
}
