/* strata — QMP handlers for jobs: block-stream, block-commit,
 * blockdev-create, the block-job-* and job-* verbs and the job queries;
 * the work is done by block/job.c and the job drivers. */
#include <string.h>

#include "strata-util.h"
#include "qmp-private.h"
#include "../block/block-private.h"
#include "../block/job-private.h"
#include "../block/mirror-private.h"

static StrataContext *ctx_of(StrataMonitor *mon)
{
    return strata_monitor_get_context(mon);
}

/* The legacy commands name a block job by its id ("device"). */
static StrataJob *find_block_job(StrataMonitor *mon, const char *id,
                                 GError **error)
{
    StrataJob *job = strata_job_find(ctx_of(mon), id);

    if (!job || !job->drv->is_block_job) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_DEVICE_NOT_ACTIVE,
                    "Block job '%s' not found", id);
        return NULL;
    }
    return job;
}

static StrataJob *find_job(StrataMonitor *mon, const char *id,
                           GError **error)
{
    StrataJob *job = strata_job_find(ctx_of(mon), id);

    if (!job) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Job not found");
    }
    return job;
}

static const char *arg(JsonObject *args, const char *name)
{
    return json_object_get_string_member_with_default(args, name, NULL);
}

bool strata_qmp_block_stream(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    return strata_stream_start(ctx_of(mon), args, error);
}

bool strata_qmp_block_commit(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    return strata_commit_start(ctx_of(mon), args, error);
}

bool strata_qmp_blockdev_create(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    return strata_create_job_start(ctx_of(mon), args, error);
}

bool strata_qmp_block_job_set_speed(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "device"), error);

    return job && strata_job_set_speed(
        job, json_object_get_int_member(args, "speed"), error);
}

bool strata_qmp_block_job_pause(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "device"), error);

    return job && strata_job_user_pause(job, error);
}

bool strata_qmp_block_job_resume(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "device"), error);

    return job && strata_job_user_resume(job, error);
}

bool strata_qmp_block_job_cancel(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    const char *id = arg(args, "device");
    bool force = json_object_get_boolean_member_with_default(args, "force",
                                                             false);
    StrataJob *job = find_block_job(mon, id, error);

    if (!job) {
        return false;
    }
    if (job->user_paused && !force) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_FAILED,
                    "The block job for device '%s' is currently paused", id);
        return false;
    }
    return strata_job_user_cancel(job, force, error);
}

bool strata_qmp_block_job_complete(StrataMonitor *mon, JsonObject *args,
                                   JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "device"), error);

    return job && strata_job_complete(job, error);
}

bool strata_qmp_block_job_finalize(StrataMonitor *mon, JsonObject *args,
                                   JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "id"), error);

    return job && strata_job_finalize(job, error);
}

bool strata_qmp_block_job_dismiss(StrataMonitor *mon, JsonObject *args,
                                  JsonNode **ret, GError **error)
{
    StrataJob *job = find_block_job(mon, arg(args, "id"), error);

    return job && strata_job_dismiss(job, error);
}

bool strata_qmp_job_pause(StrataMonitor *mon, JsonObject *args,
                          JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_user_pause(job, error);
}

bool strata_qmp_job_resume(StrataMonitor *mon, JsonObject *args,
                           JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_user_resume(job, error);
}

bool strata_qmp_job_cancel(StrataMonitor *mon, JsonObject *args,
                           JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_user_cancel(job, true, error);
}

bool strata_qmp_job_complete(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_complete(job, error);
}

bool strata_qmp_job_finalize(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_finalize(job, error);
}

bool strata_qmp_job_dismiss(StrataMonitor *mon, JsonObject *args,
                            JsonNode **ret, GError **error)
{
    StrataJob *job = find_job(mon, arg(args, "id"), error);

    return job && strata_job_dismiss(job, error);
}

static JsonNode *array_node(JsonArray *arr)
{
    JsonNode *n = json_node_alloc();

    json_node_init_array(n, arr);
    json_array_unref(arr);
    return n;
}

bool strata_qmp_query_block_jobs(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    *ret = array_node(strata_job_query_block_jobs(ctx_of(mon)));
    return true;
}

bool strata_qmp_query_jobs(StrataMonitor *mon, JsonObject *args,
                           JsonNode **ret, GError **error)
{
    *ret = array_node(strata_job_query_jobs(ctx_of(mon)));
    return true;
}

bool strata_qmp_x_strata_query_jobs(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error)
{
    *ret = array_node(strata_job_query_jobs_detailed(ctx_of(mon)));
    return true;
}

bool strata_qmp_blockdev_mirror(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    return strata_blockdev_mirror_start(ctx_of(mon), args, error);
}

bool strata_qmp_drive_mirror(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    return strata_drive_mirror_start(ctx_of(mon), args, error);
}
