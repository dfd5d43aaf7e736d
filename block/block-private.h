/* strata — the block graph's internals, shared by the files of block/. */
#ifndef STRATA_BLOCK_PRIVATE_H
#define STRATA_BLOCK_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-block.h"
#include "../util/coroutine-private.h"
#include "../util/iov-private.h"
#include "../util/loop-private.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataDriver StrataDriver;
typedef struct StrataChild StrataChild;

/* ---- permissions on a child edge (as QEMU's BLK_PERM_*) ---- */
typedef enum {
    STRATA_PERM_CONSISTENT_READ = 1 << 0,
    STRATA_PERM_WRITE = 1 << 1,
    STRATA_PERM_WRITE_UNCHANGED = 1 << 2,
    STRATA_PERM_RESIZE = 1 << 3,
    STRATA_PERM_GRAPH_MOD = 1 << 4, /* QEMU dropped it; kept for reporting */
    STRATA_PERM_ALL = (1 << 5) - 1,
} StrataPerm;

/* Writes "consistent-read, write" etc.; (transfer full). */
char *strata_perm_names(uint64_t perm);

typedef enum {
    STRATA_CHILD_FILE,    /* the protocol node under a format or filter */
    STRATA_CHILD_BACKING, /* the backing (lower) image of a format */
    STRATA_CHILD_DATA,    /* a qcow2 external data file */
    STRATA_CHILD_OTHER,   /* a job's or a filter's extra child */
} StrataChildRole;

/* Who holds a child edge: another node, a backend, or a job. */
typedef enum {
    STRATA_PARENT_NODE,
    STRATA_PARENT_BACKEND,
    STRATA_PARENT_OTHER,
} StrataParentKind;

struct StrataChild {
    char *name;            /* "file", "backing", … */
    StrataChildRole role;
    StrataNode *node;      /* the child; holds a reference */
    StrataParentKind parent_kind;
    void *parent;          /* StrataNode *, StrataBackend *, or other */
    char *parent_desc;     /* for error messages: "node 'top'", … */
    uint64_t perm;         /* what the parent does through this edge */
    uint64_t shared;       /* what it lets others do */
    GList *link_in_parents; /* this edge's link in node->parents */
    /* The child was defined inside the parent's options: a reopen of the
     * parent takes it along with the parent's read-only and cache
     * settings, as QEMU reopens the children it inherits options to. */
    bool inherits;
};

/* Request alignment and size limits of a node; a driver fills them in
 * its open() (defaults: 1 byte, no maximum). */
typedef struct StrataLimits {
    uint32_t request_alignment; /* power of two; the I/O path pads */
    uint32_t buf_align;         /* memory alignment the node needs */
    uint64_t max_transfer;      /* 0: unlimited */
    uint64_t pdiscard_alignment;
    uint64_t max_pwrite_zeroes; /* 0: unlimited */
} StrataLimits;

/* What a write notifier is told about. */
typedef enum {
    STRATA_WRITE_DATA,
    STRATA_WRITE_ZEROES,
    STRATA_WRITE_DISCARD,
} StrataWriteKind;

/* Told about every successful write, write-zeroes and discard on a node
 * (io.c), after the data reached the node and before the request
 * completes: the mirror job's dirty tracking and write-blocking mode.
 * @qiov is NULL unless @kind is STRATA_WRITE_DATA.  Coroutine. */
typedef struct StrataWriteNotifier StrataWriteNotifier;
struct StrataWriteNotifier {
    void (*co_notify)(StrataWriteNotifier *n, uint64_t offset,
                      uint64_t bytes, StrataIOVec *qiov, size_t qiov_offset,
                      StrataWriteKind kind);
    void *opaque;
};

/* Takes [@offset, @offset + @len) of a streamed read
 * (strata_node_co_read_stream): the bytes at @buf, which stay valid only
 * until it returns, or zeroes when @buf is NULL (a hole the server
 * reported).  0 or -errno; an error is the read's result, and the rest
 * of its data is received and dropped.  A coroutine on the loop thread,
 * unless the read was given STRATA_STREAM_ANY_THREAD: then plain code
 * that may also run on a worker thread, for one read's pieces in turn
 * and for several reads' at once. */
typedef int (*StrataReadSink)(void *opaque, uint64_t offset,
                              const void *buf, size_t len);

typedef enum {
    /* The sink may be called on any thread (see StrataReadSink): it
     * neither yields nor touches the graph, and keeps its own state
     * safe.  A driver may then receive a large payload on a worker
     * thread and hand it on from there. */
    STRATA_STREAM_ANY_THREAD = 1 << 0,
} StrataStreamFlags;

/* A request in flight on a node, kept so overlapping ones can wait. */
typedef struct StrataTrackedReq {
    StrataNode *node;
    uint64_t offset, bytes;
    bool is_write;
    bool serialising;      /* others that overlap wait for it */
    uint64_t overlap_offset, overlap_bytes; /* aligned range used to test */
    StrataCoroutine *co;
    StrataCoQueue wait_queue; /* who waits for this request */
    struct StrataTrackedReq *next, *prev;
} StrataTrackedReq;

/* A range of a node written straight into the file under it, from any
 * thread (strata_node_co_direct_write_begin).  The file's driver fills
 * in file to punch (direct_write_target); the rest is the I/O
 * path's. */
typedef struct StrataDirectWrite {
    StrataNode *node;           /* the node asked for */
    uint64_t offset, bytes;     /* its range */
    StrataNode *file;           /* the node whose file holds the range */
    int fd;
    uint64_t file_offset;       /* where @offset lies in the file */
    bool punch;                 /* zeroes may deallocate (discard=unmap) */
    StrataTrackedReq req;
} StrataDirectWrite;

struct StrataNode {
    int refcnt;
    StrataContext *ctx;
    const StrataDriver *drv;
    void *opaque;               /* driver state (drv->state_size bytes) */

    char node_name[32];
    bool auto_named;
    bool monitor_owned;         /* added by add_node / blockdev-add */
    bool read_only;
    bool force_share;
    bool cache_direct;
    bool cache_no_flush;
    char *discard;              /* "ignore" or "unmap" */
    char *detect_zeroes;        /* "off", "on", "unmap" */

    char *filename;             /* what query commands show as "file" */
    JsonObject *options;        /* the options it was opened with */

    StrataChild *file;          /* shortcuts into children */
    StrataChild *backing;
    GList *children;            /* StrataChild *, edges to our children */
    GList *parents;             /* StrataChild *, edges from our parents */

    StrataLimits limits;
    int64_t total_bytes;        /* cached length; < 0 until known */

    /* Permissions currently granted on this node (union of parents). */
    uint64_t cur_perm, cur_shared;

    /* I/O bookkeeping */
    unsigned in_flight;
    unsigned quiesce_counter;   /* > 0: drained; backends queue requests */
    StrataTrackedReq *tracked_head;
    unsigned serialising_in_flight;
    StrataCoQueue drain_waiters; /* coroutines in drained_begin */
    GList *link_in_ctx;
    GList *write_notifiers;     /* StrataWriteNotifier *; usually NULL */
    /* Moves whenever what this node reads through its children may have
     * changed: an edge at or below it, the length of a node below, or
     * (as a driver reports it) what a node below maps.  What a driver
     * learnt about the chain below it (the qcow2 layer map) holds for
     * one value only. */
    uint64_t chain_gen;
};

struct StrataContext {
    StrataLoop *loop;
    GHashTable *nodes_by_name;  /* name → StrataNode* (weak) */
    GList *all_nodes;           /* every open node, newest first */
    GList *monitor_nodes;       /* nodes the context owns (a ref each) */
    GList *backends;
    unsigned auto_name_counter;
    bool fallback_logged;
    struct StrataNbdServer *nbd_server; /* export-nbd.c; NULL: stopped */
    GList *exports;             /* StrataExport *, newest first */
    /* BLOCK_EXPORT_DELETED goes here (export-private.h) */
    void (*export_event_cb)(StrataContext *ctx, const char *name,
                            JsonObject *data, void *opaque);
    void *export_event_opaque;
    GList *jobs;                /* StrataJob *, oldest first (job.c) */
    /* The embedder's VM state (snapshot-vm.c); NULL: disk-only. */
    const struct StrataVmstateProvider *vmstate_provider;
    void *vmstate_opaque;
    /* "aio" of every file node whose options leave it out (NULL: the
     * driver's default): qemu-img's -i and -n reach the whole tree,
     * backing files opened from image headers included. */
    char *default_aio;
    /* How long an NBD handshake of a node opened now may take (0: the
     * driver's own limit); strata-img's extra connections keep it short. */
    int64_t nbd_handshake_ns;
};

/* ---- context.c ---- */

/* Sets (NULL: clears) StrataContext.default_aio; affects nodes opened
 * afterwards. */
void strata_context_set_default_aio(StrataContext *ctx, const char *aio);

/* ---- graph.c ---- */

/**
 * strata_node_open:
 * @options: (transfer none): blockdev-add style options
 * @strings_only: options came from key=value text: scalar values are
 *   strings to be converted to the expected types
 * @monitor_owned: the context takes a reference (blockdev-add)
 *
 * Opens @options and any nested children.
 *
 * Returns: (transfer full) (nullable): the new node (one reference for the
 * caller, in addition to the context's when @monitor_owned).
 */
StrataNode *strata_node_open(StrataContext *ctx, JsonObject *options,
                             bool strings_only, bool monitor_owned,
                             GError **error);

/* Moves the chain_gen of @node and of every node above it. */
void strata_node_chain_changed(StrataNode *node);

void strata_node_ref(StrataNode *node);
void strata_node_unref(StrataNode *node);

/* Looks up a node; sets "Cannot find device='x' nor node-name='x'"-style
 * errors the caller words. */
StrataNode *strata_context_lookup(StrataContext *ctx, const char *name);

/**
 * strata_node_attach_child:
 * @parent_node: (nullable): the node that gains a child, or NULL for a
 *   backend or job parent (@parent, @parent_kind, @parent_desc say who)
 *
 * Adds an edge with @perm / @shared after checking them against every
 * other edge into @child (recursively down the tree).
 *
 * Returns: (transfer none) (nullable): the edge.
 */
StrataChild *strata_node_attach_child(StrataNode *parent_node,
                                      StrataNode *child, const char *name,
                                      StrataChildRole role,
                                      StrataParentKind parent_kind,
                                      void *parent, const char *parent_desc,
                                      uint64_t perm, uint64_t shared,
                                      GError **error);
/* Removes the edge, drops its reference on the child. */
void strata_child_detach(StrataChild *child);

/* Changes the permissions of an edge; on conflict nothing changes. */
bool strata_child_set_perm(StrataChild *child, uint64_t perm,
                           uint64_t shared, GError **error);

/* Re-points @child at @new_node (checking permissions). */
bool strata_child_replace_node(StrataChild *child, StrataNode *new_node,
                               GError **error);

/**
 * strata_node_reopen_multiple:
 * @option_sets: (element-type JsonObject): one complete option set per
 *   node, each naming an existing node by "node-name"
 *
 * Reopens the nodes with their new options, all or none (QEMU's
 * blockdev-reopen): every node is prepared, then the permissions of the
 * new graph are checked, then everything is committed; any failure
 * rolls every node back.  Omitted common options go back to their
 * defaults; a node that has a backing child must restate "backing" (a
 * node name, or null to detach it).  Children defined inside a node's
 * options are reopened with it and take over its read-only and cache
 * settings.  Errors about a member of the i-th set name it
 * "options[i].member", as blockdev-reopen's argument checking does.
 */
bool strata_node_reopen_multiple(StrataContext *ctx, GPtrArray *option_sets,
                                 GError **error);

/* Makes @node read-only or writable by reopening it with its current
 * options (files reopened, locks moved, permissions re-checked), as
 * QEMU does around a commit into a read-only base. */
bool strata_node_set_read_only(StrataNode *node, bool read_only,
                               GError **error);

/* Recomputes the permissions the node needs from its children after its
 * own parents changed; may take or release locks. */
bool strata_node_refresh_perms(StrataNode *node, GError **error);

/* The permission a node needs on its children given what its parents
 * need; the default used when a driver has no child_perm callback. */
void strata_default_child_perm(StrataNode *node, StrataChild *child,
                               StrataChildRole role, uint64_t parent_perm,
                               uint64_t parent_shared, uint64_t *nperm,
                               uint64_t *nshared);

/* Valid node names: letter first, then letters, digits, '-', '_', '.';
 * at most 31 characters. */
bool strata_node_name_check(const char *name, GError **error);

/* Drained sections: no request is in flight on @node and its subtree
 * while the counter is > 0, and backends hold new requests back.  Both
 * callable from coroutines and plain code; nested sections nest. */
void strata_node_drained_begin(StrataNode *node);
void strata_node_drained_end(StrataNode *node);

/* ---- backing.c ---- */

/* The file name of the image under @node (filters and json:
 * pseudo-names skipped); (transfer none) (nullable). */
const char *strata_node_image_filename(StrataNode *node);

/* @path said relative to directory @dir, both absolute. (transfer full) */
char *strata_path_relative_to(const char *path, const char *dir);

/**
 * strata_backing_string:
 * @overlay_file: (nullable): the overlay's file name (relative to the
 *   working directory or absolute)
 *
 * The backing string an overlay's header should record for @base: the
 * name @base was opened by when it resolves to the same file from the
 * overlay's directory, else a name relative to that directory; never a
 * json: pseudo-filename.  (transfer full) (nullable)
 */
char *strata_backing_string(StrataNode *base, const char *overlay_file);

/* Whether @node is in @top's backing chain (or is @top, if asked). */
bool strata_node_chain_contains(StrataNode *top, StrataNode *node,
                                bool include_top);
/* The layer below @top whose image file is @filename, as QEMU looks up a
 * backing image by name. (transfer none) (nullable) */
StrataNode *strata_node_find_backing_image(StrataNode *top,
                                           const char *filename);

/* Rewrites @node's backing string (and format; both nullable for none)
 * through its driver, then flushes.  Coroutine only. */
int strata_node_co_change_backing_file(StrataNode *node, const char *backing,
                                       const char *fmt, GError **error);

/**
 * strata_node_record_backing:
 * @base: (nullable): the new backing node; NULL records none
 * @backing_file: (nullable): the string to write verbatim; NULL derives
 *   it with strata_backing_string()
 *
 * Records @base in @overlay's header (the format is @base's driver);
 * the graph is not changed.  Plain code, or a coroutine (then it runs
 * in place).
 */
bool strata_node_record_backing(StrataNode *overlay, StrataNode *base,
                                const char *backing_file, GError **error);

/**
 * strata_nbd_uri_options:
 * @is_nbd: (out): whether @spec was meant as an NBD address at all
 *
 * The options of an nbd protocol node for the URI forms qemu-img takes
 * (nbd://HOST[:PORT]/EXPORT, nbd+tcp://, nbd+unix:///EXPORT?socket=PATH
 * and the legacy nbd:unix:PATH[:exportname=E], nbd:HOST:PORT[:…]), as an
 * image name or as a backing string.  NULL with @error for a malformed
 * one, or NULL with *@is_nbd false for a plain file name.
 * (transfer full) (nullable)
 */
JsonObject *strata_nbd_uri_options(const char *spec, bool *is_nbd,
                                   GError **error);
/* Whether @name (nullable) may go into an image header as a backing
 * file name: never a json: pseudo-filename (see backing.c); false with
 * @error for one. */
bool strata_backing_name_writable(const char *name, GError **error);

/**
 * strata_image_name_options:
 * @name: an image name as qemu-img takes it and a header's backing
 *   string holds it: a file name, an NBD URI (strata_nbd_uri_options)
 *   or a json: pseudo-filename
 * @fmt: (nullable): the format given outside the name (qemu-img's -f,
 *   an overlay's backing format); NULL: probed from the first bytes
 *
 * The options of the node @name opens: @fmt (it wins over a "driver"
 * inside a json: name, as in QEMU) over the protocol the name gives.
 * A json: name, which QEMU writes into headers when a backing node has
 * no plain name, holds the node's options as nested objects or dotted
 * keys ("file.filename"); a file child that gives only a "filename"
 * gets its protocol from it, at every level.  strata reads these names
 * and never writes one (strata_backing_name_writable).  NULL with
 * @error for a malformed name.  (transfer full)
 */
JsonObject *strata_image_name_options(StrataContext *ctx, const char *name,
                                      const char *fmt, GError **error);
/* The file name options open (their file child's, or their own), or
 * NULL (an NBD export). */
const char *strata_options_filename(JsonObject *options);
/* "qcow2" or "raw" from the first bytes of the file @filename, as QEMU
 * probes an image whose format is not given; "raw" when it cannot be
 * read (opening it then says why). */
const char *strata_probe_file_format(const char *filename);
/* Sets *@fmt to "qcow2" or "raw" from the first bytes of the protocol
 * node @proto describes (opened read-only for the probe, then closed), as
 * qemu-img probes an image behind any protocol.  Plain code or a
 * coroutine. */
bool strata_probe_protocol_format(StrataContext *ctx, JsonObject *proto,
                                  const char **fmt, GError **error);

/* The backing node (nullable). */
StrataNode *strata_node_backing(StrataNode *node);
/* Walks filters down to the node with data (a filter's file child). */
StrataNode *strata_node_skip_filters(StrataNode *node);
/* The node whose block status @node's is: down through filters and
 * through formats without allocation of their own (raw, which takes no
 * backing file and reports its file's status, as QEMU's does). */
StrataNode *strata_node_status_source(StrataNode *node);

/* A drained section over a fixed set of nodes: strata_drain_set_add()
 * quiesces a node's subtree and ancestors (and waits until nothing is in
 * flight there); strata_drain_set_free() releases exactly those nodes,
 * however the graph changed meanwhile, then lets every backend look at
 * its root again.  Nodes are held (a reference each) until the free. */
typedef struct StrataDrainSet StrataDrainSet;
StrataDrainSet *strata_drain_set_new(StrataContext *ctx);
void strata_drain_set_add(StrataDrainSet *set, StrataNode *node);
void strata_drain_set_free(StrataDrainSet *set);

/* Moves every parent edge of @from (backends, exports, nodes, jobs) to
 * @to, except edges whose parent is @to itself; all or none.  The caller
 * drains both. */
bool strata_node_move_parents(StrataNode *from, StrataNode *to,
                              GError **error);

/**
 * strata_node_append_overlay:
 *
 * Inside a drained section: attaches @base as @overlay's backing child,
 * then moves every other parent edge of @base to @overlay, so that every
 * backend, export and parent node now sees @overlay.  All or nothing.
 * @base's read-only state is the caller's business (snapshot.c).
 */
bool strata_node_append_overlay(StrataNode *base, StrataNode *overlay,
                                GError **error);
/* The reverse: @overlay's parents go back to its backing node and the
 * backing edge is dropped. */
bool strata_node_remove_overlay(StrataNode *overlay, GError **error);

/* ---- option access for drivers (options.c) ---- */

typedef enum {
    STRATA_OPT_STRING,
    STRATA_OPT_BOOL,
    STRATA_OPT_INT,     /* signed 64-bit */
    STRATA_OPT_SIZE,    /* unsigned 64-bit; key=value accepts k/M/G/T */
    STRATA_OPT_ENUM,    /* string, one of enum_values */
    STRATA_OPT_CHILD,   /* node reference: a node name or nested options */
    STRATA_OPT_CHILD_OR_NULL, /* as CHILD, or JSON null */
    STRATA_OPT_ANY,     /* passed through unchecked (driver checks it) */
} StrataOptType;

typedef struct StrataOptDesc {
    const char *name;   /* dotted for members of nested objects:
                         * "cache.direct" */
    StrataOptType type;
    bool required;
    const char *const *enum_values; /* NULL-terminated, for ENUM */
} StrataOptDesc;

/**
 * strata_opts_validate:
 * @descs: array terminated by a {NULL} entry
 *
 * Checks @options against @descs (and converts key=value strings in
 * place when @strings_only): unknown members, missing required ones,
 * wrong types and bad enum values are errors naming the parameter as
 * QEMU does ("Parameter 'x' is unexpected", "Parameter 'x' is missing",
 * "Invalid parameter type for 'x', expected: integer").
 */
bool strata_opts_validate(JsonObject *options, const StrataOptDesc *const *descs,
                          bool strings_only, GError **error);

/* Typed getters after validation; dotted names reach nested objects. */
bool strata_opts_has(JsonObject *options, const char *name);
const char *strata_opts_get_string(JsonObject *options, const char *name,
                                   const char *def);
bool strata_opts_get_bool(JsonObject *options, const char *name, bool def);
int64_t strata_opts_get_int(JsonObject *options, const char *name,
                            int64_t def);
uint64_t strata_opts_get_size(JsonObject *options, const char *name,
                              uint64_t def);
/* Copies every level of @node / @object (json_node_copy shares nested
 * objects and arrays).  (transfer full) */
JsonNode *strata_json_deep_copy(JsonNode *node);
JsonObject *strata_json_object_deep_copy(JsonObject *object);

/* JSON text of @options with "driver" first, for "json:{...}" names.
 * (transfer full) */
char *strata_opts_to_json_name(JsonObject *options);

/* ---- io.c: the request path (coroutine only; 0 or -errno) ---- */

int strata_node_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags);
int strata_node_co_pwritev(StrataNode *node, uint64_t offset,
                           uint64_t bytes, StrataIOVec *qiov,
                           size_t qiov_offset, StrataReqFlags flags);
int strata_node_co_pread(StrataNode *node, uint64_t offset, uint64_t bytes,
                         void *buf, StrataReqFlags flags);
int strata_node_co_pwrite(StrataNode *node, uint64_t offset, uint64_t bytes,
                          const void *buf, StrataReqFlags flags);
int strata_node_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataReqFlags flags);
int strata_node_co_pdiscard(StrataNode *node, uint64_t offset,
                            uint64_t bytes);
int strata_node_co_flush(StrataNode *node);

/**
 * strata_node_co_copy_range_to:
 * @src: a node of the file driver
 *
 * Writes [@offset, @offset + @bytes) of @node with the bytes of @src at
 * @src_offset, moved inside the kernel (copy_file_range) where every
 * layer between @node and its file can place them there: one copy of
 * the data instead of a read into a buffer and a write out of it.  The
 * request takes @node's usual path otherwise (tracked, serialised with
 * overlapping writes, counted for flushes).  -ENOTSUP when the range
 * cannot be copied so (a driver or filter in the way that does not map
 * it, O_DIRECT, different file systems, detect-zeroes, write notifiers,
 * a range not aligned to what the format allocates): the caller then
 * reads and writes the range itself; the range may have been written
 * in part.
 */
int strata_node_co_copy_range_to(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataNode *src,
                                 uint64_t src_offset);

/**
 * strata_node_co_read_stream:
 *
 * Reads [@offset, @offset + @bytes) of @node and hands the data to @sink
 * as it arrives, in pieces no larger than the driver's staging buffer,
 * instead of into a buffer of the caller's: a driver that receives its
 * data off a socket (nbd) stages each piece in a small buffer of its own
 * that stays in the CPU's cache, and the sink copies it on from there.
 * A GiB from qemu-nbd into tmpfs through a 64 KiB staging buffer and
 * pwrite cost 0.25 s of a client's CPU, against 0.31 s received into
 * mapped pages and 0.32 s into 2 MiB buffers.  The pieces cover the
 * range, in no set order, once each (a piece may come again after the
 * driver reconnected and sent the read anew).  The request takes
 * @node's usual path (tracked, counted in flight), in max_transfer
 * pieces.  The sink's error, if it returns one, is the result.  -ENOTSUP
 * when nothing under @node streams (only nbd does; raw without an offset
 * and filters that do not see the data pass it through) or the range is
 * not aligned to the node's requests or reaches past its end; the
 * caller then reads the usual way, and the sink has seen nothing.
 */
int strata_node_co_read_stream(StrataNode *node, uint64_t offset,
                               uint64_t bytes, StrataReadSink sink,
                               void *opaque, StrataStreamFlags flags);

/**
 * strata_node_co_direct_write_begin:
 *
 * Lets any thread write [@offset, @offset + @bytes) of @node, until
 * strata_node_co_direct_write_end(), with strata_direct_write() and
 * strata_direct_write_zeroes(): plain pwrite() and fallocate() calls on
 * the file under it, where a streamed read's sink running on a worker
 * thread (STRATA_STREAM_ANY_THREAD) can reach it.  Only where every
 * layer between @node and the file places the bytes there as they are
 * (`raw`, its offset added; `file` without O_DIRECT, not a block
 * device) and none must see the data (write notifiers, detect-zeroes):
 * -ENOTSUP otherwise, and where the range reaches past the node's end
 * (a direct write never grows a file); -EPERM on a read-only node.
 * The range is a write request on @node for the whole time: tracked,
 * counted in flight (a drain waits for it), and when it ends the file
 * counts it for the next flush.  The layers in between see nothing.
 * @dw is the caller's; it is filled in here.
 */
int strata_node_co_direct_write_begin(StrataNode *node, uint64_t offset,
                                      uint64_t bytes, StrataDirectWrite *dw);
/* Ends @dw's request (whatever was written through it).  Coroutine. */
void strata_node_co_direct_write_end(StrataDirectWrite *dw);
/* Any thread.  Writes @len bytes of @buf at @offset of @dw's node,
 * inside its range: 0 or -errno (-EINVAL outside the range). */
int strata_direct_write(const StrataDirectWrite *dw, uint64_t offset,
                        const void *buf, size_t len);
/* Any thread.  Makes [@offset, @offset + @len) of @dw's range read as
 * zeroes: a punched hole where the file's node unmaps discards
 * (discard=unmap) and its file system can, else zeroes written. */
int strata_direct_write_zeroes(const StrataDirectWrite *dw, uint64_t offset,
                               size_t len);
/* For drivers (direct_write_target of raw): what
 * strata_node_co_direct_write_begin() checks of each layer, then the
 * layer's own answer.  Loop. */
int strata_node_direct_write_target(StrataNode *node, uint64_t offset,
                                    uint64_t bytes, StrataDirectWrite *dw);

/* Whether what is written to @node lands in the page cache: the node at
 * the bottom of its file children is a file with cache.direct off (an
 * NBD export or null-co has no page cache of ours).  Jobs copy in
 * smaller pieces then (STRATA_JOB_BUFFERED_CHUNK), and strata-img
 * convert streams into it. */
bool strata_node_writes_buffered(StrataNode *node);

/* Whether @status, what strata_node_co_block_status_above() said of
 * @top's whole chain (no base), means the range reads as zeroes: ZERO,
 * or held by no layer of a chain that ends in an image format that
 * takes backing files (qcow2) but has none (QEMU's rule; null-co
 * without read-zeroes, with or without raw on top, leaves the buffer as
 * it is). */
bool strata_node_status_reads_zero(StrataNode *top, int status);

/* A byte range of a node. */
typedef struct StrataRange {
    uint64_t offset, bytes;
} StrataRange;

/**
 * strata_node_co_prefetch:
 * @ranges: (array length=n): what will be read soon, in the order it
 *   will be read
 *
 * A hint: starts bringing @ranges into the cache in front of @node's
 * storage (a file's page cache, unless it is opened with O_DIRECT) and
 * returns once those reads are under way, without waiting for them, so
 * that the reads that follow find the data there.  Filters pass it to
 * their child; other nodes without such a cache ignore it.
 *
 * Returns: 0, or -errno when the hint could not be given (the reads
 * that follow work all the same).
 */
int strata_node_co_prefetch(StrataNode *node, const StrataRange *ranges,
                            unsigned n);
/* ---- Read-ahead hints for copies of a chain (prefetch.c) ---- */

#define STRATA_PREFETCH_FILES 8
#define STRATA_PREFETCH_RANGES 64

/* The ranges of one file a batch collects, in read order. */
typedef struct StrataPrefetchFile {
    StrataNode *file;
    StrataRange r[STRATA_PREFETCH_RANGES];
    unsigned n;
} StrataPrefetchFile;

/* What a copy will read next, per file; zero-initialised when empty. */
typedef struct StrataPrefetchBatch {
    StrataPrefetchFile f[STRATA_PREFETCH_FILES];
    unsigned n;
    uint64_t data;      /* bytes in the batch */
} StrataPrefetchBatch;

/* Whether block status @st with *file @file names data one read of
 * @file can fetch as it is: plain clusters (not compressed, not zero)
 * at a known offset. */
bool strata_status_in_file(int st, StrataNode *file);
/* Adds @bytes at @host of @file to @b (merged with the file's last
 * range when adjacent); false when @b has no room: send it first. */
bool strata_prefetch_batch_add(StrataPrefetchBatch *b, StrataNode *file,
                               uint64_t host, uint64_t bytes);
/* Coroutine.  Hands each file of @b its ranges (strata_node_co_prefetch);
 * @b is empty after.  0 or the first -errno. */
int strata_prefetch_batch_send(StrataPrefetchBatch *b);
/* Whether a layer of @top's chain keeps its data where a prefetch hint
 * does something (a file's page cache, not O_DIRECT): elsewhere a
 * prefetcher's block status walk would be paid for nothing. */
bool strata_chain_can_prefetch(StrataNode *top);

/*
 * A prefetcher reads ahead of a copy loop that walks a chain in guest
 * order (a job's first pass): the extents the copies will read, found
 * by block status of @top above @base (those of layers at depth
 * >= @min_depth only), go to their files as hints, in copy order, up
 * to 64 MiB of data past what the copies took, 16 MiB at a time.  The
 * copies then find the data in the page cache instead of waiting for it
 * chunk by chunk while the kernel's own readahead reads a little way
 * ahead in each file (including clusters a layer above replaces).
 * strata_prefetcher_new returns NULL when no file of the chain takes
 * hints (O_DIRECT, another kind of node).  @wake(@opaque) runs when a
 * batch has been handed over.
 */
typedef struct StrataPrefetcher StrataPrefetcher;

StrataPrefetcher *strata_prefetcher_new(StrataNode *top, StrataNode *base,
                                        int min_depth,
                                        void (*wake)(void *opaque),
                                        void *opaque);
/* Coroutine.  The loop is about to copy at @cursor of @len, @done data
 * bytes copied or in flight: starts the next batch when the hints are
 * less than the window ahead and none is in flight.  @pf may be NULL. */
void strata_prefetcher_co_step(StrataPrefetcher *pf, uint64_t cursor,
                               uint64_t len, uint64_t done);
/* Whether a batch is in flight (a loop waits for it before it ends). */
bool strata_prefetcher_busy(StrataPrefetcher *pf);
/* Frees @pf (nullable); a batch in flight ends on its own, waking no
 * one (a forced cancel does not wait for it). */
void strata_prefetcher_free(StrataPrefetcher *pf);

/* Resizes; @exact: the node must get exactly @offset bytes. */
/* Tells @node (a format driver's file child) that the format is about
 * to do what @event names, for fault injection: see the driver field
 * debug_event.  A no-op for every driver but blkdebug. */
void strata_node_debug_event(StrataNode *node, const char *event);
int strata_node_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                            GError **error);
/* Refreshes the cached length from the driver: the length or -errno.
 * The plain variant runs the coroutine one to completion (loop code). */
int64_t strata_node_co_refresh_length(StrataNode *node);
int64_t strata_node_refresh_length(StrataNode *node);

/* Block status flags (as QEMU's BDRV_BLOCK_*). */
enum {
    STRATA_BLOCK_DATA = 1 << 0,      /* reads return data from this layer */
    STRATA_BLOCK_ZERO = 1 << 1,      /* reads return zeroes */
    STRATA_BLOCK_OFFSET_VALID = 1 << 2, /* *map is an offset in *file */
    STRATA_BLOCK_ALLOCATED = 1 << 3, /* this layer decides the content
                                      * (not the backing chain) */
    STRATA_BLOCK_EOF = 1 << 4,       /* the range reaches the end */
    STRATA_BLOCK_RECURSE = 1 << 5,   /* driver: ask *file for details */
};

/**
 * strata_node_co_block_status:
 * @want_zero: ask for precise zero information (slower)
 * @pnum: (out): bytes from @offset with the same status (>= 1 unless the
 *   offset is at the end)
 * @map: (out) (optional): offset in *@file when OFFSET_VALID
 * @file: (out) (optional): the node holding the data
 *
 * Returns: STRATA_BLOCK_* flags, or -errno.
 */
int strata_node_co_block_status(StrataNode *node, bool want_zero,
                                uint64_t offset, uint64_t bytes,
                                uint64_t *pnum, uint64_t *map,
                                StrataNode **file);

/**
 * strata_node_co_block_status_above:
 * @base: (nullable): stop at this node (exclusive); NULL: the whole chain
 * @depth: (out) (optional): 0 when @top itself decides the range, 1 for
 *   its backing, …; the chain's length when nothing in it does
 *
 * Status of the range as seen through @top's backing chain down to
 * @base: ALLOCATED tells that some layer above @base decides the content.
 */
int strata_node_co_block_status_above(StrataNode *top, StrataNode *base,
                                      bool want_zero, uint64_t offset,
                                      uint64_t bytes, uint64_t *pnum,
                                      uint64_t *map, StrataNode **file,
                                      int *depth);

/* Marks the caller's request serialising; used for read-modify-write and
 * copy-on-read. */
void strata_tracked_request_init(StrataTrackedReq *req, StrataNode *node,
                                 uint64_t offset, uint64_t bytes,
                                 bool is_write, bool serialising);
void strata_tracked_request_end(StrataTrackedReq *req);
/* Yields while an overlapping request conflicts with @req. */
void strata_co_wait_serialising(StrataTrackedReq *req);

/* Node-level in-flight accounting used by drains. */
void strata_node_inc_in_flight(StrataNode *node);
void strata_node_dec_in_flight(StrataNode *node);

/* ---- backend.c ---- */

/**
 * strata_backend_new_full:
 * @perm: what the holder does (STRATA_PERM_*)
 * @shared: what it lets others do
 * @desc: who holds it, for error messages ("export 'e0'", "job 'j'")
 *
 * Returns: (transfer full) (nullable): a backend on @node.
 */
StrataBackend *strata_backend_new_full(StrataContext *ctx, StrataNode *node,
                                       uint64_t perm, uint64_t shared,
                                       const char *desc, GError **error);

/* Detaches the backend from its node (the context is closing); its I/O
 * fails with -ENOMEDIUM from then on. */
void strata_backend_eject(StrataBackend *blk);

/* strata_node_co_copy_range_to through the backend (its drains, range
 * and write permission): the backend's range gets @src's bytes. */
int strata_backend_co_copy_range_to(StrataBackend *blk, uint64_t offset,
                                    uint64_t bytes, StrataNode *src,
                                    uint64_t src_offset);

/* strata_node_co_read_stream through the backend (its drains and
 * range). */
int strata_backend_co_read_stream(StrataBackend *blk, uint64_t offset,
                                  uint64_t bytes, StrataReadSink sink,
                                  void *opaque, StrataStreamFlags flags);
/* strata_node_co_direct_write_begin through the backend (its drains,
 * range and write permission); strata_backend_co_direct_write_end()
 * ends it. */
int strata_backend_co_direct_write_begin(StrataBackend *blk, uint64_t offset,
                                         uint64_t bytes,
                                         StrataDirectWrite *dw);
void strata_backend_co_direct_write_end(StrataBackend *blk,
                                        StrataDirectWrite *dw);

/* The edge a backend holds (for drains and graph changes). */
StrataChild *strata_backend_child(StrataBackend *blk);
/* Called by graph.c when a drained section starts or ends on the
 * backend's node. */
void strata_backend_drained_changed(StrataBackend *blk);

/* ---- drivers.c ---- */

/* Returns: (nullable): the driver called @name. */
const StrataDriver *strata_driver_find(const char *name);
/* The NULL-terminated table, for listing. */
extern const StrataDriver *const strata_driver_table[];

#ifdef __cplusplus
}
#endif

#endif
