/* strata — blkdebug: a filter that injects I/O errors and, with
 * x-volatile-cache, behaves like a disk with a volatile write cache that
 * a test can "power off" (strata_debug_power_cut).
 *
 * QEMU raises blkdebug events from inside its format drivers; strata's
 * formats do not, so an event here fires when a request of the matching
 * kind reaches the filter (read_aio for reads, write_aio for writes, …,
 * and "none" for every kind, as QEMU fires it once at open so its rules
 * are live from the start).  docs/drivers.md has the table.
 */
#include <errno.h>
#include <string.h>

#include "drivers-private.h"
#include "debug-private.h"

#define SECTOR 512ULL
#define DEFAULT_CACHE_SIZE (64ULL << 20)

typedef enum {
    IO_READ,
    IO_WRITE,
    IO_WRITE_ZEROES,
    IO_DISCARD,
    IO_FLUSH,
    IO_BLOCK_STATUS,
    IO__MAX,
} IoType;

static const char *const iotype_names[IO__MAX] = {
    "read", "write", "write-zeroes", "discard", "flush", "block-status",
};

/* QEMU 7.2's BlkdebugEvent names: all are accepted, so configurations
 * written for QEMU open; see event_fires() for those that fire here. */
static const char *const event_names[] = {
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table",
    "l1_grow_activate_table", "l2_load", "l2_update",
    "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio",
    "write_compressed", "vmstate_load", "vmstate_save", "cow_read",
    "cow_write", "reftable_load", "reftable_grow", "reftable_update",
    "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes",
    "cluster_free", "flush_to_os", "flush_to_disk", "pwritev_rmw_head",
    "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare",
    "l1_shrink_write_table", "l1_shrink_free_l2_clusters", "cor_write",
    "cluster_alloc_space", "none", NULL,
};

/* QEMU's default iotype set: everything but block-status. */
#define DEFAULT_IOTYPES ((1u << IO_READ) | (1u << IO_WRITE) | \
                         (1u << IO_WRITE_ZEROES) | (1u << IO_DISCARD) | \
                         (1u << IO_FLUSH))

typedef struct DebugRule {
    const char *event;      /* points into event_names */
    int64_t state;          /* 0: any state */
    int error;              /* positive errno; 0 injects nothing */
    bool once;
    bool immediately;
    unsigned iotypes;       /* bit per IoType */
    bool has_range;
    uint64_t range_start, range_len;
    uint64_t after;         /* matching requests still let through */
    bool spent;             /* a once rule that fired */
    /* The format above raised this rule's event (a metadata event such
     * as l2_update): requests match it from then on, as QEMU's active
     * rules do, until another raised event with rules replaces it. */
    bool armed;
} DebugRule;

/* A write the volatile cache holds and has not given to the image. */
typedef struct CacheEntry {
    uint64_t offset, bytes;
    uint8_t *data;          /* NULL: write-zeroes */
    StrataReqFlags flags;
    int refcnt;             /* the queue's plus readers' */
} CacheEntry;

typedef struct DebugState {
    DebugRule *rules;
    unsigned nrules;
    int64_t state;          /* QEMU starts in state 1; set-state is absent */

    bool volatile_cache;
    uint64_t cache_limit;
    GQueue cache;           /* CacheEntry *, oldest first */
    uint64_t cached_bytes;  /* data bytes held */
    /* Write-back of held entries happens in queue order, one writer at a
     * time, so an older write never lands after a newer one. */
    StrataCoMutex writeback_lock;
    GRand *rand;
    bool powered_off;
    /* strata_debug_arm_power_cut(): the cut waits for this many more
     * write-kind requests, then fires as the next one arrives. */
    bool cut_armed;
    uint64_t cut_writes_left;
    StrataPowerCutMode cut_mode;
} DebugState;

static void cut_power(StrataNode *node, StrataPowerCutMode mode);

static const StrataOptDesc debug_options[] = {
    { "image", STRATA_OPT_CHILD, true, NULL },
    { "inject-error", STRATA_OPT_ANY, false, NULL },
    { "align", STRATA_OPT_SIZE, false, NULL },
    { "x-volatile-cache", STRATA_OPT_BOOL, false, NULL },
    { "x-cache-size", STRATA_OPT_SIZE, false, NULL },
    { "x-seed", STRATA_OPT_INT, false, NULL },
    { NULL, 0, false, NULL },
};

/* ---- parsing inject-error ---- */

static bool type_error(const char *path, const char *expected,
                       GError **error)
{
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Invalid parameter type for '%s', expected: %s", path,
                expected);
    return false;
}

/* Integers arrive as JSON numbers, or as strings from key=value text. */
static bool node_get_int(JsonNode *v, const char *path, int64_t *out,
                         GError **error)
{
    if (JSON_NODE_HOLDS_VALUE(v)) {
        GType t = json_node_get_value_type(v);

        if (t == G_TYPE_INT64) {
            *out = json_node_get_int(v);
            return true;
        }
        if (t == G_TYPE_STRING &&
            g_ascii_string_to_signed(json_node_get_string(v), 10, G_MININT64,
                                     G_MAXINT64, out, NULL)) {
            return true;
        }
    }
    return type_error(path, "integer", error);
}

static bool node_get_bool(JsonNode *v, const char *path, bool *out,
                          GError **error)
{
    if (JSON_NODE_HOLDS_VALUE(v)) {
        GType t = json_node_get_value_type(v);

        if (t == G_TYPE_BOOLEAN) {
            *out = json_node_get_boolean(v);
            return true;
        }
        if (t == G_TYPE_STRING) {
            const char *s = json_node_get_string(v);

            if (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes")) {
                *out = true;
                return true;
            }
            if (!strcmp(s, "off") || !strcmp(s, "false") ||
                !strcmp(s, "no")) {
                *out = false;
                return true;
            }
        }
    }
    return type_error(path, "boolean", error);
}

static const char *node_get_string(JsonNode *v)
{
    if (JSON_NODE_HOLDS_VALUE(v) &&
        json_node_get_value_type(v) == G_TYPE_STRING) {
        return json_node_get_string(v);
    }
    return NULL;
}

static bool non_negative(int64_t value, const char *path, GError **error)
{
    if (value < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter '%s' expects a non-negative value", path);
        return false;
    }
    return true;
}

static bool parse_iotype(JsonNode *v, const char *path, unsigned *mask,
                         GError **error)
{
    const char *name = node_get_string(v);

    if (!name) {
        return type_error(path, "string", error);
    }
    for (int i = 0; i < IO__MAX; i++) {
        if (strcmp(name, iotype_names[i]) == 0) {
            *mask |= 1u << i;
            return true;
        }
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                "Parameter '%s' does not accept value '%s'", path, name);
    return false;
}

static bool parse_rule(JsonNode *node, unsigned index, DebugRule *rule,
                       GError **error)
{
    JsonObject *obj;
    g_autoptr(GList) members = NULL;
    bool has_sector = false, has_xoffset = false, has_xbytes = false;
    int64_t sector = -1, xoffset = 0, xbytes = 1;

    *rule = (DebugRule) {
        .error = EIO,
        .iotypes = DEFAULT_IOTYPES,
    };
    if (!JSON_NODE_HOLDS_OBJECT(node)) {
        g_autofree char *path = g_strdup_printf("inject-error[%u]", index);

        return type_error(path, "object", error);
    }
    obj = json_node_get_object(node);
    members = json_object_get_members(obj);
    for (GList *l = members; l; l = l->next) {
        const char *key = l->data;
        JsonNode *v = json_object_get_member(obj, key);
        g_autofree char *path = g_strdup_printf("inject-error[%u].%s", index,
                                                key);
        int64_t n;
        bool b;

        if (!strcmp(key, "event")) {
            const char *name = node_get_string(v);

            if (!name) {
                return type_error(path, "string", error);
            }
            for (int i = 0; event_names[i]; i++) {
                if (!strcmp(name, event_names[i])) {
                    rule->event = event_names[i];
                }
            }
            if (!rule->event) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' does not accept value '%s'",
                            path, name);
                return false;
            }
        } else if (!strcmp(key, "state")) {
            if (!node_get_int(v, path, &n, error) ||
                !non_negative(n, path, error)) {
                return false;
            }
            rule->state = n;
        } else if (!strcmp(key, "errno")) {
            if (!node_get_int(v, path, &n, error) ||
                !non_negative(n, path, error)) {
                return false;
            }
            if (n > 4095) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' must be an errno value "
                            "(0 to 4095)", path);
                return false;
            }
            rule->error = (int)n;
        } else if (!strcmp(key, "sector")) {
            if (!node_get_int(v, path, &sector, error)) {
                return false;
            }
            if (sector < -1 || sector > (int64_t)(INT64_MAX / SECTOR)) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' must be -1 or a sector number",
                            path);
                return false;
            }
            has_sector = sector >= 0;
        } else if (!strcmp(key, "once")) {
            if (!node_get_bool(v, path, &b, error)) {
                return false;
            }
            rule->once = b;
        } else if (!strcmp(key, "immediately")) {
            if (!node_get_bool(v, path, &b, error)) {
                return false;
            }
            rule->immediately = b;
        } else if (!strcmp(key, "iotype")) {
            /* QEMU takes one type; a list is a strata extension. */
            rule->iotypes = 0;
            if (JSON_NODE_HOLDS_ARRAY(v)) {
                JsonArray *a = json_node_get_array(v);
                guint len = json_array_get_length(a);

                if (len == 0) {
                    g_set_error(error, STRATA_ERROR,
                                STRATA_ERROR_INVALID_ARGUMENT,
                                "Parameter '%s' must not be empty", path);
                    return false;
                }
                for (guint i = 0; i < len; i++) {
                    g_autofree char *ipath = g_strdup_printf("%s[%u]", path,
                                                             i);

                    if (!parse_iotype(json_array_get_element(a, i), ipath,
                                      &rule->iotypes, error)) {
                        return false;
                    }
                }
            } else if (!parse_iotype(v, path, &rule->iotypes, error)) {
                return false;
            }
        } else if (!strcmp(key, "x-offset")) {
            if (!node_get_int(v, path, &xoffset, error) ||
                !non_negative(xoffset, path, error)) {
                return false;
            }
            has_xoffset = true;
        } else if (!strcmp(key, "x-bytes")) {
            if (!node_get_int(v, path, &xbytes, error) ||
                !non_negative(xbytes, path, error)) {
                return false;
            }
            if (xbytes == 0) {
                g_set_error(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Parameter '%s' must be positive", path);
                return false;
            }
            has_xbytes = true;
        } else if (!strcmp(key, "x-after")) {
            if (!node_get_int(v, path, &n, error) ||
                !non_negative(n, path, error)) {
                return false;
            }
            rule->after = (uint64_t)n;
        } else {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter '%s' is unexpected", path);
            return false;
        }
    }

    if (!rule->event) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'inject-error[%u].event' is missing", index);
        return false;
    }
    if (has_xbytes && !has_xoffset) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'inject-error[%u].x-bytes' needs x-offset",
                    index);
        return false;
    }
    if (has_sector && has_xoffset) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameters 'inject-error[%u].sector' and "
                    "'inject-error[%u].x-offset' exclude each other",
                    index, index);
        return false;
    }
    if (has_sector) {
        rule->has_range = true;
        rule->range_start = (uint64_t)sector * SECTOR;
        rule->range_len = SECTOR;
    } else if (has_xoffset) {
        if ((uint64_t)xbytes > (uint64_t)INT64_MAX - (uint64_t)xoffset) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameters 'inject-error[%u].x-offset' and "
                        "'x-bytes' exceed INT64_MAX", index);
            return false;
        }
        rule->has_range = true;
        rule->range_start = (uint64_t)xoffset;
        rule->range_len = (uint64_t)xbytes;
    }
    return true;
}

static bool parse_rules(DebugState *s, JsonObject *options, GError **error)
{
    JsonNode *v;
    JsonArray *a;
    guint len;

    if (!strata_opts_has(options, "inject-error")) {
        return true;
    }
    v = json_object_get_member(options, "inject-error");
    if (!JSON_NODE_HOLDS_ARRAY(v)) {
        return type_error("inject-error", "array", error);
    }
    a = json_node_get_array(v);
    len = json_array_get_length(a);
    s->rules = g_new0(DebugRule, MAX(len, 1));
    for (guint i = 0; i < len; i++) {
        if (!parse_rule(json_array_get_element(a, i), i, &s->rules[i],
                        error)) {
            return false;
        }
    }
    s->nrules = len;
    return true;
}

/* ---- firing rules ---- */

/* Which events a request of @type raises at this node. */
static bool event_fires(const char *event, IoType type)
{
    if (!strcmp(event, "none")) {
        return true;
    }
    switch (type) {
    case IO_READ:
        return !strcmp(event, "read_aio");
    case IO_WRITE:
        return !strcmp(event, "write_aio") || !strcmp(event, "pwritev");
    case IO_WRITE_ZEROES:
        return !strcmp(event, "pwritev_zero");
    case IO_FLUSH:
        return !strcmp(event, "flush_to_disk") ||
               !strcmp(event, "flush_to_os");
    default:
        return false;
    }
}

static bool rule_matches(DebugState *s, DebugRule *rule, IoType type,
                         uint64_t offset, uint64_t bytes)
{
    if (rule->spent || !(rule->iotypes & (1u << type)) ||
        (rule->state && rule->state != s->state) ||
        (!rule->armed && !event_fires(rule->event, type))) {
        return false;
    }
    if (rule->has_range) {
        /* A range never matches a flush, which has none. */
        if (bytes == 0 || offset >= rule->range_start + rule->range_len ||
            rule->range_start >= offset + bytes) {
            return false;
        }
    }
    return true;
}

/* Coroutine.  0, or the -errno a rule injects into this request. */
static int rule_check(StrataNode *node, IoType type, uint64_t offset,
                      uint64_t bytes)
{
    DebugState *s = node->opaque;

    if (s->powered_off) {
        return -EIO;
    }
    if (s->cut_armed && type != IO_READ && type != IO_BLOCK_STATUS) {
        if (s->cut_writes_left == 0) {
            s->cut_armed = false;
            cut_power(node, s->cut_mode);
            return -EIO;
        }
        s->cut_writes_left--;
    }
    for (unsigned i = 0; i < s->nrules; i++) {
        DebugRule *rule = &s->rules[i];
        int err;

        if (!rule_matches(s, rule, type, offset, bytes)) {
            continue;
        }
        if (rule->after > 0) {
            rule->after--;
            continue;
        }
        if (!rule->error) {
            return 0;
        }
        err = rule->error;
        if (rule->once) {
            rule->spent = true;
        }
        if (!rule->immediately) {
            /* As QEMU: fail from a later loop iteration, not inside the
             * submitting call. */
            strata_loop_co_yield_now(node->ctx->loop);
        }
        return -err;
    }
    return 0;
}

/* The format driver above raised @event: its rules become the armed
 * ones (an event without rules leaves the armed set alone, as in
 * QEMU). */
static void debug_debug_event(StrataNode *node, const char *event)
{
    DebugState *s = node->opaque;
    bool any = false;

    for (unsigned i = 0; i < s->nrules; i++) {
        any |= !strcmp(s->rules[i].event, event);
    }
    if (!any) {
        return;
    }
    for (unsigned i = 0; i < s->nrules; i++) {
        s->rules[i].armed = !strcmp(s->rules[i].event, event);
    }
}

/* ---- the volatile cache ---- */

static void entry_unref(CacheEntry *e)
{
    if (--e->refcnt == 0) {
        g_free(e->data);
        g_free(e);
    }
}

static void entry_unref_cb(gpointer data)
{
    entry_unref(data);
}

static uint64_t entry_mem(const CacheEntry *e)
{
    return e->data ? e->bytes : 0;
}

static int entry_write(StrataNode *node, CacheEntry *e)
{
    StrataNode *child = node->file->node;

    if (!e->data) {
        return strata_node_co_pwrite_zeroes(child, e->offset, e->bytes,
                                            e->flags);
    }
    return strata_node_co_pwrite(child, e->offset, e->bytes, e->data, 0);
}

/* Coroutine.  Writes back the oldest entries: @count of them, or while
 * more than @limit bytes are held. */
static int writeback(StrataNode *node, guint count, uint64_t limit)
{
    DebugState *s = node->opaque;
    int ret = 0;

    strata_co_mutex_lock(&s->writeback_lock);
    while (!s->powered_off && !g_queue_is_empty(&s->cache) &&
           (count > 0 || s->cached_bytes > limit)) {
        CacheEntry *e = g_queue_peek_head(&s->cache);

        /* The entry stays queued (visible to reads) until it is on the
         * image; only this locked loop removes from the head. */
        ret = entry_write(node, e);
        if (ret < 0) {
            break;
        }
        g_queue_pop_head(&s->cache);
        s->cached_bytes -= entry_mem(e);
        entry_unref(e);
        if (count > 0) {
            count--;
        }
    }
    strata_co_mutex_unlock(&s->writeback_lock);
    if (s->powered_off) {
        return -EIO;
    }
    return ret;
}

/* Coroutine.  Everything held now goes to the image, in order. */
static int writeback_all(StrataNode *node)
{
    DebugState *s = node->opaque;

    /* After a power cut nothing reaches the disk, even with nothing
     * held: a flush must not report success. */
    if (s->powered_off) {
        return -EIO;
    }
    if (g_queue_is_empty(&s->cache)) {
        return 0;
    }
    /* Only what is held now: writes arriving meanwhile are not this
     * flush's business, and waiting for them could last forever. */
    return writeback(node, g_queue_get_length(&s->cache), UINT64_MAX);
}

static void cache_hold(StrataNode *node, uint64_t offset, uint64_t bytes,
                       uint8_t *data, StrataReqFlags flags)
{
    DebugState *s = node->opaque;
    CacheEntry *e = g_new(CacheEntry, 1);

    *e = (CacheEntry) {
        .offset = offset,
        .bytes = bytes,
        .data = data,
        .flags = flags,
        .refcnt = 1,
    };
    g_queue_push_tail(&s->cache, e);
    s->cached_bytes += entry_mem(e);
}

/* Copies the held entries overlapping the range onto @qiov, oldest
 * first so the newest wins. */
static void overlay(GPtrArray *entries, uint64_t offset, uint64_t bytes,
                    StrataIOVec *qiov, size_t qiov_offset)
{
    for (guint i = 0; i < entries->len; i++) {
        CacheEntry *e = g_ptr_array_index(entries, i);
        uint64_t start = MAX(e->offset, offset);
        uint64_t end = MIN(e->offset + e->bytes, offset + bytes);

        if (start >= end) {
            continue;
        }
        if (e->data) {
            strata_iov_from_buf(qiov, qiov_offset + (start - offset),
                                e->data + (start - e->offset), end - start);
        } else {
            strata_iov_memset(qiov, qiov_offset + (start - offset), 0,
                              end - start);
        }
    }
}

static GPtrArray *overlapping_entries(DebugState *s, uint64_t offset,
                                      uint64_t bytes)
{
    GPtrArray *found = NULL;

    for (GList *l = s->cache.head; l; l = l->next) {
        CacheEntry *e = l->data;

        if (e->offset < offset + bytes && offset < e->offset + e->bytes) {
            if (!found) {
                found = g_ptr_array_new_with_free_func(entry_unref_cb);
            }
            e->refcnt++;
            g_ptr_array_add(found, e);
        }
    }
    return found;
}

static uint64_t cache_end(DebugState *s)
{
    uint64_t end = 0;

    for (GList *l = s->cache.head; l; l = l->next) {
        CacheEntry *e = l->data;

        end = MAX(end, e->offset + e->bytes);
    }
    return end;
}

static void cache_drop_all(DebugState *s)
{
    CacheEntry *e;

    while ((e = g_queue_pop_head(&s->cache))) {
        entry_unref(e);
    }
    s->cached_bytes = 0;
}

/* ---- open / close ---- */

static bool debug_open(StrataNode *node, JsonObject *options, GError **error)
{
    DebugState *s = node->opaque;
    uint64_t align;

    g_queue_init(&s->cache);
    strata_co_mutex_init(&s->writeback_lock);
    s->state = 1;

    if (!node->file) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'image' is missing");
        return false;
    }
    if (!parse_rules(s, options, error)) {
        g_clear_pointer(&s->rules, g_free);
        return false;
    }

    node->limits = node->file->node->limits;
    align = strata_opts_get_size(options, "align", 0);
    if (align && (align >= INT32_MAX || (align & (align - 1)))) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot meet constraints with align %" G_GUINT64_FORMAT,
                    align);
        g_clear_pointer(&s->rules, g_free);
        return false;
    }
    node->limits.request_alignment = MAX(node->limits.request_alignment,
                                         (uint32_t)align);
    if (node->limits.request_alignment == 0) {
        node->limits.request_alignment = 1;
    }

    s->volatile_cache = strata_opts_get_bool(options, "x-volatile-cache",
                                             false);
    s->cache_limit = strata_opts_get_size(options, "x-cache-size",
                                          DEFAULT_CACHE_SIZE);
    if (strata_opts_has(options, "x-seed")) {
        s->rand = g_rand_new_with_seed(
            (guint32)strata_opts_get_int(options, "x-seed", 0));
    } else {
        s->rand = g_rand_new();
    }
    return true;
}

static void debug_close(StrataNode *node)
{
    DebugState *s = node->opaque;

    /* Held writes are lost, as when the process dies: only a flush
     * (which the graph sends before closing, if it does) saves them. */
    cache_drop_all(s);
    g_free(s->rules);
    s->rules = NULL;
    if (s->rand) {
        g_rand_free(s->rand);
        s->rand = NULL;
    }
}

/* ---- data ---- */

static int64_t debug_co_get_length(StrataNode *node)
{
    DebugState *s = node->opaque;
    int64_t len = strata_node_co_refresh_length(node->file->node);

    if (len < 0 || g_queue_is_empty(&s->cache)) {
        return len;
    }
    /* Held writes past the end of the image have grown the "disk". */
    return MAX(len, (int64_t)cache_end(s));
}

static int debug_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                           StrataIOVec *qiov, size_t qiov_offset,
                           StrataReqFlags flags)
{
    DebugState *s = node->opaque;
    StrataNode *child = node->file->node;
    g_autoptr(GPtrArray) held = NULL;
    uint64_t child_bytes = bytes;
    int ret;

    ret = rule_check(node, IO_READ, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (!s->volatile_cache || g_queue_is_empty(&s->cache)) {
        return strata_node_co_preadv(child, offset, bytes, qiov, qiov_offset,
                                     flags);
    }

    held = overlapping_entries(s, offset, bytes);
    if (held) {
        /* Held data may lie beyond the image's end: read only what the
         * image has, the rest is zeroes under the overlay. */
        int64_t len = strata_node_co_refresh_length(child);

        if (len < 0) {
            return (int)len;
        }
        child_bytes = (uint64_t)len > offset
                      ? MIN(bytes, (uint64_t)len - offset) : 0;
    }
    if (child_bytes > 0) {
        ret = strata_node_co_preadv(child, offset, child_bytes, qiov,
                                    qiov_offset, flags);
        if (ret < 0) {
            return ret;
        }
    }
    if (child_bytes < bytes) {
        strata_iov_memset(qiov, qiov_offset + child_bytes, 0,
                          bytes - child_bytes);
    }
    if (held) {
        overlay(held, offset, bytes, qiov, qiov_offset);
    }
    return s->powered_off ? -EIO : 0;
}

static int debug_co_pwritev(StrataNode *node, uint64_t offset, uint64_t bytes,
                            StrataIOVec *qiov, size_t qiov_offset,
                            StrataReqFlags flags)
{
    DebugState *s = node->opaque;
    uint8_t *data;
    int ret;

    ret = rule_check(node, IO_WRITE, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (!s->volatile_cache) {
        return strata_node_co_pwritev(node->file->node, offset, bytes, qiov,
                                      qiov_offset, flags);
    }
    if (flags & STRATA_REQ_FUA) {
        /* Everything older first, or it could land on top of this. */
        ret = writeback_all(node);
        if (ret < 0) {
            return ret;
        }
        return strata_node_co_pwritev(node->file->node, offset, bytes, qiov,
                                      qiov_offset, flags);
    }
    data = g_malloc(bytes);
    strata_iov_to_buf(qiov, qiov_offset, data, bytes);
    cache_hold(node, offset, bytes, data, 0);
    if (s->cached_bytes > s->cache_limit) {
        /* A full cache writes back its oldest data, as a disk may at any
         * time. */
        return writeback(node, 0, s->cache_limit);
    }
    return 0;
}

static int debug_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                  uint64_t bytes, StrataReqFlags flags)
{
    DebugState *s = node->opaque;
    int ret;

    ret = rule_check(node, IO_WRITE_ZEROES, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (s->volatile_cache && !(flags & STRATA_REQ_FUA)) {
        /* Held as a record, zeroing is cheap here whatever the flags:
         * a caller that asks for no fallback (qcow2's copy-on-write over
         * zeroes) takes the same path it takes on a real file, and the
         * crash tests cut through it.  Written back with a fallback. */
        cache_hold(node, offset, bytes, NULL,
                   flags & STRATA_REQ_MAY_UNMAP);
        return 0;
    }
    if (s->volatile_cache) {
        ret = writeback_all(node);
        if (ret < 0) {
            return ret;
        }
    }
    return strata_node_co_pwrite_zeroes(node->file->node, offset, bytes,
                                        flags);
}

static int debug_co_pdiscard(StrataNode *node, uint64_t offset,
                             uint64_t bytes)
{
    DebugState *s = node->opaque;
    int ret;

    ret = rule_check(node, IO_DISCARD, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (s->volatile_cache) {
        /* Keep the order: held writes to the range go down first. */
        ret = writeback_all(node);
        if (ret < 0) {
            return ret;
        }
    }
    return strata_node_co_pdiscard(node->file->node, offset, bytes);
}

static int debug_co_flush(StrataNode *node)
{
    DebugState *s = node->opaque;
    int ret;

    ret = rule_check(node, IO_FLUSH, 0, 0);
    if (ret < 0) {
        return ret;
    }
    /* The I/O path flushes the image next. */
    return s->volatile_cache ? writeback_all(node) : 0;
}

static int debug_co_block_status(StrataNode *node, bool want_zero,
                                 uint64_t offset, uint64_t bytes,
                                 uint64_t *pnum, uint64_t *map,
                                 StrataNode **file)
{
    DebugState *s = node->opaque;
    uint64_t covered_end = 0, next_start = offset + bytes;
    int ret;

    ret = rule_check(node, IO_BLOCK_STATUS, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    for (GList *l = s->cache.head; l; l = l->next) {
        CacheEntry *e = l->data;

        if (e->offset <= offset && offset < e->offset + e->bytes) {
            covered_end = MAX(covered_end, e->offset + e->bytes);
        } else if (e->offset > offset && e->offset < next_start) {
            next_start = e->offset;
        }
    }
    if (covered_end) {
        /* Held data is in no file: data, but not at a mappable offset. */
        *pnum = MIN(bytes, covered_end - offset);
        return STRATA_BLOCK_DATA;
    }
    /* What the image says, as the I/O path forwards for filters. */
    ret = strata_node_co_block_status(node->file->node, want_zero, offset,
                                      next_start - offset, pnum, map, file);
    if (ret < 0) {
        return ret;
    }
    if (*pnum == 0) {
        /* Held data grew the disk past the image's end. */
        *pnum = next_start - offset;
        return STRATA_BLOCK_ZERO;
    }
    return ret & ~STRATA_BLOCK_EOF;
}

static int debug_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                             GError **error)
{
    DebugState *s = node->opaque;
    int ret;

    if (s->powered_off) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "The blkdebug node has lost power");
        return -EIO;
    }
    if (s->volatile_cache) {
        ret = writeback_all(node);
        if (ret < 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not write back cached data: %s",
                        g_strerror(-ret));
            return ret;
        }
    }
    return strata_node_co_truncate(node->file->node, offset, exact, error);
}

/* ---- power cut ---- */

typedef struct PowerCut {
    StrataNode *node;
    StrataPowerCutMode mode;
    int ret;
} PowerCut;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/*
 * Writes the sectors [@first, @last] as the cache holds them: the
 * image's bytes with every held entry laid over them, oldest first, so
 * each sector gets its newest content.  Nothing past @limit is written.
 */
static int persist_sectors(StrataNode *node, GPtrArray *entries,
                           uint64_t first, uint64_t last, uint64_t image_len,
                           uint64_t limit)
{
    StrataNode *child = node->file->node;
    uint64_t offset = first * SECTOR;
    uint64_t end = MIN((last + 1) * SECTOR, limit);
    uint64_t bytes, from_image;
    g_autofree uint8_t *buf = NULL;
    StrataIOVec qiov;
    int ret;

    if (end <= offset) {
        return 0;
    }
    bytes = end - offset;
    buf = g_malloc0(bytes);
    from_image = image_len > offset ? MIN(bytes, image_len - offset) : 0;
    if (from_image) {
        ret = strata_node_co_pread(child, offset, from_image, buf, 0);
        if (ret < 0) {
            return ret;
        }
    }
    strata_iov_init_buf(&qiov, buf, bytes);
    overlay(entries, offset, bytes, &qiov, 0);
    return strata_node_co_pwrite(child, offset, bytes, buf, 0);
}

/*
 * The disk persists an arbitrary subset of its dirty sectors: each one,
 * independently, with its newest content.  Sector order is irrelevant
 * (they do not overlap), which keeps the outcome a function of the seed
 * and the held writes alone.
 */
static int persist_random_subset(StrataNode *node, GPtrArray *entries)
{
    DebugState *s = node->opaque;
    g_autoptr(GArray) sectors = g_array_new(false, false, sizeof(uint64_t));
    uint64_t limit = 0, run_first = 0, run_last = 0;
    bool in_run = false;
    int64_t image_len;
    int ret;

    image_len = strata_node_co_refresh_length(node->file->node);
    if (image_len < 0) {
        return (int)image_len;
    }
    for (guint i = 0; i < entries->len; i++) {
        CacheEntry *e = g_ptr_array_index(entries, i);

        limit = MAX(limit, e->offset + e->bytes);
        for (uint64_t sec = e->offset / SECTOR;
             sec <= (e->offset + e->bytes - 1) / SECTOR; sec++) {
            g_array_append_val(sectors, sec);
        }
    }
    limit = MAX(limit, (uint64_t)image_len);
    qsort(sectors->data, sectors->len, sizeof(uint64_t), cmp_u64);

    for (guint i = 0; i < sectors->len; i++) {
        uint64_t sec = g_array_index(sectors, uint64_t, i);

        if (i > 0 && sec == g_array_index(sectors, uint64_t, i - 1)) {
            continue; /* dirty from more than one write: one coin */
        }
        if (!g_rand_boolean(s->rand)) {
            continue;
        }
        if (in_run && sec == run_last + 1) {
            run_last = sec;
            continue;
        }
        if (in_run) {
            ret = persist_sectors(node, entries, run_first, run_last,
                                  (uint64_t)image_len, limit);
            if (ret < 0) {
                return ret;
            }
        }
        in_run = true;
        run_first = run_last = sec;
    }
    if (in_run) {
        return persist_sectors(node, entries, run_first, run_last,
                               (uint64_t)image_len, limit);
    }
    return 0;
}

/* Coroutine.  The power fails: held writes are dropped or partly
 * written as @mode says, and the node is off from now on.  A failure to
 * write the survivors is a test setup problem: -errno. */
static int cut_power_ret(StrataNode *node, StrataPowerCutMode mode)
{
    DebugState *s = node->opaque;
    g_autoptr(GPtrArray) entries =
        g_ptr_array_new_with_free_func(entry_unref_cb);
    CacheEntry *e;
    int ret = 0;

    /* Let a write-back in progress finish: its sectors were on their
     * way to the medium. */
    strata_co_mutex_lock(&s->writeback_lock);
    s->powered_off = true;
    while ((e = g_queue_pop_head(&s->cache))) {
        g_ptr_array_add(entries, e);
    }
    s->cached_bytes = 0;
    if (mode == STRATA_POWER_CUT_RANDOM_SUBSET && entries->len > 0) {
        ret = persist_random_subset(node, entries);
    }
    strata_co_mutex_unlock(&s->writeback_lock);
    return ret;
}

static void cut_power(StrataNode *node, StrataPowerCutMode mode)
{
    int ret = cut_power_ret(node, mode);

    if (ret < 0) {
        g_warning("blkdebug: could not write what survived the power cut: "
                  "%s", g_strerror(-ret));
    }
}

static void power_cut_co(void *opaque)
{
    PowerCut *pc = opaque;

    pc->ret = cut_power_ret(pc->node, pc->mode);
}

bool strata_debug_power_cut(StrataNode *node, StrataPowerCutMode mode,
                            GError **error)
{
    PowerCut pc = { .node = node, .mode = mode };

    g_return_val_if_fail(node != NULL, false);
    if (node->drv != &strata_driver_blkdebug) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Node '%s' is not a blkdebug node", node->node_name);
        return false;
    }
    strata_loop_run_co(node->ctx->loop, power_cut_co, &pc);
    if (pc.ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not write the surviving data: %s",
                    g_strerror(-pc.ret));
        return false;
    }
    return true;
}

uint64_t strata_debug_cached_bytes(StrataNode *node)
{
    DebugState *s;

    g_return_val_if_fail(node != NULL, 0);
    if (node->drv != &strata_driver_blkdebug) {
        return 0;
    }
    s = node->opaque;
    return s->cached_bytes;
}

/* Nothing of this driver's own can change on a reopen. */
static bool debug_reopen_prepare(StrataReopenState *rs, GError **error)
{
    return strata_reopen_check_options(rs, NULL, error);
}

const StrataDriver strata_driver_blkdebug = {
    .name = "blkdebug",
    .state_size = sizeof(DebugState),
    .is_filter = true,
    .options = debug_options,
    .open = debug_open,
    .close = debug_close,
    .co_get_length = debug_co_get_length,
    .co_preadv = debug_co_preadv,
    .co_pwritev = debug_co_pwritev,
    .supports_fua = true,
    .co_pwrite_zeroes = debug_co_pwrite_zeroes,
    .co_pdiscard = debug_co_pdiscard,
    .co_flush = debug_co_flush,
    .co_block_status = debug_co_block_status,
    .co_truncate = debug_co_truncate,
    .reopen_prepare = debug_reopen_prepare,
    .debug_event = debug_debug_event,
};

void strata_debug_arm_power_cut(StrataNode *node, uint64_t writes,
                                StrataPowerCutMode mode)
{
    DebugState *s;

    g_return_if_fail(node != NULL &&
                     node->drv == &strata_driver_blkdebug);
    s = node->opaque;
    s->cut_armed = true;
    s->cut_writes_left = writes;
    s->cut_mode = mode;
}

bool strata_debug_powered_off(StrataNode *node)
{
    g_return_val_if_fail(node != NULL &&
                         node->drv == &strata_driver_blkdebug, false);
    return ((DebugState *)node->opaque)->powered_off;
}
