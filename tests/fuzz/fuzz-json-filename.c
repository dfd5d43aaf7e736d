/* libFuzzer target: arbitrary bytes after "json:", read as a
 * pseudo-filename (an image name, or a backing name from a header).
 *
 * Every input must give the options of a node or an error, never both
 * and never neither, without a crash, a leak or an out-of-bounds read.
 * A format is always given, as an overlay's header or qemu-img's -f
 * gives one, so nothing is probed: no file is read and no socket
 * opened.  Whatever comes back names that format as its driver.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <glib.h>

#include "block-private.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A C string, as a header's name is: stop at an embedded NUL. */
    char *spec = g_malloc(size + 6);
    GError *error = NULL;
    JsonObject *opts;

    memcpy(spec, "json:", 5);
    memcpy(spec + 5, data, size);
    spec[size + 5] = '\0';
    opts = strata_image_name_options(NULL, spec, "raw", &error);
    fuzz_check_outcome(opts, error);
    if (opts != NULL &&
        g_strcmp0(json_object_get_string_member_with_default(opts, "driver",
                                                             NULL),
                  "raw") != 0) {
        __builtin_trap();
    }
    if (opts != NULL) {
        json_object_unref(opts);
    }
    g_clear_error(&error);
    g_free(spec);
    return 0;
}
