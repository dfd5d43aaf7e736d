/* strata — snapshots: external overlays put on top of a node live,
 * qcow2 internal snapshots of a live node, backing string rewrites and
 * revert to an image of the chain.  Each external or internal snapshot
 * is an action of a transaction (transaction.c); a single command is a
 * transaction of one action.  Arguments are checked, and errors worded,
 * in the order QEMU 7.2 checks them. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib/gstdio.h>

#include "snapshot-private.h"
#include "driver.h"
#include "drivers-private.h"
#include "qcow2/qcow2.h"
#include "qcow2/qcow2-private.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static void not_found(GError **error, const char *device, const char *node)
{
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                "Cannot find device='%s' nor node-name='%s'",
                device ? device : "", node ? node : "");
}

/* The node above @node whose backing it is, if any. */
static StrataNode *backing_parent(StrataNode *node)
{
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE &&
            c->role == STRATA_CHILD_BACKING) {
            return c->parent;
        }
    }
    return NULL;
}

static bool check_not_backing(StrataNode *node, GError **error)
{
    StrataNode *above = backing_parent(node);

    if (above) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "Node '%s' is busy: node is used as backing hd of '%s'",
                    node->node_name, above->node_name);
        return false;
    }
    return true;
}

static bool driver_supports_backing(const StrataDriver *drv)
{
    for (const StrataOptDesc *d = drv->options; d && d->name; d++) {
        if (!strcmp(d->name, "backing")) {
            return true;
        }
    }
    return false;
}

/* The image file under a format node, never a json: pseudo-name. */
static const char *image_filename(StrataNode *node)
{
    const char *name = strata_node_image_filename(node);
    return name ? name : "";
}

typedef struct {
    StrataNode *node;
    int ret;
} FlushCo;

static void flush_co(void *opaque)
{
    FlushCo *f = opaque;
    f->ret = strata_node_co_flush(f->node);
}

static bool flush_node(StrataNode *node, GError **error)
{
    FlushCo f = { node, 0 };

    if (node->read_only) {
        return true;
    }
    strata_loop_run_co(node->ctx->loop, flush_co, &f);
    if (f.ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "An IO error has occurred: %s", g_strerror(-f.ret));
        return false;
    }
    return true;
}

/* Switches a node and the image file defined with it between read-only
 * and read-write, as QEMU's reopen of a snapshot's old layer does.  The
 * file descriptor stays as it was opened: going read-write again works
 * for nodes that were opened read-write.  Callers flush first. */
static bool set_read_only(StrataNode *node, bool ro, GError **error)
{
    /* A reopen: the file is reopened and its locks move with it. */
    return strata_node_set_read_only(node, ro, error);
}

/* Monitor ownership keeps a node that no parent holds. */
static void monitor_own(StrataNode *node)
{
    if (!node->monitor_owned) {
        node->monitor_owned = true;
        strata_node_ref(node);
        node->ctx->monitor_nodes = g_list_prepend(node->ctx->monitor_nodes,
                                                  node);
    }
}

static void monitor_disown(StrataNode *node)
{
    if (node->monitor_owned) {
        node->monitor_owned = false;
        node->ctx->monitor_nodes = g_list_remove(node->ctx->monitor_nodes,
                                                 node);
        strata_node_unref(node);
    }
}

/* Creates @file as a qcow2 overlay of @base (its size, backing string
 * and format). */
static bool create_overlay_file(StrataNode *base, const char *file,
                                const char *format, bool sync,
                                GError **error)
{
    g_autoptr(JsonObject) opts = json_object_new();
    g_autofree char *backing = NULL;
    StrataNode *data = strata_node_skip_filters(base);
    struct stat st;

    if (!strata_driver_find(format)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Unknown file format '%s'", format);
        return false;
    }
    if (strcmp(format, "qcow2") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Backing file not supported for file format '%s'",
                    format);
        return false;
    }
    /* QEMU would truncate an existing file; an image that a failed
     * transaction cannot give back is not overwritten here. */
    if (lstat(file, &st) == 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Could not create '%s': File exists (use mode "
                    "'existing' to open it)", file);
        return false;
    }
    backing = strata_backing_string(base, file);
    json_object_set_int_member(opts, "size", MAX(base->total_bytes, 0));
    json_object_set_string_member(opts, "backing_file", backing);
    json_object_set_string_member(opts, "backing_fmt", data->drv->name);
    /* A transaction makes all its overlays stable at once, before it
     * commits. */
    return sync ? strata_qcow2_create(base->ctx, file, opts, error)
                : strata_qcow2_create_unsynced(base->ctx, file, opts, error);
}

/* Opens @file with driver @format and no backing. */
static StrataNode *open_overlay(StrataContext *ctx, const char *file,
                               const char *format, const char *node_name,
                               GError **error)
{
    g_autoptr(JsonObject) opts = json_object_new();
    JsonObject *fo = json_object_new();
    const StrataDriver *drv = strata_driver_find(format);

    json_object_set_string_member(opts, "driver", format);
    if (node_name) {
        json_object_set_string_member(opts, "node-name", node_name);
    }
    json_object_set_string_member(fo, "driver", "file");
    json_object_set_string_member(fo, "filename", file);
    json_object_set_object_member(opts, "file", fo);
    if (drv && driver_supports_backing(drv)) {
        json_object_set_null_member(opts, "backing");
    }
    return strata_node_open(ctx, opts, false, false, error);
}

/* ------------------------------------------------------------------ */
/* External snapshots (blockdev-snapshot-sync, blockdev-snapshot)      */
/* ------------------------------------------------------------------ */

typedef struct ExternalSnap {
    StrataNode *base;       /* a reference */
    StrataNode *overlay;    /* a reference */
    char *created_file;     /* made by this action: removed on abort */
    bool appended;
    bool lone;              /* the base had no parent */
    bool aborted;
} ExternalSnap;

static void external_commit(void *opaque)
{
    ExternalSnap *s = opaque;
    g_autoptr(GError) err = NULL;

    /* As QEMU, a base that cannot go read-only stays as it is: the
     * snapshot itself has been taken. */
    if (!set_read_only(s->base, true, &err)) {
        g_warning("snapshot: node '%s' stays read-write: %s",
                  s->base->node_name, err->message);
    }
    /* QSD drops an overlay nothing holds; it is kept here, owned by the
     * monitor (blockdev-del removes it). */
    if (s->lone) {
        monitor_own(s->overlay);
    }
}

static void external_abort(void *opaque)
{
    ExternalSnap *s = opaque;

    s->aborted = true;
    if (s->appended) {
        g_autoptr(GError) err = NULL;
        if (!strata_node_remove_overlay(s->overlay, &err)) {
            g_warning("snapshot: cannot undo overlay '%s': %s",
                      s->overlay->node_name, err->message);
        }
        s->appended = false;
    }
}

static void external_clean(void *opaque)
{
    ExternalSnap *s = opaque;

    strata_node_unref(s->overlay);
    if (s->aborted && s->created_file) {
        g_unlink(s->created_file);
    }
    strata_node_unref(s->base);
    g_free(s->created_file);
    g_free(s);
}

static const StrataTransactionOps external_ops = {
    .commit = external_commit,
    .abort = external_abort,
    .clean = external_clean,
};

/* Common part once the overlay node exists. */
static bool external_append(StrataTransaction *t, ExternalSnap *s,
                            GError **error)
{
    StrataNode *ov = s->overlay;

    for (GList *l = ov->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind != STRATA_PARENT_NODE) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "The overlay is already in use");
            return false;
        }
    }
    if (!check_not_backing(ov, error)) {
        return false;
    }
    if (ov->backing) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "The overlay already has a backing image");
        return false;
    }
    if (!driver_supports_backing(ov->drv)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "The overlay does not support backing images");
        return false;
    }
    s->lone = s->base->parents == NULL;
    /* The overlay joins the transaction's drained section before it
     * takes over the base's parents, so no guest request reaches it
     * until every action is done. */
    strata_transaction_drain(t, ov);
    if (!strata_node_append_overlay(s->base, ov, error)) {
        return false;
    }
    s->appended = true;
    return true;
}

static ExternalSnap *external_begin(StrataTransaction *t, StrataNode *base)
{
    ExternalSnap *s = g_new0(ExternalSnap, 1);

    strata_node_ref(base);
    s->base = base;
    /* Recorded now, so that a failure further on is undone like any
     * other prepared action. */
    strata_transaction_add(t, &external_ops, s);
    strata_transaction_drain(t, base);
    return s;
}

bool strata_snapshot_sync_prepare(StrataTransaction *t,
                                  const StrataSnapshotSyncArgs *a,
                                  GError **error)
{
    StrataContext *ctx = strata_transaction_get_context(t);
    const char *format = a->format ? a->format : "qcow2";
    StrataNode *base;
    ExternalSnap *s;

    g_return_val_if_fail(a->snapshot_file != NULL, false);
    /* A daemon has no backend names: only node-name can match. */
    base = a->node_name ? strata_context_lookup(ctx, a->node_name) : NULL;
    if (!base) {
        not_found(error, a->device, a->node_name);
        return false;
    }
    s = external_begin(t, base);
    if (!check_not_backing(base, error) || !flush_node(base, error)) {
        return false;
    }
    if (a->node_name && !a->snapshot_node_name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "New overlay node-name missing");
        return false;
    }
    if (a->snapshot_node_name &&
        strata_context_lookup(ctx, a->snapshot_node_name)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "New overlay node-name already in use");
        return false;
    }
    if (a->mode == STRATA_SNAPSHOT_MODE_ABSOLUTE_PATHS) {
        if (!create_overlay_file(base, a->snapshot_file, format, false,
                                 error)) {
            return false;
        }
        s->created_file = g_strdup(a->snapshot_file);
        strata_transaction_sync_file(t, a->snapshot_file);
    }
    s->overlay = open_overlay(ctx, a->snapshot_file, format,
                              a->snapshot_node_name, error);
    if (!s->overlay) {
        return false;
    }
    return external_append(t, s, error);
}

bool strata_snapshot_prepare(StrataTransaction *t, const char *node,
                             const char *overlay, GError **error)
{
    StrataContext *ctx = strata_transaction_get_context(t);
    StrataNode *base = strata_context_lookup(ctx, node);
    StrataNode *ov;
    ExternalSnap *s;

    if (!base) {
        not_found(error, node, node);
        return false;
    }
    s = external_begin(t, base);
    if (!check_not_backing(base, error) || !flush_node(base, error)) {
        return false;
    }
    ov = strata_context_lookup(ctx, overlay);
    if (!ov) {
        not_found(error, overlay, overlay);
        return false;
    }
    strata_node_ref(ov);
    s->overlay = ov;
    return external_append(t, s, error);
}

/* ------------------------------------------------------------------ */
/* Internal snapshots                                                  */
/* ------------------------------------------------------------------ */

StrataNode *strata_snapshot_holder(StrataNode *node)
{
    while (node && node->drv != &strata_driver_qcow2) {
        node = node->file ? node->file->node : NULL;
    }
    return node;
}

typedef struct {
    StrataNode *node;
    StrataQcow2SnapshotInfo info;
    const char *id_or_name;
    bool ok;
    GError *error;
} SnapCo;

static void create_co(void *opaque)
{
    SnapCo *c = opaque;
    c->ok = strata_qcow2_co_snapshot_create_full(c->node, &c->info,
                                                 &c->error);
}

static void delete_co(void *opaque)
{
    SnapCo *c = opaque;
    c->ok = strata_qcow2_co_snapshot_delete(c->node, c->id_or_name,
                                            &c->error);
}

/* Finds a snapshot as QEMU's find_by_id_and_name: both given, both must
 * match; else the one given.  (transfer full) (nullable) */
static StrataQcow2SnapshotInfo *find_snapshot(StrataNode *holder,
                                              const char *id,
                                              const char *name,
                                              GError **error)
{
    g_autoptr(GPtrArray) list = strata_qcow2_snapshot_list(holder, error);

    if (!list) {
        return NULL;
    }
    for (guint i = 0; i < list->len; i++) {
        StrataQcow2SnapshotInfo *sn = list->pdata[i];
        if ((!id || !strcmp(sn->id, id)) &&
            (!name || !strcmp(sn->name, name))) {
            return g_ptr_array_steal_index(list, i);
        }
    }
    return NULL;
}

static bool delete_snapshot(StrataNode *holder, const char *id,
                            GError **error)
{
    SnapCo c = { .node = holder, .id_or_name = id };

    strata_loop_run_co(holder->ctx->loop, delete_co, &c);
    if (!c.ok) {
        g_propagate_error(error, c.error);
    }
    return c.ok;
}

typedef struct InternalSnap {
    StrataNode *holder;     /* a reference */
    char *created_id;
} InternalSnap;

static void internal_abort(void *opaque)
{
    InternalSnap *s = opaque;
    g_autoptr(GError) err = NULL;

    if (s->created_id && !delete_snapshot(s->holder, s->created_id, &err)) {
        g_warning("snapshot: cannot remove snapshot '%s' of '%s': %s",
                  s->created_id, s->holder->node_name, err->message);
    }
}

static void internal_clean(void *opaque)
{
    InternalSnap *s = opaque;

    strata_node_unref(s->holder);
    g_free(s->created_id);
    g_free(s);
}

static const StrataTransactionOps internal_ops = {
    .abort = internal_abort,
    .clean = internal_clean,
};

bool strata_snapshot_internal_prepare(StrataTransaction *t,
                                      const char *device, const char *name,
                                      GError **error)
{
    StrataContext *ctx = strata_transaction_get_context(t);
    StrataNode *node = strata_context_lookup(ctx, device);
    StrataNode *holder;
    InternalSnap *s;
    gint64 now;
    SnapCo c = { 0 };

    if (!node) {
        not_found(error, device, device);
        return false;
    }
    for (GList *l = node->parents; l; l = l->next) {
        if (((StrataChild *)l->data)->parent_kind == STRATA_PARENT_NODE) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Need a root block node");
            return false;
        }
    }
    strata_transaction_drain(t, node);
    if (node->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Device '%s' is read only", device);
        return false;
    }
    holder = strata_snapshot_holder(node);
    if (!holder || holder->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Block format '%s' used by device '%s' does not support "
                    "internal snapshots", node->drv->name, device);
        return false;
    }
    if (!*name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Name is empty");
        return false;
    }
    {
        g_autoptr(StrataQcow2SnapshotInfo) old =
            find_snapshot(holder, NULL, name, error);
        if (old) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                        "Snapshot with name '%s' already exists on device "
                        "'%s'", name, device);
            return false;
        }
    }
    s = g_new0(InternalSnap, 1);
    strata_node_ref(holder);
    s->holder = holder;
    strata_transaction_add(t, &internal_ops, s);

    now = g_get_real_time();
    c.node = holder;
    c.info.name = (char *)name;
    c.info.date_sec = (uint32_t)(now / G_USEC_PER_SEC);
    c.info.date_nsec = (uint32_t)(now % G_USEC_PER_SEC) * 1000;
    /* A daemon has no guest clock, and QEMU records no instruction
     * count outside record/replay. */
    c.info.vm_clock_nsec = 0;
    c.info.icount = UINT64_MAX;
    strata_loop_run_co(ctx->loop, create_co, &c);
    if (!c.ok) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to create snapshot '%s' on device '%s': %s",
                    name, device, c.error ? c.error->message : "?");
        g_clear_error(&c.error);
        return false;
    }
    /* IDs only grow: the new snapshot is the one with this name and the
     * largest ID, which is the last such in the table. */
    {
        g_autoptr(GPtrArray) list = strata_qcow2_snapshot_list(holder, NULL);
        for (guint i = 0; list && i < list->len; i++) {
            StrataQcow2SnapshotInfo *sn = list->pdata[i];
            if (!strcmp(sn->name, name)) {
                g_free(s->created_id);
                s->created_id = g_strdup(sn->id);
            }
        }
    }
    return true;
}

JsonObject *strata_snapshot_delete_internal(StrataContext *ctx,
                                            const char *device,
                                            const char *id, const char *name,
                                            GError **error)
{
    StrataNode *node = strata_context_lookup(ctx, device);
    g_autoptr(StrataQcow2SnapshotInfo) sn = NULL;
    StrataDrainSet *drained;
    StrataNode *holder;
    JsonObject *info = NULL;
    GError *err = NULL;

    if (!node) {
        not_found(error, device, device);
        return NULL;
    }
    if (!id && !name) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Name or id must be provided");
        return NULL;
    }
    holder = strata_snapshot_holder(node);
    if (!holder) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Failed to get a snapshot list: %s",
                    g_strerror(ENOTSUP));
        return NULL;
    }
    drained = strata_drain_set_new(ctx);
    strata_drain_set_add(drained, node);
    sn = find_snapshot(holder, id, name, &err);
    if (err) {
        g_propagate_error(error, err);
        goto out;
    }
    if (!sn) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Snapshot with id '%s' and name '%s' does not exist on "
                    "device '%s'", id ? id : "null", name ? name : "null",
                    device);
        goto out;
    }
    if (!delete_snapshot(holder, sn->id, error)) {
        goto out;
    }
    /* SnapshotInfo, in QEMU's member order. */
    info = json_object_new();
    json_object_set_string_member(info, "id", sn->id);
    json_object_set_string_member(info, "name", sn->name);
    json_object_set_int_member(info, "vm-state-size",
                               (gint64)sn->vm_state_size);
    json_object_set_int_member(info, "date-sec", sn->date_sec);
    json_object_set_int_member(info, "date-nsec", sn->date_nsec);
    json_object_set_int_member(info, "vm-clock-sec",
                               (gint64)(sn->vm_clock_nsec / 1000000000));
    json_object_set_int_member(info, "vm-clock-nsec",
                               (gint64)(sn->vm_clock_nsec % 1000000000));
    if (sn->icount != UINT64_MAX) {
        json_object_set_int_member(info, "icount", (gint64)sn->icount);
    }
out:
    strata_drain_set_free(drained);
    return info;
}

/* ------------------------------------------------------------------ */
/* change-backing-file                                                 */
/* ------------------------------------------------------------------ */

bool strata_snapshot_change_backing_file(StrataContext *ctx,
                                         const char *device,
                                         const char *image_node_name,
                                         const char *backing_file,
                                         GError **error)
{
    StrataNode *top = strata_context_lookup(ctx, device);
    StrataNode *image, *backing, *n;
    StrataDrainSet *drained;
    g_autoptr(GError) err = NULL;
    bool was_ro;
    bool ok = false;

    if (!top) {
        not_found(error, device, device);
        return false;
    }
    image = strata_context_lookup(ctx, image_node_name);
    if (!image) {
        not_found(error, NULL, image_node_name);
        return false;
    }
    backing = strata_node_backing(image);
    if (!backing) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "not allowing backing file change on an image without "
                    "a backing file");
        return false;
    }
    for (n = top; n && n != image; n = strata_node_backing(n)) {
    }
    if (!n) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'%s' and image file are not in the same chain", device);
        return false;
    }
    if (image->drv != &strata_driver_qcow2) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Could not change backing file to '%s': %s",
                    backing_file, g_strerror(ENOTSUP));
        return false;
    }
    drained = strata_drain_set_new(ctx);
    strata_drain_set_add(drained, image);
    /* As QEMU, a read-only layer is made writable for the rewrite. */
    was_ro = image->read_only;
    if (!set_read_only(image, false, error)) {
        goto out;
    }
    if (!strata_node_record_backing(image, backing, backing_file, &err)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not change backing file to '%s': %s",
                    backing_file, err->message);
    } else {
        ok = true;
    }
    if (was_ro) {
        set_read_only(image, true, NULL);
    }
out:
    strata_drain_set_free(drained);
    return ok;
}

/* ------------------------------------------------------------------ */
/* x-strata-blockdev-revert                                                   */
/* ------------------------------------------------------------------ */

bool strata_snapshot_revert(StrataContext *ctx, const char *node_name,
                            const char *overlay_file,
                            const char *overlay_node_name,
                            bool delete_files, GError **error)
{
    StrataNode *target = strata_context_lookup(ctx, node_name);
    g_autoptr(GPtrArray) discarded = NULL;
    g_autoptr(GPtrArray) files = NULL;
    StrataNode *top, *ov = NULL;
    StrataDrainSet *drained = NULL;
    bool created = false;
    bool busy = false;
    bool ok = false;

    if (!target) {
        not_found(error, NULL, node_name);
        return false;
    }
    if (strata_context_lookup(ctx, overlay_node_name)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "New overlay node-name already in use");
        return false;
    }
    /* The layers above the target, top first.  Each one below the top
     * must be used by nothing but the layer above it, or discarding it
     * would pull data from under someone. */
    discarded = g_ptr_array_new();
    top = target;
    while (backing_parent(top)) {
        StrataNode *above = backing_parent(top);
        if (g_list_length(top->parents) != 1) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "Node '%s' is used by more than the chain above "
                        "it", top->node_name);
            busy = true;
            break;
        }
        top = above;
        g_ptr_array_insert(discarded, 0, top);
        strata_node_ref(top);
    }
    for (guint i = 0; i < discarded->len && !busy; i++) {
        StrataNode *d = discarded->pdata[i];
        for (GList *l = d->parents; l; l = l->next) {
            StrataChild *c = l->data;
            if (c->parent_kind == STRATA_PARENT_OTHER) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                            "Node '%s' is busy: %s uses it",
                            d->node_name, c->parent_desc);
                busy = true;
                break;
            }
        }
    }
    if (busy) {
        goto out;
    }
    files = g_ptr_array_new_with_free_func(g_free);
    for (guint i = 0; i < discarded->len; i++) {
        g_ptr_array_add(files,
                        g_strdup(image_filename(discarded->pdata[i])));
    }

    drained = strata_drain_set_new(ctx);
    strata_drain_set_add(drained, top);
    if (!flush_node(target, error) ||
        !create_overlay_file(target, overlay_file, "qcow2", true, error)) {
        goto out;
    }
    created = true;
    ov = open_overlay(ctx, overlay_file, "qcow2", overlay_node_name, error);
    if (!ov) {
        goto out;
    }
    strata_drain_set_add(drained, ov);
    if (!strata_node_attach_child(ov, target, "backing",
                                  STRATA_CHILD_BACKING, STRATA_PARENT_NODE,
                                  ov, NULL, 0, 0, error)) {
        goto out;
    }
    /* Every parent of the old top moves; when the target is the top
     * itself, the new backing edge stays. */
    if (!strata_node_move_parents(top, ov, error)) {
        strata_child_detach(ov->backing);
        goto out;
    }
    if (!ov->parents) {
        /* Nothing carries the new overlay: the monitor keeps it, as it
         * keeps a lone snapshot's. */
        monitor_own(ov);
    }
    if (top == target && !set_read_only(target, true, NULL)) {
        g_warning("revert: node '%s' stays read-write", target->node_name);
    }
    ok = true;
out:
    strata_drain_set_free(drained);
    if (ok) {
        /* The discarded layers close now (the monitor lets go of those
         * it held); the target keeps its read-only state as a backing. */
        for (guint i = 0; i < discarded->len; i++) {
            monitor_disown(discarded->pdata[i]);
        }
    }
    for (guint i = 0; i < discarded->len; i++) {
        strata_node_unref(discarded->pdata[i]);
    }
    if (ok) {
        if (delete_files) {
            for (guint i = 0; i < files->len; i++) {
                if (g_unlink(files->pdata[i]) < 0) {
                    g_warning("revert: cannot remove '%s': %s",
                              (char *)files->pdata[i], g_strerror(errno));
                }
            }
        }
    }
    if (!ok && ov) {
        /* Not reached by the graph: the node closes with this. */
        monitor_disown(ov);
    }
    strata_node_unref(ov);
    if (!ok && created) {
        g_unlink(overlay_file);
    }
    return ok;
}
