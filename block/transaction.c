/* strata — transactions: every action prepares inside one drained
 * section that grows as actions touch nodes; then all commit, or all
 * abort in reverse order.  Nothing runs between prepare and commit that
 * could let a guest request through, so a multi-disk transaction cuts
 * every disk at the same instant for the guest. */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "snapshot-private.h"

typedef struct Action {
    const StrataTransactionOps *ops;
    void *opaque;
} Action;

struct StrataTransaction {
    StrataContext *ctx;
    StrataDrainSet *drained;
    GArray *actions;    /* Action, in prepare order */
    GPtrArray *sync_paths;  /* files, then their directories */
};

StrataTransaction *strata_transaction_new(StrataContext *ctx)
{
    StrataTransaction *t;

    g_return_val_if_fail(ctx != NULL, NULL);
    t = g_new0(StrataTransaction, 1);
    t->ctx = ctx;
    t->drained = strata_drain_set_new(ctx);
    t->actions = g_array_new(FALSE, FALSE, sizeof(Action));
    t->sync_paths = g_ptr_array_new_with_free_func(g_free);
    return t;
}

StrataContext *strata_transaction_get_context(StrataTransaction *t)
{
    return t->ctx;
}

void strata_transaction_drain(StrataTransaction *t, StrataNode *node)
{
    g_return_if_fail(t != NULL && node != NULL);
    strata_drain_set_add(t->drained, node);
}

void strata_transaction_add(StrataTransaction *t,
                            const StrataTransactionOps *ops, void *opaque)
{
    Action a = { ops, opaque };

    g_return_if_fail(t != NULL && ops != NULL);
    g_array_append_val(t->actions, a);
}

void strata_transaction_sync_file(StrataTransaction *t, const char *path)
{
    g_autofree char *dir = NULL;

    g_return_if_fail(t != NULL && path != NULL);
    g_ptr_array_add(t->sync_paths, g_strdup(path));
    /* The new name must survive a crash as well as the data. */
    dir = g_path_get_dirname(path);
    if (!g_ptr_array_find_with_equal_func(t->sync_paths, dir, g_str_equal,
                                          NULL)) {
        g_ptr_array_add(t->sync_paths, g_steal_pointer(&dir));
    }
}

typedef struct SyncAll SyncAll;

typedef struct {
    SyncAll *all;
    const char *path;
    int ret;
} SyncOne;

struct SyncAll {
    StrataLoop *loop;
    GPtrArray *paths;
    SyncOne *ones;
    guint pending;
    StrataCoQueue done;
};

/* Worker thread. */
static int sync_path(void *opaque)
{
    SyncOne *o = opaque;
    int fd = open(o->path, O_RDONLY | O_CLOEXEC);
    int ret = 0;

    if (fd < 0) {
        return -errno;
    }
    if (fsync(fd) < 0) {
        ret = -errno;
    }
    close(fd);
    return ret;
}

static void sync_one_co(void *opaque)
{
    SyncOne *o = opaque;

    o->ret = strata_loop_co_run_in_thread(o->all->loop, sync_path, o);
    if (--o->all->pending == 0) {
        strata_co_queue_restart_all(&o->all->done);
    }
}

/* The fsyncs run side by side on the worker pool: the file system
 * commits them together, so N new overlays cost about one. */
static void sync_all_co(void *opaque)
{
    SyncAll *a = opaque;

    a->pending = a->paths->len;
    for (guint i = 0; i < a->paths->len; i++) {
        a->ones[i].all = a;
        a->ones[i].path = a->paths->pdata[i];
        strata_coroutine_enter(strata_coroutine_new(sync_one_co,
                                                    &a->ones[i]));
    }
    while (a->pending > 0) {
        strata_co_queue_wait(&a->done, NULL);
    }
}

static bool sync_files(StrataTransaction *t, GError **error)
{
    SyncAll a = { .loop = t->ctx->loop, .paths = t->sync_paths };

    if (!t->sync_paths->len) {
        return true;
    }
    strata_co_queue_init(&a.done);
    a.ones = g_new0(SyncOne, t->sync_paths->len);
    strata_loop_run_co(t->ctx->loop, sync_all_co, &a);
    for (guint i = 0; i < t->sync_paths->len; i++) {
        if (a.ones[i].ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not flush '%s': %s", a.ones[i].path,
                        g_strerror(-a.ones[i].ret));
            g_free(a.ones);
            return false;
        }
    }
    g_free(a.ones);
    return true;
}

bool strata_transaction_finish(StrataTransaction *t, bool commit,
                               GError **error)
{
    if (!t) {
        return commit;
    }
    if (commit && !sync_files(t, error)) {
        commit = false;
    }
    if (commit) {
        for (guint i = 0; i < t->actions->len; i++) {
            Action *a = &g_array_index(t->actions, Action, i);
            if (a->ops->commit) {
                a->ops->commit(a->opaque);
            }
        }
    } else {
        /* Later actions may stand on what earlier ones built (a snapshot
         * of an overlay made by the action before): undo newest first. */
        for (guint i = t->actions->len; i > 0; i--) {
            Action *a = &g_array_index(t->actions, Action, i - 1);
            if (a->ops->abort) {
                a->ops->abort(a->opaque);
            }
        }
    }
    strata_drain_set_free(t->drained);
    /* Cleaning closes nodes an abort dropped and removes their files:
     * only once nothing holds them drained any more. */
    for (guint i = t->actions->len; i > 0; i--) {
        Action *a = &g_array_index(t->actions, Action, i - 1);
        if (a->ops->clean) {
            a->ops->clean(a->opaque);
        }
    }
    g_array_free(t->actions, TRUE);
    g_ptr_array_free(t->sync_paths, TRUE);
    g_free(t);
    return commit;
}
