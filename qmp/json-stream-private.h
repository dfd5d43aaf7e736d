/* strata — splitting a QMP byte stream into JSON texts, and writing JSON
 * the way QEMU's monitor does. */
#ifndef STRATA_JSON_STREAM_PRIVATE_H
#define STRATA_JSON_STREAM_PRIVATE_H

#include <stdbool.h>
#include <stddef.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of token text one JSON text may hold (whitespace not counted).
 * QEMU allows 64 MiB; a QMP command is a few KiB, so 16 MiB leaves room
 * for any real command while bounding what a hostile client costs. */
#define STRATA_JSON_MAX_TEXT (16u << 20)
/* Tokens one text may hold: each becomes a value in memory when the
 * text is parsed, so this bounds what parsing one text can cost. */
#define STRATA_JSON_MAX_TOKENS (1u << 18)
/* Open brackets and braces one text may nest, as QEMU. */
#define STRATA_JSON_MAX_DEPTH 1024

typedef struct StrataJsonStream StrataJsonStream;

/**
 * StrataJsonStreamFunc:
 * @value: (transfer full) (nullable): the parsed text, or NULL with @error
 * @error: (transfer full) (nullable): why the text was refused; its
 *   message is the QMP "desc" ("JSON parse error, expecting value")
 *
 * Called once per complete JSON text or per error, in input order.
 */
typedef void (*StrataJsonStreamFunc)(JsonNode *value, GError *error,
                                     void *opaque);

StrataJsonStream *strata_json_stream_new(StrataJsonStreamFunc fn,
                                         void *opaque);
void strata_json_stream_free(StrataJsonStream *js);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataJsonStream, strata_json_stream_free)

/* Feeds @len bytes; calls the callback for every text completed by
 * them.  The callback may not free the stream. */
void strata_json_stream_feed(StrataJsonStream *js, const char *buf,
                             size_t len);

/* End of input: a number or keyword waiting for its terminator is
 * completed; an unfinished text is dropped silently (as QEMU does). */
void strata_json_stream_flush(StrataJsonStream *js);

/* Bytes currently held for the unfinished text (for tests). */
size_t strata_json_stream_pending(StrataJsonStream *js);

/**
 * strata_json_parse_text:
 *
 * Parses one complete JSON text with QMP's extensions (single-quoted
 * strings) and QEMU's error messages.
 *
 * Returns: (transfer full) (nullable): the value.
 */
JsonNode *strata_json_parse_text(const char *text, GError **error);

/**
 * strata_json_write:
 *
 * Appends @node to @out as QEMU's monitor writes JSON: ", " and ": "
 * separators, members in insertion order, non-ASCII as a backslash-u
 * escape with four upper-case hex digits.
 */
void strata_json_write(GString *out, JsonNode *node);

/* Returns: (transfer full): @node as QEMU writes it. */
char *strata_json_to_string(JsonNode *node);

/* As strata_json_to_string(), but an object found in @texts (JsonObject *
 * → its text as written here) is copied from there instead of written
 * member by member.  Whoever fills @texts keeps each text true: only
 * sealed objects belong in it. */
char *strata_json_to_string_with(JsonNode *node, GHashTable *texts);

/* Returns: (transfer full): @node pretty-printed (4-space indent). */
char *strata_json_to_pretty_string(JsonNode *node);

#ifdef __cplusplus
}
#endif

#endif
