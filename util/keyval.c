/* strata — QEMU's key=value option syntax into a JsonObject.
 *
 * The text is a comma-separated list of key=value elements.  A key is a
 * path of segments joined by '.'; a segment is a name (a letter, then
 * letters, digits, '-' or '_') or, below the top level, a decimal index.
 * Paths build nested objects; an object whose members are all indexes
 * becomes an array once the whole text is read, which is why arrays may
 * be written in any order but must not have gaps.  In a value, ",,"
 * stands for one comma.  docs/keyval.md has the user's view.
 *
 * Unlike QEMU, which keeps the last of repeated keys, a repeated key is
 * an error here: in a command line it is almost always a mistake.
 */
#include <string.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-util.h"
#include "keyval-private.h"

/* As QEMU: a key segment has 1 to 127 characters. */
#define KEY_SEGMENT_MAX 127
/* Bounds recursion (here and in json-glib) for hostile input. */
#define KEY_DEPTH_MAX 64
#define JSON_DEPTH_MAX 512
/* Keys quoted in messages are clipped to this many bytes. */
#define MESSAGE_KEY_MAX 80

/*
 * A key as it may appear in an error message: bytes that are not
 * printable ASCII are written as \xNN (the message must be UTF-8 even
 * when the input is not), and a very long key is clipped.
 */
static char *
quote_key(const char *key, size_t len)
{
    GString *s = g_string_sized_new(MIN(len, MESSAGE_KEY_MAX) + 8);

    for (size_t i = 0; i < len && i < MESSAGE_KEY_MAX; i++) {
        unsigned char c = (unsigned char)key[i];
        if (c >= 0x20 && c < 0x7f) {
            g_string_append_c(s, (char)c);
        } else {
            g_string_append_printf(s, "\\x%02x", c);
        }
    }
    if (len > MESSAGE_KEY_MAX) {
        g_string_append(s, "...");
    }
    return g_string_free(s, FALSE);
}

/* Sets "<before> '<key>'<after>" and returns false. */
static bool
set_key_error(GError **error, const char *before, const char *key,
              size_t len, const char *after)
{
    g_autofree char *quoted = quote_key(key, len);
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "%s '%s'%s", before, quoted, after);
    return false;
}

static bool
is_name_char(char c)
{
    return g_ascii_isalnum(c) || c == '-' || c == '_';
}

static bool
is_index(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (!g_ascii_isdigit(s[i])) {
            return false;
        }
    }
    return len > 0;
}

/* An index's member name: its digits without leading zeros, so that
 * "a.01" and "a.1" are the same element. */
static char *
index_name(const char *s, size_t len)
{
    while (len > 1 && *s == '0') {
        s++;
        len--;
    }
    return g_strndup(s, len);
}

/*
 * Checks the key [@key, @key + @len) and splits it into member names
 * (indexes normalised).  Returns: (transfer full) NULL-terminated names,
 * or NULL with @error set.  *@seg_ends receives, per segment, the offset
 * just past it in @key, so messages can quote the key up to a segment.
 */
static char **
split_key(const char *key, size_t len, size_t **seg_ends, GError **error)
{
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    g_autofree size_t *ends = g_new(size_t, KEY_DEPTH_MAX);
    size_t pos = 0;

    for (;;) {
        size_t start = pos;
        while (pos < len && key[pos] != '.') {
            pos++;
        }
        size_t seg = pos - start;
        const char *s = key + start;

        if (seg == 0) {
            set_key_error(error, "Invalid parameter", key, len,
                          len == 0 ? ": the key is empty"
                                   : ": a key segment is empty");
            return NULL;
        }
        if (seg > KEY_SEGMENT_MAX) {
            set_key_error(error, "Parameter", key, len,
                          " is too long: a key segment may have at most "
                          G_STRINGIFY(KEY_SEGMENT_MAX) " characters");
            return NULL;
        }
        if (names->len == KEY_DEPTH_MAX) {
            set_key_error(error, "Parameter", key, len,
                          " is nested too deeply: a key may have at most "
                          G_STRINGIFY(KEY_DEPTH_MAX) " segments");
            return NULL;
        }
        if (start != 0 && is_index(s, seg)) {
            g_ptr_array_add(names, index_name(s, seg));
        } else {
            if (!g_ascii_isalpha(s[0])) {
                set_key_error(error, "Invalid parameter", key, len,
                              start == 0 && is_index(s, seg)
                              ? ": an array index cannot come first"
                              : ": a key segment must start with a letter");
                return NULL;
            }
            for (size_t i = 1; i < seg; i++) {
                if (!is_name_char(s[i])) {
                    set_key_error(error, "Invalid parameter", key, len,
                                  ": a key may only hold letters, digits, "
                                  "'-', '_' and '.'");
                    return NULL;
                }
            }
            g_ptr_array_add(names, g_strndup(s, seg));
        }
        ends[names->len - 1] = pos;
        if (pos == len) {
            break;
        }
        pos++;  /* the '.' */
    }
    g_ptr_array_add(names, NULL);
    *seg_ends = g_steal_pointer(&ends);
    return (char **)g_ptr_array_free(g_steal_pointer(&names), FALSE);
}

/* Reads a value up to a single ',' (or the end); ",," is one comma.
 * *@pos is left on the next element. */
static char *
read_value(const char **pos)
{
    const char *s = *pos;
    GString *value = g_string_new(NULL);

    while (*s != '\0') {
        if (*s == ',') {
            s++;
            if (*s != ',') {
                break;
            }
        }
        g_string_append_c(value, *s++);
    }
    *pos = s;
    return g_string_free(value, FALSE);
}

/* Stores @value (transfer full) at the path @names below @root. */
static bool
put_value(JsonObject *root, const char *key, size_t key_len, char **names,
          const size_t *seg_ends, char *value, GError **error)
{
    g_autofree char *owned = value;
    JsonObject *cur = root;

    for (size_t i = 0; names[i] != NULL; i++) {
        JsonNode *member = json_object_get_member(cur, names[i]);
        bool last = names[i + 1] == NULL;

        if (member != NULL) {
            if (!last && JSON_NODE_HOLDS_OBJECT(member)) {
                cur = json_node_get_object(member);
                continue;
            }
            if (last && !JSON_NODE_HOLDS_OBJECT(member)) {
                return set_key_error(error, "Parameter", key, key_len,
                                     " is given more than once");
            }
            return set_key_error(error, "Parameter", key, seg_ends[i],
                                 " is used both as a value and as an "
                                 "object");
        }
        if (last) {
            json_object_set_string_member(cur, names[i], owned);
            return true;
        }
        JsonObject *child = json_object_new();
        json_object_set_object_member(cur, names[i], child);
        cur = child;
    }
    g_assert_not_reached();
}

/* Parses one element at *@pos and moves *@pos past it. */
static bool
parse_element(JsonObject *root, const char **pos, const char *implied_key,
              GError **error)
{
    const char *p = *pos;
    size_t len = strcspn(p, "=,");
    const char *key = p;

    if (implied_key != NULL && len > 0 && p[len] != '=') {
        key = implied_key;
        len = strlen(implied_key);
    }

    g_autofree size_t *seg_ends = NULL;
    g_auto(GStrv) names = split_key(key, len, &seg_ends, error);
    if (names == NULL) {
        return false;
    }

    if (key != implied_key) {
        if (p[len] != '=') {
            return set_key_error(error, "Expected '=' after parameter",
                                 key, len, "");
        }
        p += len + 1;
    }

    char *value = read_value(&p);
    if (!g_utf8_validate(value, -1, NULL)) {
        g_free(value);
        return set_key_error(error, "Value of parameter", key, len,
                             " is not valid UTF-8");
    }
    if (!put_value(root, key, len, names, seg_ends, value, error)) {
        return false;
    }
    *pos = p;
    return true;
}

static bool
all_indexes(JsonObject *object, bool *any_index, bool *any_name)
{
    g_autoptr(GList) members = json_object_get_members(object);

    *any_index = false;
    *any_name = false;
    for (GList *l = members; l != NULL; l = l->next) {
        const char *name = l->data;
        if (is_index(name, strlen(name))) {
            *any_index = true;
        } else {
            *any_name = true;
        }
    }
    return *any_index && !*any_name;
}

/*
 * Turns every object below @object whose members are all indexes into
 * an array, depth first.  @path is the key of @object ("" for the root)
 * and is restored on return.
 */
static bool
make_arrays(JsonObject *object, GString *path, GError **error)
{
    g_autoptr(GList) members = json_object_get_members(object);
    size_t path_len = path->len;

    for (GList *l = members; l != NULL; l = l->next) {
        /* Replacing a member frees its name; keep our own copy. */
        g_autofree char *name = g_strdup(l->data);
        JsonNode *member = json_object_get_member(object, name);
        if (!JSON_NODE_HOLDS_OBJECT(member)) {
            continue;
        }
        JsonObject *child = json_node_get_object(member);

        if (path->len > 0) {
            g_string_append_c(path, '.');
        }
        g_string_append(path, name);
        if (!make_arrays(child, path, error)) {
            return false;
        }

        bool any_index, any_name;
        if (!all_indexes(child, &any_index, &any_name)) {
            if (any_index) {
                set_key_error(error, "Parameter", path->str, path->len,
                              " mixes array indexes and member names");
                return false;
            }
            g_string_truncate(path, path_len);
            continue;
        }

        /* n distinct indexes form an array only when they are 0..n-1. */
        guint n = json_object_get_size(child);
        g_autofree JsonNode **slots = g_new0(JsonNode *, n);
        g_autoptr(GList) indexes = json_object_get_members(child);
        for (GList *i = indexes; i != NULL; i = i->next) {
            const char *digits = i->data;
            if (strlen(digits) <= 9) {
                guint64 index = g_ascii_strtoull(digits, NULL, 10);
                if (index < n) {
                    slots[index] = json_object_get_member(child, digits);
                }
            }
        }
        JsonArray *array = json_array_sized_new(n);
        for (guint i = 0; i < n; i++) {
            if (slots[i] == NULL) {
                json_array_unref(array);
                g_autofree char *array_key = quote_key(path->str, path->len);
                g_autofree char *why = g_strdup_printf(
                    " is missing: the indexes of '%s' must count from 0 "
                    "without gaps", array_key);
                g_string_append_printf(path, ".%u", i);
                set_key_error(error, "Parameter", path->str, path->len, why);
                return false;
            }
            json_array_add_element(array, json_node_copy(slots[i]));
        }
        json_object_set_array_member(object, name, array);
        g_string_truncate(path, path_len);
    }
    return true;
}

bool
strata_keyval_is_json(const char *text)
{
    if (text == NULL) {
        return false;
    }
    while (g_ascii_isspace(*text)) {
        text++;
    }
    return *text == '{';
}

/*
 * json-glib takes several texts in a row and keeps the last, and it
 * recurses once per nesting level; reject both before it runs.
 */
static bool
check_json_shape(const char *text, GError **error)
{
    const char *p = text;
    int depth = 0;

    for (; *p != '\0'; p++) {
        char c = *p;
        if (c == '"' || c == '\'') {
            for (p++; *p != '\0' && *p != c; p++) {
                if (*p == '\\' && p[1] != '\0') {
                    p++;
                }
            }
            if (*p == '\0') {
                break;
            }
        } else if (c == '{' || c == '[') {
            if (++depth > JSON_DEPTH_MAX) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "JSON option text is nested more than %d "
                            "levels deep", JSON_DEPTH_MAX);
                return false;
            }
        } else if (c == '}' || c == ']') {
            if (--depth == 0) {
                p++;
                break;
            }
        }
    }
    if (depth > 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "JSON option text ends inside an object, array or "
                    "string");
        return false;
    }
    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (*p != '\0') {
        g_autofree char *rest = quote_key(p, strlen(p));
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Unexpected text after the JSON object: '%s'", rest);
        return false;
    }
    return true;
}

static JsonObject *
parse_json(const char *text, GError **error)
{
    if (!check_json_shape(text, error)) {
        return NULL;
    }

    g_autoptr(JsonParser) parser = json_parser_new();
    g_autoptr(GError) local = NULL;
    if (!json_parser_load_from_data(parser, text, -1, &local)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid JSON option text: %s", local->message);
        return NULL;
    }
    JsonNode *root = json_parser_get_root(parser);
    if (root == NULL || !JSON_NODE_HOLDS_OBJECT(root)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "JSON option text must be an object");
        return NULL;
    }
    return json_object_ref(json_node_get_object(root));
}

JsonObject *
strata_keyval_parse(const char *text, const char *implied_key,
                    GError **error)
{
    g_return_val_if_fail(text != NULL, NULL);
    g_return_val_if_fail(error == NULL || *error == NULL, NULL);

    if (strata_keyval_is_json(text)) {
        return parse_json(text, error);
    }

    /* No key starts with '[': say what is wrong with a JSON array
     * rather than complain about its first character.  With an implied
     * key it may be a value, such as "[::1]:10809". */
    const char *first = text;
    while (g_ascii_isspace(*first)) {
        first++;
    }
    if (*first == '[' && implied_key == NULL) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "JSON option text must be an object, not an array");
        return NULL;
    }

    g_autoptr(JsonObject) root = json_object_new();
    const char *pos = text;
    while (*pos != '\0') {
        if (!parse_element(root, &pos, implied_key, error)) {
            return NULL;
        }
        implied_key = NULL;
    }

    g_autoptr(GString) path = g_string_new(NULL);
    if (!make_arrays(root, path, error)) {
        return NULL;
    }
    return g_steal_pointer(&root);
}
