/* strata — system checkpoints: QEMU's snapshot-save, snapshot-load and
 * snapshot-delete as jobs (internal snapshots of several disks with the
 * VM state in the qcow2 VM-state area of one of them), and the external
 * checkpoint of the embedding API (the VM state into a file node, the
 * disks into new overlays, one transaction).
 *
 * The VM state comes from the embedder's StrataVmstateProvider; without
 * one, checkpoints are disk-only.  Every disk of a checkpoint is drained
 * from before the state is written until the last disk is cut (or
 * reverted and the state read back), so guest I/O never sees a state in
 * between.  Checks run, and errors are worded, as QEMU 7.2's
 * migration/savevm.c and block/snapshot.c do. */
#include <errno.h>
#include <string.h>

#include "snapshot-private.h"
#include "job-private.h"
#include "driver.h"
#include "drivers-private.h"
#include "qcow2/qcow2.h"

/* ------------------------------------------------------------------ */
/* VM state streams                                                    */
/* ------------------------------------------------------------------ */

/* Writes reach the node in pieces of this size. */
#define VMSTATE_BUF_SIZE (1024 * 1024)

/* The external checkpoint's file: a header, the state from DATA_OFFSET.
 * The header is written last, so a torn save never looks valid. */
#define VMFILE_MAGIC "STRVMST1"
#define VMFILE_DATA_OFFSET 4096

struct StrataVmstate {
    StrataNode *node;
    bool qcow2_area;    /* the qcow2 VM-state area, else node bytes */
    uint64_t pos;       /* bytes of state streamed so far */
    uint64_t size;      /* load: the state's size */
    uint8_t *buf;       /* save: bytes not yet written */
    size_t buffered;
    int error;          /* first failure; later calls fail at once */
};

static int vmstate_co_rw(StrataVmstate *vs, uint64_t pos, void *buf,
                         uint64_t bytes, bool is_write)
{
    uint64_t off = pos + VMFILE_DATA_OFFSET;
    int64_t len;

    if (vs->qcow2_area) {
        return strata_qcow2_co_vmstate_rw(vs->node, pos, buf, bytes,
                                          is_write);
    }
    if (!is_write) {
        return strata_node_co_pread(vs->node, off, bytes, buf, 0);
    }
    len = vs->node->total_bytes;
    if (len < 0 || (uint64_t)len < off + bytes) {
        int ret = strata_node_co_truncate(vs->node, off + bytes, false,
                                          NULL);
        if (ret < 0) {
            return ret;
        }
    }
    return strata_node_co_pwrite(vs->node, off, bytes, buf, 0);
}

static int vmstate_co_flush_buf(StrataVmstate *vs)
{
    if (vs->buffered && !vs->error) {
        vs->error = vmstate_co_rw(vs, vs->pos - vs->buffered, vs->buf,
                                  vs->buffered, true);
    }
    vs->buffered = 0;
    return vs->error;
}

int strata_vmstate_write(StrataVmstate *vs, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    g_return_val_if_fail(vs != NULL && vs->buf != NULL, -EINVAL);
    g_return_val_if_fail(buf != NULL || len == 0, -EINVAL);
    while (len && !vs->error) {
        size_t n = MIN(len, VMSTATE_BUF_SIZE - vs->buffered);
        memcpy(vs->buf + vs->buffered, p, n);
        vs->buffered += n;
        vs->pos += n;
        p += n;
        len -= n;
        if (vs->buffered == VMSTATE_BUF_SIZE) {
            vmstate_co_flush_buf(vs);
        }
    }
    return vs->error;
}

ssize_t strata_vmstate_read(StrataVmstate *vs, void *buf, size_t len)
{
    uint64_t n;

    g_return_val_if_fail(vs != NULL && vs->buf == NULL, -EINVAL);
    g_return_val_if_fail(buf != NULL || len == 0, -EINVAL);
    if (vs->error) {
        return vs->error;
    }
    n = MIN((uint64_t)len, vs->size - vs->pos);
    if (n) {
        vs->error = vmstate_co_rw(vs, vs->pos, buf, n, false);
        if (vs->error) {
            return vs->error;
        }
        vs->pos += n;
    }
    return (ssize_t)n;
}

uint64_t strata_vmstate_size(StrataVmstate *vs)
{
    g_return_val_if_fail(vs != NULL, 0);
    return vs->buf ? vs->pos : vs->size;
}

void strata_context_set_vmstate_provider(StrataContext *ctx,
                                         const StrataVmstateProvider *p,
                                         void *opaque)
{
    g_return_if_fail(ctx != NULL);
    g_return_if_fail(p == NULL || (p->save != NULL && p->load != NULL));
    ctx->vmstate_provider = p;
    ctx->vmstate_opaque = opaque;
}

/* Coroutine.  Streams the provider's state to @node; *@size is its
 * length.  Without a provider nothing is written and *@size is 0. */
static bool vmstate_co_save(StrataContext *ctx, StrataNode *node,
                            bool qcow2_area, uint64_t *size, GError **error)
{
    StrataVmstate vs = { .node = node, .qcow2_area = qcow2_area };
    GError *err = NULL;
    bool ok;

    *size = 0;
    if (!ctx->vmstate_provider) {
        return true;
    }
    vs.buf = g_malloc(VMSTATE_BUF_SIZE);
    ok = ctx->vmstate_provider->save(ctx->vmstate_opaque, &vs, &err);
    vmstate_co_flush_buf(&vs);
    g_free(vs.buf);
    if (!ok) {
        g_propagate_prefixed_error(error, err ? err : g_error_new_literal(
                                       STRATA_ERROR, STRATA_ERROR_IO,
                                       "unknown error"),
                                   "Error while writing VM state: ");
        return false;
    }
    if (vs.error) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Error while writing VM state: %s",
                    g_strerror(-vs.error));
        return false;
    }
    *size = vs.pos;
    return true;
}

/* Coroutine.  Hands @size bytes of state on @node to the provider. */
static bool vmstate_co_load(StrataContext *ctx, StrataNode *node,
                            bool qcow2_area, uint64_t size, GError **error)
{
    StrataVmstate vs = { .node = node, .qcow2_area = qcow2_area,
                         .size = size };
    GError *err = NULL;

    if (!ctx->vmstate_provider->load(ctx->vmstate_opaque, &vs, &err)) {
        /* QEMU's text, with the provider's reason after it. */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Error %d while loading VM state%s%s",
                    vs.error ? vs.error : -EINVAL, err ? ": " : "",
                    err ? err->message : "");
        g_clear_error(&err);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ */
/* The disks of a checkpoint                                           */
/* ------------------------------------------------------------------ */

/* bdrv_can_snapshot: writable, and qcow2 at or under the node. */
static bool can_snapshot(StrataNode *node)
{
    StrataNode *holder = strata_snapshot_holder(node);
    return !node->read_only && holder && !holder->read_only;
}

/* The nodes named by "devices", each able to take a snapshot.
 * (transfer full) (nullable): a GPtrArray holding a reference each. */
static GPtrArray *resolve_devices(StrataContext *ctx, char **devices,
                                  GError **error)
{
    g_autoptr(GPtrArray) nodes =
        g_ptr_array_new_with_free_func((GDestroyNotify)strata_node_unref);

    if (!devices || !devices[0]) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "At least one device is required for snapshot");
        return NULL;
    }
    for (char **d = devices; *d; d++) {
        StrataNode *n = strata_context_lookup(ctx, *d);
        if (!n || strcmp(n->node_name, *d) != 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "No block device node '%s'", *d);
            return NULL;
        }
        strata_node_ref(n);
        g_ptr_array_add(nodes, n);
    }
    for (guint i = 0; i < nodes->len; i++) {
        StrataNode *n = nodes->pdata[i];
        if (!can_snapshot(n)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                        "Device '%s' is writable but does not support "
                        "snapshots", n->node_name);
            return NULL;
        }
    }
    return g_steal_pointer(&nodes);
}

/* The snapshot @tag names on @node (ID first, then name, as QEMU's
 * bdrv_snapshot_find).  (transfer full) (nullable) */
static StrataQcow2SnapshotInfo *find_tag(StrataNode *node, const char *tag)
{
    g_autoptr(GPtrArray) list =
        strata_qcow2_snapshot_list(strata_snapshot_holder(node), NULL);

    for (int pass = 0; list && pass < 2; pass++) {
        for (guint i = 0; i < list->len; i++) {
            StrataQcow2SnapshotInfo *sn = list->pdata[i];
            if (!strcmp(pass == 0 ? sn->id : sn->name, tag)) {
                return g_ptr_array_steal_index(list, i);
            }
        }
    }
    return NULL;
}

/* How many of @nodes have a snapshot @tag. */
static guint count_tag(GPtrArray *nodes, const char *tag)
{
    guint n = 0;

    for (guint i = 0; i < nodes->len; i++) {
        g_autoptr(StrataQcow2SnapshotInfo) sn = find_tag(nodes->pdata[i],
                                                         tag);
        n += sn != NULL;
    }
    return n;
}

/* bdrv_all_find_vmstate_bs with a vmstate node named. */
static StrataNode *find_vmstate_node(GPtrArray *nodes, const char *name,
                                     GError **error)
{
    for (guint i = 0; i < nodes->len; i++) {
        StrataNode *n = nodes->pdata[i];
        if (!strcmp(n->node_name, name)) {
            return n;
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "vmstate block device '%s' does not exist", name);
    return NULL;
}

static StrataDrainSet *drain_all(StrataContext *ctx, GPtrArray *nodes)
{
    StrataDrainSet *set = strata_drain_set_new(ctx);

    for (guint i = 0; i < nodes->len; i++) {
        strata_drain_set_add(set, nodes->pdata[i]);
    }
    return set;
}

/* ------------------------------------------------------------------ */
/* The jobs                                                            */
/* ------------------------------------------------------------------ */

typedef enum { SNAP_SAVE, SNAP_LOAD, SNAP_DELETE } SnapKind;

typedef struct SnapJob {
    StrataJob common;
    SnapKind kind;
    char *tag;
    char *vmstate;      /* nullable (delete) */
    char **devices;
} SnapJob;

static bool co_save(SnapJob *j, GPtrArray *nodes, GError **error)
{
    StrataContext *ctx = j->common.ctx;
    StrataNode *vm_node, *vm_holder;
    StrataDrainSet *drained;
    GPtrArray *taken;
    uint64_t vm_size = 0;
    gint64 now;
    bool ok = true;

    if (count_tag(nodes, j->tag) > 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Snapshot '%s' already exists in one or more devices",
                    j->tag);
        return false;
    }
    vm_node = find_vmstate_node(nodes, j->vmstate, error);
    if (!vm_node) {
        return false;
    }
    vm_holder = strata_snapshot_holder(vm_node);

    drained = drain_all(ctx, nodes);
    now = g_get_real_time();
    if (!vmstate_co_save(ctx, vm_holder, true, &vm_size, error)) {
        /* What was written stays unreferenced past the disk's end. */
        strata_drain_set_free(drained);
        return false;
    }
    taken = g_ptr_array_new();
    for (guint i = 0; i < nodes->len && ok; i++) {
        StrataNode *holder = strata_snapshot_holder(nodes->pdata[i]);
        StrataQcow2SnapshotInfo info = { 0 };
        g_autoptr(GError) err = NULL;

        info.name = j->tag;
        info.date_sec = (uint32_t)(now / G_USEC_PER_SEC);
        info.date_nsec = (uint32_t)(now % G_USEC_PER_SEC) * 1000;
        info.icount = UINT64_MAX;
        info.vm_state_size = holder == vm_holder ? vm_size : 0;
        ok = strata_qcow2_co_snapshot_create_full(holder, &info, &err);
        if (ok) {
            g_ptr_array_add(taken, holder);
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not create snapshot '%s' on '%s'", j->tag,
                        ((StrataNode *)nodes->pdata[i])->node_name);
        }
    }
    if (!ok) {
        /* All disks or none: the ones already taken go again. */
        for (guint i = 0; i < taken->len; i++) {
            g_autoptr(GError) err = NULL;
            if (!strata_qcow2_co_snapshot_delete(taken->pdata[i], j->tag,
                                                 &err)) {
                g_warning("snapshot-save: cannot remove '%s' again: %s",
                          j->tag, err->message);
            }
        }
    }
    g_ptr_array_free(taken, TRUE);
    strata_drain_set_free(drained);
    return ok;
}

static bool co_load(SnapJob *j, GPtrArray *nodes, GError **error)
{
    StrataContext *ctx = j->common.ctx;
    g_autoptr(StrataQcow2SnapshotInfo) vm_sn = NULL;
    StrataNode *vm_node;
    StrataDrainSet *drained;
    bool ok = true;

    if (count_tag(nodes, j->tag) < nodes->len) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Snapshot '%s' does not exist in one or more devices",
                    j->tag);
        return false;
    }
    vm_node = find_vmstate_node(nodes, j->vmstate, error);
    if (!vm_node) {
        return false;
    }
    vm_sn = find_tag(vm_node, j->tag);
    /* Without a provider there is nothing to hand the state to, and a
     * disk-only revert is what the caller asks for. */
    if (ctx->vmstate_provider && vm_sn->vm_state_size == 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "This is a disk-only snapshot. Revert to it offline "
                    "using qemu-img");
        return false;
    }

    drained = drain_all(ctx, nodes);
    for (guint i = 0; i < nodes->len && ok; i++) {
        StrataNode *n = nodes->pdata[i];
        g_autoptr(GError) err = NULL;

        ok = strata_qcow2_co_snapshot_apply(strata_snapshot_holder(n),
                                            j->tag, &err);
        if (!ok) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not load snapshot '%s' on '%s': %s", j->tag,
                        n->node_name, err->message);
        }
    }
    if (ok && ctx->vmstate_provider) {
        ok = vmstate_co_load(ctx, strata_snapshot_holder(vm_node), true,
                             vm_sn->vm_state_size, error);
    }
    strata_drain_set_free(drained);
    return ok;
}

static bool co_delete(SnapJob *j, GPtrArray *nodes, GError **error)
{
    if (count_tag(nodes, j->tag) < nodes->len) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Snapshot '%s' does not exist in one or more devices",
                    j->tag);
        return false;
    }
    for (guint i = 0; i < nodes->len; i++) {
        StrataNode *n = nodes->pdata[i];
        g_autoptr(StrataQcow2SnapshotInfo) sn = find_tag(n, j->tag);
        g_autoptr(GError) err = NULL;

        if (!strata_qcow2_co_snapshot_delete(strata_snapshot_holder(n),
                                             sn->id, &err)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not delete snapshot '%s' on '%s': %s",
                        j->tag, n->node_name, err->message);
            return false;
        }
    }
    return true;
}

static int snap_co_run(StrataJob *job, GError **error)
{
    SnapJob *j = (SnapJob *)job;
    g_autoptr(GPtrArray) nodes = NULL;
    bool ok = false;

    strata_job_progress_set_total(job, 1);
    /* Nodes are looked up now, as QEMU's job does when it runs. */
    nodes = resolve_devices(job->ctx, j->devices, error);
    if (nodes) {
        switch (j->kind) {
        case SNAP_SAVE:
            ok = co_save(j, nodes, error);
            break;
        case SNAP_LOAD:
            ok = co_load(j, nodes, error);
            break;
        case SNAP_DELETE:
            ok = co_delete(j, nodes, error);
            break;
        }
    }
    /* QEMU reports the job as complete whether or not it succeeded. */
    strata_job_progress_add(job, 1);
    return ok ? 0 : -EIO;
}

static void snap_free(StrataJob *job)
{
    SnapJob *j = (SnapJob *)job;

    g_free(j->tag);
    g_free(j->vmstate);
    g_strfreev(j->devices);
}

static const StrataJobDriver save_driver = {
    .type = "snapshot-save",
    .instance_size = sizeof(SnapJob),
    .co_run = snap_co_run,
    .free = snap_free,
};

static const StrataJobDriver load_driver = {
    .type = "snapshot-load",
    .instance_size = sizeof(SnapJob),
    .co_run = snap_co_run,
    .free = snap_free,
};

static const StrataJobDriver delete_driver = {
    .type = "snapshot-delete",
    .instance_size = sizeof(SnapJob),
    .co_run = snap_co_run,
    .free = snap_free,
};

static bool snap_start(StrataContext *ctx, const StrataJobDriver *drv,
                       SnapKind kind, JsonObject *args, GError **error)
{
    JsonArray *devs = json_object_get_array_member(args, "devices");
    guint n = devs ? json_array_get_length(devs) : 0;
    StrataJob *job;
    SnapJob *j;

    /* As QEMU's: never dismissed on its own, finalized on its own; every
     * failure shows only as the job's error. */
    job = strata_job_new(ctx, drv,
                         json_object_get_string_member(args, "job-id"), 0,
                         STRATA_ON_ERROR_REPORT, true, false, error);
    if (!job) {
        return false;
    }
    j = (SnapJob *)job;
    j->kind = kind;
    j->tag = g_strdup(json_object_get_string_member(args, "tag"));
    j->vmstate = g_strdup(json_object_get_string_member_with_default(
        args, "vmstate", NULL));
    j->devices = g_new0(char *, n + 1);
    for (guint i = 0; i < n; i++) {
        j->devices[i] = g_strdup(json_array_get_string_element(devs, i));
    }
    strata_job_start(job);
    return true;
}

bool strata_snapshot_save_start(StrataContext *ctx, JsonObject *args,
                                GError **error)
{
    return snap_start(ctx, &save_driver, SNAP_SAVE, args, error);
}

bool strata_snapshot_load_start(StrataContext *ctx, JsonObject *args,
                                GError **error)
{
    return snap_start(ctx, &load_driver, SNAP_LOAD, args, error);
}

bool strata_snapshot_delete_start(StrataContext *ctx, JsonObject *args,
                                  GError **error)
{
    return snap_start(ctx, &delete_driver, SNAP_DELETE, args, error);
}

/* ------------------------------------------------------------------ */
/* External checkpoints                                                */
/* ------------------------------------------------------------------ */

typedef struct {
    StrataContext *ctx;
    StrataNode *node;
    bool header;        /* save: write the header (else invalidate it) */
    uint64_t size;      /* save: out; load: in */
    bool ok;
    GError *error;
} VmFileCo;

static int vmfile_co_header(StrataNode *node, uint64_t size, bool valid)
{
    uint8_t hdr[512] = { 0 };
    int ret;

    if (valid) {
        memcpy(hdr, VMFILE_MAGIC, 8);
        for (int i = 0; i < 8; i++) {
            hdr[8 + i] = (uint8_t)(size >> (56 - 8 * i));
        }
    }
    /* The state must be stable before a header says it is there. */
    ret = strata_node_co_flush(node);
    if (ret == 0) {
        ret = strata_node_co_pwrite(node, 0, sizeof(hdr), hdr, 0);
    }
    if (ret == 0) {
        ret = strata_node_co_flush(node);
    }
    return ret;
}

static void vmfile_save_co(void *opaque)
{
    VmFileCo *c = opaque;
    int ret;

    if (!c->header) {
        ret = vmfile_co_header(c->node, 0, false);
        c->ok = ret == 0;
        return;
    }
    if (c->node->total_bytes < VMFILE_DATA_OFFSET) {
        ret = strata_node_co_truncate(c->node, VMFILE_DATA_OFFSET, false,
                                      &c->error);
        if (ret < 0) {
            return;
        }
    }
    /* An old header goes first: a failure further on leaves none. */
    ret = vmfile_co_header(c->node, 0, false);
    if (ret < 0) {
        g_set_error(&c->error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not write VM state: %s", g_strerror(-ret));
        return;
    }
    if (!vmstate_co_save(c->ctx, c->node, false, &c->size, &c->error)) {
        return;
    }
    ret = vmfile_co_header(c->node, c->size, true);
    if (ret < 0) {
        g_set_error(&c->error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not write VM state: %s", g_strerror(-ret));
        return;
    }
    c->ok = true;
}

static void vmfile_load_co(void *opaque)
{
    VmFileCo *c = opaque;
    uint8_t hdr[512];
    uint64_t size = 0;
    int ret;

    ret = c->node->total_bytes < VMFILE_DATA_OFFSET ? -EINVAL :
          strata_node_co_pread(c->node, 0, sizeof(hdr), hdr, 0);
    if (ret == 0 && memcmp(hdr, VMFILE_MAGIC, 8) != 0) {
        ret = -EINVAL;
    }
    for (int i = 0; ret == 0 && i < 8; i++) {
        size = (size << 8) | hdr[8 + i];
    }
    if (ret == 0 &&
        size > (uint64_t)c->node->total_bytes - VMFILE_DATA_OFFSET) {
        ret = -EINVAL;
    }
    if (ret < 0) {
        g_set_error(&c->error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Node '%s' holds no VM state of a checkpoint",
                    c->node->node_name);
        return;
    }
    c->ok = vmstate_co_load(c->ctx, c->node, false, size, &c->error);
}

static StrataNode *vmfile_node(StrataContext *ctx, const char *name,
                               GError **error)
{
    StrataNode *node = name ? strata_context_lookup(ctx, name) : NULL;

    if (!node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='%s' nor node-name='%s'",
                    name ? name : "", name ? name : "");
        return NULL;
    }
    return node;
}

static void vmfile_abort(void *opaque)
{
    VmFileCo *c = opaque;

    c->header = false;
    strata_loop_run_co(c->ctx->loop, vmfile_save_co, c);
    if (!c->ok) {
        g_warning("checkpoint: the VM state on '%s' could not be "
                  "invalidated", c->node->node_name);
    }
}

static void vmfile_clean(void *opaque)
{
    VmFileCo *c = opaque;

    strata_node_unref(c->node);
    g_clear_error(&c->error);
    g_free(c);
}

static const StrataTransactionOps vmfile_ops = {
    .abort = vmfile_abort,
    .clean = vmfile_clean,
};

bool strata_checkpoint_external(StrataContext *ctx, const char *vmstate_node,
                                const StrataCheckpointDisk *disks,
                                size_t n_disks, GError **error)
{
    StrataTransaction *t;
    StrataNode *vm_node;
    VmFileCo *c;
    bool ok = true;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(disks != NULL || n_disks == 0, false);
    vm_node = vmfile_node(ctx, vmstate_node, error);
    if (!vm_node) {
        return false;
    }
    if (vm_node->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Node '%s' is read-only", vm_node->node_name);
        return false;
    }
    t = strata_transaction_new(ctx);
    /* Every disk is quiet before the state is taken, and stays so until
     * the last overlay is in place: state and disks are one instant. */
    for (size_t i = 0; i < n_disks && ok; i++) {
        StrataNode *n = disks[i].node_name
            ? strata_context_lookup(ctx, disks[i].node_name) : NULL;
        if (!n) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'",
                        disks[i].node_name ? disks[i].node_name : "");
            ok = false;
        } else {
            strata_transaction_drain(t, n);
        }
    }
    if (ok) {
        c = g_new0(VmFileCo, 1);
        c->ctx = ctx;
        c->node = vm_node;
        strata_node_ref(vm_node);
        c->header = true;
        strata_transaction_add(t, &vmfile_ops, c);
        strata_loop_run_co(ctx->loop, vmfile_save_co, c);
        ok = c->ok;
        if (!ok) {
            g_propagate_error(error, c->error);
            c->error = NULL;
        }
    }
    for (size_t i = 0; i < n_disks && ok; i++) {
        StrataSnapshotSyncArgs a = {
            .node_name = disks[i].node_name,
            .snapshot_file = disks[i].overlay_file,
            .snapshot_node_name = disks[i].overlay_node_name,
            .mode = STRATA_SNAPSHOT_MODE_ABSOLUTE_PATHS,
        };
        if (!a.snapshot_file) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'snapshot-file' is missing");
            ok = false;
        } else {
            ok = strata_snapshot_sync_prepare(t, &a, error);
        }
    }
    return strata_transaction_finish(t, ok, error);
}

bool strata_checkpoint_external_load(StrataContext *ctx,
                                     const char *vmstate_node,
                                     GError **error)
{
    VmFileCo c = { .ctx = ctx };

    g_return_val_if_fail(ctx != NULL, false);
    c.node = vmfile_node(ctx, vmstate_node, error);
    if (!c.node) {
        return false;
    }
    if (!ctx->vmstate_provider) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "No VM state provider is registered");
        return false;
    }
    strata_loop_run_co(ctx->loop, vmfile_load_co, &c);
    if (!c.ok) {
        g_propagate_error(error, c.error);
    }
    return c.ok;
}
