/* strata — checking and reading blockdev options.
 *
 * Options arrive as a JsonObject, either from JSON (typed values) or from
 * QEMU's key=value syntax (every scalar a string).  strata_opts_validate()
 * checks them against a driver's table, converts strings to the expected
 * types in place, and words its errors as QEMU's QAPI does so that
 * scripts see the same messages.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block-private.h"

static const StrataOptDesc *find_desc(const StrataOptDesc *const *tables,
                                      const char *path)
{
    for (unsigned t = 0; tables[t]; t++) {
        for (const StrataOptDesc *d = tables[t]; d->name; d++) {
            if (strcmp(d->name, path) == 0) {
                return d;
            }
        }
    }
    return NULL;
}

/* Whether some option lives inside the object at @path ("cache" for
 * "cache.direct"). */
static bool has_nested(const StrataOptDesc *const *tables, const char *path)
{
    size_t len = strlen(path);

    for (unsigned t = 0; tables[t]; t++) {
        for (const StrataOptDesc *d = tables[t]; d->name; d++) {
            if (strncmp(d->name, path, len) == 0 && d->name[len] == '.') {
                return true;
            }
        }
    }
    return false;
}

static bool parse_bool_string(const char *s, bool *out)
{
    if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true")) {
        *out = true;
        return true;
    }
    if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false")) {
        *out = false;
        return true;
    }
    return false;
}

static bool parse_int_string(const char *s, int64_t *out)
{
    char *end;

    if (!*s) {
        return false;
    }
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || *end) {
        return false;
    }
    *out = v;
    return true;
}

/* Sizes in key=value syntax accept a suffix k, M, G, T, P, E (powers of
 * 1024) and a bare number of bytes, as QEMU's size parser does. */
static bool parse_size_string(const char *s, uint64_t *out)
{
    char *end;

    if (!*s || *s == '-') {
        return false;
    }
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno) {
        return false;
    }
    unsigned shift = 0;
    switch (*end) {
    case '\0':
        break;
    case 'b': case 'B': shift = 0; end++; break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    case 'p': case 'P': shift = 50; end++; break;
    case 'e': case 'E': shift = 60; end++; break;
    default:
        return false;
    }
    if (*end) {
        return false;
    }
    if (shift && v > (UINT64_MAX >> shift)) {
        return false;
    }
    *out = (uint64_t)v << shift;
    return true;
}

static const char *json_type_name(StrataOptType type)
{
    switch (type) {
    case STRATA_OPT_STRING:
    case STRATA_OPT_ENUM:
        return "string";
    case STRATA_OPT_BOOL:
        return "boolean";
    case STRATA_OPT_INT:
    case STRATA_OPT_SIZE:
        return "integer";
    case STRATA_OPT_CHILD:
        return "BlockdevRef";
    case STRATA_OPT_CHILD_OR_NULL:
        return "BlockdevRefOrNull";
    case STRATA_OPT_ANY:
        return "any";
    }
    return "value";
}

static bool is_string_node(JsonNode *n)
{
    return JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_STRING;
}

static bool is_int_node(JsonNode *n)
{
    return JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_INT64;
}

static bool is_bool_node(JsonNode *n)
{
    return JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_BOOLEAN;
}

static bool check_value(JsonObject *obj, const char *member,
                        const StrataOptDesc *d, const char *path,
                        bool strings_only, GError **error)
{
    JsonNode *n = json_object_get_member(obj, member);

    if (d->type == STRATA_OPT_ANY) {
        return true;
    }
    if (d->type == STRATA_OPT_CHILD || d->type == STRATA_OPT_CHILD_OR_NULL) {
        if (is_string_node(n) || JSON_NODE_HOLDS_OBJECT(n)) {
            return true;
        }
        if (d->type == STRATA_OPT_CHILD_OR_NULL && JSON_NODE_HOLDS_NULL(n)) {
            return true;
        }
        goto bad_type;
    }

    if (strings_only && is_string_node(n) && d->type != STRATA_OPT_STRING &&
        d->type != STRATA_OPT_ENUM) {
        const char *s = json_node_get_string(n);
        bool b;
        int64_t i;
        uint64_t u;

        switch (d->type) {
        case STRATA_OPT_BOOL:
            if (!parse_bool_string(s, &b)) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' expects 'on' or 'off'", path);
                return false;
            }
            json_object_set_boolean_member(obj, member, b);
            return true;
        case STRATA_OPT_INT:
            /* qemu-img's --image-opts takes "1G" where an integer
             * goes; so does strata's key=value text. */
            if (!parse_int_string(s, &i) &&
                !(parse_size_string(s, &u) && u <= INT64_MAX &&
                  (i = (int64_t)u, true))) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' expects an integer", path);
                return false;
            }
            json_object_set_int_member(obj, member, i);
            return true;
        case STRATA_OPT_SIZE:
            if (!parse_size_string(s, &u) || u > INT64_MAX) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' expects a size value", path);
                return false;
            }
            json_object_set_int_member(obj, member, (int64_t)u);
            return true;
        default:
            break;
        }
    }

    switch (d->type) {
    case STRATA_OPT_STRING:
        if (!is_string_node(n)) {
            goto bad_type;
        }
        return true;
    case STRATA_OPT_ENUM:
        if (!is_string_node(n)) {
            goto bad_type;
        }
        for (unsigned k = 0; d->enum_values && d->enum_values[k]; k++) {
            if (!strcmp(d->enum_values[k], json_node_get_string(n))) {
                return true;
            }
        }
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s' does not accept value '%s'", path,
                    json_node_get_string(n));
        return false;
    case STRATA_OPT_BOOL:
        if (!is_bool_node(n)) {
            goto bad_type;
        }
        return true;
    case STRATA_OPT_INT:
        if (!is_int_node(n)) {
            goto bad_type;
        }
        return true;
    case STRATA_OPT_SIZE:
        if (!is_int_node(n)) {
            goto bad_type;
        }
        if (json_node_get_int(n) < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter '%s' expects uint64", path);
            return false;
        }
        return true;
    default:
        break;
    }

bad_type:
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Invalid parameter type for '%s', expected: %s", path,
                json_type_name(d->type));
    return false;
}

static bool validate_object(JsonObject *obj, const char *prefix,
                            const StrataOptDesc *const *tables,
                            bool strings_only, GError **error)
{
    g_autoptr(GList) members = json_object_get_members(obj);

    for (GList *l = members; l; l = l->next) {
        const char *member = l->data;
        g_autofree char *path = prefix ? g_strdup_printf("%s.%s", prefix,
                                                         member)
                                       : g_strdup(member);
        const StrataOptDesc *d = find_desc(tables, path);
        JsonNode *n = json_object_get_member(obj, member);

        if (d) {
            if (!check_value(obj, member, d, path, strings_only, error)) {
                return false;
            }
            continue;
        }
        if (has_nested(tables, path)) {
            if (!JSON_NODE_HOLDS_OBJECT(n)) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Invalid parameter type for '%s', expected: "
                            "object", path);
                return false;
            }
            if (!validate_object(json_node_get_object(n), path, tables,
                                 strings_only, error)) {
                return false;
            }
            continue;
        }
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s' is unexpected", path);
        return false;
    }
    return true;
}

/* Finds the JsonNode at a dotted @name, or NULL. */
static JsonNode *lookup(JsonObject *options, const char *name)
{
    const char *dot = strchr(name, '.');

    if (!options) {
        return NULL;
    }
    if (!dot) {
        return json_object_get_member(options, name);
    }
    g_autofree char *head = g_strndup(name, dot - name);
    JsonNode *n = json_object_get_member(options, head);
    if (!n || !JSON_NODE_HOLDS_OBJECT(n)) {
        return NULL;
    }
    return lookup(json_node_get_object(n), dot + 1);
}

bool strata_opts_validate(JsonObject *options,
                          const StrataOptDesc *const *descs,
                          bool strings_only, GError **error)
{
    if (!validate_object(options, NULL, descs, strings_only, error)) {
        return false;
    }
    for (unsigned t = 0; descs[t]; t++) {
        for (const StrataOptDesc *d = descs[t]; d->name; d++) {
            if (d->required && !lookup(options, d->name)) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' is missing", d->name);
                return false;
            }
        }
    }
    return true;
}

bool strata_opts_has(JsonObject *options, const char *name)
{
    JsonNode *n = lookup(options, name);
    return n && !JSON_NODE_HOLDS_NULL(n);
}

const char *strata_opts_get_string(JsonObject *options, const char *name,
                                   const char *def)
{
    JsonNode *n = lookup(options, name);
    return n && is_string_node(n) ? json_node_get_string(n) : def;
}

bool strata_opts_get_bool(JsonObject *options, const char *name, bool def)
{
    JsonNode *n = lookup(options, name);
    bool b;

    if (!n) {
        return def;
    }
    if (is_bool_node(n)) {
        return json_node_get_boolean(n);
    }
    if (is_string_node(n) && parse_bool_string(json_node_get_string(n), &b)) {
        return b;
    }
    return def;
}

int64_t strata_opts_get_int(JsonObject *options, const char *name,
                            int64_t def)
{
    JsonNode *n = lookup(options, name);
    int64_t i;

    if (!n) {
        return def;
    }
    if (is_int_node(n)) {
        return json_node_get_int(n);
    }
    if (is_string_node(n) && parse_int_string(json_node_get_string(n), &i)) {
        return i;
    }
    return def;
}

uint64_t strata_opts_get_size(JsonObject *options, const char *name,
                              uint64_t def)
{
    JsonNode *n = lookup(options, name);
    uint64_t u;

    if (!n) {
        return def;
    }
    if (is_int_node(n) && json_node_get_int(n) >= 0) {
        return (uint64_t)json_node_get_int(n);
    }
    if (is_string_node(n) && parse_size_string(json_node_get_string(n), &u)) {
        return u;
    }
    return def;
}

char *strata_opts_to_json_name(JsonObject *options)
{
    g_autoptr(JsonBuilder) b = json_builder_new();
    g_autoptr(GList) members = json_object_get_members(options);
    JsonNode *drv = json_object_get_member(options, "driver");

    /* "driver" first, as QEMU prints it; node-name is not part of the
     * image's identity. */
    json_builder_begin_object(b);
    if (drv) {
        json_builder_set_member_name(b, "driver");
        json_builder_add_value(b, json_node_copy(drv));
    }
    for (GList *l = members; l; l = l->next) {
        const char *m = l->data;
        if (!strcmp(m, "driver") || !strcmp(m, "node-name")) {
            continue;
        }
        json_builder_set_member_name(b, m);
        json_builder_add_value(b,
                               json_node_copy(json_object_get_member(options,
                                                                     m)));
    }
    json_builder_end_object(b);

    g_autoptr(JsonGenerator) gen = json_generator_new();
    g_autoptr(JsonNode) root = json_builder_get_root(b);
    json_generator_set_root(gen, root);
    g_autofree char *text = json_generator_to_data(gen, NULL);
    return g_strdup_printf("json:%s", text);
}

JsonNode *strata_json_deep_copy(JsonNode *node)
{
    JsonNode *copy;

    if (!node) {
        return NULL;
    }
    /* json_node_copy() shares objects and arrays with the original;
     * option sets are edited in place (type conversion, inherited
     * options), so every level is copied here. */
    switch (json_node_get_node_type(node)) {
    case JSON_NODE_OBJECT: {
        JsonObject *src = json_node_get_object(node);
        JsonObject *dst = json_object_new();
        g_autoptr(GList) members = json_object_get_members(src);
        for (GList *l = members; l; l = l->next) {
            json_object_set_member(dst, l->data, strata_json_deep_copy(
                json_object_get_member(src, l->data)));
        }
        copy = json_node_alloc();
        json_node_take_object(json_node_init(copy, JSON_NODE_OBJECT), dst);
        return copy;
    }
    case JSON_NODE_ARRAY: {
        JsonArray *src = json_node_get_array(node);
        JsonArray *dst = json_array_sized_new(json_array_get_length(src));
        for (guint i = 0; i < json_array_get_length(src); i++) {
            json_array_add_element(dst, strata_json_deep_copy(
                json_array_get_element(src, i)));
        }
        copy = json_node_alloc();
        json_node_take_array(json_node_init(copy, JSON_NODE_ARRAY), dst);
        return copy;
    }
    default:
        return json_node_copy(node);
    }
}

JsonObject *strata_json_object_deep_copy(JsonObject *object)
{
    g_autoptr(JsonNode) wrap = json_node_alloc();
    g_autoptr(JsonNode) copy = NULL;

    json_node_init_object(wrap, object);
    copy = strata_json_deep_copy(wrap);
    return json_object_ref(json_node_get_object(copy));
}
