/* strata — qcow2 header: decoding and validating cluster 0 (header,
 * extensions, backing file name), the feature bits, and writing it back
 * with whatever this driver does not understand kept verbatim. */
#include <errno.h>
#include <string.h>

#include "qcow2-private.h"

#define FEATURE_ENTRY_SIZE 48

/* The names this driver writes in its own feature table (the same set
 * QEMU 7.2 writes, so messages read alike in both). */
static const struct {
    uint8_t type, bit;
    const char *name;
} known_features[] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

static void ext_free(gpointer p)
{
    StrataQcow2Ext *e = p;
    g_bytes_unref(e->data);
    g_free(e);
}

void strata_qcow2_header_init(StrataQcow2Header *h)
{
    memset(h, 0, sizeof(*h));
    h->kept_exts = g_ptr_array_new_with_free_func(ext_free);
}

void strata_qcow2_header_cleanup(StrataQcow2Header *h)
{
    g_clear_pointer(&h->extra_fields, g_bytes_unref);
    g_clear_pointer(&h->backing_file, g_free);
    g_clear_pointer(&h->backing_format, g_free);
    g_clear_pointer(&h->feature_names, g_array_unref);
    g_clear_pointer(&h->kept_exts, g_ptr_array_unref);
}

const char *strata_qcow2_feature_name(const StrataQcow2Header *h,
                                      uint8_t type, uint8_t bit)
{
    if (!h->feature_names) {
        return NULL;
    }
    for (guint i = 0; i < h->feature_names->len; i++) {
        StrataQcow2FeatureName *f =
            &g_array_index(h->feature_names, StrataQcow2FeatureName, i);
        if (f->type == type && f->bit == bit) {
            return f->name;
        }
    }
    return NULL;
}

static bool corrupt(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static bool corrupt(GError **error, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error_literal(error, STRATA_ERROR, STRATA_ERROR_CORRUPT, msg);
    return false;
}

/* Whether [off, off + len) stays below INT64_MAX without wrapping. */
static bool range_fits(uint64_t off, uint64_t len)
{
    return off <= INT64_MAX && len <= INT64_MAX - off;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b,
                           uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

static bool parse_extensions(StrataQcow2Header *h, const uint8_t *cl,
                             uint64_t cluster_size, GError **error)
{
    uint64_t end = h->backing_file_offset ? h->backing_file_offset
                                          : cluster_size;
    uint64_t off = h->header_length;
    bool seen_fmt = false, seen_table = false;

    while (off < end) {
        uint32_t type, len;

        if (end - off < 8) {
            return corrupt(error, "Header extension too large");
        }
        type = strata_qcow2_be32(cl + off);
        len = strata_qcow2_be32(cl + off + 4);
        off += 8;
        if (len > end - off) {
            return corrupt(error, "Header extension too large");
        }
        if (type == STRATA_QCOW2_EXT_END) {
            break;
        }
        switch (type) {
        case STRATA_QCOW2_EXT_BACKING_FMT:
            if (seen_fmt) {
                return corrupt(error, "Duplicate backing format header "
                               "extension");
            }
            seen_fmt = true;
            if (len > STRATA_QCOW2_MAX_BACKING_FMT) {
                return corrupt(error, "Backing format header extension "
                               "too long (%u bytes, at most %u)", len,
                               STRATA_QCOW2_MAX_BACKING_FMT);
            }
            if (memchr(cl + off, 0, len)) {
                return corrupt(error, "Backing format name contains a NUL "
                               "byte");
            }
            h->backing_format = g_strndup((const char *)cl + off, len);
            break;
        case STRATA_QCOW2_EXT_FEATURE_TABLE:
            if (seen_table) {
                return corrupt(error, "Duplicate feature name table");
            }
            seen_table = true;
            h->feature_names = g_array_new(FALSE, TRUE,
                                           sizeof(StrataQcow2FeatureName));
            for (uint32_t i = 0; i + FEATURE_ENTRY_SIZE <= len;
                 i += FEATURE_ENTRY_SIZE) {
                StrataQcow2FeatureName f = { 0 };
                f.type = cl[off + i];
                f.bit = cl[off + i + 1];
                memcpy(f.name, cl + off + i + 2, 46);
                f.name[46] = '\0';
                g_array_append_val(h->feature_names, f);
            }
            break;
        case STRATA_QCOW2_EXT_CRYPTO:
            if (h->crypt_method != 2) {
                return corrupt(error, "Encryption header extension in an "
                               "image without LUKS encryption");
            }
            /* Kept, though such images are refused. */
            G_GNUC_FALLTHROUGH;
        default: {
            StrataQcow2Ext *e = g_new0(StrataQcow2Ext, 1);
            e->type = type;
            e->data = g_bytes_new(cl + off, len);
            g_ptr_array_add(h->kept_exts, e);
            break;
        }
        }
        /* The padding to 8 may reach past @end on the last one. */
        off += ((uint64_t)len + 7) & ~7ull;
    }
    return true;
}

bool strata_qcow2_header_parse(StrataQcow2Header *h, const uint8_t *buf,
                               size_t len, GError **error)
{
    g_autofree uint8_t *padded = NULL;
    const uint8_t *cl = buf;
    uint64_t cluster_size, l1_bytes, per_l1, needed;

    if (len < 8) {
        return corrupt(error, "Image is not in qcow2 format (file too "
                       "short for a header)");
    }
    if (strata_qcow2_be32(buf) != STRATA_QCOW2_MAGIC) {
        return corrupt(error, "Image is not in qcow2 format");
    }
    h->version = strata_qcow2_be32(buf + 4);
    if (h->version != 2 && h->version != 3) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Unsupported qcow2 version %u", h->version);
        return false;
    }
    if (len < (h->version == 2 ? STRATA_QCOW2_V2_HEADER_LEN
                               : STRATA_QCOW2_V3_MIN_HEADER_LEN)) {
        return corrupt(error, "qcow2 header truncated (%zu bytes)", len);
    }

    h->backing_file_offset = strata_qcow2_be64(buf + 8);
    h->backing_file_size = strata_qcow2_be32(buf + 16);
    h->cluster_bits = strata_qcow2_be32(buf + 20);
    h->size = strata_qcow2_be64(buf + 24);
    h->crypt_method = strata_qcow2_be32(buf + 32);
    h->l1_size = strata_qcow2_be32(buf + 36);
    h->l1_table_offset = strata_qcow2_be64(buf + 40);
    h->refcount_table_offset = strata_qcow2_be64(buf + 48);
    h->refcount_table_clusters = strata_qcow2_be32(buf + 56);
    h->nb_snapshots = strata_qcow2_be32(buf + 60);
    h->snapshots_offset = strata_qcow2_be64(buf + 64);

    if (h->cluster_bits < STRATA_QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > STRATA_QCOW2_MAX_CLUSTER_BITS) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "Unsupported cluster size: 2^%u", h->cluster_bits);
        return false;
    }
    cluster_size = 1ull << h->cluster_bits;

    if (h->version == 2) {
        h->incompatible_features = 0;
        h->compatible_features = 0;
        h->autoclear_features = 0;
        h->refcount_order = 4;
        h->header_length = STRATA_QCOW2_V2_HEADER_LEN;
    } else {
        h->incompatible_features = strata_qcow2_be64(buf + 72);
        h->compatible_features = strata_qcow2_be64(buf + 80);
        h->autoclear_features = strata_qcow2_be64(buf + 88);
        h->refcount_order = strata_qcow2_be32(buf + 96);
        h->header_length = strata_qcow2_be32(buf + 100);
        if (h->header_length < STRATA_QCOW2_V3_MIN_HEADER_LEN) {
            return corrupt(error, "qcow2 header too short");
        }
        if (h->header_length > cluster_size) {
            return corrupt(error, "qcow2 header exceeds cluster size");
        }
    }
    if (h->refcount_order > 6) {
        return corrupt(error, "Reference count entry width too large; "
                       "may not exceed 64 bits");
    }

    /* Bytes past the end of a short file read as zeroes. */
    if (len < cluster_size) {
        padded = g_malloc0(cluster_size);
        memcpy(padded, buf, len);
        cl = padded;
    }

    if (h->header_length > 104) {
        h->compression_type = cl[104];
    }
    if (h->header_length > STRATA_QCOW2_V3_HEADER_LEN) {
        h->extra_fields = g_bytes_new(cl + STRATA_QCOW2_V3_HEADER_LEN,
                                      h->header_length -
                                      STRATA_QCOW2_V3_HEADER_LEN);
    }
    if (h->compression_type > 1) {
        return corrupt(error, "qcow2: unknown compression type %u",
                       h->compression_type);
    }
    if (!!(h->incompatible_features & STRATA_QCOW2_INCOMPAT_COMPRESSION) !=
        (h->compression_type != 0)) {
        return corrupt(error, "qcow2: compression type %u and the "
                       "compression type feature bit disagree",
                       h->compression_type);
    }

    if (h->backing_file_offset > cluster_size) {
        return corrupt(error, "Invalid backing file offset");
    }
    if (h->crypt_method == 1 || h->crypt_method == 2) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Encrypted qcow2 images are not supported");
        return false;
    }
    if (h->crypt_method != 0) {
        return corrupt(error, "Unsupported encryption method: %u",
                       h->crypt_method);
    }

    /* Refcount table. */
    if (h->refcount_table_clusters == 0) {
        return corrupt(error, "Image does not contain a reference count "
                       "table");
    }
    if (((uint64_t)h->refcount_table_clusters << h->cluster_bits) >
        STRATA_QCOW2_MAX_REFTABLE_BYTES) {
        return corrupt(error, "Reference count table too large");
    }
    if ((h->refcount_table_offset & (cluster_size - 1)) ||
        h->refcount_table_offset == 0 ||
        !range_fits(h->refcount_table_offset,
                    (uint64_t)h->refcount_table_clusters << h->cluster_bits)) {
        return corrupt(error, "Invalid reference count table offset");
    }

    /* Snapshot table: only its bounds (snapshots are not read yet). */
    if (h->nb_snapshots > STRATA_QCOW2_MAX_SNAPSHOTS) {
        return corrupt(error, "Snapshot table too large");
    }
    if (h->nb_snapshots &&
        ((h->snapshots_offset & (cluster_size - 1)) ||
         h->snapshots_offset == 0 ||
         !range_fits(h->snapshots_offset, (uint64_t)h->nb_snapshots * 40))) {
        return corrupt(error, "Invalid snapshot table offset");
    }

    /* Active L1 table. */
    l1_bytes = (uint64_t)h->l1_size * 8;
    if (l1_bytes > STRATA_QCOW2_MAX_L1_BYTES) {
        return corrupt(error, "Active L1 table too large");
    }
    if (h->l1_size &&
        ((h->l1_table_offset & (cluster_size - 1)) ||
         h->l1_table_offset == 0 ||
         !range_fits(h->l1_table_offset, l1_bytes))) {
        return corrupt(error, "Invalid L1 table offset");
    }
    if (h->size > INT64_MAX) {
        return corrupt(error, "Image is too big");
    }
    if ((h->incompatible_features & STRATA_QCOW2_INCOMPAT_EXTL2) &&
        h->cluster_bits < STRATA_QCOW2_MIN_EXTL2_CLUSTER_BITS) {
        return corrupt(error, "Unsupported subcluster size");
    }
    /* Extended L2 entries are twice as wide: half as many per table. */
    per_l1 = cluster_size * (cluster_size / 8);
    if (h->incompatible_features & STRATA_QCOW2_INCOMPAT_EXTL2) {
        per_l1 /= 2;
    }
    needed = h->size / per_l1 + (h->size % per_l1 != 0);
    if (needed > INT32_MAX) {
        return corrupt(error, "Image is too big");
    }
    if (h->l1_size < needed) {
        return corrupt(error, "L1 table is too small");
    }

    /* Metadata that shares host clusters would be overwritten by one
     * another's updates. */
    {
        uint64_t rt_len =
            (uint64_t)h->refcount_table_clusters << h->cluster_bits;
        uint64_t l1_len = (l1_bytes + cluster_size - 1) &
                          ~(cluster_size - 1);
        if (ranges_overlap(0, cluster_size, h->refcount_table_offset,
                           rt_len) ||
            ranges_overlap(0, cluster_size, h->l1_table_offset, l1_len) ||
            ranges_overlap(h->refcount_table_offset, rt_len,
                           h->l1_table_offset, l1_len)) {
            return corrupt(error, "qcow2 metadata overlaps: header, "
                           "refcount table and L1 table must not share "
                           "clusters");
        }
    }

    if (!parse_extensions(h, cl, cluster_size, error)) {
        return false;
    }

    if (h->backing_file_offset) {
        uint64_t room = cluster_size - h->backing_file_offset;
        if (h->backing_file_size > STRATA_QCOW2_MAX_BACKING_NAME ||
            h->backing_file_size > room) {
            return corrupt(error, "Backing file name too long");
        }
        if (memchr(cl + h->backing_file_offset, 0, h->backing_file_size)) {
            return corrupt(error, "Backing file name contains a NUL byte");
        }
        if (h->backing_file_size) {
            h->backing_file = g_strndup(
                (const char *)cl + h->backing_file_offset,
                h->backing_file_size);
        }
    }
    return true;
}

bool strata_qcow2_header_check_features(const StrataQcow2Header *h,
                                        bool writable, GError **error)
{
    const uint64_t known = STRATA_QCOW2_INCOMPAT_DIRTY |
                           STRATA_QCOW2_INCOMPAT_CORRUPT |
                           STRATA_QCOW2_INCOMPAT_DATA_FILE |
                           STRATA_QCOW2_INCOMPAT_COMPRESSION |
                           STRATA_QCOW2_INCOMPAT_EXTL2;
    uint64_t unknown = h->incompatible_features & ~known;

    if (unknown) {
        g_autoptr(GString) msg =
            g_string_new("Unsupported qcow2 feature(s): ");
        bool first = true;
        uint64_t unnamed = 0;

        for (unsigned bit = 0; bit < 64; bit++) {
            const char *name;
            if (!(unknown & (1ull << bit))) {
                continue;
            }
            name = strata_qcow2_feature_name(h, 0, bit);
            if (!name || !*name) {
                unnamed |= 1ull << bit;
                continue;
            }
            g_string_append_printf(msg, "%s%s", first ? "" : ", ", name);
            first = false;
        }
        if (unnamed) {
            g_string_append_printf(msg, "%sUnknown incompatible feature: "
                                   "%" G_GINT64_MODIFIER "x",
                                   first ? "" : ", ", unnamed);
        }
        g_set_error_literal(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                            msg->str);
        return false;
    }
    if (h->incompatible_features & STRATA_QCOW2_INCOMPAT_DATA_FILE) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "qcow2 images with an external data file are not "
                    "supported");
        return false;
    }
    if ((h->incompatible_features & STRATA_QCOW2_INCOMPAT_CORRUPT) &&
        writable) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_CORRUPT,
                    "qcow2: Image is corrupt; cannot be opened read/write");
        return false;
    }
    return true;
}

static size_t ext_put(uint8_t *cl, size_t off, uint32_t type,
                      const void *data, uint32_t len)
{
    strata_qcow2_put_be32(cl + off, type);
    strata_qcow2_put_be32(cl + off + 4, len);
    if (len) {
        memcpy(cl + off + 8, data, len);
    }
    return off + 8 + (((size_t)len + 7) & ~(size_t)7);
}

static size_t ext_size(uint32_t len)
{
    return 8 + (((size_t)len + 7) & ~(size_t)7);
}

uint8_t *strata_qcow2_header_build(StrataQcow2Header *h, GError **error)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    size_t extra = h->extra_fields ? g_bytes_get_size(h->extra_fields) : 0;
    size_t name_len = h->backing_file ? strlen(h->backing_file) : 0;
    size_t fmt_len = h->backing_format ? strlen(h->backing_format) : 0;
    size_t table_len = G_N_ELEMENTS(known_features) * FEATURE_ENTRY_SIZE;
    bool table;
    size_t need, off;
    g_autofree uint8_t *cl = NULL;

    if (name_len > STRATA_QCOW2_MAX_BACKING_NAME) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing file name too long (at most %u bytes)",
                    STRATA_QCOW2_MAX_BACKING_NAME);
        return NULL;
    }
    if (fmt_len > STRATA_QCOW2_MAX_BACKING_FMT) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing format name too long (at most %u bytes)",
                    STRATA_QCOW2_MAX_BACKING_FMT);
        return NULL;
    }

    h->header_length = h->version == 2
        ? STRATA_QCOW2_V2_HEADER_LEN
        : STRATA_QCOW2_V3_HEADER_LEN + (uint32_t)extra;
    need = h->header_length + 8 + name_len;
    if (h->backing_format) {
        need += ext_size(fmt_len);
    }
    for (guint i = 0; i < h->kept_exts->len; i++) {
        StrataQcow2Ext *e = g_ptr_array_index(h->kept_exts, i);
        need += ext_size(g_bytes_get_size(e->data));
    }
    /* QEMU writes its feature table only where there is room for it
     * (clusters above 4 KiB); it is informational, so do the same. */
    table = h->version == 3 && cluster_size > 4096 &&
            need + ext_size(table_len) <= cluster_size;
    if (table) {
        need += ext_size(table_len);
    }
    if (need > cluster_size) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Header, extensions and backing file name do not fit "
                    "in the first cluster (%zu > %" G_GUINT64_FORMAT
                    " bytes)", need, cluster_size);
        return NULL;
    }

    cl = g_malloc0(cluster_size);
    strata_qcow2_put_be32(cl, STRATA_QCOW2_MAGIC);
    strata_qcow2_put_be32(cl + 4, h->version);
    strata_qcow2_put_be32(cl + 20, h->cluster_bits);
    strata_qcow2_put_be64(cl + 24, h->size);
    strata_qcow2_put_be32(cl + 32, h->crypt_method);
    strata_qcow2_put_be32(cl + 36, h->l1_size);
    strata_qcow2_put_be64(cl + 40, h->l1_table_offset);
    strata_qcow2_put_be64(cl + 48, h->refcount_table_offset);
    strata_qcow2_put_be32(cl + 56, h->refcount_table_clusters);
    strata_qcow2_put_be32(cl + 60, h->nb_snapshots);
    strata_qcow2_put_be64(cl + 64, h->snapshots_offset);
    if (h->version == 3) {
        strata_qcow2_put_be64(cl + 72, h->incompatible_features);
        strata_qcow2_put_be64(cl + 80, h->compatible_features);
        strata_qcow2_put_be64(cl + 88, h->autoclear_features);
        strata_qcow2_put_be32(cl + 96, h->refcount_order);
        strata_qcow2_put_be32(cl + 100, h->header_length);
        cl[104] = h->compression_type;
        if (extra) {
            memcpy(cl + STRATA_QCOW2_V3_HEADER_LEN,
                   g_bytes_get_data(h->extra_fields, NULL), extra);
        }
    }

    off = h->header_length;
    if (h->backing_format) {
        off = ext_put(cl, off, STRATA_QCOW2_EXT_BACKING_FMT,
                      h->backing_format, (uint32_t)fmt_len);
    }
    if (table) {
        uint8_t t[G_N_ELEMENTS(known_features) * FEATURE_ENTRY_SIZE];
        memset(t, 0, sizeof(t));
        for (unsigned i = 0; i < G_N_ELEMENTS(known_features); i++) {
            uint8_t *e = t + i * FEATURE_ENTRY_SIZE;
            e[0] = known_features[i].type;
            e[1] = known_features[i].bit;
            memcpy(e + 2, known_features[i].name,
                   strlen(known_features[i].name));
        }
        off = ext_put(cl, off, STRATA_QCOW2_EXT_FEATURE_TABLE, t,
                      (uint32_t)sizeof(t));
    }
    for (guint i = 0; i < h->kept_exts->len; i++) {
        StrataQcow2Ext *e = g_ptr_array_index(h->kept_exts, i);
        gsize elen;
        const void *d = g_bytes_get_data(e->data, &elen);
        off = ext_put(cl, off, e->type, d, (uint32_t)elen);
    }
    off = ext_put(cl, off, STRATA_QCOW2_EXT_END, NULL, 0);

    if (name_len) {
        memcpy(cl + off, h->backing_file, name_len);
        h->backing_file_offset = off;
        h->backing_file_size = (uint32_t)name_len;
    } else {
        h->backing_file_offset = 0;
        h->backing_file_size = 0;
    }
    strata_qcow2_put_be64(cl + 8, h->backing_file_offset);
    strata_qcow2_put_be32(cl + 16, h->backing_file_size);
    return g_steal_pointer(&cl);
}
