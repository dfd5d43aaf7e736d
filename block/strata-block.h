/* strata — the public embedding API of the block layer.
 *
 * Installed as <strata/strata-block.h>.  A VMM creates a StrataContext
 * on its GMainContext, adds nodes (from JSON or QEMU's key=value syntax),
 * opens a StrataBackend on a root node and sends guest I/O to it, either
 * callback-style (completion runs on the loop) or from a coroutine.
 * Everything here runs on the thread that owns the GMainContext.
 */
#ifndef STRATA_BLOCK_H
#define STRATA_BLOCK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-util.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataContext StrataContext;
typedef struct StrataNode StrataNode;
typedef struct StrataBackend StrataBackend;

/* ------------------------------------------------------------------ */
/* Context                                                             */
/* ------------------------------------------------------------------ */

/**
 * strata_context_new:
 * @main_context: (nullable): where the loop's GSource is attached;
 *   NULL for the thread-default context
 * @aio: (nullable): "io_uring", "threads" or NULL/"auto" (io_uring when
 *   the kernel allows it, else a thread pool)
 * @error: set on failure
 *
 * Returns: (transfer full) (nullable): a new context with no nodes.
 */
STRATA_API StrataContext *strata_context_new(GMainContext *main_context,
                                             const char *aio, GError **error);

/* Closes every node the context still holds, then frees it. */
STRATA_API void strata_context_free(StrataContext *ctx);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataContext, strata_context_free)

/* Returns: (transfer none): "io_uring" or "threads". */
STRATA_API const char *strata_context_aio_engine(StrataContext *ctx);

/**
 * strata_context_add_node:
 * @options: blockdev-add options, e.g.
 *   {"driver": "raw", "node-name": "disk", "file": {"driver": "file",
 *   "filename": "disk.img"}}; not modified
 *
 * Opens a node tree as QMP's blockdev-add does.  The context owns the
 * top node (as the monitor owns nodes from blockdev-add) until
 * strata_context_del_node().
 *
 * Returns: (transfer none) (nullable): the top node.
 */
STRATA_API StrataNode *strata_context_add_node(StrataContext *ctx,
                                               JsonObject *options,
                                               GError **error);

/**
 * strata_context_add_node_keyval:
 * @spec: "driver=raw,node-name=disk,file.driver=file,file.filename=x"
 *   or a JSON object text
 *
 * As strata_context_add_node(), from QEMU's --blockdev syntax.
 *
 * Returns: (transfer none) (nullable): the top node.
 */
STRATA_API StrataNode *strata_context_add_node_keyval(StrataContext *ctx,
                                                      const char *spec,
                                                      GError **error);

/* Drops the context's ownership of a node added by add_node, as QMP's
 * blockdev-del: fails while the node has parents or backends. */
STRATA_API bool strata_context_del_node(StrataContext *ctx,
                                        const char *node_name,
                                        GError **error);

/* Returns: (transfer none) (nullable): the node called @node_name. */
STRATA_API StrataNode *strata_context_find_node(StrataContext *ctx,
                                                const char *node_name);

/* ------------------------------------------------------------------ */
/* Nodes                                                               */
/* ------------------------------------------------------------------ */

STRATA_API const char *strata_node_get_name(StrataNode *node);
STRATA_API const char *strata_node_get_driver_name(StrataNode *node);
/* Returns: the node's length in bytes, or -errno. */
STRATA_API int64_t strata_node_get_length(StrataNode *node);
STRATA_API bool strata_node_is_read_only(StrataNode *node);

/* ------------------------------------------------------------------ */
/* Backends: what a guest device holds                                 */
/* ------------------------------------------------------------------ */

/* Request flags. */
typedef enum {
    STRATA_REQ_FUA = 1 << 0,         /* write through to stable storage */
    STRATA_REQ_MAY_UNMAP = 1 << 1,   /* write-zeroes may deallocate */
    STRATA_REQ_NO_FALLBACK = 1 << 2, /* write-zeroes: fail with -ENOTSUP
                                      * rather than write zero buffers */
    /* write: store whole clusters compressed (qcow2; the request covers
     * whole clusters, or ends at the end of the disk); drivers without
     * compression write the data as it is */
    STRATA_REQ_WRITE_COMPRESSED = 1 << 3,
} StrataReqFlags;

/**
 * strata_backend_new:
 * @node_name: the root node
 * @writable: whether the backend will write (takes the write
 *   permission; fails when another user forbids it or the node is
 *   read-only)
 *
 * Returns: (transfer full) (nullable): a backend holding @node_name.
 */
STRATA_API StrataBackend *strata_backend_new(StrataContext *ctx,
                                             const char *node_name,
                                             bool writable, GError **error);
STRATA_API void strata_backend_ref(StrataBackend *blk);
STRATA_API void strata_backend_unref(StrataBackend *blk);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataBackend, strata_backend_unref)

/* Returns: (transfer none): the node the backend holds now (it follows
 * snapshots and pivots). */
STRATA_API StrataNode *strata_backend_get_node(StrataBackend *blk);
STRATA_API int64_t strata_backend_get_length(StrataBackend *blk);

/* Coroutine-style I/O: coroutine only; 0 or -errno.  @iov is not
 * modified and must stay valid until the call returns. */
STRATA_API int strata_backend_co_preadv(StrataBackend *blk, uint64_t offset,
                                        const struct iovec *iov, int niov,
                                        StrataReqFlags flags);
STRATA_API int strata_backend_co_pwritev(StrataBackend *blk, uint64_t offset,
                                         const struct iovec *iov, int niov,
                                         StrataReqFlags flags);
STRATA_API int strata_backend_co_pread(StrataBackend *blk, uint64_t offset,
                                       void *buf, size_t bytes);
STRATA_API int strata_backend_co_pwrite(StrataBackend *blk, uint64_t offset,
                                        const void *buf, size_t bytes,
                                        StrataReqFlags flags);
STRATA_API int strata_backend_co_pwrite_zeroes(StrataBackend *blk,
                                               uint64_t offset,
                                               uint64_t bytes,
                                               StrataReqFlags flags);
STRATA_API int strata_backend_co_pdiscard(StrataBackend *blk,
                                          uint64_t offset, uint64_t bytes);
STRATA_API int strata_backend_co_flush(StrataBackend *blk);

/* Callback-style I/O: returns at once; @cb(@opaque, 0 or -errno) runs
 * later from the loop (never from inside the submit call).  @iov (the
 * array and the buffers) must stay valid until @cb runs. */
typedef void (*StrataIOCallback)(void *opaque, int ret);

STRATA_API void strata_backend_aio_preadv(StrataBackend *blk,
                                          uint64_t offset,
                                          const struct iovec *iov, int niov,
                                          StrataReqFlags flags,
                                          StrataIOCallback cb, void *opaque);
STRATA_API void strata_backend_aio_pwritev(StrataBackend *blk,
                                           uint64_t offset,
                                           const struct iovec *iov, int niov,
                                           StrataReqFlags flags,
                                           StrataIOCallback cb, void *opaque);
STRATA_API void strata_backend_aio_pwrite_zeroes(StrataBackend *blk,
                                                 uint64_t offset,
                                                 uint64_t bytes,
                                                 StrataReqFlags flags,
                                                 StrataIOCallback cb,
                                                 void *opaque);
STRATA_API void strata_backend_aio_pdiscard(StrataBackend *blk,
                                            uint64_t offset, uint64_t bytes,
                                            StrataIOCallback cb,
                                            void *opaque);
STRATA_API void strata_backend_aio_flush(StrataBackend *blk,
                                         StrataIOCallback cb, void *opaque);

/* Waits until every request of @blk has completed: iterates the loop
 * from plain code, yields to it from a coroutine. */
STRATA_API void strata_backend_drain(StrataBackend *blk);

/* Synchronous helpers for plain code (tools, tests): they iterate the
 * context's loop until the request is done. 0 or -errno. */
STRATA_API int strata_backend_pread(StrataBackend *blk, uint64_t offset,
                                    void *buf, size_t bytes);
STRATA_API int strata_backend_pwrite(StrataBackend *blk, uint64_t offset,
                                     const void *buf, size_t bytes,
                                     StrataReqFlags flags);
STRATA_API int strata_backend_flush(StrataBackend *blk);


/* ------------------------------------------------------------------ */
/* VM state: system checkpoints                                        */
/* ------------------------------------------------------------------ */

/* A VM state stream being saved or loaded; valid only during the
 * provider callback it is handed to. */
typedef struct StrataVmstate StrataVmstate;

/**
 * strata_vmstate_write:
 *
 * Appends @len bytes to the VM state being saved.  May yield to the
 * loop (the callback runs in a coroutine); guest I/O stays held back.
 *
 * Returns: 0 or -errno.
 */
STRATA_API int strata_vmstate_write(StrataVmstate *vs, const void *buf,
                                    size_t len);

/**
 * strata_vmstate_read:
 *
 * Reads the next bytes of the VM state being loaded.
 *
 * Returns: the bytes read (fewer than @len only at the end of the
 *   state, 0 there), or -errno.
 */
STRATA_API ssize_t strata_vmstate_read(StrataVmstate *vs, void *buf,
                                       size_t len);

/* Returns: the size of the VM state being loaded, in bytes. */
STRATA_API uint64_t strata_vmstate_size(StrataVmstate *vs);

/**
 * StrataVmstateProvider:
 * @save: writes the VMM's state (RAM, devices) with
 *   strata_vmstate_write(); false with @error to fail the checkpoint
 * @load: reads it back with strata_vmstate_read(); false with @error
 *   fails the load (the disks have been reverted by then)
 *
 * Both run on the loop thread, in a coroutine, while every disk of the
 * checkpoint is drained: no guest request is in flight and new ones
 * wait.  The VMM keeps its vCPUs stopped for the duration.  They must
 * not iterate the loop themselves.
 */
typedef struct StrataVmstateProvider {
    bool (*save)(void *opaque, StrataVmstate *vs, GError **error);
    bool (*load)(void *opaque, StrataVmstate *vs, GError **error);
} StrataVmstateProvider;

/**
 * strata_context_set_vmstate_provider:
 * @provider: (nullable): must outlive its registration; NULL removes it
 *
 * Registers the VMM's state with the context.  Without a provider,
 * snapshot-save takes disk-only snapshots; with one, the state goes into
 * the qcow2 VM-state area of the node named by snapshot-save's
 * "vmstate" and snapshot-load hands it back.
 */
STRATA_API void strata_context_set_vmstate_provider(
    StrataContext *ctx, const StrataVmstateProvider *provider, void *opaque);

/* One disk of an external checkpoint. */
typedef struct StrataCheckpointDisk {
    const char *node_name;          /* the active layer */
    const char *overlay_file;       /* created as a qcow2 overlay */
    const char *overlay_node_name;  /* the new active layer */
} StrataCheckpointDisk;

/**
 * strata_checkpoint_external:
 * @vmstate_node: a writable node (a file node) that receives the VM
 *   state; its old contents are replaced
 * @disks: the disks to snapshot, @n_disks of them
 *
 * An external system checkpoint: with every disk drained, the
 * provider's state is written to @vmstate_node, then every disk gets a
 * new overlay, as one transaction: on any failure no overlay remains
 * (nor its file) and @vmstate_node holds no valid state.  Without a
 * provider only the disks are snapshotted.  Plain code on the loop
 * thread; it iterates the loop until done.
 */
STRATA_API bool strata_checkpoint_external(StrataContext *ctx,
                                           const char *vmstate_node,
                                           const StrataCheckpointDisk *disks,
                                           size_t n_disks, GError **error);

/**
 * strata_checkpoint_external_load:
 *
 * Hands the VM state that strata_checkpoint_external() wrote to
 * @vmstate_node to the provider's load.  The disks are the embedder's
 * to set back (open the images the overlays were made on, or revert to
 * them with x-strata-blockdev-revert).  Plain code, as above.
 */
STRATA_API bool strata_checkpoint_external_load(StrataContext *ctx,
                                                const char *vmstate_node,
                                                GError **error);

#ifdef __cplusplus
}
#endif

#endif /* STRATA_BLOCK_H */
