/* strata — the QMP dispatcher: sessions, negotiation, command table,
 * replies and events.
 *
 * A session is one peer's protocol state (a socket client, or the
 * in-process caller of strata_monitor_execute()).  The order of the
 * checks on a request follows QEMU's, so that each malformed request gets
 * the reply QEMU would give: the request's shape first, then the command
 * lookup (which before negotiation only knows qmp_capabilities), then
 * the arguments against the schema, then the handler.
 */
#include <string.h>
#include <sys/time.h>

#include "strata-util.h"
#include "qmp-private.h"
#include "../block/block-private.h"

struct StrataMonitor {
    StrataContext *ctx;
    StrataQmpSchema *schema;
    StrataMonitorEventFunc event_fn;
    void *event_opaque;
    GDestroyNotify event_destroy;
    StrataMonitorQuitFunc quit_fn;
    void *quit_opaque;
    GList *sessions;        /* StrataQmpSession *, events go to these */
    GList *servers;         /* StrataQmpServer * */
    unsigned busy;
    bool quiesced;
    StrataQmpSession self;  /* the in-process session */
    GString *self_out;
    StrataQmpInfoCache *info_cache;
};

static bool cmd_query_version(StrataMonitor *mon, JsonObject *args,
                              JsonNode **ret, GError **error);
static bool cmd_query_commands(StrataMonitor *mon, JsonObject *args,
                               JsonNode **ret, GError **error);
static bool cmd_query_qmp_schema(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error);
static bool cmd_quit(StrataMonitor *mon, JsonObject *args, JsonNode **ret,
                     GError **error);

typedef struct {
    const char *name;
    StrataQmpHandler fn;
} CommandEntry;

/* qmp_capabilities is not here: it changes the session, not the graph,
 * and dispatch handles it itself. */
static const CommandEntry command_table[] = {
    { "query-version", cmd_query_version },
    { "query-commands", cmd_query_commands },
    { "query-qmp-schema", cmd_query_qmp_schema },
    { "quit", cmd_quit },
    { "blockdev-add", strata_qmp_blockdev_add },
    { "blockdev-del", strata_qmp_blockdev_del },
    { "query-named-block-nodes", strata_qmp_query_named_block_nodes },
    { "query-block", strata_qmp_query_block },
    { "x-debug-query-block-graph", strata_qmp_x_debug_query_block_graph },
    { "block_resize", strata_qmp_block_resize },
    { "nbd-server-start", strata_qmp_nbd_server_start },
    { "nbd-server-stop", strata_qmp_nbd_server_stop },
    { "block-export-add", strata_qmp_block_export_add },
    { "block-export-del", strata_qmp_block_export_del },
    { "query-block-exports", strata_qmp_query_block_exports },
    { "block-stream", strata_qmp_block_stream },
    { "block-commit", strata_qmp_block_commit },
    { "blockdev-create", strata_qmp_blockdev_create },
    { "block-job-set-speed", strata_qmp_block_job_set_speed },
    { "block-job-pause", strata_qmp_block_job_pause },
    { "block-job-resume", strata_qmp_block_job_resume },
    { "block-job-cancel", strata_qmp_block_job_cancel },
    { "block-job-complete", strata_qmp_block_job_complete },
    { "block-job-finalize", strata_qmp_block_job_finalize },
    { "block-job-dismiss", strata_qmp_block_job_dismiss },
    { "job-pause", strata_qmp_job_pause },
    { "job-resume", strata_qmp_job_resume },
    { "job-cancel", strata_qmp_job_cancel },
    { "job-complete", strata_qmp_job_complete },
    { "job-finalize", strata_qmp_job_finalize },
    { "job-dismiss", strata_qmp_job_dismiss },
    { "query-block-jobs", strata_qmp_query_block_jobs },
    { "query-jobs", strata_qmp_query_jobs },
    { "blockdev-snapshot-sync", strata_qmp_blockdev_snapshot_sync },
    { "blockdev-snapshot", strata_qmp_blockdev_snapshot },
    { "blockdev-snapshot-internal-sync",
      strata_qmp_blockdev_snapshot_internal_sync },
    { "blockdev-snapshot-delete-internal-sync",
      strata_qmp_blockdev_snapshot_delete_internal_sync },
    { "change-backing-file", strata_qmp_change_backing_file },
    { "transaction", strata_qmp_transaction },
    { "x-strata-blockdev-revert", strata_qmp_x_blockdev_revert },
    { "snapshot-save", strata_qmp_snapshot_save },
    { "snapshot-load", strata_qmp_snapshot_load },
    { "snapshot-delete", strata_qmp_snapshot_delete },
    { "x-strata-query-loop", strata_qmp_x_strata_query_loop },
    { "x-strata-query-jobs", strata_qmp_x_strata_query_jobs },
    { "x-strata-query-node-stats", strata_qmp_x_strata_query_node_stats },
    { "blockdev-reopen", strata_qmp_blockdev_reopen },
    { "blockdev-mirror", strata_qmp_blockdev_mirror },
    { "drive-mirror", strata_qmp_drive_mirror },
    { NULL, NULL },
};

static StrataQmpHandler find_handler(const char *name)
{
    for (const CommandEntry *e = command_table; e->name; e++) {
        if (!strcmp(e->name, name)) {
            return e->fn;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Core commands                                                       */
/* ------------------------------------------------------------------ */

static JsonNode *version_info(void)
{
    JsonObject *qemu = json_object_new();
    JsonObject *v = json_object_new();
    JsonNode *n = json_node_alloc();

    json_object_set_int_member(qemu, "major", STRATA_QMP_QEMU_MAJOR);
    json_object_set_int_member(qemu, "minor", STRATA_QMP_QEMU_MINOR);
    json_object_set_int_member(qemu, "micro", STRATA_QMP_QEMU_MICRO);
    json_object_set_object_member(v, "qemu", qemu);
    json_object_set_string_member(v, "package", "strata " STRATA_VERSION);
    json_node_init_object(n, v);
    json_object_unref(v);
    return n;
}

static bool cmd_query_version(StrataMonitor *mon, JsonObject *args,
                              JsonNode **ret, GError **error)
{
    *ret = version_info();
    return true;
}

static bool cmd_query_commands(StrataMonitor *mon, JsonObject *args,
                               JsonNode **ret, GError **error)
{
    const GPtrArray *names = strata_qmp_schema_commands(mon->schema);
    JsonArray *arr = json_array_new();

    for (guint i = 0; i < names->len; i++) {
        JsonObject *o = json_object_new();
        json_object_set_string_member(o, "name", names->pdata[i]);
        json_array_add_object_element(arr, o);
    }
    *ret = json_node_init_array(json_node_alloc(), arr);
    json_array_unref(arr);
    return true;
}

static bool cmd_query_qmp_schema(StrataMonitor *mon, JsonObject *args,
                                 JsonNode **ret, GError **error)
{
    *ret = strata_qmp_schema_introspect(mon->schema);
    return true;
}

static bool cmd_quit(StrataMonitor *mon, JsonObject *args, JsonNode **ret,
                     GError **error)
{
    /* The session calls the quit function once the reply is out. */
    return true;
}

/* ------------------------------------------------------------------ */
/* Replies                                                             */
/* ------------------------------------------------------------------ */

static void send_node(StrataQmpSession *s, JsonObject *obj)
{
    g_autoptr(JsonNode) n = json_node_alloc();
    g_autofree char *line = NULL;

    json_node_init_object(n, obj);
    line = strata_json_to_string_with(
        n, s->mon ? strata_qmp_info_cache_texts(s->mon->info_cache) : NULL);
    s->send(s, line, s->send_opaque);
}

static void send_error(StrataQmpSession *s, JsonNode *id, const char *cls,
                       const char *desc)
{
    g_autoptr(JsonObject) reply = json_object_new();
    JsonObject *err = json_object_new();

    if (id) {
        json_object_set_member(reply, "id", json_node_copy(id));
    }
    json_object_set_string_member(err, "class", cls);
    json_object_set_string_member(err, "desc", desc);
    json_object_set_object_member(reply, "error", err);
    send_node(s, reply);
}

static void send_gerror(StrataQmpSession *s, JsonNode *id, const GError *e)
{
    send_error(s, id, strata_error_class_name(e), e->message);
}

static void send_return(StrataQmpSession *s, JsonNode *id, JsonNode *ret)
{
    g_autoptr(JsonObject) reply = json_object_new();

    if (!ret) {
        g_autoptr(JsonObject) empty = json_object_new();
        ret = json_node_init_object(json_node_alloc(), empty);
    }
    json_object_set_member(reply, "return", ret);
    if (id) {
        json_object_set_member(reply, "id", json_node_copy(id));
    }
    send_node(s, reply);
}

/* ------------------------------------------------------------------ */
/* Dispatch                                                            */
/* ------------------------------------------------------------------ */

static bool check_capabilities(StrataQmpSession *s, JsonObject *args,
                               GError **error)
{
    JsonArray *enable;

    if (s->negotiated) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_COMMAND_NOT_FOUND,
                    "Capabilities negotiation is already complete, "
                    "command ignored");
        return false;
    }
    enable = json_object_has_member(args, "enable")
        ? json_object_get_array_member(args, "enable") : NULL;
    s->oob = false;
    for (guint i = 0; enable && i < json_array_get_length(enable); i++) {
        /* The schema admits only "oob". */
        s->oob = true;
    }
    s->negotiated = true;
    return true;
}

static bool is_string(JsonNode *n)
{
    return JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_STRING;
}

static void dispatch(StrataQmpSession *s, JsonNode *req)
{
    StrataMonitor *mon = s->mon;
    JsonObject *obj;
    JsonNode *id, *exec = NULL, *exec_oob = NULL, *args_node = NULL;
    JsonObjectIter it;
    const char *key;
    JsonNode *member;
    const char *name;
    g_autoptr(JsonObject) empty_args = NULL;
    JsonObject *args;
    g_autoptr(GError) err = NULL;
    JsonNode *ret = NULL;

    if (!JSON_NODE_HOLDS_OBJECT(req)) {
        send_error(s, NULL, "GenericError",
                   "QMP input must be a JSON object");
        return;
    }
    obj = json_node_get_object(req);
    id = json_object_get_member(obj, "id");

    json_object_iter_init_ordered(&it, obj);
    while (json_object_iter_next_ordered(&it, &key, &member)) {
        if (!strcmp(key, "execute")) {
            if (!is_string(member)) {
                send_error(s, id, "GenericError",
                           "QMP input member 'execute' must be a string");
                return;
            }
            exec = member;
        } else if (!strcmp(key, "exec-oob") && s->oob) {
            if (!is_string(member)) {
                send_error(s, id, "GenericError",
                           "QMP input member 'exec-oob' must be a string");
                return;
            }
            exec_oob = member;
        } else if (!strcmp(key, "arguments")) {
            if (!JSON_NODE_HOLDS_OBJECT(member)) {
                send_error(s, id, "GenericError",
                           "QMP input member 'arguments' must be an object");
                return;
            }
            args_node = member;
        } else if (strcmp(key, "id") != 0) {
            g_autofree char *msg = g_strdup_printf(
                "QMP input member '%s' is unexpected", key);
            send_error(s, id, "GenericError", msg);
            return;
        }
    }
    if (exec && exec_oob) {
        send_error(s, id, "GenericError",
                   "QMP input member 'exec-oob' is unexpected");
        return;
    }
    if (!exec && !exec_oob) {
        send_error(s, id, "GenericError", "QMP input lacks member 'execute'");
        return;
    }
    name = json_node_get_string(exec ? exec : exec_oob);

    /* Before negotiation only qmp_capabilities exists. */
    if (!s->negotiated && strcmp(name, "qmp_capabilities") != 0) {
        send_error(s, id, "CommandNotFound",
                   "Expecting capabilities negotiation with "
                   "'qmp_capabilities'");
        return;
    }
    if (!strata_qmp_schema_has_command(mon->schema, name)) {
        g_autofree char *msg = g_strdup_printf(
            "The command %s has not been found", name);
        send_error(s, id, "CommandNotFound", msg);
        return;
    }
    if (exec_oob) {
        g_autofree char *msg = g_strdup_printf(
            "The command %s does not support OOB", name);
        send_error(s, id, "GenericError", msg);
        return;
    }
    if (args_node) {
        args = json_node_get_object(args_node);
    } else {
        empty_args = json_object_new();
        args = empty_args;
    }
    if (!strata_qmp_schema_check_args(mon->schema, name, args, &err)) {
        send_gerror(s, id, err);
        return;
    }
    if (!strcmp(name, "qmp_capabilities")) {
        if (!check_capabilities(s, args, &err)) {
            send_gerror(s, id, err);
            return;
        }
        send_return(s, id, NULL);
        return;
    }

    StrataQmpHandler fn = find_handler(name);
    if (!fn) {
        g_autofree char *msg = g_strdup_printf(
            "The command %s has not been found", name);
        send_error(s, id, "CommandNotFound", msg);
        return;
    }
    mon->busy++;
    bool ok = fn(mon, args, &ret, &err);
    mon->busy--;
    if (ok) {
        send_return(s, id, ret);
    } else {
        if (ret) {
            json_node_unref(ret);
        }
        send_gerror(s, id, err);
    }
    if (ok && !strcmp(name, "quit")) {
        s->quit_pending = true;
    }
    if (mon->busy == 0) {
        for (GList *l = mon->servers; l; l = l->next) {
            strata_qmp_server_resume(l->data);
        }
    }
}

static void session_input(JsonNode *value, GError *error, void *opaque)
{
    StrataQmpSession *s = opaque;

    if (error) {
        send_error(s, NULL, "GenericError", error->message);
        g_error_free(error);
        return;
    }
    /* After "quit", or once the peer has gone, nothing more is run. */
    if (!s->quit_pending && !s->hung_up) {
        dispatch(s, value);
    }
    json_node_unref(value);
}

void strata_qmp_session_init(StrataQmpSession *s, StrataMonitor *mon,
                             bool negotiated, StrataQmpSendFunc send,
                             void *send_opaque)
{
    memset(s, 0, sizeof(*s));
    s->mon = mon;
    s->negotiated = negotiated;
    s->send = send;
    s->send_opaque = send_opaque;
    s->js = strata_json_stream_new(session_input, s);
    mon->sessions = g_list_prepend(mon->sessions, s);
    s->link = mon->sessions;
}

void strata_qmp_session_cleanup(StrataQmpSession *s)
{
    if (!s->mon) {
        return;
    }
    s->mon->sessions = g_list_delete_link(s->mon->sessions, s->link);
    strata_json_stream_free(s->js);
    s->js = NULL;
    s->mon = NULL;
}

void strata_qmp_session_feed(StrataQmpSession *s, const char *buf,
                             size_t len)
{
    strata_json_stream_feed(s->js, buf, len);
}

char *strata_qmp_greeting(StrataMonitor *mon)
{
    g_autoptr(JsonObject) root = json_object_new();
    JsonObject *qmp = json_object_new();
    JsonArray *caps = json_array_new();
    g_autoptr(JsonNode) n = json_node_alloc();

    json_object_set_member(qmp, "version", version_info());
    json_array_add_string_element(caps, "oob");
    json_object_set_array_member(qmp, "capabilities", caps);
    json_object_set_object_member(root, "QMP", qmp);
    json_node_init_object(n, root);
    return strata_json_to_string(n);
}

/* ------------------------------------------------------------------ */
/* The public monitor                                                  */
/* ------------------------------------------------------------------ */

static void self_send(StrataQmpSession *s, const char *line, void *opaque)
{
    StrataMonitor *mon = opaque;

    g_string_append(mon->self_out, line);
    g_string_append(mon->self_out, "\r\n");
}

StrataMonitor *strata_monitor_new(StrataContext *ctx)
{
    g_autoptr(GError) err = NULL;
    StrataMonitor *mon;
    StrataQmpSchema *schema;

    g_return_val_if_fail(ctx != NULL, NULL);
    schema = strata_qmp_schema_new(&err);
    if (!schema) {
        /* The schema is compiled in: failing to parse it is a bug. */
        g_error("%s", err->message);
    }
    mon = g_new0(StrataMonitor, 1);
    mon->ctx = ctx;
    mon->schema = schema;
    mon->self_out = g_string_new(NULL);
    mon->info_cache = strata_qmp_info_cache_new();
    strata_qmp_session_init(&mon->self, mon, true, self_send, mon);
    strata_qmp_export_events_connect(mon);
    return mon;
}

void strata_monitor_free(StrataMonitor *mon)
{
    if (!mon) {
        return;
    }
    strata_monitor_close_sockets(mon);
    strata_monitor_detach_context(mon);
    strata_qmp_session_cleanup(&mon->self);
    if (mon->event_destroy) {
        mon->event_destroy(mon->event_opaque);
    }
    g_string_free(mon->self_out, TRUE);
    strata_qmp_info_cache_free(mon->info_cache);
    strata_qmp_schema_free(mon->schema);
    g_free(mon);
}

StrataQmpInfoCache *strata_monitor_info_cache(StrataMonitor *mon)
{
    return mon->info_cache;
}

StrataContext *strata_monitor_get_context(StrataMonitor *mon)
{
    g_return_val_if_fail(mon != NULL, NULL);
    return mon->ctx;
}

char *strata_monitor_execute(StrataMonitor *mon, const char *text)
{
    g_return_val_if_fail(mon != NULL, NULL);
    g_return_val_if_fail(text != NULL, NULL);

    g_string_truncate(mon->self_out, 0);
    strata_qmp_session_feed(&mon->self, text, strlen(text));
    /* A trailing number or keyword is complete at the end of @text. */
    strata_json_stream_flush(mon->self.js);
    char *out = g_strdup(mon->self_out->str);
    g_string_truncate(mon->self_out, 0);
    if (mon->self.quit_pending) {
        mon->self.quit_pending = false;
        strata_monitor_quit_done(mon);
    }
    return out;
}

void strata_monitor_set_event_func(StrataMonitor *mon,
                                   StrataMonitorEventFunc fn, void *opaque,
                                   GDestroyNotify destroy)
{
    g_return_if_fail(mon != NULL);
    if (mon->event_destroy) {
        mon->event_destroy(mon->event_opaque);
    }
    mon->event_fn = fn;
    mon->event_opaque = opaque;
    mon->event_destroy = destroy;
}

void strata_monitor_set_quit_func(StrataMonitor *mon,
                                  StrataMonitorQuitFunc fn, void *opaque)
{
    g_return_if_fail(mon != NULL);
    mon->quit_fn = fn;
    mon->quit_opaque = opaque;
}

void strata_monitor_quit_done(StrataMonitor *mon)
{
    if (mon->quit_fn) {
        mon->quit_fn(mon, mon->quit_opaque);
    }
}

void strata_monitor_emit_event(StrataMonitor *mon, const char *name,
                               JsonObject *data)
{
    g_autoptr(JsonObject) ev = json_object_new();
    JsonObject *ts = json_object_new();
    g_autoptr(JsonNode) n = json_node_alloc();
    g_autofree char *line = NULL;
    gint64 now = g_get_real_time();

    g_return_if_fail(mon != NULL);
    g_return_if_fail(name != NULL);

    json_object_set_int_member(ts, "seconds", now / G_USEC_PER_SEC);
    json_object_set_int_member(ts, "microseconds", now % G_USEC_PER_SEC);
    json_object_set_object_member(ev, "timestamp", ts);
    json_object_set_string_member(ev, "event", name);
    if (data) {
        json_object_set_object_member(ev, "data", json_object_ref(data));
    }
    json_node_init_object(n, ev);
    line = strata_json_to_string(n);

    if (mon->event_fn) {
        mon->event_fn(mon, line, mon->event_opaque);
    }
    /* Sending may drop a client that has hung up, which unlinks its
     * session: walk a copy of the list.  Dropping one client never
     * frees another's session. */
    g_autoptr(GPtrArray) targets = g_ptr_array_new();
    for (GList *l = mon->sessions; l; l = l->next) {
        StrataQmpSession *s = l->data;
        /* The in-process session's events go through event_fn. */
        if (s != &mon->self && s->negotiated && !s->hung_up) {
            g_ptr_array_add(targets, s);
        }
    }
    for (guint i = 0; i < targets->len; i++) {
        StrataQmpSession *s = targets->pdata[i];
        s->send(s, line, s->send_opaque);
    }
}

bool strata_monitor_is_busy(StrataMonitor *mon)
{
    return mon->busy > 0 || mon->quiesced;
}

void strata_monitor_quiesce(StrataMonitor *mon)
{
    mon->quiesced = true;
    for (GList *l = mon->servers; l; l = l->next) {
        strata_qmp_server_stop_accepting(l->data);
    }
}

bool strata_monitor_is_quiesced(StrataMonitor *mon)
{
    return mon->quiesced;
}

void strata_monitor_detach_context(StrataMonitor *mon)
{
    if (mon->ctx) {
        strata_qmp_export_events_disconnect(mon);
        mon->ctx = NULL;
    }
}

bool strata_monitor_listen(StrataMonitor *mon, const char *path,
                           GError **error)
{
    StrataQmpServer *srv;

    g_return_val_if_fail(mon != NULL, false);
    g_return_val_if_fail(path != NULL, false);
    srv = strata_qmp_server_new(mon, path, error);
    if (!srv) {
        return false;
    }
    mon->servers = g_list_append(mon->servers, srv);
    return true;
}

void strata_monitor_close_sockets(StrataMonitor *mon)
{
    g_return_if_fail(mon != NULL);
    while (mon->servers) {
        StrataQmpServer *srv = mon->servers->data;
        mon->servers = g_list_delete_link(mon->servers, mon->servers);
        strata_qmp_server_free(srv);
    }
}

unsigned strata_monitor_client_count(StrataMonitor *mon)
{
    unsigned n = 0;

    g_return_val_if_fail(mon != NULL, 0);
    for (GList *l = mon->servers; l; l = l->next) {
        n += strata_qmp_server_client_count(l->data);
    }
    return n;
}
