/* strata — StrataContext: owns the loop, the node names, the nodes added
 * by the user, and (later) jobs and exports.  Two contexts in one
 * process share nothing. */
#include <string.h>

#include "block-private.h"
#include "job-private.h"
#include "export-private.h"
#include "../util/keyval-private.h"

StrataContext *strata_context_new(GMainContext *main_context,
                                  const char *aio, GError **error)
{
    StrataAioMode mode;
    StrataContext *ctx;
    StrataLoop *loop;

    if (!aio || !strcmp(aio, "auto")) {
        mode = STRATA_AIO_AUTO;
    } else if (!strcmp(aio, "io_uring")) {
        mode = STRATA_AIO_IO_URING;
    } else if (!strcmp(aio, "threads")) {
        mode = STRATA_AIO_THREADS;
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid aio mode '%s' (expected auto, io_uring or "
                    "threads)", aio);
        return NULL;
    }
    loop = strata_loop_new(main_context, mode, error);
    if (!loop) {
        return NULL;
    }
    ctx = g_new0(StrataContext, 1);
    ctx->loop = loop;
    ctx->nodes_by_name = g_hash_table_new(g_str_hash, g_str_equal);
    return ctx;
}

void strata_context_set_default_aio(StrataContext *ctx, const char *aio)
{
    g_free(ctx->default_aio);
    ctx->default_aio = g_strdup(aio);
}

void strata_context_free(StrataContext *ctx)
{
    if (!ctx) {
        return;
    }
    /* Jobs hold nodes and may be in the middle of a request. */
    strata_job_cancel_all_sync(ctx);
    /* Exports go first: their clients hold backends on the nodes. */
    strata_exports_shutdown(ctx);
    /* Backends the embedder still holds lose their medium; their
     * handles stay valid until unref. */
    for (GList *l = ctx->backends; l; l = l->next) {
        StrataBackend *blk = l->data;
        if (strata_backend_get_node(blk)) {
            strata_backend_drain(blk);
        }
        strata_backend_eject(blk);
    }
    while (ctx->monitor_nodes) {
        StrataNode *node = ctx->monitor_nodes->data;
        ctx->monitor_nodes = g_list_delete_link(ctx->monitor_nodes,
                                                ctx->monitor_nodes);
        node->monitor_owned = false;
        strata_node_unref(node);
    }
    if (ctx->all_nodes) {
        g_warning("strata context freed while %u node(s) are still "
                  "referenced", g_list_length(ctx->all_nodes));
    }
    /* Drop the backends' bookkeeping; the handles free themselves. */
    while (ctx->backends) {
        ctx->backends = g_list_delete_link(ctx->backends, ctx->backends);
    }
    g_hash_table_destroy(ctx->nodes_by_name);
    g_free(ctx->default_aio);
    strata_loop_free(ctx->loop);
    g_free(ctx);
}

const char *strata_context_aio_engine(StrataContext *ctx)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    return strata_loop_engine_name(ctx->loop);
}

StrataNode *strata_context_add_node(StrataContext *ctx, JsonObject *options,
                                    GError **error)
{
    StrataNode *node;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(options != NULL, NULL);

    node = strata_node_open(ctx, options, false, true, error);
    if (node) {
        /* The context's reference is the one that stays. */
        strata_node_unref(node);
    }
    return node;
}

StrataNode *strata_context_add_node_keyval(StrataContext *ctx,
                                           const char *spec, GError **error)
{
    g_autoptr(JsonObject) obj = NULL;
    StrataNode *node;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(spec != NULL, NULL);

    obj = strata_keyval_parse(spec, NULL, error);
    if (!obj) {
        return NULL;
    }
    node = strata_node_open(ctx, obj, !strata_keyval_is_json(spec), true,
                            error);
    if (node) {
        strata_node_unref(node);
    }
    return node;
}

bool strata_context_del_node(StrataContext *ctx, const char *node_name,
                             GError **error)
{
    StrataNode *node;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(node_name != NULL, false);

    node = strata_context_lookup(ctx, node_name);
    if (!node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Failed to find node with node-name='%s'", node_name);
        return false;
    }
    if (!strata_job_busy_check(ctx, node, error)) {
        return false;
    }
    if (!node->monitor_owned) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Node %s is not owned by the monitor", node_name);
        return false;
    }
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *p = l->data;
        if (p->parent_kind == STRATA_PARENT_NODE &&
            p->role == STRATA_CHILD_BACKING) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "Node '%s' is busy: node is used as backing hd of "
                        "'%s'", node_name,
                        ((StrataNode *)p->parent)->node_name);
            return false;
        }
    }
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *p = l->data;
        if (p->parent_kind == STRATA_PARENT_NODE) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "Block device %s is in use", node_name);
            return false;
        }
    }
    if (node->parents) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "Node %s is in use", node_name);
        return false;
    }
    ctx->monitor_nodes = g_list_remove(ctx->monitor_nodes, node);
    node->monitor_owned = false;
    strata_node_unref(node);
    return true;
}

StrataNode *strata_context_find_node(StrataContext *ctx,
                                     const char *node_name)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    return strata_context_lookup(ctx, node_name);
}
