/* strata — coroutines: a fast stack switch, pooled stacks, CoQueue and
 * CoMutex.
 *
 * Each coroutine runs on its own mmap'd stack with a PROT_NONE guard page
 * below it.  A coroutine and its stack are never torn down when its body
 * returns: the stack keeps running a small loop (co_run) that waits to be
 * handed a new body, and the pair goes to a per-thread pool.  Creating a
 * coroutine is therefore a pool pop and two stores in the common case.
 *
 * The switch on x86_64 is a dozen instructions of assembly that save the
 * callee-saved registers and the floating point control words on the old
 * stack and pop them from the new one: no system call (swapcontext() would
 * make one to save the signal mask).  Elsewhere makecontext/swapcontext
 * bootstrap a new stack once and _setjmp/_longjmp do the switches.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "coroutine-private.h"

#if defined(__x86_64__) && !defined(STRATA_COROUTINE_PORTABLE)
#define CO_ASM_X86_64 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CO_ASAN 1
#endif
#endif

#ifdef CO_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define CO_VALGRIND 1
#endif
#endif

/* Stacks kept per thread for reuse; beyond this they are unmapped. */
#define CO_POOL_MAX 64

typedef enum {
    CO_READY,   /* created or yielded: may be entered */
    CO_RUNNING, /* on the chain of entered coroutines of its thread */
    CO_DONE,    /* body returned; in the pool or about to be */
} CoState;

struct StrataCoroutine {
#ifdef CO_ASM_X86_64
    void *sp;                   /* saved stack pointer while switched out */
#else
    jmp_buf env;
#endif
    StrataCoroutineFunc fn;
    void *opaque;
    CoState state;
    bool woken;                 /* on somebody's wake-up list */
    StrataCoroutine *caller;    /* who entered us, while we run */
    StrataCoroutine *queue_next; /* link in a CoQueue or the pool */
    StrataCoroutine *wake_next;  /* link in a wake-up list */
    /* coroutines woken by this one, entered when it yields or ends */
    StrataCoroutine *wake_head;
    StrataCoroutine *wake_tail;
    void *map;                  /* the mapping: guard page, then stack */
    size_t map_len;
#ifdef CO_ASAN
    void *asan_fake_stack;
    const void *asan_bottom;
    size_t asan_size;
#endif
#ifdef CO_VALGRIND
    unsigned valgrind_id;
#endif
};

typedef struct {
    /* Stands for the thread's own stack: the caller of the outermost
     * coroutine. */
    StrataCoroutine leader;
    StrataCoroutine *current;   /* NULL outside coroutines */
    StrataCoroutine *pool;
    unsigned pool_size;
    bool key_set;
#ifdef CO_ASAN
    StrataCoroutine *switch_from;
#endif
#ifndef CO_ASM_X86_64
    jmp_buf *bootstrap_env;
#endif
} CoThread;

static __thread CoThread co_thread;
static pthread_key_t co_thread_key;
static pthread_once_t co_thread_once = PTHREAD_ONCE_INIT;

static __attribute__((noreturn)) void co_run(StrataCoroutine *self);

/* ------------------------------------------------------------------ */
/* The switch                                                          */
/* ------------------------------------------------------------------ */

#ifdef CO_ASM_X86_64
/*
 * strata_co_switch_x86_64(&from->sp, to->sp): everything the SysV ABI
 * says a callee must preserve is pushed on the current stack (rbx, rbp,
 * r12-r15, and the MXCSR and x87 control words, whose control bits are
 * callee-saved too), rsp is stored, the other stack is loaded and the
 * same frame popped from it.  Caller-saved registers need no care: the
 * compiler already assumes a call clobbers them.
 */
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl strata_co_switch_x86_64\n"
    ".hidden strata_co_switch_x86_64\n"
    ".type strata_co_switch_x86_64, @function\n"
    "strata_co_switch_x86_64:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size strata_co_switch_x86_64, .-strata_co_switch_x86_64\n");

__attribute__((visibility("hidden")))
void strata_co_switch_x86_64(void **save_sp, void *load_sp);

static inline void arch_switch(StrataCoroutine *from, StrataCoroutine *to)
{
    strata_co_switch_x86_64(&from->sp, to->sp);
}
#else
static inline void arch_switch(StrataCoroutine *from, StrataCoroutine *to)
{
    if (!_setjmp(from->env)) {
        _longjmp(to->env, 1);
    }
}
#endif

#ifdef CO_ASAN
/* Runs on the stack we just arrived on, right after a switch. */
static void co_asan_finish(StrataCoroutine *self)
{
    CoThread *t = &co_thread;
    const void *bottom;
    size_t size;

    __sanitizer_finish_switch_fiber(self->asan_fake_stack, &bottom, &size);
    /* The thread's own stack is learnt the first time we leave it. */
    if (t->switch_from == &t->leader) {
        t->leader.asan_bottom = bottom;
        t->leader.asan_size = size;
    }
}
#endif

/* Switches from @from (running) to @to.  @ending: @from's body has
 * returned, so its fake stack (ASan) can go. */
static inline void co_switch(StrataCoroutine *from, StrataCoroutine *to,
                             bool ending)
{
#ifdef CO_ASAN
    co_thread.switch_from = from;
    if (ending) {
        from->asan_fake_stack = NULL;
    }
    __sanitizer_start_switch_fiber(ending ? NULL : &from->asan_fake_stack,
                                   to->asan_bottom, to->asan_size);
#else
    (void)ending;
#endif
    arch_switch(from, to);
#ifdef CO_ASAN
    co_asan_finish(from);
#endif
}

/* ------------------------------------------------------------------ */
/* Stacks and the pool                                                 */
/* ------------------------------------------------------------------ */

static size_t co_page_size(void)
{
    static size_t page;

    if (!page) {
        page = (size_t)sysconf(_SC_PAGESIZE);
    }
    return page;
}

static void co_destroy(StrataCoroutine *co)
{
#ifdef CO_VALGRIND
    VALGRIND_STACK_DEREGISTER(co->valgrind_id);
#endif
#ifdef CO_ASAN
    __asan_unpoison_memory_region((uint8_t *)co->map + co_page_size(),
                                  STRATA_COROUTINE_STACK_SIZE);
#endif
    munmap(co->map, co->map_len);
    g_free(co);
}

static void co_thread_exit(void *opaque)
{
    CoThread *t = opaque;

    while (t->pool) {
        StrataCoroutine *co = t->pool;

        t->pool = co->queue_next;
        co_destroy(co);
    }
    t->pool_size = 0;
}

static void co_make_key(void)
{
    if (pthread_key_create(&co_thread_key, co_thread_exit) != 0) {
        g_error("strata: cannot create the coroutine pool key");
    }
}

static void co_release(StrataCoroutine *co)
{
    CoThread *t = &co_thread;

    if (t->pool_size >= CO_POOL_MAX) {
        co_destroy(co);
        return;
    }
    if (G_UNLIKELY(!t->key_set)) {
        pthread_once(&co_thread_once, co_make_key);
        pthread_setspecific(co_thread_key, t);
        t->key_set = true;
    }
    co->queue_next = t->pool;
    t->pool = co;
    t->pool_size++;
}

#ifdef CO_ASM_X86_64
static __attribute__((noreturn)) void co_trampoline(void)
{
    StrataCoroutine *self = co_thread.current;

#ifdef CO_ASAN
    self->asan_fake_stack = NULL;
    co_asan_finish(self);
#endif
    co_run(self);
}

static void co_init_context(StrataCoroutine *co, uint8_t *stack_lo,
                            size_t stack_size)
{
    uintptr_t top = ((uintptr_t)stack_lo + stack_size) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)top;

    /*
     * The frame strata_co_switch_x86_64 pops: control words, r15..r12,
     * rbx, rbp, then the address its `ret` jumps to.  Above that a zero
     * return address, so co_trampoline starts with rsp = 8 (mod 16) as
     * if it had been called, and unwinders stop there.
     */
    *--sp = 0;
    *--sp = (uint64_t)(uintptr_t)co_trampoline;
    for (int i = 0; i < 6; i++) {
        *--sp = 0;
    }
    *--sp = 0x1f80 | ((uint64_t)0x037f << 32); /* default MXCSR, x87 CW */
    co->sp = sp;
}
#else
static __attribute__((noreturn)) void co_trampoline(int lo, int hi)
{
    StrataCoroutine *self =
        (StrataCoroutine *)(((uintptr_t)(unsigned)hi << 16 << 16) |
                            (uintptr_t)(unsigned)lo);
    CoThread *t = &co_thread;
#ifdef CO_ASAN
    const void *bottom;
    size_t size;

    __sanitizer_finish_switch_fiber(NULL, &bottom, &size);
#endif

    /* Park here; the first strata_coroutine_enter() jumps back in. */
    if (!_setjmp(self->env)) {
#ifdef CO_ASAN
        __sanitizer_start_switch_fiber(&self->asan_fake_stack, bottom, size);
#endif
        _longjmp(*t->bootstrap_env, 1);
    }
#ifdef CO_ASAN
    co_asan_finish(self);
#endif
    co_run(self);
}

static void co_init_context(StrataCoroutine *co, uint8_t *stack_lo,
                            size_t stack_size)
{
    CoThread *t = &co_thread;
    ucontext_t old_uc, uc;
    jmp_buf old_env;
    jmp_buf *saved = t->bootstrap_env;
    uintptr_t p = (uintptr_t)co;
#ifdef CO_ASAN
    void *fake = NULL;
#endif

    if (getcontext(&uc) < 0) {
        g_error("strata: getcontext failed: %s", g_strerror(errno));
    }
    uc.uc_link = NULL;
    uc.uc_stack.ss_sp = stack_lo;
    uc.uc_stack.ss_size = stack_size;
    uc.uc_stack.ss_flags = 0;
    makecontext(&uc, (void (*)(void))co_trampoline, 2,
                (int)(unsigned)p, (int)(unsigned)(p >> 16 >> 16));

    t->bootstrap_env = &old_env;
#ifdef CO_ASAN
    __sanitizer_start_switch_fiber(&fake, co->asan_bottom, co->asan_size);
#endif
    if (!_setjmp(old_env)) {
        swapcontext(&old_uc, &uc);
    }
#ifdef CO_ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
    t->bootstrap_env = saved;
}
#endif

static StrataCoroutine *co_alloc(void)
{
    size_t page = co_page_size();
    size_t len = STRATA_COROUTINE_STACK_SIZE + page;
    StrataCoroutine *co;
    uint8_t *map;

    map = mmap(NULL, len, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE,
               -1, 0);
    if (map == MAP_FAILED) {
        g_error("strata: cannot map a coroutine stack: %s",
                g_strerror(errno));
    }
    /* The guard page turns a stack overflow into SIGSEGV instead of
     * silently corrupting whatever lies below. */
    if (mprotect(map, page, PROT_NONE) < 0) {
        g_error("strata: cannot protect a coroutine guard page: %s",
                g_strerror(errno));
    }

#ifdef CO_ASAN
    /* A stack unmapped by another thread's exit may have left stale
     * redzones in the shadow of this address range. */
    __asan_unpoison_memory_region(map + page, STRATA_COROUTINE_STACK_SIZE);
#endif

    co = g_new0(StrataCoroutine, 1);
    co->map = map;
    co->map_len = len;
#ifdef CO_ASAN
    co->asan_bottom = map + page;
    co->asan_size = STRATA_COROUTINE_STACK_SIZE;
#endif
#ifdef CO_VALGRIND
    co->valgrind_id = VALGRIND_STACK_REGISTER(map + page, map + len);
#endif
    co_init_context(co, map + page, STRATA_COROUTINE_STACK_SIZE);
    return co;
}

/* ------------------------------------------------------------------ */
/* Coroutines                                                          */
/* ------------------------------------------------------------------ */

/* The life of a stack: run a body, hand control back, wait for the next
 * body (the pool reuses us without rebuilding the stack). */
static __attribute__((noreturn)) void co_run(StrataCoroutine *self)
{
    for (;;) {
        StrataCoroutine *caller;

        self->fn(self->opaque);

        self->state = CO_DONE;
        caller = self->caller;
        self->caller = NULL;
        co_switch(self, caller, true);
    }
}

StrataCoroutine *strata_coroutine_new(StrataCoroutineFunc fn, void *opaque)
{
    CoThread *t = &co_thread;
    StrataCoroutine *co;

    g_return_val_if_fail(fn != NULL, NULL);

    co = t->pool;
    if (co) {
        t->pool = co->queue_next;
        t->pool_size--;
    } else {
        co = co_alloc();
    }
    co->fn = fn;
    co->opaque = opaque;
    co->state = CO_READY;
    co->woken = false;
    co->caller = NULL;
    co->queue_next = NULL;
    co->wake_next = NULL;
    co->wake_head = NULL;
    co->wake_tail = NULL;
    return co;
}

static __attribute__((noreturn)) void co_bad_enter(StrataCoroutine *co)
{
    if (co->state == CO_DONE) {
        g_error("strata: coroutine %p entered after it finished", co);
    }
    g_error("strata: coroutine %p entered while it is running", co);
}

void strata_coroutine_enter(StrataCoroutine *co)
{
    CoThread *t = &co_thread;
    StrataCoroutine *self = t->current ? t->current : &t->leader;
    StrataCoroutine *pending, *pending_tail;

    g_return_if_fail(co != NULL);

    if (G_UNLIKELY(co->woken)) {
        g_error("strata: coroutine %p entered while it is already woken "
                "and queued to run", co);
    }
    co->wake_next = NULL;
    pending = pending_tail = co;

    /* @co first, then whatever it woke, in the order they were woken. */
    while (pending) {
        co = pending;
        pending = co->wake_next;
        if (!pending) {
            pending_tail = NULL;
        }
        co->wake_next = NULL;
        co->woken = false;

        if (G_UNLIKELY(co->state != CO_READY)) {
            co_bad_enter(co);
        }
        co->state = CO_RUNNING;
        co->caller = self;
        t->current = co;
        co_switch(self, co, false);
        t->current = self == &t->leader ? NULL : self;

        if (co->wake_head) {
            if (pending_tail) {
                pending_tail->wake_next = co->wake_head;
            } else {
                pending = co->wake_head;
            }
            pending_tail = co->wake_tail;
            co->wake_head = co->wake_tail = NULL;
        }
        if (co->state == CO_DONE) {
            co_release(co);
        }
    }
}

void strata_co_yield(void)
{
    StrataCoroutine *self = co_thread.current;
    StrataCoroutine *caller;

    g_return_if_fail(self != NULL);

    caller = self->caller;
    self->caller = NULL;
    self->state = CO_READY;
    co_switch(self, caller, false);
}

StrataCoroutine *strata_coroutine_self(void)
{
    return co_thread.current;
}

bool strata_in_coroutine(void)
{
    return co_thread.current != NULL;
}

void strata_coroutine_wake(StrataCoroutine *co)
{
    StrataCoroutine *self = co_thread.current;

    g_return_if_fail(co != NULL);

    if (G_UNLIKELY(co->woken)) {
        g_error("strata: coroutine %p woken twice before it ran", co);
    }
    if (!self) {
        strata_coroutine_enter(co);
        return;
    }
    co->woken = true;
    co->wake_next = NULL;
    if (self->wake_tail) {
        self->wake_tail->wake_next = co;
    } else {
        self->wake_head = co;
    }
    self->wake_tail = co;
}

unsigned strata_coroutine_pool_size(void)
{
    return co_thread.pool_size;
}

/* ------------------------------------------------------------------ */
/* CoQueue                                                             */
/* ------------------------------------------------------------------ */

void strata_co_queue_init(StrataCoQueue *queue)
{
    queue->head = NULL;
    queue->tail = NULL;
}

static void co_queue_push(StrataCoQueue *queue, StrataCoroutine *co)
{
    co->queue_next = NULL;
    if (queue->tail) {
        queue->tail->queue_next = co;
    } else {
        queue->head = co;
    }
    queue->tail = co;
}

static StrataCoroutine *co_queue_pop(StrataCoQueue *queue)
{
    StrataCoroutine *co = queue->head;

    if (co) {
        queue->head = co->queue_next;
        if (!queue->head) {
            queue->tail = NULL;
        }
        co->queue_next = NULL;
    }
    return co;
}

void strata_co_queue_wait(StrataCoQueue *queue, StrataCoMutex *mutex)
{
    StrataCoroutine *self = co_thread.current;

    g_return_if_fail(self != NULL);
    g_return_if_fail(queue != NULL);

    co_queue_push(queue, self);
    if (mutex) {
        strata_co_mutex_unlock(mutex);
    }
    strata_co_yield();
    if (mutex) {
        strata_co_mutex_lock(mutex);
    }
}

bool strata_co_queue_next(StrataCoQueue *queue)
{
    StrataCoroutine *co;

    g_return_val_if_fail(queue != NULL, false);

    co = co_queue_pop(queue);
    if (!co) {
        return false;
    }
    strata_coroutine_wake(co);
    return true;
}

void strata_co_queue_restart_all(StrataCoQueue *queue)
{
    g_return_if_fail(queue != NULL);

    while (strata_co_queue_next(queue)) {
    }
}

bool strata_co_queue_empty(const StrataCoQueue *queue)
{
    g_return_val_if_fail(queue != NULL, true);

    return queue->head == NULL;
}

/* ------------------------------------------------------------------ */
/* CoMutex                                                             */
/* ------------------------------------------------------------------ */

void strata_co_mutex_init(StrataCoMutex *mutex)
{
    mutex->holder = NULL;
    strata_co_queue_init(&mutex->waiters);
    mutex->locked = 0;
}

void strata_co_mutex_lock(StrataCoMutex *mutex)
{
    StrataCoroutine *self = co_thread.current;

    g_return_if_fail(self != NULL);
    g_return_if_fail(mutex != NULL);

    if (!mutex->locked) {
        mutex->locked = 1;
        mutex->holder = self;
        return;
    }
    if (G_UNLIKELY(mutex->holder == self)) {
        g_error("strata: coroutine %p locks a CoMutex it already holds",
                self);
    }
    /* The unlocker hands the mutex over (holder = us) before waking us,
     * so nobody can barge in between. */
    co_queue_push(&mutex->waiters, self);
    do {
        strata_co_yield();
    } while (mutex->holder != self);
}

void strata_co_mutex_unlock(StrataCoMutex *mutex)
{
    StrataCoroutine *self = co_thread.current;
    StrataCoroutine *next;

    g_return_if_fail(self != NULL);
    g_return_if_fail(mutex != NULL);
    g_return_if_fail(mutex->locked && mutex->holder == self);

    next = co_queue_pop(&mutex->waiters);
    if (!next) {
        mutex->locked = 0;
        mutex->holder = NULL;
        return;
    }
    mutex->holder = next;
    strata_coroutine_wake(next);
}
