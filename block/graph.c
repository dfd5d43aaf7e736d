/* strata — the node graph: opening nodes, names, child edges,
 * permissions and drained sections. */
#include <errno.h>
#include <string.h>

#include "block-private.h"
#include "driver.h"

/* ------------------------------------------------------------------ */
/* Permissions                                                         */
/* ------------------------------------------------------------------ */

static const char *const perm_names[] = {
    "consistent-read", "write", "write-unchanged", "resize", "graph-mod",
};

char *strata_perm_names(uint64_t perm)
{
    GString *s = g_string_new(NULL);

    for (unsigned i = 0; i < G_N_ELEMENTS(perm_names); i++) {
        if (perm & (1u << i)) {
            if (s->len) {
                g_string_append(s, ", ");
            }
            g_string_append(s, perm_names[i]);
        }
    }
    return g_string_free(s, FALSE);
}

void strata_default_child_perm(StrataNode *node, StrataChild *child,
                               StrataChildRole role, uint64_t parent_perm,
                               uint64_t parent_shared, uint64_t *nperm,
                               uint64_t *nshared)
{
    if (role == STRATA_CHILD_BACKING) {
        /* We only read the backing image, and others (a commit job) may
         * write it; what they write must not change what we show, which
         * the jobs guarantee themselves. */
        *nperm = parent_perm & STRATA_PERM_CONSISTENT_READ;
        *nshared = STRATA_PERM_ALL & ~STRATA_PERM_GRAPH_MOD;
        return;
    }
    /* A filter or a plain format passes its parents' needs down; writes
     * that leave the data unchanged are harmless to share. */
    *nperm = parent_perm;
    *nshared = (parent_shared | STRATA_PERM_WRITE_UNCHANGED) &
               ~STRATA_PERM_GRAPH_MOD;
}

/* The edges recorded while a permission update runs, so a failure can
 * restore them. */
typedef struct PermUndo {
    StrataChild *child;
    uint64_t perm, shared;
} PermUndo;

static bool node_update_perms(StrataNode *node, GArray *undo,
                              GError **error);

/* Checks @edge's wishes against every other edge into the same child. */
static bool check_edge(StrataChild *edge, uint64_t perm, uint64_t shared,
                       GError **error)
{
    StrataNode *child = edge->node;

    if ((perm & (STRATA_PERM_WRITE | STRATA_PERM_RESIZE)) &&
        child->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Block node is read-only");
        return false;
    }
    for (GList *l = child->parents; l; l = l->next) {
        StrataChild *other = l->data;
        const StrataChild *needs = edge, *denies = other;
        uint64_t clash;

        if (other == edge) {
            continue;
        }
        clash = perm & ~other->shared;
        if (!clash) {
            clash = other->perm & ~shared;
            needs = other;
            denies = edge;
        }
        if (clash) {
            /* QEMU 7.2's wording, so scripts that match it keep working. */
            g_autofree char *names = strata_perm_names(clash);
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                        "Permission conflict on node '%s': permissions '%s' "
                        "are both required by %s (uses node '%s' as '%s' "
                        "child) and unshared by %s (uses node '%s' as '%s' "
                        "child).", child->node_name, names,
                        needs->parent_desc, child->node_name, needs->name,
                        denies->parent_desc, child->node_name, denies->name);
            return false;
        }
    }
    return true;
}

static void record_undo(GArray *undo, StrataChild *c)
{
    PermUndo u = { c, c->perm, c->shared };
    g_array_append_val(undo, u);
}

/* Sets @edge's permissions and propagates into its child. */
static bool edge_set_perm(StrataChild *edge, uint64_t perm, uint64_t shared,
                          GArray *undo, GError **error)
{
    if (edge->perm == perm && edge->shared == shared) {
        return true;
    }
    if (!check_edge(edge, perm, shared, error)) {
        return false;
    }
    record_undo(undo, edge);
    edge->perm = perm;
    edge->shared = shared;
    return node_update_perms(edge->node, undo, error);
}

static void node_cumulative_perms(StrataNode *node, uint64_t *perm,
                                  uint64_t *shared)
{
    *perm = 0;
    *shared = STRATA_PERM_ALL;
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *p = l->data;
        *perm |= p->perm;
        *shared &= p->shared;
    }
}

static bool node_update_perms(StrataNode *node, GArray *undo,
                              GError **error)
{
    uint64_t perm, shared;

    node_cumulative_perms(node, &perm, &shared);
    if (node->force_share) {
        shared = STRATA_PERM_ALL;
    }
    if (node->drv && node->drv->set_perm &&
        (perm != node->cur_perm || shared != node->cur_shared)) {
        if (!node->drv->set_perm(node, perm, shared, error)) {
            return false;
        }
    }
    node->cur_perm = perm;
    node->cur_shared = shared;

    for (GList *l = node->children; l; l = l->next) {
        StrataChild *c = l->data;
        uint64_t nperm, nshared;

        if (node->drv && node->drv->child_perm) {
            node->drv->child_perm(node, c, c->role, perm, shared, &nperm,
                                  &nshared);
        } else {
            strata_default_child_perm(node, c, c->role, perm, shared,
                                      &nperm, &nshared);
        }
        if (!edge_set_perm(c, nperm, nshared, undo, error)) {
            return false;
        }
    }
    return true;
}

/* Restores recorded edges (newest first) and recomputes the nodes. */
static void perm_rollback(GArray *undo)
{
    for (guint i = undo->len; i > 0; i--) {
        PermUndo *u = &g_array_index(undo, PermUndo, i - 1);
        u->child->perm = u->perm;
        u->child->shared = u->shared;
    }
    for (guint i = undo->len; i > 0; i--) {
        PermUndo *u = &g_array_index(undo, PermUndo, i - 1);
        g_autoptr(GArray) ignored = g_array_new(FALSE, FALSE,
                                                sizeof(PermUndo));
        node_update_perms(u->child->node, ignored, NULL);
    }
}

bool strata_child_set_perm(StrataChild *child, uint64_t perm,
                           uint64_t shared, GError **error)
{
    g_autoptr(GArray) undo = g_array_new(FALSE, FALSE, sizeof(PermUndo));

    if (!edge_set_perm(child, perm, shared, undo, error)) {
        perm_rollback(undo);
        return false;
    }
    return true;
}

bool strata_node_refresh_perms(StrataNode *node, GError **error)
{
    g_autoptr(GArray) undo = g_array_new(FALSE, FALSE, sizeof(PermUndo));

    if (!node_update_perms(node, undo, error)) {
        perm_rollback(undo);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ */
/* Child edges                                                         */
/* ------------------------------------------------------------------ */

static bool is_ancestor(StrataNode *maybe_ancestor, StrataNode *node)
{
    if (maybe_ancestor == node) {
        return true;
    }
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *p = l->data;
        if (p->parent_kind == STRATA_PARENT_NODE &&
            is_ancestor(maybe_ancestor, p->parent)) {
            return true;
        }
    }
    return false;
}

static void chain_changed(StrataNode *node, unsigned depth)
{
    node->chain_gen++;
    /* Graphs are a few hundred nodes deep at most; the bound only keeps
     * an unforeseen shape from recursing without end. */
    if (depth > 4096) {
        return;
    }
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE) {
            chain_changed(c->parent, depth + 1);
        }
    }
}

void strata_node_chain_changed(StrataNode *node)
{
    g_return_if_fail(node != NULL);
    chain_changed(node, 0);
}

StrataChild *strata_node_attach_child(StrataNode *parent_node,
                                      StrataNode *child, const char *name,
                                      StrataChildRole role,
                                      StrataParentKind parent_kind,
                                      void *parent, const char *parent_desc,
                                      uint64_t perm, uint64_t shared,
                                      GError **error)
{
    StrataChild *c;

    g_return_val_if_fail(child != NULL, NULL);
    g_return_val_if_fail(name != NULL, NULL);

    if (parent_node) {
        parent_kind = STRATA_PARENT_NODE;
        parent = parent_node;
        if (is_ancestor(child, parent_node)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Making '%s' a %s child of '%s' would create a "
                        "cycle", child->node_name, name,
                        parent_node->node_name);
            return NULL;
        }
    }

    c = g_new0(StrataChild, 1);
    c->name = g_strdup(name);
    c->role = role;
    c->node = child;
    c->parent_kind = parent_kind;
    c->parent = parent;
    c->parent_desc = parent_node
        ? g_strdup_printf("node '%s'", parent_node->node_name)
        : g_strdup(parent_desc ? parent_desc : "a user");

    if (parent_node) {
        /* What a node needs from a child follows from its own parents. */
        uint64_t pperm, pshared;
        node_cumulative_perms(parent_node, &pperm, &pshared);
        if (parent_node->drv && parent_node->drv->child_perm) {
            parent_node->drv->child_perm(parent_node, c, role, pperm,
                                         pshared, &perm, &shared);
        } else {
            strata_default_child_perm(parent_node, c, role, pperm, pshared,
                                      &perm, &shared);
        }
    }

    if (!check_edge(c, perm, shared, error)) {
        g_free(c->name);
        g_free(c->parent_desc);
        g_free(c);
        return NULL;
    }
    c->perm = perm;
    c->shared = shared;
    strata_node_ref(child);
    child->parents = g_list_prepend(child->parents, c);
    c->link_in_parents = child->parents;

    if (!strata_node_refresh_perms(child, error)) {
        child->parents = g_list_delete_link(child->parents,
                                            c->link_in_parents);
        strata_node_refresh_perms(child, NULL);
        strata_node_unref(child);
        g_free(c->name);
        g_free(c->parent_desc);
        g_free(c);
        return NULL;
    }

    if (parent_node) {
        strata_node_chain_changed(parent_node);
        parent_node->children = g_list_append(parent_node->children, c);
        if (role == STRATA_CHILD_FILE && !parent_node->file) {
            parent_node->file = c;
        } else if (role == STRATA_CHILD_BACKING && !parent_node->backing) {
            parent_node->backing = c;
        }
    }
    return c;
}

void strata_child_detach(StrataChild *c)
{
    StrataNode *child;

    if (!c) {
        return;
    }
    child = c->node;
    if (c->parent_kind == STRATA_PARENT_NODE) {
        StrataNode *parent = c->parent;
        parent->children = g_list_remove(parent->children, c);
        if (parent->file == c) {
            parent->file = NULL;
        }
        if (parent->backing == c) {
            parent->backing = NULL;
        }
    }
    child->parents = g_list_delete_link(child->parents, c->link_in_parents);
    if (c->parent_kind == STRATA_PARENT_NODE) {
        strata_node_chain_changed(c->parent);
    }
    /* Dropping permissions cannot conflict. */
    strata_node_refresh_perms(child, NULL);
    g_free(c->name);
    g_free(c->parent_desc);
    g_free(c);
    strata_node_unref(child);
}

bool strata_child_replace_node(StrataChild *c, StrataNode *new_node,
                               GError **error)
{
    StrataNode *old = c->node;

    if (old == new_node) {
        return true;
    }
    if (c->parent_kind == STRATA_PARENT_NODE &&
        is_ancestor(new_node, c->parent)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Making '%s' a child of '%s' would create a cycle",
                    new_node->node_name,
                    ((StrataNode *)c->parent)->node_name);
        return false;
    }
    if (!check_edge(&(StrataChild){ .node = new_node, .name = c->name },
                    c->perm, c->shared, error)) {
        return false;
    }
    strata_node_ref(new_node);
    old->parents = g_list_delete_link(old->parents, c->link_in_parents);
    c->node = new_node;
    new_node->parents = g_list_prepend(new_node->parents, c);
    c->link_in_parents = new_node->parents;
    if (!strata_node_refresh_perms(new_node, error)) {
        new_node->parents = g_list_delete_link(new_node->parents,
                                               c->link_in_parents);
        c->node = old;
        old->parents = g_list_prepend(old->parents, c);
        c->link_in_parents = old->parents;
        strata_node_refresh_perms(new_node, NULL);
        strata_node_unref(new_node);
        return false;
    }
    if (c->parent_kind == STRATA_PARENT_NODE) {
        strata_node_chain_changed(c->parent);
    }
    strata_node_refresh_perms(old, NULL);
    strata_node_unref(old);
    return true;
}

/* ------------------------------------------------------------------ */
/* Names                                                               */
/* ------------------------------------------------------------------ */

bool strata_node_name_check(const char *name, GError **error)
{
    size_t len = strlen(name);

    if (len == 0 || !g_ascii_isalpha(name[0])) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid node-name: '%s'", name);
        return false;
    }
    for (size_t i = 1; i < len; i++) {
        char ch = name[i];
        if (!g_ascii_isalnum(ch) && ch != '-' && ch != '_' && ch != '.') {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Invalid node-name: '%s'", name);
            return false;
        }
    }
    if (len > 31) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Node name too long");
        return false;
    }
    return true;
}

StrataNode *strata_context_lookup(StrataContext *ctx, const char *name)
{
    g_return_val_if_fail(ctx != NULL, NULL);
    if (!name) {
        return NULL;
    }
    return g_hash_table_lookup(ctx->nodes_by_name, name);
}

static void auto_name(StrataContext *ctx, StrataNode *node)
{
    /* '#' cannot start a user's name, so generated names never clash
     * with them; the counter keeps them unique within the context. */
    do {
        g_snprintf(node->node_name, sizeof(node->node_name), "#block%03u",
                   ctx->auto_name_counter++ % 1000000);
    } while (g_hash_table_contains(ctx->nodes_by_name, node->node_name));
    node->auto_named = true;
}

/* ------------------------------------------------------------------ */
/* Opening and closing nodes                                           */
/* ------------------------------------------------------------------ */

static const char *const discard_values[] = { "ignore", "unmap", "off", "on",
                                              NULL };
static const char *const detect_zeroes_values[] = { "off", "on", "unmap",
                                                    NULL };

static const StrataOptDesc common_options[] = {
    { "driver", STRATA_OPT_STRING, true },
    { "node-name", STRATA_OPT_STRING },
    { "read-only", STRATA_OPT_BOOL },
    { "auto-read-only", STRATA_OPT_BOOL },
    { "force-share", STRATA_OPT_BOOL },
    { "cache.direct", STRATA_OPT_BOOL },
    { "cache.no-flush", STRATA_OPT_BOOL },
    { "discard", STRATA_OPT_ENUM, false, discard_values },
    { "detect-zeroes", STRATA_OPT_ENUM, false, detect_zeroes_values },
    { NULL }
};

/* Options a nested child takes over from its parent unless it sets them
 * itself, as QEMU does for a format's protocol child. */
static void inherit_options(JsonObject *parent, JsonObject *child,
                            StrataChildRole role)
{
    static const char *const inherited[] = { "read-only", "auto-read-only",
                                             "discard" };
    static const char *const cache_keys[] = { "direct", "no-flush" };

    if (role != STRATA_CHILD_BACKING) {
        for (unsigned i = 0; i < G_N_ELEMENTS(inherited); i++) {
            JsonNode *v = json_object_get_member(parent, inherited[i]);
            if (v && !json_object_has_member(child, inherited[i])) {
                json_object_set_member(child, inherited[i],
                                       json_node_copy(v));
            }
        }
    }
    JsonNode *pc = json_object_get_member(parent, "cache");
    if (pc && JSON_NODE_HOLDS_OBJECT(pc)) {
        JsonObject *pco = json_node_get_object(pc);
        JsonNode *cc = json_object_get_member(child, "cache");
        JsonObject *cco;
        if (!cc) {
            cco = json_object_new();
            json_object_set_object_member(child, "cache", cco);
        } else if (JSON_NODE_HOLDS_OBJECT(cc)) {
            cco = json_node_get_object(cc);
        } else {
            return; /* the child's own validation reports the bad type */
        }
        for (unsigned i = 0; i < G_N_ELEMENTS(cache_keys); i++) {
            JsonNode *v = json_object_get_member(pco, cache_keys[i]);
            if (v && !json_object_has_member(cco, cache_keys[i])) {
                json_object_set_member(cco, cache_keys[i], json_node_copy(v));
            }
        }
    }
}

static StrataChildRole role_for_option(const char *name)
{
    if (!strcmp(name, "backing")) {
        return STRATA_CHILD_BACKING;
    }
    if (!strcmp(name, "data-file")) {
        return STRATA_CHILD_DATA;
    }
    if (!strcmp(name, "file") || !strcmp(name, "image")) {
        return STRATA_CHILD_FILE;
    }
    return STRATA_CHILD_OTHER;
}

/* Opens or looks up the children the driver's option table names. */
static bool open_children(StrataNode *node, JsonObject *options,
                          bool strings_only, GError **error)
{
    const StrataDriver *drv = node->drv;

    if (!drv->options) {
        return true;
    }
    for (const StrataOptDesc *d = drv->options; d->name; d++) {
        JsonNode *n;
        StrataNode *child;
        StrataChildRole role;

        if (d->type != STRATA_OPT_CHILD &&
            d->type != STRATA_OPT_CHILD_OR_NULL) {
            continue;
        }
        n = json_object_get_member(options, d->name);
        if (!n || JSON_NODE_HOLDS_NULL(n)) {
            continue;
        }
        role = role_for_option(d->name);
        if (JSON_NODE_HOLDS_OBJECT(n)) {
            g_autoptr(JsonObject) copy =
                strata_json_object_deep_copy(json_node_get_object(n));
            inherit_options(options, copy, role);
            if (role == STRATA_CHILD_BACKING) {
                json_object_set_boolean_member(copy, "read-only", true);
            }
            child = strata_node_open(node->ctx, copy, strings_only, false,
                                     error);
            if (!child) {
                return false;
            }
        } else {
            const char *ref = json_node_get_string(n);
            child = strata_context_lookup(node->ctx, ref);
            if (!child) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                            "Cannot find device='%s' nor node-name='%s'",
                            ref, ref);
                return false;
            }
            strata_node_ref(child);
        }
        StrataChild *c = strata_node_attach_child(node, child, d->name,
                                                  role, STRATA_PARENT_NODE,
                                                  node, NULL, 0, 0, error);
        strata_node_unref(child);
        if (!c) {
            return false;
        }
        c->inherits = JSON_NODE_HOLDS_OBJECT(n);
    }
    return true;
}

static void flush_co(void *opaque)
{
    strata_node_co_flush(opaque);
}

static void node_close(StrataNode *node)
{
    /* A clean close makes everything written stable, as a guest's
     * shutdown would: formats write back their caches, volatile caches
     * pass their data down. */
    if (node->opaque && !node->read_only) {
        strata_loop_run_co(node->ctx->loop, flush_co, node);
    }
    if (node->drv && node->drv->close && node->opaque) {
        node->drv->close(node);
    }
    while (node->children) {
        strata_child_detach(node->children->data);
    }
}

static void node_free(StrataNode *node)
{
    StrataContext *ctx = node->ctx;

    g_assert(node->parents == NULL);
    node_close(node);
    if (node->link_in_ctx) {
        ctx->all_nodes = g_list_delete_link(ctx->all_nodes,
                                            node->link_in_ctx);
        if (g_hash_table_lookup(ctx->nodes_by_name, node->node_name) ==
            node) {
            g_hash_table_remove(ctx->nodes_by_name, node->node_name);
        }
    }
    g_free(node->opaque);
    g_free(node->discard);
    g_free(node->detect_zeroes);
    g_free(node->filename);
    if (node->options) {
        json_object_unref(node->options);
    }
    g_free(node);
}

void strata_node_ref(StrataNode *node)
{
    g_return_if_fail(node != NULL);
    node->refcnt++;
}

void strata_node_unref(StrataNode *node)
{
    if (!node) {
        return;
    }
    g_return_if_fail(node->refcnt > 0);
    if (--node->refcnt == 0) {
        node_free(node);
    }
}

StrataNode *strata_node_open(StrataContext *ctx, JsonObject *options,
                             bool strings_only, bool monitor_owned,
                             GError **error)
{
    g_autoptr(JsonObject) opts = NULL;
    const StrataDriver *drv;
    const char *drv_name, *name;
    StrataNode *node;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(options != NULL, NULL);

    /* Work on a private copy: validation converts values in place. */
    opts = strata_json_object_deep_copy(options);

    JsonNode *dn = json_object_get_member(opts, "driver");
    if (!dn) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'driver' is missing");
        return NULL;
    }
    if (!JSON_NODE_HOLDS_VALUE(dn) ||
        json_node_get_value_type(dn) != G_TYPE_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter type for 'driver', expected: "
                    "string");
        return NULL;
    }
    drv_name = json_node_get_string(dn);
    drv = strata_driver_find(drv_name);
    if (!drv) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'driver' does not accept value '%s'",
                    drv_name);
        return NULL;
    }

    const StrataOptDesc *tables[] = { common_options, drv->options, NULL };
    if (!strata_opts_validate(opts, tables, strings_only, error)) {
        return NULL;
    }

    name = strata_opts_get_string(opts, "node-name", NULL);
    if (name) {
        if (!strata_node_name_check(name, error)) {
            return NULL;
        }
        if (g_hash_table_contains(ctx->nodes_by_name, name)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                        "Duplicate nodes with node-name='%s'", name);
            return NULL;
        }
    }

    bool read_only = strata_opts_get_bool(opts, "read-only", false);
    bool force_share = strata_opts_get_bool(opts, "force-share", false);
    const char *discard = strata_opts_get_string(opts, "discard", "ignore");
    const char *dz = strata_opts_get_string(opts, "detect-zeroes", "off");
    if (force_share && !read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "force-share=on can only be used with read-only images");
        return NULL;
    }
    /* "on"/"off" are the command line's spellings of unmap/ignore. */
    if (!strcmp(discard, "on")) {
        discard = "unmap";
    } else if (!strcmp(discard, "off")) {
        discard = "ignore";
    }
    if (!strcmp(dz, "unmap") && strcmp(discard, "unmap") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "setting detect-zeroes to unmap is not allowed without "
                    "setting discard operation to unmap");
        return NULL;
    }

    node = g_new0(StrataNode, 1);
    node->refcnt = 1;
    node->ctx = ctx;
    node->drv = drv;
    node->read_only = read_only;
    node->force_share = force_share;
    node->cache_direct = strata_opts_get_bool(opts, "cache.direct", false);
    node->cache_no_flush = strata_opts_get_bool(opts, "cache.no-flush",
                                                false);
    node->discard = g_strdup(discard);
    node->detect_zeroes = g_strdup(dz);
    node->total_bytes = -1;
    node->limits.request_alignment = 1;
    node->limits.buf_align = 1;
    node->options = json_object_ref(opts);
    strata_co_queue_init(&node->drain_waiters);
    if (name) {
        g_strlcpy(node->node_name, name, sizeof(node->node_name));
    } else {
        auto_name(ctx, node);
    }
    /* Register the name now so nested children cannot take it. */
    g_hash_table_insert(ctx->nodes_by_name, node->node_name, node);
    ctx->all_nodes = g_list_prepend(ctx->all_nodes, node);
    node->link_in_ctx = ctx->all_nodes;

    if (!open_children(node, opts, strings_only, error)) {
        goto fail;
    }
    node->opaque = drv->state_size ? g_malloc0(drv->state_size) : NULL;
    if (!drv->open(node, opts, error)) {
        g_free(node->opaque);
        node->opaque = NULL;
        goto fail;
    }
    if (!node->filename) {
        StrataNode *f = node->file ? node->file->node : NULL;
        node->filename = g_strdup(f && f->filename ? f->filename : "");
    }
    if (strata_node_refresh_length(node) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not get the size of node '%s'", node->node_name);
        goto fail;
    }
    /* A node's own needs on its children (formats take write on their
     * file even without parents) are granted now. */
    if (!strata_node_refresh_perms(node, error)) {
        goto fail;
    }
    if (monitor_owned) {
        node->monitor_owned = true;
        strata_node_ref(node);
        ctx->monitor_nodes = g_list_prepend(ctx->monitor_nodes, node);
    }
    return node;

fail:
    strata_node_unref(node);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Navigation                                                          */
/* ------------------------------------------------------------------ */

StrataNode *strata_node_backing(StrataNode *node)
{
    return node && node->backing ? node->backing->node : NULL;
}

StrataNode *strata_node_skip_filters(StrataNode *node)
{
    while (node && node->drv->is_filter && node->file) {
        node = node->file->node;
    }
    return node;
}

StrataNode *strata_node_status_source(StrataNode *node)
{
    node = strata_node_skip_filters(node);
    while (node && node->drv->is_format && !node->drv->co_change_backing_file &&
           node->file) {
        node = strata_node_skip_filters(node->file->node);
    }
    return node;
}

/* ------------------------------------------------------------------ */
/* Drained sections                                                    */
/* ------------------------------------------------------------------ */

static void collect_subtree(StrataNode *node, GPtrArray *out)
{
    for (guint i = 0; i < out->len; i++) {
        if (out->pdata[i] == node) {
            return;
        }
    }
    g_ptr_array_add(out, node);
    for (GList *l = node->children; l; l = l->next) {
        collect_subtree(((StrataChild *)l->data)->node, out);
    }
}

/* Ancestors, so parents stop sending while we wait; backends above get
 * told to hold requests back. */
static void collect_ancestors(StrataNode *node, GPtrArray *out,
                              GPtrArray *backends)
{
    for (GList *l = node->parents; l; l = l->next) {
        StrataChild *p = l->data;
        if (p->parent_kind == STRATA_PARENT_NODE) {
            StrataNode *pn = p->parent;
            bool seen = false;
            for (guint i = 0; i < out->len && !seen; i++) {
                seen = out->pdata[i] == pn;
            }
            if (!seen) {
                g_ptr_array_add(out, pn);
                collect_ancestors(pn, out, backends);
            }
        } else if (p->parent_kind == STRATA_PARENT_BACKEND) {
            g_ptr_array_add(backends, p->parent);
        }
    }
}

static bool any_in_flight(GPtrArray *nodes)
{
    for (guint i = 0; i < nodes->len; i++) {
        if (((StrataNode *)nodes->pdata[i])->in_flight) {
            return true;
        }
    }
    return false;
}

/* Begins or ends a drained section on exactly @nodes (and tells
 * @backends); waits for their requests when beginning. */
static void drain_nodes(StrataLoop *loop, GPtrArray *nodes,
                        GPtrArray *backends, bool begin)
{
    for (guint i = 0; i < nodes->len; i++) {
        StrataNode *n = nodes->pdata[i];
        if (begin) {
            n->quiesce_counter++;
        } else {
            g_assert(n->quiesce_counter > 0);
            n->quiesce_counter--;
        }
    }
    for (guint i = 0; i < backends->len; i++) {
        strata_backend_drained_changed(backends->pdata[i]);
    }
    if (!begin) {
        return;
    }
    /* Wait until nothing is in flight anywhere in the section. */
    while (any_in_flight(nodes)) {
        if (strata_in_coroutine()) {
            for (guint i = 0; i < nodes->len; i++) {
                StrataNode *n = nodes->pdata[i];
                if (n->in_flight) {
                    strata_co_queue_wait(&n->drain_waiters, NULL);
                    break;
                }
            }
        } else {
            strata_loop_iterate(loop, true);
        }
    }
}

static void drained_change(StrataNode *node, bool begin)
{
    g_autoptr(GPtrArray) nodes = g_ptr_array_new();
    g_autoptr(GPtrArray) backends = g_ptr_array_new();

    collect_subtree(node, nodes);
    collect_ancestors(node, nodes, backends);
    drain_nodes(node->ctx->loop, nodes, backends, begin);
}

void strata_node_drained_begin(StrataNode *node)
{
    g_return_if_fail(node != NULL);
    drained_change(node, true);
}

void strata_node_drained_end(StrataNode *node)
{
    g_return_if_fail(node != NULL);
    drained_change(node, false);
}

void strata_node_inc_in_flight(StrataNode *node)
{
    node->in_flight++;
}

void strata_node_dec_in_flight(StrataNode *node)
{
    g_assert(node->in_flight > 0);
    if (--node->in_flight == 0 && node->quiesce_counter) {
        strata_co_queue_restart_all(&node->drain_waiters);
    }
}

/* ------------------------------------------------------------------ */
/* Public accessors                                                    */
/* ------------------------------------------------------------------ */

const char *strata_node_get_name(StrataNode *node)
{
    g_return_val_if_fail(node != NULL, NULL);
    return node->node_name;
}

const char *strata_node_get_driver_name(StrataNode *node)
{
    g_return_val_if_fail(node != NULL, NULL);
    return node->drv->name;
}

int64_t strata_node_get_length(StrataNode *node)
{
    g_return_val_if_fail(node != NULL, -EINVAL);
    return node->total_bytes;
}

bool strata_node_is_read_only(StrataNode *node)
{
    g_return_val_if_fail(node != NULL, true);
    return node->read_only;
}

/* ------------------------------------------------------------------ */
/* Reopening (blockdev-reopen)                                         */
/* ------------------------------------------------------------------ */

/* A child reference of a reopened node that points somewhere new. */
typedef struct ChildChange {
    const char *name;       /* the driver's option name (static) */
    StrataChildRole role;
    StrataChild *old_edge;  /* NULL: the node has no such child now */
    StrataNode *new_node;   /* NULL: detach (at commit); holds a ref */
    StrataNode *old_node;   /* after a replace: kept alive for undo */
    StrataChild *new_edge;  /* attached where there was none */
    bool applied;
} ChildChange;

typedef struct ReopenEntry {
    StrataReopenState rs;
    bool force_share;
    char *discard;
    char *detect_zeroes;
    GArray *changes;        /* ChildChange */
    bool prepared;
    bool old_read_only, old_force_share;
} ReopenEntry;

static void reopen_entry_free(ReopenEntry *e)
{
    for (guint i = 0; e->changes && i < e->changes->len; i++) {
        ChildChange *ch = &g_array_index(e->changes, ChildChange, i);
        strata_node_unref(ch->new_node);
    }
    if (e->changes) {
        g_array_unref(e->changes);
    }
    if (e->rs.options) {
        json_object_unref(e->rs.options);
    }
    g_free(e->discard);
    g_free(e->detect_zeroes);
    g_free(e);
}

static JsonObject *object_copy(JsonObject *o)
{
    return strata_json_object_deep_copy(o);
}

/* Puts @prefix before the member a validation message names: the block
 * layer says 'read-only', blockdev-reopen's arguments 'options[0].read-only'. */
static void error_prefix_member(GError **error, GError *local,
                                const char *prefix)
{
    const char *q = strchr(local->message, '\'');

    if (!q) {
        g_propagate_error(error, local);
        return;
    }
    g_set_error(error, local->domain, local->code, "%.*s%s.%s",
                (int)(q - local->message + 1), local->message, prefix,
                q + 1);
    g_error_free(local);
}

/* Checks one option set as blockdev-add's arguments are checked.
 * Returns: (transfer full) (nullable): a typed copy. */
static JsonObject *reopen_validate(JsonObject *set, const char *prefix,
                                   GError **error)
{
    g_autoptr(JsonObject) opts = object_copy(set);
    JsonNode *dn = json_object_get_member(opts, "driver");
    const StrataDriver *drv;
    GError *local = NULL;

    if (!dn) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s.driver' is missing", prefix);
        return NULL;
    }
    if (!JSON_NODE_HOLDS_VALUE(dn) ||
        json_node_get_value_type(dn) != G_TYPE_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter type for '%s.driver', expected: "
                    "string", prefix);
        return NULL;
    }
    drv = strata_driver_find(json_node_get_string(dn));
    if (!drv) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s.driver' does not accept value '%s'",
                    prefix, json_node_get_string(dn));
        return NULL;
    }
    const StrataOptDesc *tables[] = { common_options, drv->options, NULL };
    if (!strata_opts_validate(opts, tables, false, &local)) {
        error_prefix_member(error, local, prefix);
        return NULL;
    }
    return g_steal_pointer(&opts);
}

static ReopenEntry *find_entry(GPtrArray *queue, StrataNode *node)
{
    for (guint i = 0; i < queue->len; i++) {
        ReopenEntry *e = queue->pdata[i];
        if (e->rs.node == node) {
            return e;
        }
    }
    return NULL;
}

static ReopenEntry *queue_add(GPtrArray *queue, StrataNode *node,
                              JsonObject *opts)
{
    ReopenEntry *e = g_new0(ReopenEntry, 1);

    e->rs.node = node;
    e->rs.options = opts;
    e->changes = g_array_new(FALSE, TRUE, sizeof(ChildChange));
    g_ptr_array_add(queue, e);
    return e;
}

static bool is_string_value(JsonNode *n)
{
    return n && JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_STRING;
}

/* Whether a nested definition in a reopen names the current child. */
static bool definition_is_child(JsonObject *def, StrataNode *child)
{
    const char *name = strata_opts_get_string(def, "node-name", NULL);
    return name ? strcmp(name, child->node_name) == 0 : child->auto_named;
}

/*
 * Queues the children @e's node defined inside its own options when the
 * new options keep them: they are reopened with their old options (or
 * the new nested definition), taking over the parent's new read-only
 * and cache settings where the parent states them.
 */
static bool queue_inheriting_children(GPtrArray *queue, ReopenEntry *e,
                                      const char *prefix, GError **error)
{
    StrataNode *node = e->rs.node;

    for (GList *l = node->children; l; l = l->next) {
        StrataChild *c = l->data;
        JsonNode *ref = json_object_get_member(e->rs.options, c->name);
        JsonObject *opts;

        if (!c->inherits || c->role != STRATA_CHILD_FILE ||
            find_entry(queue, c->node)) {
            continue;
        }
        if (ref && JSON_NODE_HOLDS_OBJECT(ref)) {
            g_autofree char *p = g_strdup_printf("%s.%s", prefix, c->name);
            if (!definition_is_child(json_node_get_object(ref), c->node)) {
                continue; /* refused when the references are parsed */
            }
            opts = reopen_validate(json_node_get_object(ref), p, error);
            if (!opts) {
                return false;
            }
        } else if (!ref || (is_string_value(ref) &&
                            !strcmp(json_node_get_string(ref),
                                    c->node->node_name))) {
            JsonNode *pc = json_object_get_member(e->rs.options, "cache");

            opts = object_copy(c->node->options);
            for (const char *const *k = (const char *const[]){
                     "read-only", "auto-read-only", "discard", NULL };
                 *k; k++) {
                if (json_object_has_member(e->rs.options, *k)) {
                    json_object_remove_member(opts, *k);
                }
            }
            if (pc && JSON_NODE_HOLDS_OBJECT(pc)) {
                JsonNode *cc = json_object_get_member(opts, "cache");
                JsonObject *pco = json_node_get_object(pc);
                if (cc && JSON_NODE_HOLDS_OBJECT(cc)) {
                    JsonObject *cco = json_node_get_object(cc);
                    if (json_object_has_member(pco, "direct")) {
                        json_object_remove_member(cco, "direct");
                    }
                    if (json_object_has_member(pco, "no-flush")) {
                        json_object_remove_member(cco, "no-flush");
                    }
                }
            }
        } else {
            continue; /* another node takes its place */
        }
        inherit_options(e->rs.options, opts, c->role);
        queue_add(queue, c->node, opts);
    }
    return true;
}

/* Whether the image itself names a backing file (a qcow2 header). */
static bool image_names_backing(StrataNode *node)
{
    g_autoptr(JsonObject) image = json_object_new();

    if (!node->drv->query_image) {
        return false;
    }
    node->drv->query_image(node, image);
    return json_object_has_member(image, "backing-filename");
}

static StrataChild *child_by_name(StrataNode *node, const char *name)
{
    for (GList *l = node->children; l; l = l->next) {
        StrataChild *c = l->data;
        if (!strcmp(c->name, name)) {
            return c;
        }
    }
    return NULL;
}

/* Reads the new value of child option @d: what the child becomes. */
static bool reopen_parse_child(ReopenEntry *e, const StrataOptDesc *d,
                               GError **error)
{
    StrataNode *node = e->rs.node;
    JsonNode *v = json_object_get_member(e->rs.options, d->name);
    StrataChild *old = child_by_name(node, d->name);
    StrataNode *new_node;
    ChildChange ch = { 0 };

    if (!v) {
        return true;
    }
    if (JSON_NODE_HOLDS_NULL(v)) {
        new_node = NULL;
    } else if (JSON_NODE_HOLDS_OBJECT(v)) {
        /* A nested definition may only restate the current child. */
        if (old && old->inherits &&
            definition_is_child(json_node_get_object(v), old->node)) {
            return true;
        }
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot change the option '%s'", d->name);
        return false;
    } else {
        const char *ref = json_node_get_string(v);
        new_node = strata_context_lookup(node->ctx, ref);
        if (!new_node) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Cannot find device='' nor node-name='%s'", ref);
            return false;
        }
        if ((!old || old->node != new_node) &&
            is_ancestor(new_node, node)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Making '%s' a %s child of '%s' would create a "
                        "cycle", ref, d->name, node->node_name);
            return false;
        }
    }
    if ((old ? old->node : NULL) == new_node) {
        return true;
    }
    ch.name = d->name;
    ch.role = role_for_option(d->name);
    ch.old_edge = old;
    ch.new_node = new_node;
    if (new_node) {
        strata_node_ref(new_node);
    }
    g_array_append_val(e->changes, ch);
    return true;
}

static bool reopen_prepare(ReopenEntry *e, GError **error)
{
    StrataNode *node = e->rs.node;
    JsonObject *o = e->rs.options;
    const StrataDriver *drv = node->drv;
    const char *discard, *dz;

    if (strcmp(strata_opts_get_string(o, "driver", ""), drv->name) != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot change the option 'driver'");
        return false;
    }
    e->rs.read_only = strata_opts_get_bool(o, "read-only", false);
    e->rs.cache_direct = strata_opts_get_bool(o, "cache.direct", false);
    e->rs.cache_no_flush = strata_opts_get_bool(o, "cache.no-flush", false);
    e->force_share = strata_opts_get_bool(o, "force-share", false);
    if (e->force_share && !e->rs.read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "force-share=on can only be used with read-only images");
        return false;
    }
    discard = strata_opts_get_string(o, "discard", "ignore");
    if (!strcmp(discard, "on")) {
        discard = "unmap";
    } else if (!strcmp(discard, "off")) {
        discard = "ignore";
    }
    dz = strata_opts_get_string(o, "detect-zeroes", "off");
    if (!strcmp(dz, "unmap") && strcmp(discard, "unmap") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "setting detect-zeroes to unmap is not allowed without "
                    "setting discard operation to unmap");
        return false;
    }
    e->discard = g_strdup(discard);
    e->detect_zeroes = g_strdup(dz);

    /* Leaving "backing" out would otherwise silently mean "open the
     * default backing file", which a reopen cannot do. */
    for (const StrataOptDesc *d = drv->options; d && d->name; d++) {
        if (!strcmp(d->name, "backing") &&
            !json_object_has_member(o, "backing") &&
            (node->backing || image_names_backing(node))) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "backing is missing for '%s'", node->node_name);
            return false;
        }
    }
    /* As QEMU: the backing reference first, then the others. */
    for (int pass = 0; pass < 2; pass++) {
        for (const StrataOptDesc *d = drv->options; d && d->name; d++) {
            bool is_backing = !strcmp(d->name, "backing");
            if ((d->type != STRATA_OPT_CHILD &&
                 d->type != STRATA_OPT_CHILD_OR_NULL) ||
                is_backing != (pass == 0)) {
                continue;
            }
            if (!reopen_parse_child(e, d, error)) {
                return false;
            }
        }
    }

    if (!drv->reopen_prepare) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Block format '%s' used by node '%s' does not support "
                    "reopening files", drv->name, node->node_name);
        return false;
    }
    if (!drv->reopen_prepare(&e->rs, error)) {
        return false;
    }
    e->prepared = true;
    return true;
}

static bool reopen_apply_changes(ReopenEntry *e, GError **error)
{
    StrataNode *node = e->rs.node;

    for (guint i = 0; i < e->changes->len; i++) {
        ChildChange *ch = &g_array_index(e->changes, ChildChange, i);

        if (!ch->new_node) {
            continue; /* detaching only gives permissions up: at commit */
        }
        if (ch->old_edge) {
            ch->old_node = ch->old_edge->node;
            strata_node_ref(ch->old_node);
            if (!strata_child_replace_node(ch->old_edge, ch->new_node,
                                           error)) {
                strata_node_unref(ch->old_node);
                ch->old_node = NULL;
                return false;
            }
        } else {
            ch->new_edge = strata_node_attach_child(node, ch->new_node,
                                                    ch->name, ch->role,
                                                    STRATA_PARENT_NODE, node,
                                                    NULL, 0, 0, error);
            if (!ch->new_edge) {
                return false;
            }
        }
        ch->applied = true;
    }
    return true;
}

static void reopen_revert_changes(ReopenEntry *e)
{
    for (guint i = e->changes->len; i > 0; i--) {
        ChildChange *ch = &g_array_index(e->changes, ChildChange, i - 1);

        if (!ch->applied) {
            continue;
        }
        if (ch->old_edge) {
            /* Back to a state that was granted before. */
            strata_child_replace_node(ch->old_edge, ch->old_node, NULL);
            strata_node_unref(ch->old_node);
            ch->old_node = NULL;
        } else {
            strata_child_detach(ch->new_edge);
            ch->new_edge = NULL;
        }
        ch->applied = false;
    }
}

static void reopen_commit(ReopenEntry *e)
{
    StrataNode *node = e->rs.node;

    if (node->drv->reopen_commit) {
        node->drv->reopen_commit(&e->rs);
    }
    node->cache_direct = e->rs.cache_direct;
    node->cache_no_flush = e->rs.cache_no_flush;
    g_free(node->discard);
    node->discard = g_steal_pointer(&e->discard);
    g_free(node->detect_zeroes);
    node->detect_zeroes = g_steal_pointer(&e->detect_zeroes);
    json_object_unref(node->options);
    node->options = json_object_ref(e->rs.options);

    for (guint i = 0; i < e->changes->len; i++) {
        ChildChange *ch = &g_array_index(e->changes, ChildChange, i);

        if (!ch->new_node && ch->old_edge) {
            strata_child_detach(ch->old_edge);
        } else if (ch->old_edge) {
            /* The edge now leads to a node of its own standing. */
            ch->old_edge->inherits = false;
        }
        if (ch->old_node) {
            strata_node_unref(ch->old_node);
            ch->old_node = NULL;
        }
    }
}

/* Grants the permissions of the new graph; refuses writers on nodes
 * that become read-only.  On failure everything is as before. */
static bool reopen_set_perms(GPtrArray *queue, GError **error)
{
    g_autoptr(GArray) undo = g_array_new(FALSE, FALSE, sizeof(PermUndo));
    guint applied = 0;

    for (guint i = 0; i < queue->len; i++) {
        ReopenEntry *e = queue->pdata[i];
        e->old_read_only = e->rs.node->read_only;
        e->old_force_share = e->rs.node->force_share;
        e->rs.node->read_only = e->rs.read_only;
        e->rs.node->force_share = e->force_share;
    }
    for (; applied < queue->len; applied++) {
        if (!reopen_apply_changes(queue->pdata[applied], error)) {
            reopen_revert_changes(queue->pdata[applied]);
            goto fail;
        }
    }
    for (guint i = 0; i < queue->len; i++) {
        ReopenEntry *e = queue->pdata[i];
        if (!node_update_perms(e->rs.node, undo, error)) {
            goto fail_perms;
        }
    }
    for (guint i = 0; i < queue->len; i++) {
        ReopenEntry *e = queue->pdata[i];
        uint64_t perm, shared;

        if (!e->rs.read_only) {
            continue;
        }
        node_cumulative_perms(e->rs.node, &perm, &shared);
        if (perm & STRATA_PERM_WRITE) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                        e->old_read_only
                        ? "Block node is read-only"
                        : "Cannot make block node read-only, there is a "
                          "writer on it");
            goto fail_perms;
        }
    }
    return true;

fail_perms:
    perm_rollback(undo);
fail:
    while (applied > 0) {
        reopen_revert_changes(queue->pdata[--applied]);
    }
    for (guint i = 0; i < queue->len; i++) {
        ReopenEntry *e = queue->pdata[i];
        e->rs.node->read_only = e->old_read_only;
        e->rs.node->force_share = e->old_force_share;
    }
    for (guint i = 0; i < queue->len; i++) {
        g_autoptr(GArray) ignored = g_array_new(FALSE, FALSE,
                                                sizeof(PermUndo));
        node_update_perms(((ReopenEntry *)queue->pdata[i])->rs.node,
                          ignored, NULL);
    }
    return false;
}

bool strata_reopen_check_options(StrataReopenState *rs,
                                 const char *const *mutable_opts,
                                 GError **error)
{
    StrataNode *node = rs->node;
    const StrataOptDesc *d;

    for (d = node->drv->options; d && d->name; d++) {
        JsonNode *old, *new;

        if (d->type == STRATA_OPT_CHILD ||
            d->type == STRATA_OPT_CHILD_OR_NULL ||
            (mutable_opts && g_strv_contains(mutable_opts, d->name))) {
            continue;
        }
        old = json_object_get_member(node->options, d->name);
        new = json_object_get_member(rs->options, d->name);
        if (old && !new) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Option '%s' cannot be reset to its default value",
                        d->name);
            return false;
        }
        if (new && (!old || !json_node_equal(old, new))) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Cannot change the option '%s'", d->name);
            return false;
        }
    }
    return true;
}

bool strata_node_reopen_multiple(StrataContext *ctx, GPtrArray *option_sets,
                                 GError **error)
{
    g_autoptr(GPtrArray) queue =
        g_ptr_array_new_with_free_func((GDestroyNotify)reopen_entry_free);
    g_autoptr(GPtrArray) drained = NULL;
    g_autoptr(GPtrArray) backends = NULL;
    guint n_sets;
    bool ok = false;

    g_return_val_if_fail(ctx != NULL, false);
    g_return_val_if_fail(option_sets != NULL, false);

    n_sets = option_sets->len;
    if (n_sets == 0) {
        /* QEMU 7.2 aborts here. */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "At least one node must be given to reopen");
        return false;
    }

    /* Every set is checked before anything is looked up, as the
     * arguments of the command are. */
    g_autoptr(GPtrArray) typed =
        g_ptr_array_new_with_free_func((GDestroyNotify)json_object_unref);
    for (guint i = 0; i < n_sets; i++) {
        g_autofree char *prefix = g_strdup_printf("options[%u]", i);
        JsonObject *o = reopen_validate(option_sets->pdata[i], prefix,
                                        error);
        if (!o) {
            return false;
        }
        g_ptr_array_add(typed, o);
    }
    for (guint i = 0; i < n_sets; i++) {
        JsonObject *o = typed->pdata[i];
        const char *name = strata_opts_get_string(o, "node-name", NULL);
        StrataNode *node;
        ReopenEntry *e;

        if (!name) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "node-name not specified");
            return false;
        }
        node = strata_context_lookup(ctx, name);
        if (!node) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                        "Failed to find node with node-name='%s'", name);
            return false;
        }
        e = find_entry(queue, node);
        if (e) {
            /* Named twice: the later set's members win. */
            g_autoptr(GList) members = json_object_get_members(o);
            for (GList *l = members; l; l = l->next) {
                json_object_set_member(e->rs.options, l->data,
                    strata_json_deep_copy(json_object_get_member(o,
                                                                 l->data)));
            }
        } else {
            queue_add(queue, node, json_object_ref(o));
        }
    }
    for (guint i = 0; i < queue->len; i++) {
        g_autofree char *prefix = g_strdup_printf("options[%u]",
                                                  MIN(i, n_sets - 1));
        if (!queue_inheriting_children(queue, queue->pdata[i], prefix,
                                       error)) {
            return false;
        }
    }

    /* One drained section over everything a node of the queue reaches,
     * and over whatever becomes its child, ended on the same nodes. */
    drained = g_ptr_array_new_with_free_func(
        (GDestroyNotify)strata_node_unref);
    backends = g_ptr_array_new();
    for (guint i = 0; i < queue->len; i++) {
        StrataNode *node = ((ReopenEntry *)queue->pdata[i])->rs.node;
        collect_subtree(node, drained);
        collect_ancestors(node, drained, backends);
    }
    for (guint i = 0; i < option_sets->len; i++) {
        JsonObject *o = typed->pdata[i];
        g_autoptr(GList) members = json_object_get_members(o);
        for (GList *l = members; l; l = l->next) {
            JsonNode *v = json_object_get_member(o, l->data);
            StrataNode *n;
            if (strcmp(l->data, "node-name") != 0 && is_string_value(v) &&
                (n = strata_context_lookup(ctx, json_node_get_string(v)))) {
                collect_subtree(n, drained);
            }
        }
    }
    for (guint i = 0; i < drained->len; i++) {
        strata_node_ref(drained->pdata[i]);
    }
    drain_nodes(ctx->loop, drained, backends, true);

    guint prepared = 0;
    for (; prepared < queue->len; prepared++) {
        if (!reopen_prepare(queue->pdata[prepared], error)) {
            break;
        }
    }
    if (prepared == queue->len && reopen_set_perms(queue, error)) {
        for (guint i = 0; i < queue->len; i++) {
            reopen_commit(queue->pdata[i]);
        }
        /* A window (raw offset/size) or a new child may move the end. */
        for (guint i = 0; i < queue->len; i++) {
            strata_node_refresh_length(
                ((ReopenEntry *)queue->pdata[i])->rs.node);
        }
        ok = true;
    } else {
        for (guint i = queue->len; i > 0; i--) {
            ReopenEntry *e = queue->pdata[i - 1];
            if (e->prepared && e->rs.node->drv->reopen_abort) {
                e->rs.node->drv->reopen_abort(&e->rs);
            }
        }
    }

    drain_nodes(ctx->loop, drained, backends, false);
    return ok;
}

/* ------------------------------------------------------------------ */
/* Drain sets and overlays                                             */
/* ------------------------------------------------------------------ */

struct StrataDrainSet {
    StrataContext *ctx;
    GPtrArray *nodes;   /* each holds a reference and one quiesce count */
};

StrataDrainSet *strata_drain_set_new(StrataContext *ctx)
{
    StrataDrainSet *set;

    g_return_val_if_fail(ctx != NULL, NULL);
    set = g_new0(StrataDrainSet, 1);
    set->ctx = ctx;
    set->nodes = g_ptr_array_new();
    return set;
}

void strata_drain_set_add(StrataDrainSet *set, StrataNode *node)
{
    g_autoptr(GPtrArray) nodes = g_ptr_array_new();
    g_autoptr(GPtrArray) backends = g_ptr_array_new();

    g_return_if_fail(set != NULL && node != NULL);
    collect_subtree(node, nodes);
    collect_ancestors(node, nodes, backends);
    for (guint i = 0; i < nodes->len; i++) {
        StrataNode *n = nodes->pdata[i];
        bool have = false;
        for (guint j = 0; j < set->nodes->len && !have; j++) {
            have = set->nodes->pdata[j] == n;
        }
        if (!have) {
            strata_node_ref(n);
            n->quiesce_counter++;
            g_ptr_array_add(set->nodes, n);
        }
    }
    while (any_in_flight(set->nodes)) {
        if (strata_in_coroutine()) {
            for (guint i = 0; i < set->nodes->len; i++) {
                StrataNode *n = set->nodes->pdata[i];
                if (n->in_flight) {
                    strata_co_queue_wait(&n->drain_waiters, NULL);
                    break;
                }
            }
        } else {
            strata_loop_iterate(set->ctx->loop, true);
        }
    }
}

void strata_drain_set_free(StrataDrainSet *set)
{
    if (!set) {
        return;
    }
    for (guint i = 0; i < set->nodes->len; i++) {
        StrataNode *n = set->nodes->pdata[i];
        g_assert(n->quiesce_counter > 0);
        n->quiesce_counter--;
    }
    /* The graph may have changed under the section: every backend looks
     * at its (possibly new) root again. */
    for (GList *l = set->ctx->backends; l; l = l->next) {
        strata_backend_drained_changed(l->data);
    }
    for (guint i = 0; i < set->nodes->len; i++) {
        strata_node_unref(set->nodes->pdata[i]);
    }
    g_ptr_array_free(set->nodes, TRUE);
    g_free(set);
}

bool strata_node_move_parents(StrataNode *from, StrataNode *to,
                              GError **error)
{
    g_autoptr(GPtrArray) moved = g_ptr_array_new();
    GList *edges;
    bool ok = true;

    g_return_val_if_fail(from != NULL && to != NULL, false);
    if (from == to) {
        return true;
    }
    /* Keep both alive while their edges move. */
    strata_node_ref(from);
    strata_node_ref(to);
    edges = g_list_copy(from->parents);
    for (GList *l = edges; l; l = l->next) {
        StrataChild *c = l->data;
        if (c->parent_kind == STRATA_PARENT_NODE && c->parent == to) {
            continue;
        }
        if (!strata_child_replace_node(c, to, error)) {
            ok = false;
            break;
        }
        g_ptr_array_add(moved, c);
    }
    g_list_free(edges);
    if (!ok) {
        /* Every edge was accepted on @from before, so moving back
         * cannot conflict. */
        for (guint i = moved->len; i > 0; i--) {
            strata_child_replace_node(moved->pdata[i - 1], from, NULL);
        }
    }
    strata_node_unref(to);
    strata_node_unref(from);
    return ok;
}

bool strata_node_append_overlay(StrataNode *base, StrataNode *overlay,
                                GError **error)
{
    StrataDrainSet *set;
    StrataChild *bc;
    bool ok = false;

    g_return_val_if_fail(base != NULL && overlay != NULL, false);
    if (overlay->backing) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "The overlay already has a backing image");
        return false;
    }
    set = strata_drain_set_new(base->ctx);
    strata_drain_set_add(set, base);
    strata_drain_set_add(set, overlay);
    bc = strata_node_attach_child(overlay, base, "backing",
                                  STRATA_CHILD_BACKING, STRATA_PARENT_NODE,
                                  overlay, NULL, 0, 0, error);
    if (bc) {
        ok = strata_node_move_parents(base, overlay, error);
        if (!ok) {
            strata_child_detach(bc);
        }
    }
    strata_drain_set_free(set);
    return ok;
}

bool strata_node_remove_overlay(StrataNode *overlay, GError **error)
{
    StrataDrainSet *set;
    StrataNode *base;
    bool ok;

    g_return_val_if_fail(overlay != NULL, false);
    base = strata_node_backing(overlay);
    if (!base) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Node '%s' has no backing node", overlay->node_name);
        return false;
    }
    strata_node_ref(base);
    set = strata_drain_set_new(base->ctx);
    strata_drain_set_add(set, overlay);
    ok = strata_node_move_parents(overlay, base, error);
    if (ok) {
        strata_child_detach(overlay->backing);
    }
    strata_drain_set_free(set);
    strata_node_unref(base);
    return ok;
}

/* ------------------------------------------------------------------ */
/* Read-only switch                                                    */
/* ------------------------------------------------------------------ */

bool strata_node_set_read_only(StrataNode *node, bool read_only,
                               GError **error)
{
    g_autoptr(GPtrArray) sets = NULL;
    g_autoptr(JsonNode) copy = NULL;
    g_autoptr(JsonNode) wrap = json_node_alloc();
    JsonObject *opts;

    g_return_val_if_fail(node != NULL, false);
    if (node->read_only == read_only) {
        return true;
    }
    /* The options it has now, with the flag flipped and the children it
     * was given by reference restated as they are. */
    json_node_init_object(wrap, node->options);
    copy = strata_json_deep_copy(wrap);
    opts = json_node_get_object(copy);
    json_object_set_string_member(opts, "node-name", node->node_name);
    json_object_set_boolean_member(opts, "read-only", read_only);
    if (node->backing) {
        json_object_set_string_member(opts, "backing",
                                      node->backing->node->node_name);
    } else if (json_object_has_member(opts, "backing")) {
        json_object_set_null_member(opts, "backing");
    }
    sets = g_ptr_array_new_with_free_func((GDestroyNotify)json_object_unref);
    g_ptr_array_add(sets, json_object_ref(opts));
    return strata_node_reopen_multiple(node->ctx, sets, error);
}

int64_t strata_node_allocated_size(StrataNode *node)
{
    while (!node->drv->get_allocated_size) {
        if (!node->file) {
            return -ENOTSUP;
        }
        node = node->file->node;
    }
    return node->drv->get_allocated_size(node);
}

void strata_node_set_actual_size(StrataNode *node, JsonObject *image)
{
    int64_t size = strata_node_allocated_size(node);

    if (size >= 0) {
        json_object_set_int_member(image, "actual-size", size);
    }
}
