/* strata — QMP handlers for the NBD server and block exports; the work
 * is done by block/export-nbd.c. */
#include <string.h>

#include "strata-util.h"
#include "qmp-private.h"
#include "../block/block-private.h"
#include "../block/export-private.h"

bool strata_qmp_nbd_server_start(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);

    if (json_object_has_member(args, "tls-creds") ||
        json_object_has_member(args, "tls-authz")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "TLS is not supported by this NBD server");
        return false;
    }
    return strata_nbd_server_start_legacy(
        ctx, json_object_get_object_member(args, "addr"),
        json_object_get_int_member_with_default(args, "max-connections", 0),
        error);
}

bool strata_qmp_nbd_server_stop(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    return strata_nbd_server_stop(strata_monitor_get_context(mon), error);
}

bool strata_qmp_block_export_add(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    return strata_export_add(strata_monitor_get_context(mon), args,
                             error) != NULL;
}

bool strata_qmp_block_export_del(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    const char *mode = json_object_get_string_member_with_default(
        args, "mode", "safe");

    return strata_export_del(strata_monitor_get_context(mon),
                             json_object_get_string_member(args, "id"),
                             !strcmp(mode, "hard"), error);
}

bool strata_qmp_query_block_exports(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error)
{
    JsonArray *arr = strata_export_query(strata_monitor_get_context(mon));
    JsonNode *n = json_node_alloc();

    json_node_init_array(n, arr);
    json_array_unref(arr);
    *ret = n;
    return true;
}

static void export_event(StrataContext *ctx, const char *name,
                         JsonObject *data, void *opaque)
{
    strata_monitor_emit_event(opaque, name, data);
}

void strata_qmp_export_events_connect(StrataMonitor *mon)
{
    strata_export_set_event_cb(strata_monitor_get_context(mon), export_event,
                               mon);
}

void strata_qmp_export_events_disconnect(StrataMonitor *mon)
{
    StrataContext *ctx = strata_monitor_get_context(mon);

    if (ctx && ctx->export_event_opaque == mon) {
        strata_export_set_event_cb(ctx, NULL, NULL);
    }
}
