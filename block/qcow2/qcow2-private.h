/* strata — qcow2 driver internals shared by the files of block/qcow2/.
 *
 * The on-disk format and the limits enforced here follow
 * docs/qcow2.md.  Every number read from an image is untrusted until one
 * of the checks in header.c or the access-time checks in cluster.c and
 * refcount.c has bounded it.
 */
#ifndef STRATA_QCOW2_PRIVATE_H
#define STRATA_QCOW2_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "../block-private.h"
#include "qcow2.h"

#ifdef __cplusplus
extern "C" {
#endif

#define STRATA_QCOW2_MAGIC 0x514649fbu

#define STRATA_QCOW2_MIN_CLUSTER_BITS 9
#define STRATA_QCOW2_MAX_CLUSTER_BITS 21
#define STRATA_QCOW2_MAX_L1_BYTES (32u * 1024 * 1024)
#define STRATA_QCOW2_MAX_REFTABLE_BYTES (8u * 1024 * 1024)
#define STRATA_QCOW2_MAX_SNAPSHOTS 65536u
#define STRATA_QCOW2_MAX_BACKING_NAME 1023u
#define STRATA_QCOW2_MAX_BACKING_FMT 15u
#define STRATA_QCOW2_MAX_HOST_OFFSET ((1ull << 56) - 1)
#define STRATA_QCOW2_V2_HEADER_LEN 72u
#define STRATA_QCOW2_V3_MIN_HEADER_LEN 104u
#define STRATA_QCOW2_V3_HEADER_LEN 112u

/* Header extension types. */
#define STRATA_QCOW2_EXT_END 0x00000000u
#define STRATA_QCOW2_EXT_BACKING_FMT 0xe2792acau
#define STRATA_QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define STRATA_QCOW2_EXT_BITMAPS 0x23852875u
#define STRATA_QCOW2_EXT_CRYPTO 0x0537be77u
#define STRATA_QCOW2_EXT_DATA_FILE 0x44415441u

/* Feature bits. */
#define STRATA_QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define STRATA_QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define STRATA_QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define STRATA_QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define STRATA_QCOW2_INCOMPAT_EXTL2 (1ull << 4)
/* The incompatible bits this driver can open at all. */
#define STRATA_QCOW2_INCOMPAT_SUPPORTED                                     \
    (STRATA_QCOW2_INCOMPAT_DIRTY | STRATA_QCOW2_INCOMPAT_CORRUPT |          \
     STRATA_QCOW2_INCOMPAT_COMPRESSION | STRATA_QCOW2_INCOMPAT_EXTL2)
#define STRATA_QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* No autoclear feature is implemented: every set bit is cleared before
 * the first write. */
#define STRATA_QCOW2_AUTOCLEAR_SUPPORTED 0ull

/* L1/L2 entry bits. */
#define STRATA_QCOW2_OFLAG_COPIED (1ull << 63)
#define STRATA_QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define STRATA_QCOW2_OFLAG_ZERO (1ull << 0)
#define STRATA_QCOW2_OFFSET_MASK 0x00fffffffffffe00ull
#define STRATA_QCOW2_L1_RESERVED 0x7f000000000001ffull
#define STRATA_QCOW2_L2_RESERVED 0x3f000000000001feull
#define STRATA_QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull

/* Extended L2 entries: a second word per entry, the subcluster bitmap
 * (bit n: subcluster n holds data; bit 32 + n: it reads as zeroes). */
#define STRATA_QCOW2_SUBCLUSTERS 32u
#define STRATA_QCOW2_MIN_EXTL2_CLUSTER_BITS 14
#define STRATA_QCOW2_BITMAP_ALL_ALLOC 0x00000000ffffffffull
#define STRATA_QCOW2_BITMAP_ALL_ZERO 0xffffffff00000000ull

/* Header byte offsets of fields rewritten on their own. */
#define STRATA_QCOW2_HDR_SIZE 24
#define STRATA_QCOW2_HDR_L1 36          /* l1_size + l1_table_offset */
#define STRATA_QCOW2_HDR_REFTABLE 48    /* offset + clusters */
#define STRATA_QCOW2_HDR_INCOMPAT 72
#define STRATA_QCOW2_HDR_AUTOCLEAR 88

extern const StrataDriver strata_driver_qcow2;

/* ------------------------------------------------------------------ */
/* header.c                                                            */
/* ------------------------------------------------------------------ */

/* A header extension kept byte for byte (unknown ones, bitmaps). */
typedef struct StrataQcow2Ext {
    uint32_t type;
    GBytes *data;
} StrataQcow2Ext;

/* One entry of the feature name table. */
typedef struct StrataQcow2FeatureName {
    uint8_t type;  /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    char name[47]; /* NUL-terminated copy of the 46 on-disk bytes */
} StrataQcow2FeatureName;

typedef struct StrataQcow2Header {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;

    /* Bytes [112, header_length) of a longer v3 header: future fields,
     * copied verbatim on rewrite.  NULL when there are none. */
    GBytes *extra_fields;
    char *backing_file;     /* NULL: no backing file */
    char *backing_format;   /* NULL: no format extension */
    GArray *feature_names;  /* StrataQcow2FeatureName; NULL if absent */
    GPtrArray *kept_exts;   /* StrataQcow2Ext *, in file order */
} StrataQcow2Header;

void strata_qcow2_header_init(StrataQcow2Header *h);
void strata_qcow2_header_cleanup(StrataQcow2Header *h);

/**
 * strata_qcow2_header_parse:
 * @buf: the start of the image: at least the first cluster, or all of
 *   the file when it is shorter (@len bytes)
 *
 * Decodes and validates a v2/v3 header, its extensions and the backing
 * file name against every open-time limit (docs/qcow2.md, "Limits").
 * It does not look at the feature bits' consequences (corrupt, dirty):
 * strata_qcow2_header_check_features() does, knowing how the image is
 * opened.
 */
bool strata_qcow2_header_parse(StrataQcow2Header *h, const uint8_t *buf,
                               size_t len, GError **error);

/* Refuses unknown incompatible bits (naming them from the feature
 * table), a corrupt image opened for writing, and features this driver
 * does not implement. */
bool strata_qcow2_header_check_features(const StrataQcow2Header *h,
                                        bool writable, GError **error);

/**
 * strata_qcow2_header_build:
 *
 * Serialises @h into one cluster: header, extensions (backing format,
 * feature table, kept extensions, end marker) then the backing name.
 * Sets h->header_length, h->backing_file_offset and h->backing_file_size.
 *
 * Returns: (transfer full) (nullable): a zero-padded buffer of one
 * cluster, or NULL with @error when it does not fit.
 */
uint8_t *strata_qcow2_header_build(StrataQcow2Header *h, GError **error);

/* The human name of a feature bit from @h's table, or NULL. */
const char *strata_qcow2_feature_name(const StrataQcow2Header *h,
                                      uint8_t type, uint8_t bit);

/* ------------------------------------------------------------------ */
/* The driver state                                                    */
/* ------------------------------------------------------------------ */

typedef struct StrataQcow2Cache StrataQcow2Cache;
typedef struct StrataQcow2LayerMap StrataQcow2LayerMap;

/* A read of guest data from host clusters, between the lookup and the
 * end of its I/O: those clusters are not handed out again meanwhile,
 * even when a write frees them, or the read could return the new
 * owner's data. */
typedef struct StrataQcow2Read {
    uint64_t host_start, host_end; /* bytes */
    bool deferred;  /* the allocator skipped a free cluster of ours */
} StrataQcow2Read;

/* One internal snapshot, as its table entry says. */
typedef struct StrataQcow2Snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id_str;
    char *name;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    uint64_t icount;            /* UINT64_MAX: not recorded */
    uint32_t extra_data_size;   /* as read (or written) */
    /* Extra data past the fields known here, kept on rewrite. */
    GBytes *unknown_extra;
} StrataQcow2Snapshot;

/* Metadata kinds of the overlap check (QEMU's QCOW2_OL_* order). */
enum {
    STRATA_QCOW2_OL_MAIN_HEADER = 1 << 0,
    STRATA_QCOW2_OL_ACTIVE_L1 = 1 << 1,
    STRATA_QCOW2_OL_ACTIVE_L2 = 1 << 2,
    STRATA_QCOW2_OL_REFCOUNT_TABLE = 1 << 3,
    STRATA_QCOW2_OL_REFCOUNT_BLOCK = 1 << 4,
    STRATA_QCOW2_OL_SNAPSHOT_TABLE = 1 << 5,
    STRATA_QCOW2_OL_INACTIVE_L1 = 1 << 6,
    STRATA_QCOW2_OL_INACTIVE_L2 = 1 << 7,
    STRATA_QCOW2_OL_BITMAP_DIRECTORY = 1 << 8,
};
#define STRATA_QCOW2_OL_CONSTANT                                            \
    (STRATA_QCOW2_OL_MAIN_HEADER | STRATA_QCOW2_OL_ACTIVE_L1 |              \
     STRATA_QCOW2_OL_REFCOUNT_TABLE | STRATA_QCOW2_OL_SNAPSHOT_TABLE |      \
     STRATA_QCOW2_OL_BITMAP_DIRECTORY)
#define STRATA_QCOW2_OL_CACHED                                              \
    (STRATA_QCOW2_OL_CONSTANT | STRATA_QCOW2_OL_ACTIVE_L2 |                 \
     STRATA_QCOW2_OL_REFCOUNT_BLOCK | STRATA_QCOW2_OL_INACTIVE_L1)
#define STRATA_QCOW2_OL_ALL                                                 \
    (STRATA_QCOW2_OL_CACHED | STRATA_QCOW2_OL_INACTIVE_L2)

/* A cluster allocation in flight: writes to its guest clusters wait. */
typedef struct StrataQcow2Alloc {
    uint64_t guest_start, guest_end; /* cluster-aligned, bytes */
    StrataCoQueue waiters;
} StrataQcow2Alloc;

typedef struct StrataQcow2State {
    StrataNode *node;
    StrataQcow2Header hdr;

    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint32_t l2_bits;           /* log2(entries per L2 table) */
    bool extended_l2;           /* 16-byte entries with subclusters */
    uint32_t l2_entry_shift;    /* log2(64-bit words per L2 entry) */
    uint32_t subcluster_bits;   /* = cluster_bits without extended L2 */
    uint64_t subcluster_size;
    uint64_t l2_size;           /* entries per L2 table */
    uint32_t l2_slice_size;     /* bytes per L2 cache entry */
    uint64_t l2_slice_entries;

    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t *l1_table;         /* host byte order */
    uint32_t l1_vm_state_index; /* L1 entries the disk needs */

    uint32_t refcount_order;
    uint32_t refcount_block_bits; /* log2(entries per refcount block) */
    uint64_t refcount_max;
    uint64_t refcount_table_offset;
    uint64_t refcount_table_size; /* entries */
    uint64_t *refcount_table;   /* host byte order; see refcount_table_set */
    size_t refcount_table_map;  /* bytes mapped for it; 0: none */
    /* Entries up to the last non-zero one (the overlap check walks only
     * those); 0 with !rt_used_valid: recompute.  Whoever changes the
     * table clears rt_used_valid. */
    uint64_t rt_used;
    bool rt_used_valid;
    uint64_t free_cluster_index;
    /* Where the next compressed cluster may go, packed after the last
     * one in its host cluster; 0: start a new host cluster. */
    uint64_t free_byte_offset;

    uint32_t csize_shift;
    uint64_t csize_mask;
    uint64_t cluster_offset_mask;

    StrataQcow2Cache *l2_cache;
    StrataQcow2Cache *refcount_cache;
    /* Which layer below holds each cluster (layermap.c); NULL: none. */
    StrataQcow2LayerMap *layer_map;

    /* Held across metadata lookups and updates, never across guest data
     * I/O. */
    StrataCoMutex lock;
    GList *allocs;              /* StrataQcow2Alloc * in flight */
    GList *reads;               /* StrataQcow2Read * in flight */

    /* Internal snapshots, in table order. */
    GPtrArray *snapshots;       /* StrataQcow2Snapshot * */
    uint64_t snapshots_size;    /* bytes of the table on disk */

    /* Bitmap directory (from the bitmaps extension), for overlap checks
     * only: bitmaps themselves are not implemented. */
    uint64_t bitmap_dir_offset, bitmap_dir_size;

    int overlap_check;          /* STRATA_QCOW2_OL_* kinds checked */

    bool writable;
    bool sparse_file;       /* block status asks the file about holes */
    /* Writes are refused: the dirty bit says refcounts are stale and no
     * repair is implemented yet. */
    bool needs_repair;
    bool autoclear_cleared;
    bool corrupt;
    bool pass_discard_request;
    bool lazy_refcounts_opt;

    /* Set while open() opens the backing chain, with the image file's
     * identity, so a chain that loops back is refused. */
    bool opening;
    uint64_t st_dev, st_ino;

    /* Last decompressed cluster, to serve sequential small reads. */
    uint8_t *cmp_buf;
    uint8_t *decmp_buf;
    uint64_t decmp_host;        /* descriptor of what decmp_buf holds */
} StrataQcow2State;

/* Cluster types, as an L2 entry classifies. */
typedef enum {
    STRATA_QCOW2_CLUSTER_UNALLOCATED,
    STRATA_QCOW2_CLUSTER_ZERO_PLAIN,
    STRATA_QCOW2_CLUSTER_ZERO_ALLOC,
    STRATA_QCOW2_CLUSTER_NORMAL,
    STRATA_QCOW2_CLUSTER_COMPRESSED,
    /* Extended L2 only: a subcluster of a cluster we hold host space
     * for that still falls through to the backing file. */
    STRATA_QCOW2_CLUSTER_UNALLOCATED_ALLOC,
} StrataQcow2ClusterType;

/* The type of a whole standard entry (for extended entries: whether it
 * names host storage, which is what refcounting needs). */
StrataQcow2ClusterType strata_qcow2_l2_entry_type(uint64_t entry);

/* Whether an extended entry's bitmap agrees with its entry: no
 * subcluster both data and zero, no data without a host cluster, no
 * bitmap on a compressed cluster. */
bool strata_qcow2_extl2_valid(uint64_t entry, uint64_t bitmap);
/* The type of subcluster @sc of a valid extended entry. */
StrataQcow2ClusterType strata_qcow2_subcluster_type(uint64_t entry,
                                                    uint64_t bitmap,
                                                    unsigned sc);

/* Bitmap bits of subclusters [from, to): data and zero halves. */
static inline uint64_t strata_qcow2_sc_alloc_range(unsigned from,
                                                   unsigned to)
{
    return (1ull << to) - (1ull << from);
}

static inline uint64_t strata_qcow2_sc_zero_range(unsigned from, unsigned to)
{
    return strata_qcow2_sc_alloc_range(from, to) << 32;
}

/* L2 entry @i of a slice (big-endian on disk and in the cache); with
 * extended L2 each entry is two words, the bitmap second. */
static inline uint64_t strata_qcow2_l2_get(const StrataQcow2State *s,
                                           const uint64_t *slice,
                                           uint64_t i)
{
    return GUINT64_FROM_BE(slice[i << s->l2_entry_shift]);
}

static inline uint64_t strata_qcow2_l2_get_bitmap(const StrataQcow2State *s,
                                                  const uint64_t *slice,
                                                  uint64_t i)
{
    return s->extended_l2 ? GUINT64_FROM_BE(slice[(i << 1) + 1]) : 0;
}

static inline void strata_qcow2_l2_set(const StrataQcow2State *s,
                                       uint64_t *slice, uint64_t i,
                                       uint64_t entry)
{
    slice[i << s->l2_entry_shift] = GUINT64_TO_BE(entry);
}

static inline void strata_qcow2_l2_set_bitmap(const StrataQcow2State *s,
                                              uint64_t *slice, uint64_t i,
                                              uint64_t bitmap)
{
    if (s->extended_l2) {
        slice[(i << 1) + 1] = GUINT64_TO_BE(bitmap);
    }
}

/* Geometry helpers. */
static inline uint64_t strata_qcow2_offset_into_cluster(
    const StrataQcow2State *s, uint64_t offset)
{
    return offset & (s->cluster_size - 1);
}

static inline uint64_t strata_qcow2_start_of_cluster(
    const StrataQcow2State *s, uint64_t offset)
{
    return offset & ~(s->cluster_size - 1);
}

static inline uint64_t strata_qcow2_size_to_clusters(
    const StrataQcow2State *s, uint64_t size)
{
    return (size + s->cluster_size - 1) >> s->cluster_bits;
}

/* Marks the image corrupt (on disk when writable) and logs why; the
 * caller fails its request with -EIO. */
void strata_qcow2_co_signal_corruption(StrataQcow2State *s, const char *fmt,
                                       ...) G_GNUC_PRINTF(2, 3);

/* ------------------------------------------------------------------ */
/* cache.c: L2 slices and refcount blocks                              */
/* ------------------------------------------------------------------ */

/* @entry_size: bytes per entry (an L2 slice or a whole refcount block). */
StrataQcow2Cache *strata_qcow2_cache_new(StrataQcow2State *s,
                                         unsigned nb_entries,
                                         uint32_t entry_size);
void strata_qcow2_cache_free(StrataQcow2Cache *c);
unsigned strata_qcow2_cache_nb_entries(const StrataQcow2Cache *c);

/* Coroutine, with s->lock held.  Pins the entry at host @offset (read
 * from the file unless @no_read) in *@table; 0 or -errno. */
int strata_qcow2_cache_co_get(StrataQcow2Cache *c, uint64_t offset,
                              void **table);
int strata_qcow2_cache_co_get_empty(StrataQcow2Cache *c, uint64_t offset,
                                    void **table);
/* Unpins what _get returned and clears *@table. */
void strata_qcow2_cache_put(StrataQcow2Cache *c, void **table);
void strata_qcow2_cache_mark_dirty(StrataQcow2Cache *c, void *table);

/* Before any dirty entry of @c is written, every dirty entry of @dep is
 * written and the file flushed: the metadata @c's entries point to must
 * be stable first.  Call it before changing @c.  When @dep depended on
 * @c (or @c on a third cache), that older order is settled now by a
 * flush; 0 or -errno. */
int strata_qcow2_cache_co_set_dependency(StrataQcow2Cache *c,
                                         StrataQcow2Cache *dep);
/* Forgets @c's dependency.  Only for a caller whose dirty entries in
 * both caches need no order among themselves: none of them makes a
 * reference reachable before a later write that follows a flush of
 * everything (the snapshot table switch in the header). */
void strata_qcow2_cache_drop_dependency(StrataQcow2Cache *c);
/* Writes every dirty entry (dependency first) without flushing the file. */
int strata_qcow2_cache_co_write(StrataQcow2Cache *c);
/* As _co_write, then flushes the file. */
int strata_qcow2_cache_co_flush(StrataQcow2Cache *c);
/* The cached copy of the entry at host @offset, or NULL; not pinned:
 * use it before the next yield. */
const void *strata_qcow2_cache_peek(StrataQcow2Cache *c, uint64_t offset);
/* Forgets the entries of the cluster at @offset (it was freed). */
void strata_qcow2_cache_discard_cluster(StrataQcow2Cache *c,
                                        uint64_t offset,
                                        uint64_t cluster_size);
bool strata_qcow2_cache_is_dirty(const StrataQcow2Cache *c);

/* What a cache did and holds, for query commands and tests. */
typedef struct StrataQcow2CacheStats {
    uint64_t hits, misses;
    uint64_t read_around;   /* slices loaded beside a missed one */
    unsigned entries;       /* existing now (memory is allocated lazily) */
    unsigned max_entries;
    uint64_t bytes;         /* table memory held now */
} StrataQcow2CacheStats;

void strata_qcow2_cache_get_stats(const StrataQcow2Cache *c,
                                  StrataQcow2CacheStats *stats);
/* Every @seconds (0: never), entries not used since the last tick give
 * their memory back (cache-clean-interval), on @context's loop. */
void strata_qcow2_cache_set_clean_interval(StrataQcow2Cache *c,
                                           GMainContext *context,
                                           unsigned seconds);
/* One clean tick now, after forgetting every entry's recent use: frees
 * all clean unpinned entries. */
void strata_qcow2_cache_drop_clean(StrataQcow2Cache *c);

/* Cache sizes from options, as QEMU 7.2 derives them. */
typedef struct StrataQcow2CacheSizes {
    uint64_t l2_cache_size;
    uint64_t l2_slice_size;
    uint64_t refcount_cache_size;
} StrataQcow2CacheSizes;

bool strata_qcow2_cache_sizes(JsonObject *options, uint64_t virtual_size,
                              uint32_t cluster_bits,
                              StrataQcow2CacheSizes *sizes, GError **error);

/* ------------------------------------------------------------------ */
/* layermap.c: which layer of the backing chain holds each cluster     */
/* ------------------------------------------------------------------ */

/* Coroutine, s->lock not held.  Reads [@offset, + @bytes), which @s
 * leaves unallocated, as its backing chain shows it: from the layer that
 * holds each cluster, found in the map without a lookup per layer. */
int strata_qcow2_co_read_backing(StrataQcow2State *s, uint64_t offset,
                                 uint64_t bytes, StrataIOVec *qiov,
                                 size_t qiov_offset);
/* Which guest clusters @s maps (or their length) changed: the maps of
 * every node above @s forget what they know.  Not a coroutine. */
void strata_qcow2_layermap_notify_change(StrataQcow2State *s);
/* The L2 slice at host offset @slice_offset, whose content is @slice,
 * changed: the maps above @s correct what it maps in place (or forget
 * everything when the slice is not one of the active tables). */
void strata_qcow2_layermap_slice_changed(StrataQcow2State *s,
                                         uint64_t slice_offset,
                                         const void *slice);
/* Coroutine, at the end of open: builds @s's whole map when the chain
 * below is deep and the map cheap (a small image; the backing's own map
 * to build from). */
void strata_qcow2_layermap_co_prepare(StrataQcow2State *s);
void strata_qcow2_layermap_free(StrataQcow2State *s);

typedef struct StrataQcow2LayerMapStats {
    uint64_t lookups;       /* reads answered from the map */
    uint64_t composed;      /* regions built from the backing's map */
    uint64_t walked;        /* regions built by walking the chain */
    uint64_t resets;        /* times everything was forgotten */
    unsigned layers;        /* layers below, as the map sees them */
    unsigned regions_built; /* regions held now */
} StrataQcow2LayerMapStats;

/* All zero when @s has no map. */
void strata_qcow2_layermap_get_stats(StrataQcow2State *s,
                                     StrataQcow2LayerMapStats *stats);

/* ------------------------------------------------------------------ */
/* refcount.c                                                          */
/* ------------------------------------------------------------------ */

uint64_t strata_qcow2_refblock_get(const void *block, uint32_t order,
                                   uint64_t index);
void strata_qcow2_refblock_set(void *block, uint32_t order, uint64_t index,
                               uint64_t value);

/* Coroutine, s->lock held.  The refcount of the host cluster with index
 * @cluster; clusters beyond the table's reach have refcount 0. */
int strata_qcow2_co_get_refcount(StrataQcow2State *s, uint64_t cluster,
                                 uint64_t *refcount);
/* Adds @addend to every cluster touched by [@offset, @offset + @length).
 * A decrement reaching 0 frees the cluster. */
int strata_qcow2_co_update_refcount(StrataQcow2State *s, uint64_t offset,
                                    uint64_t length, int64_t addend);
/* Allocates @size bytes (whole clusters) with refcount 1: the host
 * offset, or -errno. */
int64_t strata_qcow2_co_alloc_clusters(StrataQcow2State *s, uint64_t size);
/* Decrements @size bytes at @offset; errors are logged (a leak). */
void strata_qcow2_co_free_clusters(StrataQcow2State *s, uint64_t offset,
                                   uint64_t size);
/* Drops the references of one L2 entry's host storage. */
void strata_qcow2_co_free_l2_entry(StrataQcow2State *s, uint64_t entry);
bool strata_qcow2_refcount_init(StrataQcow2State *s, GError **error);
/* Makes @entries (@n of them, host order; taken and freed) the refcount
 * table, in place of the one there was. */
void strata_qcow2_refcount_table_set(StrataQcow2State *s, uint64_t *entries,
                                     uint64_t n);
void strata_qcow2_refcount_table_free(StrataQcow2State *s);
/* Coroutine, s->lock held.  Drops the refcount blocks that count
 * nothing but themselves from the table (after a shrink). */
int strata_qcow2_co_shrink_reftable(StrataQcow2State *s);
/* Coroutine, s->lock held.  The end of the last cluster in use (the
 * length the file needs), or -errno. */
int64_t strata_qcow2_co_last_cluster_end(StrataQcow2State *s);

/* ------------------------------------------------------------------ */
/* cluster.c                                                           */
/* ------------------------------------------------------------------ */

/**
 * strata_qcow2_co_get_host_offset:
 * @bytes: (inout): wanted bytes from @offset; on return, how many share
 *   the type (and, for NORMAL, are contiguous on the host)
 * @host: (out): host offset for NORMAL / ZERO_ALLOC, the L2 entry for
 *   COMPRESSED
 * @l2_entry: (out) (optional): the first L2 entry of the run (0 when
 *   there is no L2 table)
 *
 * Coroutine, s->lock held.  0 or -errno (-EIO on corrupt metadata).
 */
int strata_qcow2_co_get_host_offset(StrataQcow2State *s, uint64_t offset,
                                    uint64_t *bytes, uint64_t *host,
                                    StrataQcow2ClusterType *type,
                                    uint64_t *l2_entry);

/* Coroutine, s->lock held.  Pins the L2 slice holding the entry of guest
 * @offset, allocating (or copying) the L2 table when @allocate; *@index
 * is the entry's index in the slice.  Without @allocate and no table,
 * returns 0 with *@slice NULL. */
int strata_qcow2_co_get_l2_slice(StrataQcow2State *s, uint64_t offset,
                                 bool allocate, uint64_t **slice,
                                 uint64_t *index);
/* Writes L1 entry @index (and its neighbours in the same 512 bytes). */
int strata_qcow2_co_write_l1_entry(StrataQcow2State *s, uint32_t index);
/* Grows the active L1 to @min_size entries (new table, header switch). */
int strata_qcow2_co_grow_l1(StrataQcow2State *s, uint64_t min_size);

/* Compresses one cluster at @in with the image's compression type:
 * the bytes written to @out (at most @out_len), -ENOSPC when they do
 * not fit, -ENOTSUP for a type this build cannot write. */
ssize_t strata_qcow2_compress(StrataQcow2State *s, const uint8_t *in,
                              uint8_t *out, size_t out_len);

/* Decompresses the cluster of @entry into s->decmp_buf. */
int strata_qcow2_co_read_compressed(StrataQcow2State *s, uint64_t entry);

/* Whether [@offset, @offset + @size) hits metadata that data must never
 * overwrite (header, L1, refcount table). */
bool strata_qcow2_overlaps_metadata(StrataQcow2State *s, uint64_t offset,
                                    uint64_t size);

/* Which metadata kind (one STRATA_QCOW2_OL_* bit) [@offset, +@size)
 * hits among the enabled kinds not in @ign, or 0.  Inactive L2 tables
 * are looked up only in a coroutine (they need the snapshot L1s). */
int strata_qcow2_co_check_metadata_overlap(StrataQcow2State *s, int ign,
                                           uint64_t offset, uint64_t size);
/* Before a write of metadata (or data) at [@offset, +@size): 0, or
 * -EIO after marking the image corrupt when it would overwrite
 * metadata of a kind not in @ign. */
int strata_qcow2_co_pre_write_overlap_check(StrataQcow2State *s, int ign,
                                            uint64_t offset, uint64_t size);
/* The overlap-check option (a level name or an object of booleans). */
bool strata_qcow2_parse_overlap_check(JsonObject *options, int *mask,
                                      GError **error);

/* Writes metadata at [@offset, +@len) synchronously (write + flush)
 * after the overlap check (kinds in @ign may be overwritten). */
int strata_qcow2_co_write_meta(StrataQcow2State *s, int ign, uint64_t offset,
                               const void *buf, size_t len);
/* The same without the flush: for metadata nothing points at yet, made
 * stable by a later flush that comes before the pointer is written. */
int strata_qcow2_co_pwrite_meta(StrataQcow2State *s, int ign,
                                uint64_t offset, const void *buf, size_t len);
/* Writes a header field range synchronously (write + flush). */
int strata_qcow2_co_write_header_bytes(StrataQcow2State *s, uint64_t offset,
                                       const void *buf, size_t len);

/* Rewrites cluster 0 from s->hdr (used to change the backing file):
 * keeps unknown header fields and extensions. */
int strata_qcow2_co_rewrite_header(StrataQcow2State *s, GError **error);

/* ------------------------------------------------------------------ */
/* snapshot.c                                                          */
/* ------------------------------------------------------------------ */

void strata_qcow2_snapshot_free(StrataQcow2Snapshot *sn);
/* Reads and validates the snapshot table at open. */
int strata_qcow2_co_read_snapshots(StrataQcow2State *s, GError **error);
/* The guest offset where VM state starts: past the last L1 entry the
 * disk needs. */
uint64_t strata_qcow2_vm_state_offset(const StrataQcow2State *s);
/* Validates a snapshot's L1 location and size. */
int strata_qcow2_check_snapshot_l1(StrataQcow2State *s,
                                   const StrataQcow2Snapshot *sn);
/* Reads a snapshot's L1 table (host order) into *@table (g_free). */
int strata_qcow2_co_read_l1(StrataQcow2State *s, uint64_t offset,
                            uint32_t size, uint64_t **table);

/* ------------------------------------------------------------------ */
/* check.c                                                             */
/* ------------------------------------------------------------------ */

/* Coroutine, s->lock held, requests quiesced: strata_qcow2_co_check()'s
 * body (also run by open on a dirty image). */
int strata_qcow2_co_check_repair(StrataQcow2State *s,
                                 StrataQcow2CheckFix fix,
                                 StrataQcow2CheckResult *res,
                                 GError **error);

/* ------------------------------------------------------------------ */
/* qcow2.c, for snapshot.c                                             */
/* ------------------------------------------------------------------ */

/* s->lock not held.  Deallocates the VM state area's clusters
 * [vm_state_offset, + @bytes) from the active tree. */
int strata_qcow2_co_discard_vmstate(StrataQcow2State *s, uint64_t bytes);

/* ------------------------------------------------------------------ */
/* Endianness helpers                                                  */
/* ------------------------------------------------------------------ */

static inline uint16_t strata_qcow2_be16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t strata_qcow2_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t strata_qcow2_be64(const uint8_t *p)
{
    return ((uint64_t)strata_qcow2_be32(p) << 32) | strata_qcow2_be32(p + 4);
}

static inline void strata_qcow2_put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static inline void strata_qcow2_put_be64(uint8_t *p, uint64_t v)
{
    strata_qcow2_put_be32(p, v >> 32);
    strata_qcow2_put_be32(p + 4, (uint32_t)v);
}

#ifdef __cplusplus
}
#endif

#endif
