/* strata — transactions: every action prepares inside one drained
 * section that grows as actions touch nodes; then all commit, or all
 * abort in reverse order.  Nothing runs between prepare and commit that
 * could let a guest request through, so a multi-disk transaction cuts
 * every disk at the same instant for the guest. */
#include "snapshot-private.h"

typedef struct Action {
    const StrataTransactionOps *ops;
    void *opaque;
} Action;

struct StrataTransaction {
    StrataContext *ctx;
    StrataDrainSet *drained;
    GArray *actions;    /* Action, in prepare order */
};

StrataTransaction *strata_transaction_new(StrataContext *ctx)
{
    StrataTransaction *t;

    g_return_val_if_fail(ctx != NULL, NULL);
    t = g_new0(StrataTransaction, 1);
    t->ctx = ctx;
    t->drained = strata_drain_set_new(ctx);
    t->actions = g_array_new(FALSE, FALSE, sizeof(Action));
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

void strata_transaction_finish(StrataTransaction *t, bool commit)
{
    if (!t) {
        return;
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
    g_free(t);
}
