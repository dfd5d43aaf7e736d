/* strata — the QMP schema: argument checking and introspection.
 *
 * qmp/schema.json is compiled in as text (without its "doc" members,
 * which only docs/qmp.md needs) and parsed when a monitor is created.  It
 * is the one description of every command: the dispatcher
 * checks arguments against it, query-commands and query-qmp-schema are
 * answered from it, and a test compares it with docs/qmp.md.
 */
#include <string.h>

#include "strata-util.h"
#include "qmp-private.h"

typedef enum {
    K_BUILTIN,
    K_ENUM,
    K_STRUCT,
    K_UNION,
    K_ALTERNATE,
    K_ARRAY,
} Kind;

typedef struct {
    char *name;
    char *type;
    bool optional;
    JsonNode *def;          /* nullable */
} Member;

typedef struct {
    char *name;
    Kind kind;
    char *json_type;        /* builtin */
    GPtrArray *values;      /* enum: char * */
    GPtrArray *members;     /* struct, union base: Member * */
    char *discriminator;    /* union */
    GPtrArray *variants;    /* union: char * case, char * type, … */
    GPtrArray *alts;        /* alternate: char * type */
    char *elem;             /* array */
    bool checked_by_block;
} SchemaType;

typedef struct {
    char *name;
    char *arg_type;
    char *ret_type;
    bool boxed;
} Command;

struct StrataQmpSchema {
    GHashTable *types;      /* name → SchemaType * */
    GPtrArray *type_order;  /* SchemaType *, owns */
    GPtrArray *commands;    /* Command *, owns */
    GHashTable *cmd_by_name;
    GPtrArray *cmd_names;   /* char *, borrowed from commands */
    GPtrArray *events;      /* Command * (name, arg_type), owns */
};

static void member_free(Member *m)
{
    g_free(m->name);
    g_free(m->type);
    if (m->def) {
        json_node_unref(m->def);
    }
    g_free(m);
}

static void type_free(SchemaType *t)
{
    g_free(t->name);
    g_free(t->json_type);
    if (t->values) {
        g_ptr_array_unref(t->values);
    }
    if (t->members) {
        g_ptr_array_unref(t->members);
    }
    g_free(t->discriminator);
    if (t->variants) {
        g_ptr_array_unref(t->variants);
    }
    if (t->alts) {
        g_ptr_array_unref(t->alts);
    }
    g_free(t->elem);
    g_free(t);
}

static void command_free(Command *c)
{
    g_free(c->name);
    g_free(c->arg_type);
    g_free(c->ret_type);
    g_free(c);
}

void strata_qmp_schema_free(StrataQmpSchema *s)
{
    if (!s) {
        return;
    }
    g_hash_table_destroy(s->types);
    g_ptr_array_unref(s->type_order);
    g_hash_table_destroy(s->cmd_by_name);
    g_ptr_array_unref(s->cmd_names);
    g_ptr_array_unref(s->commands);
    g_ptr_array_unref(s->events);
    g_free(s);
}

static SchemaType *add_type(StrataQmpSchema *s, const char *name, Kind kind)
{
    SchemaType *t = g_new0(SchemaType, 1);

    t->name = g_strdup(name);
    t->kind = kind;
    g_ptr_array_add(s->type_order, t);
    g_hash_table_insert(s->types, t->name, t);
    return t;
}

static bool bad(GError **error, const char *what)
{
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Bad QMP schema: %s", what);
    return false;
}

/* A type reference: "int", ["int"] (an array type, registered on first
 * use).  Returns: (transfer full) its name. */
static char *type_ref(StrataQmpSchema *s, JsonNode *n, GError **error)
{
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_STRING) {
        return g_strdup(json_node_get_string(n));
    }
    if (JSON_NODE_HOLDS_ARRAY(n) &&
        json_array_get_length(json_node_get_array(n)) == 1) {
        g_autofree char *elem =
            type_ref(s, json_array_get_element(json_node_get_array(n), 0),
                     error);
        if (!elem) {
            return NULL;
        }
        char *name = g_strdup_printf("[%s]", elem);
        if (!g_hash_table_contains(s->types, name)) {
            SchemaType *t = add_type(s, name, K_ARRAY);
            t->elem = g_steal_pointer(&elem);
        }
        return name;
    }
    bad(error, "a type must be a name or [name]");
    return NULL;
}

static GPtrArray *parse_members(StrataQmpSchema *s, JsonObject *data,
                                GError **error)
{
    g_autoptr(GPtrArray) members =
        g_ptr_array_new_with_free_func((GDestroyNotify)member_free);
    JsonObjectIter it;
    const char *key;
    JsonNode *val;

    json_object_iter_init_ordered(&it, data);
    while (json_object_iter_next_ordered(&it, &key, &val)) {
        Member *m = g_new0(Member, 1);
        g_ptr_array_add(members, m);
        m->optional = key[0] == '*';
        m->name = g_strdup(m->optional ? key + 1 : key);
        if (JSON_NODE_HOLDS_OBJECT(val)) {
            JsonObject *o = json_node_get_object(val);
            JsonNode *tn = json_object_get_member(o, "type");
            if (!tn) {
                bad(error, "member without type");
                return NULL;
            }
            m->type = type_ref(s, tn, error);
            if (json_object_has_member(o, "default")) {
                m->def = json_node_copy(json_object_get_member(o,
                                                               "default"));
            }
        } else {
            m->type = type_ref(s, val, error);
        }
        if (!m->type) {
            return NULL;
        }
    }
    return g_steal_pointer(&members);
}

static GPtrArray *string_list(JsonArray *arr)
{
    GPtrArray *out = g_ptr_array_new_with_free_func(g_free);

    for (guint i = 0; arr && i < json_array_get_length(arr); i++) {
        g_ptr_array_add(out,
                        g_strdup(json_array_get_string_element(arr, i)));
    }
    return out;
}

static bool parse_type(StrataQmpSchema *s, JsonObject *o, GError **error)
{
    SchemaType *t;

    if (json_object_has_member(o, "builtin")) {
        t = add_type(s, json_object_get_string_member(o, "builtin"),
                     K_BUILTIN);
        t->json_type = g_strdup(json_object_get_string_member(o,
                                                              "json-type"));
    } else if (json_object_has_member(o, "enum")) {
        t = add_type(s, json_object_get_string_member(o, "enum"), K_ENUM);
        t->values = string_list(json_object_get_array_member(o, "data"));
    } else if (json_object_has_member(o, "struct")) {
        t = add_type(s, json_object_get_string_member(o, "struct"),
                     K_STRUCT);
        t->members = parse_members(s, json_object_get_object_member(o,
                                                                    "data"),
                                   error);
        if (!t->members) {
            return false;
        }
    } else if (json_object_has_member(o, "union")) {
        JsonObjectIter it;
        const char *key;
        JsonNode *val;

        t = add_type(s, json_object_get_string_member(o, "union"), K_UNION);
        t->members = parse_members(s, json_object_get_object_member(o,
                                                                    "base"),
                                   error);
        if (!t->members) {
            return false;
        }
        t->discriminator = g_strdup(json_object_get_string_member(
            o, "discriminator"));
        t->variants = g_ptr_array_new_with_free_func(g_free);
        json_object_iter_init_ordered(&it,
                                      json_object_get_object_member(o,
                                                                    "data"));
        while (json_object_iter_next_ordered(&it, &key, &val)) {
            g_ptr_array_add(t->variants, g_strdup(key));
            g_ptr_array_add(t->variants,
                            g_strdup(json_node_get_string(val)));
        }
    } else if (json_object_has_member(o, "alternate")) {
        t = add_type(s, json_object_get_string_member(o, "alternate"),
                     K_ALTERNATE);
        t->alts = string_list(json_object_get_array_member(o, "data"));
    } else {
        return bad(error, "unknown kind of type");
    }
    t->checked_by_block = !g_strcmp0(
        json_object_get_string_member_with_default(o, "checked-by", NULL),
        "block");
    return true;
}

/* Arguments given inline become an anonymous struct, named as QEMU
 * names them. */
static char *arg_type(StrataQmpSchema *s, const char *owner, JsonNode *data,
                      GError **error)
{
    if (!data) {
        return g_strdup("q_empty");
    }
    if (JSON_NODE_HOLDS_VALUE(data)) {
        return g_strdup(json_node_get_string(data));
    }
    if (!JSON_NODE_HOLDS_OBJECT(data)) {
        bad(error, "arguments must be an object or a type name");
        return NULL;
    }
    g_autofree char *name = g_strdup_printf("q_obj_%s-arg", owner);
    SchemaType *t = add_type(s, name, K_STRUCT);
    t->members = parse_members(s, json_node_get_object(data), error);
    return t->members ? g_steal_pointer(&name) : NULL;
}

static bool check_ref(StrataQmpSchema *s, const char *name, GError **error)
{
    if (!g_hash_table_contains(s->types, name)) {
        g_autofree char *msg = g_strdup_printf("unknown type '%s'", name);
        return bad(error, msg);
    }
    return true;
}

static bool check_refs(StrataQmpSchema *s, GError **error)
{
    for (guint i = 0; i < s->type_order->len; i++) {
        SchemaType *t = s->type_order->pdata[i];
        for (guint j = 0; t->members && j < t->members->len; j++) {
            if (!check_ref(s, ((Member *)t->members->pdata[j])->type,
                           error)) {
                return false;
            }
        }
        for (guint j = 1; t->variants && j < t->variants->len; j += 2) {
            if (!check_ref(s, t->variants->pdata[j], error)) {
                return false;
            }
        }
        for (guint j = 0; t->alts && j < t->alts->len; j++) {
            if (!check_ref(s, t->alts->pdata[j], error)) {
                return false;
            }
        }
        if (t->elem && !check_ref(s, t->elem, error)) {
            return false;
        }
    }
    for (guint i = 0; i < s->commands->len; i++) {
        Command *c = s->commands->pdata[i];
        if (!check_ref(s, c->arg_type, error) ||
            !check_ref(s, c->ret_type, error)) {
            return false;
        }
    }
    return true;
}

StrataQmpSchema *strata_qmp_schema_new_from_text(const char *text,
                                                 GError **error)
{
    g_autoptr(JsonParser) parser = json_parser_new();
    g_autoptr(StrataQmpSchema) s = g_new0(StrataQmpSchema, 1);
    JsonObject *root;
    JsonArray *arr;

    s->types = g_hash_table_new(g_str_hash, g_str_equal);
    s->type_order = g_ptr_array_new_with_free_func((GDestroyNotify)type_free);
    s->commands =
        g_ptr_array_new_with_free_func((GDestroyNotify)command_free);
    s->cmd_by_name = g_hash_table_new(g_str_hash, g_str_equal);
    s->cmd_names = g_ptr_array_new();
    s->events = g_ptr_array_new_with_free_func((GDestroyNotify)command_free);

    if (!json_parser_load_from_data(parser, text, -1, error)) {
        return NULL;
    }
    if (!JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser))) {
        bad(error, "not an object");
        return NULL;
    }
    root = json_node_get_object(json_parser_get_root(parser));
    add_type(s, "q_empty", K_STRUCT)->members =
        g_ptr_array_new_with_free_func((GDestroyNotify)member_free);

    arr = json_object_get_array_member(root, "types");
    for (guint i = 0; arr && i < json_array_get_length(arr); i++) {
        if (!parse_type(s, json_array_get_object_element(arr, i), error)) {
            return NULL;
        }
    }
    arr = json_object_get_array_member(root, "commands");
    for (guint i = 0; arr && i < json_array_get_length(arr); i++) {
        JsonObject *o = json_array_get_object_element(arr, i);
        Command *c = g_new0(Command, 1);
        g_ptr_array_add(s->commands, c);
        c->name = g_strdup(json_object_get_string_member(o, "command"));
        c->boxed = json_object_get_boolean_member_with_default(o, "boxed",
                                                               FALSE);
        c->arg_type = arg_type(s, c->name, json_object_get_member(o, "data"),
                               error);
        if (!c->arg_type) {
            return NULL;
        }
        JsonNode *r = json_object_get_member(o, "returns");
        c->ret_type = r ? type_ref(s, r, error) : g_strdup("q_empty");
        if (!c->ret_type) {
            return NULL;
        }
        g_hash_table_insert(s->cmd_by_name, c->name, c);
        g_ptr_array_add(s->cmd_names, c->name);
    }
    arr = json_object_get_array_member(root, "events");
    for (guint i = 0; arr && i < json_array_get_length(arr); i++) {
        JsonObject *o = json_array_get_object_element(arr, i);
        Command *c = g_new0(Command, 1);
        g_ptr_array_add(s->events, c);
        c->name = g_strdup(json_object_get_string_member(o, "event"));
        c->arg_type = arg_type(s, c->name, json_object_get_member(o, "data"),
                               error);
        if (!c->arg_type) {
            return NULL;
        }
    }
    if (!check_refs(s, error)) {
        return NULL;
    }
    return g_steal_pointer(&s);
}

StrataQmpSchema *strata_qmp_schema_new(GError **error)
{
    return strata_qmp_schema_new_from_text(strata_qmp_schema_text, error);
}

bool strata_qmp_schema_has_command(StrataQmpSchema *s, const char *name)
{
    return g_hash_table_contains(s->cmd_by_name, name);
}

const GPtrArray *strata_qmp_schema_commands(StrataQmpSchema *s)
{
    return s->cmd_names;
}

/* ------------------------------------------------------------------ */
/* Checking arguments                                                  */
/* ------------------------------------------------------------------ */

static bool type_error(const char *path, const char *expected,
                       GError **error)
{
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Invalid parameter type for '%s', expected: %s",
                path, expected);
    return false;
}

static bool is_type(JsonNode *v, GType type)
{
    return JSON_NODE_HOLDS_VALUE(v) && json_node_get_value_type(v) == type;
}

static char *join(const char *prefix, const char *name)
{
    return *prefix ? g_strdup_printf("%s.%s", prefix, name)
                   : g_strdup(name);
}

static bool check_value(StrataQmpSchema *s, const char *type_name,
                        JsonNode *v, const char *path, bool in_list,
                        GError **error);

static bool check_members(StrataQmpSchema *s, GPtrArray *members,
                          JsonObject *obj, const char *prefix,
                          GHashTable *known, GError **error)
{
    for (guint i = 0; i < members->len; i++) {
        Member *m = members->pdata[i];
        JsonNode *v = json_object_get_member(obj, m->name);
        g_autofree char *path = join(prefix, m->name);

        g_hash_table_add(known, m->name);
        if (!v) {
            if (!m->optional) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' is missing", path);
                return false;
            }
            continue;
        }
        if (!check_value(s, m->type, v, path, false, error)) {
            return false;
        }
    }
    return true;
}

static bool check_object(StrataQmpSchema *s, SchemaType *t, JsonNode *v,
                         const char *path, GError **error)
{
    g_autoptr(GHashTable) known = NULL;
    JsonObject *obj;
    JsonObjectIter it;
    const char *key;
    JsonNode *member;

    if (!JSON_NODE_HOLDS_OBJECT(v)) {
        return type_error(path, "object", error);
    }
    if (t->checked_by_block) {
        return true;
    }
    obj = json_node_get_object(v);
    known = g_hash_table_new(g_str_hash, g_str_equal);
    if (!check_members(s, t->members, obj, path, known, error)) {
        return false;
    }
    if (t->kind == K_UNION) {
        const char *tag = json_object_get_string_member_with_default(
            obj, t->discriminator, NULL);
        for (guint i = 0; tag && i < t->variants->len; i += 2) {
            if (!strcmp(t->variants->pdata[i], tag)) {
                SchemaType *vt = g_hash_table_lookup(s->types,
                                                     t->variants->pdata[i + 1]);
                if (!check_members(s, vt->members, obj, path, known,
                                   error)) {
                    return false;
                }
            }
        }
    }
    json_object_iter_init_ordered(&it, obj);
    while (json_object_iter_next_ordered(&it, &key, &member)) {
        if (!g_hash_table_contains(known, key)) {
            g_autofree char *p = join(path, key);
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter '%s' is unexpected", p);
            return false;
        }
    }
    return true;
}

static bool check_value(StrataQmpSchema *s, const char *type_name,
                        JsonNode *v, const char *path, bool in_list,
                        GError **error)
{
    SchemaType *t = g_hash_table_lookup(s->types, type_name);

    g_return_val_if_fail(t != NULL, false);
    switch (t->kind) {
    case K_BUILTIN:
        if (!strcmp(t->name, "any")) {
            return true;
        }
        if (!strcmp(t->name, "str")) {
            return is_type(v, G_TYPE_STRING) ? true
                : type_error(path, "string", error);
        }
        if (!strcmp(t->name, "int")) {
            return is_type(v, G_TYPE_INT64) ? true
                : type_error(path, "integer", error);
        }
        if (!strcmp(t->name, "bool")) {
            return is_type(v, G_TYPE_BOOLEAN) ? true
                : type_error(path, "boolean", error);
        }
        if (!strcmp(t->name, "number")) {
            return is_type(v, G_TYPE_INT64) || is_type(v, G_TYPE_DOUBLE)
                ? true : type_error(path, "number", error);
        }
        if (!strcmp(t->name, "null")) {
            return JSON_NODE_HOLDS_NULL(v) ? true
                : type_error(path, "null", error);
        }
        return true;
    case K_ENUM: {
        const char *val;
        if (!is_type(v, G_TYPE_STRING)) {
            return type_error(path, "string", error);
        }
        val = json_node_get_string(v);
        for (guint i = 0; i < t->values->len; i++) {
            if (!strcmp(t->values->pdata[i], val)) {
                return true;
            }
        }
        /* QEMU names a list element 'null' in this one message. */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s' does not accept value '%s'",
                    in_list ? "null" : path, val);
        return false;
    }
    case K_STRUCT:
    case K_UNION:
        return check_object(s, t, v, path, error);
    case K_ALTERNATE:
        for (guint i = 0; i < t->alts->len; i++) {
            SchemaType *a = g_hash_table_lookup(s->types, t->alts->pdata[i]);
            bool match;
            switch (a->kind) {
            case K_BUILTIN:
                match = (!strcmp(a->name, "str") &&
                         is_type(v, G_TYPE_STRING)) ||
                        (!strcmp(a->name, "null") && JSON_NODE_HOLDS_NULL(v));
                break;
            case K_STRUCT:
            case K_UNION:
                match = JSON_NODE_HOLDS_OBJECT(v);
                break;
            default:
                match = false;
            }
            if (match) {
                return check_value(s, a->name, v, path, in_list, error);
            }
        }
        return type_error(path, t->name, error);
    case K_ARRAY:
        if (!JSON_NODE_HOLDS_ARRAY(v)) {
            return type_error(path, "array", error);
        }
        for (guint i = 0; i < json_array_get_length(json_node_get_array(v));
             i++) {
            g_autofree char *p = g_strdup_printf("%s[%u]", path, i);
            if (!check_value(s, t->elem,
                             json_array_get_element(json_node_get_array(v),
                                                    i),
                             p, true, error)) {
                return false;
            }
        }
        return true;
    }
    return true;
}

bool strata_qmp_schema_check_args(StrataQmpSchema *s, const char *command,
                                  JsonObject *args, GError **error)
{
    Command *c = g_hash_table_lookup(s->cmd_by_name, command);
    g_autoptr(JsonNode) n = json_node_alloc();

    g_return_val_if_fail(c != NULL, false);
    json_node_init_object(n, args);
    return check_value(s, c->arg_type, n, "", false, error);
}

/* ------------------------------------------------------------------ */
/* Introspection                                                       */
/* ------------------------------------------------------------------ */

static JsonObject *info(const char *name, const char *meta)
{
    JsonObject *o = json_object_new();
    json_object_set_string_member(o, "name", name);
    json_object_set_string_member(o, "meta-type", meta);
    return o;
}

static JsonArray *members_info(GPtrArray *members)
{
    JsonArray *arr = json_array_new();

    for (guint i = 0; members && i < members->len; i++) {
        Member *m = members->pdata[i];
        JsonObject *o = json_object_new();
        json_object_set_string_member(o, "name", m->name);
        json_object_set_string_member(o, "type", m->type);
        if (m->optional) {
            /* SchemaInfo marks an optional member with "default": null;
             * the real default is in the docs. */
            json_object_set_null_member(o, "default");
        }
        json_array_add_object_element(arr, o);
    }
    return arr;
}

JsonNode *strata_qmp_schema_introspect(StrataQmpSchema *s)
{
    JsonArray *arr = json_array_new();
    JsonNode *ret = json_node_alloc();

    for (guint i = 0; i < s->commands->len; i++) {
        Command *c = s->commands->pdata[i];
        JsonObject *o = info(c->name, "command");
        json_object_set_string_member(o, "arg-type", c->arg_type);
        json_object_set_string_member(o, "ret-type", c->ret_type);
        json_array_add_object_element(arr, o);
    }
    for (guint i = 0; i < s->events->len; i++) {
        Command *c = s->events->pdata[i];
        JsonObject *o = info(c->name, "event");
        json_object_set_string_member(o, "arg-type", c->arg_type);
        json_array_add_object_element(arr, o);
    }
    for (guint i = 0; i < s->type_order->len; i++) {
        SchemaType *t = s->type_order->pdata[i];
        JsonObject *o;
        switch (t->kind) {
        case K_BUILTIN:
            o = info(t->name, "builtin");
            json_object_set_string_member(o, "json-type", t->json_type);
            break;
        case K_ENUM: {
            JsonArray *members = json_array_new();
            JsonArray *values = json_array_new();
            o = info(t->name, "enum");
            for (guint j = 0; j < t->values->len; j++) {
                JsonObject *m = json_object_new();
                json_object_set_string_member(m, "name", t->values->pdata[j]);
                json_array_add_object_element(members, m);
                json_array_add_string_element(values, t->values->pdata[j]);
            }
            json_object_set_array_member(o, "members", members);
            json_object_set_array_member(o, "values", values);
            break;
        }
        case K_STRUCT:
            o = info(t->name, "object");
            json_object_set_array_member(o, "members",
                                         members_info(t->members));
            break;
        case K_UNION: {
            JsonArray *variants = json_array_new();
            o = info(t->name, "object");
            json_object_set_array_member(o, "members",
                                         members_info(t->members));
            json_object_set_string_member(o, "tag", t->discriminator);
            for (guint j = 0; j < t->variants->len; j += 2) {
                JsonObject *v = json_object_new();
                json_object_set_string_member(v, "case", t->variants->pdata[j]);
                json_object_set_string_member(v, "type",
                                              t->variants->pdata[j + 1]);
                json_array_add_object_element(variants, v);
            }
            json_object_set_array_member(o, "variants", variants);
            break;
        }
        case K_ALTERNATE: {
            JsonArray *members = json_array_new();
            o = info(t->name, "alternate");
            for (guint j = 0; j < t->alts->len; j++) {
                JsonObject *m = json_object_new();
                json_object_set_string_member(m, "type", t->alts->pdata[j]);
                json_array_add_object_element(members, m);
            }
            json_object_set_array_member(o, "members", members);
            break;
        }
        case K_ARRAY:
        default:
            o = info(t->name, "array");
            json_object_set_string_member(o, "element-type", t->elem);
            break;
        }
        json_array_add_object_element(arr, o);
    }
    json_node_init_array(ret, arr);
    json_array_unref(arr);
    return ret;
}
