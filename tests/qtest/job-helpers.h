/* Helpers shared by the job qtests (stream, commit, mirror): shell
 * commands in the daemon's scratch directory, commands that must succeed
 * or fail, and waiting for job states and events. */
#ifndef STRATA_QTEST_JOB_HELPERS_H
#define STRATA_QTEST_JOB_HELPERS_H

#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"

/* Runs a shell command in the scratch dir; returns its exit status. */
static inline int sh(QTestState *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static inline int sh(QTestState *s, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *full = NULL;
    g_autofree char *out = NULL;
    g_autofree char *err = NULL;
    int status = -1;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    full = g_strdup_printf("cd '%s' && %s", qtest_dir(s), cmd);
    {
        char *argv[] = { "/bin/sh", "-c", full, NULL };
        g_spawn_sync(NULL, argv, NULL, 0, NULL, NULL, &out, &err, &status,
                     NULL);
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        fprintf(stderr, "command failed: %s\n%s%s", cmd, out ? out : "",
                err ? err : "");
        return 1;
    }
    return 0;
}

static inline bool have_qemu_tools(void)
{
    g_autofree char *a = g_find_program_in_path("qemu-img");
    g_autofree char *b = g_find_program_in_path("qemu-io");

    return a && b;
}

static inline void ok(QTestState *s, const char *req)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, req);
    g_autofree char *txt = r ? qtest_to_string(r) : NULL;

    ck_assert_msg(r && qtest_is_return(r), "%s -> %s", req,
                  txt ? txt : "(none)");
}

static inline void fails(QTestState *s, const char *req, const char *cls,
                  const char *desc)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, req);
    g_autofree char *txt = r ? qtest_to_string(r) : NULL;

    ck_assert_msg(r && !qtest_is_return(r), "%s succeeded: %s", req,
                  txt ? txt : "(none)");
    ck_assert_msg(!strcmp(qtest_error_class(r), cls), "%s: class %s", req,
                  qtest_error_class(r));
    ck_assert_msg(!desc || !strcmp(qtest_error_desc(r), desc),
                  "%s: desc '%s', want '%s'", req, qtest_error_desc(r), desc);
}

/* Serves node "top" as the writable NBD export "disk" on nbd.sock in
 * the scratch dir, as a guest's disk. */
static inline void export_top(QTestState *s)
{
    ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(s, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e\", \"node-name\": \"top\", \"name\": "
          "\"disk\", \"writable\": true}}");
}

/* Runs the qemu-io command @cmd through the export "disk" and on the
 * reference image ref.raw alike; 0 when both succeed. */
static inline int guest_io(QTestState *s, const char *cmd)
{
    return sh(s, "qemu-io -f raw -c '%s' 'nbd+unix:///disk?socket=nbd.sock' "
                 ">/dev/null && qemu-io -f raw -c '%s' ref.raw >/dev/null",
              cmd, cmd);
}

static inline JsonObject *data_of(JsonNode *ev)
{
    return json_object_get_object_member(json_node_get_object(ev), "data");
}

/* The next JOB_STATUS_CHANGE must be @status (events in between of other
 * names are dropped, so an out-of-order status fails here). */
static inline void want_status(QTestState *s, const char *id, const char *status)
{
    g_autoptr(JsonNode) ev = qtest_wait_event(s, "JOB_STATUS_CHANGE", 20000);

    ck_assert_msg(ev != NULL, "no JOB_STATUS_CHANGE (want %s)", status);
    ck_assert_str_eq(json_object_get_string_member(data_of(ev), "id"), id);
    ck_assert_str_eq(json_object_get_string_member(data_of(ev), "status"),
                     status);
}

/* Waits until the job reaches @status, whatever comes before. */
static inline void reach_status(QTestState *s, const char *id, const char *status)
{
    for (;;) {
        g_autoptr(JsonNode) ev = qtest_wait_event(s, "JOB_STATUS_CHANGE",
                                                  20000);
        ck_assert_msg(ev != NULL, "job %s never became %s", id, status);
        if (!strcmp(json_object_get_string_member(data_of(ev), "id"), id) &&
            !strcmp(json_object_get_string_member(data_of(ev), "status"),
                    status)) {
            return;
        }
    }
}

static inline JsonNode *want_event(QTestState *s, const char *name)
{
    JsonNode *ev = qtest_wait_event(s, name, 20000);

    ck_assert_msg(ev != NULL, "no %s event", name);
    return ev;
}

/* The name of the node whose driver is @drv in query-named-block-nodes,
 * or NULL. */
static inline char *node_of_driver(QTestState *s, const char *drv)
{
    g_autoptr(JsonNode) r = qtest_qmp(
        s, "{\"execute\": \"query-named-block-nodes\"}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));

    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *n = json_array_get_object_element(a, i);
        if (!strcmp(json_object_get_string_member(n, "drv"), drv)) {
            return g_strdup(json_object_get_string_member(n, "node-name"));
        }
    }
    return NULL;
}

/* The one export of query-block-exports sits on @node. */
static inline void export_is(QTestState *s, const char *node)
{
    JsonNode *r = qtest_qmp(s, "{\"execute\": \"query-block-exports\"}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));

    ck_assert_int_eq(json_array_get_length(a), 1);
    ck_assert_str_eq(json_object_get_string_member(
                         json_array_get_object_element(a, 0), "node-name"),
                     node);
    json_node_unref(r);
}

/* The one job of query-block-jobs. */
static inline JsonObject *block_job(QTestState *s, JsonNode **keep)
{
    JsonNode *r = qtest_qmp(s, "{\"execute\": \"query-block-jobs\"}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));

    ck_assert_int_eq(json_array_get_length(a), 1);
    *keep = r;
    return json_array_get_object_element(a, 0);
}

#endif
