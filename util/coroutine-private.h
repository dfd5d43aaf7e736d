/* strata — coroutine internals shared inside the library: queues, locks. */
#ifndef STRATA_COROUTINE_PRIVATE_H
#define STRATA_COROUTINE_PRIVATE_H

#include "strata-util.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Waking a coroutine from another coroutine never switches at once: the
 * woken coroutine is put on the waker's wake-up list and entered when the
 * waker next yields or ends (on the same thread).  From plain code (not a
 * coroutine) a wake enters the coroutine at once.  This keeps lock hand-off
 * deterministic and free of recursion.
 */

/**
 * strata_coroutine_wake:
 * @co: a coroutine that has yielded and waits to be woken
 *
 * Enters @co now (from plain code) or after the running coroutine yields
 * (from a coroutine).  Waking a coroutine twice before it runs is a bug.
 */
void strata_coroutine_wake(StrataCoroutine *co);

/* Stack size of new coroutines (bytes, without the guard page). */
#define STRATA_COROUTINE_STACK_SIZE (256 * 1024)

/* A FIFO of coroutines waiting for something.  Embed it; zero-initialise
 * with strata_co_queue_init(). */
typedef struct StrataCoQueue {
    StrataCoroutine *head;
    StrataCoroutine *tail;
} StrataCoQueue;

void strata_co_queue_init(StrataCoQueue *queue);

typedef struct StrataCoMutex StrataCoMutex;

/**
 * strata_co_queue_wait:
 * @queue: the queue
 * @mutex: (nullable): released while waiting, taken again before return
 *
 * Coroutine only: yield until strata_co_queue_next() or
 * strata_co_queue_restart_all() wakes the caller.
 */
void strata_co_queue_wait(StrataCoQueue *queue, StrataCoMutex *mutex);

/* Wakes the first waiter; returns false when nobody waited. */
bool strata_co_queue_next(StrataCoQueue *queue);

/* Wakes every waiter. */
void strata_co_queue_restart_all(StrataCoQueue *queue);

bool strata_co_queue_empty(const StrataCoQueue *queue);

/*
 * A coroutine mutex: lock yields while another coroutine holds it.  Fair
 * (FIFO).  Not recursive.  Zero-initialise with strata_co_mutex_init().
 */
struct StrataCoMutex {
    StrataCoroutine *holder;
    StrataCoQueue waiters;
    unsigned locked;
};

void strata_co_mutex_init(StrataCoMutex *mutex);
void strata_co_mutex_lock(StrataCoMutex *mutex);   /* coroutine only */
void strata_co_mutex_unlock(StrataCoMutex *mutex); /* coroutine only */

/* Per-thread pool statistics, for tests. */
unsigned strata_coroutine_pool_size(void);

#ifdef __cplusplus
}
#endif

#endif
