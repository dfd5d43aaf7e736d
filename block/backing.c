/* strata — backing chains: finding layers, and the backing string an
 * overlay's header records.
 *
 * One rule for every writer of a backing string (snapshots, stream,
 * commit, change-backing-file): never a json: pseudo-filename, and never
 * a relative name that would resolve to another file from the overlay's
 * directory — the two ways QEMU 7.2 can leave an image that no longer
 * opens.
 */
#include <errno.h>
#include <string.h>

#include "block-private.h"
#include "driver.h"

const char *strata_node_image_filename(StrataNode *node)
{
    node = strata_node_skip_filters(node);
    while (node && (!node->filename || !*node->filename ||
                    g_str_has_prefix(node->filename, "json:")) &&
           node->file) {
        node = node->file->node;
    }
    return node && node->filename ? node->filename : NULL;
}

char *strata_path_relative_to(const char *path, const char *dir)
{
    g_auto(GStrv) p = g_strsplit(path + 1, "/", -1);
    g_auto(GStrv) d = g_strsplit(dir + 1, "/", -1);
    GString *out = g_string_new(NULL);
    guint i = 0;

    g_return_val_if_fail(g_path_is_absolute(path), NULL);
    g_return_val_if_fail(g_path_is_absolute(dir), NULL);

    if (!strcmp(dir, "/")) {
        g_free(d[0]);
        d[0] = NULL;
    }
    /* The last component of @path is a file: never shared with @dir. */
    while (p[i] && p[i + 1] && d[i] && !strcmp(p[i], d[i])) {
        i++;
    }
    for (guint j = i; d[j]; j++) {
        g_string_append(out, "../");
    }
    for (guint j = i; p[j]; j++) {
        g_string_append(out, p[j]);
        if (p[j + 1]) {
            g_string_append_c(out, '/');
        }
    }
    return g_string_free(out, FALSE);
}

char *strata_backing_string(StrataNode *base, const char *overlay_file)
{
    const char *name = strata_node_image_filename(base);
    g_autofree char *cwd = NULL;
    g_autofree char *abs_base = NULL;
    g_autofree char *abs_overlay = NULL;
    g_autofree char *ovdir = NULL;
    g_autofree char *as_written = NULL;

    if (!name) {
        return NULL;
    }
    if (g_path_is_absolute(name) || strchr(name, ':') || !overlay_file) {
        return g_strdup(name);
    }
    /* A relative name is read from the overlay's directory.  Keep the
     * name as the base was opened by (QEMU's choice) when it resolves to
     * the same file from there; otherwise say it from there. */
    cwd = g_get_current_dir();
    abs_base = g_canonicalize_filename(name, cwd);
    abs_overlay = g_canonicalize_filename(overlay_file, cwd);
    ovdir = g_path_get_dirname(abs_overlay);
    as_written = g_canonicalize_filename(name, ovdir);
    if (!strcmp(as_written, abs_base)) {
        return g_strdup(name);
    }
    return strata_path_relative_to(abs_base, ovdir);
}

bool strata_node_chain_contains(StrataNode *top, StrataNode *node,
                                bool include_top)
{
    StrataNode *n = include_top ? top : strata_node_backing(top);

    for (; n; n = strata_node_backing(n)) {
        if (n == node) {
            return true;
        }
    }
    return false;
}

StrataNode *strata_node_find_backing_image(StrataNode *top,
                                           const char *filename)
{
    g_autofree char *cwd = g_get_current_dir();
    g_autofree char *want = g_canonicalize_filename(filename, cwd);

    for (StrataNode *n = strata_node_backing(top); n;
         n = strata_node_backing(n)) {
        const char *fn = strata_node_image_filename(n);
        if (!fn) {
            continue;
        }
        g_autofree char *have = g_canonicalize_filename(fn, cwd);
        if (!strcmp(fn, filename) || !strcmp(have, want)) {
            return n;
        }
    }
    return NULL;
}

int strata_node_co_change_backing_file(StrataNode *node, const char *backing,
                                       const char *fmt, GError **error)
{
    int ret;

    node = strata_node_skip_filters(node);
    if (!node || !node->drv->co_change_backing_file) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Cannot change the backing file of a '%s' node",
                    node ? node->drv->name : "missing");
        return -ENOTSUP;
    }
    if (backing && g_str_has_prefix(backing, "json:")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Refusing to write the pseudo-filename '%s' into an "
                    "image header", backing);
        return -EINVAL;
    }
    ret = node->drv->co_change_backing_file(node, backing, fmt, error);
    if (ret < 0) {
        return ret;
    }
    /* The new name must survive a power cut as soon as we report it. */
    ret = strata_node_co_flush(node);
    if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not flush the new backing file name: %s",
                    g_strerror(-ret));
    }
    return ret;
}

typedef struct {
    StrataNode *node;
    const char *backing;
    const char *fmt;
    GError **error;
    int ret;
} RecordBacking;

static void record_backing_co(void *opaque)
{
    RecordBacking *r = opaque;

    r->ret = strata_node_co_change_backing_file(r->node, r->backing, r->fmt,
                                                r->error);
}

bool strata_node_record_backing(StrataNode *overlay, StrataNode *base,
                                const char *backing_file, GError **error)
{
    g_autofree char *derived = NULL;
    RecordBacking r = { overlay, NULL, NULL, error, 0 };

    g_return_val_if_fail(overlay != NULL, false);
    if (base) {
        StrataNode *data = strata_node_skip_filters(base);
        r.backing = backing_file;
        if (!r.backing) {
            derived = strata_backing_string(
                base, strata_node_image_filename(overlay));
            r.backing = derived;
        }
        r.fmt = data && data->drv ? data->drv->name : NULL;
    }
    strata_loop_run_co(overlay->ctx->loop, record_backing_co, &r);
    return r.ret == 0;
}
