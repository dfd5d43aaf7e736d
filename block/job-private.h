/* strata — jobs: the state machine and verbs shared by every job
 * (stream, commit, create), as QEMU's job.c defines them.
 *
 * A job is a coroutine on the context's loop plus a state.  The driver's
 * co_run does the work; prepare/commit/abort/clean run on the loop,
 * outside the coroutine, once the work is over: graph changes belong in
 * prepare (may fail) and commit (may not), each inside a drained
 * section.  The transition and verb tables are data (job.c) and drawn
 * in docs/jobs.md.
 */
#ifndef STRATA_JOB_PRIVATE_H
#define STRATA_JOB_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "block-private.h"
#include "../util/ratelimit-private.h"

#ifdef __cplusplus
extern "C" {
#endif

/* QEMU's JobStatus, in its order. */
typedef enum {
    STRATA_JOB_STATUS_UNDEFINED,
    STRATA_JOB_STATUS_CREATED,
    STRATA_JOB_STATUS_RUNNING,
    STRATA_JOB_STATUS_PAUSED,
    STRATA_JOB_STATUS_READY,
    STRATA_JOB_STATUS_STANDBY,
    STRATA_JOB_STATUS_WAITING,
    STRATA_JOB_STATUS_PENDING,
    STRATA_JOB_STATUS_ABORTING,
    STRATA_JOB_STATUS_CONCLUDED,
    STRATA_JOB_STATUS_NULL,
    STRATA_JOB_STATUS__MAX,
} StrataJobStatus;

/* QEMU's JobVerb. */
typedef enum {
    STRATA_JOB_VERB_CANCEL,
    STRATA_JOB_VERB_PAUSE,
    STRATA_JOB_VERB_RESUME,
    STRATA_JOB_VERB_SET_SPEED,
    STRATA_JOB_VERB_COMPLETE,
    STRATA_JOB_VERB_FINALIZE,
    STRATA_JOB_VERB_DISMISS,
    STRATA_JOB_VERB__MAX,
} StrataJobVerb;

/* BlockdevOnError. */
typedef enum {
    STRATA_ON_ERROR_REPORT,
    STRATA_ON_ERROR_IGNORE,
    STRATA_ON_ERROR_ENOSPC,
    STRATA_ON_ERROR_STOP,
    STRATA_ON_ERROR_AUTO,
} StrataOnError;

/* What a failed request leads to (BLOCK_JOB_ERROR's "action"). */
typedef enum {
    STRATA_ERROR_ACTION_REPORT,
    STRATA_ERROR_ACTION_IGNORE,
    STRATA_ERROR_ACTION_STOP,
} StrataErrorAction;

typedef struct StrataJob StrataJob;

typedef struct StrataJobDriver {
    const char *type;       /* JobType: "stream", "commit", "create" */
    size_t instance_size;   /* bytes allocated (zeroed) for the job */
    /* Listed by query-block-jobs, emits BLOCK_JOB_*, has a speed. */
    bool is_block_job;

    /* Coroutine.  The work: 0 or -errno with @error set (the text goes
     * into BLOCK_JOB_COMPLETED and query-jobs).  Calls
     * strata_job_co_pause_point() between chunks.  Required. */
    int (*co_run)(StrataJob *job, GError **error);
    /* Loop, after a successful run, at finalize.  May fail: the job
     * then aborts.  NULL: nothing to prepare. */
    bool (*prepare)(StrataJob *job, GError **error);
    /* Loop.  The job succeeded: apply what prepare made ready. */
    void (*commit)(StrataJob *job);
    /* Loop.  The job failed or was cancelled: undo what is undoable. */
    void (*abort)(StrataJob *job);
    /* Loop.  Always, after commit or abort: release what the job holds. */
    void (*clean)(StrataJob *job);
    /* Loop.  Frees the driver's own members (before the job is freed). */
    void (*free)(StrataJob *job);
    /* Loop.  block-job-complete / job-complete in READY; NULL: the job
     * type does not support completion. */
    bool (*complete)(StrataJob *job, GError **error);
    /* A cancel without force while READY ends the job successfully
     * (mirror): co_run sees job->cancelled with !job->force_cancel. */
    bool soft_cancel;
    /* Loop.  Adds the driver's own members to the job's
     * x-strata-query-jobs entry (a JobInfo); NULL: none. */
    void (*query)(StrataJob *job, JsonObject *info);
} StrataJobDriver;

struct StrataJob {
    const StrataJobDriver *drv;
    StrataContext *ctx;
    char *id;
    int refcnt;
    StrataJobStatus status;

    StrataCoroutine *co;
    bool started;
    bool busy;              /* the coroutine runs (not asleep, not paused) */
    bool paused;            /* parked at a pause point */
    int pause_count;        /* > 0: park at the next pause point */
    bool user_paused;       /* paused by a verb or an on-error stop */
    bool cancelled;
    bool force_cancel;
    bool deferred;          /* co_run returned; completion is queued */
    bool finalized;
    bool auto_finalize, auto_dismiss;
    int ret;
    char *error;            /* message of a failed or cancelled job */

    uint64_t progress_current, progress_total;
    uint64_t speed;
    StrataRateLimit limit;
    StrataOnError on_error;
    const char *io_status;  /* "ok", "failed", "nospace" */

    StrataTimer *sleep_timer;
    GPtrArray *nodes;       /* nodes the job works on (a ref each) */
    StrataNode *filter;     /* the job's filter node, while it lives */
    GList *link_in_ctx;
};

/* Whether @id is acceptable as a job id: a node name's rules. */
bool strata_job_id_check(const char *id, GError **error);

/* Returns: (transfer none) (nullable): the job called @id. */
StrataJob *strata_job_find(StrataContext *ctx, const char *id);

/**
 * strata_job_busy_check:
 *
 * Fails with QEMU's "Node 'x' is busy: block device is in use by block
 * job: stream" when a job already works on @node.
 */
bool strata_job_busy_check(StrataContext *ctx, StrataNode *node,
                           GError **error);

/**
 * strata_job_new:
 * @id: checked and made unique in @ctx
 * @speed: bytes/s, 0 = unlimited (block jobs)
 *
 * Creates a job in state CREATED (emitting JOB_STATUS_CHANGE).  The
 * driver fills in its own members, then calls strata_job_start().
 *
 * Returns: (transfer none) (nullable): the job; the context holds it.
 */
StrataJob *strata_job_new(StrataContext *ctx, const StrataJobDriver *drv,
                          const char *id, int64_t speed,
                          StrataOnError on_error, bool auto_finalize,
                          bool auto_dismiss, GError **error);

/* Keeps @node referenced and marked as in use by the job (busy check)
 * until the job ends. */
void strata_job_add_node(StrataJob *job, StrataNode *node);
bool strata_job_uses_node(StrataJob *job, StrataNode *node);

/* The name a job's filter node is to take (NULL: an automatic one) is
 * valid and free; QEMU's messages otherwise. */
bool strata_job_check_filter_name(StrataContext *ctx, const char *name,
                                  GError **error);

/*
 * Nodes a job reopens read-write for its time (the base of a commit, a
 * stream into an intermediate layer), as QEMU does, and puts back when
 * it ends.  @made holds a reference on each node it lists.
 *
 * strata_job_make_writable: reopens @node read-write unless it is
 * already, and lists it in @made.
 * strata_job_restore_read_only: reopens every node listed read-only
 * again (a failure is logged: the job's result stands) and empties
 * @made.
 */
bool strata_job_make_writable(GPtrArray *made, StrataNode *node,
                              GError **error);
void strata_job_restore_read_only(GPtrArray *made);
/* A list for strata_job_make_writable. (transfer full) */
GPtrArray *strata_job_writable_list_new(void);

/**
 * strata_job_insert_filter:
 * @drv_name: "copy-on-read" (stream), "commit_top" (commit) or
 *   "mirror_top" (mirror, active commit)
 * @name: (nullable): filter-node-name; NULL: a generated name
 *
 * Puts a filter node above @node for the job's lifetime, as QEMU does:
 * every parent of @node (backends, exports, overlays) then reaches it
 * through the filter, which query-named-block-nodes lists.  The job
 * removes it after its clean step, before BLOCK_JOB_COMPLETED.
 */
bool strata_job_insert_filter(StrataJob *job, const char *drv_name,
                              StrataNode *node, const char *name,
                              bool read_only, GError **error);

/* ---- the copy-on-read filter (job-filters.c) ---- */

/* Reads @bytes at @offset of @top's backing chain into @buf (zeroes past
 * the backing file's end, or without one).  Coroutine. */
int strata_cor_co_read_backing(StrataNode *top, uint64_t offset,
                               uint64_t bytes, void *buf);

/**
 * strata_cor_co_copy:
 * @base: (nullable): copy only what a layer between @top and @base
 *   (exclusive) holds; NULL: whatever @top does not hold
 * @buf: @bytes long
 * @fill: also read into @buf what is not copied (a guest read)
 * @is_read: (out): on failure, whether the read or the write failed
 *
 * Copy-on-read of one range, in a serialising request on @top: a guest
 * write to the range either lands first (the range is then allocated in
 * @top and stays) or waits until the copy is written, so stale backing
 * data never covers it.  Coroutine; 0 or -errno.
 */
int strata_cor_co_copy(StrataNode *top, StrataNode *base, uint64_t offset,
                       uint64_t bytes, void *buf, bool fill, bool *is_read);

/* Makes the copy-on-read node @filter copy only what the layers down to
 * @bottom (nullable: the whole chain) hold, as its "bottom" option. */
void strata_cor_filter_set_bottom(StrataNode *filter, StrataNode *bottom);

/* Goes RUNNING and enters the coroutine (it runs until it first
 * yields). */
void strata_job_start(StrataJob *job);

/* Drops a job that was created but never started (setup failed). */
void strata_job_early_fail(StrataJob *job);

/* ---- for drivers (coroutine) ---- */

/* Parks the job while a pause is requested; returns at once otherwise. */
void strata_job_co_pause_point(StrataJob *job);
/* Sleeps @ns without blocking the loop (a verb may wake it early), then
 * passes a pause point. */
void strata_job_co_sleep_ns(StrataJob *job, int64_t ns);
/* Accounts @bytes against the speed limit and sleeps as long as the
 * limit says (0: unlimited). */
void strata_job_co_ratelimit(StrataJob *job, uint64_t bytes);
bool strata_job_is_cancelled(StrataJob *job);
/* RUNNING → READY with BLOCK_JOB_READY (mirror). */
void strata_job_transition_to_ready(StrataJob *job);
/* Wakes a job asleep in strata_job_co_sleep_ns() (not a paused one). */
void strata_job_enter(StrataJob *job);
void strata_job_progress_set_total(StrataJob *job, uint64_t total);
void strata_job_progress_add(StrataJob *job, uint64_t bytes);

/**
 * strata_job_error_action:
 * @errnum: the positive errno of the failed request
 *
 * Applies the job's on-error policy: emits BLOCK_JOB_ERROR and, for a
 * stop, pauses the job as a user pause with io-status failed/nospace
 * (it parks at its next pause point; resume retries).
 */
StrataErrorAction strata_job_error_action(StrataJob *job, bool is_read,
                                          int errnum);

/* ---- the copy loop shared by stream and commit (coroutine) ---- */

typedef struct StrataJobCopyOps {
    /* What [@offset, @offset + @bytes) needs: *@pnum (> 0) bytes that
     * need copying (*@copy) or not.  0 or -errno (reported as a read). */
    int (*co_classify)(StrataJob *job, uint64_t offset, uint64_t bytes,
                       uint64_t *pnum, bool *copy);
    /* Copies one range through @buf (@bytes long at least): 0 or -errno,
     * with *@is_read saying which side failed. */
    int (*co_copy)(StrataJob *job, uint64_t offset, uint64_t bytes,
                   void *buf, bool *is_read);
    /* Copies in flight at most; 0: the default (16). */
    unsigned max_tasks;
    /* Optional: the chain the copies read, for read-ahead hints
     * (strata_prefetcher_new's @top, @base and @min_depth). */
    void (*prefetch_chain)(StrataJob *job, StrataNode **top,
                           StrataNode **base, int *min_depth);
} StrataJobCopyOps;

/*
 * The largest copy of a job whose target is in the page cache
 * (strata_node_writes_buffered).  Large copies with many in flight are
 * megabytes of buffers, more than the CPU's caches hold: the copy into
 * the page cache, which the kernel runs one writer at a time per file,
 * then reads each buffer back from memory and costs that writer twice
 * the CPU per byte.  1 GiB through the page cache: a mirror took
 * 1.7-2.1 s with 16 x 1 MiB copies against 1.0 s with 64 KiB (256 KiB:
 * 1.5 s), a stream 1.6-1.7 s with 6 x 512 KiB against 1.0-1.1 s in
 * 64 KiB steps (QSD 1.6-1.8 s).  O_DIRECT targets keep the large
 * copies, which the disk prefers (a direct stream in 64 KiB pieces took
 * 0.96 s against 0.87 s).  Stream and commit keep QEMU's 512 KiB chunk
 * and step through it (strata_job_copy_step): a chunk is what one
 * failure and its BLOCK_JOB_ERROR cover.
 */
#define STRATA_JOB_BUFFERED_CHUNK (64 * 1024)

/* How much of a @bytes copy into @target to do at once: all of it, or
 * STRATA_JOB_BUFFERED_CHUNK through the start of the buffer when the
 * target is in the page cache (a copy still fails, and is reported, as
 * a whole). */
static inline uint64_t strata_job_copy_step(StrataNode *target,
                                            uint64_t bytes)
{
    return strata_node_writes_buffered(target)
           ? MIN(bytes, (uint64_t)STRATA_JOB_BUFFERED_CHUNK) : bytes;
}

/**
 * strata_job_co_copy_loop:
 * @len: bytes to walk (the job's total progress)
 * @chunk: largest range copied at once
 * @max_in_flight: buffer space, in chunks; within it, copies of ranges
 *   smaller than a chunk run several per chunk (up to 8)
 *
 * Walks [0, @len) in chunks: skips what @ops->co_classify says needs no
 * copy, honours the speed limit, pause points and cancel between chunks,
 * keeps as many copies going as the buffer space holds, and applies the on-error
 * policy to failed ones (a stopped range is retried after resume).
 *
 * Returns: 0, or the -errno that ends the job (an ignored error too, at
 * the end, as QEMU does).
 */
int strata_job_co_copy_loop(StrataJob *job, const StrataJobCopyOps *ops,
                            uint64_t len, uint64_t chunk,
                            unsigned max_in_flight);

/* ---- verbs (QMP), each checked against the verb table ---- */

bool strata_job_set_speed(StrataJob *job, int64_t speed, GError **error);
bool strata_job_user_pause(StrataJob *job, GError **error);
bool strata_job_user_resume(StrataJob *job, GError **error);
/* @force: a user-paused job is cancelled too (job-cancel always). */
bool strata_job_user_cancel(StrataJob *job, bool force, GError **error);
bool strata_job_complete(StrataJob *job, GError **error);
bool strata_job_finalize(StrataJob *job, GError **error);
bool strata_job_dismiss(StrataJob *job, GError **error);

/* ---- queries ---- */

const char *strata_job_status_name(StrataJobStatus status);
/* (transfer full): BlockJobInfo / JobInfo objects for every job. */
JsonArray *strata_job_query_block_jobs(StrataContext *ctx);
JsonArray *strata_job_query_jobs(StrataContext *ctx);
/* (transfer full): query-jobs' objects plus each driver's query members
 * (x-strata-query-jobs). */
JsonArray *strata_job_query_jobs_detailed(StrataContext *ctx);

/* Whether a job may move from @from to @to (the transition table). */
bool strata_job_transition_allowed(StrataJobStatus from, StrataJobStatus to);
/* Whether @verb is allowed in @status (the verb table). */
bool strata_job_verb_allowed(StrataJobStatus status, StrataJobVerb verb);

/* Cancels every job and runs the loop until they are gone (context
 * teardown, quit). */
void strata_job_cancel_all_sync(StrataContext *ctx);

/* ---- stream.c, commit.c, create-job.c: QMP-shaped entry points ---- */

/* @args: block-stream's arguments, validated by the schema. */
bool strata_stream_start(StrataContext *ctx, JsonObject *args,
                         GError **error);
/* @args: block-commit's arguments. */
bool strata_commit_start(StrataContext *ctx, JsonObject *args,
                         GError **error);
/* @args: blockdev-create's arguments. */
bool strata_create_job_start(StrataContext *ctx, JsonObject *args,
                             GError **error);

/* Helpers for the jobs' start functions (job.c). */
/* A string member of a command's arguments, NULL when absent. */
const char *strata_job_arg_str(JsonObject *args, const char *name);
/* The error policy in member @name of @args (report when absent); a value
 * QEMU does not know is refused, naming the parameter. */
bool strata_job_parse_on_error(JsonObject *args, const char *name,
                               StrataOnError *out, GError **error);

#ifdef __cplusplus
}
#endif

#endif
