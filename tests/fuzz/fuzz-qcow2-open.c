/* libFuzzer target: arbitrary bytes as a qcow2 image.
 *
 * The input becomes a memfd, opened read-only as qcow2 with no backing
 * file.  A hostile image must be refused with an error or served
 * without crashing, hanging, leaking or touching memory it does not
 * own: a few ranges are read (start, middle, end of the disk), block
 * status is asked over them, the snapshot list is built and the image is
 * checked without repair.  The sanitizers judge the rest.
 *
 * Seed corpus: tests/fuzz/corpus-qcow2/ (tiny images from qemu-img).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <glib.h>

#include "block-private.h"
#include "qcow2/qcow2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static StrataContext *ctx;

/* A request on one node, run in a coroutine. */
typedef struct {
    StrataNode *node;
    uint64_t disk_len;
    StrataQcow2CheckResult res;
} Work;

static void exercise_co(void *opaque)
{
    Work *w = opaque;
    uint8_t buf[8192];
    uint64_t len = w->disk_len;
    uint64_t starts[3] = { 0, len / 2, len > sizeof(buf) ? len - sizeof(buf)
                                                          : 0 };
    GError *err = NULL;
    GPtrArray *snaps;

    for (int i = 0; i < 3; i++) {
        uint64_t off = starts[i] & ~511ull;
        uint64_t n = MIN(sizeof(buf), len - MIN(off, len));
        uint64_t pnum = 0, map = 0;
        StrataNode *file = NULL;

        if (n == 0) {
            continue;
        }
        strata_node_co_pread(w->node, off, n, buf, 0);
        strata_node_co_block_status(w->node, true, off, n, &pnum, &map,
                                    &file);
    }
    snaps = strata_qcow2_snapshot_list(w->node, &err);
    if (snaps) {
        g_ptr_array_unref(snaps);
    }
    g_clear_error(&err);
    if (!strata_qcow2_co_check(w->node, STRATA_QCOW2_CHECK_NO_FIX, &w->res,
                               &err)) {
        g_clear_error(&err);
    }
}

static void quiet_print(const gchar *text)
{
    (void)text;
}

static void quiet(const gchar *domain, GLogLevelFlags level,
                  const gchar *message, gpointer user_data)
{
    (void)domain;
    (void)level;
    (void)message;
    (void)user_data;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    GError *err = NULL;

    (void)argc;
    (void)argv;
    /* Hostile images make the driver warn and check report; thousands
     * of runs a second must not drown the fuzzer's own output. */
    g_log_set_default_handler(quiet, NULL);
    g_set_printerr_handler(quiet_print);
    g_log_set_handler("strata", G_LOG_LEVEL_MASK | G_LOG_FLAG_FATAL |
                      G_LOG_FLAG_RECURSION, quiet, NULL);
    ctx = strata_context_new(NULL, NULL, &err);
    if (!ctx) {
        __builtin_trap();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    GError *err = NULL;
    char *spec;
    StrataNode *node;
    int fd;
    Work w = { 0 };

    fd = memfd_create("fuzz-qcow2", MFD_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    spec = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"read-only\": true, \"backing\": null, "
        "\"file\": {\"driver\": \"file\", \"read-only\": true, "
        "\"filename\": \"/proc/self/fd/%d\"}}", fd);
    node = strata_context_add_node_keyval(ctx, spec, &err);
    g_free(spec);
    if (!node) {
        if (!err || !g_utf8_validate(err->message, -1, NULL)) {
            __builtin_trap();   /* a refusal says why */
        }
        g_clear_error(&err);
        close(fd);
        return 0;
    }
    w.node = node;
    w.disk_len = (uint64_t)MAX(strata_node_get_length(node), 0);
    strata_loop_run_co(ctx->loop, exercise_co, &w);
    if (!strata_context_del_node(ctx, strata_node_get_name(node), &err)) {
        __builtin_trap();
    }
    close(fd);
    return 0;
}
