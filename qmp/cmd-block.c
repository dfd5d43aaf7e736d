/* strata — QMP handlers for block nodes: add, delete, reopen, query,
 * resize. */
#include <string.h>

#include "strata-util.h"
#include "qmp-private.h"
#include "../block/block-private.h"
#include "../block/driver.h"

static JsonNode *object_node(JsonObject *obj)
{
    JsonNode *n = json_node_alloc();
    json_node_init_object(n, obj);
    json_object_unref(obj);
    return n;
}

static JsonNode *array_node(JsonArray *arr)
{
    JsonNode *n = json_node_alloc();
    json_node_init_array(n, arr);
    json_array_unref(arr);
    return n;
}

/* ---- blockdev-add / blockdev-del ---- */

bool strata_qmp_blockdev_add(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);

    if (!json_object_has_member(args, "node-name")) {
        /* QEMU judges the driver before it asks for the name. */
        JsonNode *d = json_object_get_member(args, "driver");
        if (!d) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'driver' is missing");
            return false;
        }
        if (!JSON_NODE_HOLDS_VALUE(d) ||
            json_node_get_value_type(d) != G_TYPE_STRING) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Invalid parameter type for 'driver', expected: "
                        "string");
            return false;
        }
        if (!strata_driver_find(json_node_get_string(d))) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'driver' does not accept value '%s'",
                        json_node_get_string(d));
            return false;
        }
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'node-name' must be specified for the root node");
        return false;
    }
    return strata_context_add_node(ctx, args, error) != NULL;
}

bool strata_qmp_blockdev_del(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    return strata_context_del_node(strata_monitor_get_context(mon),
                                   json_object_get_string_member(args,
                                                                 "node-name"),
                                   error);
}

/* ---- blockdev-reopen ---- */

bool strata_qmp_blockdev_reopen(StrataMonitor *mon, JsonObject *args,
                                JsonNode **ret, GError **error)
{
    JsonArray *list = json_object_get_array_member(args, "options");
    g_autoptr(GPtrArray) sets = g_ptr_array_new();

    /* The schema made sure every element is an object. */
    for (guint i = 0; i < json_array_get_length(list); i++) {
        g_ptr_array_add(sets, json_array_get_object_element(list, i));
    }
    return strata_node_reopen_multiple(strata_monitor_get_context(mon),
                                       sets, error);
}

/* ---- query-named-block-nodes ---- */

/*
 * What the query answers for a node is built with json-glib once and
 * then reused, together with its text, for as long as every input it was
 * built from is the same: an entry holds those inputs as a key, compared
 * byte for byte on each query.  The driver's own members (which may
 * follow the image file: its allocated size, a dirty flag) are asked for
 * on every query and are part of the key; a backing image enters the key
 * as the object its own entry holds, checked first.
 */
typedef struct {
    GString *key;
    JsonObject *image;      /* sealed */
    JsonObject *info;       /* sealed; its text is in the cache's texts */
    int depth;              /* backing_file_depth */
    uint64_t checked;       /* the query that last found it current */
} InfoEntry;

struct StrataQmpInfoCache {
    GHashTable *entries[2]; /* StrataNode * → InfoEntry *, by flat */
    GHashTable *texts;      /* JsonObject * (an entry's info) → char * */
    uint64_t query;
};

static void info_entry_free(void *p)
{
    InfoEntry *e = p;

    g_string_free(e->key, TRUE);
    json_object_unref(e->image);
    json_object_unref(e->info);
    g_free(e);
}

StrataQmpInfoCache *strata_qmp_info_cache_new(void)
{
    StrataQmpInfoCache *c = g_new0(StrataQmpInfoCache, 1);

    c->texts = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    for (int i = 0; i < 2; i++) {
        c->entries[i] = g_hash_table_new_full(NULL, NULL, NULL,
                                              info_entry_free);
    }
    return c;
}

void strata_qmp_info_cache_free(StrataQmpInfoCache *c)
{
    if (!c) {
        return;
    }
    /* The texts go before the entries whose objects key them. */
    g_hash_table_destroy(c->texts);
    for (int i = 0; i < 2; i++) {
        g_hash_table_destroy(c->entries[i]);
    }
    g_free(c);
}

GHashTable *strata_qmp_info_cache_texts(StrataQmpInfoCache *c)
{
    return c ? c->texts : NULL;
}

static JsonObject *image_info(StrataNode *node, JsonObject *backing_image)
{
    JsonObject *image = json_object_new();
    int64_t len = strata_node_get_length(node);

    /* Every ImageInfo has these; a driver adds its own members. */
    json_object_set_string_member(image, "filename",
                                  node->filename ? node->filename : "");
    json_object_set_string_member(image, "format", node->drv->name);
    json_object_set_int_member(image, "virtual-size", MAX(len, 0));
    if (node->drv->query_image) {
        node->drv->query_image(node, image);
    }
    if (backing_image) {
        json_object_set_object_member(image, "backing-image",
                                      json_object_ref(backing_image));
    }
    return image;
}

static JsonObject *node_info(StrataNode *node, JsonObject *image, int depth)
{
    JsonObject *o = json_object_new();
    JsonObject *cache = json_object_new();
    StrataNode *backing = strata_node_backing(node);

    /* Member order as QSD 7.2 writes it. */
    json_object_set_int_member(o, "iops_rd", 0);
    json_object_set_string_member(o, "detect_zeroes",
                                  node->detect_zeroes ? node->detect_zeroes
                                                      : "off");
    json_object_set_object_member(o, "image", json_object_ref(image));
    json_object_set_int_member(o, "iops_wr", 0);
    json_object_set_boolean_member(o, "ro", node->read_only);
    json_object_set_string_member(o, "node-name", node->node_name);
    json_object_set_int_member(o, "backing_file_depth", depth);
    json_object_set_string_member(o, "drv", node->drv->name);
    json_object_set_int_member(o, "iops", 0);
    json_object_set_int_member(o, "bps_wr", 0);
    json_object_set_int_member(o, "write_threshold", 0);
    if (backing) {
        json_object_set_string_member(o, "backing_file",
                                      backing->filename ? backing->filename
                                                        : "");
    }
    json_object_set_boolean_member(o, "encrypted", false);
    json_object_set_int_member(o, "bps", 0);
    json_object_set_int_member(o, "bps_rd", 0);
    json_object_set_boolean_member(cache, "no-flush", node->cache_no_flush);
    json_object_set_boolean_member(cache, "direct", node->cache_direct);
    json_object_set_boolean_member(cache, "writeback", true);
    json_object_set_object_member(o, "cache", cache);
    json_object_set_string_member(o, "file",
                                  node->filename ? node->filename : "");
    return o;
}

/* Strings end in their NUL (none holds one), NULL is a byte of its own:
 * two keys are equal only if every input is. */
static void key_str(GString *key, const char *str)
{
    if (str) {
        g_string_append_c(key, 's');
        g_string_append_len(key, str, (gssize)strlen(str) + 1);
    } else {
        g_string_append_c(key, 'n');
    }
}

static void key_bytes(GString *key, const void *p, size_t len)
{
    g_string_append_len(key, p, (gssize)len);
}

static InfoEntry *info_entry(StrataQmpInfoCache *c, StrataNode *node,
                             bool flat)
{
    InfoEntry *e = g_hash_table_lookup(c->entries[flat], node);
    StrataNode *backing = strata_node_backing(node);
    InfoEntry *be = NULL;
    JsonObject *backing_image;
    GString *key;
    uint8_t flags[3] = { node->read_only, node->cache_direct,
                         node->cache_no_flush };
    int64_t len = strata_node_get_length(node);

    if (e && e->checked == c->query) {
        return e;
    }
    /* QEMU reports depth 0 and no backing image in a flat query. */
    if (!flat && backing) {
        be = info_entry(c, backing, false);
    }
    backing_image = be ? be->image : NULL;
    key = g_string_sized_new(e ? e->key->len : 256);
    key_str(key, node->node_name);
    key_str(key, node->drv->name);
    key_str(key, node->filename);
    key_str(key, node->detect_zeroes);
    key_bytes(key, flags, sizeof(flags));
    key_bytes(key, &len, sizeof(len));
    key_str(key, backing ? (backing->filename ? backing->filename : "")
                         : NULL);
    key_bytes(key, &backing_image, sizeof(backing_image));
    if (node->drv->query_image) {
        g_autoptr(JsonObject) own = json_object_new();
        g_autoptr(JsonNode) n = json_node_alloc();

        node->drv->query_image(node, own);
        json_node_init_object(n, own);
        strata_json_write(key, n);
    }

    if (e && e->key->len == key->len &&
        memcmp(e->key->str, key->str, key->len) == 0) {
        g_string_free(key, TRUE);
        e->checked = c->query;
        return e;
    }
    if (e) {
        g_hash_table_remove(c->texts, e->info);
        g_hash_table_remove(c->entries[flat], node);
    }
    e = g_new0(InfoEntry, 1);
    e->key = key;
    e->depth = be ? be->depth + 1 : 0;
    e->image = image_info(node, backing_image);
    e->info = node_info(node, e->image, e->depth);
    /* Sealed: nobody can change them under their text. */
    json_object_seal(e->info);
    {
        g_autoptr(JsonNode) n = json_node_alloc();
        json_node_init_object(n, e->info);
        g_hash_table_insert(c->texts, e->info, strata_json_to_string(n));
    }
    e->checked = c->query;
    g_hash_table_insert(c->entries[flat], node, e);
    return e;
}

/* Drops the entries of nodes that are gone (or were not asked for). */
static void info_cache_prune(StrataQmpInfoCache *c, bool flat)
{
    GHashTableIter it;
    InfoEntry *e;

    g_hash_table_iter_init(&it, c->entries[flat]);
    while (g_hash_table_iter_next(&it, NULL, (void **)&e)) {
        if (e->checked != c->query) {
            g_hash_table_remove(c->texts, e->info);
            g_hash_table_iter_remove(&it);
        }
    }
}

bool strata_qmp_query_named_block_nodes(StrataMonitor *mon,
                                        JsonObject *args, JsonNode **ret,
                                        GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);
    StrataQmpInfoCache *c = strata_monitor_info_cache(mon);
    bool flat = json_object_get_boolean_member_with_default(args, "flat",
                                                            FALSE);
    JsonArray *arr = json_array_sized_new(g_list_length(ctx->all_nodes));

    c->query++;
    /* all_nodes is newest first, the order QEMU lists them in. */
    for (GList *l = ctx->all_nodes; l; l = l->next) {
        InfoEntry *e = info_entry(c, l->data, flat);
        json_array_add_object_element(arr, json_object_ref(e->info));
    }
    info_cache_prune(c, flat);
    *ret = array_node(arr);
    return true;
}

/* ---- query-block ---- */

bool strata_qmp_query_block(StrataMonitor *mon, JsonObject *args,
                            JsonNode **ret, GError **error)
{
    /* A daemon has no named backends (guest devices), as QSD. */
    *ret = array_node(json_array_new());
    return true;
}

/* ---- x-strata-query-loop ---- */

bool strata_qmp_x_strata_query_loop(StrataMonitor *mon, JsonObject *args,
                                    JsonNode **ret, GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);
    JsonObject *o = json_object_new();
    const char *reason = strata_loop_fallback_reason(ctx->loop);
    StrataLoopStats st;
    StrataLoopPollStats ps;
    JsonNode *n = json_node_alloc();

    strata_loop_get_stats(ctx->loop, &st);
    json_object_set_string_member(o, "aio-engine",
                                  strata_loop_engine_name(ctx->loop));
    if (reason) {
        json_object_set_string_member(o, "fallback-reason", reason);
    }
    json_object_set_int_member(o, "submits", (gint64)st.submits);
    json_object_set_int_member(o, "sqes", (gint64)st.sqes);
    json_object_set_int_member(o, "completions", (gint64)st.completions);
    json_object_set_int_member(o, "thread-jobs", (gint64)st.thread_jobs);
    strata_loop_get_poll_stats(&ps);
    json_object_set_int_member(o, "poll-max-ns", ps.max_ns);
    json_object_set_int_member(o, "poll-ns", ps.window_ns);
    json_object_set_int_member(o, "poll-hits", (gint64)ps.polled);
    json_object_set_int_member(o, "poll-sleeps", (gint64)ps.slept);
    json_object_set_int_member(o, "poll-rests", (gint64)ps.rests);
    json_node_take_object(json_node_init(n, JSON_NODE_OBJECT), o);
    *ret = n;
    return true;
}

/* ---- x-strata-query-node-stats ---- */

static JsonObject *node_stats(StrataNode *node)
{
    JsonObject *o = json_object_new();

    json_object_set_string_member(o, "node-name", node->node_name);
    json_object_set_string_member(o, "driver", node->drv->name);
    if (node->drv->query_stats) {
        JsonObject *d = json_object_new();
        node->drv->query_stats(node, d);
        json_object_set_object_member(o, "stats", d);
    }
    return o;
}

bool strata_qmp_x_strata_query_node_stats(StrataMonitor *mon,
                                          JsonObject *args, JsonNode **ret,
                                          GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);
    const char *name = json_object_get_string_member_with_default(
        args, "node-name", NULL);
    JsonArray *arr = json_array_new();

    if (name) {
        StrataNode *node = strata_context_find_node(ctx, name);
        if (!node) {
            json_array_unref(arr);
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find node %s", name);
            return false;
        }
        json_array_add_object_element(arr, node_stats(node));
    } else {
        for (GList *l = ctx->all_nodes; l; l = l->next) {
            json_array_add_object_element(arr, node_stats(l->data));
        }
    }
    *ret = array_node(arr);
    return true;
}

/* ---- x-debug-query-block-graph ---- */

static JsonArray *perm_list(uint64_t perm)
{
    static const char *const names[] = {
        "consistent-read", "write", "write-unchanged", "resize",
    };
    JsonArray *arr = json_array_new();

    /* Highest bit first, as QEMU lists them. */
    for (int i = G_N_ELEMENTS(names) - 1; i >= 0; i--) {
        if (perm & (1u << i)) {
            json_array_add_string_element(arr, names[i]);
        }
    }
    return arr;
}

/* The name QEMU shows for @c (see StrataDriver.filter_edge_name). */
static const char *edge_name(StrataChild *c)
{
    if (c->parent_kind == STRATA_PARENT_NODE &&
        c->role == STRATA_CHILD_FILE &&
        ((StrataNode *)c->parent)->drv->filter_edge_name) {
        return ((StrataNode *)c->parent)->drv->filter_edge_name;
    }
    return c->name ? c->name : "";
}

static void add_edge(JsonArray *edges, StrataChild *c, gint64 parent,
                     gint64 child)
{
    JsonObject *e = json_object_new();

    json_object_set_string_member(e, "name", edge_name(c));
    json_object_set_int_member(e, "parent", parent);
    json_object_set_array_member(e, "shared-perm", perm_list(c->shared));
    json_object_set_array_member(e, "perm", perm_list(c->perm));
    json_object_set_int_member(e, "child", child);
    json_array_add_object_element(edges, e);
}

bool strata_qmp_x_debug_query_block_graph(StrataMonitor *mon,
                                          JsonObject *args, JsonNode **ret,
                                          GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);
    g_autoptr(GHashTable) ids = g_hash_table_new(NULL, NULL);
    JsonObject *graph = json_object_new();
    JsonArray *nodes = json_array_new();
    JsonArray *edges = json_array_new();
    guint n_nodes = g_list_length(ctx->all_nodes);
    gint64 next_id;
    GList *l;

    /* Oldest node gets id 1, so ids stay stable as nodes are added. */
    next_id = 1;
    for (l = g_list_last(ctx->all_nodes); l; l = l->prev) {
        g_hash_table_insert(ids, l->data, GINT_TO_POINTER(next_id++));
    }
    (void)n_nodes;
    for (l = ctx->all_nodes; l; l = l->next) {
        StrataNode *node = l->data;
        JsonObject *o = json_object_new();
        json_object_set_string_member(o, "name", node->node_name);
        json_object_set_string_member(o, "type", "block-driver");
        json_object_set_int_member(o, "id",
                                   GPOINTER_TO_INT(g_hash_table_lookup(ids,
                                                                       node)));
        json_array_add_object_element(nodes, o);
    }
    /* Backends and jobs: parents that are not nodes. */
    for (l = ctx->all_nodes; l; l = l->next) {
        StrataNode *node = l->data;
        for (GList *p = node->parents; p; p = p->next) {
            StrataChild *c = p->data;
            if (c->parent_kind == STRATA_PARENT_NODE) {
                continue;
            }
            if (!g_hash_table_contains(ids, c->parent)) {
                JsonObject *o = json_object_new();
                g_hash_table_insert(ids, c->parent,
                                    GINT_TO_POINTER(next_id));
                json_object_set_string_member(o, "name", "");
                json_object_set_string_member(
                    o, "type", c->parent_kind == STRATA_PARENT_BACKEND
                                   ? "block-backend" : "block-job");
                json_object_set_int_member(o, "id", next_id++);
                json_array_add_object_element(nodes, o);
            }
        }
    }
    for (l = ctx->all_nodes; l; l = l->next) {
        StrataNode *node = l->data;
        gint64 child_id = GPOINTER_TO_INT(g_hash_table_lookup(ids, node));
        for (GList *p = node->parents; p; p = p->next) {
            StrataChild *c = p->data;
            add_edge(edges, c,
                     GPOINTER_TO_INT(g_hash_table_lookup(ids, c->parent)),
                     child_id);
        }
    }
    json_object_set_array_member(graph, "edges", edges);
    json_object_set_array_member(graph, "nodes", nodes);
    *ret = object_node(graph);
    return true;
}

/* ---- block_resize ---- */

typedef struct {
    StrataNode *node;
    uint64_t size;
    GError *error;
    int ret;
} ResizeCo;

static void resize_co(void *opaque)
{
    ResizeCo *r = opaque;

    r->ret = strata_node_co_truncate(r->node, r->size, false, &r->error);
    if (r->ret >= 0) {
        strata_node_co_refresh_length(r->node);
    }
}

bool strata_qmp_block_resize(StrataMonitor *mon, JsonObject *args,
                             JsonNode **ret, GError **error)
{
    StrataContext *ctx = strata_monitor_get_context(mon);
    const char *device = json_object_get_string_member_with_default(
        args, "device", NULL);
    const char *node_name = json_object_get_string_member_with_default(
        args, "node-name", NULL);
    gint64 size = json_object_get_int_member(args, "size");
    StrataNode *node = node_name ? strata_context_lookup(ctx, node_name)
                                 : NULL;
    ResizeCo r = { 0 };

    /* A daemon has no backend names, so only node-name can match. */
    if (!node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot find device='%s' nor node-name='%s'",
                    device ? device : "", node_name ? node_name : "");
        return false;
    }
    if (size < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'size' expects a >0 size");
        return false;
    }
    if (size % 512) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "The new size must be a multiple of 512");
        return false;
    }
    if (node->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Block node is read-only");
        return false;
    }
    /* QEMU resizes through a temporary backend that needs 'resize'; a
     * parent that does not share it refuses, in QEMU's words. */
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (!(c->shared & STRATA_PERM_RESIZE)) {
            g_autofree char *who = NULL;
            if (c->parent_kind == STRATA_PARENT_NODE) {
                who = g_strdup_printf("node '%s'",
                                      ((StrataNode *)c->parent)->node_name);
            } else {
                who = g_strdup(c->parent_desc ? c->parent_desc
                                              : "a block device");
            }
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                        "Permission conflict on node '%s': permissions "
                        "'resize' are both required by an unnamed block "
                        "device (uses node '%s' as 'root' child) and "
                        "unshared by %s (uses node '%s' as '%s' child).",
                        node->node_name, node->node_name, who,
                        node->node_name, c->name ? c->name : "");
            return false;
        }
    }
    if (!node->drv->co_truncate) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Image format driver does not support resize");
        return false;
    }
    r.node = node;
    r.size = (uint64_t)size;
    strata_node_drained_begin(node);
    strata_loop_run_co(ctx->loop, resize_co, &r);
    strata_node_drained_end(node);
    if (r.ret < 0) {
        if (r.error) {
            g_propagate_error(error, r.error);
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not resize: %s", g_strerror(-r.ret));
        }
        return false;
    }
    return true;
}
