/* libFuzzer target: arbitrary bytes into the QMP splitter and dispatcher
 * of an in-process monitor.
 *
 * Every input runs on an empty context whose only driver is null-co
 * (this file replaces the driver table), so nothing touches the file
 * system.
 * Commands that reach outside the process (sockets, image creation,
 * snapshots to new files) are never dispatched: an input that could name
 * one goes through the splitter here first, and only its harmless texts
 * are handed on.  Others go to the monitor byte for byte, in pieces cut
 * where the input says, so that the session's own splitter sees
 * arbitrary stream boundaries.
 *
 * Properties beyond the sanitizers: every reply is one JSON object per
 * line with "return" or "error", and the monitor keeps answering.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <glib.h>

#include "qmp-private.h"
#include "drivers-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- the driver table: null-co only ---- */

const StrataDriver *const strata_driver_table[] = {
    &strata_driver_null_co,
    NULL,
};

const StrataDriver *strata_driver_find(const char *name)
{
    return name && !strcmp(name, strata_driver_null_co.name)
           ? &strata_driver_null_co : NULL;
}

/* Commands that only change or read the in-memory graph. */
static const char *const allowed[] = {
    "qmp_capabilities", "query-version", "query-commands",
    "query-qmp-schema", "query-named-block-nodes", "query-block",
    "x-debug-query-block-graph", "blockdev-add", "blockdev-del",
    "blockdev-reopen", "block_resize", "query-block-exports",
    "query-jobs", "query-block-jobs", NULL,
};

static StrataQmpSchema *schema;
static StrataContext *ctx;

/* Deletes every node the input added, so that the next input starts
 * from an empty graph without paying for a new context (an io_uring
 * and its threads); a context that cannot be emptied is replaced. */
static void reset_context(void)
{
    bool progress = true;

    while (ctx->monitor_nodes && progress) {
        progress = false;
        for (GList *l = ctx->monitor_nodes; l; l = l->next) {
            StrataNode *n = l->data;
            if (strata_context_del_node(ctx, n->node_name, NULL)) {
                progress = true;
                break;
            }
        }
    }
    if (ctx->monitor_nodes || ctx->all_nodes) {
        strata_context_free(ctx);
        ctx = NULL;
    }
}

/* Unknown names are safe too: they answer CommandNotFound. */
static bool name_ok(const char *name)
{
    return g_strv_contains(allowed, name) ||
           !strata_qmp_schema_has_command(schema, name);
}

/* Whether the raw bytes can only name harmless commands: no escapes
 * that could spell a name, and no word that is a command outside the
 * allowed list. */
static bool raw_ok(const uint8_t *data, size_t size)
{
    char word[64];
    size_t len = 0;

    for (size_t i = 0; i <= size; i++) {
        char c = i < size ? (char)data[i] : ' ';
        if (c == '\\') {
            return false;
        }
        if (g_ascii_isalnum(c) || c == '-' || c == '_') {
            if (len < sizeof(word) - 1) {
                word[len] = c;
            }
            len++;
            continue;
        }
        if (len > 0 && len < sizeof(word)) {
            word[len] = '\0';
            if (!name_ok(word)) {
                return false;
            }
        }
        len = 0;
    }
    return true;
}

/* Checks the monitor's output: lines of JSON objects. */
static void check_replies(const char *out)
{
    g_auto(GStrv) lines = g_strsplit(out, "\n", -1);

    for (guint i = 0; lines[i]; i++) {
        char *l = lines[i];
        size_t n = strlen(l);
        g_autoptr(JsonNode) v = NULL;

        if (n && l[n - 1] == '\r') {
            l[--n] = '\0';
        }
        if (!n) {
            continue;
        }
        v = strata_json_parse_text(l, NULL);
        if (!v || !JSON_NODE_HOLDS_OBJECT(v)) {
            __builtin_trap();
        }
        JsonObject *o = json_node_get_object(v);
        if (!json_object_has_member(o, "return") &&
            !json_object_has_member(o, "error") &&
            !json_object_has_member(o, "event") &&
            !json_object_has_member(o, "QMP")) {
            __builtin_trap();
        }
    }
}

typedef struct Filter {
    StrataMonitor *mon;
} Filter;

static void filtered_text(JsonNode *value, GError *error, void *opaque)
{
    Filter *f = opaque;
    g_autoptr(JsonNode) v = value;
    g_autofree char *text = NULL;
    g_autofree char *out = NULL;

    if (error) {
        g_error_free(error);
        return;
    }
    if (JSON_NODE_HOLDS_OBJECT(v)) {
        JsonObject *o = json_node_get_object(v);
        for (const char *const *k = (const char *const[]){ "execute",
                                                           "exec-oob",
                                                           NULL };
             *k; k++) {
            JsonNode *n = json_object_get_member(o, *k);
            if (n && JSON_NODE_HOLDS_VALUE(n) &&
                json_node_get_value_type(n) == G_TYPE_STRING &&
                !name_ok(json_node_get_string(n))) {
                return;
            }
        }
    }
    text = strata_json_to_string(v);
    out = strata_monitor_execute(f->mon, text);
    check_replies(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g_autoptr(GError) err = NULL;
    StrataMonitor *mon;

    if (!schema) {
        schema = strata_qmp_schema_new(NULL);
        if (!schema) {
            __builtin_trap();
        }
    }
    if (!ctx) {
        ctx = strata_context_new(NULL, NULL, &err);
        if (!ctx) {
            __builtin_trap();
        }
    }
    mon = strata_monitor_new(ctx);

    if (size > 0 && raw_ok(data + 1, size - 1)) {
        /* Pieces of 1 << (data[0] & 7) bytes; the monitor takes C
         * strings, so a NUL ends a piece early as it would a line. */
        size_t piece = (size_t)1 << (data[0] & 7);
        for (size_t off = 1; off < size; off += piece) {
            size_t n = MIN(piece, size - off);
            g_autofree char *chunk = g_strndup((const char *)data + off, n);
            g_autofree char *out = strata_monitor_execute(mon, chunk);
            check_replies(out);
        }
    } else if (size > 0) {
        Filter f = { mon };
        g_autoptr(StrataJsonStream) js =
            strata_json_stream_new(filtered_text, &f);
        strata_json_stream_feed(js, (const char *)data + 1, size - 1);
        strata_json_stream_flush(js);
    }

    /* Still answering. */
    {
        g_autofree char *out = strata_monitor_execute(
            mon, "{\"execute\": \"qmp_capabilities\"}"
                 "{\"execute\": \"query-version\"}");
        if (!strstr(out, "\"return\"")) {
            __builtin_trap();
        }
    }
    strata_monitor_free(mon);
    reset_context();
    return 0;
}
