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
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "block-private.h"
#include "driver.h"
#include "../util/keyval-private.h"

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

bool strata_backing_name_writable(const char *name, GError **error)
{
    if (name && g_str_has_prefix(name, "json:")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Refusing to write the pseudo-filename '%s' into an "
                    "image header", name);
        return false;
    }
    return true;
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
    if (!strata_backing_name_writable(backing, error)) {
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

/* ---- NBD URIs as backing names and image names ---- */

/*
 * nbd://HOST[:PORT]/EXPORT, nbd+tcp://… and nbd+unix:///EXPORT?socket=PATH
 * (and the older nbd:unix:PATH[:exportname=E], nbd:HOST:PORT[:…]) as
 * the options of an nbd protocol node.  Returns NULL with @error for a
 * malformed one; *@is_nbd says whether @spec was meant as NBD at all.
 */
JsonObject *strata_nbd_uri_options(const char *spec, bool *is_nbd,
                                   GError **error)
{
    g_autoptr(JsonObject) opts = NULL;
    JsonObject *server;
    g_autoptr(GUri) uri = NULL;
    const char *scheme;
    const char *path;
    g_autofree char *export_name = NULL;

    *is_nbd = g_str_has_prefix(spec, "nbd:") ||
              g_str_has_prefix(spec, "nbd+tcp:") ||
              g_str_has_prefix(spec, "nbd+unix:") ||
              g_str_has_prefix(spec, "nbds");
    if (!*is_nbd) {
        return NULL;
    }
    if (g_str_has_prefix(spec, "nbds")) {
        /* TLS, which QEMU 7.2 has no URI for either. */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Unknown protocol '%.*s'", (int)strcspn(spec, ":"),
                    spec);
        return NULL;
    }
    opts = json_object_new();
    server = json_object_new();
    json_object_set_string_member(opts, "driver", "nbd");
    json_object_set_object_member(opts, "server", server);

    if (g_str_has_prefix(spec, "nbd:") && !g_str_has_prefix(spec, "nbd://")) {
        /* The legacy form: fields split at ':'. */
        g_auto(GStrv) f = g_strsplit(spec + 4, ":", -1);
        guint n = g_strv_length(f);
        guint used;

        if (n >= 2 && !strcmp(f[0], "unix")) {
            json_object_set_string_member(server, "type", "unix");
            json_object_set_string_member(server, "path", f[1]);
            used = 2;
        } else if (n >= 2 && f[0][0]) {
            json_object_set_string_member(server, "type", "inet");
            json_object_set_string_member(server, "host", f[0]);
            json_object_set_string_member(server, "port", f[1]);
            used = 2;
        } else {
            goto bad;
        }
        if (n == used + 1 && g_str_has_prefix(f[used], "exportname=")) {
            json_object_set_string_member(opts, "export",
                                          f[used] + strlen("exportname="));
        } else if (n != used) {
            goto bad;
        }
        return g_steal_pointer(&opts);
    }

    uri = g_uri_parse(spec, G_URI_FLAGS_ENCODED_QUERY, NULL);
    if (!uri) {
        goto bad;
    }
    scheme = g_uri_get_scheme(uri);
    path = g_uri_get_path(uri);
    if (path[0] == '/') {
        path++;
    }
    export_name = g_uri_unescape_string(path, NULL);
    if (!export_name) {
        goto bad;
    }
    if (export_name[0]) {
        json_object_set_string_member(opts, "export", export_name);
    }
    if (!strcmp(scheme, "nbd+unix")) {
        const char *query = g_uri_get_query(uri);
        g_autofree char *sock = NULL;

        /* Exactly one parameter, socket=PATH, and no host. */
        if ((g_uri_get_host(uri) && g_uri_get_host(uri)[0]) ||
            g_uri_get_port(uri) != -1 || !query ||
            !g_str_has_prefix(query, "socket=") || strchr(query, '&')) {
            goto bad;
        }
        sock = g_uri_unescape_string(query + strlen("socket="), NULL);
        if (!sock || !sock[0]) {
            goto bad;
        }
        json_object_set_string_member(server, "type", "unix");
        json_object_set_string_member(server, "path", sock);
    } else if (!strcmp(scheme, "nbd") || !strcmp(scheme, "nbd+tcp")) {
        const char *host = g_uri_get_host(uri);
        int port = g_uri_get_port(uri);

        if (!host || !host[0] || g_uri_get_query(uri)) {
            goto bad;
        }
        json_object_set_string_member(server, "type", "inet");
        json_object_set_string_member(server, "host", host);
        if (port != -1) {
            g_autofree char *p = g_strdup_printf("%d", port);
            json_object_set_string_member(server, "port", p);
        }
    } else {
        goto bad;       /* nbds (TLS) and anything else */
    }
    return g_steal_pointer(&opts);

bad:
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "No valid URL specified");
    return NULL;
}

typedef struct {
    StrataNode *node;
    uint8_t magic[4];
    int ret;
} NbdProbe;

static void nbd_probe_entry(void *opaque)
{
    NbdProbe *p = opaque;

    p->ret = strata_node_co_pread(p->node, 0, sizeof(p->magic), p->magic, 0);
}

bool strata_probe_protocol_format(StrataContext *ctx, JsonObject *proto,
                                  const char **fmt, GError **error)
{
    g_autoptr(JsonObject) opts = json_object_new();
    NbdProbe p = { 0 };
    GList *members = json_object_get_members(proto);

    for (GList *l = members; l; l = l->next) {
        json_object_set_member(opts, l->data, json_node_copy(
            json_object_get_member(proto, l->data)));
    }
    g_list_free(members);
    json_object_set_boolean_member(opts, "read-only", true);
    p.node = strata_node_open(ctx, opts, false, false, error);
    if (!p.node) {
        return false;
    }
    if (strata_node_refresh_length(p.node) >= (int64_t)sizeof(p.magic)) {
        if (strata_in_coroutine()) {
            nbd_probe_entry(&p);    /* opening a backing file */
        } else {
            strata_loop_run_co(ctx->loop, nbd_probe_entry, &p);
        }
    } else {
        p.ret = -EINVAL;
    }
    strata_node_unref(p.node);
    *fmt = p.ret == 0 && memcmp(p.magic, "QFI\xfb", 4) == 0 ? "qcow2"
                                                             : "raw";
    return true;
}

const char *strata_probe_file_format(const char *filename)
{
    unsigned char magic[4];
    int fd = open(filename, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0) {
        return "raw";
    }
    n = pread(fd, magic, sizeof(magic), 0);
    close(fd);
    if (n == sizeof(magic) && memcmp(magic, "QFI\xfb", 4) == 0 &&
        strata_driver_find("qcow2")) {
        return "qcow2";
    }
    return "raw";
}

/* ---- json: pseudo-filenames, read (never written) ---- */

static bool merge_option(JsonObject *dst, const char *key, JsonNode *val,
                         const char *whole, GError **error);

/* @src's members into @dst, dotted keys made nested objects. */
static bool merge_options(JsonObject *dst, JsonObject *src, GError **error)
{
    GList *members = json_object_get_members(src);
    bool ok = true;

    for (GList *l = members; l && ok; l = l->next) {
        ok = merge_option(dst, l->data, json_object_get_member(src, l->data),
                          l->data, error);
    }
    g_list_free(members);
    return ok;
}

/* Puts @val at the dotted @key of @dst ("file.filename" is
 * {"file": {"filename": …}}), merging objects given both ways; a key
 * given twice otherwise is an error naming @whole. */
static bool merge_option(JsonObject *dst, const char *key, JsonNode *val,
                         const char *whole, GError **error)
{
    const char *dot = strchr(key, '.');
    g_autofree char *head = g_strndup(key, dot ? (gsize)(dot - key)
                                               : strlen(key));
    JsonNode *have = json_object_get_member(dst, head);

    if (!head[0] || (dot && !dot[1])) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid option name '%s'", whole);
        return false;
    }
    if (dot || JSON_NODE_HOLDS_OBJECT(val)) {
        JsonObject *sub;

        if (!have) {
            sub = json_object_new();
            json_object_set_object_member(dst, head, sub);
        } else if (JSON_NODE_HOLDS_OBJECT(have)) {
            sub = json_node_get_object(have);
        } else {
            goto twice;
        }
        return dot ? merge_option(sub, dot + 1, val, whole, error)
                   : merge_options(sub, json_node_get_object(val), error);
    }
    if (have) {
        goto twice;
    }
    json_object_set_member(dst, head, json_node_copy(val));
    return true;

twice:
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Option '%s' is given more than once", whole);
    return false;
}

static const char *member_string(JsonObject *o, const char *key)
{
    JsonNode *n = o ? json_object_get_member(o, key) : NULL;

    return n && JSON_NODE_HOLDS_VALUE(n) &&
           json_node_get_value_type(n) == G_TYPE_STRING
               ? json_node_get_string(n) : NULL;
}

static JsonObject *member_object(JsonObject *o, const char *key)
{
    JsonNode *n = json_object_get_member(o, key);

    return n && JSON_NODE_HOLDS_OBJECT(n) ? json_node_get_object(n) : NULL;
}

/* A protocol child named by its "filename" alone gets its driver from
 * the name, as QEMU picks a protocol: an NBD URI or a file; and so on
 * down the "file" children of the layers it describes. */
static bool fill_protocol(JsonObject *file, GError **error)
{
    const char *name = member_string(file, "filename");
    JsonObject *below = member_object(file, "file");
    g_autoptr(JsonObject) nbd = NULL;
    bool is_nbd;

    if (below && !fill_protocol(below, error)) {
        return false;
    }
    if (json_object_has_member(file, "driver") || !name) {
        return true;
    }
    nbd = strata_nbd_uri_options(name, &is_nbd, error);
    if (is_nbd && !nbd) {
        return false;
    }
    if (!nbd) {
        json_object_set_string_member(file, "driver", "file");
        return true;
    }
    json_object_remove_member(file, "filename");
    return merge_options(file, nbd, error);
}

const char *strata_options_filename(JsonObject *options)
{
    JsonObject *file = member_object(options, "file");

    return file ? member_string(file, "filename")
                : member_string(options, "filename");
}

/* The format of the image behind the protocol options @file (nullable:
 * none given, an error), from its first bytes: over NBD by reading them,
 * from a file by its name. */
static bool probe_format(StrataContext *ctx, JsonObject *file,
                         const char **fmt, GError **error)
{
    if (!g_strcmp0(member_string(file, "driver"), "nbd")) {
        return strata_probe_protocol_format(ctx, file, fmt, error);
    }
    if (!member_string(file, "filename")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "A json: name without a driver must name its file");
        return false;
    }
    *fmt = strata_probe_file_format(member_string(file, "filename"));
    return true;
}

/* A json: name's options (see strata_image_name_options). */
static JsonObject *json_name_options(StrataContext *ctx, const char *text,
                                     const char *fmt, GError **error)
{
    g_autoptr(JsonObject) parsed = NULL;
    g_autoptr(JsonObject) opts = json_object_new();
    JsonObject *file;

    if (!strata_keyval_is_json(text)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "A json: name must hold a JSON object");
        return NULL;
    }
    parsed = strata_keyval_parse(text, NULL, error);
    if (!parsed || !merge_options(opts, parsed, error)) {
        return NULL;
    }
    /* A format given outside the name wins over one inside, as QEMU
     * lets the header's backing format or qemu-img's -f win. */
    if (fmt) {
        json_object_set_string_member(opts, "driver", fmt);
    }
    if (!json_object_has_member(opts, "driver") &&
        !json_object_has_member(opts, "file")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Must specify either driver or file");
        return NULL;
    }
    file = member_object(opts, "file");
    if (file && !fill_protocol(file, error)) {
        return NULL;
    }
    if (!json_object_has_member(opts, "driver")) {
        /* A "file" that is no object names no file to probe. */
        if (!probe_format(ctx, file, &fmt, error)) {
            return NULL;
        }
        json_object_set_string_member(opts, "driver", fmt);
    }
    return g_steal_pointer(&opts);
}

JsonObject *strata_image_name_options(StrataContext *ctx, const char *name,
                                      const char *fmt, GError **error)
{
    JsonObject *opts, *file;
    bool is_nbd;

    if (g_str_has_prefix(name, "json:")) {
        return json_name_options(ctx, name + strlen("json:"), fmt, error);
    }
    file = strata_nbd_uri_options(name, &is_nbd, error);
    if (is_nbd && !file) {
        return NULL;
    }
    if (!file) {
        file = json_object_new();
        json_object_set_string_member(file, "driver", "file");
        json_object_set_string_member(file, "filename", name);
    }
    if (!fmt && !probe_format(ctx, file, &fmt, error)) {
        json_object_unref(file);
        return NULL;
    }
    opts = json_object_new();
    json_object_set_string_member(opts, "driver", fmt);
    json_object_set_object_member(opts, "file", file);
    return opts;
}
