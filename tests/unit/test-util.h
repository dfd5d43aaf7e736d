/* Helpers shared by the unit tests: Check suites registered by path,
 * scratch directories, files. */
#ifndef STRATA_TEST_UTIL_H
#define STRATA_TEST_UTIL_H

#include <check.h>
#include <fcntl.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <unistd.h>

/* One TCase per test, named by its path ("/io/align/read"), so a
 * failure report names the behaviour that broke. */
static inline void strata_test_add(Suite *s, const char *path,
                                   const TTest *fn,
                                   void (*setup)(void),
                                   void (*teardown)(void))
{
    TCase *tc = tcase_create(path);
    if (setup || teardown) {
        tcase_add_checked_fixture(tc, setup, teardown);
    }
    tcase_set_timeout(tc, 120);
    _tcase_add_test(tc, fn, 0, 0, 0, 1);
    suite_add_tcase(s, tc);
}

static inline int strata_test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* One row of a program's test table. Check's test handles are not
 * constant expressions, so tables live inside main(). */
typedef struct StrataTestCase {
    const char *path;
    const TTest *fn;
    /* Liveness bound in seconds; 0 keeps the usual 120. */
    int timeout;
    /* > 0: run once per _i in [0, loops) (e.g. once per I/O engine). */
    int loops;
    /* Runs without the program's fixture. */
    bool bare;
} StrataTestCase;

/* Builds suite @name from @tests (one TCase each, inside @setup and
 * @teardown when given), runs it and returns the exit status. */
static inline int strata_test_main_n(const char *name,
                                     const StrataTestCase *tests, size_t n,
                                     void (*setup)(void),
                                     void (*teardown)(void))
{
    Suite *s = suite_create(name);
    for (size_t i = 0; i < n; i++) {
        const StrataTestCase *t = &tests[i];
        TCase *tc = tcase_create(t->path);
        if (!t->bare && (setup || teardown)) {
            tcase_add_checked_fixture(tc, setup, teardown);
        }
        tcase_set_timeout(tc, t->timeout ? t->timeout : 120);
        _tcase_add_test(tc, t->fn, 0, 0, 0, t->loops ? t->loops : 1);
        suite_add_tcase(s, tc);
    }
    return strata_test_run(s);
}

#define strata_test_main(name, tests, setup, teardown) \
    strata_test_main_n((name), (tests), G_N_ELEMENTS(tests), (setup), \
                       (teardown))

/* Writes back and drops [@off, @off + @len) of @path (0: to the end)
 * from the page cache. */
static inline void strata_test_drop_cache(const char *path, off_t off,
                                          off_t len)
{
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(fdatasync(fd), 0);
    ck_assert_int_eq(posix_fadvise(fd, off, len, POSIX_FADV_DONTNEED), 0);
    close(fd);
}

/* How many of the pages of [@off, @off + @len) of @path are in the page
 * cache. */
static inline size_t strata_test_resident_pages(const char *path, off_t off,
                                                size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t n = len / (size_t)page, count = 0;
    unsigned char *vec = g_malloc(n);
    int fd = open(path, O_RDONLY);
    void *map;

    ck_assert_int_ge(fd, 0);
    map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
    ck_assert(map != MAP_FAILED);
    ck_assert_int_eq(mincore(map, len, vec), 0);
    for (size_t i = 0; i < n; i++) {
        count += vec[i] & 1;
    }
    munmap(map, len);
    close(fd);
    g_free(vec);
    return count;
}

/* Waits (generously) until [@off, @off + @len) of @path is all cached. */
static inline bool strata_test_wait_resident(const char *path, off_t off,
                                             size_t len)
{
    size_t want = len / (size_t)sysconf(_SC_PAGESIZE);

    for (int i = 0; i < 3000; i++) {
        if (strata_test_resident_pages(path, off, len) == want) {
            return true;
        }
        g_usleep(10000);
    }
    return false;
}

static inline char *strata_test_tmpdir(void)
{
    char *d = g_dir_make_tmp("strata-test-XXXXXX", NULL);
    g_assert(d);
    return d;
}

static inline void strata_test_rmdir(char *dir)
{
    GDir *d = g_dir_open(dir, 0, NULL);
    const char *n;
    while (d && (n = g_dir_read_name(d))) {
        char *p = g_build_filename(dir, n, NULL);
        g_unlink(p);
        g_free(p);
    }
    if (d) {
        g_dir_close(d);
    }
    g_rmdir(dir);
    g_free(dir);
}

/* Creates @name in @dir with @size bytes of pattern (byte i = i*7+1). */
static inline char *strata_test_make_file(const char *dir, const char *name,
                                          size_t size, bool pattern)
{
    char *path = g_build_filename(dir, name, NULL);
    int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0600);
    g_assert(fd >= 0);
    if (pattern) {
        unsigned char *buf = g_malloc(size);
        for (size_t i = 0; i < size; i++) {
            buf[i] = (unsigned char)(i * 7 + 1);
        }
        g_assert(pwrite(fd, buf, size, 0) == (ssize_t)size);
        g_free(buf);
    } else {
        g_assert(ftruncate(fd, size) == 0);
    }
    close(fd);
    return path;
}


#ifdef STRATA_TEST_CONTEXT
#include "strata-block.h"

/* The fixture of the block-layer tests, opted into by defining
 * STRATA_TEST_CONTEXT before this header: a fresh context @ctx and
 * scratch directory @dir per test. A test may free @ctx itself and set
 * it to NULL. */
static StrataContext *ctx;
static char *dir;

static void strata_test_context_setup(void)
{
    g_autoptr(GError) err = NULL;

    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    dir = strata_test_tmpdir();
}

static void strata_test_context_teardown(void)
{
    if (ctx) {
        strata_context_free(ctx);
        ctx = NULL;
    }
    strata_test_rmdir(dir);
    dir = NULL;
}
#endif


#ifdef STRATA_TEST_TRACE
#include <stdarg.h>

/* Opted into by defining STRATA_TEST_TRACE: a log of events as one
 * string @trace, so an ordering is checked in one assert. */
static GString *trace;

static void trace_add(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void trace_add(const char *fmt, ...)
{
    va_list ap;

    if (trace->len) {
        g_string_append_c(trace, ' ');
    }
    va_start(ap, fmt);
    g_string_append_vprintf(trace, fmt, ap);
    va_end(ap);
}

static void strata_test_trace_setup(void)
{
    trace = g_string_new(NULL);
}

static void strata_test_trace_teardown(void)
{
    g_string_free(trace, TRUE);
    trace = NULL;
}
#endif

#endif
