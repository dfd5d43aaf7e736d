/* strata — QMP handlers for snapshots: external (sync and libvirt's
 * two-step), internal, transaction, change-backing-file and revert.
 * The work is in block/snapshot.c and block/transaction.c; these turn
 * schema-checked arguments into calls. */
#include <string.h>

#include "strata-util.h"
#include "qmp-private.h"
#include "../block/snapshot-private.h"

static const char *opt_str(JsonObject *o, const char *name)
{
    return json_object_get_string_member_with_default(o, name, NULL);
}

static void sync_args(JsonObject *o, StrataSnapshotSyncArgs *a)
{
    const char *mode = opt_str(o, "mode");

    a->device = opt_str(o, "device");
    a->node_name = opt_str(o, "node-name");
    a->snapshot_file = opt_str(o, "snapshot-file");
    a->snapshot_node_name = opt_str(o, "snapshot-node-name");
    a->format = opt_str(o, "format");
    a->mode = mode && !strcmp(mode, "existing")
        ? STRATA_SNAPSHOT_MODE_EXISTING
        : STRATA_SNAPSHOT_MODE_ABSOLUTE_PATHS;
}

/* A single command is a transaction of one action. */
typedef bool (*PrepareFn)(StrataTransaction *t, JsonObject *args,
                          GError **error);

static bool prepare_sync(StrataTransaction *t, JsonObject *args,
                         GError **error)
{
    StrataSnapshotSyncArgs a;

    sync_args(args, &a);
    return strata_snapshot_sync_prepare(t, &a, error);
}

static bool prepare_snapshot(StrataTransaction *t, JsonObject *args,
                             GError **error)
{
    return strata_snapshot_prepare(t, opt_str(args, "node"),
                                   opt_str(args, "overlay"), error);
}

static bool prepare_internal(StrataTransaction *t, JsonObject *args,
                             GError **error)
{
    return strata_snapshot_internal_prepare(t, opt_str(args, "device"),
                                            opt_str(args, "name"), error);
}

static bool run_one(StrataMonitor *mon, PrepareFn fn, JsonObject *args,
                    GError **error)
{
    StrataTransaction *t =
        strata_transaction_new(strata_monitor_get_context(mon));
    bool ok = fn(t, args, error);

    return strata_transaction_finish(t, ok, error);
}

bool strata_qmp_blockdev_snapshot_sync(StrataMonitor *mon, JsonObject *args,
                                       JsonNode **ret, GError **error)
{
    return run_one(mon, prepare_sync, args, error);
}

bool strata_qmp_blockdev_snapshot(StrataMonitor *mon, JsonObject *args,
                                  JsonNode **ret, GError **error)
{
    return run_one(mon, prepare_snapshot, args, error);
}

bool strata_qmp_blockdev_snapshot_internal_sync(StrataMonitor *mon,
                                                JsonObject *args,
                                                JsonNode **ret,
                                                GError **error)
{
    return run_one(mon, prepare_internal, args, error);
}

bool strata_qmp_blockdev_snapshot_delete_internal_sync(StrataMonitor *mon,
                                                       JsonObject *args,
                                                       JsonNode **ret,
                                                       GError **error)
{
    JsonObject *info = strata_snapshot_delete_internal(
        strata_monitor_get_context(mon), opt_str(args, "device"),
        opt_str(args, "id"), opt_str(args, "name"), error);

    if (!info) {
        return false;
    }
    *ret = json_node_init_object(json_node_alloc(), info);
    json_object_unref(info);
    return true;
}

bool strata_qmp_change_backing_file(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error)
{
    return strata_snapshot_change_backing_file(
        strata_monitor_get_context(mon), opt_str(args, "device"),
        opt_str(args, "image-node-name"), opt_str(args, "backing-file"),
        error);
}

bool strata_qmp_x_blockdev_revert(StrataMonitor *mon, JsonObject *args,
                                  JsonNode **ret, GError **error)
{
    return strata_snapshot_revert(
        strata_monitor_get_context(mon), opt_str(args, "node"),
        opt_str(args, "overlay-file"), opt_str(args, "overlay-node-name"),
        json_object_get_boolean_member_with_default(args, "delete-discarded",
                                                    FALSE),
        error);
}

static const struct {
    const char *type;
    PrepareFn prepare;
} action_table[] = {
    { "blockdev-snapshot-sync", prepare_sync },
    { "blockdev-snapshot", prepare_snapshot },
    { "blockdev-snapshot-internal-sync", prepare_internal },
};

bool strata_qmp_transaction(StrataMonitor *mon, JsonObject *args,
                            JsonNode **ret, GError **error)
{
    JsonArray *actions = json_object_get_array_member(args, "actions");
    JsonObject *props = json_object_has_member(args, "properties")
        ? json_object_get_object_member(args, "properties") : NULL;
    const char *mode = props ? opt_str(props, "completion-mode") : NULL;
    bool grouped = mode && !strcmp(mode, "grouped");
    StrataTransaction *t =
        strata_transaction_new(strata_monitor_get_context(mon));
    bool ok = true;

    for (guint i = 0; ok && i < json_array_get_length(actions); i++) {
        JsonObject *a = json_array_get_object_element(actions, i);
        const char *type = opt_str(a, "type");
        JsonObject *data = json_object_get_object_member(a, "data");
        PrepareFn fn = NULL;

        if (!strcmp(type, "abort")) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                        "Transaction aborted using Abort action");
            ok = false;
            break;
        }
        /* Only actions that start jobs can complete as a group. */
        if (grouped) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Action '%s' does not support Transaction property "
                        "completion-mode = grouped", type);
            ok = false;
            break;
        }
        for (guint j = 0; j < G_N_ELEMENTS(action_table); j++) {
            if (!strcmp(action_table[j].type, type)) {
                fn = action_table[j].prepare;
            }
        }
        if (!fn) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Action '%s' is not supported", type);
            ok = false;
            break;
        }
        ok = fn(t, data, error);
    }
    return strata_transaction_finish(t, ok, error);
}

bool strata_qmp_snapshot_save(StrataMonitor *mon, JsonObject *args,
                              JsonNode **ret, GError **error)
{
    return strata_snapshot_save_start(strata_monitor_get_context(mon), args,
                                      error);
}

bool strata_qmp_snapshot_load(StrataMonitor *mon, JsonObject *args,
                              JsonNode **ret, GError **error)
{
    return strata_snapshot_load_start(strata_monitor_get_context(mon), args,
                                      error);
}

bool strata_qmp_snapshot_delete(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    return strata_snapshot_delete_start(strata_monitor_get_context(mon),
                                        args, error);
}
