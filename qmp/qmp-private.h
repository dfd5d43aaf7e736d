/* strata — the QMP layer's internals, shared by the files of qmp/. */
#ifndef STRATA_QMP_PRIVATE_H
#define STRATA_QMP_PRIVATE_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-monitor.h"
#include "json-stream-private.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What query-version and the greeting report: the QEMU release whose
 * QMP strata speaks. */
#define STRATA_QMP_QEMU_MAJOR 7
#define STRATA_QMP_QEMU_MINOR 2
#define STRATA_QMP_QEMU_MICRO 0

/* ---- schema.c ---- */

typedef struct StrataQmpSchema StrataQmpSchema;

/* The schema text compiled in from qmp/schema.json (generated). */
extern const char strata_qmp_schema_text[];

/* Returns: (transfer full) (nullable): the compiled-in schema, parsed. */
StrataQmpSchema *strata_qmp_schema_new(GError **error);
/* As above, from any schema text (tests). */
StrataQmpSchema *strata_qmp_schema_new_from_text(const char *text,
                                                 GError **error);
void strata_qmp_schema_free(StrataQmpSchema *schema);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataQmpSchema, strata_qmp_schema_free)

bool strata_qmp_schema_has_command(StrataQmpSchema *schema,
                                   const char *name);
/* Returns: (transfer none): the command names in schema order. */
const GPtrArray *strata_qmp_schema_commands(StrataQmpSchema *schema);

/**
 * strata_qmp_schema_check_args:
 * @args: the command's arguments (an empty object when none were given)
 *
 * Checks @args against the command's declared arguments with QEMU's
 * messages: "Parameter 'x' is unexpected", "Parameter 'x' is missing",
 * "Invalid parameter type for 'x', expected: integer", "Parameter 'x'
 * does not accept value 'y'".  Nothing is changed.
 */
bool strata_qmp_schema_check_args(StrataQmpSchema *schema,
                                  const char *command, JsonObject *args,
                                  GError **error);

/* Returns: (transfer full): the query-qmp-schema answer. */
JsonNode *strata_qmp_schema_introspect(StrataQmpSchema *schema);

/* ---- monitor.c: sessions and dispatch ---- */

typedef struct StrataQmpSession StrataQmpSession;

/* Writes one line (without "\r\n") to the session's peer. */
typedef void (*StrataQmpSendFunc)(StrataQmpSession *s, const char *line,
                                  void *opaque);

struct StrataQmpSession {
    StrataMonitor *mon;
    bool negotiated;
    bool oob;
    bool quit_pending;      /* "quit" was answered on this session */
    bool hung_up;           /* the peer is gone: run nothing more */
    StrataJsonStream *js;
    StrataQmpSendFunc send;
    void *send_opaque;
    GList *link;            /* in mon->sessions */
};

void strata_qmp_session_init(StrataQmpSession *s, StrataMonitor *mon,
                             bool negotiated, StrataQmpSendFunc send,
                             void *send_opaque);
void strata_qmp_session_cleanup(StrataQmpSession *s);
/* Feeds input bytes; runs every command they complete. */
void strata_qmp_session_feed(StrataQmpSession *s, const char *buf,
                             size_t len);
/* Returns: (transfer full): the greeting line. */
char *strata_qmp_greeting(StrataMonitor *mon);

/* Command handlers: @args validated against the schema; on success
 * *@ret may stay NULL for {} . */
typedef bool (*StrataQmpHandler)(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error);

/* Whether a command is running (clients' input waits meanwhile: the
 * block layer may iterate the loop inside a command). */
bool strata_monitor_is_busy(StrataMonitor *mon);
/* Called by the server when a session's quit reply has been sent. */
void strata_monitor_quit_done(StrataMonitor *mon);

/* Shutting down: the sockets stop accepting and no client's input is
 * read any more, but connected clients still receive events (QSD sends
 * BLOCK_EXPORT_DELETED on the way out).  Irreversible. */
void strata_monitor_quiesce(StrataMonitor *mon);
bool strata_monitor_is_quiesced(StrataMonitor *mon);
/* Forgets the context (its events are no longer routed here), so that
 * the context may be freed before the monitor. */
void strata_monitor_detach_context(StrataMonitor *mon);

/* ---- cmd-block.c ---- */

/* What query-named-block-nodes built for each node, kept by the monitor
 * and reused while nothing it was built from has changed. */
typedef struct StrataQmpInfoCache StrataQmpInfoCache;
StrataQmpInfoCache *strata_qmp_info_cache_new(void);
void strata_qmp_info_cache_free(StrataQmpInfoCache *c);
/* Returns: (transfer none) (nullable): the texts of the sealed objects
 * it holds, for strata_json_to_string_with(). */
GHashTable *strata_qmp_info_cache_texts(StrataQmpInfoCache *c);
/* Returns: (transfer none): @mon's. */
StrataQmpInfoCache *strata_monitor_info_cache(StrataMonitor *mon);

bool strata_qmp_blockdev_add(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error);
bool strata_qmp_blockdev_del(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error);
bool strata_qmp_query_named_block_nodes(StrataMonitor *mon,
                                        JsonObject *args, JsonNode **ret,
                                        GError **error);
bool strata_qmp_query_block(StrataMonitor *mon, JsonObject *args,
                            JsonNode **ret, GError **error);
bool strata_qmp_x_debug_query_block_graph(StrataMonitor *mon,
                                          JsonObject *args, JsonNode **ret,
                                          GError **error);
bool strata_qmp_block_resize(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error);
bool strata_qmp_blockdev_reopen(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error);

/* ---- cmd-export.c ---- */

bool strata_qmp_nbd_server_start(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error);
bool strata_qmp_nbd_server_stop(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error);
bool strata_qmp_block_export_add(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error);
bool strata_qmp_block_export_del(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error);
bool strata_qmp_x_strata_query_node_stats(StrataMonitor *mon,
                                          JsonObject *args, JsonNode **ret,
                                          GError **error);
bool strata_qmp_x_strata_query_loop(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error);
bool strata_qmp_query_block_exports(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error);
/* Routes the context's export events (BLOCK_EXPORT_DELETED) to @mon. */
void strata_qmp_export_events_connect(StrataMonitor *mon);
void strata_qmp_export_events_disconnect(StrataMonitor *mon);

/* ---- cmd-job.c ---- */

bool strata_qmp_block_stream(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_commit(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_blockdev_create(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_set_speed(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_pause(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_resume(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_cancel(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_complete(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_blockdev_mirror(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_drive_mirror(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_finalize(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_block_job_dismiss(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_pause(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_resume(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_cancel(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_complete(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_finalize(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_job_dismiss(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_query_block_jobs(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_query_jobs(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_x_strata_query_jobs(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);

/* ---- cmd-snapshot.c ---- */

bool strata_qmp_blockdev_snapshot_sync(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_blockdev_snapshot(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_blockdev_snapshot_internal_sync(StrataMonitor *mon,
        JsonObject *args, JsonNode **ret, GError **error);
bool strata_qmp_blockdev_snapshot_delete_internal_sync(StrataMonitor *mon,
        JsonObject *args, JsonNode **ret, GError **error);
bool strata_qmp_change_backing_file(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_transaction(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_x_blockdev_revert(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_snapshot_save(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_snapshot_load(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);
bool strata_qmp_snapshot_delete(StrataMonitor *mon, JsonObject *args,
        JsonNode **ret, GError **error);

/* ---- server.c ---- */

typedef struct StrataQmpServer StrataQmpServer;

StrataQmpServer *strata_qmp_server_new(StrataMonitor *mon, const char *path,
                                       GError **error);
void strata_qmp_server_free(StrataQmpServer *srv);
unsigned strata_qmp_server_client_count(StrataQmpServer *srv);
/* Clients whose input waited for a command to finish read again. */
void strata_qmp_server_resume(StrataQmpServer *srv);
/* Stops accepting connections (the socket file stays until free). */
void strata_qmp_server_stop_accepting(StrataQmpServer *srv);

#ifdef __cplusplus
}
#endif

#endif
