/* libFuzzer target: arbitrary bytes into the key=value parser.
 *
 * The parser must answer every input with an object or an error, never
 * crash, leak or read out of bounds; the sanitizers check the rest.
 * Both the plain and the implied-key forms are exercised: the first
 * input byte picks one.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <glib.h>

#include "keyval-private.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *implied = NULL;

    if (size > 0 && (data[0] & 1)) {
        implied = "driver";
    }
    /* The parser takes a C string: stop at an embedded NUL as it would. */
    char *text = g_malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';

    GError *error = NULL;
    JsonObject *obj = strata_keyval_parse(text, implied, &error);
    fuzz_check_outcome(obj, error);
    if (obj != NULL) {
        json_object_unref(obj);
    }
    g_clear_error(&error);
    g_free(text);
    return 0;
}
