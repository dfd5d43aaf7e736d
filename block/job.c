/* strata — the job state machine, its verbs, events and queries.
 *
 * The life of a job, as QEMU's: CREATED, RUNNING (the coroutine works;
 * PAUSED or READY/STANDBY on the way), then WAITING and PENDING when the
 * work succeeded, or ABORTING when it failed or was cancelled; at
 * finalize the driver's prepare/commit (or abort) and clean run, the
 * block-job event goes out, CONCLUDED; dismiss makes it NULL and frees
 * it.  Every move goes through job_transition(), which checks the
 * transition table and emits JOB_STATUS_CHANGE; every verb goes through
 * apply_verb(), which checks the verb table.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "job-private.h"
#include "driver.h"
#include "qcow2/qcow2-private.h"

/* ------------------------------------------------------------------ */
/* Tables                                                              */
/* ------------------------------------------------------------------ */

static const char *const status_names[STRATA_JOB_STATUS__MAX] = {
    "undefined", "created", "running", "paused", "ready", "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const verb_names[STRATA_JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize",
    "dismiss",
};

/* transitions[from][to]; columns in status order: U C R P Y S W D X E N */
static const bool transitions[STRATA_JOB_STATUS__MAX][STRATA_JOB_STATUS__MAX] = {
    /* U */ { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
    /* C */ { 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
    /* R */ { 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
    /* P */ { 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
    /* Y */ { 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
    /* S */ { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
    /* W */ { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
    /* D */ { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    /* X */ { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    /* E */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
    /* N */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* verbs[verb][status]; columns: U C R P Y S W D X E N */
static const bool verbs[STRATA_JOB_VERB__MAX][STRATA_JOB_STATUS__MAX] = {
    /* cancel    */ { 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
    /* pause     */ { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    /* resume    */ { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    /* set-speed */ { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    /* complete  */ { 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0 },
    /* finalize  */ { 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
    /* dismiss   */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
};

const char *strata_job_status_name(StrataJobStatus status)
{
    g_return_val_if_fail(status < STRATA_JOB_STATUS__MAX, "undefined");
    return status_names[status];
}

bool strata_job_transition_allowed(StrataJobStatus from, StrataJobStatus to)
{
    g_return_val_if_fail(from < STRATA_JOB_STATUS__MAX, false);
    g_return_val_if_fail(to < STRATA_JOB_STATUS__MAX, false);
    return transitions[from][to];
}

bool strata_job_verb_allowed(StrataJobStatus status, StrataJobVerb verb)
{
    g_return_val_if_fail(status < STRATA_JOB_STATUS__MAX, false);
    g_return_val_if_fail(verb < STRATA_JOB_VERB__MAX, false);
    return verbs[verb][status];
}

static bool apply_verb(StrataJob *job, StrataJobVerb verb, GError **error)
{
    if (strata_job_verb_allowed(job->status, verb)) {
        return true;
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                "Job '%s' in state '%s' cannot accept command verb '%s'",
                job->id, status_names[job->status], verb_names[verb]);
    return false;
}

/* ------------------------------------------------------------------ */
/* Events                                                              */
/* ------------------------------------------------------------------ */

/* The context's event callback carries every block-layer event to the
 * monitor (exports' and jobs'). */
static void emit(StrataJob *job, const char *name, JsonObject *data)
{
    StrataContext *ctx = job->ctx;

    if (ctx->export_event_cb) {
        ctx->export_event_cb(ctx, name, data, ctx->export_event_opaque);
    }
    json_object_unref(data);
}

static void job_transition(StrataJob *job, StrataJobStatus to)
{
    StrataJobStatus from = job->status;
    JsonObject *data;

    if (!transitions[from][to]) {
        g_critical("job '%s': no transition from %s to %s", job->id,
                   status_names[from], status_names[to]);
        return;
    }
    job->status = to;
    if (from == to) {
        return;
    }
    data = json_object_new();
    json_object_set_string_member(data, "status", status_names[to]);
    json_object_set_string_member(data, "id", job->id);
    emit(job, "JOB_STATUS_CHANGE", data);
}

/* BLOCK_JOB_COMPLETED / CANCELLED / READY share these members, in the
 * order QEMU writes them. */
static JsonObject *block_event_data(StrataJob *job)
{
    JsonObject *o = json_object_new();

    json_object_set_string_member(o, "device", job->id);
    json_object_set_int_member(o, "len", job->progress_total);
    json_object_set_int_member(o, "offset", job->progress_current);
    json_object_set_int_member(o, "speed", job->speed);
    json_object_set_string_member(o, "type", job->drv->type);
    return o;
}

static void emit_block_completed(StrataJob *job)
{
    JsonObject *o;

    if (!job->drv->is_block_job) {
        return;
    }
    o = block_event_data(job);
    if (job->cancelled && job->force_cancel) {
        emit(job, "BLOCK_JOB_CANCELLED", o);
        return;
    }
    if (job->ret < 0 && job->error) {
        json_object_set_string_member(o, "error", job->error);
    }
    emit(job, "BLOCK_JOB_COMPLETED", o);
}

/* ------------------------------------------------------------------ */
/* Lookup, creation, references                                        */
/* ------------------------------------------------------------------ */

bool strata_job_id_check(const char *id, GError **error)
{
    size_t len = id ? strlen(id) : 0;
    bool ok = len > 0 && len < 32 && g_ascii_isalpha(id[0]);

    for (size_t i = 1; ok && i < len; i++) {
        ok = g_ascii_isalnum(id[i]) || strchr("-_.", id[i]);
    }
    if (!ok) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid job ID '%s'", id ? id : "");
    }
    return ok;
}

StrataJob *strata_job_find(StrataContext *ctx, const char *id)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    for (GList *l = ctx->jobs; l && id; l = l->next) {
        StrataJob *job = l->data;
        if (!strcmp(job->id, id)) {
            return job;
        }
    }
    return NULL;
}

bool strata_job_uses_node(StrataJob *job, StrataNode *node)
{
    /* Its filter too, without a reference that would keep it listed
     * after the job dropped it. */
    if (node && node == job->filter) {
        return true;
    }
    for (guint i = 0; i < job->nodes->len; i++) {
        if (job->nodes->pdata[i] == node) {
            return true;
        }
    }
    return false;
}

bool strata_job_busy_check(StrataContext *ctx, StrataNode *node,
                           GError **error)
{
    for (GList *l = ctx->jobs; l; l = l->next) {
        StrataJob *job = l->data;
        if (job->status != STRATA_JOB_STATUS_CONCLUDED &&
            job->status != STRATA_JOB_STATUS_NULL &&
            strata_job_uses_node(job, node)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "Node '%s' is busy: block device is in use by "
                        "block job: %s", node->node_name, job->drv->type);
            return false;
        }
    }
    return true;
}

static void job_ref(StrataJob *job)
{
    job->refcnt++;
}

static void job_drop_filter(StrataJob *job);

static void job_unref(StrataJob *job)
{
    if (--job->refcnt > 0) {
        return;
    }
    job_drop_filter(job);
    if (job->drv->free) {
        job->drv->free(job);
    }
    if (job->sleep_timer) {
        strata_timer_free(job->sleep_timer);
    }
    for (guint i = 0; i < job->nodes->len; i++) {
        strata_node_unref(job->nodes->pdata[i]);
    }
    g_ptr_array_free(job->nodes, TRUE);
    g_free(job->error);
    g_free(job->id);
    g_free(job);
}

static void job_timer_cb(void *opaque);

StrataJob *strata_job_new(StrataContext *ctx, const StrataJobDriver *drv,
                          const char *id, int64_t speed,
                          StrataOnError on_error, bool auto_finalize,
                          bool auto_dismiss, GError **error)
{
    StrataJob *job;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(drv != NULL && drv->instance_size >=
                         sizeof(StrataJob), NULL);

    if (!strata_job_id_check(id, error)) {
        return NULL;
    }
    if (strata_job_find(ctx, id)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Job ID '%s' already in use", id);
        return NULL;
    }
    if (speed < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'speed' expects a non-negative value");
        return NULL;
    }
    job = g_malloc0(drv->instance_size);
    job->drv = drv;
    job->ctx = ctx;
    job->id = g_strdup(id);
    job->refcnt = 1;
    job->status = STRATA_JOB_STATUS_UNDEFINED;
    job->auto_finalize = auto_finalize;
    job->auto_dismiss = auto_dismiss;
    job->on_error = on_error;
    job->io_status = "ok";
    job->speed = speed;
    strata_ratelimit_init(&job->limit);
    strata_ratelimit_set_speed(&job->limit, speed);
    job->sleep_timer = strata_timer_new(ctx->loop, job_timer_cb, job);
    job->nodes = g_ptr_array_new();
    ctx->jobs = g_list_append(ctx->jobs, job);
    job->link_in_ctx = g_list_last(ctx->jobs);
    job_transition(job, STRATA_JOB_STATUS_CREATED);
    return job;
}

void strata_job_add_node(StrataJob *job, StrataNode *node)
{
    if (!strata_job_uses_node(job, node)) {
        strata_node_ref(node);
        g_ptr_array_add(job->nodes, node);
    }
}

static void job_remove(StrataJob *job)
{
    if (job->link_in_ctx) {
        job->ctx->jobs = g_list_delete_link(job->ctx->jobs,
                                            job->link_in_ctx);
        job->link_in_ctx = NULL;
    }
}

bool strata_job_insert_filter(StrataJob *job, const char *drv_name,
                              StrataNode *node, const char *name,
                              bool read_only, GError **error)
{
    g_autoptr(JsonObject) o = json_object_new();
    StrataDrainSet *set;
    StrataNode *f;
    bool ok;

    g_return_val_if_fail(job != NULL && node != NULL && !job->filter, false);
    json_object_set_string_member(o, "driver", drv_name);
    if (name) {
        json_object_set_string_member(o, "node-name", name);
    }
    json_object_set_string_member(o, "file", node->node_name);
    json_object_set_boolean_member(o, "read-only", read_only);
    f = strata_node_open(job->ctx, o, false, false, error);
    if (!f) {
        return false;
    }
    set = strata_drain_set_new(job->ctx);
    strata_drain_set_add(set, node);
    strata_drain_set_add(set, f);
    ok = strata_node_move_parents(node, f, error);
    strata_drain_set_free(set);
    if (!ok) {
        strata_child_detach(f->file);
        strata_node_unref(f);
        return false;
    }
    job->filter = f;
    return true;
}

/* Gives the filter's parents back to the node below it and drops it. */
static void job_drop_filter(StrataJob *job)
{
    StrataNode *f = job->filter;
    g_autoptr(GError) err = NULL;

    if (!f) {
        return;
    }
    job->filter = NULL;
    if (f->file) {
        StrataNode *below = f->file->node;
        StrataDrainSet *set;

        strata_node_ref(below);
        set = strata_drain_set_new(job->ctx);

        strata_drain_set_add(set, f);
        strata_drain_set_add(set, below);
        /* The filter's own edge first: it holds what its parents need
         * (a guest's unshared write), which would conflict with those
         * parents arriving on the node below. */
        strata_child_detach(f->file);
        if (!strata_node_move_parents(f, below, &err)) {
            g_warning("job '%s': could not remove its filter node: %s",
                      job->id, err->message);
        }
        strata_drain_set_free(set);
        strata_node_unref(below);
    }
    strata_node_unref(f);
}

void strata_job_early_fail(StrataJob *job)
{
    g_return_if_fail(job != NULL && !job->started);
    if (job->status == STRATA_JOB_STATUS_CREATED) {
        job_transition(job, STRATA_JOB_STATUS_NULL);
    }
    job_remove(job);
    job_unref(job);
}

/* ------------------------------------------------------------------ */
/* The coroutine: entering, sleeping, pausing                          */
/* ------------------------------------------------------------------ */

/* Wakes the coroutine when it is parked (asleep or paused). */
static void job_enter(StrataJob *job)
{
    if (!job->started || job->deferred || job->busy) {
        return;
    }
    strata_timer_del(job->sleep_timer);
    job->busy = true;
    if (strata_in_coroutine()) {
        strata_loop_schedule_co(job->ctx->loop, job->co);
    } else {
        strata_coroutine_enter(job->co);
    }
}

void strata_job_enter(StrataJob *job)
{
    if (!job->paused) {
        job_enter(job);
    }
}

void strata_job_transition_to_ready(StrataJob *job)
{
    job_transition(job, STRATA_JOB_STATUS_READY);
    if (job->drv->is_block_job) {
        emit(job, "BLOCK_JOB_READY", block_event_data(job));
    }
}

static void job_timer_cb(void *opaque)
{
    job_enter(opaque);
}

/* Parks the coroutine until job_enter(); @deadline_ns < 0: no timer. */
static void job_co_do_yield(StrataJob *job, int64_t deadline_ns)
{
    if (deadline_ns >= 0) {
        strata_timer_mod(job->sleep_timer, deadline_ns);
    }
    job->busy = false;
    strata_co_yield();
    job->busy = true;
}

static bool should_pause(StrataJob *job)
{
    return job->pause_count > 0;
}

bool strata_job_is_cancelled(StrataJob *job)
{
    return job->cancelled && job->force_cancel;
}

void strata_job_co_pause_point(StrataJob *job)
{
    StrataJobStatus status;

    if (!should_pause(job) || strata_job_is_cancelled(job)) {
        return;
    }
    status = job->status;
    job_transition(job, status == STRATA_JOB_STATUS_READY
                            ? STRATA_JOB_STATUS_STANDBY
                            : STRATA_JOB_STATUS_PAUSED);
    job->paused = true;
    job_co_do_yield(job, -1);
    job->paused = false;
    job_transition(job, status);
}

void strata_job_co_sleep_ns(StrataJob *job, int64_t ns)
{
    if (!should_pause(job) && !strata_job_is_cancelled(job)) {
        job_co_do_yield(job, strata_clock_ns() + ns);
    }
    strata_job_co_pause_point(job);
}

void strata_job_co_ratelimit(StrataJob *job, uint64_t bytes)
{
    int64_t delay = 0;

    if (job->speed) {
        delay = strata_ratelimit_calculate_delay(&job->limit,
                                                 strata_clock_ns(), bytes);
    }
    if (delay > 0) {
        strata_job_co_sleep_ns(job, delay);
    } else {
        strata_job_co_pause_point(job);
    }
}

void strata_job_progress_set_total(StrataJob *job, uint64_t total)
{
    job->progress_total = total;
}

void strata_job_progress_add(StrataJob *job, uint64_t bytes)
{
    job->progress_current += bytes;
}

static void job_pause(StrataJob *job)
{
    job->pause_count++;
    if (!job->paused) {
        job_enter(job);
    }
}

static void job_resume(StrataJob *job)
{
    if (job->pause_count == 0) {
        return;
    }
    if (--job->pause_count > 0) {
        return;
    }
    /* A job asleep for its speed limit keeps sleeping. */
    if (!strata_timer_pending(job->sleep_timer)) {
        job_enter(job);
    }
}

StrataErrorAction strata_job_error_action(StrataJob *job, bool is_read,
                                          int errnum)
{
    StrataErrorAction action;
    JsonObject *o;

    switch (job->on_error) {
    case STRATA_ON_ERROR_ENOSPC:
    case STRATA_ON_ERROR_AUTO:
        action = errnum == ENOSPC ? STRATA_ERROR_ACTION_STOP
                                  : STRATA_ERROR_ACTION_REPORT;
        break;
    case STRATA_ON_ERROR_STOP:
        action = STRATA_ERROR_ACTION_STOP;
        break;
    case STRATA_ON_ERROR_IGNORE:
        action = STRATA_ERROR_ACTION_IGNORE;
        break;
    case STRATA_ON_ERROR_REPORT:
    default:
        action = STRATA_ERROR_ACTION_REPORT;
        break;
    }
    if (action == STRATA_ERROR_ACTION_STOP) {
        /* A stop is a user pause: resume (or a forced cancel) ends it. */
        if (!job->user_paused) {
            job_pause(job);
            job->user_paused = true;
        }
        job->io_status = errnum == ENOSPC ? "nospace" : "failed";
    }
    o = json_object_new();
    json_object_set_string_member(o, "device", job->id);
    json_object_set_string_member(o, "operation", is_read ? "read" : "write");
    json_object_set_string_member(o, "action",
                                  action == STRATA_ERROR_ACTION_STOP ? "stop"
                                  : action == STRATA_ERROR_ACTION_IGNORE
                                      ? "ignore" : "report");
    emit(job, "BLOCK_JOB_ERROR", o);
    return action;
}

/* ------------------------------------------------------------------ */
/* Completion                                                          */
/* ------------------------------------------------------------------ */

static void job_conclude(StrataJob *job);

static void job_update_rc(StrataJob *job)
{
    if (job->ret == 0 && strata_job_is_cancelled(job)) {
        job->ret = -ECANCELED;
    }
    if (job->ret < 0) {
        if (!job->error) {
            job->error = g_strdup(g_strerror(-job->ret));
        }
        job_transition(job, STRATA_JOB_STATUS_ABORTING);
    }
}

/* commit or abort, clean, the block-job event, CONCLUDED. */
static void job_finalize_single(StrataJob *job)
{
    job_update_rc(job);
    if (job->ret == 0) {
        if (job->drv->commit) {
            job->drv->commit(job);
        }
    } else if (job->drv->abort) {
        job->drv->abort(job);
    }
    if (job->drv->clean) {
        job->drv->clean(job);
    }
    job_drop_filter(job);
    job->finalized = true;
    emit_block_completed(job);
    job_conclude(job);
}

static void job_do_dismiss(StrataJob *job)
{
    job_transition(job, STRATA_JOB_STATUS_NULL);
    job_remove(job);
    job_unref(job);
}

static void job_conclude(StrataJob *job)
{
    job_transition(job, STRATA_JOB_STATUS_CONCLUDED);
    if (job->auto_dismiss || !job->started) {
        job_do_dismiss(job);
    }
}

static void job_do_finalize(StrataJob *job)
{
    g_autoptr(GError) err = NULL;

    if (job->ret == 0 && job->drv->prepare && !job->drv->prepare(job, &err)) {
        job->ret = -EIO;
        g_free(job->error);
        job->error = g_strdup(err ? err->message : "prepare failed");
    }
    job_finalize_single(job);
}

static void job_completed(StrataJob *job)
{
    job_update_rc(job);
    if (job->ret < 0) {
        job_finalize_single(job);
        return;
    }
    job_transition(job, STRATA_JOB_STATUS_WAITING);
    job_transition(job, STRATA_JOB_STATUS_PENDING);
    if (!job->auto_finalize) {
        if (job->drv->is_block_job) {
            JsonObject *o = json_object_new();
            json_object_set_string_member(o, "type", job->drv->type);
            json_object_set_string_member(o, "id", job->id);
            emit(job, "BLOCK_JOB_PENDING", o);
        }
        return;
    }
    job_do_finalize(job);
}

/* Bottom half after co_run returned. */
static void job_exit(void *opaque)
{
    StrataJob *job = opaque;

    /* A cancel may have finished the job meanwhile. */
    if (!job->finalized && job->status != STRATA_JOB_STATUS_PENDING) {
        job_completed(job);
    }
    job_unref(job);
}

static void job_co_entry(void *opaque)
{
    StrataJob *job = opaque;
    g_autoptr(GError) err = NULL;

    job->ret = job->drv->co_run(job, &err);
    if (job->ret < 0 && err) {
        job->error = g_strdup(err->message);
    }
    job->busy = false;
    job->deferred = true;
    job_ref(job);
    strata_loop_call_soon(job->ctx->loop, job_exit, job);
}

void strata_job_start(StrataJob *job)
{
    g_return_if_fail(job != NULL && !job->started);
    job->co = strata_coroutine_new(job_co_entry, job);
    job->started = true;
    job->busy = true;
    job_transition(job, STRATA_JOB_STATUS_RUNNING);
    strata_coroutine_enter(job->co);
}

/* ------------------------------------------------------------------ */
/* Verbs                                                               */
/* ------------------------------------------------------------------ */

bool strata_job_set_speed(StrataJob *job, int64_t speed, GError **error)
{
    uint64_t old = job->speed;

    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_SET_SPEED, error)) {
        return false;
    }
    if (speed < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'speed' expects a non-negative value");
        return false;
    }
    job->speed = speed;
    strata_ratelimit_set_speed(&job->limit, speed);
    /* A faster (or no) limit takes effect now, not after the sleep the
     * old one asked for. */
    if ((speed == 0 || speed > (int64_t)old) &&
        strata_timer_pending(job->sleep_timer)) {
        job_enter(job);
    }
    return true;
}

bool strata_job_user_pause(StrataJob *job, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_PAUSE, error)) {
        return false;
    }
    if (job->user_paused) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "Job is already paused");
        return false;
    }
    job->user_paused = true;
    job_pause(job);
    return true;
}

bool strata_job_user_resume(StrataJob *job, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!job->user_paused || job->pause_count <= 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "Can't resume a job that was not paused");
        return false;
    }
    if (!apply_verb(job, STRATA_JOB_VERB_RESUME, error)) {
        return false;
    }
    job->io_status = "ok";
    job->user_paused = false;
    job_resume(job);
    return true;
}

bool strata_job_user_cancel(StrataJob *job, bool force, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_CANCEL, error)) {
        return false;
    }
    /* Only a job in READY that supports it (mirror) has a soft cancel:
     * it finishes without its graph change.  Every other cancel is
     * forced. */
    if (!job->drv->soft_cancel ||
        (job->status != STRATA_JOB_STATUS_READY &&
         job->status != STRATA_JOB_STATUS_STANDBY)) {
        force = true;
    }
    if (job->user_paused) {
        job->io_status = "ok";
        job->user_paused = false;
        if (job->pause_count > 0) {
            job->pause_count--;
        }
    }
    job->cancelled = true;
    job->force_cancel = job->force_cancel || force;
    if (!job->started) {
        job_completed(job);
    } else if (job->deferred) {
        if (!job->finalized) {
            job_ref(job);
            job_finalize_single(job);
            job_unref(job);
        }
    } else {
        job_enter(job);
    }
    return true;
}

bool strata_job_complete(StrataJob *job, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_COMPLETE, error)) {
        return false;
    }
    if (job->drv->complete) {
        return job->drv->complete(job, error);
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                "Job type %s does not support completion", job->drv->type);
    return false;
}

bool strata_job_finalize(StrataJob *job, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_FINALIZE, error)) {
        return false;
    }
    job_ref(job);
    job_do_finalize(job);
    job_unref(job);
    return true;
}

bool strata_job_dismiss(StrataJob *job, GError **error)
{
    g_return_val_if_fail(job != NULL, false);
    if (!apply_verb(job, STRATA_JOB_VERB_DISMISS, error)) {
        return false;
    }
    job_do_dismiss(job);
    return true;
}

void strata_job_cancel_all_sync(StrataContext *ctx)
{
    g_return_if_fail(ctx != NULL);
    while (ctx->jobs) {
        bool waiting = false;
        for (GList *l = ctx->jobs; l; l = l->next) {
            StrataJob *job = l->data;
            if (job->status == STRATA_JOB_STATUS_CONCLUDED) {
                job_do_dismiss(job);
                waiting = true;
                break;
            }
            if (!job->cancelled && job->status != STRATA_JOB_STATUS_ABORTING) {
                strata_job_user_cancel(job, true, NULL);
                waiting = true;
                break;
            }
        }
        if (!waiting) {
            strata_loop_iterate(ctx->loop, true);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Queries                                                             */
/* ------------------------------------------------------------------ */

JsonArray *strata_job_query_block_jobs(StrataContext *ctx)
{
    JsonArray *arr = json_array_new();

    for (GList *l = ctx->jobs; l; l = l->next) {
        StrataJob *job = l->data;
        JsonObject *o;

        if (!job->drv->is_block_job) {
            continue;
        }
        o = json_object_new();
        json_object_set_boolean_member(o, "auto-finalize", job->auto_finalize);
        json_object_set_string_member(o, "io-status", job->io_status);
        json_object_set_string_member(o, "device", job->id);
        json_object_set_boolean_member(o, "auto-dismiss", job->auto_dismiss);
        json_object_set_boolean_member(o, "busy", job->busy);
        json_object_set_int_member(o, "len", job->progress_total);
        json_object_set_int_member(o, "offset", job->progress_current);
        json_object_set_string_member(o, "status", status_names[job->status]);
        json_object_set_boolean_member(
            o, "paused", job->pause_count > 0 &&
            (job->status == STRATA_JOB_STATUS_PAUSED ||
             job->status == STRATA_JOB_STATUS_STANDBY || job->user_paused));
        json_object_set_int_member(o, "speed", job->speed);
        json_object_set_boolean_member(
            o, "ready", job->status == STRATA_JOB_STATUS_READY ||
            job->status == STRATA_JOB_STATUS_STANDBY);
        json_object_set_string_member(o, "type", job->drv->type);
        if (job->status == STRATA_JOB_STATUS_CONCLUDED && job->ret < 0 &&
            job->error) {
            json_object_set_string_member(o, "error", job->error);
        }
        json_array_add_object_element(arr, o);
    }
    return arr;
}

/* One JobInfo, exactly QEMU's members. */
static JsonObject *job_info(StrataJob *job)
{
    JsonObject *o = json_object_new();

    json_object_set_int_member(o, "current-progress", job->progress_current);
    json_object_set_string_member(o, "status", status_names[job->status]);
    json_object_set_int_member(o, "total-progress", job->progress_total);
    json_object_set_string_member(o, "type", job->drv->type);
    json_object_set_string_member(o, "id", job->id);
    if (job->status == STRATA_JOB_STATUS_CONCLUDED && job->ret < 0 &&
        job->error) {
        json_object_set_string_member(o, "error", job->error);
    }
    return o;
}

JsonArray *strata_job_query_jobs(StrataContext *ctx)
{
    JsonArray *arr = json_array_new();

    for (GList *l = ctx->jobs; l; l = l->next) {
        json_array_add_object_element(arr, job_info(l->data));
    }
    return arr;
}

JsonArray *strata_job_query_jobs_detailed(StrataContext *ctx)
{
    JsonArray *arr = json_array_new();

    for (GList *l = ctx->jobs; l; l = l->next) {
        StrataJob *job = l->data;
        JsonObject *o = job_info(job);

        if (job->drv->query) {
            job->drv->query(job, o);
        }
        json_array_add_object_element(arr, o);
    }
    return arr;
}

/* ------------------------------------------------------------------ */
/* Helpers for the block jobs' start functions                         */
/* ------------------------------------------------------------------ */

const char *strata_job_arg_str(JsonObject *args, const char *name)
{
    return json_object_get_string_member_with_default(args, name, NULL);
}

bool strata_job_parse_on_error(JsonObject *args, const char *name,
                               StrataOnError *out, GError **error)
{
    static const char *const names[] = {
        "report", "ignore", "enospc", "stop", "auto",
    };
    const char *text = strata_job_arg_str(args, name);

    *out = STRATA_ON_ERROR_REPORT;
    if (!text) {
        return true;
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(names); i++) {
        if (!strcmp(text, names[i])) {
            *out = (StrataOnError)i;
            return true;
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Parameter '%s' does not accept value '%s'", name, text);
    return false;
}

/* ------------------------------------------------------------------ */
/* The copy loop                                                       */
/* ------------------------------------------------------------------ */

typedef struct CopyLoop CopyLoop;

typedef struct CopyTask {
    CopyLoop *cl;
    uint64_t offset, bytes;
    void *buf;
    uint64_t slots;         /* the buffer's slots in the arena */
    int ret;
    bool is_read;
} CopyTask;

struct CopyLoop {
    StrataJob *job;
    const StrataJobCopyOps *ops;
    uint64_t chunk;
    unsigned in_flight;
    StrataCoQueue wait;
    GQueue failed;          /* CopyTask *, finished with an error */
    GQueue retry;           /* CopyTask *, stopped, to copy again */
    uint8_t *arena;         /* buffer space, mmapped on first use */
    size_t slot, nslots;
    uint64_t used;          /* a bit per slot in use */
    bool nomem;
    StrataPrefetcher *pf;   /* reads ahead of the copies; nullable */
    uint64_t started;       /* bytes of the copies started */
};

/*
 * The copies' buffers come from one arena of max_in_flight chunks, cut
 * into slots of an eighth of a chunk: a copy takes the slots its range
 * needs, so many small copies (a layer's extents are often one cluster)
 * run at once within the same memory as a few big ones.  The arena is
 * made once per job: a chunk is far above malloc's mmap threshold, so a
 * buffer per copy would be a mmap, a page fault per page and a munmap
 * each time, or (once glibc raises its threshold) heap that outlives
 * the job.  Page alignment suits O_DIRECT on every node below.
 */
/* Copies in flight at most, whatever their size, unless the job asks
 * for another number: each is a coroutine whose stack, like the slots it
 * fills, stays in the daemon's peak memory.  Sixteen keep the disk busy
 * for a stream, whose reads and writes compete for it; a commit's small
 * extents want more (see commit.c). */
#define COPY_MAX_TASKS 16

static void copy_arena_init(CopyLoop *cl, unsigned max_in_flight)
{
    cl->slot = cl->chunk % (8 * 4096) == 0 ? cl->chunk / 8 : cl->chunk;
    cl->nslots = MIN((size_t)max_in_flight * (cl->chunk / cl->slot),
                     (size_t)64);
    cl->nslots = MAX(cl->nslots, cl->chunk / cl->slot);
}

static void *copy_buf_get(CopyLoop *cl, CopyTask *t)
{
    size_t k = (size_t)((t->bytes + cl->slot - 1) / cl->slot);
    uint64_t mask = k >= 64 ? UINT64_MAX : (1ull << k) - 1;

    if (!cl->arena) {
        void *p = mmap(NULL, cl->slot * cl->nslots, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            cl->nomem = true;
            return NULL;
        }
        cl->arena = p;
    }
    for (size_t i = 0; i + k <= cl->nslots; i++) {
        if (!(cl->used & (mask << i))) {
            t->slots = mask << i;
            cl->used |= t->slots;
            return cl->arena + i * cl->slot;
        }
    }
    return NULL;
}

static void copy_task_co(void *opaque)
{
    CopyTask *t = opaque;
    CopyLoop *cl = t->cl;

    t->is_read = true;
    t->ret = cl->ops->co_copy(cl->job, t->offset, t->bytes, t->buf,
                              &t->is_read);
    cl->used &= ~t->slots;
    t->buf = NULL;
    cl->in_flight--;
    if (t->ret < 0) {
        g_queue_push_tail(&cl->failed, t);
    } else {
        strata_job_progress_add(cl->job, t->bytes);
        g_free(t);
    }
    strata_co_queue_next(&cl->wait);
}

static void copy_wait_one(CopyLoop *cl)
{
    strata_co_queue_wait(&cl->wait, NULL);
}

/* The prefetcher handed a batch over: the loop may wait for it. */
static void copy_prefetch_wake(void *opaque)
{
    CopyLoop *cl = opaque;

    strata_co_queue_restart_all(&cl->wait);
}

/* Extends a range of @n bytes at @offset that needs copying over the
 * ranges after it that need copying too, up to a chunk: the layers'
 * extents (often a cluster or two) are far smaller than a chunk, and
 * the copy reads whatever layer holds each part.  What the lookahead
 * finds not to need a copy is classified again by the caller. */
static uint64_t copy_extend(CopyLoop *cl, uint64_t offset, uint64_t n,
                            uint64_t len)
{
    while (n < cl->chunk && offset + n < len) {
        uint64_t m = 0;
        bool more = false;

        if (cl->ops->co_classify(cl->job, offset + n,
                                 MIN(cl->chunk - n, len - offset - n), &m,
                                 &more) < 0 || !more || m == 0) {
            break;
        }
        n += MIN(m, cl->chunk - n);
    }
    return n;
}

int strata_job_co_copy_loop(StrataJob *job, const StrataJobCopyOps *ops,
                            uint64_t len, uint64_t chunk,
                            unsigned max_in_flight)
{
    CopyLoop cl = { .job = job, .ops = ops, .chunk = chunk };
    unsigned max_tasks = ops->max_tasks ? ops->max_tasks : COPY_MAX_TASKS;
    uint64_t offset = 0;
    int error = 0;
    bool stop = false;

    g_return_val_if_fail(chunk > 0 && max_in_flight > 0, -EINVAL);
    strata_co_queue_init(&cl.wait);
    g_queue_init(&cl.failed);
    g_queue_init(&cl.retry);
    copy_arena_init(&cl, max_in_flight);
    strata_job_progress_set_total(job, len);
    if (ops->prefetch_chain) {
        StrataNode *top = NULL, *base = NULL;
        int min_depth = 0;

        ops->prefetch_chain(job, &top, &base, &min_depth);
        cl.pf = strata_prefetcher_new(top, base, min_depth,
                                      copy_prefetch_wake, &cl);
    }

    for (;;) {
        CopyTask *t;
        uint64_t n = 0;
        bool copy = false;

        while ((t = g_queue_pop_head(&cl.failed))) {
            StrataErrorAction a = strata_job_error_action(job, t->is_read,
                                                          -t->ret);
            if (a == STRATA_ERROR_ACTION_STOP) {
                g_queue_push_tail(&cl.retry, t);
                continue;
            }
            if (!error) {
                error = t->ret;
            }
            if (a == STRATA_ERROR_ACTION_IGNORE) {
                strata_job_progress_add(job, t->bytes);
            } else {
                stop = true;
            }
            g_free(t);
        }
        if (stop || strata_job_is_cancelled(job)) {
            break;
        }
        if (g_queue_is_empty(&cl.retry) && offset >= len) {
            if (cl.in_flight == 0) {
                if (g_queue_is_empty(&cl.failed)) {
                    break;
                }
                continue;
            }
            copy_wait_one(&cl);
            continue;
        }

        t = g_queue_pop_head(&cl.retry);
        if (!t) {
            int ret = ops->co_classify(job, offset, MIN(chunk, len - offset),
                                       &n, &copy);
            if (ret < 0) {
                StrataErrorAction a = strata_job_error_action(job, true,
                                                              -ret);
                if (a == STRATA_ERROR_ACTION_STOP) {
                    strata_job_co_pause_point(job);
                    continue;
                }
                if (!error) {
                    error = ret;
                }
                if (a == STRATA_ERROR_ACTION_REPORT) {
                    break;
                }
                n = MIN(chunk, len - offset);
                strata_job_progress_add(job, n);
                offset += n;
                continue;
            }
            if (n == 0) {
                n = len - offset;
                copy = false;
            }
            n = MIN(n, len - offset);
            if (!copy) {
                strata_job_progress_add(job, n);
                offset += n;
                strata_job_co_pause_point(job);
                continue;
            }
            n = copy_extend(&cl, offset, n, len);
            t = g_new0(CopyTask, 1);
            t->cl = &cl;
            t->offset = offset;
            t->bytes = n;
            offset += n;
        }
        /* The speed limit is a pause point too; a cancel or a stop
         * may arrive while the job sleeps. */
        strata_job_co_ratelimit(job, t->bytes);
        if (strata_job_is_cancelled(job)) {
            g_free(t);
            break;
        }
        while ((cl.in_flight >= max_tasks ||
                !(t->buf = copy_buf_get(&cl, t))) &&
               !cl.nomem && cl.in_flight > 0) {
            copy_wait_one(&cl);
        }
        if (!t->buf) {
            g_free(t);
            error = error ? error : -ENOMEM;
            break;
        }
        strata_prefetcher_co_step(cl.pf, t->offset, len, cl.started);
        cl.started += t->bytes;
        cl.in_flight++;
        strata_coroutine_enter(strata_coroutine_new(copy_task_co, t));
    }

    /* Never return with copies (or hints) still running: they use the
     * job. */
    while (cl.in_flight > 0 || strata_prefetcher_busy(cl.pf)) {
        copy_wait_one(&cl);
    }
    strata_prefetcher_free(cl.pf);
    g_queue_clear_full(&cl.failed, g_free);
    g_queue_clear_full(&cl.retry, g_free);
    if (cl.arena) {
        munmap(cl.arena, cl.slot * cl.nslots);
    }
    if (strata_job_is_cancelled(job)) {
        return error ? error : -ECANCELED;
    }
    return error;
}

/* ------------------------------------------------------------------ */
/* Nodes made writable for a job                                       */
/* ------------------------------------------------------------------ */

GPtrArray *strata_job_writable_list_new(void)
{
    return g_ptr_array_new_with_free_func(
        (GDestroyNotify)strata_node_unref);
}

bool strata_job_make_writable(GPtrArray *made, StrataNode *node,
                              GError **error)
{
    g_return_val_if_fail(made != NULL && node != NULL, false);

    if (!node->read_only) {
        return true;
    }
    if (!strata_node_set_read_only(node, false, error)) {
        return false;
    }
    strata_node_ref(node);
    g_ptr_array_add(made, node);
    return true;
}

void strata_job_restore_read_only(GPtrArray *made)
{
    for (guint i = 0; made && i < made->len; i++) {
        StrataNode *n = made->pdata[i];
        g_autoptr(GError) err = NULL;

        if (!strata_node_set_read_only(n, true, &err)) {
            g_warning("could not make '%s' read-only again after the "
                      "job: %s", n->node_name, err->message);
        }
    }
    if (made) {
        g_ptr_array_set_size(made, 0);
    }
}

bool strata_job_check_filter_name(StrataContext *ctx, const char *name,
                                  GError **error)
{
    if (!name) {
        return true;
    }
    if (!strata_node_name_check(name, error)) {
        return false;
    }
    if (strata_context_lookup(ctx, name)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Duplicate nodes with node-name='%s'", name);
        return false;
    }
    return true;
}
