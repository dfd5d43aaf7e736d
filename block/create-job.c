/* strata — blockdev-create: image creation as a job of type "create".
 *
 * As QEMU's: only JOB_STATUS_CHANGE events, never auto-dismissed, and a
 * failure shows only as the job's error (query-jobs).  The file work is
 * blocking, so it runs on the loop's worker threads.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "job-private.h"
#include "driver.h"
#include "qcow2/qcow2.h"

typedef struct CreateJob {
    StrataJob common;
    char *driver;
    char *filename;
    JsonObject *opts;       /* the BlockdevCreateOptions */
    StrataNode *target;     /* the existing node written, if any (ref) */
    GError *error;          /* from the worker thread */
} CreateJob;

static int create_file(CreateJob *c)
{
    const char *prealloc = json_object_get_string_member_with_default(
        c->opts, "preallocation", "off");
    int64_t size = json_object_get_int_member_with_default(c->opts, "size",
                                                           0);
    int fd, r = 0;

    fd = open(c->filename, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        r = errno;
        g_set_error(&c->error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not create '%s': %s", c->filename, g_strerror(r));
        return -r;
    }
    if (ftruncate(fd, size) < 0) {
        r = errno;
    } else if (strcmp(prealloc, "off") != 0 && size > 0) {
        r = posix_fallocate(fd, 0, size);
    }
    if (!r && fsync(fd) < 0) {
        r = errno;
    }
    close(fd);
    if (r) {
        g_set_error(&c->error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not resize file: %s", g_strerror(r));
        return -r;
    }
    return 0;
}

static int create_thread(void *opaque)
{
    CreateJob *c = opaque;

    if (!strcmp(c->driver, "file")) {
        return create_file(c);
    }
    if (!strata_qcow2_create(NULL, c->filename, c->opts, &c->error)) {
        return -EIO;
    }
    return 0;
}

static int create_co_run(StrataJob *job, GError **error)
{
    CreateJob *c = (CreateJob *)job;
    int ret;

    StrataBackend *hold = NULL;

    strata_job_progress_set_total(job, 1);
    if (c->target) {
        /* Formatting rewrites and resizes the node's file: take those
         * permissions as QEMU's create does, so a node in use by an
         * image is refused rather than overwritten under it. */
        hold = strata_backend_new_full(job->ctx, c->target,
                                       STRATA_PERM_WRITE |
                                       STRATA_PERM_RESIZE,
                                       STRATA_PERM_ALL,
                                       "an unnamed block device", error);
        if (!hold) {
            return -EPERM;
        }
    }
    ret = strata_loop_co_run_in_thread(job->ctx->loop, create_thread, c);
    strata_backend_unref(hold);
    if (ret < 0) {
        if (c->error) {
            g_propagate_error(error, c->error);
            c->error = NULL;
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                        g_strerror(-ret));
        }
        return ret;
    }
    strata_job_progress_add(job, 1);
    return 0;
}

static void create_free(StrataJob *job)
{
    CreateJob *c = (CreateJob *)job;

    g_free(c->driver);
    g_free(c->filename);
    strata_node_unref(c->target);
    if (c->opts) {
        json_object_unref(c->opts);
    }
    g_clear_error(&c->error);
}

static const StrataJobDriver create_driver = {
    .type = "create",
    .instance_size = sizeof(CreateJob),
    .co_run = create_co_run,
    .free = create_free,
};

/* The file a qcow2 create writes: an existing node's, or a nested
 * file definition's. */
static char *qcow2_target(StrataContext *ctx, JsonObject *opts,
                          StrataNode **target, GError **error)
{
    JsonNode *f = json_object_get_member(opts, "file");

    if (f && JSON_NODE_HOLDS_VALUE(f) &&
        json_node_get_value_type(f) == G_TYPE_STRING) {
        const char *name = json_node_get_string(f);
        StrataNode *n = strata_context_lookup(ctx, name);
        if (!n) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='%s' nor node-name='%s'", name,
                        name);
            return NULL;
        }
        n = strata_node_skip_filters(n);
        if (!n->filename || n->drv->is_format) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                        "Node '%s' is not a file node", name);
            return NULL;
        }
        strata_node_ref(n);
        *target = n;
        return g_strdup(n->filename);
    }
    if (f && JSON_NODE_HOLDS_OBJECT(f)) {
        JsonObject *fo = json_node_get_object(f);
        const char *fn = json_object_get_string_member_with_default(
            fo, "filename", NULL);
        if (fn) {
            return g_strdup(fn);
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Parameter 'file' is missing");
    return NULL;
}

bool strata_create_job_start(StrataContext *ctx, JsonObject *args,
                             GError **error)
{
    JsonObject *opts = json_object_get_object_member(args, "options");
    const char *driver = json_object_get_string_member_with_default(
        opts, "driver", "");
    g_autofree char *filename = NULL;
    StrataNode *target = NULL;
    StrataJob *job;
    CreateJob *c;

    if (!strcmp(driver, "file")) {
        filename = g_strdup(json_object_get_string_member_with_default(
            opts, "filename", NULL));
        if (!filename) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'filename' is missing");
            return false;
        }
    } else if (!strcmp(driver, "qcow2")) {
        filename = qcow2_target(ctx, opts, &target, error);
        if (!filename) {
            return false;
        }
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Driver '%s' does not support image creation", driver);
        return false;
    }
    if (!json_object_has_member(opts, "size")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'size' is missing");
        strata_node_unref(target);
        return false;
    }

    job = strata_job_new(ctx, &create_driver,
                         json_object_get_string_member(args, "job-id"), 0,
                         STRATA_ON_ERROR_REPORT, true, false, error);
    if (!job) {
        strata_node_unref(target);
        return false;
    }
    c = (CreateJob *)job;
    c->target = target;
    c->driver = g_strdup(driver);
    c->filename = g_steal_pointer(&filename);
    /* The creation options proper: what names the target is not one. */
    c->opts = json_object_new();
    {
        g_autoptr(GList) members = json_object_get_members(opts);
        for (GList *l = members; l; l = l->next) {
            if (strcmp(l->data, "driver") && strcmp(l->data, "file") &&
                strcmp(l->data, "filename")) {
                json_object_set_member(c->opts, l->data, json_node_copy(
                    json_object_get_member(opts, l->data)));
            }
        }
    }
    strata_job_start(job);
    return true;
}
