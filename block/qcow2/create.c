/* strata — creating qcow2 images: the layout `qemu-img create -f qcow2`
 * writes (header, refcount table, refcount blocks, L1 table), and with
 * preallocation=metadata the L2 tables and data clusters too. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2.h"
#include "qcow2-private.h"

/* Options come as QMP (dashes, typed) or qemu-img -o (underscores,
 * strings): look both spellings up. */
static JsonNode *opt_node(JsonObject *o, const char *name)
{
    g_autofree char *alt = g_strdup(name);
    JsonNode *n;

    if (!o) {
        return NULL;
    }
    n = json_object_get_member(o, name);
    if (n) {
        return n;
    }
    for (char *p = alt; *p; p++) {
        if (*p == '_') {
            *p = '-';
        }
    }
    return json_object_get_member(o, alt);
}

static bool opt_str(JsonObject *o, const char *name, const char **out,
                    GError **error)
{
    JsonNode *n = opt_node(o, name);

    if (!n || JSON_NODE_HOLDS_NULL(n)) {
        return true;
    }
    if (!JSON_NODE_HOLDS_VALUE(n) ||
        json_node_get_value_type(n) != G_TYPE_STRING) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter type for '%s', expected: string",
                    name);
        return false;
    }
    *out = json_node_get_string(n);
    return true;
}

static bool opt_u64(JsonObject *o, const char *name, uint64_t *out,
                    GError **error)
{
    JsonNode *n = opt_node(o, name);

    if (!n || JSON_NODE_HOLDS_NULL(n)) {
        return true;
    }
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_INT64 &&
        json_node_get_int(n) >= 0) {
        *out = (uint64_t)json_node_get_int(n);
        return true;
    }
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_STRING) {
        const char *str = json_node_get_string(n);
        char *end;
        uint64_t v, mult = 1;
        errno = 0;
        v = g_ascii_strtoull(str, &end, 10);
        switch (g_ascii_toupper(*end)) {
        case 'K': mult = 1ull << 10; end++; break;
        case 'M': mult = 1ull << 20; end++; break;
        case 'G': mult = 1ull << 30; end++; break;
        case 'T': mult = 1ull << 40; end++; break;
        case 'P': mult = 1ull << 50; end++; break;
        default: break;
        }
        if (end != str && !*end && !errno && v <= UINT64_MAX / mult) {
            *out = v * mult;
            return true;
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Parameter '%s' expects a non-negative size", name);
    return false;
}

static bool opt_bool(JsonObject *o, const char *name, bool *out,
                     GError **error)
{
    JsonNode *n = opt_node(o, name);

    if (!n || JSON_NODE_HOLDS_NULL(n)) {
        return true;
    }
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_BOOLEAN) {
        *out = json_node_get_boolean(n);
        return true;
    }
    if (JSON_NODE_HOLDS_VALUE(n) &&
        json_node_get_value_type(n) == G_TYPE_STRING) {
        const char *v = json_node_get_string(n);
        if (!strcmp(v, "on") || !strcmp(v, "true")) {
            *out = true;
            return true;
        }
        if (!strcmp(v, "off") || !strcmp(v, "false")) {
            *out = false;
            return true;
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Parameter '%s' expects 'on' or 'off'", name);
    return false;
}

static bool write_all(int fd, const void *buf, size_t len, uint64_t off,
                      const char *filename, GError **error)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not write to '%s': %s", filename,
                        g_strerror(r < 0 ? errno : EIO));
            return false;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return true;
}

static bool create_image(StrataContext *ctx, const char *filename,
                         JsonObject *opts, bool sync, GError **error)
{
    const char *compat = "1.1", *backing = NULL, *backing_fmt = NULL;
    const char *prealloc = "off", *ctype = "zlib";
    uint64_t size = 0, cluster_size = 65536, refcount_bits = 16;
    bool lazy = false, extl2 = false, zstd = false, meta;
    uint32_t cluster_bits, refcount_order;
    uint64_t per_l1, l1_size, l1_clusters, l2_count = 0, data_count = 0;
    uint64_t rb_entries, rt_clusters = 1, rb_count = 1, total;
    uint64_t rt_off, rb_off, l1_off, l2_off, data_off, l2_entry_size;
    StrataQcow2Header h;
    g_autofree uint8_t *hdr_buf = NULL;
    g_autofree uint8_t *buf = NULL;
    int fd;
    bool ok = false;

    (void)ctx;
    g_return_val_if_fail(filename != NULL, false);

    if (!opts || !opt_node(opts, "size")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'size' is missing");
        return false;
    }
    if (!opt_u64(opts, "size", &size, error) ||
        !opt_str(opts, "compat", &compat, error) ||
        !opt_u64(opts, "cluster_size", &cluster_size, error) ||
        !opt_str(opts, "backing_file", &backing, error) ||
        !opt_str(opts, "backing_fmt", &backing_fmt, error) ||
        !opt_bool(opts, "lazy_refcounts", &lazy, error) ||
        !opt_u64(opts, "refcount_bits", &refcount_bits, error) ||
        !opt_bool(opts, "extended_l2", &extl2, error) ||
        !opt_str(opts, "preallocation", &prealloc, error) ||
        !opt_str(opts, "compression_type", &ctype, error)) {
        return false;
    }
    /* QMP's blockdev-create calls the compat option "version". */
    if (opt_node(opts, "version")) {
        const char *v = NULL;
        if (!opt_str(opts, "version", &v, error)) {
            return false;
        }
        compat = !strcmp(v, "v2") ? "0.10" : !strcmp(v, "v3") ? "1.1" : v;
    }

    size = (size + 511) & ~511ull;
    if (size > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image size too large");
        return false;
    }
    if (cluster_size < 512 || cluster_size > (1u << 21) ||
        (cluster_size & (cluster_size - 1))) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cluster size must be a power of two between 512 and "
                    "2048k");
        return false;
    }
    cluster_bits = (uint32_t)__builtin_ctzll(cluster_size);
    if (strcmp(compat, "0.10") && strcmp(compat, "1.1")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid compatibility level: '%s'", compat);
        return false;
    }
    if (refcount_bits < 1 || refcount_bits > 64 ||
        (refcount_bits & (refcount_bits - 1))) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Refcount width must be a power of two and may not "
                    "exceed 64 bits");
        return false;
    }
    refcount_order = (uint32_t)__builtin_ctzll(refcount_bits);
    if (!strcmp(compat, "0.10") && refcount_bits != 16) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Different refcount widths than 16 bits require "
                    "compatibility level 1.1 or above (use compat=1.1 or "
                    "greater)");
        return false;
    }
    if (!strcmp(compat, "0.10") && lazy) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Lazy refcounts only supported with compatibility level "
                    "1.1 and above (use compat=1.1 or greater)");
        return false;
    }
    if (extl2 && !strcmp(compat, "0.10")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Extended L2 entries are only supported with "
                    "compatibility level 1.1 and above (use version=v3 or "
                    "greater)");
        return false;
    }
    if (extl2 && cluster_bits < STRATA_QCOW2_MIN_EXTL2_CLUSTER_BITS) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Extended L2 entries are only supported with cluster "
                    "sizes of at least %u bytes",
                    1u << STRATA_QCOW2_MIN_EXTL2_CLUSTER_BITS);
        return false;
    }
    /* Extended entries take 16 bytes: the data word, then the bitmap. */
    l2_entry_size = extl2 ? 16 : 8;
    if (!strcmp(ctype, "zstd")) {
#ifdef STRATA_HAVE_ZSTD
        if (!strcmp(compat, "0.10")) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Compression type selection is only supported with "
                        "compatibility level 1.1 and above (use version=v3 "
                        "or greater)");
            return false;
        }
        zstd = true;
#else
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Compression type 'zstd' is not supported by this "
                    "build (no libzstd)");
        return false;
#endif
    } else if (strcmp(ctype, "zlib") != 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter '%s'", ctype);
        return false;
    }
    if (backing_fmt && !backing) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing format cannot be used without backing file");
        return false;
    }
    if (backing && !*backing) {
        backing = NULL;
    }
    if (!strcmp(prealloc, "off")) {
        meta = false;
    } else if (!strcmp(prealloc, "metadata") || !strcmp(prealloc, "falloc") ||
               !strcmp(prealloc, "full")) {
        /* falloc and full map the disk as metadata does; the data
         * clusters then get their file space too. */
        meta = true;
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter '%s'", prealloc);
        return false;
    }
    if (meta && backing) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing file and preallocation can only be used at "
                    "the same time if preallocation=off");
        return false;
    }

    per_l1 = cluster_size * (cluster_size / l2_entry_size);
    l1_size = size / per_l1 + (size % per_l1 != 0);
    if (l1_size * 8 > STRATA_QCOW2_MAX_L1_BYTES) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "The image size is too large for file format 'qcow2' "
                    "(try using a larger cluster size)");
        return false;
    }
    l1_clusters = MAX((l1_size * 8 + cluster_size - 1) >> cluster_bits, 1u);
    if (meta) {
        data_count = (size + cluster_size - 1) >> cluster_bits;
        l2_count = (data_count + cluster_size / l2_entry_size - 1) /
                   (cluster_size / l2_entry_size);
    }

    /* Refcount table and blocks that cover everything, themselves
     * included. */
    rb_entries = cluster_size * 8 / refcount_bits;
    for (;;) {
        uint64_t nrb, nrt;
        total = 1 + rt_clusters + rb_count + l1_clusters + l2_count +
                data_count;
        nrb = (total + rb_entries - 1) / rb_entries;
        nrt = (nrb * 8 + cluster_size - 1) / cluster_size;
        if (nrb == rb_count && nrt == rt_clusters) {
            break;
        }
        rb_count = MAX(nrb, rb_count);
        rt_clusters = MAX(nrt, rt_clusters);
    }
    if (rt_clusters * cluster_size > STRATA_QCOW2_MAX_REFTABLE_BYTES) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "The image size is too large for this cluster size and "
                    "refcount width");
        return false;
    }
    rt_off = cluster_size;
    rb_off = rt_off + rt_clusters * cluster_size;
    l1_off = rb_off + rb_count * cluster_size;
    l2_off = l1_off + l1_clusters * cluster_size;
    data_off = l2_off + l2_count * cluster_size;

    if (!strata_backing_name_writable(backing, error)) {
        return false;
    }
    strata_qcow2_header_init(&h);
    h.version = !strcmp(compat, "0.10") ? 2 : 3;
    h.cluster_bits = cluster_bits;
    h.size = size;
    h.l1_size = (uint32_t)l1_size;
    h.l1_table_offset = l1_off;
    h.refcount_table_offset = rt_off;
    h.refcount_table_clusters = (uint32_t)rt_clusters;
    h.refcount_order = refcount_order;
    h.compatible_features = lazy ? STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS : 0;
    h.incompatible_features = extl2 ? STRATA_QCOW2_INCOMPAT_EXTL2 : 0;
    if (zstd) {
        /* A reader that does not know the field must not guess. */
        h.compression_type = 1;
        h.incompatible_features |= STRATA_QCOW2_INCOMPAT_COMPRESSION;
    }
    h.backing_file = g_strdup(backing);
    h.backing_format = g_strdup(backing_fmt);
    hdr_buf = strata_qcow2_header_build(&h, error);
    strata_qcow2_header_cleanup(&h);
    if (!hdr_buf) {
        return false;
    }

    fd = open(filename, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not create '%s': %s", filename,
                    g_strerror(errno));
        return false;
    }
    buf = g_malloc0(cluster_size);

    if (!write_all(fd, hdr_buf, cluster_size, 0, filename, error)) {
        goto out;
    }
    /* Refcount table. */
    for (uint64_t c = 0; c < rt_clusters; c++) {
        memset(buf, 0, cluster_size);
        for (uint64_t i = 0; i < cluster_size / 8; i++) {
            uint64_t k = c * (cluster_size / 8) + i;
            if (k < rb_count) {
                strata_qcow2_put_be64(buf + i * 8, rb_off + k * cluster_size);
            }
        }
        if (!write_all(fd, buf, cluster_size, rt_off + c * cluster_size,
                       filename, error)) {
            goto out;
        }
    }
    /* Refcount blocks: clusters [0, total) have refcount 1. */
    for (uint64_t b = 0; b < rb_count; b++) {
        memset(buf, 0, cluster_size);
        for (uint64_t i = 0; i < rb_entries; i++) {
            if (b * rb_entries + i < total) {
                strata_qcow2_refblock_set(buf, refcount_order, i, 1);
            }
        }
        if (!write_all(fd, buf, cluster_size, rb_off + b * cluster_size,
                       filename, error)) {
            goto out;
        }
    }
    /* L1 table, then the preallocated L2 tables. */
    for (uint64_t c = 0; c < l1_clusters; c++) {
        memset(buf, 0, cluster_size);
        for (uint64_t i = 0; i < cluster_size / 8; i++) {
            uint64_t k = c * (cluster_size / 8) + i;
            if (k < l2_count) {
                strata_qcow2_put_be64(buf + i * 8,
                                      (l2_off + k * cluster_size) |
                                      STRATA_QCOW2_OFLAG_COPIED);
            }
        }
        if (!write_all(fd, buf, cluster_size, l1_off + c * cluster_size,
                       filename, error)) {
            goto out;
        }
    }
    for (uint64_t t = 0; t < l2_count; t++) {
        uint64_t per_l2 = cluster_size / l2_entry_size;
        memset(buf, 0, cluster_size);
        /* Extended entries keep an empty bitmap: the subclusters read
         * as zeroes (nothing was written) but own their space. */
        for (uint64_t i = 0; i < per_l2; i++) {
            uint64_t k = t * per_l2 + i;
            if (k < data_count) {
                strata_qcow2_put_be64(buf + i * l2_entry_size,
                                      (data_off + k * cluster_size) |
                                      STRATA_QCOW2_OFLAG_COPIED);
            }
        }
        if (!write_all(fd, buf, cluster_size, l2_off + t * cluster_size,
                       filename, error)) {
            goto out;
        }
    }
    if (data_count &&
        ftruncate(fd, (off_t)(data_off + data_count * cluster_size)) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not resize '%s': %s", filename, g_strerror(errno));
        goto out;
    }
    if (data_count && !strcmp(prealloc, "falloc")) {
        int r = posix_fallocate(fd, (off_t)data_off,
                                (off_t)(data_count * cluster_size));
        if (r) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not preallocate data for '%s': %s", filename,
                        g_strerror(r));
            goto out;
        }
    } else if (data_count && !strcmp(prealloc, "full")) {
        memset(buf, 0, cluster_size);
        for (uint64_t c = 0; c < data_count; c++) {
            if (!write_all(fd, buf, cluster_size,
                           data_off + c * cluster_size, filename, error)) {
                goto out;
            }
        }
    }
    if (sync && fsync(fd) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not flush '%s': %s", filename, g_strerror(errno));
        goto out;
    }
    ok = true;
out:
    close(fd);
    if (!ok) {
        unlink(filename);
    }
    return ok;
}

bool strata_qcow2_create(StrataContext *ctx, const char *filename,
                         JsonObject *opts, GError **error)
{
    return create_image(ctx, filename, opts, true, error);
}

bool strata_qcow2_create_unsynced(StrataContext *ctx, const char *filename,
                                  JsonObject *opts, GError **error)
{
    return create_image(ctx, filename, opts, false, error);
}
