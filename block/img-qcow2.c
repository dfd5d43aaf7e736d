/* strata-img — what the tool does to qcow2 images beyond the driver.
 *
 * Header edits on closed images (a new backing file name, the lazy
 * refcounts bit, the compat level), made with the driver's own header
 * parser and builder so that every field and extension the tool does not
 * touch is kept.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "img-private.h"
#include "qcow2/qcow2.h"
#include "qcow2/qcow2-private.h"

/* Reads cluster 0 (or the whole file when shorter) and parses it. */
static uint8_t *read_header(int fd, const char *filename,
                            StrataQcow2Header *h, size_t *cluster_size,
                            GError **error)
{
    uint8_t first[STRATA_QCOW2_V3_HEADER_LEN];
    g_autofree uint8_t *buf = NULL;
    struct stat st;
    ssize_t n;
    uint32_t bits;
    size_t len;

    n = pread(fd, first, sizeof(first), 0);
    if (n < (ssize_t)STRATA_QCOW2_V2_HEADER_LEN ||
        strata_qcow2_be32(first) != STRATA_QCOW2_MAGIC) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'%s' is not a qcow2 image", filename);
        return NULL;
    }
    bits = strata_qcow2_be32(first + 20);
    if (bits < STRATA_QCOW2_MIN_CLUSTER_BITS ||
        bits > STRATA_QCOW2_MAX_CLUSTER_BITS || fstat(fd, &st) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image '%s' is corrupt: bad cluster size", filename);
        return NULL;
    }
    *cluster_size = (size_t)1 << bits;
    len = MIN(*cluster_size, (size_t)st.st_size);
    buf = g_malloc0(*cluster_size);
    n = pread(fd, buf, len, 0);
    if (n != (ssize_t)len) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not read the header of '%s': %s", filename,
                    g_strerror(n < 0 ? errno : EIO));
        return NULL;
    }
    if (!strata_qcow2_header_parse(h, buf, len, error)) {
        return NULL;
    }
    return g_steal_pointer(&buf);
}

static bool write_header(int fd, const char *filename, StrataQcow2Header *h,
                         size_t cluster_size, GError **error)
{
    g_autofree uint8_t *out = strata_qcow2_header_build(h, error);
    ssize_t n;

    if (!out) {
        return false;
    }
    n = pwrite(fd, out, cluster_size, 0);
    if (n != (ssize_t)cluster_size || fdatasync(fd) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not write the header of '%s': %s", filename,
                    g_strerror(n < 0 || n == (ssize_t)cluster_size ? errno
                                                                   : EIO));
        return false;
    }
    return true;
}

typedef bool (*HeaderEdit)(StrataQcow2Header *h, const void *arg,
                           const char *filename, GError **error);

static bool edit_header(const char *filename, HeaderEdit edit,
                        const void *arg, GError **error)
{
    StrataQcow2Header h;
    g_autofree uint8_t *buf = NULL;
    size_t cluster_size = 0;
    bool ok = false;
    int fd;

    fd = open(filename, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not open '%s': %s", filename, g_strerror(errno));
        return false;
    }
    strata_qcow2_header_init(&h);
    buf = read_header(fd, filename, &h, &cluster_size, error);
    if (buf && edit(&h, arg, filename, error)) {
        ok = write_header(fd, filename, &h, cluster_size, error);
    }
    strata_qcow2_header_cleanup(&h);
    close(fd);
    return ok;
}

/* Parses the header of the closed image @filename into @h (initialised
 * here; the caller cleans it up either way). */
static bool load_header(const char *filename, StrataQcow2Header *h,
                        size_t *cluster_size, GError **error)
{
    g_autofree uint8_t *buf = NULL;
    int fd;

    strata_qcow2_header_init(h);
    fd = open(filename, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not open '%s': %s", filename, g_strerror(errno));
        return false;
    }
    buf = read_header(fd, filename, h, cluster_size, error);
    close(fd);
    return buf != NULL;
}

typedef struct BackingArg {
    const char *name;
    const char *fmt;
} BackingArg;

static bool edit_backing(StrataQcow2Header *h, const void *opaque,
                         const char *filename, GError **error)
{
    const BackingArg *a = opaque;
    bool has = a->name && *a->name;

    (void)filename;
    if (has && !strata_backing_name_writable(a->name, error)) {
        return false;
    }
    if (has && strlen(a->name) > STRATA_QCOW2_MAX_BACKING_NAME) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing file name too long");
        return false;
    }
    if (has && a->fmt && strlen(a->fmt) > STRATA_QCOW2_MAX_BACKING_FMT) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Backing format name too long");
        return false;
    }
    g_free(h->backing_file);
    g_free(h->backing_format);
    h->backing_file = has ? g_strdup(a->name) : NULL;
    h->backing_format = has && a->fmt ? g_strdup(a->fmt) : NULL;
    return true;
}

bool strata_img_qcow2_set_backing(const char *filename, const char *backing,
                                  const char *backing_fmt, GError **error)
{
    BackingArg a = { backing, backing_fmt };

    return edit_header(filename, edit_backing, &a, error);
}

static bool edit_lazy(StrataQcow2Header *h, const void *opaque,
                      const char *filename, GError **error)
{
    bool on = *(const bool *)opaque;

    if (h->incompatible_features & (STRATA_QCOW2_INCOMPAT_DIRTY |
                                    STRATA_QCOW2_INCOMPAT_CORRUPT)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image '%s' is not clean; run 'qemu-img check -r all' "
                    "first", filename);
        return false;
    }
    if (on && h->version < 3) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Lazy refcounts only supported with compatibility level "
                    "1.1 and above (use compat=1.1 or greater)");
        return false;
    }
    if (on) {
        h->compatible_features |= STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS;
    } else {
        h->compatible_features &= ~STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS;
    }
    return true;
}

bool strata_img_qcow2_set_lazy_refcounts(const char *filename, bool on,
                                         GError **error)
{
    return edit_header(filename, edit_lazy, &on, error);
}

bool strata_img_qcow2_read_backing(const char *filename, char **backing,
                                   GError **error)
{
    StrataQcow2Header h;
    size_t cluster_size;
    bool ok = load_header(filename, &h, &cluster_size, error);

    *backing = ok ? g_steal_pointer(&h.backing_file) : NULL;
    strata_qcow2_header_cleanup(&h);
    return ok;
}

typedef struct IncompatArg {
    uint64_t clear, set;
    uint64_t *old;
} IncompatArg;

static bool edit_incompat(StrataQcow2Header *h, const void *opaque,
                          const char *filename, GError **error)
{
    const IncompatArg *a = opaque;

    (void)filename;
    (void)error;
    if (a->old) {
        *a->old = h->incompatible_features;
    }
    h->incompatible_features = (h->incompatible_features & ~a->clear) |
                               a->set;
    return true;
}

bool strata_img_qcow2_edit_incompat(const char *filename, uint64_t clear,
                                    uint64_t set, uint64_t *old,
                                    GError **error)
{
    IncompatArg a = { clear, set, old };

    return edit_header(filename, edit_incompat, &a, error);
}

bool strata_img_qcow2_read_incompat(const char *filename, uint64_t *bits,
                                    GError **error)
{
    StrataQcow2Header h;
    size_t cluster_size;
    bool ok = load_header(filename, &h, &cluster_size, error);

    if (ok) {
        *bits = h.incompatible_features;
    }
    strata_qcow2_header_cleanup(&h);
    return ok;
}

bool strata_img_qcow2_summary(const char *filename, StrataImgQcow2Summary *sum,
                              GError **error)
{
    StrataQcow2Header h;
    size_t cluster_size;
    bool ok;

    memset(sum, 0, sizeof(*sum));
    ok = load_header(filename, &h, &cluster_size, error);
    if (ok) {
        sum->version = h.version;
        sum->refcount_bits = 1u << h.refcount_order;
        sum->nb_snapshots = h.nb_snapshots;
        sum->incompatible_features = h.incompatible_features;
        sum->compatible_features = h.compatible_features;
        sum->autoclear_features = h.autoclear_features;
        sum->compression_type = h.compression_type;
        sum->has_extra_fields = h.extra_fields != NULL;
        for (guint i = 0; h.kept_exts && i < h.kept_exts->len; i++) {
            StrataQcow2Ext *e = g_ptr_array_index(h.kept_exts, i);

            sum->has_bitmaps |= e->type == STRATA_QCOW2_EXT_BITMAPS;
        }
        sum->backing_file = g_steal_pointer(&h.backing_file);
        sum->backing_format = g_steal_pointer(&h.backing_format);
    }
    strata_qcow2_header_cleanup(&h);
    return ok;
}

void strata_img_qcow2_summary_clear(StrataImgQcow2Summary *sum)
{
    g_clear_pointer(&sum->backing_file, g_free);
    g_clear_pointer(&sum->backing_format, g_free);
}

typedef struct AmendArg {
    int version;
    int lazy;
} AmendArg;

static bool edit_amend(StrataQcow2Header *h, const void *opaque,
                       const char *filename, GError **error)
{
    const AmendArg *a = opaque;

    if (h->incompatible_features & (STRATA_QCOW2_INCOMPAT_DIRTY |
                                    STRATA_QCOW2_INCOMPAT_CORRUPT)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image '%s' is not clean; run 'strata-img check -r all' "
                    "first", filename);
        return false;
    }
    if (a->version == 2 && h->version != 2) {
        /* Version 2 has none of these fields; the caller refused images
         * that use them. */
        h->compatible_features = 0;
        h->autoclear_features = 0;
        h->compression_type = 0;
        g_clear_pointer(&h->extra_fields, g_bytes_unref);
    }
    if (a->version > 0) {
        h->version = (uint32_t)a->version;
    }
    if (a->lazy > 0) {
        h->compatible_features |= STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS;
    } else if (a->lazy == 0) {
        h->compatible_features &= ~STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS;
    }
    return true;
}

bool strata_img_qcow2_amend_header(const char *filename, int version,
                                   int lazy_refcounts, GError **error)
{
    AmendArg a = { version, lazy_refcounts };

    return edit_header(filename, edit_amend, &a, error);
}
