/* strata — QEMU's key=value option syntax into a JsonObject. */
#ifndef STRATA_KEYVAL_PRIVATE_H
#define STRATA_KEYVAL_PRIVATE_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * strata_keyval_parse:
 * @text: "driver=qcow2,file.filename=a.qcow2,node-name=n", or a JSON
 *   object text "{...}"
 * @implied_key: (nullable): the key of a first element written without
 *   "key=" (as QEMU's "-blockdev" has none, but "--nbd-server" may);
 *   NULL to refuse such elements
 * @error: a clear message naming the offending key or position
 *
 * Dotted keys make nested objects ("file.filename=x" →
 * {"file": {"filename": "x"}}); a run of numeric keys "a.0", "a.1"
 * makes an array; ",," is a literal comma in a value.  Values stay
 * strings (the consumer converts them knowing the expected type); a
 * JSON text keeps its types.  Keys may be given once; a key that is
 * both a scalar and an object ("a=1,a.b=2") is an error.
 *
 * Returns: (transfer full) (nullable): the object, or NULL on error.
 */
JsonObject *strata_keyval_parse(const char *text, const char *implied_key,
                                GError **error);

/**
 * strata_keyval_is_json:
 *
 * Returns: whether @text is a JSON object text (first non-space '{').
 */
bool strata_keyval_is_json(const char *text);

#ifdef __cplusplus
}
#endif

#endif
